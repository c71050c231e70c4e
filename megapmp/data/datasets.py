"""Datasets over memory-mapped shards: pairs and response groups for PMP / RM finetuning, document windows
for LM pretraining.

Only index arrays are touched at construction; token data is read from the memory map when an item is
fetched, so a data-parallel rank reads just the items it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megapmp.data.groups import Group, GroupTable, labelled_pairs, labels_path, read_labels
from megapmp.data.indexed import ShardError, bin_path
from megapmp.data.packing import MAX_BRANCH, group_packed_length, pair_packed_length
from megapmp.data.shards import ShardMeta, open_shard

OVERLONG_POLICIES = ("error", "drop")


@dataclass(frozen=True)
class Pair:
    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


class PairDataset:
    """Pairs of one shard: item i is document i's (prompt, chosen, rejected) sequences."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.index, self.meta = open_shard(prefix, kind="pairs")
        per_doc = np.diff(self.index.document_index)
        if len(per_doc) and not (per_doc == 3).all():
            bad = int(np.argmax(per_doc != 3))
            raise ShardError(f"{prefix}: document {bad} has {per_doc[bad]} sequences, a pair has 3")
        lengths = self.index.sequence_lengths.reshape(-1, 3)
        self.prompt_lengths, self.chosen_lengths, self.rejected_lengths = lengths.T

    def __len__(self) -> int:
        return self.index.num_documents

    def __getitem__(self, i: int) -> Pair:
        first = 3 * int(i)
        seq = self.index.sequence
        return Pair(seq(first), seq(first + 1), seq(first + 2))

    def document_of(self, i: int) -> int:
        return int(i)


def expand_group(group: Group) -> list[Pair]:
    """The group's labelled pairs as independent pairs (better, worse), in ``Group.pairs`` order."""
    return [Pair(group.prompt, group.responses[i], group.responses[j]) for i, j in group.pairs.tolist()]


class GroupDataset:
    """Response groups of one shard (megapmp.data.groups): item i is document i, its prompt, K responses and
    their labels. Counts per group (pairs, LM targets, packed lengths) come from the index and the labels
    file alone, checked at open."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.index, self.meta = open_shard(prefix, kind="groups")
        try:
            self.labels = read_labels(prefix, self.index.num_sequences)
            self.table = GroupTable.build(self.index.document_index, self.index.sequence_lengths, self.labels,
                                          where=str(labels_path(prefix)))
        except ValueError as e:
            raise ShardError(str(e)) from None
        lengths = self.index.sequence_lengths.astype(np.int64)
        self.prompt_lengths = lengths[self.table.first]
        self.response_tokens = np.add.reduceat(lengths, self.table.first) - self.prompt_lengths if len(self) else \
            np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.index.num_documents

    def __getitem__(self, i: int) -> Group:
        first, last = int(self.index.document_index[i]), int(self.index.document_index[i + 1])
        seq = self.index.sequence
        return Group(seq(first), tuple(seq(s) for s in range(first + 1, last)),
                     np.array(self.labels[first + 1 : last], dtype=np.float64))

    def document_of(self, i: int) -> int:
        return int(i)

    def response_lengths(self, i: int) -> np.ndarray:
        first, last = int(self.index.document_index[i]), int(self.index.document_index[i + 1])
        return self.index.sequence_lengths[first + 1 : last].astype(np.int64)

    def packed_lengths(self, items: np.ndarray, layout: str, seq_len: int) -> np.ndarray:
        """Tokens each group occupies in rows of ``seq_len``: in the group layout its responses and one prompt
        per segment (``group_pieces``); in a pair layout, all its pairs expanded."""
        items = np.asarray(items, dtype=np.int64)
        p, responses = self.prompt_lengths[items], self.response_tokens[items]
        if layout == "group":
            out = p + responses
            for j in np.flatnonzero((out > seq_len) | (self.table.sizes[items] > MAX_BRANCH)).tolist():
                out[j] = group_packed_length(int(p[j]), self.response_lengths(int(items[j])), seq_len)
            return out
        # each pair brings its prompt twice (duplicated) or once (shared-prefix) and its two responses
        prompts_per_pair = 2 if layout == "duplicated" else 1
        return prompts_per_pair * self.table.pairs[items] * p + self.table.paired_tokens[items]

    def segment_needs(self, layout: str, seq_len: int) -> np.ndarray:
        """int64 [G]: the longest segment each group needs in ``layout``: its prompt with its longest response
        (group: a group is split between responses), or its longest labelled pair packed whole (pair layouts;
        exact where it exceeds ``seq_len``, elsewhere a bound that does not)."""
        responses = self.index.sequence_lengths.astype(np.int64).copy()
        responses[self.table.first] = 0
        longest = np.maximum.reduceat(responses, self.table.first) if len(self) else np.zeros(0, np.int64)
        if layout == "group":
            return self.prompt_lengths + longest
        need = pair_packed_length(self.prompt_lengths, longest, longest, layout)  # the two longest may be no pair
        for g in np.flatnonzero(need > seq_len).tolist():
            first, last = int(self.index.document_index[g]), int(self.index.document_index[g + 1])
            lengths, pairs = self.response_lengths(g), labelled_pairs(self.labels[first + 1 : last])
            need[g] = int(pair_packed_length(int(self.prompt_lengths[g]), lengths[pairs[:, 0]], lengths[pairs[:, 1]],
                                             layout).max())
        return need

    def lm_tokens(self, items: np.ndarray, weighting: str) -> int:
        return int(self.table.lm_tokens[weighting][np.asarray(items, dtype=np.int64)].sum())


def open_preference_dataset(prefix: str):
    """A PairDataset or a GroupDataset, by the kind the shard's sidecar records."""
    kind = ShardMeta.load(prefix).kind
    return GroupDataset(prefix) if kind == "groups" else PairDataset(prefix)


