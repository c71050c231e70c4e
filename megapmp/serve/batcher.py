"""Gathering many clients' requests into one model call: the micro-batcher behind the reward server.

Each request becomes a *job* (its token id sequences and a future). One gather loop on the event loop
takes the first waiting job, then keeps taking jobs until the batch holds ``batch_tokens`` tokens or
``max_wait_ms`` have passed since that first job, and hands the batch to ONE worker thread that runs the
model (so the event loop keeps accepting and parsing requests while the model computes). Each job's
slice of the rewards goes back to its own future.

A job whose client went away before its batch ran (the server cancels the handler, which cancels the
future) is dropped from the batch; one that goes away during the model call simply gets no answer.
Neither changes what the other jobs of the batch get: the scorer is batch-invariant
(megapmp.eval.batch_invariant), so even the bits are those of scoring them without it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

ScoreFn = Callable[[Sequence[Sequence[int]]], np.ndarray]
_CLOSE = object()  # the queue's end marker


@dataclass
class Job:
    sequences: list[list[int]]
    future: asyncio.Future
    tokens: int
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    jobs: int = 0  # jobs answered
    sequences: int = 0  # sequences scored
    batches: int = 0  # model calls
    dropped: int = 0  # jobs whose client left before their batch ran
    failed: int = 0  # jobs whose batch raised
    largest_batch_jobs: int = 0


class Batcher:
    """``await batcher.score(sequences)`` -> float64 rewards, scored together with other callers' jobs.

    score_fn: sequences -> rewards, run on the worker thread (the only thread that touches the model).
    batch_tokens: a batch is closed once adding the next job would pass this many tokens (a single job
    larger than that forms a batch of its own). max_wait_ms: how long the first job of a batch waits for
    company. Start with :meth:`start` inside the running loop, stop with :meth:`close`.
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
        self._queue: asyncio.Queue | None = None
        self._held: Job | None = None  # a job that did not fit the previous batch: it opens the next one
        self._task: asyncio.Task | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-worker")
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not answered yet (queued, gathering, or being scored)."""
        return self._in_flight

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._gather_loop(), name="rm-batcher")

    async def close(self) -> None:
        """Score what is queued, then stop the loop and the worker thread."""
        if self._task is not None:
            await self._queue.put(_CLOSE)
            await self._task
            self._task = None
        self._worker.shutdown(wait=True)

    async def score(self, sequences: list[list[int]]) -> np.ndarray:
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        job = Job(sequences, asyncio.get_running_loop().create_future(), sum(len(s) for s in sequences))
        self._in_flight += 1
        try:
            await self._queue.put(job)
            return await job.future  # cancelling the awaiting handler cancels this future: the job is dropped
        finally:
            self._in_flight -= 1

    # -- the gather loop -----------------------------------------------------------------------------

    async def _gather_loop(self) -> None:
        while True:
            first = self._held if self._held is not None else await self._queue.get()
            self._held = None
            if first is _CLOSE:
                return
            batch, used, closing = [first], first.tokens, False
            # The wait counts from when the first job was queued: one that already waited through a model
            # call does not wait a second max_wait.
            waited = time.perf_counter() - first.enqueued
            deadline = asyncio.get_running_loop().time() + max(0.0, self.max_wait - waited)
            while used < self.batch_tokens:
                job = await self._next_job(deadline)
                if job is None or job is _CLOSE:
                    closing = job is _CLOSE
                    break
                if used + job.tokens > self.batch_tokens:
                    self._held = job  # it opens the next batch
                    break
                batch.append(job)
                used += job.tokens
            await self._run(batch)
            if closing:  # close() is called once no handler is left, so nothing queues after the marker
                return

    async def _next_job(self, deadline: float):
        """The next queued job (or the close marker), or None once the deadline has passed."""
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        # Not asyncio.wait_for: on Python 3.11 it can drop an item that arrives as the timeout fires.
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=timeout)
        if getter in done:
            return getter.result()
        getter.cancel()
        await asyncio.wait({getter})
        return None if getter.cancelled() else getter.result()  # it may have taken an item before the cancel

    async def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.future.done()]
        self.stats.dropped += len(batch) - len(live)
        if not live:
            return
        sequences = [s for job in live for s in job.sequences]
        loop = asyncio.get_running_loop()
        try:
            rewards = await loop.run_in_executor(self._worker, self.score_fn, sequences)
        except Exception as error:  # the model failed: every job of this batch gets the error
            self.stats.failed += len(live)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.stats.batches += 1
        self.stats.sequences += len(sequences)
        self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len(live))
        start = 0
        for job in live:
            stop = start + len(job.sequences)
            if not job.future.done():  # its client may have left during the model call
                job.future.set_result(rewards[start:stop])
                self.stats.jobs += 1
            start = stop
