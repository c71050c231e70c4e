"""Gathering many clients' requests into one model call: the micro-batcher behind the reward server.

Each request becomes a *job*: its token id sequences, cut into *chunks* of consecutive sequences of at most
``batch_tokens`` tokens (a single longer sequence is a chunk of its own), and a future. One gather loop on
the event loop builds each batch round-robin over the jobs waiting, one chunk per job per round, until the
batch holds ``batch_tokens`` tokens or no further chunk fits, and hands it to ONE worker thread that runs
the model (so the event loop keeps accepting and parsing requests while the model computes). So a request
of 100k texts is scored a chunk at a time beside everyone else's: a one-text request that arrives behind it
waits for at most the batch in progress, not for the whole large request. The first chunk of a batch waits
up to ``max_wait_ms`` for company unless the batch is already full.

A job whose client went away (the server cancels the handler, which cancels the future) is dropped with its
remaining chunks; one that goes away during a model call simply gets no answer. Neither changes what the
other jobs get: the scorer is batch-invariant (megapmp.eval.batch_invariant), so even the bits are those of
scoring them alone. Every batch's rewards are checked: a job whose rewards are not all finite fails with
`NonFiniteRewards` (the server answers 500 naming it), never with NaN in its answer.

Threads: the model runs on a `DaemonExecutor` (daemon threads), so a process asked to stop is never held
up by a model call or a tokenization in progress (`close` gives up waiting at its deadline).

A job holds its ids as `PackedIds` (one int32 array): while it waits they are what the server holds of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

ScoreFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


class NonFiniteRewards(RuntimeError):
    """The model produced NaN or an infinity for some of a request's texts."""


class ShuttingDown(RuntimeError):
    """The server stopped before this request's turn came (its shutdown timeout passed)."""


