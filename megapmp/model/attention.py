"""Attention over packed rows: who may see whom, and the backends that compute it.

A row of length S holds several attention *segments* (whole sequences, whole preference
pairs, or a group's prompt with its responses) back to back, then padding. Inside a segment, tokens
carry a *branch*: 0 for tokens every later token of the segment may see (the prompt, or all of a
plain sequence), and 1, 2, ... for responses that share that prompt but must not see each other:
the chosen (1) and rejected (2) response of the shared-prefix layout ``[P C R]``, or the responses
R1 .. RK (branches 1 .. K) of a group row ``[P R1 ... RK]``. Query q may attend key k iff

    segment[q] == segment[k] != -1  and  k <= q  and  (branch[k] == 0 or branch[k] == branch[q])

and a padding token (segment -1) attends only to itself, which keeps its softmax finite.

Backends (``ATTENTION_BACKENDS``; all compute that rule, with 1/sqrt(D) scaling):

    sdpa             the reference: one dense [R, 1, S, S] boolean mask; any device, O(R S^2).
    segmented        SDPA per *problem* (below), problems of similar length batched into padded buckets;
                     O(sum of real problem sizes). The fastest CPU path; any device.
    flash_attn       ``flash_attn.flash_attn_varlen_func`` over the problems (CUDA, fp16/bf16).
    flex             ``torch.nn.attention.flex_attention`` with a ``BlockMask`` of the rule itself
                     (``packed_rows_mask_mod``), built once per batch and device; compiled on CUDA (needs
                     triton), any dtype; GQA native; any branch pattern. On CPU eager and forward only.
    torch_varlen     ``torch.nn.attention.varlen.varlen_attn`` over the problems (CUDA, fp16/bf16); kv heads
                     are repeated where varlen_attn has no ``enable_gqa`` (torch 2.11).
    varlen_reference the varlen call site with a torch kernel (``varlen_reference``): tests the index
                     building of the two GPU backends on any device.
    auto             per call, on CUDA: flash_attn, else flex, else torch_varlen, else segmented
                     (``AUTO_CUDA_ORDER`` says why); on CPU: segmented.

A *problem* is one call of a varlen kernel with bottom-right causal alignment: queries Q (length lq)
over keys K (length lk >= lq), query i seeing key j iff j <= i + lk - lq. Each segment of branch pattern
``0^p b1^x1 b2^x2 ... bK^xK`` (nonzero, pairwise distinct branch ids, each response one run; p may be 0,
K may be 0) gives

    A: the queries [P X1] over the keys [P X1]            (lq = lk = p + x1, plain causal)
    B: for each later run Xi, the queries Xi over the keys [P Xi]
                                                          (lq = xi, lk = p + xi: Xi sees all of P, causal in Xi)

so in the shared-prefix layout ``[P C R]`` (K = 2) and in a group row (any K up to MAX_BRANCH) the
prompt is encoded once and attended by every response, and a plain segment is one square problem. The varlen backends make ONE kernel call over all problems
(``VarlenPlan``): every real token is gathered once as a query, the keys of a B problem repeat P, so
``cu_seqlens_q != cu_seqlens_k`` and the kernel's bottom-right alignment does the rest. Padding tokens are no problem: their output is their own
value vector, which is exactly what attending only to itself gives. Segments of any other branch
pattern (shared tokens after a response, a branch id in two runs; never produced by the packers) make
the varlen backends raise; ``segmented`` then uses the
dense reference and ``auto`` uses flex (or segmented where flex is not usable).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

PAD_SEGMENT = -1
FLEX_MASK_IN_COMPILED_REGION = ("the flex block mask of this batch was first asked for inside a torch.compile'd "
                                "region: call attn.flex_block_mask(device) before it, so it is built eagerly")
SHARED_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2
# Branch ids are int8 (one byte per token beside the int32 segment ids; the flex mask reads them per
# (query, key) block): responses 1 .. 127 of one segment. A group with more responses than that is split
# into several segments, each repeating the prompt (megapmp.data.packing.group_pieces).
MAX_BRANCH = 127


@dataclass
class AttentionInputs:
    """Everything an attention backend needs to know about how rows are packed.

    ``segment_ids``: int32 [R, S], the segment of its row each token belongs to, -1 for padding.
    ``branch_ids``: int8 [R, S], 0 shared; 1, 2, ... the responses of a segment (1 chosen and 2 rejected
    in the shared-prefix layout, 1 .. K in a group row), at most MAX_BRANCH.
    ``cu_seqlens``: int32 [n_runs + 1], boundaries of the contiguous runs of equal segment id
    over the flattened R*S tokens (each padding run is a run of its own), for varlen kernels.
    ``max_seqlen``: the longest such run.
    ``host_ids``: optional numpy copies of (segment_ids, branch_ids), which the loader already has: the
    varlen and bucket plans are built from them, so a batch on a GPU is never copied back to the host.
    """

    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    host_ids: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    # Built once per micro-batch and reused by every layer (and by checkpoint recomputation).
    _mask_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _plan_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _block_mask_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        # Checked before the cast to int8, which would wrap an id of 128 or more silently.
        branch_ids = torch.as_tensor(branch_ids, device=segment_ids.device)
        _check_ids(segment_ids, branch_ids)
        branch_ids = branch_ids.to(torch.int8)
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
            host_ids=self.host_ids,
        )

    def mask(self, device=None) -> torch.Tensor:
        """Boolean [R, 1, S, S] mask (True = may attend), cached per device."""
        device = torch.device(device) if device is not None else self.segment_ids.device
        if device not in self._mask_cache:
            self._mask_cache[device] = build_mask(self.segment_ids.to(device), self.branch_ids.to(device))
        return self._mask_cache[device]

    def flex_block_mask(self, device=None) -> "BlockMask":
        """The FlexAttention ``BlockMask`` of this batch, built on ``device`` once and cached per device:
        every layer, and every activation-checkpoint recomputation, reuses it. Built eagerly with no host
        sync; under regional ``torch.compile`` call this (or ``prepare_attention``) before the compiled blocks."""
        device = torch.device(device) if device is not None else self.segment_ids.device
        if device not in self._block_mask_cache:
            if torch.compiler.is_compiling():
                # dynamo would trace create_block_mask into the graph: compiled, it took over 90 s.
                raise RuntimeError(FLEX_MASK_IN_COMPILED_REGION)
            self._block_mask_cache[device] = build_block_mask(self.segment_ids.to(device), self.branch_ids.to(device))
        return self._block_mask_cache[device]

    def varlen_plan(self, device=None) -> "VarlenPlan | None":
        """The problems of this batch as varlen-kernel inputs (see the module docstring), cached per
        device; None if some segment has a branch pattern the varlen decomposition does not cover."""
        return self._cached_plan("varlen", device, lambda: VarlenPlan.build(*self._ids_on_host()))

    def bucket_plan(self, device=None) -> "BucketPlan | None":
        """The problems batched into padded buckets for the ``segmented`` backend, cached per device."""
        return self._cached_plan("buckets", device, lambda: BucketPlan.build(*self._ids_on_host()))

    def _ids_on_host(self):
        return self.host_ids if self.host_ids is not None else (self.segment_ids, self.branch_ids)

    def _cached_plan(self, kind: str, device, build):
        device = torch.device(device) if device is not None else self.segment_ids.device
        if (kind, "cpu") not in self._plan_cache:
            self._plan_cache[(kind, "cpu")] = build()
        key = (kind, str(device))
        if key not in self._plan_cache:
            plan = self._plan_cache[(kind, "cpu")]
            self._plan_cache[key] = None if plan is None else plan.to(device)
        return self._plan_cache[key]

    def default_position_ids(self) -> torch.Tensor:
        """int64 [R, S]: the number of *other* tokens each token may see.

        That is 0, 1, 2, ... within a plain segment, and in ``[P C R]`` makes R's positions continue
        from the end of P, as if C had never been there. Padding gets 0.
        """
        return (self.mask().squeeze(1).sum(-1) - 1).long()


def attention_inputs(batch) -> AttentionInputs:
    """The attention view of a torch PackedBatch (megapmp.data.packing): its packing structure only, with
    the loader's numpy ids for the host-side plans when the batch has them."""
    host = getattr(batch, "host", None)
    host_ids = (host.segment_ids, host.branch_ids) if host is not None else None
    return AttentionInputs(batch.segment_ids, batch.branch_ids, batch.cu_seqlens, batch.max_seqlen, host_ids=host_ids)


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
    if bool(((branch_ids < 0) | (branch_ids > MAX_BRANCH)).any()):
        problems.append(f"branch ids outside [0, {MAX_BRANCH}]")
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


