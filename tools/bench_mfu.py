#!/usr/bin/env python
"""MFU of megapmp's real training step, against the seed approach, on generated CodePMP-shaped pairs.

    python tools/bench_mfu.py                   # GPU: qwen2-1.5b then qwen2-0.5b, 64 pairs/step, 8 micro-batches
    python tools/bench_mfu.py --device cpu      # the tiny preset, a few small steps, fp32: the CI check

Prints one JSON line on stdout per side as it finishes ({"line": "side", "preset", "side", ...figures}), then
one summary line ({"line": "summary", "presets": ...}, every side again with the comparisons); progress on
stderr. A bench killed part-way (SIGTERM, e.g. by `timeout`) still prints the side it was running, with the
figures of the timed steps that side finished, and the summary of what ran ("terminated": true, exit 143).
Per preset (random init), four sides on the same pairs, one after the other, each in a process of its own
(spawned fresh for CUDA; forked on CPU, where the parent has imported everything but run nothing), so that
no side inherits another's compiled graphs, allocator state or kernel caches, and each side's peak memory
is its own. A side that fails (out of memory, --side-timeout) is reported with "error" (and the figures of
the timed steps it finished, "partial": true) and the others still run. A side whose memory estimate
(side_memory_estimate) exceeds the device's memory (--device-memory-gib, default the GPU's) is not run:
{"skipped": why}; so are the seed sides where transformers is not installed:

  megapmp_duplicated     megapmp.train.Trainer built from a TrainConfig (megapmp.config.load_train_config
  megapmp_shared_prefix  with --config and overrides: model.preset, data.train = a shard written here,
                         data.layout, data.items_per_step, data.micro_batches, data.seq_len,
                         data.bucket_tokens, data.micro_batch_tokens, steps, precision, compile,
                         attention_backend). The steps are
                         driven here, as fit() drives them: trainer.batches.next_step() (the batch the
                         loader thread read and packed during the previous step) and trainer.train_step(batch), with torch.cuda.synchronize() around
                         the timer, so compile time and step times are measured, not taken from logs.
  seed_ckpt              CodePMP's step (tools/_bench_common.BaselineSide): HF
  seed_no_ckpt           Qwen2ForSequenceClassification on right-padded [P C], [P R] rows, a separate lm_head
                         over every position of the chosen rows, full fp32 logits, the same autocast
                         precision, attn_implementation sdpa; HF gradient checkpointing on (as CodePMP's
                         launch script runs it) and off. The step's pairs are split into the same
                         micro-batches, gradients accumulated; the same initial weights (the trainer's own
                         init, megapmp.train.build_model), optimizer backend and hyper-parameters.

Data: --pairs-per-step x (--warmup + --steps + 1) random pairs (prompt and response lengths uniform in
--prompt-len / --response-len, responses ending with EOS, ids below the preset's vocabulary), written as a
real pair shard (.bin/.idx/.json) in a temporary directory: every step is a FRESH batch of the varying
shapes real training sees, and the trainer's loader draws the same pairs for every side (one epoch, its
own shuffle; the seed sides replay the draws with the same StepLoader and check they match).

Each side: --warmup untimed steps, --steps timed steps, then one profiled step (unless --no-profile).
Reported per side (rates are medians of the per-step rates of the timed steps that compiled nothing; *_mean
= totals over total time of the same steps; steps_compiled / step_compile_s / compile_s_timed report the
compiling ones apart):
  tokens_per_s        real tokens / step seconds, where a pair's real tokens are len([P C]) + len([P R])
                      for every side and layout (shared-prefix encodes P once but is credited the same, so
                      its ratio to duplicated is a pairs/s ratio); pairs_per_s likewise
  tflops, mfu         model FLOPs / step seconds (/ megapmp.flops.peak_flops): the trainer's own per-step
                      "flops" (Megatron's formula on the real segment lengths, megapmp.flops); the seed
                      sides are credited the model FLOPs of the same pairs in the duplicated layout (so
                      their MFU ratio to megapmp is the tokens/s ratio). null on CPU: absolute FLOP rates
                      only mean something on a GPU; compare ratios there
  model_flops_per_step   that count (on every device)
  peak_bytes          the peak over building, warm-up and timed steps, above what was in use before the
                      side was built: CUDA torch.cuda.max_memory_allocated() - memory_allocated() (peak stats
                      reset); CPU VmHWM - VmRSS (the high-water mark reset through /proc/self/clear_refs, glibc
                      told to return freed memory at once). Weights, gradients and optimizer states included;
                      on CPU also the libraries' one-time allocations of a first step (tens of MB, which is
                      most of it for the tiny preset)
  step_peak_bytes     the peak of the timed steps above what was in use after the warm-up: the step's own
                      transient (activations, logits, gradients), comparable across sides on any device
  compile_s_warmup, compile_s_timed   megapmp.model.compile.compile_seconds() differences around the
                      warm-up and around the timed steps (0 where nothing compiles)
  shapes              padded micro-batch shapes: distinct count, how many timed steps met a shape the side
                      had not seen before, the median step time of those against the others and the
                      difference (a first visit to a padded shape is part of the seed approach's real cost:
                      allocator growth, kernel selection; for megapmp a new compile bucket)
  profile             the top 10 CUDA kernels of the profiled step by GPU time and their share of it (on CPU
                      the top 10 ops by self CPU time), with the step's wall time
  first_step          the first (warm-up) step's loss, rm_loss, lm_loss: same weights, pairs and
                      normalisation on every side, so they agree (fp32: ~1e-5; bf16 loosely)
  draws_sha256        fingerprint of the (dataset, item) draws of every step: equal on every side
Per preset also: the attention backend (megapmp.model.attention.resolve_attention_backend), the loss backend
(megapmp.loss.loss_backend), whether the config compiles (megapmp.model.compile.compile_enabled), and ratios:
megapmp tokens/s over the seed approach's (with and without checkpointing), shared-prefix pairs/s over
duplicated, and the seed approach's peak_bytes and step_peak_bytes over megapmp's (> 1: megapmp needs less);
shared-prefix's FLOP ceiling (duplicated's model FLOPs over its own on the same pairs) and the share of it
reached; the |difference| of each side's first-step rm_loss and lm_loss from megapmp_duplicated's; and issue
18's targets where this run measured what they need (>= 40% MFU duplicated, shared-prefix >= 0.95 of its
ceiling, >= 2.5x the checkpointed seed's tokens/s with less peak memory).

Step times include building the batch (megapmp: the loader's read + pack; the seed approach: its collator)
and the optimizer step. On a CPU, compare ratios, not absolute rates. To fit a time budget, trim --steps,
--warmup, --presets or --sides, or bound each side with --side-timeout.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))  # run from a checkout without installing
sys.path.insert(0, str(TOOLS))  # _bench_common

from _bench_common import (BaselineSide, length_range, log, proc_status_bytes, random_pairs,  # noqa: E402
                           reset_peak_rss, return_freed_memory_to_os, write_pair_shard)
from megapmp.config import MODEL_PRESETS, load_train_config, model_preset, parse_overrides  # noqa: E402
from megapmp.data.loader import StepLoader  # noqa: E402
from megapmp.data.shards import ShardMeta  # noqa: E402
from megapmp.device import autocast_dtype, local_device  # noqa: E402
from megapmp.flops import mfu, peak_flops, step_flops  # noqa: E402
from megapmp.loss import loss_backend  # noqa: E402
from megapmp.model.attention import resolve_attention_backend  # noqa: E402
from megapmp.model.compile import compile_seconds  # noqa: E402
from megapmp.train import Trainer, build_model, resolve_config  # noqa: E402

SIDES = ("megapmp_duplicated", "megapmp_shared_prefix", "seed_ckpt", "seed_no_ckpt")
LAYOUT_OF = {"megapmp_duplicated": "duplicated", "megapmp_shared_prefix": "shared-prefix"}

# Defaults by --device: the GPU run is issue 13's measured setup (64 pairs per step, <= 1024 tokens per
# sequence: 300 + 700 fits, and 2048 holds [P C][P R] as well as [P C R]) in 8 micro-batches instead of 4, so
# that Qwen2-1.5B's megapmp and checkpointed seed sides fit an H100's 80 GB (memory estimates:
# side_memory_estimate); the CPU run is the same shape scaled down ~10x on the tiny preset, in seconds.
DEFAULTS = {
    "gpu": dict(presets="qwen2-1.5b,qwen2-0.5b", pairs_per_step=64, micro_batches=8, prompt_len=(100, 300),
                response_len=(200, 700), seq_len=2048, warmup=2, steps=10, precision="auto", threads=0),
    "cpu": dict(presets="tiny", pairs_per_step=8, micro_batches=2, prompt_len=(10, 30), response_len=(20, 70),
                seq_len=256, warmup=1, steps=3, precision="fp32", threads=1),
}


# --------------------------------------------------------------------------------------------------
# Per-step outcome, and a side's whole run


@dataclass
class StepOutcome:
    seconds: float
    loss: float
    rm_loss: float
    lm_loss: float
    pairs: int
    real_tokens: int  # len([P C]) + len([P R]) per pair, every side alike
    row_tokens: int  # tokens in the micro-batch tensors, padding included
    flops: float  # model FLOPs (megapmp.flops)
    shapes: list  # padded shape of each micro-batch
    draws: np.ndarray | None = None  # the step's (dataset, item) draws
    compile_s: float = 0.0  # torch.compile seconds inside the step (megapmp.model.compile.compile_seconds)


@dataclass
class SideRun:
    warmup: list[StepOutcome] = field(default_factory=list)
    timed: list[StepOutcome] = field(default_factory=list)
    new_shape: list[bool] = field(default_factory=list)  # per timed step
    distinct_shapes: int = 0
    peak_bytes: int = 0  # build, warm-up and timed steps, over what was in use before the side was built
    step_peak_bytes: int = 0  # the timed steps, over what was in use after the warm-up
    compile_s_warmup: float = 0.0
    compile_s_timed: float = 0.0
    profile: dict | None = None
    info: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainerSide:
    """megapmp's real trainer, stepped by hand."""

    def __init__(self, cfg, run_dir: Path):
        self.trainer = Trainer(cfg, run_dir)
        self.datasets = self.trainer.loader.datasets
        cfg = self.trainer.cfg
        device = self.trainer.device
        self.info = {"attention_backend": resolve_attention_backend(cfg.attention_backend, device,
                                                                    self.trainer.amp_dtype or torch.float32),
                     "loss_backend": loss_backend(device, 1, cfg.loss.backend),
                     "compile": self.trainer.compiled,
                     "optimizer_backend": self.trainer.engine.optimizer_backend}

    def prepare(self):
        return None  # the loader thread packs ahead, as in fit(); waiting for it is part of the step

    def run(self, _):
        batch = self.trainer.batches.next_step()  # packed ahead on the loader thread, as in fit()
        record = self.trainer.train_step(batch)
        self.trainer.step += 1  # as fit() counts (the LR schedule reads it)
        return batch, record

    def outcome(self, seconds: float, raw) -> StepOutcome:
        batch, record = raw
        draws = batch.step_items
        lengths = sum(int(2 * self.datasets[d].prompt_lengths[i] + self.datasets[d].chosen_lengths[i]
                          + self.datasets[d].rejected_lengths[i]) for d, i in draws.tolist())
        return StepOutcome(seconds, record["loss"], record["rm_loss"], record["lm_loss"], record["pairs"], lengths,
                           sum(m.on_host.input_ids.size for m in batch.micro_batches), record["flops"],
                           [tuple(m.input_ids.shape) for m in batch.micro_batches], draws)


