"""Batch-invariant scoring: a sequence's reward computed from its own tokens alone, bit for bit.

Packed scoring (``megapmp.loss.score_pairs``) gives the same rewards for any batching only up to
floating-point rounding. Measured on the CPU machines (torch 2.13, MKL, AVX2; fp32), two things make a
text's bits depend on its neighbours:

1. GEMMs. A row of ``X @ W.T`` rounds differently when X has 1-3 rows than when it has more (MKL takes a
   GEMV or small-M kernel there), and on other BLAS builds and on GPUs the kernel, its blocking and its
   split-K choice follow the number of rows. A batch of one and a batch of 64 run different kernels.
2. Attention problem shapes. The CPU SDPA kernel picks its query/key block sizes from the sequence
   length, so the rows of a causal problem of length L are not the bits of the same prefix computed as a
   problem of length L' != L. Whatever changes the problem a token's attention is computed in changes its
   bits: the row length of the dense mask, the padded bucket of the ``segmented`` backend, and, in the
   shared-prefix layout ``[P R1 R2]``, the sibling R1 (P's states are computed in the problem [P R1]).

The batch-invariant forward removes both causes:

* every sequence (prompt + response, EOS included) is ONE plain causal attention problem of exactly its
  own length, never shared with another sequence: on the CPU the ``segmented`` backend with every
  sequence in an SDPA bucket of its own (:class:`PerSequenceAttentionInputs`: one SDPA call of shape
  [1, heads, L, D] per sequence); on CUDA the training backend: FlexAttention, with every sequence starting
  on a 128-token block boundary (:data:`FLEX_ALIGN`), so the block-sparse kernel visits the same tiles of
  a sequence in the same order whatever sits beside it, or a varlen kernel where flash-attn is installed
  (one problem per sequence); neither verified here (no GPU on the CPU machines);
* every ``F.linear`` runs on fixed tiles of ``tile_tokens`` rows (the last tile zero-padded), so every
  GEMM call has one shape, [tile_tokens, in] x [in, out], whatever the batch; the measured GEMMs round a
  row the same wherever it sits in such a tile. The tile is part of the recipe: another tile size is
  batch-invariant too but may round otherwise (measured: 64 and 128 gave the same bits, 37 did not);
* everything else in the model is element-wise or a reduction along the hidden dimension of one token
  (RMSNorm, RoPE, SiLU, the embedding gather), which does not look at other tokens (measured too).

So scoring alone, in a batch of any size or order, in rows or flat packing, gives the same bits; the
tests in tests/test_scoring_consistency.py check that and fail on a batch-dependent variant. The price:
no shared-prefix layout (the prompt is encoded once per response) and GEMMs on tiles rather than one
large matrix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from megapmp.data.packing import first_fit
from megapmp.model.attention import AttentionInputs, Bucket, BucketPlan, resolve_attention_backend

PACKINGS = ("rows", "flat")
DEFAULT_TILE_TOKENS = 128
FLEX_ALIGN = 128  # FlexAttention's block size: a sequence starting on a block boundary owns its tiles


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 tile_tokens: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed tile by tile: rows of x (all leading dims flattened) in
    blocks of exactly ``tile_tokens``, the last one padded with zero rows."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    pad = -n % tile_tokens
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([F.linear(rows[i : i + tile_tokens], weight, bias) for i in range(0, n + pad, tile_tokens)])
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


class TiledLinear(TorchFunctionMode):
    """Within this mode every ``F.linear`` (so every ``nn.Linear``) is a :func:`tiled_linear`."""

    def __init__(self, tile_tokens: int = DEFAULT_TILE_TOKENS):
        super().__init__()
        if tile_tokens < 1:
            raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
        self.tile_tokens = tile_tokens

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # the mode is off inside this handler, so the inner F.linear calls are plain
            return tiled_linear(*args, **kwargs, tile_tokens=self.tile_tokens)
        return func(*args, **kwargs)


def invariant_attention_backend(device: torch.device, dtype: torch.dtype | None) -> str:
    """The training backend where it can keep sequences apart: on CUDA what ``auto`` picks (flash_attn,
    flex with block-aligned sequences, or torch_varlen), else ``segmented`` over
    :class:`PerSequenceAttentionInputs` (one SDPA call per sequence)."""
    name = resolve_attention_backend("auto", device, dtype)
    return name if name in ("flash_attn", "flex", "torch_varlen") else "segmented"


class PerSequenceAttentionInputs(AttentionInputs):
    """Plain causal sequences whose ``segmented`` attention puts every sequence in a bucket of its own.

    The default bucket plan batches problems of similar length into one padded SDPA call, whose shape
    (and so the bits of every row) depends on the neighbours; here each sequence's SDPA call has the
    shape [1, heads, its length, D] whatever else is in the batch.
    """

    def __init__(self, segment_ids, branch_ids, cu_seqlens, max_seqlen, starts: torch.Tensor,
                 lengths: torch.Tensor):
        super().__init__(segment_ids, branch_ids, cu_seqlens, max_seqlen)
        self.starts, self.lengths = starts, lengths  # flat start and length of each sequence

    @classmethod
    def build(cls, row_slots: list[list[tuple[int, int]]], seq_len: int) -> "PerSequenceAttentionInputs":
        """``row_slots[r]``: (length, room) of each sequence of row r, back to back; a sequence fills the
        first ``length`` tokens of its ``room``, the rest of the room and of the row is padding."""
        segment_ids = torch.full((len(row_slots), seq_len), -1, dtype=torch.int32)
        starts, lengths = [], []
        for r, row in enumerate(row_slots):
            col = 0
            for segment, (n, room) in enumerate(row):
                segment_ids[r, col : col + n] = segment
                starts.append(r * seq_len + col)
                lengths.append(n)
                col += room
        base = AttentionInputs.from_segments(segment_ids)
        return cls(base.segment_ids, base.branch_ids, base.cu_seqlens, base.max_seqlen,
                   torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64))

    def to(self, device) -> "PerSequenceAttentionInputs":
        return PerSequenceAttentionInputs(self.segment_ids.to(device), self.branch_ids.to(device),
                                          self.cu_seqlens.to(device), self.max_seqlen, self.starts, self.lengths)

    def bucket_plan(self, device=None) -> BucketPlan:
        return self._cached_plan("per-sequence buckets", device, self._singleton_buckets)

    def _singleton_buckets(self) -> BucketPlan:
        n_tokens = self.segment_ids.numel()
        buckets, out_index = [], torch.empty(n_tokens, dtype=torch.int64)
        is_query = torch.zeros(n_tokens, dtype=torch.bool)
        offset = 0
        for start, length in zip(self.starts.tolist(), self.lengths.tolist()):
            index = torch.arange(start, start + length)
            buckets.append(Bucket(index[None], index[None], None))  # mask None: square causal
            out_index[index] = offset + torch.arange(length)
            is_query[index] = True
            offset += length
        pad_index = torch.nonzero(~is_query).squeeze(1)
        out_index[pad_index] = offset + torch.arange(pad_index.numel())
        return BucketPlan(buckets, pad_index, out_index)


@contextmanager
def attention_backend(model: torch.nn.Module, name: str):
    """Run ``model`` (a Qwen2RewardModel) with attention backend ``name`` inside the block (a no-op where it
    already uses it; not for a model that other threads run with another backend meanwhile)."""
    previous = model.attention_backend
    if previous == name:
        yield
        return
    model.set_attention_backend(name)
    try:
        yield
    finally:
        model.set_attention_backend(previous)


def pack_sequences(sequences: Sequence[Sequence[int]], packing: str, pad_id: int, *, row_multiple: int = 64,
                   align: int = 1, pow2_rows: bool = False):
    """(input_ids [R, S], position_ids [R, S], AttentionInputs, readout flat indices [N]) of plain causal
    sequences. ``flat``: all in one row, back to back; ``rows``: first-fit, longest first, into rows as long
    as the longest sequence (rounded up to ``row_multiple``). With ``align`` > 1 every sequence starts on a
    multiple of ``align`` tokens (the gap is padding); ``pow2_rows`` pads the row length up to a power of
    two (at least 1024), so a kernel compiled per row length (FlexAttention) meets a handful of lengths in
    a server's lifetime, not one per batch. The reward is read at each sequence's last token."""
    if packing not in PACKINGS:
        raise ValueError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if (lengths == 0).any():
        raise ValueError(f"sequence {int(np.flatnonzero(lengths == 0)[0])} is empty")
    slots = -(-lengths // align) * align  # room each sequence takes in a row
    row_multiple = math.lcm(row_multiple, align)
    if packing == "flat":
        seq_len = -(-int(slots.sum()) // row_multiple) * row_multiple
        if pow2_rows:
            seq_len = max(1024, 1 << (seq_len - 1).bit_length())
        rows = [list(range(len(sequences)))]
    else:
        seq_len = -(-int(slots.max()) // row_multiple) * row_multiple
        if pow2_rows:
            seq_len = max(1024, 1 << (seq_len - 1).bit_length())
        order = np.argsort(-lengths, kind="stable")
        rows = [[int(order[i]) for i in members] for members in first_fit(slots[order], seq_len)]
    input_ids = np.full((len(rows), seq_len), pad_id, np.int64)
    position_ids = np.zeros((len(rows), seq_len), np.int64)
    readout = np.empty(len(sequences), np.int64)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = int(lengths[i])
            input_ids[r, col : col + n] = sequences[i]
            position_ids[r, col : col + n] = np.arange(n)
            readout[i] = r * seq_len + col + n - 1
            col += int(slots[i])
    attn = PerSequenceAttentionInputs.build([[(int(lengths[i]), int(slots[i])) for i in m] for m in rows], seq_len)
    return torch.from_numpy(input_ids), torch.from_numpy(position_ids), attn, torch.from_numpy(readout)


@torch.no_grad()
def score_sequences(model, sequences: Sequence[Sequence[int]], *, pad_id: int, device, autocast_dtype=None,
                    tile_tokens: int | None = DEFAULT_TILE_TOKENS, packing: str = "flat",
                    attention: str | None = None, per_sequence: bool = True, head=None) -> np.ndarray:
    """float64 reward at the last token of each id sequence, batch-invariant (module docstring): the same
    bits for a sequence whatever else is in ``sequences``, in which order, and in either packing.

    ``head`` replaces the reward head: a function of the last tokens' hidden states [N, H] returning [N] or
    [N, K] (a pairwise judge's label logits); it runs inside the fixed GEMM tiles too.

    ``tile_tokens=None`` (one GEMM over the whole batch) or an ``attention`` backend that batches
    sequences together ("sdpa": one dense mask per row; ``per_sequence=False``: "segmented" with its
    default length buckets) give up the invariance: for comparisons only."""
    if len(sequences) == 0:
        return np.empty(0)
    device = torch.device(device)
    if attention is None:
        attention = invariant_attention_backend(device, autocast_dtype or next(model.parameters()).dtype)
    input_ids, position_ids, attn, readout = pack_sequences(sequences, packing, pad_id,
                                                            align=FLEX_ALIGN if attention == "flex" else 1,
                                                            pow2_rows=attention == "flex")
    if not per_sequence:
        attn = AttentionInputs(attn.segment_ids, attn.branch_ids, attn.cu_seqlens, attn.max_seqlen)
    input_ids, position_ids, readout = input_ids.to(device), position_ids.to(device), readout.to(device)
    tiles = TiledLinear(tile_tokens) if tile_tokens else nullcontext()
    with attention_backend(model, attention), tiles, \
            torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden = model(input_ids, position_ids, attn.to(device))  # [R, S, H]
        rewards = (head or model.rewards)(hidden.reshape(-1, hidden.shape[-1])[readout])  # fp32 [N] (or [N, K])
    return rewards.double().cpu().numpy()