def packed_rows_mask_mod(segment_ids: torch.Tensor, branch_ids: torch.Tensor):
    """The rule of this module as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` over the [R, S]
    ``segment_ids`` / ``branch_ids`` of a batch (on the device the mask is evaluated on).

    Every micro-batch gets a fresh closure, but always from this one module-level function: the
    closures share a code object and differ only in the tensors they read, which a compiled
    flex_attention takes as graph inputs, so a new batch of the same padded shape does not recompile.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        seg_q, seg_k = segment_ids[b, q_idx], segment_ids[b, kv_idx]
        branch_q, branch_k = branch_ids[b, q_idx], branch_ids[b, kv_idx]
        same_segment = (seg_q == seg_k) & (seg_q != PAD_SEGMENT)
        visible_branch = (branch_k == SHARED_BRANCH) | (branch_k == branch_q)
        padding_self = (seg_q == PAD_SEGMENT) & (q_idx == kv_idx)
        return (same_segment & (kv_idx <= q_idx) & visible_branch) | padding_self

    return mask_mod


def build_block_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> "BlockMask":
    """A FlexAttention ``BlockMask`` [R, 1 head, S, S] of ``packed_rows_mask_mod``, on the ids' device.

    Eager ``create_block_mask``: it took 5-9 ms for a 9.7k-token row on an H200 (torch 2.11), while the
    compiled one had not finished after 90 s; it runs once per batch, so a compile cannot pay off.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    rows, seq_len = segment_ids.shape
    return create_block_mask(packed_rows_mask_mod(segment_ids, branch_ids), rows, None, seq_len, seq_len,
                             device=segment_ids.device)


