"""The CodePMP objective on packed rows.

    L = rm_coef * sum_pairs -log sigmoid(r_chosen - r_rejected) / global_pairs
      + lm_coef * sum_chosen_tokens CE(logits, next token) / global_lm_tokens

Both sums run over this micro-batch; the denominators are the counts of the whole optimizer step on
all data-parallel ranks, so summing micro-batch losses (and all-reducing gradients) gives the same
value for any micro-batch split or parallel layout.

``pmp_loss`` selects the rows that matter -- the hidden states of the LM-target positions [T, H] and of
each pair's two read-out tokens [N, H] x 2 -- hands them to the one primitive,
``megapmp_kernels.fused_pair_loss`` (both sums in one call, the [tokens x vocab] logits never
materialised), and normalises. The primitive has three implementations of the same value:

* ``"torch"``: chunks of ``lm_chunk`` target tokens, gradients made in forward (no logit recompute:
  the fastest torch formulation on a CPU). The default on CPU and wherever triton is missing.
* ``"triton"``: gradients made in forward too, on the GPU: per chunk of target rows, logits by one
  cuBLAS GEMM, a Triton kernel for the softmax / target / softmax - onehot in place, cuBLAS for dH and
  the fp32-accumulated dW. The default on CUDA: a prototype of this algorithm measured 89.9 ms against the
  naive path's 106.4 ms (7B shapes, 16k tokens, H200); this implementation is not yet timed on a GPU.
* ``"triton_recompute"``: tiled log-sum-exp over the vocabulary, logits recomputed in backward: the
  least memory, slower (kept selectable so the two can be measured side by side, tools/bench_loss.py).
The reward read-out and pairwise log-sigmoid are in the same autograd Function in every backend.

A run chooses with ``loss.backend`` (auto | torch | triton | triton_recompute; $MEGAPMP_LOSS_BACKEND
overrides it at start).
With a tensor-parallel group the LM head is split over the vocabulary (Megatron's vocab-parallel CE),
inside the same primitive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megapmp.data.packing import IGNORE_INDEX, pack_pairs
from megapmp.model.attention import attention_inputs
from megapmp.parallel.collectives import copy_to_tp, gather_from_sequence, group_rank
from megapmp_kernels.pair_loss import fused_pair_loss, triton_error


LOSS_BACKEND_ENV = "MEGAPMP_LOSS_BACKEND"
LOSS_BACKENDS = ("auto", "torch", "triton", "triton_recompute")
_BACKEND_NAMES = {"torch": "torch-chunked", "triton": "triton-grad-in-forward", "triton_recompute": "triton-recompute"}


def resolve_loss_backend(device, backend: str | None = None) -> str:
    """"torch", "triton" or "triton_recompute": ``backend`` if given (other than None), else
    $MEGAPMP_LOSS_BACKEND, else auto.

    auto = triton on CUDA when triton is importable, torch otherwise. An explicit triton backend that
    cannot run (no triton; a CPU device without TRITON_INTERPRET=1) raises rather than silently falling back.
    """
    choice = (backend or os.environ.get(LOSS_BACKEND_ENV) or "auto").strip().lower()
    if choice not in LOSS_BACKENDS:
        raise ValueError(f"loss backend must be one of {LOSS_BACKENDS} (from the backend argument or "
                         f"${LOSS_BACKEND_ENV}), got {choice!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    problem = triton_error(device)
    if problem is None:
        return "triton" if choice == "auto" else choice
    if choice != "auto":
        raise ValueError(f"loss backend {choice!r} was requested but cannot run: {problem}")
    return "torch"


def loss_backend(device, tp_size: int = 1, backend: str | None = None) -> str:
    """The loss implementation a run on ``device`` will use, for logs: "torch-chunked",
    "triton-grad-in-forward" or "triton-recompute", prefixed with "vocab-parallel " when the LM head is
    split over ``tp_size`` > 1 ranks."""
    name = _BACKEND_NAMES[resolve_loss_backend(device, backend)]
    return f"vocab-parallel {name}" if tp_size > 1 else name


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the step loss
    rm_loss: torch.Tensor  # detached shares of the two terms, before their coefficients
    lm_loss: torch.Tensor
    correct: torch.Tensor  # detached count of pairs with r_chosen > r_rejected (ties count wrong)
    margin_sum: torch.Tensor  # detached sum of r_chosen - r_rejected
    num_pairs: int


def fp32_rewards(rows: torch.Tensor, score_weight: torch.Tensor) -> torch.Tensor:
    """rows [N, H] @ score_weight [1, H] -> [N] in fp32, also inside autocast: rewards are compared
    with each other, and a bf16 product would round away margins the loss still has to see."""
    with torch.autocast(rows.device.type, enabled=False):
        return rows.float() @ score_weight.float().reshape(-1)


def pair_rewards(hidden: torch.Tensor, score_weight: torch.Tensor, chosen_index, rejected_index):
    """Rewards at the read-out tokens, computed in fp32. hidden: [R, S, H]; indices flat into R * S."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R*S, H]
    return fp32_rewards(flat[chosen_index], score_weight), fp32_rewards(flat[rejected_index], score_weight)


