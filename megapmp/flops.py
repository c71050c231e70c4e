"""Model FLOPs of a training step, Megatron's way, on the real per-document lengths; and MFU.

Megatron-LM (``megatron/training/training.py``, ``num_floating_point_operations``) counts, per token of a
dense GQA/SwiGLU transformer, forward + backward = 3 x the forward GEMMs at 2 FLOPs per multiply-add:

    per layer   QKV      2 h (q + 2 kv)            q = heads x head_dim, kv = kv_heads x head_dim
                core     2 x 2 q x s/2             QK^T and PV; "causal mask (only half of the mask is non-zero)"
                out      2 q h
                MLP      2 h ffn x 3               SwiGLU: gate, up and down
    logits               2 h V                     every token, padded vocabulary

and multiplies by batch x seq_length. Two departures, both to count the work *this* trainer must do:

* Attention is counted per attention problem on the real segment lengths (``segment_structure``), never
  on the packed row length: a causal square of side n counts n^2 / 2 (query, key) pairs -- Megatron's
  half-square convention (``causal="half"``; ``"exact"`` counts n (n + 1) / 2) -- and the shared-prefix
  problem "R over [P R]" counts r p + r^2 / 2. So packed == the same sequences unpacked, and
  ``[P C R]`` (or a group row ``[P R1 ... RK]``, each later Ri over [P Ri]) is credited exactly the pairs it
  needs (no second prompt's p^2 / 2).
* GEMMs run over real tokens only (padding counts zero, however much of the row it fills), so the
  prompt of a shared-prefix pair is counted once; the LM head only over the LM-target tokens (the loss
  never computes logits elsewhere: ``megapmp.loss.lm_loss_sum``) at the config's vocabulary size, and the
  reward head (h -> 1) at the two read-out tokens of each pair. No LM head at all when ``lm_head=False``
  (lm_coef = 0), no reward head when ``reward_head=False`` (rm_coef = 0).

Not counted, as in Megatron: norms, RoPE, softmax, activations, the embedding lookup, the optimizer,
and the recomputation of activation checkpointing (these are *model* FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megapmp.model.attention import segment_structure

IGNORE_INDEX = -100  # megapmp.data.packing.IGNORE_INDEX, repeated to keep this module numpy-only

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name() in this order; the first matching key wins.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM5
    "H200": 989.4,  # SXM; same tensor cores as the H100 SXM
    "A100": 312.0,
}


@dataclass
class StepFlops:
    """Forward + backward model FLOPs, by part."""

    gemm: float = 0.0  # QKV, out, MLP projections over the real tokens
    attention: float = 0.0  # QK^T and PV over the attended (query, key) pairs
    lm_head: float = 0.0
    reward_head: float = 0.0

    @property
    def total(self) -> float:
        return self.gemm + self.attention + self.lm_head + self.reward_head

    def __add__(self, other: "StepFlops") -> "StepFlops":
        return StepFlops(self.gemm + other.gemm, self.attention + other.attention,
                         self.lm_head + other.lm_head, self.reward_head + other.reward_head)


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def attention_pairs(segment_ids, branch_ids, causal: str = "half") -> float:
    """(query, key) pairs the attention of these packed rows needs, per head and layer."""
    if causal not in ("half", "exact"):
        raise ValueError(f"causal={causal!r}: expected 'half' (Megatron) or 'exact'")
    structure = segment_structure(segment_ids, branch_ids)
    if structure is None:
        raise ValueError("a segment's branch ids are not of the form shared* b1* ... bK*; cannot count its pairs")
    tri = (lambda n: n * n / 2.0) if causal == "half" else (lambda n: n * (n + 1) / 2.0)
    table = structure.astype(np.float64)
    p, first, later = table[:, 1], table[:, 2], table[:, 3:]  # later runs are 0 where a segment has fewer
    # [P X1] (or a plain segment) is one causal square; each later response Xi is Xi over [P Xi].
    return float(tri(p + first).sum() + (later * p[:, None] + tri(later)).sum())


def per_token_gemm_flops(config) -> float:
    """Forward FLOPs of one token through every decoder layer's projections (no attention core)."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * h * config.intermediate_size * 3
    return float(per_layer * config.num_hidden_layers)


def batch_flops(config, batch, *, lm_head: bool = True, reward_head: bool = True,
                causal: str = "half") -> StepFlops:
    """Forward + backward model FLOPs of one packed micro-batch (a ``PackedBatch``, numpy or torch:
    ``segment_ids``, ``branch_ids``, ``lm_index`` (or ``labels``), ``chosen_index`` are read)."""
    segment_ids = _array(batch.segment_ids)
    real_tokens = float((segment_ids >= 0).sum())
    lm_index = getattr(batch, "lm_index", None)
    lm_tokens = 0.0
    if lm_head and lm_index is not None:
        # The model computes one logits row per position. lm_index may repeat one (a group's prompt end
        # predicts each response's first token; data.lm_weighting = pairs repeats a winner's positions once
        # per pair it wins): the loss's extra rows are a weighting, not model FLOPs, so MFU does not count them.
        lm_tokens = float(len(np.unique(_array(lm_index))))
    elif lm_head:
        lm_tokens = float((_array(batch.labels) != IGNORE_INDEX).sum())
    readouts = 2.0 * len(_array(batch.chosen_index)) if reward_head else 0.0
    q = config.num_attention_heads * config.head_dim
    pairs = attention_pairs(segment_ids, batch.branch_ids, causal)
    fwd_bwd = 3.0
    return StepFlops(
        gemm=fwd_bwd * per_token_gemm_flops(config) * real_tokens,
        attention=fwd_bwd * 4.0 * q * pairs * config.num_hidden_layers,
        lm_head=fwd_bwd * 2.0 * config.hidden_size * config.vocab_size * lm_tokens,
        reward_head=fwd_bwd * 2.0 * config.hidden_size * readouts,
    )


def step_flops(config, batches, *, lm_head: bool = True, reward_head: bool = True, causal: str = "half") -> float:
    """Model FLOPs of a training step: the sum of ``batch_flops`` over its micro-batches (one batch or
    an iterable of them). Count the micro-batches this rank ran, then sum over data-parallel ranks."""
    if hasattr(batches, "segment_ids"):
        batches = [batches]
    total = StepFlops()
    for batch in batches:
        total = total + batch_flops(config, batch, lm_head=lm_head, reward_head=reward_head, causal=causal)
    return total.total


def peak_flops(device=None, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: ``override_tflops`` if given (> 0), else the table entry
    matching the CUDA device name; None on CPUs and unknown GPUs (then MFU is not reported)."""
    if override_tflops:
        if override_tflops < 0:
            raise ValueError(f"peak TFLOP/s override {override_tflops} must be positive")
        return float(override_tflops) * 1e12
    import torch

    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return peak_flops_for_name(name)


def peak_flops_for_name(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops: float, seconds: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: ``flops`` done by ``num_devices`` devices in ``seconds``, over their peak."""
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * peak * num_devices)