# ---------------------------------------------------------------- problems: the varlen decomposition


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def segment_structure(segment_ids, branch_ids) -> np.ndarray | None:
    """int64 [n_segments, 2 + W]: (flat start, p, x1, ..., xW) of each real segment, whose branch ids read
    ``0^p b1^x1 ... bK^xK`` (nonzero, pairwise distinct b; see the module docstring), the run lengths
    x1 .. xK followed by zeros up to W = max(2, the largest K); None if some segment reads otherwise.
    A plain segment is (start, its length, 0, ...), the shared-prefix ``[P C R]`` (start, p, c, r).

    Accepts numpy arrays or tensors of shape [R, S]; segments are listed in flat order.
    """
    seg = _as_numpy(segment_ids).astype(np.int64, copy=False)
    branch = _as_numpy(branch_ids).astype(np.int64, copy=False).reshape(-1)
    rows, seq_len = seg.shape
    flat = seg.reshape(-1)
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq_len] = True
    bounds = np.append(np.flatnonzero(starts), flat.size)
    out = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if flat[lo] == PAD_SEGMENT:
            continue
        b = branch[lo:hi]
        nonzero = np.flatnonzero(b)
        if nonzero.size == 0:
            out.append((lo, hi - lo))
            continue
        p = int(nonzero[0])
        rest = b[p:]
        run_starts = np.flatnonzero(np.diff(rest)) + 1  # where the branch id changes after P
        run_ids = rest[np.concatenate(([0], run_starts))]
        if (run_ids == SHARED_BRANCH).any() or np.unique(run_ids).size != run_ids.size:
            return None  # shared tokens after a response, or one response in several runs
        runs = np.diff(np.concatenate(([0], run_starts, [rest.size])))
        out.append((lo, p, *runs.tolist()))
    width = max([2] + [len(row) - 2 for row in out])
    table = np.zeros((len(out), 2 + width), dtype=np.int64)
    for i, row in enumerate(out):
        table[i, : len(row)] = row
    return table


def _problems(structure: np.ndarray):
    """Per problem: (query ranges, key ranges) as lists of flat [lo, hi) ranges."""
    problems = []
    for start, p, first, *later in structure.tolist():
        head = start + p + first
        problems.append(([(start, head)], [(start, head)]))  # [P X1] causal, or the plain segment
        for x in later:
            if not x:
                break  # the table's zero padding
            problems.append(([(head, head + x)], [(start, start + p), (head, head + x)]))
            head += x
    return problems


def _ranges_index(ranges) -> np.ndarray:
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges]) if ranges else \
        np.zeros(0, dtype=np.int64)


