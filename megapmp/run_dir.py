"""One run directory, one run: who owns it, what a start may do with what is already there, and which
settings a resume may change.

    RUN/run.lock        the owner's record: {"pid", "host", "started", "command"}; empty when nobody holds it
    RUN/config.json     RUN/metrics.jsonl     RUN/checkpoints/step_XXXXXXXX/

`open_run_dir` is what the trainer calls once the config and the data have passed their checks (so a bad
config or shard never leaves a directory behind). It

1. creates the directory and takes its lock: an exclusive ``flock`` on ``run.lock``, held until the run
   ends (``RunLock.release``) or the process dies, however it dies (the kernel drops the lock with the last
   descriptor). A second trainer is refused in one line naming the holder's pid and host. A record left
   in an unlocked ``run.lock`` belongs to a process that died holding the lock: it is taken over and the
   log says whose it was. The file is never deleted: removing it while another process waits to lock it
   would let two processes lock two different files of the same name.
2. decides what the start continues. A directory that holds checkpoints is resumed (``checkpoint.resume
   = auto``, or one of its own checkpoints by path) or refused: ``resume = none`` (or another run's
   checkpoint) there would splice two runs' checkpoints and metrics together. ``--overwrite`` starts a new
   run anyway, after moving the old one aside to ``RUN.old-YYYYmmdd-HHMMSS`` (never deleting it).
3. cuts a torn last line of metrics.jsonl (a kill while a record was being appended) back to the last
   whole line, with a log line; a damaged line anywhere else is an error naming it.

`ConfigCheck` is what the checkpoint layer asks before it resumes a checkpoint: the checkpoint's recorded
config against this run's. A different model is "incompatible" (the checkpoint is intact: no fallback to
an older one, which holds the same model); a changed setting that changes the training curve is refused
with a one-line diff unless named in ``checkpoint.allow_change``.

Parallel runs: one lock per run, held by global rank 0, the process that writes config.json and
metrics.jsonl and publishes checkpoints. Every rank calls `open_run_dir`; the others learn rank 0's outcome
from a broadcast, so a refused start ends every rank with the same message rather than leaving them waiting
at a collective. The directory must be on a file system all ranks share (sharded checkpoints need that too).

NFS: on a Linux NFS client, ``flock`` is carried out as a whole-file lock of the NFS lock protocol (NLM for
v3, part of the protocol for v4), so it excludes trainers on other nodes too, as long as the mount has
locking (``nolock``, or ``local_lock=flock|all``, make it local to one node: then it only excludes trainers
on the same node). A node that dies holding the lock keeps it until the server reclaims it (NFSv4: when its
lease runs out, 90 s by default); a restart in that window is refused naming the dead holder: wait and retry.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

from megapmp import checkpoint as ckpt
from megapmp.config import TrainConfig
from megapmp.io import InputError, cut_torn_jsonl, try_lock_exclusive

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"

# Settings that change where, how fast or how visibly a step runs, or when it is saved, but not what it
# computes (a parallel layout or another backend reproduces the curve to rounding): a resume may change
# them. Every other setting (data, model, loss, optimizer, schedule, steps, seeds, precision, and any
# setting added later) changes the training curve: a resume refuses a change unless it is allowed by name.
FREE_SETTINGS = ("checkpoint.", "logging.", "parallel.", "num_threads", "compile", "attention_backend",
                 "activation_checkpointing", "max_nonfinite_steps", "data.prefetch_steps", "data.verify",
                 "data.valid", "data.valid_items", "data.bucket_tokens", "data.micro_batch_tokens", "loss.backend",
                 "loss.lm_chunk", "optimizer.backend")
# Model settings that fix the tensors' shapes: a checkpoint made with others cannot be loaded at all.
SHAPE_SETTINGS = ("model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_hidden_layers",
                  "model.num_attention_heads", "model.num_key_value_heads", "model.tie_word_embeddings")


class RunDirError(ValueError):
    """A start the run directory refuses; one line, and the CLI's exit code 2."""


# ------------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """An exclusive flock on RUN/run.lock, with the holder's record written into it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, log) -> "RunLock":
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            taken = try_lock_exclusive(fd)
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"{path}: cannot be locked ({e.strerror}): the file system offers no locks (an NFS "
                              f"mount with nolock?); use a run directory on one that does") from None
        if not taken:
            holder = _wait_for_record(fd)
            os.close(fd)
            raise RunDirError(f"{run_dir} is in use by {_describe(holder)}: a run directory takes one trainer "
                              f"at a time; wait for that one to end, or pass another --run-dir")
        previous = _read_record(fd)
        if previous:
            log(f"took over {path} from {_describe(previous)}, which ended without releasing it")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        # Overwrite, then cut to length: a reader never finds the file emptied between two records.
        data = (json.dumps(record) + "\n").encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _wait_for_record(fd: int, patience_s: float = 2.0) -> dict:
    """The holder's record, read by a start that was refused the lock. A holder that has just taken the lock
    may not have written its record yet (or is mid-write): wait up to `patience_s` for one that names a pid
    rather than report the holder as unknown."""
    deadline = time.monotonic() + patience_s
    while True:
        record = _read_record(fd)
        if "pid" in record or time.monotonic() >= deadline:
            return record
        time.sleep(0.02)


