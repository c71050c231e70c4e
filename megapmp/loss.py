"""The CodePMP objective on packed rows.

    L = rm_coef * sum_pairs -log sigmoid(r_chosen - r_rejected) / global_pairs
      + lm_coef * sum_chosen_tokens CE(logits, next token) / global_lm_tokens

Both sums run over this micro-batch; the denominators are the counts of the whole optimizer step on
all data-parallel ranks, so summing micro-batch losses (and all-reducing gradients) gives the same
value for any micro-batch split or parallel layout.

Only the hidden states of LM-target positions ever meet the vocabulary: the [tokens x vocab] logits
of the whole batch are never materialised (the seed implementation keeps bf16 and fp32 copies of them
for every row position). Two backends compute the same value:

* ``"torch"`` (torch-chunked): ``lm_loss_sum``'s chunks of `lm_chunk` tokens, gradients made in forward, and
  ``pair_rewards`` + ``rm_loss_sum``. The default on CPU (and wherever triton is missing).
* ``"triton"`` (triton-fused): ``megapmp_kernels.pair_loss.fused_pair_loss`` -- tiled log-sum-exp over the
  vocabulary, logits recomputed in backward, the reward read-out and pairwise log-sigmoid in the same
  autograd Function. The default on CUDA when triton is importable.

``MEGAPMP_LOSS_BACKEND`` (auto | torch | triton) or the ``backend`` argument overrides the choice;
``loss_backend(device, tp_size)`` names what a run will use (for the trainer's log line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from megapmp.data.packing import IGNORE_INDEX
from megapmp.parallel.collectives import copy_to_tp, gather_from_sequence, group_rank, reduce_from_tp
from megapmp.parallel.tensor_parallel import vocab_parallel_ce_sum


LOSS_BACKEND_ENV = "MEGAPMP_LOSS_BACKEND"
_BACKENDS = ("auto", "torch", "triton")


def resolve_loss_backend(device, backend: str | None = None) -> str:
    """"torch" or "triton": ``backend`` if given, else $MEGAPMP_LOSS_BACKEND, else auto.

    auto = triton on CUDA when triton is importable, torch otherwise. An explicit "triton" that cannot
    run (no triton; a CPU device without TRITON_INTERPRET=1) raises rather than silently falling back.
    """
    choice = (backend or os.environ.get(LOSS_BACKEND_ENV) or "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"loss backend must be one of {_BACKENDS} (from the backend argument or "
                         f"${LOSS_BACKEND_ENV}), got {choice!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    from megapmp_kernels.pair_loss import triton_error  # imports no triton kernel yet

    problem = triton_error(device)
    if problem is None:
        return "triton"
    if choice == "triton":
        raise ValueError(f"loss backend 'triton' was requested but cannot run: {problem}")
    return "torch"


def loss_backend(device, tp_size: int = 1, backend: str | None = None) -> str:
    """The loss implementation a run on ``device`` will use, for logs: "triton-fused" or "torch-chunked",
    prefixed with "vocab-parallel " when the LM head is split over ``tp_size`` > 1 ranks."""
    name = {"triton": "triton-fused", "torch": "torch-chunked"}[resolve_loss_backend(device, backend)]
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


def rm_loss_sum(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).sum()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden[t] @ weight.T, targets[t]) without a [T x V] tensor, gradients made in forward.

    The loss is the graph's last op and its output a scalar, so d(loss)/d(logits) = softmax - onehot is
    known while each chunk's logits are still at hand: forward turns them into grad_hidden [T, H] and
    accumulates grad_weight [V, H] there and then, and backward only scales the two by the incoming
    scalar. Against checkpointed chunks (recompute logits in backward) this skips one [T x H x V]
    matmul, a third of the LM head's work, and holds one [chunk x V] buffer instead of logits,
    log-probabilities and their gradient. grad_weight is allocated at the same point in the step as the
    checkpointed version's (loss backward runs first), so the step's peak does not grow -- except where
    several loss forwards wait for their backwards (the last stage of an all-forward-all-backward
    pipeline schedule), which each hold one [V, H] fp32 buffer until then; 1F1B keeps it at one.
    (The Triton kernel recomputes instead: on a GPU the [V, H] fp32 accumulator is the bigger cost.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grad_enabled=True):
        # Grad mode is always off inside forward and needs_input_grad ignores no_grad(), so the caller
        # says whether a backward can follow (torch.is_grad_enabled()); without one, no gradient work.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += _ce_chunk(hidden[rows], weight, targets[rows],
                               grad_hidden[rows] if need_hidden else None, grad_weight)
        ctx.grads = (grad_hidden, grad_weight, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("ChunkedLinearCrossEntropy supports one backward per forward (its gradients are "
                               "made in forward and handed on in place); recompute the loss to differentiate again")
        grad_hidden, grad_weight, weight_dtype = ctx.grads
        ctx.grads = None  # free the buffers as soon as they are handed on
        # In place: these buffers are handed on as the gradients, no second copy of [V, H]. The scale
        # (lm_coef / global tokens) is applied in fp32: rounding it to bf16 would bias every gradient.
        if grad_hidden is not None:
            if grad_hidden.dtype == torch.float32:
                grad_hidden.mul_(grad_total)
            else:
                grad_hidden.copy_(grad_hidden.float() * grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _ce_chunk(h, weight, targets, grad_hidden_out, grad_weight_acc) -> torch.Tensor:
    """Summed CE of one chunk; writes its d/dh into grad_hidden_out and adds its d/dW to grad_weight_acc
    (either may be None). A function of its own so the [c, V] buffer is freed before the next chunk's."""
    logits = (h @ weight.t()).float()  # [c, V], the only vocabulary-sized buffer
    rows = torch.arange(len(targets), device=targets.device)
    target_logit = logits[rows, targets]
    row_max = logits.amax(dim=-1)
    exp = logits.sub_(row_max[:, None]).exp_()  # in place: exp(logit - max)
    sum_exp = exp.sum(dim=-1)
    total = (row_max + sum_exp.log() - target_logit).sum()  # log-sum-exp - target logit
    if grad_hidden_out is not None or grad_weight_acc is not None:
        grad_logits = exp.mul_(sum_exp.reciprocal()[:, None])  # softmax - onehot, in place, fp32
        grad_logits[rows, targets] -= 1.0
        if grad_hidden_out is not None:
            grad_hidden_out.copy_(grad_logits.to(weight.dtype) @ weight)
        if grad_weight_acc is not None:  # in place into fp32 (autocast leaves it so): no [V, H] temporary
            grad_weight_acc.addmm_(grad_logits.t(), h.float())
    return total


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
             global_lm_tokens: int, tp_group=None, sequence_parallel: bool = False, lm_chunk: int = 4096,
             backend: str | None = None) -> LossOutput:
    """The PMP loss of one packed micro-batch (see module docstring). ``batch`` is a torch PackedBatch.

    hidden: the model's output [R, S, H]; with a tensor-parallel ``tp_group`` (the LM head split over its
    vocabulary, Megatron's vocab-parallel CE) either replicated over TP or, under ``sequence_parallel``, this
    rank's token shard [R*S/T, H]. The value is the same on every TP rank and equals the single-device one.
    ``backend``: "torch", "triton" or "auto"; None reads $MEGAPMP_LOSS_BACKEND (see resolve_loss_backend).
    """
    if sequence_parallel and hidden.shape[0] * _group_size(tp_group) != batch.input_ids.numel():
        raise ValueError(f"sequence-parallel hidden {tuple(hidden.shape)} x tp={_group_size(tp_group)} does not "
                         f"cover the batch's {tuple(batch.input_ids.shape)} tokens")
    zero = hidden.new_zeros((), dtype=torch.float32)
    loss, rm, lm, correct, margin = zero, zero, zero, zero, zero
    num_pairs = len(batch.chosen_index)
    if rm_coef and num_pairs:
        if sequence_parallel:
            r_chosen, r_rejected = sequence_parallel_pair_rewards(hidden, heads.score, batch.chosen_index,
                                                                  batch.rejected_index, tp_group)
        else:
            r_chosen, r_rejected = pair_rewards(hidden, heads.score, batch.chosen_index, batch.rejected_index)
        rm = rm_loss_sum(r_chosen, r_rejected) / global_pairs
        loss = loss + rm_coef * rm
        diff = (r_chosen - r_rejected).detach()
        correct, margin = (diff > 0).sum().float(), diff.sum()
    if lm_coef and global_lm_tokens:
        lm = lm_loss_sum(hidden, heads.lm, batch.labels, tp_group, sequence_parallel=sequence_parallel,
                         chunk=lm_chunk, backend=backend) / global_lm_tokens
        loss = loss + lm_coef * lm
    return LossOutput(loss, rm.detach(), lm.detach(), correct, margin, num_pairs)


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def sequence_parallel_pair_rewards(hidden_shard: torch.Tensor, score_weight: torch.Tensor, chosen_index,
                                   rejected_index, group):
    """fp32 rewards [N], [N] from an SP token shard [R*S/T, H] (flat indices into R*S), replicated.

    Rather than all-gathering [R*S, H] for 2N rows, each rank reads the reward at the flat indices that
    fall in its token shard, zeros elsewhere, and one all-reduce of the [2N] rewards (``reduce_from_tp``:
    backward identity) completes them; the score weight's gradient is then partial per rank, which
    ``allreduce_tp_replicated_grads`` sums. With lm_coef = 0 (RM finetuning) no [R*S, H] collective happens.
    """
    tokens = hidden_shard.shape[0]
    start = group_rank(group) * tokens
    index = torch.cat([chosen_index, rejected_index])  # [2N]
    owned = (index >= start) & (index < start + tokens)
    local = (index - start).clamp(0, tokens - 1)
    rewards = fp32_rewards(hidden_shard[local], score_weight)  # [2N], valid where owned
    rewards = reduce_from_tp(torch.where(owned, rewards, torch.zeros_like(rewards)), group)
    return rewards[: len(chosen_index)], rewards[len(chosen_index):]