class SeedSide:
    """The seed approach on the pairs the trainer's loader draws (a loader of its own, same seed)."""

    def __init__(self, cfg, device, init_state: dict, gradient_checkpointing: bool, precision: str):
        self.cfg = cfg
        self.loader = StepLoader(cfg.data.train, kind="pairs", weights=cfg.data.weights,
                                 items_per_step=cfg.data.items_per_step, micro_batches=cfg.data.micro_batches,
                                 seq_len=cfg.data.seq_len, layout="duplicated", packing="flat", seed=cfg.data.seed)
        hyper = SimpleNamespace(precision=precision, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
                                grad_clip=cfg.optimizer.grad_clip, rm_coef=cfg.loss.rm_coef, lm_coef=cfg.loss.lm_coef)
        self.side = BaselineSide(hyper, cfg.model, device, init_state, micro_batches=cfg.data.micro_batches,
                                 gradient_checkpointing=gradient_checkpointing,
                                 optimizer_backend=cfg.optimizer.backend)
        self.info = {"attn_implementation": self.side.attn_implementation,
                     "gradient_checkpointing": gradient_checkpointing}

    def prepare(self):
        """The step's pairs and their model FLOPs (packed duplicated, as megapmp counts them): untimed."""
        batch = self.loader.next_step()
        pairs = [self.loader.datasets[d][i] for d, i in batch.step_items.tolist()]
        flops = step_flops(self.cfg.model, batch.micro_batches, lm_head=bool(self.cfg.loss.lm_coef),
                           reward_head=bool(self.cfg.loss.rm_coef))
        return pairs, flops, batch.step_items

    def run(self, prepared):
        return prepared, self.side.step(prepared[0])

    def outcome(self, seconds: float, raw) -> StepOutcome:
        (pairs, flops, draws), out = raw
        return StepOutcome(seconds, out["loss"], out["rm_loss"], out["lm_loss"], len(pairs), out["real_tokens"],
                           out["row_tokens"], flops, out["shapes"], draws)


