"""The trainer: LM pretraining, preference-model pretraining and RM finetuning are configs of one loop.

    python -m megapmp.train --config examples/configs/tiny.toml --run-dir runs/tiny [--dotted.key value ...]

    LM pretraining   data.kind = "documents", loss.rm_coef = 0
    PMP              data.kind = "pairs", rm_coef > 0 and lm_coef > 0 (CodePMP: both 1)
    RM finetuning    data.kind = "pairs", lm_coef = 0, checkpoint.init_from = the PMP run

Parallel (tensor x pipeline x data; data parallel fills the world):

    torchrun --nproc-per-node 4 -m megapmp.train --config ... --run-dir ... \
        --parallel.tp 2 --parallel.pp 2 [--parallel.sequence_parallel true] \
        [--parallel.distributed_optimizer true] [--parallel.schedule afab|1f1b|interleaved --parallel.vpp 2]

Every layout computes the single-process loss curve (init, data and loss normalisation do not depend on
it); only global rank 0 writes config.json, metrics.jsonl and the progress bar. Checkpoints of parallel
runs are sharded by rank and resume under any other layout (megapmp.checkpoint).

Writes RUN_DIR/config.json, RUN_DIR/metrics.jsonl (one JSON object per optimizer step) and
RUN_DIR/checkpoints/step_XXXXXXXX/. With checkpoint.resume = "auto" (the default) a restarted run
continues from its newest intact checkpoint (manifest verified, tensors loaded strictly; a damaged one is
skipped with a message naming the file) and reproduces the uninterrupted loss curve. A run directory has one
owner (a lock) and holds one run: megapmp/run_dir.py says what a start may do with what it finds there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megapmp import checkpoint as ckpt
from megapmp.accelerators import backend_report, format_report
from megapmp.config import ConfigError, TrainConfig, load_train_config, parse_overrides
from megapmp.convert.source import init_model_from
from megapmp.data.datasets import check_token_ids, open_preference_dataset, pairs_that_fit, preference_pairs
from megapmp.data.indexed import ShardError
from megapmp.data.loader import BackgroundLoader, StepBatch, StepLoader
from megapmp.data.shards import ShardMeta, verify_shards
from megapmp.device import autocast_dtype, local_device
from megapmp.flops import mfu, peak_flops, step_flops
from megapmp.io import log, write_text_atomic
from megapmp.loss import LOSS_BACKEND_ENV, loss_backend, pmp_loss, score_pairs
from megapmp.model import Qwen2RewardModel
from megapmp.model.attention import resolve_attention_backend
from megapmp.model.compile import (bucket_tokens, compile_enabled, compile_layers, compile_seconds, eager_layers,
                                   token_budget)
from megapmp.optim import lr_at
from megapmp.parallel.engine import Engine, StepSums, build_rank_chunks
from megapmp.parallel.topology import build_context, init_distributed
from megapmp.run_dir import ConfigCheck, RunDirError, open_run_dir
from megapmp.tracking import MetricsLog, Trackers


def resolve_config(cfg: TrainConfig, meta: ShardMeta) -> TrainConfig:
    """``cfg`` with what the run's shards and environment decide filled in, before validation:
    model.vocab_size = 0 means the shards' padded vocabulary (a model smaller than the tokenizer's
    vocabulary would index out of range: an error, not a warning), and $MEGAPMP_LOSS_BACKEND, when set,
    overrides loss.backend (so config.json records what ran)."""
    vocab_size = cfg.model.vocab_size or meta.padded_vocab_size
    if vocab_size < meta.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the shards' tokenizer "
                          f"vocabulary ({meta.vocab_size}); set model.vocab_size = 0 to use the shards' size")
    if meta.judge and (cfg.loss.rm_coef or not cfg.loss.lm_coef):  # megapmp/data/judge.py
        raise ConfigError("the shards hold a pairwise judge's samples, whose target is the label token: train them "
                          f"with the LM term only (loss.rm_coef = 0, loss.lm_coef > 0), got rm_coef="
                          f"{cfg.loss.rm_coef}, lm_coef={cfg.loss.lm_coef}")
    backend = os.environ.get(LOSS_BACKEND_ENV, "").strip().lower() or cfg.loss.backend
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size), loss=replace(cfg.loss, backend=backend))


def resolve_steps(cfg: TrainConfig, item_counts: list[int], log=lambda message: None,
                  unit: str | None = None) -> TrainConfig:
    """``cfg`` with the run's length in optimizer steps: ``steps`` when given, else derived from ``epochs``
    (CodePMP's Table 3 gives every run as 1 epoch) as floor(epochs x items / items_per_step), the items being
    all pairs (or document windows) of all train shards together; a remainder smaller than one step is not
    drawn, so no item is drawn more often than the epochs say. A pure function of the config and the shard sizes:
    every data-parallel rank (all read the same shards and draw the same global steps) and every resume of
    the run gets the same count. Blend weights change how often each shard is drawn, not the total. ``unit``
    names the items in messages (the loader's ``item_unit``: a group shard's items are groups)."""
    items, per_step = sum(item_counts), cfg.data.items_per_step
    if not cfg.epochs > 0:
        return cfg
    derived = math.floor(cfg.epochs * items / per_step)
    what = unit or ("pairs" if cfg.data.kind == "pairs" else "document windows")
    if cfg.steps:
        log(f"steps = {cfg.steps} given: it overrides epochs = {cfg.epochs:g} ({derived} steps over this data)")
        return cfg
    if derived < 1:
        raise ConfigError(f"epochs = {cfg.epochs:g} over {items} training {what} is less than one step of "
                          f"data.items_per_step = {per_step}")
    unused = math.floor(cfg.epochs * items) - derived * per_step
    log(f"steps = {derived}: epochs {cfg.epochs:g} x {items:,} {what} in {len(item_counts)} shard(s) / {per_step} "
        f"per step" + (f" ({unused} {what} of the last epoch are not drawn)" if unused > 0 else ""))
    return replace(cfg, steps=derived)


def check_shard_max_length(limit: int, prefixes: list[str]) -> None:
    """data.max_length: each shard must have been preprocessed with --max-length at most ``limit`` (the
    recipe's max length; a shard without one may hold anything)."""
    if not limit:
        return
    for prefix in prefixes:
        recorded = ShardMeta.load(prefix).max_length
        if recorded is None or recorded > limit:
            raise ConfigError(f"{prefix}: preprocessed with --max-length {recorded}, but data.max_length = {limit}: "
                              f"preprocess it with --max-length {limit} (or set data.max_length = 0)")


def build_model(cfg: TrainConfig, device: torch.device, attention_backend: str | None = None) -> Qwen2RewardModel:
    """Construct on the meta device (no memory touched), then materialise and init on `device`."""
    with torch.device("meta"):
        model = Qwen2RewardModel(cfg.model, activation_checkpointing=cfg.activation_checkpointing,
                                 attention_backend=attention_backend or cfg.attention_backend)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    model.init_weights()
    return model


def load_initial_weights(model: Qwen2RewardModel, source: str, with_reward_head: bool) -> str:
    """Initialise from any model source (a run, checkpoints or step dir, sharded or not, or an HF directory)."""
    return init_model_from(model, source, with_reward_head=with_reward_head)


class Trainer:
    """One rank of a run. With torch.distributed initialised (torchrun, or tests' gloo ranks) the model
    is split by ``cfg.parallel`` (tp x pp, data parallel filling the world); otherwise one process.

    The run directory is locked from construction until ``fit()`` returns (or ``close()``); ``overwrite``
    moves a previous run found there aside instead of refusing to start (megapmp/run_dir.py)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, overwrite: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        cfg.data.validate()  # before any shard is opened: no data.train is a message, not an IndexError
        self.ctx = build_context(cfg.parallel)
        self.is_main = self.ctx.rank == 0
        # Absolute shard paths keep the checkpoint's record usable from any working directory
        # (the exporter finds the tokenizer beside the training shards).
        cfg.data.train = [str(Path(p).resolve()) for p in cfg.data.train]
        cfg.data.valid = [str(Path(p).resolve()) for p in cfg.data.valid]
        if cfg.data.verify == "full":
            # Every rank hashes what it will read (the page cache makes the repeats cheap), so no rank
            # waits at a barrier for one that failed.
            self.log(f"verifying {len(cfg.data.train) + len(cfg.data.valid)} shard(s) against their sidecars")
            verify_shards(cfg.data.train + cfg.data.valid, progress=self.is_main and cfg.logging.progress)
        self.device = local_device()
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.compiled = compile_enabled(cfg.compile, self.device, cfg.parallel.tp)
        # "auto" is resolved once, for this device and compute dtype, so every layer (and a compiled one's
        # graph) sees one concrete backend.
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, self.device,
                                                           self.amp_dtype or torch.float32)
        # Whatever is compiled per input shape (the layers, or FlexAttention's kernel on a GPU even with
        # compile = off) gets ONE shape: micro-batches of exactly a token budget's tokens (model/compile.py).
        # Without a budget, a flat row is padded to a multiple of the TP size under sequence parallelism
        # (each rank takes an equal token shard) and of the compile bucket.
        shape_specialised = self.compiled or (self.attention_backend == "flex" and self.device.type == "cuda")
        budget = token_budget(cfg.data.micro_batch_tokens, cfg.data.bucket_tokens, cfg.data.packing,
                              shape_specialised)
        sp_multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
        pad_multiple = math.lcm(sp_multiple, 1 if budget else bucket_tokens(cfg.data.bucket_tokens, shape_specialised))
        interleaved = cfg.parallel.schedule == "interleaved" and cfg.parallel.pp > 1
        self.loader = StepLoader(cfg.data.train, kind=cfg.data.kind, weights=cfg.data.weights,
                                 items_per_step=cfg.data.items_per_step, micro_batches=cfg.data.micro_batches,
                                 seq_len=cfg.data.seq_len, layout=cfg.data.layout, packing=cfg.data.packing,
                                 pad_multiple=pad_multiple, seed=cfg.data.seed, overlong=cfg.data.overlong,
                                 dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp_size, micro_batch_tokens=budget,
                                 micro_batch_multiple=cfg.parallel.pp if interleaved else 1,
                                 lm_weighting=cfg.data.lm_weighting)
        if self.loader.token_budget is not None:
            self.log(f"micro-batches: {self.loader.token_budget.describe()}")
        # Steps are packed ahead on a thread (page-locked on a GPU, so the copies do not stall the host).
        self.batches = (BackgroundLoader(self.loader, depth=cfg.data.prefetch_steps,
                                         pin_memory=self.device.type == "cuda")
                        if cfg.data.prefetch_steps else self.loader)
        for prefix, (dropped, unit) in self.loader.dropped.items():
            self.log(f"left out {dropped} {unit} of {prefix} that do not fit data.seq_len={cfg.data.seq_len} "
                     f"(data.overlong = drop)")
        self.cfg = cfg = resolve_config(cfg, self.loader.meta)
        # An epoch is what the sampler draws from: every item of every train shard, less the pairs that
        # data.overlong = drop leaves out.
        self.cfg = cfg = resolve_steps(cfg, [stream.size for stream in self.loader.sampler.streams], self.log,
                                       self.loader.item_unit)
        check_shard_max_length(cfg.data.max_length, cfg.data.train + cfg.data.valid)
        cfg.validate()
        self.valid_pairs = self._load_valid_pairs()
        # Only now, with config and data checked (nothing bad leaves a directory behind): one owner per run
        # directory, and a start that continues exactly one run (or refuses).
        self.run_lock = open_run_dir(self.run_dir, cfg, self.ctx, overwrite=overwrite, log=self.log)
        try:
            self._build_model()
            self.step = 0  # optimizer steps taken
            self.skipped_steps = 0
            self.consecutive_nonfinite = 0
            self.config_changes = {}  # settings changed on resume (checkpoint.allow_change), for metrics.jsonl
            self._maybe_resume()
            if self.is_main:
                write_text_atomic(self.run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (fit() does this when it returns)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _build_model(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # The full model is seeded (or loaded) the same way on every rank, then each keeps its part.
        # With init_from the random init is overwritten, so a big model is staged on the CPU instead.
        staging = torch.device("cpu") if (ctx.world_size > 1 and cfg.checkpoint.init_from) else self.device
        full = build_model(cfg, staging, self.attention_backend)
        # What a checkpoint of this model must hold (full shapes, any layout): resume loads strictly against it.
        self.parameter_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
        self.checkpoint_shapes = {k: shape for k, shape in self.parameter_shapes.items()
                                  if not (k == "lm_head.weight" and cfg.model.tie_word_embeddings)}
        if cfg.checkpoint.init_from:
            origin = load_initial_weights(full, cfg.checkpoint.init_from, cfg.checkpoint.init_reward_head)
            self.log(f"initialised from {origin}")
        build_chunk = partial(Qwen2RewardModel, cfg.model, activation_checkpointing=cfg.activation_checkpointing,
                              attention_backend=self.attention_backend)
        chunks = build_rank_chunks(full, build_chunk, ctx, self.device, sequence_parallel=cfg.parallel.sequence_parallel)
        if self.compiled:
            # Every chunk's decoder layers; the engine, loss and collectives stay eager.
            layers = sum(compile_layers(chunk) for chunk in chunks)
            shapes = (f"one shape: [1, {self.loader.micro_batch_tokens}]" if self.loader.token_budget is not None
                      else f"shapes padded to multiples of {self.loader.pad_multiple} tokens")
            self.log(f"compiling {layers} decoder layers on first use (torch.compile, regional, {shapes})")
        self.engine = Engine(chunks, ctx, cfg.parallel, cfg.optimizer, device=self.device, amp_dtype=self.amp_dtype)
        self.model = chunks[0]  # the whole model in a single-stage run
        for note in self.engine.notes:
            self.log(note)
        n_params = sum(p.numel() for _, p in self.engine.params)
        self.peak_flops = peak_flops(self.device, override_tflops=cfg.logging.peak_tflops or None)
        self.log(format_report(backend_report(self.device, self.amp_dtype, cfg.attention_backend,
                                              optimizer_backend=self.engine.optimizer_backend)))
        self.log(f"loss {loss_backend(self.device, ctx.tp_size, cfg.loss.backend)}, "
                 f"{n_params / 1e6:.2f}M parameters on rank 0, peak "
                 f"{self.peak_flops / 1e12 if self.peak_flops else 'unknown'} TFLOP/s per device for MFU")

    def log(self, message: str) -> None:
        if self.is_main:
            log(message)

    def _load_valid_pairs(self):
        if not self.cfg.data.valid:
            return []
        pairs, data = [], self.cfg.data
        # score_pairs packs a pair as [P C R] in the group layout: held-out pairs must fit a row that way
        layout = "shared-prefix" if data.layout == "group" else data.layout
        for prefix in data.valid:
            ds = open_preference_dataset(prefix)  # a group shard's pairs expanded
            fitting = pairs_that_fit(ds, data.seq_len, layout, data.overlong)  # before any step, not at eval
            take, items = preference_pairs(ds, max(0, data.valid_items - len(pairs)), fitting)
            check_token_ids(ds, items, ds.meta.vocab_size)  # once, here: these pairs are scored again and again
            pairs += take
        return pairs

    # -- checkpoints ------------------------------------------------------------------------------

    def _maybe_resume(self) -> None:
        """Continue from the checkpoint that checkpoint.resume names ("auto": the newest intact one); the
        checkpoint layer loads the model and optimizer, the trainer takes back its loader, RNG and counters.
        The checkpoint's recorded config must allow it (run_dir.ConfigCheck: same model, no unallowed change)."""
        check = ConfigCheck(self.cfg)
        state = ckpt.resume(self.run_dir / "checkpoints", self.cfg.checkpoint.resume, self.engine,
                            expected_shapes=self.checkpoint_shapes, parameter_shapes=self.parameter_shapes,
                            tie_word_embeddings=self.cfg.model.tie_word_embeddings, log=self.log, check=check)
        if state is None:
            return
        if check.changes:
            self.config_changes = check.changes
            self.log("resuming with changed settings (checkpoint.allow_change): " +
                     "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in check.changes.items()))
        self.batches.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]

    def save_checkpoint(self) -> Path:
        """Checkpoint this step (every rank calls this); the checkpoint layer picks the format."""
        state = {"step": self.step, "skipped_steps": self.skipped_steps,
                 "consecutive_nonfinite": self.consecutive_nonfinite, "loader": self.batches.state_dict(),
                 "rng": ckpt.rng_state(), "config": asdict(self.cfg), "shard_meta": asdict(self.loader.meta)}
        return ckpt.save(self.run_dir / "checkpoints", self.step, self.engine, trainer_state=state,
                         keep_last=self.cfg.checkpoint.keep_last,
                         sequence_parallel=self.cfg.parallel.sequence_parallel,
                         tie_word_embeddings=self.cfg.model.tie_word_embeddings)

    # -- the step ---------------------------------------------------------------------------------

    def train_step(self, batch: StepBatch) -> dict:
        """One optimizer step over ``batch`` (this DP rank's micro-batches); returns its metrics."""
        cfg, engine = self.cfg, self.engine
        lr = lr_at(self.step, lr=cfg.optimizer.lr, total_steps=cfg.steps, schedule=cfg.schedule.name,
                   warmup_fraction=cfg.schedule.warmup_fraction, decay_fraction=cfg.schedule.decay_fraction,
                   min_lr_ratio=cfg.schedule.min_lr_ratio)
        loss_fn = partial(pmp_loss, rm_coef=cfg.loss.rm_coef, lm_coef=cfg.loss.lm_coef, lm_chunk=cfg.loss.lm_chunk,
                          global_pairs=batch.global_pairs, global_lm_tokens=batch.global_lm_tokens,
                          backend=cfg.loss.backend)
        host = [m.on_host for m in batch.micro_batches]
        # Model FLOPs on the real per-segment lengths (padding counts zero), summed over DP by the engine.
        flops = step_flops(cfg.model, host, lm_head=bool(cfg.loss.lm_coef), reward_head=bool(cfg.loss.rm_coef))
        engine.zero_grad()
        micro_batches = [m.to_torch(self.device, non_blocking=True) for m in batch.micro_batches]
        totals = engine.forward_backward(micro_batches, loss_fn, tokens=sum(m.num_real_tokens for m in host),
                                         flops=flops)
        engine.finish_grads()
        grad_norm = engine.clip_grad_norm(cfg.optimizer.grad_clip)
        sums, grad_norm = StepSums.read(totals, grad_norm)  # the step's one wait for the device
        finite = math.isfinite(sums.loss) and math.isfinite(grad_norm)
        if finite:
            engine.optimizer_step(lr)
            self.consecutive_nonfinite = 0
        else:
            engine.zero_grad()
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        pairs = batch.global_pairs
        return {"loss": sums.loss, "rm_loss": sums.rm_loss, "lm_loss": sums.lm_loss,
                "rm_acc": sums.correct / pairs if pairs else None, "margin": sums.margin_sum / pairs if pairs else None,
                "lr": lr, "grad_norm": grad_norm, "pairs": pairs,
                "tokens": int(sums.tokens), "flops": sums.flops, "skipped": not finite}

    def evaluate(self) -> dict:
        if not self.valid_pairs:
            return {}
        model = self.engine.whole_model  # score_pairs runs the whole single-device model
        if model is None:
            if not getattr(self, "_eval_warned", False):
                self.log("held-out scoring is single-process only: skipped in this parallel run "
                         "(score the exported checkpoint with tools/evaluate.py)")
                self._eval_warned = True
            return {}
        with eager_layers(model):
            r_c, r_r = score_pairs(model, self.valid_pairs, seq_len=self.cfg.data.seq_len,
                                   layout=self.cfg.data.layout, pad_id=self.loader.pad_id, device=self.device,
                                   autocast_dtype=self.amp_dtype)
        # Ties count as wrong, as in the paper (and eval.metrics.rm_accuracy).
        return {"valid_rm_acc": float((r_c > r_r).mean()), "valid_margin": float((r_c - r_r).mean()),
                "valid_pairs": len(r_c)}

    def fit(self) -> list[dict]:
        cfg = self.cfg
        # Only global rank 0 writes metrics and shows progress; every rank returns the same history.
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.step) if self.is_main else None
        trackers = Trackers(cfg, self.run_dir) if self.is_main else None
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.logging.progress and self.is_main))
        try:
            while self.step < cfg.steps:
                started, compiling = time.perf_counter(), compile_seconds()
                record = self.train_step(self.batches.next_step())
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                # Compilation (the first visit of each padded shape) is reported apart and left out of the
                # rates, which then describe the steady state a long run spends its time in.
                compile_s = compile_seconds() - compiling
                elapsed = max(time.perf_counter() - started - compile_s, 1e-9)
                self.step += 1
                flops = record.pop("flops")
                record = {"step": self.step, **record, "step_s": elapsed, "compile_s": compile_s,
                          "tokens_per_s": record["tokens"] / elapsed,
                          "tflops_per_device": flops / elapsed / self.ctx.world_size / 1e12,
                          "mfu": mfu(flops, elapsed, self.peak_flops, num_devices=self.ctx.world_size),
                          "skipped_steps": self.skipped_steps}
                if cfg.logging.eval_interval and (self.step % cfg.logging.eval_interval == 0 or self.step == cfg.steps):
                    record.update(self.evaluate())
                if self.config_changes:  # the first step that ran with them says so
                    record["config_changes"], self.config_changes = self.config_changes, {}
                if self.is_main:
                    metrics.write(record)
                    trackers.log(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                **({"acc": f"{record['rm_acc']:.2f}"} if record["rm_acc"] is not None else {}))
                if self.consecutive_nonfinite > cfg.max_nonfinite_steps:
                    raise RuntimeError(f"{self.consecutive_nonfinite} consecutive steps had non-finite loss or "
                                       f"gradients (limit train.max_nonfinite_steps={cfg.max_nonfinite_steps}); "
                                       f"lower the learning rate or check the data. Last checkpoint kept.")
                interval = cfg.checkpoint.interval
                if (interval and self.step % interval == 0) or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if isinstance(self.batches, BackgroundLoader):
                self.batches.close()
            if self.is_main:
                metrics.close()
                trackers.close()
            self.close()
        return history


