"""Packing whole pairs, response groups (or document pieces) into fixed-length rows with explicit
attention structure.

Two pair layouts and the group layout:

    duplicated     [P C][P R]  two causal segments per pair; the prompt is encoded twice.
    shared-prefix  [P C R]     one segment; R attends to P and R only (branch ids keep it off C) and
                               R's positions continue from the end of P, so every token sees exactly
                               the context it has in the duplicated layout, and P is encoded once.
    group          [P R1 .. RK]  one segment per group (megapmp.data.groups): response i has branch id i,
                               sees P and itself only, its positions continue from P, and its reward is
                               read at its last token; every labelled pair (i better than j) of the group
                               is one (chosen_index, rejected_index) entry. A group longer than a row (or
                               with more than MAX_BRANCH responses) is split into several segments, each
                               repeating P (``group_pieces``); the pieces stay in the same micro-batch.
                               Shared-prefix is the group layout of one pair.

Conventions (the model and the loss rely on them):
- `lm_index[t]` / `lm_targets[t]` list the LM term's (position, next token) pairs: chosen-response
  tokens only, the first one predicted from the prompt's last token. In the group layout a prompt's last
  position predicts the first token of every chosen response of its segment, and the "pairs" weighting
  repeats a response's targets once per pair it wins, so a position can appear several times there.
  `labels[r, t]` is the per-position view (IGNORE_INDEX where no target): exact for pairs and documents;
  in the group layout it holds one of a prompt end's targets, and lm_index / lm_targets are what counts.
- `chosen_index` / `rejected_index` are flat indices into the [rows * seq_len] tokens of the last token
  of each response (its EOS under the default EOS policy): the reward is read there. `response_index`
  (group layout) lists every response's read-out token, group after group.
- `segment_ids` is -1 on padding; `cu_seqlens` covers every token of the flattened rows, each padding
  run being a segment of its own, so varlen kernels can take it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from megapmp.data.groups import Group, lm_weights

IGNORE_INDEX = -100
PAIR_LAYOUTS = ("duplicated", "shared-prefix")
LAYOUTS = (*PAIR_LAYOUTS, "group")
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids
MAX_BRANCH = 127  # responses per segment: branch ids are int8 (megapmp.model.attention.MAX_BRANCH)


@dataclass
class PackedBatch:
    """One micro-batch of packed rows. Arrays are numpy here; `to_torch()` converts them."""

    input_ids: np.ndarray  # [R, S] int64
    position_ids: np.ndarray  # [R, S] int64
    segment_ids: np.ndarray  # [R, S] int32, -1 on padding
    branch_ids: np.ndarray  # [R, S] int8: 0 shared/plain; 1 chosen, 2 rejected (shared-prefix); 1..K (group)
    labels: np.ndarray  # [R, S] int64, IGNORE_INDEX where no LM loss
    chosen_index: np.ndarray  # [N] int64 flat index of each chosen response's last token
    rejected_index: np.ndarray  # [N] int64 flat index of each rejected response's last token
    cu_seqlens: np.ndarray  # [K + 1] int32 segment boundaries over the flattened R * S tokens
    max_seqlen: int
    layout: str
    lm_index: np.ndarray | None = None  # [T] int64 flat index of each LM-target position (labels != IGNORE_INDEX)
    lm_targets: np.ndarray | None = None  # [T] int64 the token each lm_index position predicts
    response_index: np.ndarray | None = None  # [M] int64 flat index of each response's read-out (group layout)
    # The numpy batch a torch batch was made from (None on a numpy batch): counts, FLOPs and attention plans
    # read it on the host, so nothing on the training hot path waits for the GPU to answer a question.
    host: "PackedBatch | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.labels, np.ndarray):
            flat_labels = self.labels.reshape(-1)
            if self.lm_index is None:
                self.lm_index = np.flatnonzero(flat_labels != IGNORE_INDEX).astype(np.int64)
            if self.lm_targets is None:
                self.lm_targets = flat_labels[self.lm_index]

    @property
    def on_host(self) -> "PackedBatch":
        """The numpy form of this batch (itself when it is numpy)."""
        return self.host if self.host is not None else self

    @property
    def num_pairs(self) -> int:
        return len(self.chosen_index)

    @property
    def num_lm_tokens(self) -> int:
        return len(self.on_host.lm_index)

    @property
    def num_real_tokens(self) -> int:
        return int((self.on_host.segment_ids >= 0).sum())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to_torch(self, device=None, *, pin_memory: bool = False, non_blocking: bool = False) -> "PackedBatch":
        """The same batch as torch tensors on ``device``, keeping the numpy batch as ``host``.

        Works on a numpy batch and on a torch one (then it only moves the tensors). ``pin_memory`` puts the
        CPU tensors in page-locked memory, from which ``non_blocking`` copies to a GPU do not stall the host
        (the background loader pins, the trainer copies).
        """
        import torch

        converted = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "host":
                continue
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                if pin_memory:
                    value = value.pin_memory()
            if isinstance(value, torch.Tensor) and device is not None:
                value = value.to(device, non_blocking=non_blocking)
            converted[f.name] = value
        return PackedBatch(**converted, host=self.on_host)


def pair_packed_length(prompt_len, chosen_len, rejected_len, layout: str):
    """Tokens a pair occupies in a row (works elementwise on arrays); the group layout packs a pair that fits
    one row as shared-prefix does (the loader's group packing may split one that does not:
    pair_group_packed_length)."""
    if layout == "duplicated":
        return 2 * prompt_len + chosen_len + rejected_len
    if layout in ("shared-prefix", "group"):
        return prompt_len + chosen_len + rejected_len
    raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")


def group_pieces(prompt_len: int, response_lengths, seq_len: int) -> list[list[int]]:
    """The segments a group is packed as: lists of response indices, each segment [P R_a R_b ...] at most
    ``seq_len`` tokens and MAX_BRANCH responses. One segment when the group fits a row; else each response
    goes to the first segment with room for it, in order (first-fit), P repeated in every segment."""
    lengths = [int(n) for n in response_lengths]
    if prompt_len + sum(lengths) <= seq_len and len(lengths) <= MAX_BRANCH:
        return [list(range(len(lengths)))]
    pieces: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if prompt_len + n > seq_len:
            raise ValueError(f"response {i} of a group needs {prompt_len + n} tokens with its prompt, more than a "
                             f"row of {seq_len}: raise seq_len or preprocess with a smaller --max-length")
        for k, free in enumerate(room):
            if n <= free and len(pieces[k]) < MAX_BRANCH:
                pieces[k].append(i)
                room[k] -= n
                break
        else:
            pieces.append([i])
            room.append(seq_len - prompt_len - n)
    return pieces


def group_packed_length(prompt_len: int, response_lengths, seq_len: int) -> int:
    """Tokens a group occupies in rows of ``seq_len``: its responses plus one prompt per segment."""
    pieces = group_pieces(prompt_len, response_lengths, seq_len)
    return len(pieces) * int(prompt_len) + int(sum(int(n) for n in response_lengths))


def pair_group_packed_length(prompt_len, chosen_len, rejected_len, seq_len: int):
    """group_packed_length of a pair, a group of two responses (elementwise on arrays): [P C R] when it fits a
    row of ``seq_len``, else the two segments [P C][P R], the prompt twice."""
    whole = prompt_len + chosen_len + rejected_len
    return np.where(whole <= seq_len, whole, whole + prompt_len)


def first_fit(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Assign items to rows, each to the first row with room, in the given order (deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        if n > seq_len:
            raise ValueError(f"item {i} needs {n} tokens, more than a row of {seq_len}: raise seq_len or "
                             f"preprocess with a smaller --max-length")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


class _RowBuilder:
    """Fills rows left to right and records segments; shared by both pair layouts and documents."""

    def __init__(self, num_rows: int, seq_len: int, pad_id: int):
        shape = (num_rows, seq_len)
        self.seq_len = seq_len
        self.input_ids = np.full(shape, pad_id, np.int64)
        self.position_ids = np.zeros(shape, np.int64)
        self.segment_ids = np.full(shape, -1, np.int32)
        self.branch_ids = np.zeros(shape, np.int8)
        self.labels = np.full(shape, IGNORE_INDEX, np.int64)
        self.segment_lengths: list[list[int]] = [[] for _ in range(num_rows)]
        self.chosen_index: list[int] = []
        self.rejected_index: list[int] = []
        self.row, self.col, self.segment = 0, 0, 0

    def start_row(self, row: int) -> None:
        self.row, self.col, self.segment = row, 0, 0

    def put(self, tokens, positions_from: int, branch: int, lm_targets: bool = False) -> tuple[int, int]:
        """Write tokens into the current segment; returns their [start, end) columns."""
        start, end = self.col, self.col + len(tokens)
        r = self.row
        self.input_ids[r, start:end] = tokens
        self.position_ids[r, start:end] = np.arange(positions_from, positions_from + len(tokens))
        self.segment_ids[r, start:end] = self.segment
        self.branch_ids[r, start:end] = branch
        if lm_targets:
            # Targets are these tokens, predicted from the position before each.
            self.labels[r, start - 1 : end - 1] = tokens
        self.col = end
        return start, end

    def end_segment(self, length: int) -> None:
        self.segment_lengths[self.row].append(length)
        self.segment += 1

    def flat(self, col):
        return self.row * self.seq_len + col

    def finish(self, layout: str) -> PackedBatch:
        bounds = [0]
        for r, lengths in enumerate(self.segment_lengths):
            row_start = r * self.seq_len
            for n in lengths:
                bounds.append(bounds[-1] + n)
            if bounds[-1] < row_start + self.seq_len:  # the row's padding run
                bounds.append(row_start + self.seq_len)
        cu = np.asarray(bounds, np.int32)
        return PackedBatch(self.input_ids, self.position_ids, self.segment_ids, self.branch_ids, self.labels,
                           np.asarray(self.chosen_index, np.int64), np.asarray(self.rejected_index, np.int64),
                           cu, int(np.diff(cu).max(initial=0)), layout)


def pack_pairs(pairs, seq_len: int, layout: str, pad_id: int) -> PackedBatch:
    """Pack whole pairs (objects with .prompt/.chosen/.rejected token arrays) into rows of seq_len.

    Pairs keep their order inside a row and `chosen_index[i]` belongs to `pairs[i]`.
    """
    lengths = np.array([pair_packed_length(len(p.prompt), len(p.chosen), len(p.rejected), layout) for p in pairs],
                       dtype=np.int64)
    rows = first_fit(lengths, seq_len)
    builder = _RowBuilder(len(rows), seq_len, pad_id)
    chosen_at, rejected_at = np.empty(len(pairs), np.int64), np.empty(len(pairs), np.int64)
    for r, members in enumerate(rows):
        builder.start_row(r)
        for i in members:
            chosen_at[i], rejected_at[i] = _put_pair(builder, pairs[i], layout)
    builder.chosen_index, builder.rejected_index = chosen_at.tolist(), rejected_at.tolist()
    return builder.finish(layout)


def _put_pair(b: _RowBuilder, pair, layout: str) -> tuple[int, int]:
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    if layout == "duplicated":
        b.put(pair.prompt, 0, PROMPT)
        _, chosen_end = b.put(pair.chosen, p, PROMPT, lm_targets=True)
        b.end_segment(p + c)
        b.put(pair.prompt, 0, PROMPT)
        _, rejected_end = b.put(pair.rejected, p, PROMPT)
        b.end_segment(p + r)
    else:
        b.put(pair.prompt, 0, PROMPT)
        _, chosen_end = b.put(pair.chosen, p, CHOSEN, lm_targets=True)
        _, rejected_end = b.put(pair.rejected, p, REJECTED)
        b.end_segment(p + c + r)
    return b.flat(chosen_end - 1), b.flat(rejected_end - 1)


def pack_groups(groups, seq_len: int, pad_id: int, lm_weighting: str = "distinct") -> PackedBatch:
    """Pack whole groups (megapmp.data.groups.Group) into rows of seq_len in the group layout.

    Every labelled pair of every group is one (chosen_index, rejected_index) entry, groups in order and each
    group's pairs in ``Group.pairs`` order, so the loss over them is the loss of the same pairs expanded.
    ``response_index`` lists each response's read-out, group after group. LM targets: each response's
    tokens ``lm_weights(labels, lm_weighting)`` times ("distinct": every response that wins a pair, once;
    "pairs": once per pair it wins, as expanded pairs count it; "none": no LM targets, for scoring).
    """
    items, lengths = [], []  # (group, its response indices in this segment), segment tokens
    for g, group in enumerate(groups):
        p = len(group.prompt)
        for piece in group_pieces(p, [len(r) for r in group.responses], seq_len):
            items.append((g, piece))
            lengths.append(p + sum(len(group.responses[i]) for i in piece))
    rows = first_fit(np.asarray(lengths, dtype=np.int64), seq_len)
    builder = _RowBuilder(len(rows), seq_len, pad_id)
    readout = [np.empty(len(group.responses), np.int64) for group in groups]
    weights = [lm_weights(group.labels, lm_weighting) if lm_weighting != "none" else None for group in groups]
    lm_index, lm_targets = [], []
    for r, members in enumerate(rows):
        builder.start_row(r)
        for item in members:
            g, piece = items[item]
            group = groups[g]
            p = len(group.prompt)
            _, prompt_end = builder.put(group.prompt, 0, PROMPT)
            for branch, i in enumerate(piece, start=1):
                tokens = group.responses[i]
                start, end = builder.put(tokens, p, branch)
                readout[g][i] = builder.flat(end - 1)
                weight = int(weights[g][i]) if weights[g] is not None else 0
                if weight:
                    # predicted from the prompt's last token, then from each token of the response itself
                    positions = np.concatenate(([builder.flat(prompt_end - 1)],
                                                builder.flat(np.arange(start, end - 1))))
                    lm_index += [positions] * weight
                    lm_targets += [np.asarray(tokens, np.int64)] * weight
                    builder.labels[r, start : end - 1] = tokens[1:]
                    if builder.labels[r, prompt_end - 1] == IGNORE_INDEX:
                        builder.labels[r, prompt_end - 1] = tokens[0]
            builder.end_segment(p + sum(len(group.responses[i]) for i in piece))
    pairs = [readout[g][group.pairs] for g, group in enumerate(groups)]  # [N_g, 2] each
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    builder.chosen_index, builder.rejected_index = pairs[:, 0].tolist(), pairs[:, 1].tolist()
    batch = builder.finish("group")
    batch.lm_index = np.concatenate(lm_index).astype(np.int64) if lm_index else np.zeros(0, np.int64)
    batch.lm_targets = np.concatenate(lm_targets).astype(np.int64) if lm_targets else np.zeros(0, np.int64)
    batch.response_index = np.concatenate(readout) if readout else np.zeros(0, np.int64)
    return batch


def groups_of_pairs(pairs) -> list[Group]:
    """Each pair (.prompt/.chosen/.rejected) as a group of two responses labelled 1 and 0."""
    labels = np.array([1.0, 0.0])
    return [Group(pair.prompt, (pair.chosen, pair.rejected), labels) for pair in pairs]


def pack_documents(pieces, seq_len: int, pad_id: int) -> PackedBatch:
    """Pack token pieces (each <= seq_len, e.g. document windows) as causal LM segments, all tokens
    after the first being targets."""
    lengths = np.array([len(x) for x in pieces], dtype=np.int64)
    rows = first_fit(lengths, seq_len)
    builder = _RowBuilder(len(rows), seq_len, pad_id)
    for r, members in enumerate(rows):
        builder.start_row(r)
        for i in members:
            builder.put(pieces[i][:1], 0, PROMPT)
            builder.put(pieces[i][1:], 1, PROMPT, lm_targets=True)
            builder.end_segment(len(pieces[i]))
    return builder.finish("documents")


PACKINGS = ("rows", "flat")


def flatten_rows(packed: PackedBatch, pad_id: int, multiple: int = 1, width: int | None = None) -> PackedBatch:
    """The same micro-batch as ONE row holding only its real tokens, padded at the end to a multiple of
    `multiple` tokens (e.g. the tensor-parallel size under sequence parallelism), or to exactly `width`
    tokens (a token budget: every micro-batch of a run the same shape).

    Rows of seq_len are how first-fit bounds a micro-batch, but the row-end padding they leave is pure
    waste to a varlen attention kernel (flash-attn, torch varlen, the segmented CPU path): every token of
    a [1, T] row is one the model must process anyway. Segments keep their order; segment ids are
    renumbered so they stay unique within the single row; the read-out indices follow their tokens.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    keep = packed.segment_ids.reshape(-1) >= 0  # [R*S]
    real = int(keep.sum())
    if width is None:
        width = max(multiple, -(-real // multiple) * multiple)
    elif width < max(real, 1) or width % multiple:
        raise ValueError(f"width {width} must hold the {real} real tokens and be a multiple of {multiple}")
    new_index = np.cumsum(keep) - 1  # flat old index -> flat new index, valid where keep

    def take(array: np.ndarray, fill) -> np.ndarray:
        out = np.full((1, width), fill, array.dtype)
        out[0, :real] = array.reshape(-1)[keep]
        return out

    # Renumber segments: a new one starts wherever (row, segment id) changes among the kept tokens.
    rows = np.repeat(np.arange(packed.shape[0]), packed.shape[1])[keep]
    old_segments = packed.segment_ids.reshape(-1)[keep]
    starts = np.ones(real, dtype=bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (old_segments[1:] != old_segments[:-1])
    segment_ids = np.full((1, width), -1, np.int32)
    segment_ids[0, :real] = np.cumsum(starts) - 1
    bounds = np.append(np.flatnonzero(starts), real)
    if width > real:
        bounds = np.append(bounds, width)  # the tail padding is a run of its own
    cu = bounds.astype(np.int32)
    follow = lambda index: None if index is None else new_index[index].astype(np.int64)  # noqa: E731
    return PackedBatch(take(packed.input_ids, pad_id), take(packed.position_ids, 0), segment_ids,
                       take(packed.branch_ids, 0), take(packed.labels, IGNORE_INDEX),
                       follow(packed.chosen_index), follow(packed.rejected_index), cu, int(np.diff(cu).max(initial=0)),
                       packed.layout, lm_index=follow(packed.lm_index), lm_targets=packed.lm_targets,
                       response_index=follow(packed.response_index))


def balance_into_budget(lengths: np.ndarray, min_groups: int, budget: int, group_multiple: int = 1) -> list[list[int]]:
    """Split items of ``lengths`` tokens into micro-batches of at most ``budget`` tokens with even totals.

    Longest processing time first: items in decreasing length (ties by index), each to the group with the
    fewest tokens so far (ties: the lowest group). The fewest groups that fit, starting at ``min_groups``
    and going up in steps of ``group_multiple`` (an interleaved pipeline needs a multiple of its stages):
    with the budget fitted to the data (megapmp.data.loader.fit_micro_batch_tokens) a step rarely needs
    more than ``min_groups``. Returns the item indices of each group, in their original order; empty
    groups only when there are fewer items than groups. Deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > budget:
        i = int(np.argmax(lengths))
        raise ValueError(f"item {i} needs {int(lengths[i])} tokens, more than the micro-batch budget of {budget}")
    if min_groups < 1 or group_multiple < 1:
        raise ValueError(f"min_groups {min_groups} and group_multiple {group_multiple} must be >= 1")
    order = np.argsort(-lengths, kind="stable")
    groups = min_groups
    while True:
        members = longest_first(lengths, order, groups, budget)
        if members is not None:
            return [sorted(m) for m in members]
        groups += group_multiple


def longest_first(lengths: np.ndarray, order: np.ndarray, groups: int, budget: int | None) -> list[list[int]] | None:
    """The longest-first assignment of the items in ``order`` into ``groups`` groups, each to the lightest
    group so far; None as soon as an item does not fit the lightest group within ``budget`` (then it fits
    none). No budget: every item is placed."""
    totals = np.zeros(groups, np.int64)
    members: list[list[int]] = [[] for _ in range(groups)]
    for i in order.tolist():
        g = int(np.argmin(totals))
        if budget is not None and totals[g] + lengths[i] > budget:
            return None
        totals[g] += lengths[i]
        members[g].append(i)
    return members