def timed_step(side, device) -> StepOutcome:
    prepared = side.prepare()
    synchronize(device)
    compiled_before = compile_seconds()
    started = time.perf_counter()
    raw = side.run(prepared)
    synchronize(device)
    outcome = side.outcome(time.perf_counter() - started, raw)
    outcome.compile_s = compile_seconds() - compiled_before
    return outcome


def memory_reset(device: torch.device, *, release_cache: bool) -> tuple[int, str]:
    """(bytes in use now, method) after resetting the peak: the baseline a side's peak is measured from.
    ``release_cache``: also hand the CUDA caching allocator's free blocks back (never between timed steps:
    the next step would pay for allocating them again)."""
    gc.collect()
    if device.type == "cuda":
        if release_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), "cuda.max_memory_allocated"
    reset = reset_peak_rss()
    return proc_status_bytes("VmRSS"), "VmHWM-VmRSS" if reset else "VmHWM-VmRSS (peak not resettable: lifetime)"


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


def profile_step(side, device) -> dict:
    """One more step under torch.profiler: the top 10 CUDA kernels by GPU time (CPU: ops by self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prepared = side.prepare()
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        side.run(prepared)
        synchronize(device)
    wall = time.perf_counter() - started
    if cuda:
        kind = DeviceType.CUDA
        time_of = lambda e: e.self_device_time_total  # noqa: E731
    else:
        kind = DeviceType.CPU
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events = [e for e in prof.key_averages() if e.device_type == kind and time_of(e) > 0]
    total_us = sum(time_of(e) for e in events)
    top = sorted(events, key=time_of, reverse=True)[:10]
    return {"what": "CUDA kernels by GPU time" if cuda else "CPU ops by self CPU time",
            "step_wall_s": wall, "total_s": total_us / 1e6,
            "top": [{"name": e.key[:160], "calls": e.count, "s": time_of(e) / 1e6,
                     "share": time_of(e) / total_us} for e in top]}


def run_side(side_factory, device, warmup: int, steps: int, profile: bool, report=None) -> SideRun:
    """Build a side (after a memory reset), warm it up, time it, read its peak memory, profile one step.
    ``report(run)``, if given, is called after every timed step (what a killed side still hands back)."""
    run = SideRun()
    base, method = memory_reset(device, release_cache=True)
    side = side_factory()
    run.info = dict(side.info, memory_method=method)
    seen = set()
    compiled_before = compile_seconds()
    for i in range(warmup):
        run.warmup.append(timed_step(side, device))
        seen.update(run.warmup[-1].shapes)
        log(f"  warm-up {i}: {run.warmup[-1].seconds:.3f} s (compile {run.warmup[-1].compile_s:.1f} s), "
            f"loss {run.warmup[-1].loss:.6f}")
    compiled_warm = compile_seconds()
    warm_peak = memory_peak(device)
    warm_base, _ = memory_reset(device, release_cache=False)
    run.compile_s_warmup = compiled_warm - compiled_before
    for i in range(steps):
        out = timed_step(side, device)
        run.new_shape.append(any(s not in seen for s in out.shapes))
        seen.update(out.shapes)
        run.timed.append(out)
        log(f"  step {i}: {out.seconds:.3f} s, {out.real_tokens / out.seconds:,.0f} tokens/s, shapes "
            f"{out.shapes}{' (new)' if run.new_shape[-1] else ''}"
            f"{f' (compile {out.compile_s:.1f} s: left out of the medians)' if out.compile_s else ''}")
        run.compile_s_timed = compile_seconds() - compiled_warm
        run.distinct_shapes = len(seen)
        timed_peak = memory_peak(device)
        run.peak_bytes = max(warm_peak, timed_peak) - base
        run.step_peak_bytes = timed_peak - warm_base
        if report is not None:
            report(run)
    if profile:
        run.profile = profile_step(side, device)
    return run


# --------------------------------------------------------------------------------------------------
# Summaries


def median(values):
    return float(statistics.median(values)) if values else None


def draws_digest(outcomes) -> str:
    """Fingerprint of the pairs a side trained on, step by step: equal digests = the same pairs."""
    digest = hashlib.sha256()
    for o in outcomes:
        digest.update(np.ascontiguousarray(o.draws, dtype=np.int64).tobytes())
    return digest.hexdigest()


def side_summary(run: SideRun, peak: float | None) -> dict:
    """A side's figures. Rates and step times are medians over the timed steps that compiled nothing
    (a step that met a new shape and compiled is reported apart: steps_compiled, compile_s_timed);
    *_mean are totals over total time of the same steps."""
    clean = [o for o in run.timed if o.compile_s == 0] or run.timed  # all compiled: say so below
    t = [o.seconds for o in clean]
    new = [o.seconds for o, n in zip(run.timed, run.new_shape) if n]
    seen = [o.seconds for o, n in zip(run.timed, run.new_shape) if not n]
    first = run.warmup[0]
    return {
        **run.info,
        "step_s_median": median(t), "step_s_mean": statistics.fmean(t),
        "step_s": [round(o.seconds, 4) for o in run.timed],
        "step_compile_s": [round(o.compile_s, 3) for o in run.timed],
        "steps_timed": len(run.timed), "steps_compiled": sum(o.compile_s > 0 for o in run.timed),
        "rates_include_compile": all(o.compile_s > 0 for o in run.timed),
        "tokens_per_s": median([o.real_tokens / o.seconds for o in clean]),
        "tokens_per_s_mean": sum(o.real_tokens for o in clean) / sum(t),
        "pairs_per_s": median([o.pairs / o.seconds for o in clean]),
        "pairs_per_s_mean": sum(o.pairs for o in clean) / sum(t),
        "tflops": median([o.flops / o.seconds / 1e12 for o in clean]) if peak else None,
        "mfu": median([mfu(o.flops, o.seconds, peak) for o in clean]) if peak else None,
        "model_flops_per_step": statistics.fmean(o.flops for o in run.timed),
        "real_tokens_per_step": statistics.fmean(o.real_tokens for o in run.timed),
        "row_tokens_per_step": statistics.fmean(o.row_tokens for o in run.timed),
        "pairs_per_step": statistics.fmean(o.pairs for o in run.timed),
        "peak_bytes": run.peak_bytes, "step_peak_bytes": run.step_peak_bytes,
        "compile_s_warmup": run.compile_s_warmup, "compile_s_timed": run.compile_s_timed,
        "shapes": {"distinct": run.distinct_shapes, "timed_steps_new": len(new), "timed_steps_seen": len(seen),
                   "step_s_median_new": median(new), "step_s_median_seen": median(seen),
                   "new_minus_seen_s": median(new) - median(seen) if new and seen else None},
        "first_step": {"loss": first.loss, "rm_loss": first.rm_loss, "lm_loss": first.lm_loss},
        "draws_sha256": draws_digest(run.warmup + run.timed),
        "profile": run.profile,
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def preset_ratios(sides: dict) -> dict:
    def get(name, key):
        return sides.get(name, {}).get(key)

    out = {}
    for mega in ("megapmp_duplicated", "megapmp_shared_prefix"):
        for seed in ("seed_ckpt", "seed_no_ckpt"):
            out[f"{mega}_over_{seed}_tokens_per_s"] = ratio(get(mega, "tokens_per_s"), get(seed, "tokens_per_s"))
            for key in ("peak_bytes", "step_peak_bytes"):
                out[f"{seed}_over_{mega}_{key}"] = ratio(get(seed, key), get(mega, key))
    out["shared_prefix_over_duplicated_pairs_per_s"] = ratio(get("megapmp_shared_prefix", "pairs_per_s"),
                                                             get("megapmp_duplicated", "pairs_per_s"))
    # The most shared-prefix can gain on these pairs: duplicated's model FLOPs over its own (same pairs; the
    # prompt encoded once). (2p+c+r)/(p+c+r) for the decoder, less where the LM head, paid alike, weighs in.
    out["shared_prefix_flop_ceiling"] = ratio(get("megapmp_duplicated", "model_flops_per_step"),
                                              get("megapmp_shared_prefix", "model_flops_per_step"))
    out["shared_prefix_share_of_ceiling"] = ratio(out["shared_prefix_over_duplicated_pairs_per_s"],
                                                  out["shared_prefix_flop_ceiling"])
    return out


def loss_agreement(sides: dict) -> dict:
    """|first-step loss term of each side - megapmp_duplicated's| (same weights, pairs, normalisation)."""
    ref = sides.get("megapmp_duplicated", {}).get("first_step")
    if ref is None:
        return {}
    return {name: {k: abs(s["first_step"][k] - ref[k]) for k in ("rm_loss", "lm_loss")}
            for name, s in sides.items() if name != "megapmp_duplicated" and "first_step" in s}