def parse_cli(argv=None):
    """--config FILE --run-dir DIR, then any number of `--section.key value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m megapmp.train",
        description="Train a megapmp model: LM pretraining, PMP or RM finetuning (one loop, chosen by config). "
                    "Any config field can be overridden as --section.key value (e.g. --model.num_hidden_layers 4, "
                    "--optimizer.lr 1e-4, --steps 200); see megapmp/config.py for every field and its meaning.")
    parser.add_argument("--config", default=None, help="TOML file (examples/configs/*.toml)")
    parser.add_argument("--run-dir", required=True, help="output directory: config.json, metrics.jsonl, checkpoints/")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a --run-dir that holds one: the old run is moved aside to "
                             "RUN.old-YYYYmmdd-HHMMSS, never deleted (without it such a start is refused unless it "
                             "resumes; do not leave it in a command that is requeued after a crash)")
    args, rest = parser.parse_known_args(argv)
    try:
        return args, parse_overrides(_joined_list_flags(rest))
    except ConfigError as e:
        parser.error(str(e))


def _joined_list_flags(rest: list[str]) -> list[str]:
    """`--checkpoint.allow-change A B` -> `--checkpoint.allow-change A,B` (overrides take one value each)."""
    out, i = [], 0
    while i < len(rest):
        out.append(rest[i])
        if rest[i] in ("--checkpoint.allow-change", "--checkpoint.allow_change"):
            values = []
            while i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                values.append(rest[i + 1])
                i += 1
            out.append(",".join(values))
        i += 1
    return out


# Errors in what the user gave (config, shards, checkpoints, paths, a run directory in use): one line and
# exit 2. Anything else is a bug in megapmp and keeps its traceback.
USER_ERRORS = (ConfigError, ShardError, ckpt.CheckpointError, FileNotFoundError, RunDirError)


def main(argv=None) -> int:
    args, overrides = parse_cli(argv)
    distributed = False
    try:
        cfg = load_train_config(args.config, overrides)
        torch.set_num_threads(cfg.num_threads) if cfg.num_threads else None
        distributed = init_distributed()
        Trainer(cfg, args.run_dir, overwrite=args.overwrite).fit()
    except USER_ERRORS as e:
        message = " ".join(str(e).split())
        print(f"megapmp.train: error: {message}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