@dataclass
class VarlenPlan:
    """Inputs of one varlen-kernel call over all problems of a batch of N = R * S tokens.

    ``q_index`` [Tq] / ``k_index`` [Tk]: flat token index of each packed query / key, problem after
    problem; ``cu_q`` / ``cu_k`` int32 [n + 1] their boundaries; ``pad_index`` [N - Tq] the padding
    tokens; ``out_index`` [N]: row of ``cat([kernel output, padding values])`` that is each token's
    output. ``identity``: no padding and no shared-prefix problem, so the gathers can be skipped.
    """

    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pad_index: torch.Tensor
    out_index: torch.Tensor
    identity: bool

    @classmethod
    def build(cls, segment_ids, branch_ids) -> "VarlenPlan | None":
        structure = segment_structure(segment_ids, branch_ids)
        if structure is None:
            return None
        n_tokens = int(np.prod(tuple(segment_ids.shape)))
        problems = _problems(structure)
        q_parts = [_ranges_index(q) for q, _ in problems]
        k_parts = [_ranges_index(k) for _, k in problems]
        lq = np.array([len(x) for x in q_parts], dtype=np.int64)
        lk = np.array([len(x) for x in k_parts], dtype=np.int64)
        q_index = np.concatenate(q_parts) if q_parts else np.zeros(0, np.int64)
        k_index = np.concatenate(k_parts) if k_parts else np.zeros(0, np.int64)
        is_query = np.zeros(n_tokens, dtype=bool)
        is_query[q_index] = True
        pad_index = np.flatnonzero(~is_query)
        out_index = np.empty(n_tokens, dtype=np.int64)
        out_index[q_index] = np.arange(q_index.size)
        out_index[pad_index] = q_index.size + np.arange(pad_index.size)
        identity = pad_index.size == 0 and bool((lq == lk).all()) and np.array_equal(q_index, np.arange(n_tokens))
        cu = lambda n: torch.from_numpy(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))
        return cls(torch.from_numpy(q_index), torch.from_numpy(k_index), cu(lq), cu(lk),
                   int(lq.max(initial=0)), int(lk.max(initial=0)), torch.from_numpy(pad_index),
                   torch.from_numpy(out_index), identity)

    def to(self, device) -> "VarlenPlan":
        move = lambda t: t.to(device, non_blocking=True)
        return VarlenPlan(move(self.q_index), move(self.k_index), move(self.cu_q), move(self.cu_k), self.max_q,
                          self.max_k, move(self.pad_index), move(self.out_index), self.identity)


@dataclass
class Bucket:
    """Problems padded to one shape: ``q_index`` [B, Lq] and ``k_index`` [B, Lk] are flat token indices
    (padding slots point at token 0: their scores are masked off or their outputs dropped, so they add
    exactly zero to any gradient); ``mask`` [B, 1, Lq, Lk] or None for square causal problems."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class BucketPlan:
    """The problems of a batch batched for SDPA. ``out_index`` [N]: row of
    ``cat([bucket outputs flattened to [B * Lq] rows each..., padding values])`` holding each token's output."""

    buckets: list
    pad_index: torch.Tensor
    out_index: torch.Tensor

    # A bucket grows while its padded size stays within SLACK x the real size of its problems.
    SLACK = 1.25

    @classmethod
    def build(cls, segment_ids, branch_ids) -> "BucketPlan | None":
        structure = segment_structure(segment_ids, branch_ids)
        if structure is None:
            return None
        n_tokens = int(np.prod(tuple(segment_ids.shape)))
        problems = [(_ranges_index(q), _ranges_index(k)) for q, k in _problems(structure)]
        square = [pr for pr in problems if len(pr[0]) == len(pr[1])]
        masked = [pr for pr in problems if len(pr[0]) != len(pr[1])]
        buckets, out_index, offset = [], np.empty(n_tokens, dtype=np.int64), 0
        is_query = np.zeros(n_tokens, dtype=bool)
        for group, causal in ((square, True), (masked, False)):
            for members in _greedy_buckets(group):
                bucket, rows_q = _make_bucket(members, causal)
                lq = bucket.q_index.shape[1]
                for b, (q, _) in enumerate(members):
                    out_index[q] = offset + b * lq + np.arange(len(q))
                    is_query[q] = True
                offset += rows_q
                buckets.append(bucket)
        pad_index = np.flatnonzero(~is_query)
        out_index[pad_index] = offset + np.arange(pad_index.size)
        return cls(buckets, torch.from_numpy(pad_index), torch.from_numpy(out_index))

    def to(self, device) -> "BucketPlan":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        buckets = [Bucket(move(b.q_index), move(b.k_index), move(b.mask)) for b in self.buckets]
        return BucketPlan(buckets, move(self.pad_index), move(self.out_index))


