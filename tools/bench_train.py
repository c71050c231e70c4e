#!/usr/bin/env python
"""Benchmark one PMP optimizer step: megapmp (packed rows + pmp_loss) against the seed approach
(CodePMP's reward_trainer.py: HF Qwen2ForSequenceClassification on right-padded rows, full fp32 logits),
on the same pairs, the same model size and the same initial weights, in one process invocation.

Sides (both: rm_coef * -logsigmoid(r_c - r_r) averaged over pairs + lm_coef * CE averaged over chosen-response
tokens, then gradient-norm clipping and one AdamW step built by megapmp.optim.build_optimizer with the same
hyper-parameters):

  baseline   CodePMP's collator and compute_loss: the pair's chosen row [P C] and rejected row [P R] are
             interleaved (chosen, rejected, chosen, ...) into one batch right-padded to its longest row;
             HF Qwen2ForSequenceClassification (num_labels=1, attn_implementation sdpa, eager as fallback)
             with output_hidden_states=True; reward = HF's pooled score (last non-pad token, so pad id 0 !=
             the EOS every response ends with); a separate lm_head Linear on the chosen rows' last hidden
             states, logits.float(), the shifted .contiguous() copy of all logits, CrossEntropyLoss with
             labels masked to the chosen-response tokens. Weights: ours through megapmp.convert.hf.to_hf_state_dict
             (lm_head copied; tied to the HF embedding if the config ties them, so both sides train the same
             parameters).
  megapmp    pack_pairs(pairs, --seq-len, --layout) [-> flatten_rows with --packing flat] -> Qwen2RewardModel
             -> pmp_loss, as Trainer.train_step does with one micro-batch (global_pairs / global_lm_tokens =
             this step's counts).

Both timed regions include building the batch (padding / packing and conversion to tensors), forward,
loss, backward, clipping and the optimizer step (then zero_grad(set_to_none=True)).

Throughput = real tokens / step seconds, where real tokens of a pair = len([P C]) + len([P R]) =
2P + C + R for every side and layout (shared-prefix encodes P once, but is credited the same tokens, so
its ratio to duplicated is a pair-throughput ratio). Steps are interleaved (A B, B A, A B, ...: the
order alternates so neither side always runs on a warmer cache) after --warmup untimed steps; each step
uses a fresh deterministic batch of pairs, the same for every side. Reported rates are medians over
the --steps timed steps; speedup = ratio of the medians; speedup_paired_median = median of per-step
time ratios (both sides ran the same batch back to back). *_cpu_tokens_per_s / speedup_cpu_time: the same
with the process's CPU time (time.process_time, all threads) instead of wall time -- much less disturbed by
other jobs time-slicing a shared machine; use it with --threads 1 there (idle OpenMP threads spin and bill
CPU time), and the wall-clock keys on a quiet machine.

Memory (per side, in a FRESH subprocess: `bench_train.py --_child megapmp|baseline ...`, so one side's
allocations never colour the other's):
  CPU:  peak_bytes = VmHWM - VmRSS, where VmRSS is read after model + optimizer construction (and
        gc), VmHWM (peak resident set) after --mem-steps steps, i.e. everything a training step adds on
        top of the resident weights: activations, logits, gradients, the AdamW states created by the first
        step, temporaries. steady_peak_bytes: the same for the steps after the first, with the peak reset
        (/proc/self/clear_refs = 5) and the baseline RSS re-read just before each step (AdamW states then
        already exist, so this is the per-step transient alone). The children run with
        MALLOC_MMAP_THRESHOLD_=131072 and MALLOC_TRIM_THRESHOLD_=0 so that every tensor over 128 KiB is
        its own mmap and is returned to the OS when freed: RSS then tracks live tensor bytes instead of
        glibc's cached free lists.
  CUDA: the same definitions with torch.cuda.max_memory_allocated() / memory_allocated()
        (torch.cuda.reset_peak_memory_stats() for the steady value).
memory_ratio = baseline_peak_bytes / megapmp_peak_bytes (> 1: megapmp needs less).

Loss check: the first (warmup) step's losses of both sides are reported; same weights, same pairs and the
same normalisation, so in the duplicated layout rm and lm losses agree to ~1e-5 (fp32; shared-prefix is the
same math too).

--compare-layouts times megapmp duplicated against megapmp shared-prefix instead (no baseline) and reports
duplicated_tokens_per_s, shared_prefix_tokens_per_s and shared_prefix_speedup, with flops_ratio (the two
layouts' model FLOPs on the timed batches, megapmp.flops: the speedup if time followed FLOPs) and
lm_head_flops_share_* (the LM head over chosen tokens, which both layouts pay alike: the bigger it is, the
further the ceiling sits below the token ratio; ~5.5% at Qwen2-1.5B, ~12% at Qwen2-0.5B, 47% at the
default bench-cpu vocabulary of 32,000 -- `--vocab 2048` gives this CPU model Qwen2-1.5B's share).

--layout group times the group layout against the SAME labelled pairs expanded, all megapmp (no baseline):
MathShepherd-shaped groups (CodePMP appendix D.1: several correct and incorrect solutions per question) of
--responses-per-group responses (default 8; prompt --prompt-len 60,200, responses --response-len, default
100,400 in this mode), --correct-fraction of them correct (default half: 4 x 4 = 16 pairs per group),
--groups-per-step groups per step. Sides: group ([P R1 .. R8], every pair in the loss, LM weighting
--lm-weighting), duplicated and shared-prefix (each pair packed on its own). The step's pair count and
weights are the same for all three; steps alternate the side order. One JSON line per side as it is
measured, then a summary line: pairs_per_s (median; *_cpu from the process's CPU time), real_tokens_per_pair
(tokens encoded, padding excluded), flops_per_pair (megapmp.flops, the side's own LM targets included),
flop_ceiling = FLOPs(expanded duplicated) / FLOPs(side), speedup_vs_duplicated = pairs/s ratio (medians of
wall and of CPU time, and the min / max of the per-step paired ratios as the spread) and fraction_of_ceiling
= speedup / flop_ceiling. The issue's target: group >= 0.9 of its ceiling.

Prints ONE JSON line on stdout (--layout group: one per side, then the summary); progress goes to stderr. On
CPU compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from _bench_common import (EOS_ID, PAD_ID, BaselineSide, Side, amp_dtype, length_range, pick_device,  # tools/
                           proc_status_bytes, random_pairs, real_tokens, reset_peak_rss)
from megapmp.config import MODEL_PRESETS, DataConfig, ModelConfig, TrainConfig, model_preset
from megapmp.data.datasets import Pair, expand_group
from megapmp.data.groups import Group
from megapmp.data.packing import PACKINGS, flatten_rows, pack_groups, pack_pairs
from megapmp.model.attention import attention_inputs
from megapmp.flops import batch_flops
from megapmp.io import get_logger
from megapmp.loss import Heads, pmp_loss
from megapmp.model import Qwen2RewardModel

CPU_MODEL = "bench-cpu"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}


log = get_logger("bench_train")


# --------------------------------------------------------------------------------------------------
# Configuration and data


def model_config(args) -> ModelConfig:
    if args.model == CPU_MODEL:
        # CPU-sized, untied like Qwen2-7B (the paper's model); vocabulary large enough for the logits to matter.
        config = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             rope_theta=10000.0, tie_word_embeddings=False)
    else:
        config = model_preset(args.model)
    if args.vocab:
        config.vocab_size = args.vocab
    config.validate()
    return config


def step_pairs(args, step: int, vocab: int) -> list[Pair]:
    """The pairs of step `step`: a pure function of (--seed, step). CodePMP-shaped: the prompt about as
    long as each response; responses end with EOS; ids in [2, vocab) so none equals PAD or EOS."""
    rng = np.random.default_rng([args.seed, step])
    return random_pairs(rng, args.pairs_per_step, args.prompt_len, args.response_len, vocab)


def step_groups(args, step: int, vocab: int) -> list[Group]:
    """The groups of step `step` (a pure function of (--seed, step)): MathShepherd-shaped, --responses-per-group
    responses each ending with EOS, round(--correct-fraction x K) of them correct (label 1), in random order."""
    rng = np.random.default_rng([args.seed, step, 0x9])
    groups = []
    for _ in range(args.groups_per_step):
        k = args.responses_per_group
        correct = min(k - 1, max(1, round(args.correct_fraction * k)))
        lengths = lambda lo_hi, n: rng.integers(lo_hi[0], lo_hi[1] + 1, n)  # noqa: E731  (inclusive ranges)
        prompt = rng.integers(2, vocab, int(lengths(args.prompt_len, 1)[0]), dtype=np.int64)
        responses = tuple(np.append(rng.integers(2, vocab, int(n) - 1, dtype=np.int64), EOS_ID)
                          for n in lengths(args.response_len, k))
        labels = rng.permutation(np.array([1.0] * correct + [0.0] * (k - correct)))
        groups.append(Group(prompt, responses, labels))
    return groups


def reference_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """megapmp's init (HF Qwen2 init) on CPU; both sides start from these exact tensors."""
    torch.manual_seed(seed)
    model = Qwen2RewardModel(config)
    model.init_weights()
    return model.state_dict()


