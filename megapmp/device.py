"""Which device to run on and which autocast dtype to use there: one answer for training and evaluation."""

from __future__ import annotations

import os

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as asked; otherwise the GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32). "auto" is bf16 autocast on GPUs
    (fp32 master weights) and fp32 on CPUs, where bf16 matmuls are slow and no memory is short."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    try:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r} is not auto, fp32, bf16 or fp16") from None


def local_device() -> torch.device:
    """This process's device in a (possibly torchrun-launched) run: the GPU of its LOCAL_RANK, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def host_values_to(values, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of host values on ``device`` without waiting for the device: ``torch.tensor(values,
    device=cuda)`` copies from pageable memory and synchronises the stream (the host would wait for all
    queued work); a page-locked staging tensor copied ``non_blocking`` does not."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
