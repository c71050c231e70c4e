#!/usr/bin/env python
"""The report of examples/reproduce_codepmp.sh: the paper's tables and figures from its evaluation reports.

    python tools/reproduce_report.py --output OUT_DIR --scale tiny|1.5b|7b

Reads OUT_DIR/eval/*.json (tools/evaluate.py reports named TASK_INIT_METRIC.json, INIT = pmp or base, "base"
being the RM finetuned without PMP), OUT_DIR/timings.json and OUT_DIR/data_used.json, and writes
OUT_DIR/report.json, OUT_DIR/report.md (Table 1's RM accuracy, Fig. 3's Best-of-N over N, multiple-choice
accuracy = Best-of-4, each with and without PMP; what data the run used; stage timings) and
OUT_DIR/best_of_n.png (Best-of-N accuracy against N, one panel per candidate set).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.eval.report import markdown_table  # noqa: E402

INITS = ("pmp", "base")
LABELS = {"pmp": "with PMP", "base": "without PMP"}
NAME = re.compile(r"^(?P<task>[a-z0-9]+)_(?P<init>pmp|base)_(?P<metric>rm_accuracy|bon_\w+|mc_\w+|multiple_choice)$")


def load_reports(eval_dir: Path) -> dict:
    """{(task, metric): {init: results}} of every report in eval_dir."""
    found: dict = {}
    for path in sorted(eval_dir.glob("*.json")):
        m = NAME.match(path.stem)
        if m is None:
            continue
        report = json.loads(path.read_text())
        found.setdefault((m["task"], m["metric"]), {})[m["init"]] = report["results"]
    return found


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def section(title: str, header: list[str], rows: list[list], note: str | None = None) -> list[str]:
    """The lines of a Markdown section: its title, an optional note, a table (cells formatted already)."""
    return [f"## {title}", ""] + ([note, ""] if note else []) + [markdown_table(header, rows), ""]


def without_with(by_init: dict) -> list[str]:
    """The two accuracy columns: without PMP, with PMP."""
    return [fmt(by_init.get(init, {}).get("accuracy")) for init in ("base", "pmp")]


def markdown(found: dict, meta: dict) -> str:
    lines = [f"# CodePMP reproduction, scale {meta['scale']}", ""]
    data = meta.get("data")
    if data:
        lines += [f"Data: `{data.get('data')}` ({data.get('source')}); Math-Shepherd: "
                  f"{data.get('mathshepherd') or 'not given (GSM8K-derived pairs stand in)'}.", ""]
    rm = {k: v for k, v in found.items() if k[1] == "rm_accuracy"}
    if rm:
        lines += section("RM accuracy on the held-out pairs (Table 1)",
                         ["RM finetuning data", "without PMP", "with PMP", "pairs"],
                         [[task, *without_with(by_init), next(iter(by_init.values()))["pairs"]]
                          for (task, _), by_init in sorted(rm.items())])
    bon = {k: v for k, v in found.items() if k[1].startswith("bon_")}
    for (task, metric), by_init in sorted(bon.items()):
        rows = {init: {r["n"]: r for r in res["rows"]} for init, res in by_init.items()}
        ns = sorted(set().union(*(r.keys() for r in rows.values())))
        any_res = next(iter(by_init.values()))
        table = [[n, *without_with({init: r.get(n, {}) for init, r in rows.items()}),
                  fmt(next((rows[i][n]["oracle"] for i in rows if n in rows[i]), None))] for n in ns]
        lines += section(f"Best-of-N, {metric.removeprefix('bon_')} ({task} RM; Fig. 3)",
                         ["N", "without PMP", "with PMP", "oracle"], table,
                         note=f"{any_res['questions']} questions, {any_res['candidates_min']}-"
                              f"{any_res['candidates_max']} candidates each; random pick {fmt(any_res['random_pick'])}.")
    mc = {k: v for k, v in found.items() if k[1].startswith("mc_") or k[1] == "multiple_choice"}
    if mc:
        lines += section("Multiple choice = Best-of-4 (section 4.1.3)",
                         ["RM", "test set", "without PMP", "with PMP", "chance"],
                         [[task, metric.removeprefix("mc_"), *without_with(by_init),
                           fmt(next(iter(by_init.values()))["chance"])] for (task, metric), by_init in sorted(mc.items())])
    timings = meta.get("timings") or {}
    if timings:
        lines += section("Stage timings (s)", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])
    return "\n".join(lines)


def plot(found: dict, path: Path) -> bool:
    panels = sorted(k for k in found if k[1].startswith("bon_"))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for init in INITS:
            res = found[key].get(init)
            if res is None:
                continue
            ns, acc = [r["n"] for r in res["rows"]], [r["accuracy"] for r in res["rows"]]
            ax.plot(ns, acc, marker="o", label=LABELS[init])
        any_res = next(iter(found[key].values()))
        ax.plot([r["n"] for r in any_res["rows"]], [r["oracle"] for r in any_res["rows"]], ls="--", color="gray",
                label="oracle")
        ax.axhline(any_res["random_pick"], ls=":", color="gray", label="random pick")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel("Best-of-N accuracy")
        ax.set_title(f"{key[0]} RM, {key[1].removeprefix('bon_')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reproduce_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, metavar="OUT_DIR", help="the reproduction's output directory")
    p.add_argument("--scale", required=True, choices=("tiny", "1.5b", "7b"))
    args = p.parse_args(argv)
    out = Path(args.output)
    found = load_reports(out / "eval")
    if not found:
        print(f"error: no evaluation reports in {out / 'eval'}", file=sys.stderr)
        return 2

    def read(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else None

    meta = {"scale": args.scale, "data": read("data_used.json"), "timings": read("timings.json")}
    figure = plot(found, out / "best_of_n.png")
    report = {**meta, "figure": "best_of_n.png" if figure else None,
              "results": {f"{task}/{metric}": by_init for (task, metric), by_init in sorted(found.items())}}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(found, meta) + ("\n![Best-of-N](best_of_n.png)\n" if figure else "")
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
