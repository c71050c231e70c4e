"""Assemble the quickstart's report from its stage outputs.

    python tools/quickstart_report.py OUT_DIR

Reads OUT_DIR/timings.json (seconds per stage, written by examples/quickstart.sh),
OUT_DIR/eval/<name>.json + .scores.jsonl (megapmp scoring of the final checkpoint) and
OUT_DIR/eval_hf/<name>.json + .scores.jsonl (transformers scoring of the HF export), and writes
OUT_DIR/report.json and OUT_DIR/report.md. The export is shown to agree when every per-item score
recomputed by transformers matches megapmp's within `AGREEMENT_ATOL`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from megapmp.io import write_text_atomic

# fp32 on both sides; different kernels (packed SDPA vs HF padded attention) reorder sums, so the
# scores agree to ~1e-6, not bitwise.
AGREEMENT_ATOL = 1e-4
EVALUATIONS = ("rm_accuracy", "gsm8k_best_of_4", "logiqa2_accuracy", "codeprefbench")


def headline(name: str, report: dict):
    """The one figure (or per-aspect figures) the report shows for an evaluation."""
    results = report["results"]
    if name == "gsm8k_best_of_4":
        row = next(r for r in results["rows"] if r["n"] == 4)
        return {"accuracy": row["accuracy"], "stderr": row["stderr"], "single_draw": row["single_draw"],
                "oracle": row["oracle"], "random_pick": results.get("random_pick"),
                "questions": row["questions"]}
    if name == "codeprefbench":
        return {aspect: v["accuracy"] for aspect, v in results["aspects"].items()} | {"overall": results["overall"]}
    return {"accuracy": results["accuracy"], "items": results.get("pairs", results.get("questions"))}


def _flat_scores(path: Path) -> np.ndarray:
    values = []
    for line in filter(str.strip, path.read_text().split("\n")):  # not splitlines(): U+2028 in JSON
        record = json.loads(line)
        for key in ("r_chosen", "r_rejected"):
            if key in record:
                values.append(record[key])
        values += record.get("scores", [])
    return np.asarray(values, np.float64)


def agreement(out: Path, name: str) -> dict | None:
    ours, theirs = out / "eval" / f"{name}.scores.jsonl", out / "eval_hf" / f"{name}.scores.jsonl"
    if not (ours.exists() and theirs.exists()):
        return None
    a, b = _flat_scores(ours), _flat_scores(theirs)
    if a.shape != b.shape:
        return {"scores": int(a.size), "hf_scores": int(b.size), "agree": False}
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    return {"scores": int(a.size), "max_abs_diff": diff, "agree": diff <= AGREEMENT_ATOL}


def build_report(out: Path) -> dict:
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    skipped = json.loads((out / "skipped.json").read_text()) if (out / "skipped.json").exists() else {}
    report = {"timings_s": timings, "total_s": round(sum(timings.values()), 1), "skipped": skipped,
              "hf_recomputed": {}, "agreement": {}}
    for name in EVALUATIONS:
        path = out / "eval" / f"{name}.json"
        if path.exists():
            report[name] = headline(name, json.loads(path.read_text()))
        hf_path = out / "eval_hf" / f"{name}.json"
        if hf_path.exists():
            report["hf_recomputed"][name] = headline(name, json.loads(hf_path.read_text()))
        check = agreement(out, name)
        if check is not None:
            report["agreement"][name] = check
    checks = report["agreement"].values()
    report["hf_agrees"] = bool(checks) and all(c["agree"] for c in checks)
    train = {}
    for stage in ("lm", "pmp", "rm"):
        metrics = out / "runs" / stage / "metrics.jsonl"
        if metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            last_valid = next((r for r in reversed(records) if "valid_rm_acc" in r), {})
            train[stage] = {"steps": len(records), "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                            "valid_rm_acc": last_valid.get("valid_rm_acc")}
    report["training"] = train
    return report


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = ["# megapmp quickstart report", "",
             "| evaluation | megapmp checkpoint | HF export (transformers) | max abs score diff |", "|---|---|---|---|"]
    for name in EVALUATIONS:
        if name not in report:
            continue
        ours, theirs = report[name], report["hf_recomputed"].get(name, {})
        check = report["agreement"].get(name, {})
        keys = [k for k in ours if k not in ("stderr", "items", "questions", "single_draw", "oracle", "random_pick")]
        for k in keys:
            diff = check.get("max_abs_diff")
            lines.append(f"| {name} {k} | {_fmt(ours[k])} | {_fmt(theirs.get(k, '-'))} | "
                         f"{'-' if diff is None else f'{diff:.1e}'} |")
    lines += ["", f"HF export agrees with megapmp on every score (atol {AGREEMENT_ATOL}): **{report['hf_agrees']}**", ""]
    if report["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()), ""]
    lines += ["| training stage | steps | first loss | last loss | held-out rm_acc |", "|---|---|---|---|---|"]
    for stage, t in report["training"].items():
        lines.append(f"| {stage} | {t['steps']} | {t['first_loss']:.4f} | {t['last_loss']:.4f} | {_fmt(t['valid_rm_acc'])} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    lines.append(f"| **total** | **{report['total_s']:.1f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python tools/quickstart_report.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    report = build_report(out)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    print(markdown(report))
    return 0 if report["hf_agrees"] or not report["agreement"] else 1


if __name__ == "__main__":
    sys.exit(main())
