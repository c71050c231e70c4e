#!/usr/bin/env python
"""How many distinct micro-batch shapes a run meets, and the padding each way of shaping them costs.

    python tools/bench_shapes.py                            # bench_mfu's mix: prompt 100-300, responses 200-700
    python tools/bench_shapes.py --prompt-len 200,700       # a prompt-heavy mix (prompt as long as a response)
    python tools/bench_shapes.py --shard PREFIX             # real pairs, e.g. the stdlib shard that
                                                            # `tools/bench_packing.py --keep DIR` leaves in DIR/shard

A model compiled with static shapes (megapmp.model.compile) compiles once per distinct micro-batch shape;
this replays the trainer's own loader (megapmp.data.loader.StepLoader: same sampler, same packing) for
--steps steps on each layout under three policies and counts, without a model:

  exact       flat rows of their real tokens (the default when nothing compiles): a new shape almost every
              micro-batch, no padding
  bucket:N    rows padded to a multiple of N tokens (--bucket, default 256; issue 13's compile buckets)
  budget      every micro-batch exactly T tokens (data.micro_batch_tokens = 0 when compiling: T fitted to the
              shards by megapmp.data.loader.fit_micro_batch_tokens; or --budget T), pairs split by their
              lengths into micro-batches of even totals

Per policy: distinct shapes; how many were first met after step 2 (each one a compile in the middle of a run);
new shapes per step over the first 10 steps; padding = row tokens / real tokens - 1 (real tokens: the
layout's, 2P+C+R duplicated, P+C+R shared-prefix); micro-batches per step (mean, max). Prints ONE JSON line.
Generated pairs: --pairs-per-step x --steps pairs (each step fresh, as bench_mfu draws them), lengths uniform
in the ranges, --seed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))  # run from a checkout without installing
sys.path.insert(0, str(TOOLS))

from _bench_common import length_range, log, random_pairs, write_pair_shard  # noqa: E402
from megapmp.data.loader import StepLoader  # noqa: E402
from megapmp.data.packing import PAIR_LAYOUTS as LAYOUTS  # noqa: E402


def replay(shard: str, layout: str, policy: str, args) -> dict:
    """Run the trainer's loader for args.steps steps under ``policy``; shape and padding counts."""
    budget = None
    multiple = 1
    if policy == "budget":
        budget = args.budget or "auto"
    elif policy.startswith("bucket"):
        multiple = args.bucket
    loader = StepLoader([shard], items_per_step=args.pairs_per_step, micro_batches=args.micro_batches,
                        seq_len=args.seq_len, layout=layout, packing="flat", pad_multiple=multiple, seed=args.seed,
                        micro_batch_tokens=budget)
    seen, new_per_step, counts = set(), [], []
    real = rows = 0
    for _ in range(args.steps):
        step = loader.next_step()
        shapes = [m.shape for m in step.micro_batches]
        new_per_step.append(len(set(shapes) - seen))
        seen.update(shapes)
        counts.append(len(shapes))
        real += sum(m.num_real_tokens for m in step.micro_batches)
        rows += sum(m.input_ids.size for m in step.micro_batches)
    out = {"distinct_shapes": len(seen), "new_shapes_after_step_2": sum(new_per_step[2:]),
           "new_shapes_per_step_first_10": new_per_step[:10], "padding": rows / real - 1,
           "micro_batches_per_step_mean": float(np.mean(counts)), "micro_batches_per_step_max": int(max(counts))}
    if loader.token_budget is not None:
        b = loader.token_budget
        out.update(micro_batch_tokens=b.tokens, fitted=b.fitted, fit_expected_padding=b.expected_padding,
                   fit_extra_micro_batch_rate=b.extra_micro_batch_rate)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--shard", default=None, help="a pair shard prefix to draw from (default: generated pairs)")
    p.add_argument("--prompt-len", type=length_range, default=(100, 300), metavar="LO,HI",
                   help="generated prompts' tokens (default 100,300, bench_mfu's)")
    p.add_argument("--response-len", type=length_range, default=(200, 700), metavar="LO,HI",
                   help="generated responses' tokens incl. EOS (default 200,700, bench_mfu's)")
    p.add_argument("--vocab", type=int, default=151936, help="generated token ids are below this (default Qwen2's)")
    p.add_argument("--pairs-per-step", type=int, default=64, help="data.items_per_step (default 64, bench_mfu's)")
    p.add_argument("--micro-batches", type=int, default=4, help="data.micro_batches (default 4, bench_mfu's)")
    p.add_argument("--seq-len", type=int, default=2048, help="data.seq_len, the longest packed pair (default 2048)")
    p.add_argument("--steps", type=int, default=200, help="steps replayed per layout and policy (default 200)")
    p.add_argument("--bucket", type=int, default=256, help="the bucket policy's multiple (default 256)")
    p.add_argument("--budget", type=int, default=0, help="a fixed token budget instead of the fitted one (default 0: fit)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated (default {','.join(LAYOUTS)})")
    p.add_argument("--seed", type=int, default=0, help="pairs and sampler seed (default 0)")
    args = p.parse_args(argv)
    args.layouts = [x for x in args.layouts.split(",") if x]
    if not args.layouts or set(args.layouts) - set(LAYOUTS):
        p.error(f"--layouts: expected names from {', '.join(LAYOUTS)}")
    if min(args.pairs_per_step, args.micro_batches, args.steps, args.bucket) < 1 or args.pairs_per_step % args.micro_batches:
        p.error("--pairs-per-step must be a positive multiple of --micro-batches; --steps and --bucket >= 1")
    longest = max(2 * (args.prompt_len[1] + args.response_len[1]), args.prompt_len[1] + 2 * args.response_len[1])
    if args.shard is None and longest > args.seq_len:
        p.error(f"--seq-len {args.seq_len} cannot hold the longest generated pair ({longest} tokens)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_shapes.") as work:
        shard = args.shard
        if shard is None:
            rng = np.random.default_rng(args.seed)
            pairs = random_pairs(rng, args.pairs_per_step * args.steps, args.prompt_len, args.response_len, args.vocab)
            shard = write_pair_shard(Path(work) / "pairs", pairs, args.vocab)
        policies = ["exact", f"bucket:{args.bucket}", "budget"]
        result = {"tool": "bench_shapes", "shard": args.shard or "generated",
                  "settings": {k: v for k, v in vars(args).items() if k not in ("shard",)}, "layouts": {}}
        for layout in args.layouts:
            result["layouts"][layout] = {}
            for policy in policies:
                log(f"{layout}, {policy} ...")
                result["layouts"][layout][policy] = replay(shard, layout, policy, args)
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