def preference_pairs(dataset, limit: float, items: np.ndarray | None = None) -> tuple[list[Pair], list[int]]:
    """The first ``limit`` pairs of a pair or group dataset (a group's pairs expanded, in order), drawn from
    ``items`` (default: all of them in order), and the items they came from."""
    out: list[Pair] = []
    used: list[int] = []
    for i in (range(len(dataset)) if items is None else items):
        if len(out) >= limit:
            break
        item = dataset[int(i)]
        pairs = expand_group(item) if isinstance(dataset, GroupDataset) else [item]
        out += pairs[: max(0, min(len(pairs), limit - len(out)))]
        used.append(int(i))
    return out, used


class DocumentDataset:
    """Documents of one shard cut into windows of at most `window` tokens, one item per window.

    Windows tile each document without overlap: a document of n tokens gives ceil(n / window) items.
    """

    def __init__(self, prefix: str, window: int):
        self.prefix = str(prefix)
        self.index, self.meta = open_shard(prefix, kind="documents")
        self.window = window
        lengths = self.index.sequence_lengths.astype(np.int64)
        counts = -(-lengths // window)
        self.sequence_of_item = np.repeat(np.arange(len(lengths)), counts)
        first_item = np.concatenate(([0], np.cumsum(counts)[:-1]))
        self.offset_of_item = (np.arange(len(self.sequence_of_item)) - first_item[self.sequence_of_item]) * window

    def __len__(self) -> int:
        return len(self.sequence_of_item)

    def __getitem__(self, i: int) -> np.ndarray:
        offset = int(self.offset_of_item[i])
        return self.index.sequence(int(self.sequence_of_item[i]))[offset : offset + self.window]

    def document_of(self, i: int) -> int:
        sequence = int(self.sequence_of_item[i])
        return int(np.searchsorted(self.index.document_index, sequence, side="right")) - 1


def pairs_that_fit(dataset, seq_len: int, layout: str, overlong: str = "error") -> np.ndarray | None:
    """The items of `dataset` (pairs, or groups of a GroupDataset) that fit rows of `seq_len` tokens in
    `layout`, from the index alone (no token is read): None when all do. A pair layout needs each pair packed
    whole (a group: each of its labelled pairs); the group layout splits a group between responses, so it
    needs each response with its prompt (a pair: the longer response). An item that does not fit would stop
    the run at the step that draws it, so it is found here, at open: overlong="error" raises a ShardError
    naming the shard, how many, the longest and the flags that deal with them; "drop" returns the indices of
    the others."""
    if isinstance(dataset, GroupDataset):
        need, unit = dataset.segment_needs(layout, seq_len), "groups"
    elif layout == "group":
        need, unit = dataset.prompt_lengths.astype(np.int64) + np.maximum(dataset.chosen_lengths,
                                                                            dataset.rejected_lengths), "pairs"
    else:
        need = pair_packed_length(dataset.prompt_lengths.astype(np.int64), dataset.chosen_lengths.astype(np.int64),
                                  dataset.rejected_lengths.astype(np.int64), layout)
        unit = "pairs"
    too_long = np.flatnonzero(need > seq_len)
    if not len(too_long):
        return None
    longest = int(too_long[np.argmax(need[too_long])])
    if overlong == "drop" and len(too_long) < len(dataset):
        return np.flatnonzero(need <= seq_len)
    what = "all" if len(too_long) == len(dataset) else f"{len(too_long)} of {len(dataset)}"
    raise ShardError(f"{dataset.prefix}: {what} {unit} do not fit a row of data.seq_len={seq_len} tokens in the "
                     f"{layout} layout (the longest, {unit[:-1]} {longest}, needs {int(need[longest])}): raise "
                     f"--data.seq_len, leave them out with --data.overlong drop, or preprocess again with --max-length "
                     f"{seq_len // 2} --overlong truncate")


def check_token_ids(dataset, items, vocab_size: int) -> None:
    """Raise ShardError naming the shard and document of the first of `items` holding a token id
    outside [0, vocab_size): a damaged `.bin` keeps its size, and would otherwise end in a bare
    IndexError inside the embedding (or, below the model's padded size, train on garbage)."""
    for i in items:
        document = dataset.document_of(i)
        for sequence in dataset.index.document(document):
            if not len(sequence):
                continue
            low, high = int(sequence.min()), int(sequence.max())
            if high >= vocab_size or low < 0:
                bad = high if high >= vocab_size else low
                raise ShardError(f"{bin_path(dataset.prefix)}: document {document} holds token id {bad}, outside the "
                                 f"vocabulary [0, {vocab_size}): the shard is damaged or was made with another "
                                 f"tokenizer (check it: python tools/preprocess_pairs.py verify {dataset.prefix})")


def check_compatible(metas: list[ShardMeta], prefixes: list[str]) -> None:
    """Datasets blended into one stream must share tokenizer ids and template."""
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        differ = [k for k in ("vocab_size", "eos_id", "pad_id", "template", "eos_policy", "judge")
                  if getattr(meta, k) != getattr(first, k)]
        if differ:
            raise ShardError(f"{prefix} cannot be blended with {prefixes[0]}: different {', '.join(differ)}")