# --------------------------------------------------------------------------------------------------
# The two sides


class MegapmpSide(Side):
    def __init__(self, args, config, device, state_dict, layout):
        super().__init__(args, config, device)
        self.layout = layout
        self.name = f"megapmp[{layout}]"
        self.model = Qwen2RewardModel(config, activation_checkpointing=args.activation_checkpointing,
                                      attention_backend=args.attention_backend)
        self.model.load_state_dict(state_dict)
        self.model.tie_weights()
        self.model.to(device).train()
        self.optimizer = self._optimizer(self.model)

    def step(self, items) -> dict:
        """One optimizer step over ``items``: pairs, or groups (megapmp.data.groups.Group), which the pair
        layouts train as their labelled pairs expanded."""
        groups = items if items and isinstance(items[0], Group) else None
        if self.layout == "group":
            packed = pack_groups(groups, self.args.seq_len, PAD_ID, self.args.lm_weighting)
            pairs = packed.num_pairs
        else:
            pairs = [p for g in groups for p in expand_group(g)] if groups else items
            packed = pack_pairs(pairs, self.args.seq_len, self.layout, PAD_ID)
        if self.args.packing == "flat":
            packed = flatten_rows(packed, PAD_ID)
        batch = packed.to_torch(self.device)
        with self.autocast():  # the loss under autocast too, as the trainer runs it
            hidden = self.model(batch.input_ids, batch.position_ids, attention_inputs(batch))  # [R, S, H]
            out = pmp_loss(hidden, Heads.of(self.model), batch,
                           rm_coef=self.args.rm_coef, lm_coef=self.args.lm_coef, global_pairs=packed.num_pairs,
                           global_lm_tokens=packed.num_lm_tokens, lm_chunk=self.args.lm_chunk)
        self._finish(out.loss)
        # the prompt of a shared-prefix pair stands for both [P C] and [P R]; group rows are credited what they hold
        credit = sum(len(p.prompt) for p in pairs) if self.layout == "shared-prefix" else 0
        return {"loss": float(out.loss.detach()), "rm_loss": float(out.rm_loss), "lm_loss": float(out.lm_loss),
                "real_tokens": packed.num_real_tokens + credit, "encoded_tokens": packed.num_real_tokens,
                "pairs": packed.num_pairs, "lm_tokens": packed.num_lm_tokens, "row_tokens": int(np.prod(packed.shape)),
                "flops": batch_flops(self.config, packed, lm_head=bool(self.args.lm_coef),
                                     reward_head=bool(self.args.rm_coef))}