def _greedy_buckets(problems):
    """Sort by size and cut into runs whose padded cost (count x max lq x max lk) stays within
    BucketPlan.SLACK x their real cost (sum of lq x lk)."""
    order = sorted(problems, key=lambda pr: (len(pr[1]), len(pr[0])))
    groups, current, real, max_q, max_k = [], [], 0, 0, 0
    for q, k in order:
        mq, mk = max(max_q, len(q)), max(max_k, len(k))
        r = real + len(q) * len(k)
        if current and (len(current) + 1) * mq * mk > BucketPlan.SLACK * r:
            groups.append(current)
            current, real, mq, mk, r = [], 0, len(q), len(k), len(q) * len(k)
        current.append((q, k))
        real, max_q, max_k = r, mq, mk
    if current:
        groups.append(current)
    return groups


def _make_bucket(members, causal: bool) -> tuple[Bucket, int]:
    lq = max(len(q) for q, _ in members)
    lk = max(len(k) for _, k in members)
    q_index = np.zeros((len(members), lq), dtype=np.int64)
    k_index = np.zeros((len(members), lk), dtype=np.int64)
    for b, (q, k) in enumerate(members):
        q_index[b, : len(q)] = q
        k_index[b, : len(k)] = k
    mask = None
    if not causal:
        # Bottom-right causal per problem: query i sees key j iff j <= i + lk_b - lq_b (< lk_b for real
        # queries). Padded query rows get the same formula, which leaves each at least one key.
        shift = torch.tensor([len(k) - len(q) for q, k in members])[:, None, None]
        i = torch.arange(lq)[None, :, None]
        j = torch.arange(lk)[None, None, :]
        mask = (j <= i + shift)[:, None]
    return Bucket(torch.from_numpy(q_index), torch.from_numpy(k_index), mask), len(members) * lq


# ---------------------------------------------------------------- backends


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


def _pad_outputs(v_flat: torch.Tensor, pad_index: torch.Tensor, groups: int) -> torch.Tensor:
    """[n_pad, Hq, D]: a padding token attends only to itself, so its output is its own value vector."""
    out = v_flat.index_select(0, pad_index)
    return out.repeat_interleave(groups, dim=1) if groups > 1 else out


def segmented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
    """SDPA per bucket of problems: cost follows the real segment lengths, not R x S^2."""
    plan = attn.bucket_plan(q.device)
    if plan is None:
        return sdpa_attention(q, k, v, attn)
    rows, seq_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    q_flat, k_flat, v_flat = (t.reshape(rows * seq_len, -1, dim) for t in (q, k, v))  # [N, heads, D]
    outs = []
    for bucket in plan.buckets:
        qb = q_flat[bucket.q_index].transpose(1, 2)  # [B, Hq, Lq, D]
        kb = k_flat[bucket.k_index].transpose(1, 2)  # [B, Hkv, Lk, D]
        vb = v_flat[bucket.k_index].transpose(1, 2)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bucket.mask, is_causal=bucket.mask is None,
                                            enable_gqa=groups > 1)  # [B, Hq, Lq, D]
        outs.append(ob.transpose(1, 2).reshape(-1, heads, dim))
    outs.append(_pad_outputs(v_flat, plan.pad_index, groups).to(outs[0].dtype if outs else v.dtype))
    out = torch.cat(outs).index_select(0, plan.out_index)  # [N, Hq, D]
    return out.view(rows, seq_len, heads, dim)


