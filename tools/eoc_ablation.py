#!/usr/bin/env python
"""CodePMP's Table 7 in miniature: the end-of-context (EOC) token, with vs without (section 5.2).

"w/ EOC" appends EOS to every response and reads the reward there (--eos-policy response); "w/o EOC" reads it
at the response's own last token (--eos-policy none, the paper's choice and megapmp's default). For each
setting and seed, the quickstart's PMP and RM stages run again, identically but for the EOS policy of their
shards: PMP on the quickstart's stdlib pairs from its LM-pretrained checkpoint (400 steps, lr 2e-3, 16 pairs
per step, rows of 1024), then RM finetuning on its GSM8K-derived pairs (200 steps, lr 1e-3). Each RM is
scored with its own recipe on the quickstart's 300 held-out GSM8K-derived pairs (RM accuracy, ties wrong)
and on the first 300 questions of the real GSM8K model solutions (Best-of-4, exact expectation).

    bash examples/quickstart.sh runs/quickstart          # the LM checkpoint, tokenizer and data
    python tools/eoc_ablation.py --base runs/quickstart --output runs/eoc_ablation

Results are appended to OUTPUT/results.jsonl as each (setting, seed) finishes (a rerun skips finished ones),
then summarised (mean ± std over seeds) in OUTPUT/table.md and OUTPUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"w/o EOC": "none", "w/ EOC": "response"}
# The quickstart's PMP and RM stages (examples/quickstart.sh), as overrides of examples/configs/tiny.toml.
PMP = [("data.seq_len", "1024"), ("data.items_per_step", "16"), ("steps", "400"), ("optimizer.lr", "2e-3"),
       ("checkpoint.init_reward_head", "false")]
RM = [("loss.lm_coef", "0"), ("data.seq_len", "1024"), ("data.items_per_step", "16"), ("steps", "200"),
      ("optimizer.lr", "1e-3"), ("checkpoint.init_reward_head", "true")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eoc_ablation.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a finished quickstart output directory (runs/lm, data/)")
    p.add_argument("--output", required=True, help="directory for shards, runs, results and the table")
    p.add_argument("--data", default=os.environ.get("MEGAPMP_DATA", str(REPO.parent / "shared" / "data")),
                   help="real evaluation data (GSM8K example_model_solutions.jsonl); default $MEGAPMP_DATA or "
                        "../shared/data")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data order and reward-head init)")
    p.add_argument("--bon-limit", type=int, default=300, help="GSM8K questions for Best-of-4 (of 1,319)")
    p.add_argument("--valid-limit", type=int, default=300, help="held-out GSM8K-derived pairs for RM accuracy")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def shards(base: Path, work: Path, policy: str) -> dict:
    """The quickstart's PMP and RM training shards, rebuilt with `policy` and the quickstart's tokenizer."""
    from megapmp.data.preprocess import build_shard

    out = {}
    for name, source, template in (("pmp", "pmp_train.jsonl", "codepmp"), ("rm", "gsm8k_train.jsonl", "none")):
        prefix = work / "data" / f"{name}_{policy}"
        if not Path(f"{prefix}.json").exists():  # the sidecar is written last: its presence means complete
            build_shard([str(base / "data" / source)], str(prefix), tokenizer=str(base / "data" / "pmp_train.tokenizer"),
                        template=template, eos_policy=policy, max_length=512, overlong="truncate", workers=2,
                        overwrite=True, progress=False)
        out[name] = str(prefix)
    return out


def train(run_dir: Path, shard: str, init: str, seed: int, stage: list) -> dict:
    from megapmp.config import load_train_config
    from megapmp.train import Trainer

    overrides = [("data.train", shard), ("seed", str(seed)), ("data.seed", str(seed)), ("checkpoint.interval", "0"),
                 ("checkpoint.keep_last", "1"), ("checkpoint.resume", "none"), ("checkpoint.init_from", init),
                 ("logging.progress", "false"), ("logging.eval_interval", "0"), *stage]
    started = time.perf_counter()
    history = Trainer(load_train_config(str(REPO / "examples" / "configs" / "tiny.toml"), overrides), run_dir).fit()
    return {"seconds": round(time.perf_counter() - started, 1), "final_loss": history[-1]["loss"]}


def evaluate(run_dir: Path, valid_pairs, bon_sets) -> dict:
    from megapmp.eval import metrics
    from megapmp.eval.reward_model import RewardScorer
    from megapmp.eval.tasks import score_sets

    scorer = RewardScorer.load(run_dir, progress=False)  # the recipe (EOS policy included) of its own shard
    r_c, r_r = scorer.score_pairs([p.prompt for p in valid_pairs], [p.chosen for p in valid_pairs],
                                  [p.rejected for p in valid_pairs])
    bon = metrics.best_of_n_exact(score_sets(scorer, bon_sets), [s.correct for s in bon_sets], 4)
    return {"rm_accuracy": metrics.rm_accuracy(r_c, r_r), "best_of_4": bon.value,
            "eos_policy": scorer.describe()["eos_policy"]}


def summarise(results: list[dict], out: Path) -> dict:
    summary = {}
    for setting in SETTINGS:
        runs = [r for r in results if r["setting"] == setting]
        if runs:
            summary[setting] = {m: {"mean": float(np.mean([r[m] for r in runs])), "std": float(np.std([r[m] for r in runs])),
                                    "seeds": len(runs)} for m in ("rm_accuracy", "best_of_4")}
    cell = lambda s, m: f"{summary[s][m]['mean']:.4f} ± {summary[s][m]['std']:.4f}"  # noqa: E731
    lines = ["| setting | EOS policy | seeds | RM accuracy (300 held-out GSM8K-derived pairs) | GSM8K Best-of-4 (300 questions) |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | {SETTINGS[s]} | {summary[s]['rm_accuracy']['seeds']} | {cell(s, 'rm_accuracy')} | "
              f"{cell(s, 'best_of_4')} |" for s in summary]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def finished_runs(results_path: Path, limits: dict) -> list[dict]:
    """The records of results.jsonl, the runs a rerun keeps: a record torn by a kill is cut (its run is
    redone); records measured on other evaluation data (``limits``) are a ValueError, not averaged in."""
    from megapmp.io import cut_torn_jsonl, iter_jsonl

    cut_torn_jsonl(results_path, lambda message: print(f"[eoc] {message}", file=sys.stderr, flush=True))
    results = [record for _, record in iter_jsonl(results_path)] if results_path.exists() else []
    other = [r for r in results if {k: r.get(k) for k in limits} != limits]
    if other:
        raise ValueError(f"{results_path} holds {len(other)} runs measured with "
                         f"{ {k: other[0].get(k) for k in limits} }, not {limits}: use another --output, or the "
                         "same limits")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megapmp.eval.formats import load_gsm8k_solutions, load_pairs

    base, out = Path(args.base).resolve(), Path(args.output).resolve()
    needed = [base / "runs" / "lm", base / "data" / "pmp_train.jsonl", base / "data" / "gsm8k_train.jsonl",
              base / "data" / "gsm8k_valid.jsonl", base / "data" / "pmp_train.tokenizer"]
    missing = [str(p) for p in needed if not p.exists()]
    solutions = Path(args.data) / "gsm8k" / "example_model_solutions.jsonl"
    if missing or not solutions.exists():
        print(f"error: missing {', '.join(missing + ([str(solutions)] if not solutions.exists() else []))}: run "
              f"examples/quickstart.sh {base} first, with the GSM8K data", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    valid_pairs = load_pairs(str(base / "data" / "gsm8k_valid.jsonl"), args.valid_limit)
    bon_sets = load_gsm8k_solutions(str(solutions), args.bon_limit)
    results_path = out / "results.jsonl"
    limits = {"valid_limit": args.valid_limit, "bon_limit": args.bon_limit}
    try:
        results = finished_runs(results_path, limits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = {(r["setting"], r["seed"]) for r in results}
    for setting, policy in SETTINGS.items():
        data = shards(base, out, policy)
        for seed in seeds:
            if (setting, seed) in done:
                continue
            tag = f"{policy}_seed{seed}"
            print(f"[eoc] {setting} (eos_policy {policy}), seed {seed}", file=sys.stderr, flush=True)
            pmp = train(out / "runs" / f"pmp_{tag}", data["pmp"], str(base / "runs" / "lm"), seed, PMP)
            rm = train(out / "runs" / f"rm_{tag}", data["rm"], str(out / "runs" / f"pmp_{tag}"), seed, RM)
            record = {"setting": setting, "seed": seed, **limits, "pmp": pmp, "rm": rm,
                      **evaluate(out / "runs" / f"rm_{tag}", valid_pairs, bon_sets)}
            assert record["eos_policy"] == policy
            results.append(record)
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[eoc] {json.dumps(record)}", file=sys.stderr, flush=True)
    summarise(results, out)
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
