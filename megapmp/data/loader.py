"""Deterministic, resumable sampling and per-step batching for data-parallel training.

Every rank runs the same sampler (same seed) and so knows the whole global step; it then reads and
packs only its own contiguous slice of it. Counts used for loss normalisation (pairs, LM target tokens)
come from the shards' index lengths, so they are global without a collective and without reading tokens.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, replace

import numpy as np

from megapmp.data.datasets import (DocumentDataset, GroupDataset, check_compatible, check_token_ids, expand_group,
                                    open_preference_dataset, pairs_that_fit)
from megapmp.data.groups import LM_WEIGHTINGS
from megapmp.data.packing import (LAYOUTS, PACKINGS, PackedBatch, balance_into_budget, flatten_rows, groups_of_pairs,
                                   longest_first, pack_documents, pack_groups, pack_pairs, pair_group_packed_length,
                                   pair_packed_length)

# A fitted token budget is a multiple of this: FlexAttention's block (its block mask is [T/128, T/128]) and a
# tile size the GEMMs like.
BUDGET_MULTIPLE = 128


class EpochShuffle:
    """Indices of one dataset in a seeded permutation that is redrawn every epoch.

    State is (epoch, offset): the permutation is a pure function of (seed, stream, epoch), so a restored
    sampler continues exactly where the saved one stopped.
    """

    def __init__(self, size: int, seed: int, stream: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.stream, self.shuffle = size, seed, stream, shuffle
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)
            else:
                self._order = np.arange(self.size)
            self._order_epoch = epoch
        return self._order

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            n = min(k, self.size - self.offset)
            out.append(self._order_of(self.epoch)[self.offset : self.offset + n])
            self.offset += n
            k -= n
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class BlendedSampler:
    """Draws (dataset, item) from several datasets in proportion to `weights`.

    The dataset of each draw follows Megatron's error-minimising rule (take the dataset furthest behind
    its share), so the mix is exact at every prefix, not just on average; items within a dataset come
    from its own EpochShuffle stream.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None = None, seed: int = 0, shuffle: bool = True):
        weights = np.asarray(weights if weights is not None else [1.0] * len(sizes), dtype=np.float64)
        if len(weights) != len(sizes) or (weights <= 0).any():
            raise ValueError(f"need one positive weight per dataset, got {weights.tolist()} for {len(sizes)} datasets")
        self.weights = weights / weights.sum()
        self.streams = [EpochShuffle(n, seed, stream=i, shuffle=shuffle) for i, n in enumerate(sizes)]
        self.counts = np.zeros(len(sizes), np.int64)

    def take(self, k: int) -> np.ndarray:
        """[k, 2] int64 rows of (dataset id, item index)."""
        choice = np.empty(k, np.int64)
        for j in range(k):
            total = self.counts.sum() + 1
            d = int(np.argmax(self.weights * total - self.counts))
            choice[j] = d
            self.counts[d] += 1
        items = np.empty(k, np.int64)
        for d, stream in enumerate(self.streams):
            where = np.flatnonzero(choice == d)
            items[where] = stream.take(len(where))
        return np.stack([choice, items], axis=1)

    def state_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError(f"sampler state has {len(state['streams'])} datasets, this run has {len(self.streams)}")
        self.counts = np.asarray(state["counts"], np.int64)
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)


@dataclass
class StepBatch:
    """This rank's micro-batches of one optimizer step, and the step's global loss denominators."""

    micro_batches: list[PackedBatch]
    global_pairs: int
    global_lm_tokens: int
    step_items: np.ndarray  # [G, 2] the whole step's (dataset, item) draws, identical on every rank


