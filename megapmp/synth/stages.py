"""Running synthesis stages over many records: resumable JSONL output, ordered parallel map, the rules run.

Output discipline (DESIGN.md, reliability rules): nothing is written under the final name until a run
completes. A long stage appends to `OUTPUT.partial` (flushed and fsynced every `flush_every` records)
next to `OUTPUT.partial.json`, the run's fingerprint (options, inputs, and a hash of the input ids).
A rerun with the same fingerprint keeps the partial file's complete lines, skips their ids and appends
the rest; since records are produced in input order, the finished file equals an uninterrupted run's.
A rerun with different options refuses to mix outputs. A second process started on the same output while
the first still writes it is refused (an exclusive ``flock`` on the partial file, held until the run ends):
two writers would interleave their lines and each rename the other's half-written file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from megapmp.io import InputError, iter_jsonl, jsonl_line, try_lock_exclusive
from megapmp.synth.filters import PairFilter, StageStats


SNIPPET_FIELDS = ("id", "language", "code")


def read_snippets(path: str | os.PathLike) -> list[dict]:
    """Snippets written by `collect`, each checked for the fields the backends need."""
    snippets = []
    for line_no, record in iter_jsonl(path):
        for key in SNIPPET_FIELDS:
            if not isinstance(record.get(key), str) or not record[key]:
                raise InputError(str(path), line_no, key, "missing or not a non-empty string")
        snippets.append(record)
    return snippets


def ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for record_id in ids:
        h.update(record_id.encode() + b"\n")
    return h.hexdigest()


class OutputInUseError(ValueError):
    """Another process is writing the same output (its partial file is locked)."""


class ResumableJsonlWriter:
    """Append-only JSONL output that survives interruption; see the module docstring.

    with ResumableJsonlWriter(out, fingerprint) as w:
        for item in items:
            if item_id not in w.done: w.write(record)
        w.finish()  # rename OUTPUT.partial -> OUTPUT; without it the partial file is kept for a resume
    """

    def __init__(self, output: str | os.PathLike, fingerprint: dict, *, key: str = "id", flush_every: int = 256):
        self.output = Path(output)
        self.partial = self.output.with_name(self.output.name + ".partial")
        self.meta = self.output.with_name(self.output.name + ".partial.json")
        self.fingerprint, self.key, self.flush_every = fingerprint, key, flush_every
        self.done: set[str] = set()
        self.written = 0
        self._file = None
        self.resuming = False
        self._finished = False
        self._ids: list[str] = []
        self._line_ends: list[int] = []

    def __enter__(self) -> "ResumableJsonlWriter":
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open_locked()
        try:
            # Resumed only from a partial file that holds something: one left empty (killed before its
            # fingerprint was written) has nothing to keep.
            self.resuming = self.meta.exists() or os.fstat(self._file.fileno()).st_size > 0
            if self.resuming:
                self._check_fingerprint()
                self._recover()
            else:
                self.meta.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True) + "\n")
        except BaseException:
            self._file.close()
            raise
        return self

    def _open_locked(self):
        """OUTPUT.partial, opened for appending (created if absent) and locked for this run. Refused when
        another process holds it. A lock taken on a file that a finishing run renamed away in the meantime
        is not this output's: then the partial file is opened again."""
        while True:
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                taken = try_lock_exclusive(fd)
            except OSError:
                os.close(fd)
                raise
            if not taken:
                os.close(fd)
                raise OutputInUseError(f"{self.partial} is being written by another process: one run per output "
                                       f"at a time; wait for it to end, or pass another output")
            try:
                same = os.stat(self.partial).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return os.fdopen(fd, "a", encoding="utf-8")
            os.close(fd)

    def _check_fingerprint(self) -> None:
        try:
            previous = json.loads(self.meta.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != json.loads(json.dumps(self.fingerprint)):
            raise ValueError(f"{self.partial} was written by a run with other options or inputs "
                             f"(see {self.meta}); rerun with the same options, or delete both files to start over")

    def _recover(self) -> None:
        """Keep the complete, parseable lines of the partial file; cut off a torn last line."""
        good_bytes = 0
        with open(self.partial, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                good_bytes += len(line)
                self._ids.append(record[self.key])
                self._line_ends.append(good_bytes)
        self.keep_first(len(self._ids))

    def keep_first(self, n: int) -> None:
        """Drop all but the first `n` recovered lines (a rerun with a smaller --limit)."""
        n = min(n, len(self._ids))
        with open(self.partial, "r+b") as f:
            f.truncate(self._line_ends[n - 1] if n else 0)
        self._ids, self._line_ends = self._ids[:n], self._line_ends[:n]
        self.done = set(self._ids)
        self.written = n

    @property
    def resumed(self) -> int:
        return len(self.done)

    def write(self, record: dict) -> None:
        self._file.write(jsonl_line(record))
        self.written += 1
        if self.written % self.flush_every == 0:
            self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self, remove: tuple[Path, ...] = ()) -> None:
        """Rename the partial file to the output and remove the run's side files (`remove` adds the
        caller's), all before the lock is let go: a start that takes it afterwards finds none of them."""
        self._sync()
        os.replace(self.partial, self.output)
        for side_file in (self.meta, *remove):
            side_file.unlink(missing_ok=True)
        self._file.close()
        self._finished = True

    def __exit__(self, *exc) -> bool:
        if not self._finished and self._file is not None and not self._file.closed:
            self._sync()  # an interrupted run keeps everything it wrote, for the resume
            self._file.close()
        return False


def ordered_map(fn: Callable, items: Iterable, workers: int, chunksize: int = 32) -> Iterator:
    """`map(fn, items)` on `workers` processes, results in input order (so output is worker-count independent)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold threads (tqdm's monitor) that fork would copy mid-lock.
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


# ---------------------------------------------------------------------------------------------------
# The rules run: snippets -> describe -> mutate -> filter -> resumable JSONL


@dataclass
class RulesRunStats:
    describe: StageStats = field(default_factory=lambda: StageStats("describe", "snippets"))
    mutate: StageStats = field(default_factory=lambda: StageStats("mutate", "snippets"))
    filter: StageStats = field(default_factory=lambda: StageStats("filter", "pairs"))
    mutations: Counter = field(default_factory=Counter)
    skipped_done: int = 0
    resumed_pairs: int = 0
    pairs_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        new_pairs = self.pairs_written - self.resumed_pairs
        return {
            "stages": [self.describe.as_dict(), self.mutate.as_dict(), self.filter.as_dict()],
            "mutations": dict(sorted(self.mutations.items())),
            "resumed_pairs": self.resumed_pairs, "skipped_done_snippets": self.skipped_done,
            "pairs_written": self.pairs_written, "new_pairs": new_pairs, "seconds": round(self.seconds, 3),
            "pairs_per_s": round(new_pairs / self.seconds, 1) if self.seconds > 0 else None,
            "note": "describe/mutate seconds are summed over workers; pairs_per_s is end to end wall time",
        }


def run_rules(snippets: list[dict], output: str | os.PathLike, to_pair: Callable[[dict], "object"],
              pair_filter: PairFilter, fingerprint: dict, *, limit: int | None = None, workers: int = 1,
              flush_every: int = 256, progress: bool = True) -> RulesRunStats:
    """Write the pairs of `snippets` to `output`, resuming from `output.partial` if one matches.

    `to_pair(snippet)` returns a `rules.PairResult` (picklable: a functools.partial of a module-level
    function when workers > 1). Stops after `limit` pairs in total, resumed ones included.
    """
    from tqdm import tqdm

    stats = RulesRunStats()
    start = time.perf_counter()
    fingerprint = {**fingerprint, "snippets_sha256": ids_digest(s["id"] for s in snippets)}
    with ResumableJsonlWriter(output, fingerprint, flush_every=flush_every) as writer:
        if limit is not None and writer.resumed > limit:
            writer.keep_first(limit)
        stats.resumed_pairs = writer.resumed
        todo = [s for s in snippets if s["id"] not in writer.done]
        stats.skipped_done = len(snippets) - len(todo)
        bar = tqdm(total=len(snippets), initial=stats.skipped_done, desc="rules", unit=" snippets",
                   disable=not progress, dynamic_ncols=True, mininterval=0.5)
        for result in ordered_map(to_pair, _until_limit(todo, writer, limit), workers):
            bar.update(1)
            if limit is not None and writer.written >= limit:
                break
            _account(result, stats)
            if result.pair is None:
                continue
            with stats.filter.timed():
                reason = pair_filter.reason_to_drop(result.pair["prompt"], result.pair["chosen"],
                                                    result.pair["rejected"])
            if reason:
                stats.filter.drop(reason)
                continue
            stats.filter.keep()
            stats.mutations[result.pair["mutation"]] += 1
            writer.write(result.pair)
        bar.close()
        stats.pairs_written = writer.written
        writer.finish()
    stats.seconds = time.perf_counter() - start
    return stats


def _until_limit(items: list[dict], writer: ResumableJsonlWriter, limit: int | None) -> Iterator[dict]:
    # Lazy: on one worker, a small --limit stops the work early (a pool is terminated when the loop breaks).
    for item in items:
        if limit is not None and writer.written >= limit:
            return
        yield item


def _account(result, stats: RulesRunStats) -> None:
    describe_s, mutate_s = result.seconds
    stats.describe.seconds += describe_s
    stats.mutate.seconds += mutate_s
    if result.stage == "describe":
        stats.describe.drop(result.reason)
        return
    stats.describe.keep()
    if result.stage == "mutate":
        stats.mutate.drop(result.reason)
    else:
        stats.mutate.keep()