def targets(sides: dict, ratios: dict) -> dict:
    """Issue 18's targets, where this run measured what they need (null where it did not): >= 40% MFU
    (duplicated), shared-prefix pairs/s >= 0.95 of its FLOP ceiling over duplicated, >= 2.5x the seed
    approach's real tokens/s with less peak memory."""
    mfu_ = sides.get("megapmp_duplicated", {}).get("mfu")
    over = ratios["megapmp_duplicated_over_seed_ckpt_tokens_per_s"]
    mem = ratios["seed_ckpt_over_megapmp_duplicated_peak_bytes"]
    share = ratios["shared_prefix_share_of_ceiling"]
    return {"mfu>=0.40": mfu_ >= 0.40 if mfu_ is not None else None,
            "shared_prefix_pairs_per_s>=0.95_of_flop_ceiling": share >= 0.95 if share is not None else None,
            "tokens_per_s>=2.5x_seed_ckpt": over >= 2.5 if over is not None else None,
            "less_memory_than_seed_ckpt": mem > 1 if mem is not None else None}


# --------------------------------------------------------------------------------------------------
# One side, in a process of its own


def preset_overrides(args, preset: str, shard: str, layout: str) -> list[tuple[str, str]]:
    fixed = [("model.preset", preset), ("data.train", shard), ("data.weights", "none"), ("data.valid", ""),
             ("data.kind", "pairs"), ("data.layout", layout), ("data.items_per_step", str(args.pairs_per_step)),
             ("data.micro_batches", str(args.micro_batches)), ("data.seq_len", str(args.seq_len)),
             ("data.bucket_tokens", str(args.bucket_tokens)),
             ("data.micro_batch_tokens", str(args.micro_batch_tokens)), ("steps", str(args.warmup + args.steps + 1)),
             ("precision", args.precision), ("compile", args.compile),
             ("attention_backend", args.attention_backend), ("logging.progress", "false"),
             ("logging.eval_interval", "0"), ("logging.tensorboard", "false"), ("logging.wandb_project", "none"),
             ("checkpoint.interval", "0"), ("checkpoint.resume", "none"), ("checkpoint.init_from", "none")]
    return fixed + args.set