class StepLoader:
    """Per optimizer step: draw `items_per_step` items globally, keep this rank's slice, split it into
    `micro_batches` contiguous groups and pack each group into rows of `seq_len` tokens; with
    packing="flat" those rows then become one row of their real tokens, padded to a multiple of
    `pad_multiple` (the TP size under sequence parallelism).

    `kind` is "pairs" (PMP, RM finetuning) or "documents" (LM pretraining; items are windows of at most
    seq_len tokens). Under "pairs" a shard may hold pairs or response groups (megapmp.data.groups), and an
    item is one pair or one whole group: layout "group" packs each group once as ``[P R1 ... RK]`` (a pair
    as ``[P C R]``), a pair layout packs every labelled pair of a group expanded. The step's pair count
    is then the labelled pairs of its groups, and its LM targets follow `lm_weighting` in the group layout
    ("distinct": each response that wins a pair once; "pairs": once per pair it wins, as the expanded
    layouts always count them). A group's segments never leave its micro-batch.

    With a token budget (`micro_batch_tokens`, packing="flat" only) every micro-batch is ONE row of exactly
    that many tokens, so a compiled model sees one shape for the whole run: this rank's items are split by
    their token counts (``balance_into_budget``: even totals; `micro_batches` groups, more only when the
    step's items do not fit, in steps of `micro_batch_multiple`), each packed and padded to the budget.
    "auto" fits the budget to the shards' length distribution (``fit_micro_batch_tokens``). Which items
    make a step, and so the loss normalisation, do not depend on it.

    Every token read is checked against the shards' vocabulary (one vectorised max per micro-batch on
    the host, before any tensor exists); a token outside it raises ShardError naming shard and document.
    Every pair's length is checked against `seq_len` at construction, from the index
    (datasets.pairs_that_fit): `overlong` "error" refuses a shard holding one that cannot fit a row, "drop"
    leaves such pairs out (counted in `dropped`, {prefix: pairs}).
    """

    def __init__(self, prefixes: list[str], *, kind: str = "pairs", weights: list[float] | None = None,
                 items_per_step: int, micro_batches: int = 1, seq_len: int, layout: str = "duplicated",
                 packing: str = "rows", pad_multiple: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, overlong: str = "error",
                 micro_batch_tokens: int | str | None = None, micro_batch_multiple: int = 1,
                 lm_weighting: str = "distinct"):
        problems = []
        if items_per_step % (dp_size * micro_batches):
            problems.append(f"items_per_step {items_per_step} is not divisible by dp_size {dp_size} x "
                            f"micro_batches {micro_batches}")
        if not 0 <= dp_rank < dp_size:
            problems.append(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if kind == "pairs" and layout not in LAYOUTS:
            problems.append(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        if packing not in PACKINGS:
            problems.append(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
        if kind not in ("pairs", "documents"):
            problems.append(f"kind {kind!r} is not pairs or documents")
        if micro_batch_tokens is not None and packing != "flat":
            problems.append(f"a micro-batch token budget needs packing='flat', not {packing!r}")
        if lm_weighting not in LM_WEIGHTINGS:
            problems.append(f"lm_weighting {lm_weighting!r} is not one of {', '.join(LM_WEIGHTINGS)}")
        if problems:
            raise ValueError("; ".join(problems))
        self.kind, self.layout, self.seq_len, self.lm_weighting = kind, layout, seq_len, lm_weighting
        self.packing, self.pad_multiple = packing, pad_multiple
        self.items_per_step, self.micro_batches = items_per_step, micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if kind == "pairs":
            self.datasets = [open_preference_dataset(p) for p in prefixes]
        else:
            self.datasets = [DocumentDataset(p, window=seq_len) for p in prefixes]
        check_compatible([d.meta for d in self.datasets], list(prefixes))
        self.pad_id = self.datasets[0].meta.pad_id
        self.vocab_size = self.datasets[0].meta.vocab_size
        # The items each dataset's sampler stream draws from (None: all of them).
        self.kept = [pairs_that_fit(d, seq_len, layout, overlong) if kind == "pairs" else None for d in self.datasets]
        # prefix -> (items left out, their unit), for the trainer's log
        self.dropped = {d.prefix: (len(d) - len(k), "groups" if isinstance(d, GroupDataset) else "pairs")
                        for d, k in zip(self.datasets, self.kept) if k is not None}
        self.sampler = BlendedSampler([len(d) if k is None else len(k) for d, k in zip(self.datasets, self.kept)],
                                      weights, seed=seed, shuffle=shuffle)
        self.steps_taken = 0
        self.micro_batch_multiple = micro_batch_multiple
        self.token_budget = self._token_budget(micro_batch_tokens, seed) if micro_batch_tokens is not None else None

    @property
    def item_unit(self) -> str:
        """What one item of this loader is, for messages: pairs, groups (of a group shard), or document windows."""
        if self.kind != "pairs":
            return "document windows"
        kinds = {"groups" if isinstance(d, GroupDataset) else "pairs" for d in self.datasets}
        return " and ".join(sorted(kinds, reverse=True))

    @property
    def micro_batch_tokens(self) -> int | None:
        """Tokens of every micro-batch under a token budget; None without one."""
        return self.token_budget.tokens if self.token_budget is not None else None

    def item_lengths(self, d: int, items: np.ndarray) -> np.ndarray:
        """Tokens each of ``items`` of dataset ``d`` occupies in a packed row (its layout's count), from the
        index alone."""
        ds = self.datasets[d]
        if isinstance(ds, GroupDataset):
            return ds.packed_lengths(items, self.layout, self.seq_len)
        if self.kind == "pairs":
            p, c, r = ds.prompt_lengths[items].astype(np.int64), ds.chosen_lengths[items], ds.rejected_lengths[items]
            if self.layout == "group":  # packed by pack_groups, which splits a pair too long for one row
                return pair_group_packed_length(p, c, r, self.seq_len)
            return pair_packed_length(p, c, r, self.layout)
        return np.minimum(ds.window, ds.index.sequence_lengths[ds.sequence_of_item[items]].astype(np.int64)
                          - ds.offset_of_item[items])

    def _token_budget(self, requested, seed: int) -> "TokenBudget":
        # Over the items the sampler can draw (data.overlong = drop leaves some out).
        lengths = [self.item_lengths(d, np.arange(len(ds)) if kept is None else kept)
                   for d, (ds, kept) in enumerate(zip(self.datasets, self.kept))]
        if requested == "auto":
            sizes = [len(x) for x in lengths]
            share = self.sampler.weights / np.array(sizes)  # each item's draw probability, per dataset
            return fit_micro_batch_tokens(np.concatenate(lengths), np.repeat(share, sizes),
                                          self.items_per_step // self.dp_size, self.micro_batches,
                                          multiple=math.lcm(BUDGET_MULTIPLE, self.pad_multiple),
                                          group_multiple=self.micro_batch_multiple, seed=seed)
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"micro_batch_tokens must be 'auto' or a positive integer, got {requested!r}")
        longest = max(int(x.max()) for x in lengths)
        if requested < longest or requested % self.pad_multiple:
            raise ValueError(f"micro_batch_tokens={requested} must hold the longest item of the shards ({longest} "
                             f"tokens) and be a multiple of {self.pad_multiple}")
        return TokenBudget(requested, fitted=False)

    @property
    def meta(self):
        return self.datasets[0].meta

    def next_step(self) -> StepBatch:
        draws = self.sampler.take(self.items_per_step)
        for d, kept in enumerate(self.kept):
            if kept is not None:  # stream positions -> the dataset's item indices
                draws[draws[:, 0] == d, 1] = kept[draws[draws[:, 0] == d, 1]]
        self.steps_taken += 1
        per_rank = self.items_per_step // self.dp_size
        mine = draws[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        if self.token_budget is None:
            groups = np.split(mine, self.micro_batches)
        else:
            lengths = np.empty(len(mine), np.int64)
            for d in np.unique(mine[:, 0]).tolist():
                where = mine[:, 0] == d
                lengths[where] = self.item_lengths(d, mine[where, 1])
            groups = [mine[members] for members in balance_into_budget(lengths, self.micro_batches,
                                                                         self.token_budget.tokens,
                                                                         self.micro_batch_multiple)]
        return StepBatch([self._pack(g) for g in groups], *self._global_counts(draws), draws)

    def _pack(self, draws: np.ndarray) -> PackedBatch:
        items = [self.datasets[d][i] for d, i in draws.tolist()]
        if self.kind == "pairs" and self.layout == "group":
            groups = [x if isinstance(self.datasets[d], GroupDataset) else groups_of_pairs([x])[0]
                      for (d, _), x in zip(draws.tolist(), items)]
            packed = pack_groups(groups, self.seq_len, self.pad_id, self.lm_weighting)
        elif self.kind == "pairs":
            pairs = [p for (d, _), x in zip(draws.tolist(), items)
                     for p in (expand_group(x) if isinstance(self.datasets[d], GroupDataset) else [x])]
            packed = pack_pairs(pairs, self.seq_len, self.layout, self.pad_id)
        else:
            packed = pack_documents(items, self.seq_len, self.pad_id)
        ids = packed.input_ids
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            for d, i in draws.tolist():
                check_token_ids(self.datasets[d], [i], self.vocab_size)
        if self.packing == "flat":
            packed = flatten_rows(packed, self.pad_id, self.pad_multiple, width=self.micro_batch_tokens)
        return packed

    def _global_counts(self, draws: np.ndarray) -> tuple[int, int]:
        pairs = lm_tokens = 0
        for d, ds in enumerate(self.datasets):
            idx = draws[draws[:, 0] == d, 1]
            if isinstance(ds, GroupDataset):
                pairs += int(ds.table.pairs[idx].sum())
                lm_tokens += ds.lm_tokens(idx, self.lm_weighting if self.layout == "group" else "pairs")
            elif self.kind == "pairs":
                pairs += len(idx)
                lm_tokens += int(ds.chosen_lengths[idx].sum())
            else:
                window_lengths = np.minimum(ds.window, ds.index.sequence_lengths[ds.sequence_of_item[idx]]
                                            - ds.offset_of_item[idx])
                lm_tokens += int((window_lengths - 1).sum())
        return pairs, lm_tokens

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.steps_taken = int(state["steps_taken"])


@dataclass(frozen=True)
class TokenBudget:
    """Tokens per micro-batch, and (when fitted) what the fit expects of it on draws like the run's."""

    tokens: int
    fitted: bool = True
    expected_padding: float | None = None  # padded tokens / real tokens - 1, per step
    extra_micro_batch_rate: float | None = None  # fraction of steps needing more than micro_batches groups

    def describe(self) -> str:
        if not self.fitted:
            return f"{self.tokens} tokens per micro-batch (data.micro_batch_tokens)"
        return (f"{self.tokens} tokens per micro-batch (fitted to the shards: expected padding "
                f"{100 * self.expected_padding:.1f}%, {100 * self.extra_micro_batch_rate:.1f}% of steps one more "
                f"micro-batch)")


def fit_micro_batch_tokens(pool: np.ndarray, probabilities: np.ndarray | None, items: int, micro_batches: int, *,
                           multiple: int = BUDGET_MULTIPLE, group_multiple: int = 1, trials: int = 128,
                           seed: int = 0) -> TokenBudget:
    """The token budget T (a multiple of ``multiple``) that minimises the expected padded tokens of a step,
    (micro-batches the step needs at T) x T, over ``trials`` simulated steps of ``items`` items drawn from
    ``pool`` (item token counts, drawn with ``probabilities``), each split by ``balance_into_budget``.

    A larger T pads every micro-batch more; a smaller one makes more steps need an extra micro-batch (a
    whole T of mostly padding). T never goes below the longest item, nor below the smallest lightest-split
    maximum any trial met (below that every step would need extra micro-batches). Deterministic in
    ``seed``: a resumed run fits the same T.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities)
    rng = np.random.default_rng([seed, 0x7B])
    steps = [np.sort(rng.choice(pool, size=items, p=probabilities))[::-1] for _ in range(trials)]
    round_up = lambda n: -(-int(n) // multiple) * multiple  # noqa: E731
    splits = [{micro_batches: _heaviest_group(s, micro_batches)} for s in steps]
    lowest = round_up(max(int(pool.max()), min(split[micro_batches] for split in splits)))
    # The longest item may be rare enough that no trial drew it: T starts at it all the same.
    highest = max(lowest, round_up(max(split[micro_batches] for split in splits)))
    candidates = np.arange(lowest, highest + 1, multiple)
    cost = np.zeros(len(candidates))
    extra = np.zeros(len(candidates))
    for s, split in zip(steps, splits):
        for j, budget in enumerate(candidates.tolist()):
            groups = micro_batches
            while True:
                if groups not in split:
                    split[groups] = _heaviest_group(s, groups)
                if split[groups] <= budget:
                    break
                groups += group_multiple
            cost[j] += groups * budget
            extra[j] += groups > micro_batches
    best = int(np.argmin(cost))  # the first minimum: the smaller budget on a tie
    real = sum(int(s.sum()) for s in steps)
    return TokenBudget(int(candidates[best]), True, float(cost[best] / real - 1), float(extra[best] / trials))


def _heaviest_group(descending: np.ndarray, groups: int) -> int:
    """The largest group total of balance_into_budget's longest-first split of ``descending`` item lengths
    into ``groups`` (no budget): that split fits a budget exactly when this total does."""
    members = longest_first(descending, np.arange(len(descending)), groups, budget=None)
    return max(int(descending[m].sum()) for m in members)


class BackgroundLoader:
    """A StepLoader run up to ``depth`` steps ahead on a worker thread, so packing step N + 1 (reading
    shards, first-fit, building index arrays, pinning) overlaps the device running step N.

    The batches, and their order, are exactly those of the wrapped loader. ``state_dict()`` is the loader's
    state after the last step *handed out* (not after the ones packed ahead), so a checkpoint resumes at
    the next step the trainer has not seen. An error on the worker (a bad shard) is raised by the
    ``next_step()`` call that would have returned that step, and by every call after it. With
    ``pin_memory`` the micro-batches come back as page-locked CPU tensors (``PackedBatch.to_torch``), ready
    for ``non_blocking`` copies.
    """

    def __init__(self, loader: StepLoader, *, depth: int = 1, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._state = loader.state_dict()
        self._worker: _Worker | None = None
        self._error: BaseException | None = None

    @property
    def meta(self):
        return self.loader.meta

    def next_step(self) -> StepBatch:
        if self._error is not None:
            raise self._error
        if self._worker is None:
            self._worker = _Worker(self.loader, self.depth, self.pin_memory)
        step, state, error = self._worker.take()
        if error is not None:
            self._error = error
            raise error
        self._state = state
        return step

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        if self._worker is not None:
            raise RuntimeError("load the loader state before the first next_step()")
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the worker, drop the steps it packed ahead and rewind the loader to the last step handed out
        (forgetting a worker error): a later ``next_step()`` starts a fresh worker from there."""
        self._error = None
        if self._worker is not None:
            self._worker.stop()  # raises if the thread does not stop: it would keep advancing the loader
            self._worker = None
        self.loader.load_state_dict(self._state)


class _Worker:
    """One packing thread with its own stop flag, queue and slots (so a stopped worker can never feed its
    successor). A slot is taken before packing a step and given back when the step is handed out: at most
    ``depth`` steps exist ahead of the consumer, packed or being packed."""

    def __init__(self, loader: StepLoader, depth: int, pin_memory: bool):
        self.loader, self.pin_memory = loader, pin_memory
        self.queue: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="megapmp-loader", daemon=True)
        self.thread.start()

    def take(self):
        item = self.queue.get()
        self.slots.release()
        return item

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                if not self.slots.acquire(timeout=0.1):
                    continue
                if self.stopping.is_set():
                    return
                step = self.loader.next_step()
                state = self.loader.state_dict()
                if self.pin_memory:
                    step = replace(step, micro_batches=[m.to_torch(pin_memory=True) for m in step.micro_batches])
                self.queue.put((step, state, None))
        except BaseException as error:  # handed to the consumer, which raises it in the main thread
            self.queue.put((None, None, error))

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the loader thread did not stop within {timeout:.0f} s")
