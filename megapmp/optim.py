"""Optimizer construction and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, total_steps: int, schedule: str, warmup_fraction: float,
          decay_fraction: float, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based).

    wsd:      linear warmup over warmup_fraction of the run, constant, then a cosine decay to
              lr * min_lr_ratio over the last decay_fraction of the run (CodePMP: 0.03 / 0.1 / 0).
    wcd:      warmup-cosine-decay (CodePMP Table 3's RM-finetuning schedule): linear warmup, then cosine
              decay to lr * min_lr_ratio over the rest of the run; decay_fraction is not used.
    cosine:   the same as wcd (its older name here).
    constant: linear warmup, then constant.
    """
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay = max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else 0
        decay_start = total_steps - decay
        if step < decay_start:
            return lr
        progress = (step - decay_start + 1) / decay
    elif schedule in ("wcd", "cosine"):
        progress = (step - warmup + 1) / max(1, total_steps - warmup)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected wsd, wcd, cosine or constant")
    progress = min(progress, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norm weights (1-D) are not decayed (as HF / Megatron)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, backend: str = "auto") -> tuple[torch.optim.Optimizer, str]:
    """AdamW; apex's FusedAdam (adam_w_mode) when asked for or, with backend="auto", when installed and
    the parameters are on a GPU. Returns the optimizer and the name of the backend used."""
    groups = parameter_groups(model, weight_decay)
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    if backend in ("auto", "apex") and on_gpu:
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), "apex.FusedAdam"
        except ImportError:
            if backend == "apex":
                raise
    if backend == "apex":
        raise ValueError("optimizer backend apex needs the parameters on a GPU")
    fused = on_gpu and backend in ("auto", "torch-fused")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None), (
        "torch.AdamW(fused)" if fused else "torch.AdamW")