class DaemonExecutor(concurrent.futures.Executor):
    """A fixed pool of daemon threads: unlike ThreadPoolExecutor's, they never delay the interpreter's exit
    (a stopping server does not wait for the model call or tokenization it no longer needs)."""

    def __init__(self, workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the executor is shut down")
        future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)
            del item  # not held while this thread waits for the next one (a request's texts, say)

    @staticmethod
    def _run(future: concurrent.futures.Future, fn, args, kwargs) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class PackedIds(Sequence):
    """Token id sequences held compactly: all their tokens in one int32 array and their offsets, 4 bytes a
    token (lists of Python ints cost 8 a token and ~60 a sequence, and one int object per id above 256).
    ``ids[i]`` is a read-only int32 view of sequence i; ``ids[a:b]`` the PackedIds of sequences a..b-1."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens = tokens  # [T] int32, read-only
        self.offsets = offsets  # [N + 1] int64: sequence i is tokens[offsets[i]:offsets[i + 1]]; offsets[0] == 0

    @classmethod
    def pack(cls, sequences: Iterable[Sequence[int]]) -> "PackedIds":
        sequences = sequences if isinstance(sequences, Sequence) else list(sequences)
        offsets = np.zeros(len(sequences) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, sequences), np.int64, len(sequences)), out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(sequences), np.int32, int(offsets[-1]))
        tokens.flags.writeable = False
        return cls(tokens, offsets)

    @classmethod
    def concat(cls, parts: Sequence["PackedIds"]) -> "PackedIds":
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        tokens = np.concatenate([p.tokens for p in parts]) if parts else np.empty(0, np.int32)
        tokens.flags.writeable = False
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("PackedIds slices have step 1")
            stop = max(start, stop)
            first = self.offsets[start]
            return PackedIds(self.tokens[first:self.offsets[stop]], self.offsets[start:stop + 1] - first)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        i %= len(self)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.tokens[a:b] for a, b in itertools.pairwise(self.offsets.tolist()))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.offsets.nbytes


@dataclass
class Chunk:
    start: int  # first sequence of the job in this chunk
    stop: int
    tokens: int


@dataclass
class Job:
    sequences: PackedIds
    future: asyncio.Future
    chunks: deque
    rewards: np.ndarray
    pending: int  # chunks not scored yet
    enqueued: float = field(default_factory=time.perf_counter)
    dropped: bool = False  # counted in stats.dropped


def split_into_chunks(lengths: Sequence[int], batch_tokens: int) -> list[Chunk]:
    """Consecutive sequences (of these lengths), at most `batch_tokens` tokens a chunk (a longer sequence alone)."""
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > batch_tokens:
            chunks.append(Chunk(start, i, used))
            start, used = i, 0
        used += n
    if len(lengths) > start:
        chunks.append(Chunk(start, len(lengths), used))
    return chunks


@dataclass
class BatcherStats:
    jobs: int = 0  # jobs answered
    sequences: int = 0  # sequences scored
    batches: int = 0  # model calls
    dropped: int = 0  # jobs whose client left before all their chunks ran
    failed: int = 0  # jobs whose batch raised, or whose rewards were not finite
    largest_batch_jobs: int = 0  # the most jobs one batch served


class Batcher:
    """``await batcher.score(sequences)`` -> float64 rewards, scored together with other callers' jobs.

    score_fn: sequences -> rewards, run on the worker thread (the only thread that touches the model).
    batch_tokens: a batch is closed once the next chunk would pass this many tokens; also the chunk size.
    max_wait_ms: how long the first chunk of a batch waits for company. Start with :meth:`start` inside the
    running loop, stop with :meth:`close`.
    """

    def __init__(self, score_fn: ScoreFn, *, batch_tokens: int, max_wait_ms: float):
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.score_fn = score_fn
        self.batch_tokens = int(batch_tokens)
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatcherStats()
        self._jobs: deque[Job] = deque()  # jobs with chunks to score, in round-robin order
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._deadline: float | None = None  # set by close(): loop time after which nothing more is scored
        self._worker = DaemonExecutor(1, "rm-worker")
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not answered yet (queued, gathering, or being scored)."""
        return self._in_flight

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._gather_loop(), name="rm-batcher")

    async def close(self, deadline: float | None = None) -> None:
        """Score what is queued until `deadline` (loop time; None: no limit), fail the rest with
        `ShuttingDown`, then stop the loop. The worker thread is not waited for past the deadline."""
        if self._task is not None:
            self._deadline = deadline if deadline is not None else float("inf")
            self._wakeup.set()
            await self._task
            self._task = None
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def score(self, sequences: PackedIds | Sequence[Sequence[int]]) -> np.ndarray:
        if self._task is None or self._task.done() or self._deadline is not None:
            raise ShuttingDown("the server is shutting down")
        loop = asyncio.get_running_loop()
        sequences = sequences if isinstance(sequences, PackedIds) else PackedIds.pack(sequences)
        chunks = deque(split_into_chunks(sequences.lengths.tolist(), self.batch_tokens))
        job = Job(sequences, loop.create_future(), chunks, np.empty(len(sequences), dtype=np.float64), len(chunks))
        self._in_flight += 1
        try:
            self._jobs.append(job)
            self._wakeup.set()
            return await job.future  # cancelling the awaiting handler cancels this future: the job is dropped
        finally:
            self._in_flight -= 1

    # -- the gather loop -----------------------------------------------------------------------------

    def _live_jobs(self) -> int:
        """Drop jobs whose client left; the number still waiting for a chunk to run."""
        for job in [j for j in self._jobs if j.future.done()]:
            self._jobs.remove(job)
            self._count_dropped(job)
        return len(self._jobs)

    def _count_dropped(self, job: Job) -> None:
        if job.future.cancelled() and not job.dropped:
            job.dropped = True
            self.stats.dropped += 1

    async def _gather_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._live_jobs():
                if self._deadline is not None:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._deadline is not None and loop.time() >= self._deadline:
                self._fail_all(ShuttingDown("the server shut down before this request was scored"))
                return
            # The wait counts from when the oldest waiting job was queued: one that already waited through a
            # model call does not wait a second max_wait. A full batch does not wait at all.
            oldest = min(job.enqueued for job in self._jobs)
            wait = self.max_wait - (time.perf_counter() - oldest)
            if wait > 0 and self._deadline is None and self._queued_tokens() < self.batch_tokens:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                if self._queued_tokens() < self.batch_tokens and time.perf_counter() - oldest < self.max_wait:
                    continue  # more company may come
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    def _queued_tokens(self) -> int:
        return sum(c.tokens for job in self._jobs if not job.future.done() for c in job.chunks)

    def _take_batch(self) -> list[tuple[Job, Chunk]]:
        """Round-robin over the waiting jobs, one chunk each per round; the next batch starts with the job
        after the last one served, so no job is passed over twice in a row."""
        batch, used, served_last = [], 0, None
        while True:
            took = False
            for job in list(self._jobs):
                if job.future.done() or not job.chunks:
                    continue
                chunk = job.chunks[0]
                if batch and used + chunk.tokens > self.batch_tokens:
                    continue
                job.chunks.popleft()
                batch.append((job, chunk))
                used += chunk.tokens
                served_last, took = job, True
            if not took or used >= self.batch_tokens:
                break
        for job in [j for j in self._jobs if not j.chunks]:
            self._jobs.remove(job)  # all its chunks are taken: it only waits for results now
        if served_last is not None and served_last in self._jobs:
            while self._jobs[0] is not served_last:
                self._jobs.rotate(-1)
            self._jobs.rotate(-1)
        return batch

    def _fail_all(self, error: Exception) -> None:
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(error)
                self.stats.failed += 1
        self._jobs.clear()

    async def _run(self, batch: list[tuple[Job, Chunk]]) -> None:
        for job, _ in batch:
            self._count_dropped(job)  # its client left after its chunks were taken for this batch
        live = [(job, chunk) for job, chunk in batch if not job.future.done()]
        if not live:
            return
        sequences = [s for job, chunk in live for s in job.sequences[chunk.start:chunk.stop]]
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._worker, self.score_fn, sequences)
        try:
            if self._deadline is not None:
                rewards = await asyncio.wait_for(asyncio.shield(call), max(0.0, self._deadline - loop.time()))
            else:
                rewards = await call
            rewards = np.asarray(rewards, dtype=np.float64)
        except asyncio.TimeoutError:
            self._fail_jobs(live, ShuttingDown("the server shut down while this request was being scored"))
            return
        except Exception as error:  # the model failed: every job of this batch gets the error
            self._fail_jobs(live, error)
            return
        self.stats.batches += 1
        self.stats.sequences += len(sequences)
        self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len({id(job) for job, _ in live}))
        offset = 0
        for job, chunk in live:
            n = chunk.stop - chunk.start
            part = rewards[offset:offset + n]
            offset += n
            if job.future.done():  # its client left during the model call, or an earlier chunk failed
                continue
            bad = ~np.isfinite(part)
            if bad.any():
                first = chunk.start + int(np.argmax(bad))
                self._fail_jobs([(job, chunk)], NonFiniteRewards(
                    f"the model produced a non-finite reward ({part[bad][0]}) for {int(bad.sum())} of the request's "
                    f"texts (the first is input {first}): not sent; the checkpoint may be damaged"))
                continue
            job.rewards[chunk.start:chunk.stop] = part
            job.pending -= 1
            if job.pending == 0:
                job.future.set_result(job.rewards)
                self.stats.jobs += 1

    def _fail_jobs(self, live: list[tuple[Job, Chunk]], error: Exception) -> None:
        for job, _ in live:
            if not job.future.done():
                job.future.set_exception(error)
                self.stats.failed += 1
            if job in self._jobs:
                self._jobs.remove(job)
