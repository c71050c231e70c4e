"""Datasets over memory-mapped shards: pairs for PMP / RM finetuning, document windows for LM pretraining.

Only index arrays are touched at construction; token data is read from the memory map when an item is
fetched, so a data-parallel rank reads just the items it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megapmp.data.indexed import ShardError, bin_path
from megapmp.data.packing import pair_packed_length
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


def pairs_that_fit(dataset: PairDataset, seq_len: int, layout: str, overlong: str = "error") -> np.ndarray | None:
    """The pairs of `dataset` that fit one packed row of `seq_len` tokens in `layout`, from the index alone
    (no token is read): None when all do. A pair that does not fit would stop the run at the step that draws
    it, so it is found here, at open: overlong="error" raises a ShardError naming the shard, how many, the
    longest and the flags that deal with them; "drop" returns the indices of the others."""
    need = pair_packed_length(dataset.prompt_lengths.astype(np.int64), dataset.chosen_lengths.astype(np.int64),
                              dataset.rejected_lengths.astype(np.int64), layout)
    too_long = np.flatnonzero(need > seq_len)
    if not len(too_long):
        return None
    longest = int(too_long[np.argmax(need[too_long])])
    if overlong == "drop" and len(too_long) < len(dataset):
        return np.flatnonzero(need <= seq_len)
    what = "all" if len(too_long) == len(dataset) else f"{len(too_long)} of {len(dataset)}"
    raise ShardError(f"{dataset.prefix}: {what} pairs do not fit a row of data.seq_len={seq_len} tokens in the "
                     f"{layout} layout (the longest, pair {longest}, needs {int(need[longest])}): raise --data.seq_len, "
                     f"leave them out with --data.overlong drop, or preprocess again with --max-length "
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