@dataclass(frozen=True)
class Heads:
    """The two heads the loss reads: ``lm`` [V, H] (or this TP rank's vocab rows [V/tp, H]) and ``score``
    [1, H] (replicated over TP). Either is None where a model part has no such head."""

    lm: torch.Tensor | None
    score: torch.Tensor | None

    @classmethod
    def of(cls, model) -> "Heads":
        """The heads of a model (or a pipeline's last chunk) with ``lm_head`` / ``score`` Linear modules."""
        return cls(model.lm_head.weight if model.lm_head is not None else None,
                   model.score.weight if model.score is not None else None)


def pmp_loss(hidden: torch.Tensor, heads: Heads, batch, *, rm_coef: float, lm_coef: float, global_pairs: int,
             global_lm_tokens: int, tp_group=None, sequence_parallel: bool = False, lm_chunk: int = 0,
             backend: str | None = None) -> LossOutput:
    """The PMP loss of one packed micro-batch (see module docstring). ``batch`` is a torch PackedBatch.

    hidden: the model's output [R, S, H]; with a tensor-parallel ``tp_group`` (``heads.lm`` = this rank's
    vocab rows) either replicated over TP or, under ``sequence_parallel``, this rank's token shard
    [R*S/T, H]. The value is the same on every TP rank and equals the single-device one.
    ``backend``: one of LOSS_BACKENDS; None reads $MEGAPMP_LOSS_BACKEND (see resolve_loss_backend).
    """
    tp = _group_size(tp_group)
    if sequence_parallel and hidden.shape[0] * tp != batch.input_ids.numel():
        raise ValueError(f"sequence-parallel hidden {tuple(hidden.shape)} x tp={tp} does not cover the batch's "
                         f"{tuple(batch.input_ids.shape)} tokens")
    zero = hidden.new_zeros((), dtype=torch.float32)
    loss, rm, lm, correct, margin = zero, zero, zero, zero, zero
    num_pairs = len(batch.chosen_index)
    use_rm, use_lm = bool(rm_coef and num_pairs), bool(lm_coef and global_lm_tokens)
    if not (use_rm or use_lm):
        return LossOutput(loss, rm, lm, correct, margin, num_pairs)
    chosen = rejected = selected = targets = None
    if use_rm:
        chosen, rejected = reward_rows(hidden, batch.chosen_index, batch.rejected_index, tp_group,
                                       sequence_parallel=sequence_parallel)
    if use_lm:
        positions = getattr(batch, "lm_index", None)
        selected, targets = lm_rows(hidden, batch.labels, tp_group, sequence_parallel=sequence_parallel,
                                    positions=positions,
                                    targets=getattr(batch, "lm_targets", None) if positions is not None else None)
    sums = fused_pair_loss(selected, heads.lm if use_lm else None, targets, chosen, rejected,
                           heads.score if use_rm else None, group=tp_group if tp > 1 else None,
                           vocab_start=group_rank(tp_group) * heads.lm.shape[0] if use_lm and tp > 1 else 0,
                           ignore_index=IGNORE_INDEX, backend=resolve_loss_backend(hidden.device, backend),
                           chunk_tokens=lm_chunk or None, reward_group=tp_group if sequence_parallel else None)
    if use_rm:
        rm = sums.rm_sum / global_pairs
        loss = loss + rm_coef * rm
        correct, margin = (sums.margins > 0).sum().float(), sums.margins.sum()
    if use_lm:
        lm = sums.lm_sum / global_lm_tokens
        loss = loss + lm_coef * lm
    return LossOutput(loss, rm.detach(), lm.detach(), correct, margin, num_pairs)