def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else {}
        return record if isinstance(record, dict) else {"unreadable": raw[:80]}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "another process (its record in run.lock is unreadable)"
    own = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
    who = "this very process (an earlier Trainer that was neither fitted nor closed)" if own else \
        f"pid {holder['pid']} on host {holder.get('host', '?')}"
    return f"{who}, started {holder.get('started', '?')}"


# ------------------------------------------------------------------------------------------------
# Opening a run directory


def open_run_dir(run_dir: str | os.PathLike, cfg: TrainConfig, ctx, *, overwrite: bool, log) -> RunLock | None:
    """Create and lock `run_dir` and apply the start rules (module docstring). Every rank calls this; rank 0
    acts and returns the lock (others None); a refusal is a RunDirError on every rank."""
    run_dir = Path(run_dir)
    lock, error = None, None
    if ctx.rank == 0:
        try:
            lock = _open_as_owner(run_dir, cfg, overwrite, log)
        except RunDirError as e:
            error = str(e)
        except OSError as e:
            error = f"{run_dir}: cannot be used as the run directory ({e.strerror or e}: {e.filename or run_dir})"
    if ctx.world_size > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunDirError(error)
    return lock


def _open_as_owner(run_dir: Path, cfg: TrainConfig, overwrite: bool, log) -> RunLock:
    resume = cfg.checkpoint.resume
    explicit = None if resume in ("auto", "none") else Path(resume).resolve()
    inside = explicit is not None and run_dir.resolve() in explicit.parents
    if overwrite and inside:
        raise RunDirError(f"--overwrite would move {run_dir} aside, with the checkpoint.resume={resume} it is to "
                          f"resume from: drop one of the two")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(run_dir, log)
    try:
        if overwrite:
            return _move_aside(run_dir, lock, log)
        newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if newest is not None and (resume == "none" or (explicit is not None and not inside)):
            start = "a new run (checkpoint.resume = none)" if resume == "none" else f"from {resume}"
            raise RunDirError(f"{run_dir} holds a run (checkpoints up to {newest.name}): starting {start} there "
                              f"would splice two runs; resume it (checkpoint.resume = auto), pick another --run-dir, "
                              f"or pass --overwrite to move the old run aside")
        if newest is not None:
            try:
                cut_torn_jsonl(run_dir / METRICS_FILE, log)
            except InputError as e:
                raise RunDirError(f"{e}: the file is damaged (not just a torn last line); move it aside to resume") \
                    from None
        return lock
    except BaseException:
        lock.release()
        raise


def _move_aside(run_dir: Path, lock: RunLock, log) -> RunLock:
    """--overwrite: rename the old run (lock and all) to RUN.old-STAMP and lock a fresh RUN."""
    if [p for p in run_dir.iterdir() if p.name != LOCK_FILE] == []:
        return lock  # nothing there yet
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}"), n + 1
    run_dir.rename(aside)  # the old lock moves with it and stays held until the new one is taken
    try:
        run_dir.mkdir()
        new = RunLock.acquire(run_dir, log)
    finally:
        lock.release()
    log(f"--overwrite: moved the previous run aside to {aside}; starting a new run in {run_dir}")
    return new


# ------------------------------------------------------------------------------------------------
# What a resume may change


def flat_settings(config: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted key: value}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _free(key: str) -> bool:
    return key in FREE_SETTINGS or any(key.startswith(f) for f in FREE_SETTINGS if f.endswith("."))


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigCheck:
    """Called by the checkpoint layer (megapmp.checkpoint.resume, on rank 0) with a checkpoint's directory and
    its trainer.json: the reason it cannot be resumed under `cfg`, or None. `changes` then holds the allowed
    changes ({key: [checkpoint's value, this run's]}) for the run to record."""

    def __init__(self, cfg: TrainConfig):
        self.current = flat_settings(json.loads(json.dumps(asdict(cfg))))
        self.defaults = flat_settings(json.loads(json.dumps(asdict(TrainConfig()))))
        self.allowed = set(cfg.checkpoint.allow_change)
        self.changes: dict = {}

    def __call__(self, path: Path, trainer_state: dict) -> str | None:
        saved = trainer_state.get("config")
        if not isinstance(saved, dict):
            return None  # nothing recorded to compare with (the checkpoint's own check_state still applies)
        saved = flat_settings(saved)
        differ = {}
        for key, value in self.current.items():
            if _free(key):
                continue
            if key not in saved:  # a setting newer than the checkpoint: fine while it keeps its default
                if key in self.defaults and value == self.defaults[key]:
                    continue
                differ[key] = ("(not recorded)", value)
            elif saved[key] != value:
                differ[key] = (saved[key], value)
        diff = "; ".join(f"{k} {v[0] if v[0] == '(not recorded)' else _show(v[0])} -> {_show(v[1])}"
                         for k, v in differ.items())
        shapes = [k for k in differ if k in SHAPE_SETTINGS]
        if shapes:
            return (f"{path} holds another model ({diff}): its checkpoints are intact but incompatible with this "
                    f"config; resume with the model it was trained with, or start a new run (another --run-dir, "
                    f"or --overwrite to move this one aside)")
        refused = [k for k in differ if k not in self.allowed]
        if refused:
            return (f"{path} was trained with other settings ({diff}), which change the training curve: resume "
                    f"with the checkpoint's settings, start a new run (another --run-dir, or --overwrite to move "
                    f"this one aside), or accept them with --checkpoint.allow-change {' '.join(differ)}")
        self.changes = {k: list(v) for k, v in differ.items()}
        return None
