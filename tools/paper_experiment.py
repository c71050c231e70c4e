#!/usr/bin/env python
"""The paper's central claim in miniature: do PMP-initialised reward models finetune more
sample-efficiently than reward models finetuned from the plain LM? (CodePMP, Fig. 4.)

For each finetuning size (growing by sqrt(2), as in the paper), each seed, and each initialisation
(`pmp`: the quickstart's PMP checkpoint; `lm`: the quickstart's LM-pretrained checkpoint, the same
model before PMP), RM finetuning runs with identical data, hyper-parameters and step budget, then
the reward model is scored on held-out GSM8K-derived pairs (RM accuracy, ties wrong) and on the
real GSM8K model solutions (Best-of-4, exact expectation over candidate subsets).

    bash examples/quickstart.sh runs/quickstart          # makes the LM and PMP checkpoints and data
    python tools/paper_experiment.py --base runs/quickstart --output runs/paper_experiment

Results are appended to OUTPUT/results.jsonl as each run finishes (a rerun skips finished runs), then
summarised in OUTPUT/table.md, OUTPUT/summary.json and OUTPUT/sample_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a finished quickstart output directory (runs/, data/)")
    p.add_argument("--output", required=True, help="directory for results, table and plot")
    p.add_argument("--data", default=os.environ.get("MEGAPMP_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data")),
                   help="real evaluation data (GSM8K example_model_solutions.jsonl); default $MEGAPMP_DATA or ../shared/data")
    p.add_argument("--sizes", default=None,
                   help="comma-separated finetuning sizes in pairs (default: --min-size x sqrt(2)^k up to --max-size)")
    p.add_argument("--min-size", type=int, default=128, help="smallest finetuning size (pairs)")
    p.add_argument("--max-size", type=int, default=1024, help="largest finetuning size (pairs)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (data order and reward-head init)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over each finetuning set (steps scale with size)")
    p.add_argument("--pairs-per-step", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (WSD schedule, as the quickstart's RM stage)")
    p.add_argument("--bon-limit", type=int, default=300, help="GSM8K questions for Best-of-4 (of 1,319)")
    p.add_argument("--valid-limit", type=int, default=300, help="held-out GSM8K-derived pairs for RM accuracy")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def sqrt2_sizes(low: int, high: int) -> list[int]:
    sizes, k = [], 0
    while round(low * math.sqrt(2) ** k) <= high:
        sizes.append(int(round(low * math.sqrt(2) ** k)))
        k += 1
    return sizes


def finetune_shard(base: Path, work: Path, size: int) -> str:
    """A shard of the first `size` GSM8K-derived training pairs, tokenized like the quickstart's."""
    from megapmp.data.preprocess import build_shard
    from megapmp.data.shards import ShardMeta

    prefix = work / "data" / f"gsm8k_{size}"
    if not Path(f"{prefix}.json").exists():
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks at.
        lines = [l for l in (base / "data" / "gsm8k_train.jsonl").read_text().split("\n") if l.strip()]
        if len(lines) < size:
            raise ValueError(f"only {len(lines)} GSM8K training pairs, asked for {size}")
        subset = work / "data" / f"gsm8k_{size}.jsonl"
        subset.parent.mkdir(parents=True, exist_ok=True)
        subset.write_text("\n".join(lines[:size]) + "\n")
        # The EOS policy of the quickstart's own shards, so that finetuning reads the reward where PMP did.
        eos_policy = ShardMeta.load(str(base / "data" / "pmp_train")).eos_policy
        build_shard([str(subset)], str(prefix), tokenizer=str(base / "data" / "pmp_train.tokenizer"),
                    eos_policy=eos_policy, max_length=512, overlong="truncate", overwrite=True,
                    progress=False)  # no sidecar: unfinished
    return str(prefix)


def finetune(base: Path, run_dir: Path, shard: str, init: str, size: int, seed: int, args) -> dict:
    from megapmp.config import load_train_config
    from megapmp.train import Trainer

    steps = max(1, math.ceil(args.epochs * size / args.pairs_per_step))
    repo = Path(__file__).resolve().parents[1]
    overrides = [("data.train", shard), ("data.kind", "pairs"), ("loss.lm_coef", "0"), ("loss.rm_coef", "1"),
                 ("data.seq_len", "1024"), ("data.items_per_step", str(args.pairs_per_step)), ("data.micro_batches", "1"),
                 ("data.seed", str(seed)), ("seed", str(seed)), ("steps", str(steps)), ("optimizer.lr", str(args.lr)),
                 ("checkpoint.interval", "0"), ("checkpoint.keep_last", "1"), ("checkpoint.resume", "none"),
                 ("checkpoint.init_from", str(base / "runs" / init)),
                 ("checkpoint.init_reward_head", "true" if init == "pmp" else "false"),
                 ("logging.progress", "false"), ("logging.eval_interval", "0")]
    cfg = load_train_config(str(repo / "examples" / "configs" / "tiny.toml"), overrides)
    started = time.perf_counter()
    # A point rerun after a crash starts over; an earlier attempt's directory is moved aside, not spliced into.
    history = Trainer(cfg, run_dir, overwrite=True).fit()
    return {"steps": steps, "train_seconds": round(time.perf_counter() - started, 1), "final_loss": history[-1]["loss"]}


