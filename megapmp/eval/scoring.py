"""Scoring pairs with a reward model, in packed rows, without gradients."""

from __future__ import annotations

import numpy as np
import torch

from megapmp.data.packing import pack_pairs
from megapmp.loss import pair_rewards
from megapmp.model.attention import attention_inputs


@torch.no_grad()
def score_pairs(model, pairs, *, seq_len: int, layout: str, pad_id: int, device, pairs_per_batch: int = 64,
                autocast_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) float64 arrays for a list of Pair objects, in order."""
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


def pairwise_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """Fraction of pairs with r_chosen > r_rejected; ties count as wrong (as in the paper)."""
    return float((r_chosen > r_rejected).mean()) if len(r_chosen) else float("nan")
