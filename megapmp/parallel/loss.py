"""The PMP loss of a tensor-(and sequence-)parallel model; same value and LossOutput as megapmp.loss.pmp_loss.

LM term: this rank's vocab slice of the LM head gives local logits [T_chunk, V/T] and the vocab-parallel
CE combines them; the hidden states of the target positions enter that TP region through
``copy_to_tp`` (or, under SP, through the all-gather of the token shards, whose backward
reduce-scatters the per-rank partial gradients -- Megatron's SP LM head).

RM term: the score head is replicated. Without SP every rank holds the full hidden states and computes
the same rewards. Under SP, rather than all-gathering [R*S, H] for 2N rows, each rank reads the reward
at the flat indices that fall in its token shard, zeros elsewhere, and one all-reduce of the [2N]
rewards (``reduce_from_tp``: backward identity) completes them; the score weight's gradient is then
partial per rank, which ``allreduce_tp_replicated_grads`` sums. With lm_coef = 0 (RM finetuning) no
[R*S, H] collective happens at all.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from megapmp.data.packing import IGNORE_INDEX
from megapmp.loss import LossOutput, fp32_rewards, pair_rewards, resolve_loss_backend, rm_loss_sum
from megapmp.parallel.collectives import copy_to_tp, gather_from_sequence, group_rank, reduce_from_tp
from megapmp.parallel.tensor_parallel import vocab_parallel_ce_sum


def sequence_parallel_pair_rewards(hidden_shard: torch.Tensor, score_weight: torch.Tensor, chosen_index,
                                   rejected_index, group):
    """fp32 rewards [N], [N] from an SP token shard [R*S/T, H] (flat indices into R*S), replicated."""
    tokens = hidden_shard.shape[0]
    start = group_rank(group) * tokens
    index = torch.cat([chosen_index, rejected_index])  # [2N]
    owned = (index >= start) & (index < start + tokens)
    local = (index - start).clamp(0, tokens - 1)
    rewards = fp32_rewards(hidden_shard[local], score_weight)  # [2N], valid where owned
    rewards = reduce_from_tp(torch.where(owned, rewards, torch.zeros_like(rewards)), group)
    return rewards[: len(chosen_index)], rewards[len(chosen_index):]


def vocab_parallel_lm_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, group, *,
                               sequence_parallel: bool = False, chunk: int = 4096,
                               backend: str | None = None) -> torch.Tensor:
    """Summed next-token CE over labelled positions (as megapmp.loss.lm_loss_sum), vocab-parallel.

    hidden: [R, S, H] replicated over TP, or under SP this rank's token shard [R*S/T, H];
    lm_weight: this rank's vocab rows [V/T, H]; labels: [R, S], identical on every TP rank.
    backend: see megapmp.loss.resolve_loss_backend; "triton" runs the fused kernel on the local vocab
    shard (local log-sum-exp, then the TP all-reduce in megapmp_kernels.pair_loss.combine_partials).
    """
    width = lm_weight.shape[-1]
    if sequence_parallel:
        flat = gather_from_sequence(hidden, group)  # [R*S, H]; backward reduce-scatters partial grads
    else:
        flat = hidden.reshape(-1, width)
    flat_labels = labels.reshape(-1)
    positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1)  # [T]
    selected, targets = flat[positions], flat_labels[positions]  # [T, H], [T]
    if not sequence_parallel:
        selected = copy_to_tp(selected, group)  # after the selection: backward all-reduces [T, H] only
    if resolve_loss_backend(hidden.device, backend) == "triton":
        from megapmp_kernels.pair_loss import fused_pair_loss

        vocab_start = group_rank(group) * lm_weight.shape[0]
        return fused_pair_loss(selected, lm_weight, targets, vocab_start=vocab_start, group=group,
                               ignore_index=IGNORE_INDEX, backend="triton").lm_sum  # dH partial: summed above
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(positions), chunk):
        h, t = selected[start: start + chunk], targets[start: start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_ce, h, lm_weight, t, group, use_reentrant=False)
    return total


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    local_logits = (h @ weight.t()).float()  # [chunk, V/T]
    return vocab_parallel_ce_sum(local_logits, targets, group)


def parallel_pmp_loss(hidden: torch.Tensor, model, batch, ctx, *, rm_coef: float, lm_coef: float,
                      global_pairs: int, global_lm_tokens: int, lm_chunk: int = 4096,
                      backend: str | None = None) -> LossOutput:
    """``megapmp.loss.pmp_loss`` for a model passed through ``parallelize_model``.

    hidden: the model's output ([R, S, H], or under SP this rank's shard [R*S/T, H]); ``batch`` is the
    torch PackedBatch every rank of the TP group was given. The loss is identical on all TP ranks.
    """
    group = ctx.tp_group
    sequence_parallel = getattr(model, "tp_sequence_parallel", False)
    if sequence_parallel and hidden.shape[0] * ctx.tp_size != batch.input_ids.numel():
        raise ValueError(f"sequence-parallel hidden {tuple(hidden.shape)} x tp={ctx.tp_size} does not cover "
                         f"the batch's {tuple(batch.input_ids.shape)} tokens")
    zero = hidden.new_zeros((), dtype=torch.float32)
    loss, rm, lm, correct, margin = zero, zero, zero, zero, zero
    num_pairs = len(batch.chosen_index)
    if rm_coef and num_pairs:
        if sequence_parallel:
            r_chosen, r_rejected = sequence_parallel_pair_rewards(
                hidden, model.score.weight, batch.chosen_index, batch.rejected_index, group)
        else:
            r_chosen, r_rejected = pair_rewards(hidden, model.score.weight, batch.chosen_index, batch.rejected_index)
        rm = rm_loss_sum(r_chosen, r_rejected) / global_pairs
        loss = loss + rm_coef * rm
        diff = (r_chosen - r_rejected).detach()
        correct, margin = (diff > 0).sum().float(), diff.sum()
    if lm_coef and global_lm_tokens:
        lm = vocab_parallel_lm_loss_sum(hidden, model.lm_head.weight, batch.labels, group,
                                        sequence_parallel=sequence_parallel, chunk=lm_chunk,
                                        backend=backend) / global_lm_tokens
        loss = loss + lm_coef * lm
    return LossOutput(loss, rm.detach(), lm.detach(), correct, margin, num_pairs)