def evaluate(run_dir: Path, valid_pairs, bon_sets) -> dict:
    from megapmp.eval import metrics
    from megapmp.eval.reward_model import RewardScorer

    scorer = RewardScorer.load(run_dir, progress=False)
    r_c, r_r = scorer.score_pairs([p.prompt for p in valid_pairs], [p.chosen for p in valid_pairs],
                                  [p.rejected for p in valid_pairs])
    prompts = [s.prompt for s in bon_sets for _ in s.responses]
    responses = [r for s in bon_sets for r in s.responses]
    flat = scorer.score(prompts, responses)
    scores, start = [], 0
    for s in bon_sets:
        scores.append(flat[start : start + len(s.responses)])
        start += len(s.responses)
    bon = metrics.best_of_n_exact(scores, [s.correct for s in bon_sets], 4)
    return {"rm_accuracy": metrics.rm_accuracy(r_c, r_r), "best_of_4": bon.value, "best_of_4_stderr": bon.stderr}


def summarise(results: list[dict], out: Path) -> dict:
    summary = {}
    for init in ("lm", "pmp"):
        for size in sorted({r["size"] for r in results}):
            runs = [r for r in results if r["init"] == init and r["size"] == size]
            if runs:
                summary.setdefault(init, {})[size] = {
                    metric: {"mean": float(np.mean([r[metric] for r in runs])),
                             "std": float(np.std([r[metric] for r in runs])), "seeds": len(runs)}
                    for metric in ("rm_accuracy", "best_of_4")}
    lines = ["| pairs | RM acc (LM init) | RM acc (PMP init) | Best-of-4 (LM init) | Best-of-4 (PMP init) |",
             "|---|---|---|---|---|"]
    cell = lambda init, size, m: (f"{summary[init][size][m]['mean']:.4f} ± {summary[init][size][m]['std']:.4f}"
                                  if size in summary.get(init, {}) else "-")
    for size in sorted({r["size"] for r in results}):
        lines.append(f"| {size} | {cell('lm', size, 'rm_accuracy')} | {cell('pmp', size, 'rm_accuracy')} | "
                     f"{cell('lm', size, 'best_of_4')} | {cell('pmp', size, 'best_of_4')} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "sample_efficiency.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("rm_accuracy", "best_of_4"), ("held-out RM accuracy", "GSM8K Best-of-4")):
        for init, label in (("lm", "without PMP (LM init)"), ("pmp", "with PMP")):
            rows = sorted(summary.get(init, {}).items())
            if not rows:
                continue
            sizes = [s for s, _ in rows]
            mean = np.array([v[metric]["mean"] for _, v in rows])
            std = np.array([v[metric]["std"] for _, v in rows])
            ax.plot(sizes, mean, marker="o", label=label)
            ax.fill_between(sizes, mean - std, mean + std, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("RM finetuning pairs")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megapmp.eval.formats import load_gsm8k_solutions, load_pairs

    base, out = Path(args.base).resolve(), Path(args.output).resolve()
    for needed in (base / "runs" / "lm", base / "runs" / "pmp", base / "data" / "gsm8k_train.jsonl"):
        if not needed.exists():
            print(f"error: {needed} is missing: run examples/quickstart.sh {base} first (with GSM8K data)", file=sys.stderr)
            return 1
    solutions = Path(args.data) / "gsm8k" / "example_model_solutions.jsonl"
    if not solutions.exists():
        print(f"error: {solutions} is missing (set --data or MEGAPMP_DATA)", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sqrt2_sizes(args.min_size, args.max_size)
    seeds = [int(s) for s in args.seeds.split(",")]
    valid_pairs = load_pairs(str(base / "data" / "gsm8k_valid.jsonl"), args.valid_limit)
    bon_sets = load_gsm8k_solutions(str(solutions), args.bon_limit)
    results_path = out / "results.jsonl"
    results = [json.loads(l) for l in results_path.read_text().splitlines()] if results_path.exists() else []
    done = {(r["size"], r["init"], r["seed"]) for r in results}
    total = len(sizes) * len(seeds) * 2
    for size in sizes:
        shard = finetune_shard(base, out, size)
        for seed in seeds:
            for init in ("lm", "pmp"):
                if (size, init, seed) in done:
                    continue
                run_dir = out / "runs" / f"{init}_{size}_seed{seed}"
                print(f"[experiment] {len(results) + 1}/{total}: size {size}, seed {seed}, init {init}", file=sys.stderr)
                record = {"size": size, "seed": seed, "init": init, **finetune(base, run_dir, shard, init, size, seed, args)}
                record.update(evaluate(run_dir, valid_pairs, bon_sets))
                results.append(record)
                with open(results_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"[experiment] {record}", file=sys.stderr)
    summarise(results, out)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