VarlenKernel = Callable[..., torch.Tensor]


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     causal_bottom_right: bool = True) -> torch.Tensor:
    """What ``flash_attn_varlen_func(..., causal=True)`` computes, in plain torch (slow; for tests).

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; problem i is q[cu_q[i]:cu_q[i+1]] over k[cu_k[i]:cu_k[i+1]];
    causal alignment bottom-right (query i sees key j iff j <= i + lk - lq); query head h uses kv head
    h // (Hq / Hkv); a query row that sees no key outputs zeros, as flash-attn documents.
    """
    groups = q.shape[1] // k.shape[1]
    out = []
    for i in range(cu_q.numel() - 1):
        qi = q[int(cu_q[i]) : int(cu_q[i + 1])].transpose(0, 1)  # [Hq, lq, D]
        ki = k[int(cu_k[i]) : int(cu_k[i + 1])].transpose(0, 1).repeat_interleave(groups, dim=0)  # [Hq, lk, D]
        vi = v[int(cu_k[i]) : int(cu_k[i + 1])].transpose(0, 1).repeat_interleave(groups, dim=0)
        lq, lk = qi.shape[1], ki.shape[1]
        scores = (qi @ ki.transpose(1, 2)) * qi.shape[-1] ** -0.5  # [Hq, lq, lk]
        if causal_bottom_right:
            allowed = torch.arange(lk, device=q.device)[None, :] <= torch.arange(lq, device=q.device)[:, None] + lk - lq
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # all-masked rows -> 0
        out.append((probs @ vi).transpose(0, 1))  # [lq, Hq, D]
    return torch.cat(out) if out else q.new_zeros(q.shape)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype a varlen kernel runs in: the autocast dtype when autocast is on (the q/k after RoPE
    are fp32 there, while SDPA would be cast by autocast itself), else q's."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionInputs,
                     kernel: VarlenKernel) -> torch.Tensor:
    """The GPU call site: gather the problems, call ``kernel(q, k, v, cu_q, cu_k, max_q, max_k)`` (packed
    [T, H, D] tensors, bottom-right causal), scatter back; shared by flash_attn / torch_varlen / tests."""
    plan = attn.varlen_plan(q.device)
    if plan is None:
        raise ValueError("a segment's branch ids are not of the form shared* b1* ... bK* (see megapmp.model.attention); "
                         "the varlen backends cannot express that mask: use attention backend 'sdpa'")
    rows, seq_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    dtype = _compute_dtype(q)
    q_flat, k_flat, v_flat = (t.reshape(rows * seq_len, -1, dim).to(dtype) for t in (q, k, v))  # [N, heads, D]
    if plan.identity:
        out = kernel(q_flat, k_flat, v_flat, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k)
    else:
        out = kernel(q_flat.index_select(0, plan.q_index), k_flat.index_select(0, plan.k_index),
                     v_flat.index_select(0, plan.k_index), plan.cu_q, plan.cu_k, plan.max_q, plan.max_k)
        out = torch.cat([out, _pad_outputs(v_flat, plan.pad_index, groups)]).index_select(0, plan.out_index)
    return out.view(rows, seq_len, heads, dim)


def _reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    return varlen_reference(q, k, v, cu_q, cu_k, causal_bottom_right=True)


def _flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    from flash_attn import flash_attn_varlen_func

    # flash-attn >= 2.1 aligns the causal mask to the bottom-right corner when seqlen_q != seqlen_k
    # (flash_attn_varlen_func docstring: "If causal=True, the causal mask is aligned to the bottom right
    # corner of the attention matrix"), which is exactly what problem B ([R] over [P R]) needs.
    # GQA is native: "head 0, 1, 2 of Q will attention to head 0 of K, V" (our repeat_interleave order).
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=True)


