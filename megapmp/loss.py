"""The CodePMP objective on packed rows.

    L = rm_coef * sum_pairs -log sigmoid(r_chosen - r_rejected) / global_pairs
      + lm_coef * sum_chosen_tokens CE(logits, next token) / global_lm_tokens

Both sums run over this micro-batch; the denominators are the counts of the whole optimizer step on
all data-parallel ranks, so summing micro-batch losses (and all-reducing gradients) gives the same
value for any micro-batch split or parallel layout.

Only the hidden states of LM-target positions ever meet the vocabulary, in chunks of `lm_chunk`
tokens: the [tokens x vocab] logits of the whole batch are never materialised (the seed implementation
keeps bf16 and fp32 copies of them for every row position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from megapmp.data.packing import IGNORE_INDEX


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar with grad: this micro-batch's share of the step loss
    rm_loss: torch.Tensor  # detached shares of the two terms, before their coefficients
    lm_loss: torch.Tensor
    correct: torch.Tensor  # detached count of pairs with r_chosen > r_rejected (ties count wrong)
    margin_sum: torch.Tensor  # detached sum of r_chosen - r_rejected
    num_pairs: int


def pair_rewards(hidden: torch.Tensor, score_weight: torch.Tensor, chosen_index, rejected_index):
    """Rewards at the read-out tokens, computed in fp32. hidden: [R, S, H]; indices flat into R * S."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R*S, H]
    weight = score_weight.float().reshape(-1)  # [H]
    return flat[chosen_index].float() @ weight, flat[rejected_index].float() @ weight  # [N], [N]


def rm_loss_sum(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).sum()


def lm_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Summed next-token CE over positions whose label is not IGNORE_INDEX, logits in fp32, in chunks.

    Each chunk's logits are recomputed in backward (checkpointed), so peak extra memory is one chunk of
    [chunk x vocab] fp32 logits, however many target tokens the batch holds.
    """
    flat_labels = labels.reshape(-1)
    positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(-1)  # [T]
    selected = hidden.reshape(-1, hidden.shape[-1])[positions]  # [T, H]
    targets = flat_labels[positions]  # [T]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(positions), chunk):
        h, t = selected[start : start + chunk], targets[start : start + chunk]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_ce, h, lm_weight, t, use_reentrant=False)
    return total


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()  # [chunk, V]
    return F.cross_entropy(logits, targets, reduction="sum")


def pmp_loss(hidden: torch.Tensor, lm_weight: torch.Tensor | None, score_weight: torch.Tensor | None, batch, *,
             rm_coef: float, lm_coef: float, global_pairs: int, global_lm_tokens: int,
             lm_chunk: int = 4096) -> LossOutput:
    """The PMP loss of one packed micro-batch (see module docstring). `batch` is a torch PackedBatch."""
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