def build_side(kind: str, args, config, device, state_dict):
    if kind == "baseline":
        return BaselineSide(args, config, device, state_dict)
    return MegapmpSide(args, config, device, state_dict, kind)


# --------------------------------------------------------------------------------------------------
# Memory: one side per fresh subprocess


def run_child(args) -> None:
    """Measure one side's step memory; prints one JSON line."""
    device = pick_device(args.device)
    config = model_config(args)
    kind = "baseline" if args._child == "baseline" else args.layout
    state_dict = reference_weights(config, args.seed)
    side = build_side(kind, args, config, device, state_dict)
    del state_dict
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        current = torch.cuda.memory_allocated
        torch.cuda.reset_peak_memory_stats()
    else:
        current = lambda: proc_status_bytes("VmRSS")  # noqa: E731
    base = current()
    resettable = cuda or reset_peak_rss()
    peaks, steady = [], []  # absolute peak during each step; per-step peak over the RSS just before it
    for i in range(args.mem_steps):
        pairs = step_pairs(args, i, config.vocab_size)
        if i > 0 and resettable:
            gc.collect()
            before = current()
            torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
        side.step(pairs)
        if cuda:
            torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM"))
        if i > 0 and resettable:
            steady.append(peaks[-1] - before)
    # Without a peak reset VmHWM only grows, so the max is still the peak over all steps.
    result = {"side": side.name, "peak_bytes": max(peaks) - base, "steady_peak_bytes": max(steady) if steady else None,
              "base_bytes": base, "method": "cuda.max_memory_allocated" if cuda else "VmHWM-VmRSS"}
    print(json.dumps(result), flush=True)


