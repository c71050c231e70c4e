#!/usr/bin/env python
"""Best-of-N scoring time with and without group rows: RewardScorer.score over N candidates per question,
in the group layout ([P R1 ... RK], the prompt once per row: tools/evaluate.py's default) against the
per-candidate rows ([P R] each, layout duplicated) and two candidates per prompt copy (shared-prefix), side
by side in one process on the same model and the same texts.

GSM8K-shaped candidates (--prompt-len, --response-len, in tokens): a GSM8K test question is 119 / 222 / 431
characters at its 5th / 50th / 95th percentile and a model solution of example_model_solutions.jsonl 113 /
252 / 546 (measured on ../shared/data/gsm8k), i.e. ~30-140 tokens at ~4 characters per token; MetaMath's
evaluation prompt adds ~45 tokens to the question, so prompts of 75-150 tokens and responses of 30-140 are
the defaults. Texts are random lowercase letters scored with the byte tokenizer (one token per character),
so a length in characters is a length in tokens; the model is bench_train's bench-cpu size (hidden 256, 4
layers, 4 heads / 2 kv heads) with a random init -- timing does not depend on the weights.

For each N in --n-values, --questions questions of N candidates are scored --repeats times by every layout,
the order of the layouts rotating each repeat (a shared machine slows whatever runs at that moment; the
rotation spreads that over the sides). Per N one JSON line: each layout's median seconds (wall and process
CPU time), candidates/s, speedup over the per-candidate rows (ratio of medians; min / max of the paired
per-repeat ratios as the spread), tokens encoded per candidate, and the largest |reward difference| from
the per-candidate rewards. Then a summary line. On a CPU compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench_common

from _bench_common import length_range  # noqa: E402

from megapmp.config import ModelConfig  # noqa: E402
from megapmp.convert.source import ScoringRecipe  # noqa: E402
from megapmp.data.tokenizers import ByteTokenizer  # noqa: E402
from megapmp.eval.reward_model import SCORING_LAYOUTS, RewardScorer  # noqa: E402
from megapmp.io import get_logger  # noqa: E402
from megapmp.model import Qwen2RewardModel  # noqa: E402

log = get_logger("bench_scoring")
BASELINE = "duplicated"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-values", default="16,64,256", help="candidates per question (default 16,64,256)")
    p.add_argument("--questions", type=int, default=2, help="questions per N (default 2)")
    p.add_argument("--prompt-len", type=length_range, default=(75, 150), metavar="LO,HI",
                   help="prompt tokens, uniform in [LO, HI] (default 75,150)")
    p.add_argument("--response-len", type=length_range, default=(30, 140), metavar="LO,HI",
                   help="response tokens before EOS, uniform in [LO, HI] (default 30,140)")
    p.add_argument("--repeats", type=int, default=3, help="timed scorings per layout and N (default 3)")
    p.add_argument("--layouts", default=",".join(SCORING_LAYOUTS),
                   help=f"comma-separated, {BASELINE} among them (default {','.join(SCORING_LAYOUTS)})")
    p.add_argument("--batch-tokens", type=int, default=16384, help="RewardScorer batch_tokens (default 16384)")
    p.add_argument("--hidden", type=int, default=256, help="model hidden size (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.n_values = [int(x) for x in args.n_values.split(",") if x]
    except ValueError:
        p.error(f"--n-values {args.n_values!r}: expected comma-separated integers")
    args.layouts = [x for x in args.layouts.split(",") if x]
    if set(args.layouts) - set(SCORING_LAYOUTS) or BASELINE not in args.layouts:
        p.error(f"--layouts: names from {', '.join(SCORING_LAYOUTS)}, {BASELINE} among them")
    if min(args.n_values, default=0) < 1 or args.questions < 1 or args.repeats < 1:
        p.error("--n-values, --questions and --repeats must be >= 1")
    return args


def build_scorers(args) -> dict[str, RewardScorer]:
    tok = ByteTokenizer()
    config = ModelConfig(vocab_size=384, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = Qwen2RewardModel(config, with_lm_head=False)
    model.init_weights()
    state = model.state_dict()
    scorers = {}
    for layout in args.layouts:  # one model per scorer (each sets its own attention backend), same weights
        copy = Qwen2RewardModel(config, with_lm_head=False)
        copy.load_state_dict(state)
        recipe = ScoringRecipe(tok, {"name": "none", "text": "{prompt}"}, "response", tok.eos_id, tok.pad_id,
                               origin="bench_scoring")
        scorers[layout] = RewardScorer(copy, recipe, device=args.device, precision="fp32", layout=layout,
                                       batch_tokens=args.batch_tokens, progress=False)
    return scorers


def candidate_texts(args, n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng([args.seed, n])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))

    def text(lo_hi) -> str:
        return "".join(rng.choice(letters, int(rng.integers(lo_hi[0], lo_hi[1] + 1))))

    prompts, responses = [], []
    for _ in range(args.questions):
        prompt = text(args.prompt_len)
        prompts += [prompt] * n
        responses += [text(args.response_len) for _ in range(n)]
    return prompts, responses


def time_n(args, scorers, n: int) -> dict:
    prompts, responses = candidate_texts(args, n)
    layouts = list(scorers)
    wall = {k: [] for k in layouts}
    cpu = {k: [] for k in layouts}
    rewards = {}
    for layout in layouts:  # warm-up: first-use costs (plans, allocator) out of the timings
        rewards[layout] = scorers[layout].score(prompts[:n], responses[:n])
    for r in range(args.repeats):
        for layout in layouts[r % len(layouts):] + layouts[: r % len(layouts)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            rewards[layout] = scorers[layout].score(prompts, responses)
            wall[layout].append(time.perf_counter() - started)
            cpu[layout].append(time.process_time() - cpu_started)
            log(f"N={n} {layout}: {wall[layout][-1]:.2f}s ({cpu[layout][-1]:.2f}s CPU)")
    candidates = len(responses)
    response_tokens = sum(len(x) + 1 for x in responses)  # + EOS
    out = {"n": n, "questions": args.questions, "candidates": candidates}
    base, base_cpu = statistics.median(wall[BASELINE]), statistics.median(cpu[BASELINE])
    for layout in layouts:
        paired = [b / t for b, t in zip(wall[BASELINE], wall[layout])]
        out[layout] = {"seconds_median": statistics.median(wall[layout]),
                       "cpu_seconds_median": statistics.median(cpu[layout]),
                       "candidates_per_s": candidates / statistics.median(wall[layout]),
                       "speedup_vs_per_candidate": base / statistics.median(wall[layout]),
                       "speedup_vs_per_candidate_cpu_time": base_cpu / statistics.median(cpu[layout]),
                       "speedup_paired_min": min(paired), "speedup_paired_max": max(paired),
                       "max_abs_reward_diff_vs_per_candidate": float(np.abs(rewards[layout] - rewards[BASELINE]).max())}
    # tokens encoded per candidate: its response, plus a prompt per candidate (duplicated), per two
    # (shared-prefix) or per group row (group: one per question when its candidates fit one forward, the FLOP
    # ceiling's count)
    one_prompt_each = response_tokens + sum(len(p) for p in prompts[::n])
    out["tokens_per_candidate"] = {BASELINE: (response_tokens + sum(len(p) for p in prompts)) / candidates,
                                   "group_one_prompt_per_question": one_prompt_each / candidates}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scorers = build_scorers(args)
    log(f"layouts {args.layouts}, N {args.n_values}, {args.questions} questions each, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}, attention {scorers[BASELINE].model.attention_backend}")
    rows = []
    for n in args.n_values:
        rows.append(time_n(args, scorers, n))
        print(json.dumps(rows[-1]), flush=True)
    summary = {"tool": "bench_scoring", "device": args.device, "threads": torch.get_num_threads(),
               "attention_backend": scorers[BASELINE].model.attention_backend, "batch_tokens": args.batch_tokens,
               "prompt_len": list(args.prompt_len), "response_len": list(args.response_len),
               "hidden": args.hidden, "layers": args.layers, "repeats": args.repeats,
               "speedup_vs_per_candidate": {layout: {str(r["n"]): r[layout]["speedup_vs_per_candidate"] for r in rows}
                                            for layout in args.layouts if layout != BASELINE},
               "max_abs_reward_diff": max(r[layout]["max_abs_reward_diff_vs_per_candidate"] for r in rows
                                          for layout in args.layouts),
               "wall_s": time.perf_counter() - started}
    if "group" in args.layouts and 64 in args.n_values:
        row = next(r for r in rows if r["n"] == 64)
        summary["targets"] = {"group at N=64 >= 1.5x per-candidate": row["group"]["speedup_vs_per_candidate"] >= 1.5,
                              "group at N=64 >= 1.5x per-candidate (CPU time)":
                                  row["group"]["speedup_vs_per_candidate_cpu_time"] >= 1.5}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
