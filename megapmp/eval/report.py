"""Writing evaluation reports: JSON (strict: NaN -> null), Markdown, PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from megapmp.io import atomic_open, sha256_file, write_text_atomic


def jsonable(value):
    """Numpy scalars/arrays to Python, NaN/inf to None (strict JSON has neither)."""
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


def write_json(path, report: dict) -> None:
    write_text_atomic(path, json.dumps(jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def file_fingerprint(path) -> dict:
    """{path, bytes, sha256} of a file; for a directory, of each file in it (sorted)."""
    path = Path(path)
    if path.is_dir():
        return {"path": str(path), "files": [file_fingerprint(p) for p in sorted(path.iterdir()) if p.is_file()]}
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
