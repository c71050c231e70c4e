#!/usr/bin/env python
"""The headline figures of a tools/gpu_check.sh run, from the files it wrote into OUT_DIR.

    python tools/gpu_check_summary.py OUT_DIR

Reads summary.txt (each part's "part NAME rc=RC seconds=S limit=L" line), tests.log (pytest's counts and
failures), loss.jsonl and mfu.jsonl (the benches' JSON lines: one per side, then a summary line per run; a
run cut short leaves only its side lines, which are used as they are), writes OUT_DIR/summary.json and prints
a short table: what passed, the fused loss against the naive path, and per model the trainer's MFU, its
ratios to the seed approach, shared-prefix's share of its FLOP ceiling, the targets, the top CUDA kernels.
Missing files or lines are reported as missing, never as an error: the check's other parts still count.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PART = re.compile(r"^part (\S+) rc=(\S+) seconds=(\d+) limit=(-?\d+)")
PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def parts(out: Path) -> list[dict]:
    found = []
    text = (out / "summary.txt").read_text(errors="replace") if (out / "summary.txt").exists() else ""
    for line in text.splitlines():
        m = PART.match(line)
        if m:
            rc = m.group(2)
            found.append({"part": m.group(1), "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                          "seconds": int(m.group(3)), "limit": int(m.group(4)),
                          "killed": rc in ("124", "137")})
    return found


def tests(out: Path) -> dict:
    path = out / "tests.log"
    if not path.exists():
        return {"missing": True}
    text = path.read_text(errors="replace")
    counts = {}
    for line in reversed(text.splitlines()):
        if line.startswith("=") and ("passed" in line or "failed" in line or "skipped" in line or "error" in line):
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                      for n, kind in PYTEST_COUNTS.findall(line)}
            break
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    passed = len(re.findall(r" PASSED", text))
    return {"counts": counts, "failed": failed, "passed_lines": passed, "finished": bool(counts)}


def loss(out: Path) -> dict:
    by_shape: dict = {}
    for line in json_lines(out / "loss.jsonl"):
        shape = by_shape.setdefault(line.get("shape"), {"sides": {}})
        if line.get("line") == "side":
            shape["sides"][line["side"]] = {k: line.get(k) for k in ("ms", "peak_bytes", "workspace_bytes", "speedup",
                                                                     "memory_ratio", "max_rel_err", "error")}
        elif line.get("line") == "summary":
            shape.update({k: line.get(k) for k in ("device", "tokens", "fp32_accumulation_mode", "recompute_config",
                                                   "torch", "triton")})
    return by_shape


def mfu(out: Path) -> dict:
    presets: dict = {}
    for line in json_lines(out / "mfu.jsonl"):
        if line.get("line") == "side":
            run = presets.setdefault(line["preset"], {}).setdefault(_mix(line), {"sides": {}})
            run["sides"][line["side"]] = _side(line)
        elif line.get("line") == "summary":
            for name, preset in line.get("presets", {}).items():
                run = presets.setdefault(name, {}).setdefault(_mix(line), {"sides": {}})
                run.update(ratios=preset.get("ratios"), targets=preset.get("targets"),
                           settings=line.get("settings"), terminated=line.get("terminated"),
                           device=line.get("device"), peak_tflops=line.get("peak_tflops"))
                for side, figures in preset.get("sides", {}).items():
                    run["sides"][side] = _side(figures)
    return presets


def _mix(line: dict) -> str:
    return line.get("mix") or "?"


def _side(s: dict) -> dict:
    keys = ("tokens_per_s", "pairs_per_s", "mfu", "tflops", "step_s_median", "steps_timed", "steps_compiled",
            "compile_s_warmup", "compile_s_timed", "peak_bytes", "step_peak_bytes", "memory_estimate_bytes",
            "attention_backend", "loss_backend", "compile", "error", "skipped", "partial")
    side = {k: s.get(k) for k in keys if k in s}
    profile = s.get("profile")
    if profile:
        side["top_kernels"] = [(row["name"][:80], round(row["share"], 3)) for row in profile.get("top", [])]
    return side


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def report(summary: dict) -> str:
    lines = ["== gpu_check summary"]
    for p in summary["parts"]:
        lines.append(f"  {p['part']:<18} rc={p['rc']!s:<8} {p['seconds']:>4}s (limit {p['limit']}s)"
                     + ("  KILLED" if p["killed"] else ""))
    t = summary["tests"]
    lines.append(f"tests: {t.get('counts') or 'no pytest summary line (killed?)'}; passed lines {t.get('passed_lines')}"
                 + (f"; FAILED {t['failed']}" if t.get("failed") else ""))
    for shape, run in summary["loss"].items():
        sides = run["sides"]
        lines.append(f"loss {shape} ({run.get('tokens')} tokens, accumulation {run.get('fp32_accumulation_mode')}): "
                     + "; ".join(f"{name} {fmt(s.get('ms'))} ms x{fmt(s.get('speedup'))} "
                                 f"{fmt((s.get('peak_bytes') or 0) / 1e9)} GB"
                                 + (f" ERROR {s['error'][:60]}" if s.get("error") else "")
                                 for name, s in sides.items()))
    for preset, mixes in summary["mfu"].items():
        for mix, run in mixes.items():
            lines.append(f"mfu {preset} ({mix}){' TERMINATED' if run.get('terminated') else ''}:")
            for name, s in run["sides"].items():
                if "skipped" in s:
                    lines.append(f"  {name:<22} skipped: {s['skipped']}")
                    continue
                lines.append(f"  {name:<22} {fmt(s.get('tokens_per_s'), ',.0f')} tok/s  MFU {fmt(s.get('mfu'))}  "
                             f"{fmt(s.get('tflops'))} TFLOP/s  step {fmt(s.get('step_s_median'))} s  "
                             f"compiled {s.get('steps_compiled')}/{s.get('steps_timed')} (warm-up "
                             f"{fmt(s.get('compile_s_warmup'))} s)  peak {fmt((s.get('peak_bytes') or 0) / 1e9)} GB"
                             + (f"  ERROR {s['error'][:80]}" if s.get("error") else ""))
            r = run.get("ratios") or {}
            if r:
                lines.append(f"  duplicated / seed_ckpt tokens/s {fmt(r.get('megapmp_duplicated_over_seed_ckpt_tokens_per_s'))}; "
                             f"shared-prefix / duplicated pairs/s {fmt(r.get('shared_prefix_over_duplicated_pairs_per_s'))} "
                             f"(FLOP ceiling {fmt(r.get('shared_prefix_flop_ceiling'))}, share "
                             f"{fmt(r.get('shared_prefix_share_of_ceiling'))})")
            if run.get("targets"):
                lines.append(f"  targets {run['targets']}")
            top = run["sides"].get("megapmp_duplicated", {}).get("top_kernels")
            if top:
                lines.append("  top kernels (duplicated): " + "; ".join(f"{n} {share:.1%}" for n, share in top[:10]))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tools/gpu_check_summary.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    summary = {"parts": parts(out), "tests": tests(out), "loss": loss(out), "mfu": mfu(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