def lm_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, tp_group=None, *,
                sequence_parallel: bool = False, chunk: int = 4096, backend: str | None = None) -> torch.Tensor:
    """Summed next-token CE over positions whose label is not IGNORE_INDEX, logits in fp32, in chunks.

    hidden: [R, S, H], or under SP this rank's token shard [R*S/T, H]; lm_weight: [V, H] or this TP rank's
    vocab rows [V/T, H]; labels: [R, S], identical on every TP rank. Peak extra memory is one chunk of
    [chunk x V(/T)] fp32 logits, however many target tokens the batch holds. The hidden states of the
    target positions enter the TP region through ``copy_to_tp`` (or, under SP, the all-gather of the token
    shards, whose backward reduce-scatters the per-rank partial gradients -- Megatron's SP LM head).
    """
    width = lm_weight.shape[-1]
    flat = gather_from_sequence(hidden, tp_group) if sequence_parallel else hidden.reshape(-1, width)  # [R*S, H]
    flat_labels = labels.reshape(-1)
    positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1)  # [T]
    selected, targets = flat[positions], flat_labels[positions]  # [T, H], [T]
    tp = _group_size(tp_group)
    if tp > 1 and not sequence_parallel:
        selected = copy_to_tp(selected, tp_group)  # after the selection: backward all-reduces [T, H] only
    if resolve_loss_backend(hidden.device, backend) == "triton":
        from megapmp_kernels.pair_loss import fused_pair_loss

        vocab_start = group_rank(tp_group) * lm_weight.shape[0] if tp > 1 else 0
        return fused_pair_loss(selected, lm_weight, targets, vocab_start=vocab_start, group=tp_group,
                               ignore_index=IGNORE_INDEX, backend="triton").lm_sum
    if tp == 1:
        return ChunkedLinearCrossEntropy.apply(selected, lm_weight, targets, chunk, torch.is_grad_enabled())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(positions), chunk):
        h, t = selected[start: start + chunk], targets[start: start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_vocab_parallel_chunk_ce, h, lm_weight, t, tp_group,
                                                          use_reentrant=False)
    return total


def _vocab_parallel_chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    local_logits = (h @ weight.t()).float()  # [chunk, V/T]
    return vocab_parallel_ce_sum(local_logits, targets, group)
