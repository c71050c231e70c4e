"""Attention over packed rows: who may see whom, and the backends that compute it.

A row of length S holds several attention *segments* (whole sequences or whole preference
pairs) back to back, then padding. Inside a segment, tokens carry a *branch*: 0 for tokens
every later token of the segment may see (the prompt, or all of a plain sequence), 1 for the
chosen response and 2 for the rejected response of the shared-prefix layout ``[P C R]``, where
R must not see C. Query q may attend key k iff

    segment[q] == segment[k] != -1  and  k <= q  and  (branch[k] == 0 or branch[k] == branch[q])

and a padding token (segment -1) attends only to itself, which keeps its softmax finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PAD_SEGMENT = -1
SHARED_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2


@dataclass
class AttentionInputs:
    """Everything an attention backend needs to know about how rows are packed.

    ``segment_ids``: int32 [R, S], the segment of its row each token belongs to, -1 for padding.
    ``branch_ids``: int8 [R, S], 0 shared, 1 chosen response, 2 rejected response.
    ``cu_seqlens``: int32 [n_runs + 1], boundaries of the contiguous runs of equal segment id
    over the flattened R*S tokens (each padding run is a run of its own), for varlen kernels.
    ``max_seqlen``: the longest such run.
    """

    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    # Built once per micro-batch and reused by every layer (and by checkpoint recomputation).
    _mask_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_shapes(self.segment_ids, self.branch_ids)

    @property
    def shape(self) -> torch.Size:
        return self.segment_ids.shape

    @classmethod
    def from_segments(cls, segment_ids, branch_ids=None) -> "AttentionInputs":
        """Build from per-token segment ids ([R, S], -1 = padding) and optional branch ids.

        Every segment must be one contiguous run within its row.
        """
        segment_ids = torch.as_tensor(segment_ids, dtype=torch.int32)
        if branch_ids is None:
            branch_ids = torch.zeros_like(segment_ids, dtype=torch.int8)
        branch_ids = torch.as_tensor(branch_ids, dtype=torch.int8, device=segment_ids.device)
        _check_ids(segment_ids, branch_ids)
        cu_seqlens = _run_boundaries(segment_ids)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(segment_ids, branch_ids, cu_seqlens, max_seqlen)

    @classmethod
    def from_segment_lengths(cls, row_lengths: Sequence[Sequence[int]], seq_len: int) -> "AttentionInputs":
        """Rows of plain causal sequences packed back to back: ``row_lengths[r]`` lists the
        lengths of the sequences in row r; the rest of each row is padding."""
        segment_ids = torch.full((len(row_lengths), seq_len), PAD_SEGMENT, dtype=torch.int32)
        for row, lengths in enumerate(row_lengths):
            if sum(lengths) > seq_len or any(n <= 0 for n in lengths):
                raise ValueError(f"row {row}: lengths {list(lengths)} do not fit {seq_len} tokens")
            start = 0
            for segment, length in enumerate(lengths):
                segment_ids[row, start : start + length] = segment
                start += length
        return cls.from_segments(segment_ids)

    @classmethod
    def for_padded_causal(cls, lengths: Sequence[int], seq_len: int) -> "AttentionInputs":
        """One right-padded causal sequence per row, of length ``lengths[r]``."""
        return cls.from_segment_lengths([[n] for n in lengths], seq_len)

    def to(self, device) -> "AttentionInputs":
        return AttentionInputs(
            self.segment_ids.to(device),
            self.branch_ids.to(device),
            self.cu_seqlens.to(device),
            self.max_seqlen,
        )

    def mask(self, device=None) -> torch.Tensor:
        """Boolean [R, 1, S, S] mask (True = may attend), cached per device."""
        device = torch.device(device) if device is not None else self.segment_ids.device
        if device not in self._mask_cache:
            self._mask_cache[device] = build_mask(self.segment_ids.to(device), self.branch_ids.to(device))
        return self._mask_cache[device]

    def default_position_ids(self) -> torch.Tensor:
        """int64 [R, S]: the number of *other* tokens each token may see.

        That is 0, 1, 2, ... within a plain segment, and in ``[P C R]`` makes R's positions continue
        from the end of P, as if C had never been there. Padding gets 0.
        """
        return (self.mask().squeeze(1).sum(-1) - 1).long()


def _check_shapes(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> None:
    if segment_ids.dim() != 2 or segment_ids.shape != branch_ids.shape:
        raise ValueError(
            f"segment_ids {tuple(segment_ids.shape)} and branch_ids {tuple(branch_ids.shape)} "
            "must both be [R, S]"
        )


def _check_ids(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> None:
    _check_shapes(segment_ids, branch_ids)
    problems = []
    if bool((segment_ids < PAD_SEGMENT).any()):
        problems.append("segment ids below -1")
    if bool(((branch_ids < 0) | (branch_ids > REJECTED_BRANCH)).any()):
        problems.append("branch ids outside {0, 1, 2}")
    seq_len = segment_ids.shape[1]
    run_starts = _run_starts(segment_ids)
    run_segments = segment_ids.reshape(-1)[run_starts]
    run_rows = torch.nonzero(run_starts).squeeze(1) // seq_len
    real = run_segments != PAD_SEGMENT
    row_segment_pairs = run_rows[real] * (int(segment_ids.max()) + 2) + run_segments[real].long()
    if row_segment_pairs.numel() != row_segment_pairs.unique().numel():
        problems.append("a segment is split into several runs within its row")
    if problems:
        raise ValueError("bad packed-row ids: " + "; ".join(problems))


def _run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [R*S]: True where a run of equal segment id begins (every row starts a run)."""
    seq_len = segment_ids.shape[1]
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_len] = True
    return starts


def _run_boundaries(segment_ids: torch.Tensor) -> torch.Tensor:
    starts = torch.nonzero(_run_starts(segment_ids)).squeeze(1)
    end = torch.tensor([segment_ids.numel()], device=segment_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def build_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """The rule of this module as a boolean [R, 1, S, S] mask (query dim before key dim)."""
    seq_len = segment_ids.shape[1]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]  # [R, S, 1], [R, 1, S]
    branch_q, branch_k = branch_ids[:, :, None], branch_ids[:, None, :]
    same_segment = (seg_q == seg_k) & (seg_q != PAD_SEGMENT)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=segment_ids.device).tril()
    visible_branch = (branch_k == SHARED_BRANCH) | (branch_k == branch_q)
    mask = same_segment & causal & visible_branch  # [R, S, S]
    mask |= torch.diag_embed(segment_ids == PAD_SEGMENT)
    return mask[:, None]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the explicit boolean mask; works on any device."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [R, H, S, D]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Expanding k/v keeps every SDPA kernel that takes an arbitrary mask eligible,
        # which `enable_gqa` does not on all torch versions and devices.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask(q.device))  # [R, Hq, S, D]
    return out.transpose(1, 2)


AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionInputs], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs, backend: str = "sdpa"
) -> torch.Tensor:
    """Masked attention over packed rows.

    q: [R, S, Hq, D]; k, v: [R, S, Hkv, D] with Hkv dividing Hq; returns [R, S, Hq, D].
    Scores are scaled by 1/sqrt(D).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(ATTENTION_BACKENDS)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    return ATTENTION_BACKENDS[backend](q, k, v, attn)