def lm_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, tp_group=None, *,
                sequence_parallel: bool = False, chunk: int = 0, backend: str | None = None) -> torch.Tensor:
    """Summed next-token CE over positions whose label is not IGNORE_INDEX (pmp_loss's LM term, unscaled).
    Shapes as in pmp_loss; lm_weight: [V, H] or this TP rank's vocab rows [V/T, H]."""
    selected, targets = lm_rows(hidden, labels, tp_group, sequence_parallel=sequence_parallel)
    tp = _group_size(tp_group)
    return fused_pair_loss(selected, lm_weight, targets, group=tp_group if tp > 1 else None,
                           vocab_start=group_rank(tp_group) * lm_weight.shape[0] if tp > 1 else 0,
                           ignore_index=IGNORE_INDEX, backend=resolve_loss_backend(hidden.device, backend),
                           chunk_tokens=chunk or None).lm_sum


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def lm_rows(hidden: torch.Tensor, labels: torch.Tensor, tp_group=None, *, sequence_parallel: bool = False,
            positions: torch.Tensor | None = None, targets: torch.Tensor | None = None):
    """The LM term's rows: hidden states [T, H] of the labelled positions and their targets [T].

    ``positions``: the flat indices of those positions when the loader already has them (PackedBatch.lm_index);
    finding them here instead takes a ``nonzero``, whose output size the host must wait for on a GPU.
    ``targets`` (with ``positions``; PackedBatch.lm_targets): the token each position predicts, where one
    position may predict several (a group row's prompt end); else they are read from ``labels``.

    Under TP they enter the vocab-parallel region through ``copy_to_tp`` (backward all-reduces the
    per-rank partial dH, [T, H] only) or, under SP, through the all-gather of the token shards, whose
    backward reduce-scatters them (Megatron's SP LM head).
    """
    width = hidden.shape[-1]
    flat = gather_from_sequence(hidden, tp_group) if sequence_parallel else hidden.reshape(-1, width)  # [R*S, H]
    flat_labels = labels.reshape(-1)
    if positions is None:
        positions, targets = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1), None  # [T]
    selected = flat[positions]
    targets = flat_labels[positions] if targets is None else targets
    if _group_size(tp_group) > 1 and not sequence_parallel:
        selected = copy_to_tp(selected, tp_group)
    return selected, targets


def reward_rows(hidden: torch.Tensor, chosen_index, rejected_index, tp_group=None, *, sequence_parallel: bool = False):
    """The reward term's rows: hidden states [N, H] at the chosen and at the rejected read-out tokens
    (flat indices into R * S), replicated over TP.

    Under SP, rather than all-gathering [R*S, H] for 2N rows, each rank takes the rows that fall in its
    token shard and zeros elsewhere: partial rows, whose rewards fused_pair_loss completes with one
    all-reduce of the [N] margins (``reward_group``). The score weight's gradient is then partial per rank,
    which ``allreduce_tp_replicated_grads`` sums. With lm_coef = 0 (RM finetuning) no [R*S, H] collective
    happens at all.
    """
    if not sequence_parallel:
        flat = hidden.reshape(-1, hidden.shape[-1])  # [R*S, H]
        return flat[chosen_index], flat[rejected_index]
    tokens = hidden.shape[0]  # this rank's token shard [R*S/T, H]
    start = group_rank(tp_group) * tokens
    index = torch.cat([chosen_index, rejected_index])  # [2N]
    owned = (index >= start) & (index < start + tokens)
    local = (index - start).clamp(0, tokens - 1)
    rows = hidden[local]  # [2N, H]
    rows = torch.where(owned[:, None], rows, torch.zeros_like(rows))
    return rows[: len(chosen_index)], rows[len(chosen_index):]


@torch.no_grad()
def score_pairs(model, pairs, *, seq_len: int, layout: str, pad_id: int, device, pairs_per_batch: int = 64,
                autocast_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) float64 arrays for a list of Pair objects, in order. The group layout packs a
    pair as shared-prefix does, [P C R]."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), pairs_per_batch):
        batch = pack_pairs(pairs[start : start + pairs_per_batch], seq_len, layout, pad_id).to_torch(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            hidden = model(batch.input_ids, batch.position_ids, attention_inputs(batch))
        r_c, r_r = pair_rewards(hidden, model.score.weight, batch.chosen_index, batch.rejected_index)
        chosen.append(r_c.double().cpu().numpy())
        rejected.append(r_r.double().cpu().numpy())
    model.train(was_training)
    if not chosen:
        return np.empty(0), np.empty(0)
    return np.concatenate(chosen), np.concatenate(rejected)
