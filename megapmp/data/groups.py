"""Response groups: one prompt, K labelled responses, every labelled pair of them a preference pair.

Reward-model data rarely comes as independent pairs: MathShepherd holds several correct and incorrect
solutions per question (CodePMP appendix D.1), LogiQA2.0-pair samples four models many times per question,
Best-of-N scores N candidates of one question. Expanded into pairs, a question with 4 correct and 4
incorrect responses is 16 pairs; kept as a group it is one prompt and 8 responses, packed once
(``megapmp.data.packing.pack_groups``) with every pair in the loss.

Records (JSONL, one group per line; ``tools/preprocess_pairs.py --groups``)::

    {"prompt": "...", "responses": ["...", ...], "labels": [true, false, ...]}     booleans: true = correct
    {"prompt": "...", "responses": ["...", ...], "labels": [0.7, 0.2, ...]}        scores: higher is better
    {"prompt": "...", "chosen": ["...", ...], "rejected": ["...", ...]}            every chosen beats every rejected

Pairs: (i, j) is a labelled pair iff labels[i] > labels[j]; equal labels (ties) make no pair. A group
needs at least one pair. Booleans are stored as 1.0 / 0.0, the chosen/rejected form as 1.0 / 0.0.

Shard layout (``megapmp.data.shards``, sidecar kind "groups"):

    PREFIX.bin / PREFIX.idx   MMIDIDX v1, one document per group: 1 + K sequences (the templated prompt,
                              then each response with its EOS by the shard's EOS policy), so Megatron's
                              reader reads the tokens of a group shard like any other shard.
    PREFIX.labels             the labels, beside the index rather than inside the token file (a label is
                              no token): float64 little-endian, ONE PER SEQUENCE of the index, in sequence
                              order, NaN at each group's prompt. Its size is exactly 8 x the index's sequence
                              count; the label of sequence s is at byte 8 s. Checked at open: size, NaN at
                              every prompt, finite at every response, at least one pair per group.

The LM term of a group (``lm_weights``): "distinct" (the default) counts each response that wins at least
one pair once; "pairs" counts it once per pair it wins, which is exactly what the same pairs expanded
([P C][P R] per pair, the chosen response's CE in every pair) train. This module is numpy only: the
preprocessing workers import it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapmp.io import InputError, parse_json_line, text_field

GROUP_KEYS = ("prompt", "responses", "labels")  # --keys for groups: prompt, responses, labels fields
CHOSEN_KEY, REJECTED_KEY = "chosen", "rejected"  # the second record form
# Responses of one group. The pairs of a group grow as K^2 / 4 (256 candidates: 16k pairs); a branch id
# is one byte, so a row segment holds at most 127 responses and a larger group is split into segments.
MAX_GROUP_RESPONSES = 512
LM_WEIGHTINGS = ("distinct", "pairs")
LABELS_DTYPE = np.dtype("<f8")


@dataclass(frozen=True)
class Group:
    """One prompt and its responses (token arrays) with one label each (float64, higher is better)."""

    prompt: np.ndarray
    responses: tuple
    labels: np.ndarray

    def __post_init__(self):
        if len(self.responses) != len(self.labels):
            raise ValueError(f"{len(self.responses)} responses for {len(self.labels)} labels")

    @property
    def pairs(self) -> np.ndarray:
        """int64 [N, 2]: (better, worse) response indices of every labelled pair."""
        return labelled_pairs(self.labels)


def labelled_pairs(labels) -> np.ndarray:
    """int64 [N, 2]: every (i, j) with labels[i] > labels[j], i ascending then j ascending."""
    labels = np.asarray(labels, dtype=np.float64)
    better, worse = np.nonzero(labels[:, None] > labels[None, :])
    return np.stack([better, worse], axis=1).astype(np.int64)


def response_wins(labels) -> np.ndarray:
    """int64 [K]: how many responses of the group each one beats (its pairs as the better side)."""
    labels = np.asarray(labels, dtype=np.float64)
    return (labels[:, None] > labels[None, :]).sum(axis=1).astype(np.int64)


def lm_weights(labels, weighting: str) -> np.ndarray:
    """int64 [K]: how many times each response's tokens are LM targets. "distinct": once for every
    response that wins a pair; "pairs": once per pair it wins (the expanded pairs' weighting)."""
    wins = response_wins(labels)
    if weighting == "distinct":
        return (wins > 0).astype(np.int64)
    if weighting == "pairs":
        return wins
    raise ValueError(f"LM weighting {weighting!r} is not one of {', '.join(LM_WEIGHTINGS)}")


# ---------------------------------------------------------------------------------------------------
# Whole shards: the labels file and per-group counts from it


def labels_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.labels")


def read_labels(prefix: str | os.PathLike, num_sequences: int) -> np.ndarray:
    """The labels of a group shard, memory-mapped: float64 [num_sequences]. Raises ValueError (the caller
    names it a ShardError) when the file is missing or its size is not 8 x the index's sequence count."""
    path = labels_path(prefix)
    if not path.is_file():
        raise ValueError(f"{path}: the labels of a group shard are missing")
    size = os.path.getsize(path)
    if size != LABELS_DTYPE.itemsize * num_sequences:
        raise ValueError(f"{path}: {size} bytes, the index's {num_sequences} sequences need "
                         f"{LABELS_DTYPE.itemsize * num_sequences}")
    if not size:
        return np.empty(0, LABELS_DTYPE)
    return np.memmap(path, dtype=LABELS_DTYPE, mode="r")


@dataclass(frozen=True)
class GroupTable:
    """Per-group counts of a whole group shard, from its index and labels alone (no token is read).

    ``first`` [G]: the sequence index of each group's prompt; ``sizes`` [G]: its responses K; ``wins`` [S]:
    per sequence, the responses of its group it beats (0 at prompts); ``pairs`` [G]; ``paired_tokens`` [G]:
    the response tokens of all its pairs expanded (each response counted once per pair it is in);
    ``lm_tokens`` dict weighting -> [G]: the LM targets of each group under that weighting.
    """

    first: np.ndarray
    sizes: np.ndarray
    wins: np.ndarray
    pairs: np.ndarray
    paired_tokens: np.ndarray
    lm_tokens: dict

    @classmethod
    def build(cls, document_index: np.ndarray, sequence_lengths: np.ndarray, labels: np.ndarray,
              where: str = "") -> "GroupTable":
        """Check the labels against the index (ValueError naming ``where`` and the group) and count."""
        document_index = np.asarray(document_index, dtype=np.int64)
        first = document_index[:-1]
        sizes = np.diff(document_index) - 1
        if len(sizes) and sizes.min() < 2:
            g = int(np.argmax(sizes < 2))
            raise ValueError(f"{where}: group {g} has {int(sizes[g])} responses, a group needs at least 2")
        labels = np.asarray(labels, dtype=np.float64)
        is_prompt = np.zeros(len(labels), dtype=bool)
        is_prompt[first] = True
        bad_prompt = is_prompt & ~np.isnan(labels)
        bad_response = ~is_prompt & ~np.isfinite(labels)
        if bad_prompt.any() or bad_response.any():
            s = int(np.argmax(bad_prompt | bad_response))
            g = int(np.searchsorted(document_index, s, side="right")) - 1
            what = "a prompt's label is not NaN" if bad_prompt[s] else "a response's label is not a finite number"
            raise ValueError(f"{where}: group {g} (sequence {s}): {what}")
        group_of = np.repeat(np.arange(len(sizes)), sizes + 1)
        wins, losses = _ranks_within_groups(group_of, np.where(is_prompt, -np.inf, labels))
        wins[is_prompt] = losses[is_prompt] = 0
        lengths = np.asarray(sequence_lengths, dtype=np.int64)

        def per_group(values):
            return np.add.reduceat(values, first) if len(first) else np.zeros(0, np.int64)

        pairs = per_group(wins)
        if len(pairs) and pairs.min() == 0:
            g = int(np.argmax(pairs == 0))
            raise ValueError(f"{where}: group {g} has no labelled pair (all its labels are equal)")
        lm = {"distinct": per_group(lengths * (wins > 0)), "pairs": per_group(lengths * wins)}
        return cls(first, sizes, wins, pairs, per_group(lengths * (wins + losses)), lm)


def _ranks_within_groups(group_of: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every sequence, how many responses of its group have a strictly smaller label (wins) and a
    strictly larger one (losses). Each group's prompt carries -inf: every response's count of smaller
    labels includes it once, which is subtracted; the caller zeroes the prompts' own counts."""
    order = np.lexsort((labels, group_of))  # by group, then label
    sorted_group, sorted_label = group_of[order], labels[order]
    n = len(order)
    new_value = np.ones(n, dtype=bool)
    new_value[1:] = (sorted_group[1:] != sorted_group[:-1]) | (sorted_label[1:] != sorted_label[:-1])
    value_start = np.maximum.accumulate(np.where(new_value, np.arange(n), 0))
    value_end = np.minimum.accumulate(np.where(np.append(new_value[1:], True), np.arange(1, n + 1), n)[::-1])[::-1]
    group_start = np.searchsorted(sorted_group, sorted_group, side="left")
    group_end = np.searchsorted(sorted_group, sorted_group, side="right")
    wins, losses = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    wins[order] = value_start - group_start - 1
    losses[order] = group_end - value_end
    return wins, losses


# ---------------------------------------------------------------------------------------------------
# Records


def parse_group_record(file: str, line_no: int, raw: bytes, keys: tuple[str, str, str] = GROUP_KEYS):
    """(prompt, responses, labels float64) of one JSONL group record, or InputError naming FILE:LINE field."""
    record = parse_json_line(file, line_no, raw)
    if not isinstance(record, dict):
        raise InputError(file, line_no, None, f"expected a JSON object, got {type(record).__name__}")
    prompt_key, responses_key, labels_key = keys
    prompt = text_field(file, line_no, record, prompt_key)
    listed = responses_key in record or labels_key in record
    split = CHOSEN_KEY in record or REJECTED_KEY in record
    if listed and split:
        raise InputError(file, line_no, CHOSEN_KEY if CHOSEN_KEY in record else REJECTED_KEY,
                         f"a group has either '{responses_key}' with '{labels_key}', or '{CHOSEN_KEY}' with "
                         f"'{REJECTED_KEY}', not both")
    if split:
        chosen = _texts(file, line_no, record, CHOSEN_KEY)
        rejected = _texts(file, line_no, record, REJECTED_KEY)
        responses = chosen + rejected
        labels = np.array([1.0] * len(chosen) + [0.0] * len(rejected))
    else:
        if responses_key not in record and labels_key not in record:
            raise InputError(file, line_no, responses_key, f"missing field (a group has '{responses_key}' and "
                             f"'{labels_key}', or '{CHOSEN_KEY}' and '{REJECTED_KEY}')")
        responses = _texts(file, line_no, record, responses_key)
        labels = _labels(file, line_no, record, labels_key, len(responses))
    if len(responses) < 2:
        raise InputError(file, line_no, responses_key if listed else REJECTED_KEY,
                         f"a group needs at least 2 responses, got {len(responses)}")
    if len(responses) > MAX_GROUP_RESPONSES:
        raise InputError(file, line_no, responses_key if listed else CHOSEN_KEY,
                         f"{len(responses)} responses, over the limit of {MAX_GROUP_RESPONSES} per group "
                         "(split the group into several records)")
    if not (labels[:, None] > labels[None, :]).any():
        raise InputError(file, line_no, labels_key if listed else REJECTED_KEY,
                         "all labels are equal: the group has no pair to learn from")
    return prompt, responses, labels


def _texts(file, line_no, record, key) -> list[str]:
    if key not in record:
        raise InputError(file, line_no, key, "missing field")
    value = record[key]
    if not isinstance(value, list):
        raise InputError(file, line_no, key, f"expected a list of strings, got {type(value).__name__}")
    if not value:
        raise InputError(file, line_no, key, "empty list")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise InputError(file, line_no, key, f"item {i}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise InputError(file, line_no, key, f"item {i}: empty string")
    return value


def _labels(file, line_no, record, key, count: int) -> np.ndarray:
    if key not in record:
        raise InputError(file, line_no, key, "missing field")
    value = record[key]
    if not isinstance(value, list):
        raise InputError(file, line_no, key, f"expected a list of booleans or numbers, got {type(value).__name__}")
    if len(value) != count:
        raise InputError(file, line_no, key, f"{len(value)} labels for {count} responses")
    booleans = [isinstance(x, bool) for x in value]
    if any(booleans) and not all(booleans):
        raise InputError(file, line_no, key, "mixes booleans and numbers: use one kind of label per group")
    for i, x in enumerate(value):
        if not isinstance(x, (bool, int, float)):
            raise InputError(file, line_no, key, f"item {i}: expected a boolean or a number, got {type(x).__name__}")
        if not isinstance(x, bool) and not math.isfinite(float(x)):
            raise InputError(file, line_no, key, f"item {i}: {x!r} is not a finite number")
    return np.array([float(x) for x in value], dtype=np.float64)


def identical_across_labels(responses: list[str], labels: np.ndarray) -> tuple[int, int] | None:
    """The first (i, j), i < j, of two identical responses with different labels (a pair that prefers a text
    to itself); None if there is none. Identical responses with equal labels make no pair and are harmless."""
    seen: dict[str, int] = {}
    for j, text in enumerate(responses):
        i = seen.setdefault(text, j)
        if i != j and labels[i] != labels[j]:
            return i, j
    return None


def fit_group(prompt: list[int], responses: list[list[int]], max_length: int, eos_id: int | None):
    """The truncation policy of every record (megapmp.data.preprocess.fit_pair is its K = 2 case): the prompt is
    cut from the left (its end, next to the responses, is kept) just enough for the longest response to fit, but
    never below min(len(prompt), max_length // 2) tokens; then each response still too long is cut from the
    right, its last kept token replaced by EOS when EOS is appended (the reward is read there).
    Returns (prompt, responses, tokens_removed)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return prompt, responses, 0
    keep_prompt = min(max(max_length - longest, min(len(prompt), max_length // 2)), len(prompt))
    room = max_length - keep_prompt

    def cut(response: list[int]) -> list[int]:
        if len(response) <= room:
            return response
        kept = response[:room]
        if eos_id is not None:
            kept[-1] = eos_id
        return kept

    new_responses = [cut(r) for r in responses]
    removed = (len(prompt) - keep_prompt) + sum(len(a) - len(b) for a, b in zip(responses, new_responses))
    return prompt[len(prompt) - keep_prompt :], new_responses, removed
