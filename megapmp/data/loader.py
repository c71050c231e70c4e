"""Deterministic, resumable sampling and per-step batching for data-parallel training.

Every rank runs the same sampler (same seed) and so knows the whole global step; it then reads and
packs only its own contiguous slice of it. Counts used for loss normalisation (pairs, LM target tokens)
come from the shards' index lengths, so they are global without a collective and without reading tokens.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace

import numpy as np

from megapmp.data.datasets import DocumentDataset, PairDataset, check_compatible, check_token_ids, pairs_that_fit
from megapmp.data.packing import LAYOUTS, PACKINGS, PackedBatch, flatten_rows, pack_documents, pack_pairs


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
    seq_len tokens).

    Every token read is checked against the shards' vocabulary (one vectorised max per micro-batch on
    the host, before any tensor exists); a token outside it raises ShardError naming shard and document.
    Every pair's length is checked against `seq_len` at construction, from the index
    (datasets.pairs_that_fit): `overlong` "error" refuses a shard holding one that cannot fit a row, "drop"
    leaves such pairs out (counted in `dropped`, {prefix: pairs}).
    """

    def __init__(self, prefixes: list[str], *, kind: str = "pairs", weights: list[float] | None = None,
                 items_per_step: int, micro_batches: int = 1, seq_len: int, layout: str = "duplicated",
                 packing: str = "rows", pad_multiple: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, overlong: str = "error"):
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
        if problems:
            raise ValueError("; ".join(problems))
        self.kind, self.layout, self.seq_len = kind, layout, seq_len
        self.packing, self.pad_multiple = packing, pad_multiple
        self.items_per_step, self.micro_batches = items_per_step, micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        if kind == "pairs":
            self.datasets = [PairDataset(p) for p in prefixes]
        else:
            self.datasets = [DocumentDataset(p, window=seq_len) for p in prefixes]
        check_compatible([d.meta for d in self.datasets], list(prefixes))
        self.pad_id = self.datasets[0].meta.pad_id
        self.vocab_size = self.datasets[0].meta.vocab_size
        # The items each dataset's sampler stream draws from (None: all of them).
        self.kept = [pairs_that_fit(d, seq_len, layout, overlong) if kind == "pairs" else None for d in self.datasets]
        self.dropped = {d.prefix: len(d) - len(k) for d, k in zip(self.datasets, self.kept) if k is not None}
        self.sampler = BlendedSampler([len(d) if k is None else len(k) for d, k in zip(self.datasets, self.kept)],
                                      weights, seed=seed, shuffle=shuffle)
        self.steps_taken = 0

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
        groups = np.split(mine, self.micro_batches)
        return StepBatch([self._pack(g) for g in groups], *self._global_counts(draws), draws)

    def _pack(self, draws: np.ndarray) -> PackedBatch:
        items = [self.datasets[d][i] for d, i in draws.tolist()]
        if self.kind == "pairs":
            packed = pack_pairs(items, self.seq_len, self.layout, self.pad_id)
        else:
            packed = pack_documents(items, self.seq_len, self.pad_id)
        ids = packed.input_ids
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            for d, i in draws.tolist():
                check_token_ids(self.datasets[d], [i], self.vocab_size)
        if self.packing == "flat":
            packed = flatten_rows(packed, self.pad_id, self.pad_multiple)
        return packed

    def _global_counts(self, draws: np.ndarray) -> tuple[int, int]:
        pairs = lm_tokens = 0
        for d, ds in enumerate(self.datasets):
            idx = draws[draws[:, 0] == d, 1]
            if self.kind == "pairs":
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
