"""Where a run's per-step metrics go: RUN_DIR/metrics.jsonl (always) and, when configured, TensorBoard and
Weights & Biases. Only global rank 0 writes them (megapmp.train)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from megapmp.config import TrainConfig
from megapmp.io import write_text_atomic


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the restored step are dropped so the file
    reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        # Replaced, not rewritten in place: a kill here leaves the old file whole, never an emptied one.
        write_text_atomic(path, "".join(line + "\n" for line in kept))
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