def trainer_config(args, preset: str, shard: str, layout: str):
    """The TrainConfig of one megapmp side: --config, then the bench's settings, then --set."""
    cfg = load_train_config(args.config, preset_overrides(args, preset, shard, layout))
    vocab = model_preset(preset).vocab_size
    if cfg.model.vocab_size != vocab:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is not preset {preset}'s {vocab} (the pairs' "
                         f"ids are drawn below it)")
    return cfg


def run_one_side(args, name: str, preset: str, shard: str, report=None) -> dict:
    """Run side ``name`` of ``preset`` on the pair shard ``shard``; its summary. ``report(summary)``, if
    given, receives the summary so far after every timed step."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = local_device()  # the trainer's device (for --device cpu the parent hid the GPUs)
    cfg = trainer_config(args, preset, shard, LAYOUT_OF.get(name, "duplicated"))
    peak = peak_flops(device, override_tflops=args.peak_tflops or None)

    def summarise(run: SideRun) -> dict:
        summary = side_summary(run, peak)
        summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        summary["peak_tflops"] = peak / 1e12 if peak else None
        return summary

    with tempfile.TemporaryDirectory(prefix="bench_mfu_run.") as run_dir:
        if name in LAYOUT_OF:
            factory = lambda: TrainerSide(cfg, Path(run_dir))  # noqa: E731
        else:
            resolved = resolve_config(cfg, ShardMeta.load(shard))
            resolved.validate()
            # The trainer's own initialisation (its seed, on its device): the first step's losses must agree.
            init_state = {k: v.detach().to("cpu", copy=True) for k, v in build_model(resolved, device).state_dict().items()}
            precision = "bf16" if autocast_dtype(args.precision, device) else "fp32"
            factory = lambda: SeedSide(resolved, device, init_state, name == "seed_ckpt", precision)  # noqa: E731
        run = run_side(factory, device, args.warmup, args.steps, args.profile,
                       report=(lambda r: report(summarise(r))) if report is not None else None)
    return summarise(run)


def side_process(connection, args, name: str, preset: str, shard: str) -> None:
    """A side's own process. Messages to the parent: ("partial", summary so far) after every timed step,
    then ("done", summary) or ("done", {"error": ...}) -- e.g. out of memory: reported for this side, the
    others still run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked side must not inherit the parent's report-and-stop
    try:
        if args.mode == "cpu":
            return_freed_memory_to_os()  # so that the RSS follows the side's live tensors
        summary = run_one_side(args, name, preset, shard, report=lambda partial: connection.send(("partial", partial)))
        connection.send(("done", summary))
    except Exception as error:
        traceback.print_exc()
        connection.send(("done", {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"}))
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------------
# The parent: data, one process per side, comparisons


class Terminated(BaseException):
    """SIGTERM reached the parent (gpu_check.sh's `timeout`): report what was measured, then stop.
    ``side_result``: what the side in flight had measured (set by run_isolated)."""

    side_result: dict | None = None


def _raise_terminated(signum, frame):
    raise Terminated()


def cut_short(partial: dict | None, why: str) -> dict:
    """A side that did not finish: the figures of its timed steps so far (if any) and why it stopped."""
    if partial is None:
        return {"error": why}
    return {**partial, "error": why, "partial": True}


def run_isolated(args, name: str, preset: str, shard: str) -> dict:
    """``run_one_side`` in a process of its own, so no side inherits another's caches, compiled graphs or
    allocator state, and each side's peak memory is its own. Forked on CPU (the parent has imported
    everything and run no torch op, so the sides skip the imports); spawned fresh for CUDA (a forked child
    cannot use CUDA). A side cut short by --side-timeout, its process dying or SIGTERM keeps the figures
    of the timed steps it finished."""
    context = multiprocessing.get_context("fork" if args.mode == "cpu" else "spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=side_process, args=(send, args, name, preset, shard))
    process.start()
    send.close()  # the child holds the only writer: recv() sees EOF if it dies
    deadline = time.monotonic() + args.side_timeout if args.side_timeout else None
    partial = None
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not receive.poll(wait):
                return cut_short(partial, f"did not finish within --side-timeout {args.side_timeout:g} s")
            kind, payload = receive.recv()
            if kind == "partial":
                partial = payload
            elif "error" in payload:
                return cut_short(partial, payload["error"])
            else:
                return payload
    except EOFError:
        process.join()
        return cut_short(partial, f"its process died with exit code {process.exitcode}")
    except Terminated as stop:
        stop.side_result = cut_short(partial, "the bench was terminated (SIGTERM) while this side ran")
        raise
    finally:
        if process.is_alive():
            process.terminate()
        process.join()


def write_bench_shard(args, preset: str, work: Path) -> str:
    """The run's pairs as a shard in ``work``: one fresh batch for every step of a side (warm-up, timed,
    profiled), a pure function of --seed and the length settings."""
    vocab = model_preset(preset).vocab_size
    n_steps = args.warmup + args.steps + 1
    rng = np.random.default_rng(args.seed)
    pairs = random_pairs(rng, args.pairs_per_step * n_steps, args.prompt_len, args.response_len, vocab)
    shard = write_pair_shard(work / f"{preset}-pairs", pairs, vocab)
    log(f"{preset}: {len(pairs)} pairs written to {shard}")
    return shard


# --------------------------------------------------------------------------------------------------
# Memory: which sides fit the device


def device_memory_bytes(args) -> int | None:
    """--device-memory-gib, else the GPU's total memory as nvidia-smi reports it (no CUDA context in the
    parent: the sides' processes get the whole card), else None (no side is skipped)."""
    if args.device_memory_gib:
        return int(args.device_memory_gib * 2**30)
    if args.mode != "gpu":
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
        return int(float(done.stdout.split()[0]) * 2**20) if done.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def side_memory_estimate(args, name: str, preset: str, shard: str) -> int:
    """Bytes a side needs on the device, estimated before it runs (megapmp.parallel.memory's per-token
    activation count; an estimate, not a bound: the CUDA context and fragmentation are not in it).

    Both: fp32 weights, gradients, AdamW moments (16 B per parameter) and autocast's bf16 weight copies
    (2 B). megapmp: activations of one micro-batch of the token budget's tokens (its fixed shape), the
    chunked loss's logits chunk and fp32 LM-head gradient. Seed: 2 rows per pair, each padded to the
    longest prompt + response of the shard; every layer's activations (or, checkpointed, each layer's
    input plus one layer's), the hidden states output_hidden_states keeps (fp32), and the full logits of
    the chosen rows at 16 B per element (the model-dtype logits' fp32 copy, its shifted copy, the saved
    log-softmax and their gradients)."""
    from megapmp.config import ParallelConfig
    from megapmp.parallel.memory import estimate_memory

    config = model_preset(preset)
    layout = LAYOUT_OF.get(name, "duplicated")
    precision = "bf16" if autocast_dtype(args.precision, torch.device("cuda" if args.mode == "gpu" else "cpu")) else "fp32"
    pairs = args.pairs_per_step // args.micro_batches
    if name in LAYOUT_OF:
        loader = StepLoader([shard], items_per_step=args.pairs_per_step, micro_batches=args.micro_batches,
                            seq_len=args.seq_len, layout=layout, packing="flat", seed=0, micro_batch_tokens="auto")
        tokens = loader.micro_batch_tokens
        checkpointing = False
    else:
        from megapmp.data.datasets import PairDataset

        ds = PairDataset(shard)
        row = int((ds.prompt_lengths + np.maximum(ds.chosen_lengths, ds.rejected_lengths)).max())
        tokens = 2 * pairs * row
        checkpointing = name == "seed_ckpt"
    data = SimpleNamespace(items_per_step=1, micro_batches=1, seq_len=tokens)  # one micro-batch of `tokens`
    est = estimate_memory(config, ParallelConfig(), data, precision, activation_checkpointing=checkpointing)
    parameters = est["parameters_per_rank"]
    total = est["bytes"]["total"] + (2 * parameters if precision == "bf16" else 0)
    if name not in LAYOUT_OF:
        hidden_states = (config.num_hidden_layers + 1) * tokens * config.hidden_size * 4
        logits = 16 * pairs * row * config.vocab_size
        total += hidden_states + logits - est["bytes"]["loss"]
    return int(total)


# --------------------------------------------------------------------------------------------------
# One preset


def mix_name(args) -> str:
    """The pair-length mix of this run, on every line (a check runs several mixes into one file)."""
    return (f"prompt {args.prompt_len[0]}-{args.prompt_len[1]}, responses "
            f"{args.response_len[0]}-{args.response_len[1]}")


def emit(line: dict) -> None:
    """One JSON line on stdout, flushed at once: what a killed bench leaves is every line printed before."""
    print(json.dumps(line), flush=True)


def bench_preset(args, preset: str, work: Path, sides: dict) -> dict:
    """Every side of ``preset`` into ``sides`` (filled as each finishes, one JSON line each), then the
    preset's comparisons."""
    shard = write_bench_shard(args, preset, work)
    limit = device_memory_bytes(args)
    have_transformers = importlib.util.find_spec("transformers") is not None
    for name in args.sides:
        estimate = side_memory_estimate(args, name, preset, str(shard)) if limit else None
        if name not in LAYOUT_OF and not have_transformers:
            sides[name] = {"skipped": "transformers is not installed (the seed approach is HF's Qwen2)"}
        elif estimate and estimate > limit:
            sides[name] = {"skipped": f"memory estimate {estimate / 2**30:.3g} GiB exceeds the device's "
                                      f"{limit / 2**30:.3g} GiB", "memory_estimate_bytes": estimate}
        else:
            log(f"{preset}: {name}")
            try:
                sides[name] = run_isolated(args, name, preset, str(shard))
            except Terminated as stop:
                sides[name] = stop.side_result
                emit({"tool": "bench_mfu", "line": "side", "mix": mix_name(args), "preset": preset, "side": name,
                      **sides[name]})
                raise
            if estimate:
                sides[name]["memory_estimate_bytes"] = estimate
        emit({"tool": "bench_mfu", "line": "side", "mix": mix_name(args), "preset": preset, "side": name,
                      **sides[name]})
    return preset_result(preset, sides)


def preset_result(preset: str, sides: dict) -> dict:
    # (a side cut short drew fewer steps: its fingerprint covers another sequence)
    digests = {s["draws_sha256"] for s in sides.values() if "draws_sha256" in s and not s.get("partial")}
    if len(digests) > 1:
        raise RuntimeError(f"{preset}: the sides drew different pairs ({digests}): not comparable")
    ratios = preset_ratios(sides)
    config = model_preset(preset)
    measured = {n: s for n, s in sides.items() if "step_s_median" in s}
    megapmp = next((s for n, s in measured.items() if n in LAYOUT_OF), {})
    return {"model": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                      "vocab_size": config.vocab_size},
            "attention_backend": megapmp.get("attention_backend"), "loss_backend": megapmp.get("loss_backend"),
            "compile": megapmp.get("compile"), "sides": sides, "ratios": ratios,
            "first_step_loss_abs_diff": loss_agreement(measured), "targets": targets(measured, ratios)}


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    gpu, cpu = DEFAULTS["gpu"], DEFAULTS["cpu"]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: the GPU when there is one. cpu hides every GPU (the trainer takes one when it "
                             "sees it) and switches every default below to its CPU value")
    parser.add_argument("--presets", default=None,
                        help=f"comma-separated model presets, random init (known: {', '.join(sorted(MODEL_PRESETS))}; "
                             f"default: GPU {gpu['presets']}, CPU {cpu['presets']})")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help=f"comma-separated sides to run, in this order (default: all, {','.join(SIDES)})")
    parser.add_argument("--config", default=None,
                        help="a TOML train config to start from (default: none, TrainConfig's defaults); the "
                             "bench's own settings and --set override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="one more trainer config override, applied last (repeatable), e.g. "
                             "--set attention_backend=segmented --set loss.backend=torch")
    parser.add_argument("--pairs-per-step", type=int, default=None,
                        help=f"pairs per optimizer step, data.items_per_step (default: GPU {gpu['pairs_per_step']}, "
                             f"CPU {cpu['pairs_per_step']})")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="micro-batches per step, data.micro_batches; the seed approach accumulates over the "
                             f"same split (default: GPU {gpu['micro_batches']}, CPU {cpu['micro_batches']})")
    parser.add_argument("--prompt-len", type=length_range, default=None, metavar="LO,HI",
                        help="prompt tokens, uniform in [LO, HI] (default: GPU 100,300, CPU 10,30)")
    parser.add_argument("--response-len", type=length_range, default=None, metavar="LO,HI",
                        help="tokens of each response incl. its EOS, uniform in [LO, HI] (default: GPU 200,700, "
                             "CPU 20,70)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="data.seq_len, the longest packed pair: [P C][P R] duplicated, [P C R] shared-prefix "
                             f"(default: GPU {gpu['seq_len']}, CPU {cpu['seq_len']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps per side first, >= 1 (default: GPU {gpu['warmup']}, CPU {cpu['warmup']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per side (default: GPU {gpu['steps']}, CPU {cpu['steps']})")
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                        help="every side alike; auto = bf16 autocast on CUDA, fp32 on CPU (default: GPU auto, "
                             "CPU fp32)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="the trainer's compile field: regional torch.compile of each decoder layer; auto = on "
                             "for CUDA, off on CPU (default auto)")
    parser.add_argument("--bucket-tokens", type=int, default=0,
                        help="data.bucket_tokens: pad each flat micro-batch to a multiple of this; turns the "
                             "automatic token budget off (default 0: the trainer's automatic choice)")
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="data.micro_batch_tokens: every micro-batch exactly this many tokens (default 0: the "
                             "trainer's automatic choice, a budget fitted to the pairs when it compiles; -1: none)")
    parser.add_argument("--device-memory-gib", type=float, default=0.0,
                        help="skip (and name) every side whose memory estimate exceeds this many GiB (default 0: "
                             "the GPU's total memory from nvidia-smi; on CPU no side is skipped)")
    parser.add_argument("--attention-backend", default="auto",
                        help="the trainer's attention_backend (default auto: the trainer's own resolution)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="peak dense TFLOP/s of the device for MFU (default 0: megapmp.flops' table by GPU name)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profiled step at the end of each side")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; 0 = torch's default (default: GPU 0, CPU 1: on a small shared "
                             "CPU, idle OpenMP threads make tiny ops much slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated pairs (default 0)")
    parser.add_argument("--side-timeout", type=float, default=0,
                        help="seconds one side's process may take; past it the side is reported as an error and "
                             "the bench goes on (default 0: no limit)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    args.mode = "cpu" if cpu else "gpu"
    for key, value in DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.presets = [p for p in args.presets.split(",") if p]
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = [p for p in args.presets if p not in MODEL_PRESETS]
    if unknown or not args.presets:
        parser.error(f"--presets: unknown {unknown or 'none given'}; known: {', '.join(sorted(MODEL_PRESETS))}")
    bad = [s for s in args.sides if s not in SIDES]
    if bad or not args.sides or len(set(args.sides)) != len(args.sides):
        parser.error(f"--sides: expected distinct names from {', '.join(SIDES)}, got {args.sides}")
    if args.pairs_per_step < 1 or args.micro_batches < 1 or args.pairs_per_step % args.micro_batches:
        parser.error(f"--pairs-per-step {args.pairs_per_step} must be a positive multiple of --micro-batches "
                     f"{args.micro_batches}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step's losses are compared)")
    longest = max(2 * (args.prompt_len[1] + args.response_len[1]), args.prompt_len[1] + 2 * args.response_len[1])
    if longest > args.seq_len:
        parser.error(f"--seq-len {args.seq_len} cannot hold the longest pair ({longest} tokens in one layout)")
    malformed = [item for item in args.set if "=" not in item]
    if malformed:
        parser.error(f"--set expects SECTION.KEY=VALUE, got {malformed[0]!r}")
    try:
        args.set = parse_overrides([f"--{item}" for item in args.set])
    except ValueError as e:
        parser.error(f"--set: {e}")
    if args.side_timeout < 0:
        parser.error(f"--side-timeout {args.side_timeout} must be >= 0")
    for preset in args.presets:  # a config the trainer would refuse: one usage error now, not one per side
        for layout in ("duplicated", "shared-prefix"):
            try:
                trainer_config(args, preset, "shard-written-later", layout).validate()
            except ValueError as e:
                parser.error(f"trainer config for {preset}, {layout}: {' '.join(str(e).split())}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    if args.mode == "cpu":
        # The trainer takes a GPU whenever it sees one (megapmp.device.local_device): hide them from the sides.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if {"seed_ckpt", "seed_no_ckpt"} & set(args.sides) and importlib.util.find_spec("transformers"):
            importlib.import_module("transformers.models.qwen2.modeling_qwen2")  # once here, not in every side
    log(f"{args.mode}: presets {args.presets}, sides {args.sides}, {args.pairs_per_step} pairs/step in "
        f"{args.micro_batches} micro-batches, {args.warmup} warm-up + {args.steps} timed steps per side")
    presets, terminated = {}, False
    signal.signal(signal.SIGTERM, _raise_terminated)  # gpu_check.sh's timeout: report, then stop
    with tempfile.TemporaryDirectory(prefix="bench_mfu.") as work:
        for preset in args.presets:
            sides = {}
            try:
                presets[preset] = bench_preset(args, preset, Path(work), sides)
            except Terminated:
                presets[preset] = preset_result(preset, sides)
                terminated = True
                break
    ran = [s for p in presets.values() for s in p["sides"].values() if "step_s_median" in s]
    emit({
        "tool": "bench_mfu", "line": "summary", "mix": mix_name(args), "device": ran[0]["device"] if ran else None,
        "torch": torch.__version__,
        "peak_tflops": ran[0]["peak_tflops"] if ran else None, "threads": args.threads or torch.get_num_threads(),
        "settings": {"pairs_per_step": args.pairs_per_step, "micro_batches": args.micro_batches,
                     "prompt_len": list(args.prompt_len), "response_len": list(args.response_len),
                     "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
                     "precision": args.precision, "compile": args.compile, "bucket_tokens": args.bucket_tokens,
                     "micro_batch_tokens": args.micro_batch_tokens, "attention_backend": args.attention_backend,
                     "sides": args.sides, "overrides": [f"{k}={v}" for k, v in args.set]},
        "presets": presets, "terminated": terminated,
        "wall_s": time.perf_counter() - started,
    })
    return 143 if terminated else 0


if __name__ == "__main__":
    sys.exit(main())
