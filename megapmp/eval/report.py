"""Writing evaluation reports: JSON (strict: NaN -> null), Markdown, PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path


def jsonable(value):
    """Numpy scalars/arrays to Python, NaN/inf to None (strict JSON has neither)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, report: dict) -> None:
    write_text_atomic(path, json.dumps(jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def file_fingerprint(path) -> dict:
    """{path, bytes, sha256} of a file; for a directory, of each file in it (sorted)."""
    path = Path(path)
    if path.is_dir():
        return {"path": str(path), "files": [file_fingerprint(p) for p in sorted(path.iterdir()) if p.is_file()]}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_header(report: dict) -> str:
    model = report.get("model") or {}
    data = report.get("data") or {}
    lines = [f"# megapmp evaluation: {report['task']}", ""]
    if model:
        step = f", step {model['step']}" if model.get("step") is not None else ""
        template = (model.get("template") or {}).get("name")
        lines.append(f"- model: `{model.get('path')}` ({model.get('kind')}{step}; template {template!r}, "
                     f"eos_policy {model.get('eos_policy')!r}, {model.get('device')}, {model.get('precision')})")
    paths = data.get("paths") or []
    lines.append(f"- data: {', '.join(f'`{p}`' for p in paths)} (format {data.get('format')})")
    if report.get("limit") is not None:
        lines.append(f"- limit: {report['limit']}")
    lines.append(f"- created: {report.get('created')}; {fmt(report.get('elapsed_s'), 1)} s")
    return "\n".join(lines) + "\n"


def new_figure(width: float = 6.4, height: float = 4.4):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    return plt, fig, ax


def save_figure(plt, fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.tight_layout()
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