def measure_memory(args, argv, kind: str) -> dict:
    child = "baseline" if kind == "baseline" else "megapmp"
    command = [sys.executable, os.path.abspath(__file__), *argv, "--_child", child]
    if child == "megapmp":
        command += ["--layout", kind]
    env = dict(os.environ, **MALLOC_ENV)
    log(f"memory: {kind} in a fresh process")
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"memory child {kind} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Timing


def profile_side(side, args, config) -> None:
    from torch.profiler import ProfilerActivity, profile

    pairs = step_pairs(args, 0, config.vocab_size)
    side.step(pairs)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        side.step(step_pairs(args, 1, config.vocab_size))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


def time_sides(args, config, device, kinds: list[str]) -> dict:
    state_dict = reference_weights(config, args.seed)
    sides = [build_side(kind, args, config, device, state_dict) for kind in kinds]
    del state_dict
    if args.profile:
        profile_side(sides[kinds.index(args.profile)], args, config)
        sys.exit(0)
    times = {k: [] for k in kinds}
    cpu_times = {k: [] for k in kinds}
    first = {}
    counts = {k: {"real_tokens": [], "row_tokens": [], "lm_tokens": [], "flops": []} for k in kinds}
    expected = []
    for i in range(args.warmup + args.steps):
        pairs = step_pairs(args, i, config.vocab_size)
        timed = i >= args.warmup
        order = list(range(len(sides))) if i % 2 == 0 else list(reversed(range(len(sides))))
        for j in order:
            side, kind = sides[j], kinds[j]
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
            out = side.step(pairs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if i == 0:
                first[kind] = out
            if timed:
                times[kind].append(elapsed)
                cpu_times[kind].append(cpu_elapsed)
                for key in counts[kind]:
                    if key in out:
                        counts[kind][key].append(out[key])
            log(f"step {i}{'' if timed else ' (warmup)'} {side.name}: {elapsed:.3f}s ({cpu_elapsed:.3f}s CPU), loss {out['loss']:.6f}, "
                f"{out['real_tokens']} real / {out['row_tokens']} row tokens")
        if timed:
            expected.append(real_tokens(pairs))
    rates = {k: [n / t for n, t in zip(expected, times[k])] for k in kinds}
    cpu_rates = {k: [n / t for n, t in zip(expected, cpu_times[k])] for k in kinds}
    return {"sides": sides, "times": times, "rates": rates, "cpu_rates": cpu_rates, "first": first, "counts": counts,
            "expected_real_tokens": expected}


GROUP_SIDES = ("group", "duplicated", "shared-prefix")


def time_group_sides(args, config, device) -> dict:
    """--layout group: the three sides on the same groups, interleaved (the order rotates every step), with
    per-step wall and CPU seconds and each side's counts."""
    state_dict = reference_weights(config, args.seed)
    sides = {kind: MegapmpSide(args, config, device, state_dict, kind) for kind in GROUP_SIDES}
    del state_dict
    wall = {k: [] for k in GROUP_SIDES}
    cpu = {k: [] for k in GROUP_SIDES}
    counts = {k: [] for k in GROUP_SIDES}
    first = {}
    for i in range(args.warmup + args.steps):
        groups = step_groups(args, i, config.vocab_size)
        timed = i >= args.warmup
        order = GROUP_SIDES[i % 3:] + GROUP_SIDES[: i % 3]
        for kind in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
            out = sides[kind].step(groups)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            first.setdefault(kind, out)
            if timed:
                wall[kind].append(elapsed)
                cpu[kind].append(cpu_elapsed)
                counts[kind].append(out)
            log(f"step {i}{'' if timed else ' (warmup)'} {kind}: {elapsed:.3f}s ({cpu_elapsed:.3f}s CPU), "
                f"{out['pairs']} pairs, loss {out['loss']:.6f}, {out['encoded_tokens']} tokens encoded")
    return {"wall": wall, "cpu": cpu, "counts": counts, "first": first}


def group_results(args, config, device, run: dict) -> tuple[list[dict], dict]:
    """Per-side records and the summary of a --layout group run (see the module docstring)."""
    wall, cpu, counts, first = run["wall"], run["cpu"], run["counts"], run["first"]
    pairs = [c["pairs"] for c in counts["duplicated"]]
    flops = {k: sum(c["flops"].total for c in counts[k]) for k in GROUP_SIDES}
    lines = []
    for kind in GROUP_SIDES:
        paired = [(pd / td) / (pk / tk) for pd, td, pk, tk in
                  zip(pairs, wall["duplicated"], [c["pairs"] for c in counts[kind]], wall[kind])]
        speedup = statistics.median(p / t for p, t in zip(pairs, wall[kind])) / \
            statistics.median(p / t for p, t in zip(pairs, wall["duplicated"]))
        speedup_cpu = statistics.median(p / t for p, t in zip(pairs, cpu[kind])) / \
            statistics.median(p / t for p, t in zip(pairs, cpu["duplicated"]))
        ceiling = flops["duplicated"] / flops[kind]
        lines.append({
            "side": kind, "pairs_per_step": mean(pairs),
            "pairs_per_s": statistics.median(p / t for p, t in zip(pairs, wall[kind])),
            "pairs_per_cpu_s": statistics.median(p / t for p, t in zip(pairs, cpu[kind])),
            "real_tokens_per_pair": sum(c["encoded_tokens"] for c in counts[kind]) / sum(pairs),
            "lm_tokens_per_pair": sum(c["lm_tokens"] for c in counts[kind]) / sum(pairs),
            "flops_per_pair": flops[kind] / sum(pairs),
            "flop_ceiling": ceiling,
            "speedup_vs_duplicated": speedup, "speedup_vs_duplicated_cpu_time": speedup_cpu,
            "speedup_vs_duplicated_paired_min": min(1 / r for r in paired) if kind != "duplicated" else 1.0,
            "speedup_vs_duplicated_paired_max": max(1 / r for r in paired) if kind != "duplicated" else 1.0,
            "fraction_of_ceiling": speedup / ceiling, "fraction_of_ceiling_cpu_time": speedup_cpu / ceiling,
            "step_s_median": statistics.median(wall[kind]),
            "lm_head_flops_share": sum(c["flops"].lm_head for c in counts[kind]) / flops[kind],
            "first_step_loss": first[kind]["loss"], "first_step_rm_loss": first[kind]["rm_loss"],
            "first_step_lm_loss": first[kind]["lm_loss"]})
    g = lines[0]
    summary = {"layout": "group vs expanded pairs", "model": args.model, "device": str(device),
               "precision": str(amp_dtype(args.precision, device) or "fp32"), "vocab_size": config.vocab_size,
               "groups_per_step": args.groups_per_step, "responses_per_group": args.responses_per_group,
               "correct_fraction": args.correct_fraction, "prompt_len": list(args.prompt_len),
               "response_len": list(args.response_len), "seq_len": args.seq_len, "packing": args.packing,
               "attention_backend": args.attention_backend, "lm_weighting": args.lm_weighting,
               "rm_coef": args.rm_coef, "lm_coef": args.lm_coef, "steps": args.steps, "warmup": args.warmup,
               "threads": torch.get_num_threads(), "pairs_per_step": mean(pairs),
               **{f"{side['side'].replace('-', '_')}_{key}": side[key] for side in lines
                  for key in ("pairs_per_s", "real_tokens_per_pair", "flop_ceiling", "speedup_vs_duplicated",
                              "speedup_vs_duplicated_cpu_time", "fraction_of_ceiling", "fraction_of_ceiling_cpu_time")},
               # the same pairs in every side: the RM term is the same number (the LM term differs under
               # --lm-weighting distinct, which trains each correct response once instead of once per pair)
               "rm_loss_abs_diff_group_vs_duplicated": abs(g["first_step_rm_loss"] - lines[1]["first_step_rm_loss"]),
               "targets": {"group >= 0.9 of its flop ceiling": g["fraction_of_ceiling"] >= 0.9,
                           "group >= 0.9 of its flop ceiling (CPU time)": g["fraction_of_ceiling_cpu_time"] >= 0.9}}
    return lines, summary


def group_main(args, started: float) -> int:
    device = pick_device(args.device)
    config = model_config(args)
    log(f"model {args.model} ({config.hidden_size}h x {config.num_hidden_layers}L, vocab {config.vocab_size}), "
        f"device {device}, {args.groups_per_step} groups x {args.responses_per_group} responses per step, "
        f"sides {list(GROUP_SIDES)}, torch threads {torch.get_num_threads()}")
    lines, summary = group_results(args, config, device, time_group_sides(args, config, device))
    for line in lines:
        print(json.dumps(line), flush=True)
    summary["wall_s"] = time.perf_counter() - started
    print(json.dumps(summary), flush=True)
    return 0


def flops_total(count) -> float:
    return sum(f.total for f in count["flops"])


def lm_share(count) -> float:
    return sum(f.lm_head for f in count["flops"]) / flops_total(count)


def mean(values):
    return float(statistics.fmean(values)) if values else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        run_child(args)
        return 0
    started = time.perf_counter()
    if args.layout == "group":
        return group_main(args, started)
    device = pick_device(args.device)
    config = model_config(args)
    kinds = ["duplicated", "shared-prefix"] if args.compare_layouts else ["baseline", args.layout]
    log(f"model {args.model} ({config.hidden_size}h x {config.num_hidden_layers}L, vocab {config.vocab_size}), "
        f"device {device}, {args.pairs_per_step} pairs/step, sides {kinds}, torch threads {torch.get_num_threads()}")
    run = time_sides(args, config, device, kinds)
    med = {k: statistics.median(run["rates"][k]) for k in kinds}
    cpu = {k: statistics.median(run["cpu_rates"][k]) for k in kinds}
    paired = statistics.median([tb / ta for ta, tb in zip(run["times"][kinds[1]], run["times"][kinds[0]])])
    memory = {} if args.no_memory else {k: measure_memory(args, argv, k) for k in kinds}
    first = run["first"]
    counts = run["counts"]
    result = {"model": args.model, "device": str(device), "precision": str(amp_dtype(args.precision, device) or "fp32"),
              "vocab_size": config.vocab_size, "pairs_per_step": args.pairs_per_step, "seq_len": args.seq_len,
              "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "attention_backend": args.attention_backend, "packing": args.packing,
              "real_tokens_per_step": mean(run["expected_real_tokens"])}

    def mem(kind, key):
        return memory[kind][key] if memory else None

    if args.compare_layouts:
        d, s = "duplicated", "shared-prefix"
        result.update({
            "layout": "duplicated vs shared-prefix",
            "duplicated_tokens_per_s": med[d], "shared_prefix_tokens_per_s": med[s],
            "shared_prefix_speedup": med[s] / med[d], "shared_prefix_speedup_paired_median": paired,
            "shared_prefix_speedup_cpu_time": cpu[s] / cpu[d],
            "duplicated_row_tokens_per_step": mean(counts[d]["row_tokens"]),
            "shared_prefix_row_tokens_per_step": mean(counts[s]["row_tokens"]),
            "duplicated_real_tokens_per_step": mean(counts[d]["real_tokens"]),
            "shared_prefix_real_tokens_per_step": mean(counts[s]["real_tokens"]),
            "duplicated_peak_bytes": mem(d, "peak_bytes"), "shared_prefix_peak_bytes": mem(s, "peak_bytes"),
            "duplicated_steady_peak_bytes": mem(d, "steady_peak_bytes"),
            "shared_prefix_steady_peak_bytes": mem(s, "steady_peak_bytes"),
            # Model FLOPs (megapmp.flops, Megatron's formula on the real segments) of the timed steps: the
            # speedup shared-prefix would reach if step time followed FLOPs, and how much of a step is the
            # LM head over chosen tokens, which both layouts pay alike (the reason the ratio stays below
            # the token ratio; ~6% at Qwen2-1.5B, ~11% at Qwen2-0.5B).
            "flops_ratio": flops_total(counts[d]) / flops_total(counts[s]),
            "lm_head_flops_share_shared_prefix": lm_share(counts[s]),
            "lm_head_flops_share_duplicated": lm_share(counts[d]),
            "loss_duplicated": first[d]["loss"], "loss_shared_prefix": first[s]["loss"],
            "rm_loss_abs_diff": abs(first[d]["rm_loss"] - first[s]["rm_loss"]),
            "lm_loss_abs_diff": abs(first[d]["lm_loss"] - first[s]["lm_loss"]),
        })
    else:
        b, m = "baseline", args.layout
        peak_b, peak_m = mem(b, "peak_bytes"), mem(m, "peak_bytes")
        steady_b, steady_m = mem(b, "steady_peak_bytes"), mem(m, "steady_peak_bytes")
        result.update({
            "layout": args.layout, "baseline_attn_implementation": run["sides"][0].attn_implementation,
            "megapmp_tokens_per_s": med[m], "baseline_tokens_per_s": med[b], "speedup": med[m] / med[b],
            "speedup_paired_median": paired,
            "megapmp_cpu_tokens_per_s": cpu[m], "baseline_cpu_tokens_per_s": cpu[b], "speedup_cpu_time": cpu[m] / cpu[b],
            "megapmp_step_s_median": statistics.median(run["times"][m]),
            "baseline_step_s_median": statistics.median(run["times"][b]),
            "megapmp_peak_bytes": peak_m, "baseline_peak_bytes": peak_b,
            "memory_ratio": peak_b / peak_m if memory else None,
            "megapmp_steady_peak_bytes": steady_m, "baseline_steady_peak_bytes": steady_b,
            "steady_memory_ratio": steady_b / steady_m if memory and steady_m else None,
            "memory_method": mem(m, "method"),
            "megapmp_real_tokens_per_step": mean(counts[m]["real_tokens"]),
            "baseline_real_tokens_per_step": mean(counts[b]["real_tokens"]),
            "baseline_padded_tokens_per_step": mean(counts[b]["row_tokens"]),
            "megapmp_row_tokens_per_step": mean(counts[m]["row_tokens"]),
            "lm_tokens_per_step": mean(counts[m]["lm_tokens"]),
            "baseline_lm_tokens_per_step": mean(counts[b]["lm_tokens"]),
            "loss_megapmp": first[m]["loss"], "loss_baseline": first[b]["loss"],
            "rm_loss_megapmp": first[m]["rm_loss"], "rm_loss_baseline": first[b]["rm_loss"],
            "lm_loss_megapmp": first[m]["lm_loss"], "lm_loss_baseline": first[b]["lm_loss"],
            "rm_loss_abs_diff": abs(first[m]["rm_loss"] - first[b]["rm_loss"]),
            "lm_loss_abs_diff": abs(first[m]["lm_loss"] - first[b]["lm_loss"]),
            "targets": {"speedup>=1.5": med[m] / med[b] >= 1.5,
                        "memory_ratio>=1/0.6": (peak_b / peak_m >= 1 / 0.6) if memory else None},
        })
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result), flush=True)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default=CPU_MODEL, choices=[CPU_MODEL, *sorted(MODEL_PRESETS)],
                        help=f"model preset; {CPU_MODEL} = hidden 256, 4 layers, 4 heads, 2 kv heads, intermediate "
                             "688, untied (default)")
    parser.add_argument("--vocab", type=int, default=0,
                        help="vocabulary size override (default: 32000 for bench-cpu, the preset's otherwise; "
                             "151936 = Qwen2's)")
    parser.add_argument("--layout", default="duplicated", choices=["duplicated", "shared-prefix", "group"],
                        help="megapmp pair layout (default duplicated); group: the group layout against the same "
                             "pairs expanded in both pair layouts (no baseline; see below)")
    default_packing = {f.name: f.default for f in dataclasses.fields(DataConfig)}["packing"]
    parser.add_argument("--packing", default=default_packing, choices=PACKINGS,
                        help="megapmp micro-batch shape: flat = one [1, T] row of real tokens, rows = [R, --seq-len] "
                             f"rows with row-end padding (default: the trainer's, DataConfig.packing = {default_packing})")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="time megapmp duplicated vs shared-prefix (no baseline)")
    parser.add_argument("--pairs-per-step", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048, help="megapmp packed row length (default 2048)")
    parser.add_argument("--prompt-len", type=length_range, default=(60, 200), metavar="LO,HI",
                        help="prompt tokens, uniform in [LO, HI] (default 60,200)")
    parser.add_argument("--response-len", type=length_range, default=None, metavar="LO,HI",
                        help="tokens of each response incl. its EOS, uniform in [LO, HI] (default 60,250; "
                             "100,400 with --layout group)")
    parser.add_argument("--groups-per-step", type=int, default=2, help="--layout group: groups per step (default 2)")
    parser.add_argument("--responses-per-group", type=int, default=8,
                        help="--layout group: responses per group (default 8)")
    parser.add_argument("--correct-fraction", type=float, default=0.5,
                        help="--layout group: fraction of each group's responses labelled correct (default 0.5)")
    parser.add_argument("--lm-weighting", default="distinct", choices=["distinct", "pairs"],
                        help="--layout group: the group side's LM targets (data.lm_weighting; default distinct)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--mem-steps", type=int, default=2,
                        help="steps run by each memory child (default 2: the first, then one steady step)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (both sides alike)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--rm-coef", type=float, default=1.0)
    parser.add_argument("--lm-coef", type=float, default=1.0)
    parser.add_argument("--lm-chunk", type=int, default=4096, help="megapmp loss.lm_chunk")
    parser.add_argument("--activation-checkpointing", action="store_true", help="megapmp side only")
    trainer_backend = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["attention_backend"]
    parser.add_argument("--attention-backend", default=trainer_backend,
                        help="megapmp attention backend, a key of megapmp.model.attention.ATTENTION_BACKENDS "
                             f"(default: the trainer's default, TrainConfig.attention_backend = {trainer_backend})")
    parser.add_argument("--profile", choices=["baseline", "duplicated", "shared-prefix"],
                        help="print a torch.profiler table of one step of that side to stderr and exit")
    parser.add_argument("--_child", choices=["megapmp", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.mem_steps < 1:
        parser.error("--steps, --warmup and --mem-steps must be >= 1 (the first step's losses are compared)")
    if args.response_len is None:
        args.response_len = (100, 400) if args.layout == "group" else (60, 250)
    if args.layout == "group" and (args.groups_per_step < 1 or args.responses_per_group < 2
                                   or not 0 < args.correct_fraction < 1 or args.compare_layouts or args.profile):
        parser.error("--layout group needs --groups-per-step >= 1, --responses-per-group >= 2, 0 < --correct-fraction "
                     "< 1, and neither --compare-layouts nor --profile")
    return args


if __name__ == "__main__":
    sys.exit(main())
