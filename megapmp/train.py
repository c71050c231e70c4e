"""The trainer: LM pretraining, preference-model pretraining and RM finetuning are configs of one loop.

    python -m megapmp.train --config examples/configs/tiny.toml --run-dir runs/tiny [--dotted.key value ...]

    LM pretraining   data.kind = "documents", loss.rm_coef = 0
    PMP              data.kind = "pairs", rm_coef > 0 and lm_coef > 0 (CodePMP: both 1)
    RM finetuning    data.kind = "pairs", lm_coef = 0, checkpoint.init_from = the PMP run

Writes RUN_DIR/config.json, RUN_DIR/metrics.jsonl (one JSON object per optimizer step) and
RUN_DIR/checkpoints/step_XXXXXXXX/. With checkpoint.resume = "auto" (the default) a restarted run
continues from its newest complete checkpoint and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from megapmp import checkpoint as ckpt
from megapmp.config import TrainConfig, load_train_config, parse_cli
from megapmp.data.loader import StepBatch, StepLoader
from megapmp.data.datasets import PairDataset
from megapmp.eval.scoring import attention_inputs, pairwise_accuracy, score_pairs
from megapmp.loss import pmp_loss
from megapmp.model import Qwen2RewardModel
from megapmp.optim import build_optimizer, lr_at


def log(message: str) -> None:
    print(f"[megapmp] {message}", file=sys.stderr, flush=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on GPUs (fp32 master weights), plain fp32 on CPUs unless asked otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_model(cfg: TrainConfig, device: torch.device) -> Qwen2RewardModel:
    """Construct on the meta device (no memory touched), then materialise and init on `device`."""
    with torch.device("meta"):
        model = Qwen2RewardModel(cfg.model, activation_checkpointing=cfg.activation_checkpointing,
                                 attention_backend=cfg.attention_backend)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    model.init_weights()
    return model


def load_initial_weights(model: Qwen2RewardModel, source: str, with_reward_head: bool) -> str:
    """Initialise from a megapmp checkpoint (a step dir or a run's checkpoints dir) or an HF directory."""
    from megapmp.convert.hf import from_hf_state_dict, load_hf_directory

    path = Path(source)
    is_megapmp = (path / "checkpoints").is_dir() or (path / "trainer.json").exists() or bool(ckpt.list_checkpoints(path))
    if not is_megapmp and (path / "config.json").exists():
        _, hf_state = load_hf_directory(path)
        imported = from_hf_state_dict(hf_state, model.config)
        state = dict(imported.state_dict)
        if not imported.has_score:  # a causal LM: its zero-filled head must not replace our init
            state.pop("score.weight", None)
        origin = "HF directory"
    else:
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        if not (path / "trainer.json").exists():
            latest = ckpt.latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f"checkpoint.init_from={source}: no complete checkpoint there")
            path = latest
        state = ckpt.load_model_weights(path)
        origin = f"checkpoint {path.name}"
    state = {k: v for k, v in state.items() if v is not None}
    if not with_reward_head or "score.weight" not in state:
        state["score.weight"] = model.score.weight.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"init_from {source}: missing {missing}, unexpected {unexpected}")
    return f"{origin} ({'with' if with_reward_head else 'fresh'} reward head)"


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the restored step are dropped so the file
    reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Trackers:
    """Optional TensorBoard and Weights & Biases logging; each is imported only when enabled, and a
    missing package is an error at start-up, not a silent no-op."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.tensorboard = self.wandb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("logging.tensorboard = true needs the tensorboard package "
                                  "(pip install tensorboard)") from e
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("logging.wandb_project needs the wandb package (pip install wandb)") from e
            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), config=asdict(cfg),
                                    resume="allow", name=run_dir.name)

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Absolute shard paths keep the checkpoint's record usable from any working directory
        # (the exporter finds the tokenizer beside the training shards).
        cfg.data.train = [str(Path(p).resolve()) for p in cfg.data.train]
        cfg.data.valid = [str(Path(p).resolve()) for p in cfg.data.valid]
        self.device = pick_device()
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self.loader = StepLoader(cfg.data.train, kind=cfg.data.kind, weights=cfg.data.weights,
                                 items_per_step=cfg.data.items_per_step, micro_batches=cfg.data.micro_batches,
                                 seq_len=cfg.data.seq_len, layout=cfg.data.layout, seed=cfg.data.seed)
        self._resolve_vocab(self.loader.meta)
        cfg.validate()
        self.model = build_model(cfg, self.device)
        if cfg.checkpoint.init_from:
            origin = load_initial_weights(self.model, cfg.checkpoint.init_from, cfg.checkpoint.init_reward_head)
            log(f"initialised from {origin}")
        o = cfg.optimizer
        self.optimizer, optimizer_backend = build_optimizer(
            self.model, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps, backend=o.backend)
        self.param_names = {p: n for n, p in self.model.named_parameters()}
        self.valid_pairs = self._load_valid_pairs()
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        log(f"device {self.device}, precision {self.amp_dtype or torch.float32}, attention {cfg.attention_backend}, "
            f"optimizer {optimizer_backend}, loss torch-chunked, "
            f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters")
        self._maybe_resume()
        (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def _resolve_vocab(self, meta) -> None:
        """model.vocab_size = 0 means: the shard's padded vocabulary. A model smaller than the
        tokenizer's vocabulary would index out of range, so that is an error, not a warning."""
        if self.cfg.model.vocab_size == 0:
            self.cfg.model.vocab_size = meta.padded_vocab_size
        if self.cfg.model.vocab_size < meta.vocab_size:
            raise ValueError(f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the shards' tokenizer "
                             f"vocabulary ({meta.vocab_size}); set model.vocab_size = 0 to use the shards' size")

    def _load_valid_pairs(self):
        if not self.cfg.data.valid:
            return []
        pairs = []
        for prefix in self.cfg.data.valid:
            ds = PairDataset(prefix)
            pairs += [ds[i] for i in range(min(len(ds), self.cfg.data.valid_items - len(pairs)))]
        return pairs

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _maybe_resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        for stale in ckpt.remove_incomplete(self._checkpoint_root()):
            log(f"removed {stale.name}, left by a save that did not finish")
        if resume == "none":
            return
        path = ckpt.latest_checkpoint(self._checkpoint_root()) if resume == "auto" else Path(resume)
        if path is None:
            return
        model_state, optimizer_tensors, state = ckpt.load_checkpoint(path)
        self.model.load_state_dict(model_state, strict=False)
        self.model.tie_weights()
        ckpt.optimizer_from_tensors(self.optimizer, self.param_names, optimizer_tensors, state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        log(f"resumed from {path} at step {self.step}")

    def save_checkpoint(self) -> Path:
        optimizer_tensors, optimizer_rest = ckpt.optimizer_to_tensors(self.optimizer, self.param_names)
        state = {"step": self.step, "skipped_steps": self.skipped_steps,
                 "consecutive_nonfinite": self.consecutive_nonfinite, "optimizer": optimizer_rest,
                 "loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "config": asdict(self.cfg),
                 "shard_meta": asdict(self.loader.meta)}
        model_state = {k: v for k, v in self.model.state_dict().items()
                       if not (k == "lm_head.weight" and self.cfg.model.tie_word_embeddings)}
        return ckpt.save_checkpoint(self._checkpoint_root(), self.step, model_state=model_state,
                                    optimizer_tensors=optimizer_tensors, trainer_state=state,
                                    keep_last=self.cfg.checkpoint.keep_last)

    # -- the step ---------------------------------------------------------------------------------

    def train_step(self, step: StepBatch) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.optimizer.lr, total_steps=cfg.steps, schedule=cfg.schedule.name,
                   warmup_fraction=cfg.schedule.warmup_fraction, decay_fraction=cfg.schedule.decay_fraction,
                   min_lr_ratio=cfg.schedule.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # loss, rm_loss, lm_loss, correct, margin: summed on the device, read once per step
        totals = torch.zeros(5, dtype=torch.float32, device=self.device)
        for micro in step.micro_batches:
            batch = micro.to_torch(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                hidden = self.model(batch.input_ids, batch.position_ids, attention_inputs(batch))
            out = pmp_loss(hidden, self.model.lm_head.weight, self.model.score.weight, batch,
                           rm_coef=cfg.loss.rm_coef, lm_coef=cfg.loss.lm_coef, global_pairs=step.global_pairs,
                           global_lm_tokens=step.global_lm_tokens, lm_chunk=cfg.loss.lm_chunk)
            out.loss.backward()
            totals += torch.stack([out.loss.detach(), out.rm_loss, out.lm_loss, out.correct, out.margin_sum])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optimizer.grad_clip or float("inf"))
        loss, rm_loss, lm_loss, correct, margin = totals.tolist()
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        pairs = step.global_pairs
        return {"loss": loss, "rm_loss": rm_loss, "lm_loss": lm_loss,
                "rm_acc": correct / pairs if pairs else None, "margin": margin / pairs if pairs else None,
                "lr": lr, "grad_norm": float(grad_norm), "pairs": pairs,
                "tokens": sum(m.num_real_tokens for m in step.micro_batches), "skipped": not finite}

    def evaluate(self) -> dict:
        if not self.valid_pairs:
            return {}
        r_c, r_r = score_pairs(self.model, self.valid_pairs, seq_len=self.cfg.data.seq_len,
                               layout=self.cfg.data.layout, pad_id=self.loader.pad_id, device=self.device,
                               autocast_dtype=self.amp_dtype)
        return {"valid_rm_acc": pairwise_accuracy(r_c, r_r), "valid_margin": float((r_c - r_r).mean()),
                "valid_pairs": len(r_c)}

    def fit(self) -> list[dict]:
        cfg = self.cfg
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.step)
        trackers = Trackers(cfg, self.run_dir)
        history = []
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not cfg.logging.progress)
        try:
            while self.step < cfg.steps:
                started = time.perf_counter()
                record = self.train_step(self.loader.next_step())
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                self.step += 1
                record = {"step": self.step, **record, "tokens_per_s": record["tokens"] / elapsed,
                          "skipped_steps": self.skipped_steps}
                if cfg.logging.eval_interval and (self.step % cfg.logging.eval_interval == 0 or self.step == cfg.steps):
                    record.update(self.evaluate())
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
            metrics.close()
            trackers.close()
        return history


def main(argv=None) -> int:
    args, overrides = parse_cli(argv)
    cfg = load_train_config(args.config, overrides)
    torch.set_num_threads(cfg.num_threads) if cfg.num_threads else None
    Trainer(cfg, args.run_dir).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
