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
import torch.nn.functional as F

from megapmp.data.packing import IGNORE_INDEX


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


def lm_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Summed next-token CE over positions whose label is not IGNORE_INDEX, logits in fp32, in chunks.

    Peak extra memory is one chunk of [chunk x vocab] fp32 logits, however many target tokens the batch
    holds (see ChunkedLinearCrossEntropy).
    """
    flat_labels = labels.reshape(-1)
    positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1)  # [T]
    selected = hidden.reshape(-1, hidden.shape[-1])[positions]  # [T, H]
    return ChunkedLinearCrossEntropy.apply(selected, lm_weight, flat_labels[positions], chunk,
                                           torch.is_grad_enabled())


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


def pmp_loss(hidden: torch.Tensor, lm_weight: torch.Tensor | None, score_weight: torch.Tensor | None, batch, *,
             rm_coef: float, lm_coef: float, global_pairs: int, global_lm_tokens: int,
             lm_chunk: int = 4096, backend: str | None = None) -> LossOutput:
    """The PMP loss of one packed micro-batch (see module docstring). `batch` is a torch PackedBatch.

    ``backend``: "torch", "triton" or "auto"; None reads $MEGAPMP_LOSS_BACKEND (see resolve_loss_backend).
    """
    if resolve_loss_backend(hidden.device, backend) == "triton":
        return _fused_pmp_loss(hidden, lm_weight, score_weight, batch, rm_coef=rm_coef, lm_coef=lm_coef,
                               global_pairs=global_pairs, global_lm_tokens=global_lm_tokens)
    zero = hidden.new_zeros((), dtype=torch.float32)
    loss, rm, lm, correct, margin = zero, zero, zero, zero, zero
    num_pairs = len(batch.chosen_index)
    if rm_coef and num_pairs:
        r_chosen, r_rejected = pair_rewards(hidden, score_weight, batch.chosen_index, batch.rejected_index)
        rm = rm_loss_sum(r_chosen, r_rejected) / global_pairs
        loss = loss + rm_coef * rm
        diff = (r_chosen - r_rejected).detach()
        correct, margin = (diff > 0).sum().float(), diff.sum()
    if lm_coef and global_lm_tokens:
        lm = lm_loss_sum(hidden, lm_weight, batch.labels, lm_chunk) / global_lm_tokens
        loss = loss + lm_coef * lm
    return LossOutput(loss, rm.detach(), lm.detach(), correct, margin, num_pairs)


def _fused_pmp_loss(hidden, lm_weight, score_weight, batch, *, rm_coef, lm_coef, global_pairs, global_lm_tokens):
    """pmp_loss through the fused Function: the rows are selected here, their gradients scatter back."""
    from megapmp_kernels.pair_loss import fused_pair_loss

    zero = hidden.new_zeros((), dtype=torch.float32)
    loss, rm, lm, correct, margin = zero, zero, zero, zero, zero
    num_pairs = len(batch.chosen_index)
    use_rm, use_lm = bool(rm_coef and num_pairs), bool(lm_coef and global_lm_tokens)
    if not (use_rm or use_lm):
        return LossOutput(loss, rm, lm, correct, margin, num_pairs)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R*S, H]
    selected = targets = chosen = rejected = None
    if use_lm:
        flat_labels = batch.labels.reshape(-1)
        positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1)  # [T]
        selected, targets = flat[positions], flat_labels[positions]
    if use_rm:
        chosen, rejected = flat[batch.chosen_index], flat[batch.rejected_index]
    sums = fused_pair_loss(selected, lm_weight if use_lm else None, targets, chosen, rejected,
                           score_weight if use_rm else None, ignore_index=IGNORE_INDEX, backend="triton")
    if use_rm:
        rm = sums.rm_sum / global_pairs
        loss = loss + rm_coef * rm
        correct, margin = (sums.margins > 0).sum().float(), sums.margins.sum()
    if use_lm:
        lm = sums.lm_sum / global_lm_tokens
        loss = loss + lm_coef * lm
    return LossOutput(loss, rm.detach(), lm.detach(), correct, margin, num_pairs)