def _torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k):
    from torch.nn.attention.varlen import varlen_attn

    # window_size=(-1, 0) is varlen_attn's documented spelling of causal. It goes to
    # aten._flash_attention_forward, whose causal mask is bottom-right (FA2 semantics; torch's own
    # CausalBias LOWER_RIGHT path relies on it), and the cuDNN varlen path refuses any window
    # instead of silently using another alignment. `torch_varlen_usable` demands that keyword.
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))
    if _takes_keyword(varlen_attn, "enable_gqa"):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), enable_gqa=True)
    # torch 2.11's varlen_attn has no GQA: repeat each kv head for its `groups` query heads, in the order
    # GQA uses (query head h reads kv head h // groups), i.e. repeat_interleave on the head dim.
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@lru_cache(maxsize=None)
def _takes_keyword(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def varlen_reference_attention(q, k, v, attn):
    return varlen_attention(q, k, v, attn, _reference_kernel)


def flash_attn_attention(q, k, v, attn):
    _require("flash_attn", q)
    return varlen_attention(q, k, v, attn, _flash_attn_kernel)


def torch_varlen_attention(q, k, v, attn):
    _require("torch_varlen", q)
    return varlen_attention(q, k, v, attn, _torch_varlen_kernel)


# ---------------------------------------------------------------- flex


FLEX_NO_CPU_BACKWARD = ("FlexAttention has no backward on CPU in this torch; use attention_backend segmented "
                        "(flex on CPU is forward only, e.g. under torch.no_grad())")

_compiled_flex_attention = None


def _compiled_flex():
    """``torch.compile(flex_attention, dynamic=False)``, created on first use (compiling is what makes
    flex fast: eager flex_attention materialises the [R, H, S, S] scores). Static shapes: one compile per
    padded row length, with the block mask's tensors as graph inputs, so new batches of that length reuse it."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        from megapmp.model.compile import allow_shapes

        allow_shapes(64)
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_attention_backend(q, k, v, attn):
    """``flex_attention`` with the batch's cached ``BlockMask``: the rule evaluated directly, so any
    branch pattern works; GQA through ``enable_gqa`` (kv heads are not repeated); scale 1/sqrt(D).

    Inside a compiled region (regional torch.compile of a decoder block) the plain flex_attention is
    called, so dynamo traces it into the enclosing graph; the block mask must then be built before that
    region (``prepare_attention`` or ``attn.flex_block_mask(device)``), else ``flex_block_mask`` raises
    rather than let dynamo trace create_block_mask. On CUDA outside a compiled region: the module's
    compiled flex_attention (each new padded row length is one more compile, up to dynamo's recompile
    limit). On CPU: eager, forward only (``FLEX_NO_CPU_BACKWARD``).
    """
    from torch.nn.attention.flex_attention import flex_attention

    compiling = torch.compiler.is_compiling()
    if not compiling:
        _require("flex", q)
        if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(FLEX_NO_CPU_BACKWARD)
    block_mask = attn.flex_block_mask(q.device)
    dtype = _compute_dtype(q)
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [R, H, S, D]
    options = dict(block_mask=block_mask, scale=q.shape[-1] ** -0.5, enable_gqa=q.shape[1] != k.shape[1])
    if compiling:
        out = flex_attention(q, k, v, **options)
    elif q.device.type == "cuda":
        out = _compiled_flex()(q, k, v, **options)
    else:
        if not torch.is_grad_enabled():
            # torch's CPU flex refuses inputs that merely require grad, even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        with warnings.catch_warnings():
            # Expected on CPU: eager flex is the unfused reference path, used here for forward parity only.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile",
                                    category=UserWarning)
            out = flex_attention(q, k, v, **options)
    return out.transpose(1, 2)  # [R, S, Hq, D]


# ---------------------------------------------------------------- availability and auto


@lru_cache(maxsize=None)
def flash_attn_usable() -> tuple[bool, str]:
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as error:  # an ABI-mismatched build raises OSError/RuntimeError, not only ImportError
        return False, f"flash_attn not importable ({type(error).__name__}: {error})"
    version = getattr(flash_attn, "__version__", "0")
    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if major_minor < (2, 1):
        return False, f"flash_attn {version} < 2.1 aligns causal masks top-left"
    return True, f"flash_attn {version}"


@lru_cache(maxsize=None)
def torch_varlen_usable() -> tuple[bool, str]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as error:
        return False, f"torch.nn.attention.varlen not importable ({type(error).__name__})"
    if not _takes_keyword(varlen_attn, "window_size"):
        return False, f"torch {torch.__version__} varlen_attn lacks window_size"
    if not _takes_keyword(varlen_attn, "enable_gqa"):
        return True, f"torch {torch.__version__} varlen_attn (no enable_gqa: kv heads repeated)"
    return True, f"torch {torch.__version__} varlen_attn"


@lru_cache(maxsize=None)
def flex_usable() -> tuple[bool, str]:
    """Whether the compiled FlexAttention can run on CUDA: it needs torch's flex module and triton."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as error:
        return False, f"torch.nn.attention.flex_attention not importable ({type(error).__name__})"
    try:
        import triton
    except Exception as error:  # a broken triton raises more than ImportError
        return False, f"flex needs triton, not importable ({type(error).__name__})"
    return True, f"torch {torch.__version__} flex_attention, triton {getattr(triton, '__version__', '?')}"


def backend_available(name: str, device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether backend `name` can run on `device` (with compute dtype `dtype`, if given), and why."""
    device = torch.device(device)
    if name in ("sdpa", "segmented", "varlen_reference", "auto"):
        return True, "pure torch"
    if name == "flex":
        if device.type == "cpu":
            return True, "flex on CPU: eager, forward only (no backward on CPU in this torch)"
        if device.type != "cuda":
            return False, f"flex needs a CUDA device (or CPU, forward only), not {device.type}"
        return flex_usable()
    if name not in ("flash_attn", "torch_varlen"):
        return False, f"unknown attention backend {name!r}"
    if device.type != "cuda":
        return False, f"{name} needs a CUDA device, not {device.type}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return False, f"{name} needs fp16/bf16, not {dtype}"
    return flash_attn_usable() if name == "flash_attn" else torch_varlen_usable()


def _require(name: str, q: torch.Tensor) -> None:
    ok, reason = backend_available(name, q.device, _compute_dtype(q))
    if not ok:
        raise RuntimeError(f"attention backend {name!r} is not usable here: {reason}")


# What ``auto`` tries on CUDA, best first. One layer's attention for a 9.7k-token packed row (12 query /
# 2 kv heads, head dim 128, bf16, fwd + bwd, H200, torch 2.11): compiled flex 1.05 ms; torch varlen_attn
# (kv heads repeated) 0.92 ms for the kernel alone but 1.40 ms through ``varlen_attention``'s gathers and
# scatters; segmented 3.17 ms. flash_attn's varlen kernel does no more work than varlen_attn's and has
# native GQA, so it stays first where installed; segmented, which runs anywhere, is last.
AUTO_CUDA_ORDER = ("flash_attn", "flex", "torch_varlen")
VARLEN_BACKENDS = ("flash_attn", "torch_varlen")


def resolve_attention_backend(name: str, device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend ``name`` stands for: ``auto`` becomes the first usable of ``AUTO_CUDA_ORDER``
    on CUDA, else segmented (on CPU too: flex has no CPU backward and its eager CPU path is dense);
    any other name is returned as is."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        for candidate in AUTO_CUDA_ORDER:
            if backend_available(candidate, device, dtype)[0]:
                return candidate
    return "segmented"


def backend_for_batch(name: str, attn: AttentionInputs, device, dtype: torch.dtype | None = None) -> str:
    """The backend that will compute ``attn`` on ``device``: ``auto`` resolved, then, if that is a varlen
    backend and some segment's branch pattern has no varlen decomposition, flex (which evaluates the rule
    itself) where usable, else segmented (which falls back to the dense mask)."""
    name = resolve_attention_backend(name, device, dtype)
    if name in VARLEN_BACKENDS and attn.varlen_plan(device) is None:
        name = "flex" if backend_available("flex", device)[0] else "segmented"
    return name


def prepare_attention(attn: AttentionInputs, backend: str, device, dtype: torch.dtype | None = None) -> str:
    """Build, eagerly and once, what ``backend`` will read from ``attn`` on ``device`` (block mask, varlen or
    bucket plan, dense mask), and return the concrete backend. Call it before a torch.compile'd region:
    inside one, these host-side builds would be traced (flex refuses: ``FLEX_MASK_IN_COMPILED_REGION``)."""
    name = backend_for_batch(backend, attn, device, dtype) if backend == "auto" else backend
    if name == "flex":
        attn.flex_block_mask(device)
    elif name in (*VARLEN_BACKENDS, "varlen_reference"):
        attn.varlen_plan(device)
    elif name == "sdpa" or (name == "segmented" and attn.bucket_plan(device) is None):
        attn.mask(device)  # segmented's fallback for branch patterns it has no buckets for
    return name


def auto_attention(q, k, v, attn):
    name = backend_for_batch("auto", attn, q.device, _compute_dtype(q))
    return ATTENTION_BACKENDS[name](q, k, v, attn)


AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionInputs], torch.Tensor]

ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": sdpa_attention,
    "segmented": segmented_attention,
    "flash_attn": flash_attn_attention,
    "torch_varlen": torch_varlen_attention,
    "flex": flex_attention_backend,
    "varlen_reference": varlen_reference_attention,
    "auto": auto_attention,
}


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
