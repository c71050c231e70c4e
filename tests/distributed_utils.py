"""Run a function on several gloo ranks, each in a fresh process, for CPU multi-rank tests.

    results = run_ranks(2, fn, x, y, timeout=60)   # fn(rank, world_size, x, y) on ranks 0 and 1

``fn`` must be a module-level function (it is pickled by reference) and so must its arguments and
return value be picklable. Each rank runs with ``torch.distributed`` initialised (gloo, a FileStore in
a fresh temp dir, one intra-op thread) and torn down afterwards. The first failing rank's traceback is
re-raised in the caller (with those of other ranks that failed within a second); ranks still blocked
in a collective are terminated. Processes come from a forkserver that has torch, pytest and the first
caller's module preloaded: after the first run, a run costs ~0.1-0.5 s instead of seconds of imports per rank.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import shutil
import sys
import tempfile
import time

# torch.testing.assert_close imports torch.distributed.tensor (and sympy) once a process group exists:
# seconds per rank unless the server has it already.
_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "numpy", "pytest"]
_GRACE_S = 1.0  # after a failure, how long to wait for other ranks' reports before terminating them


class RankError(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def _context(fn):
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect only when the server first starts: later callers' modules are imported per rank.
        module = getattr(fn, "__module__", "__main__")
        ctx.set_forkserver_preload(_PRELOAD + ([module] if module not in ("__main__", "__mp_main__") else []))
    return ctx


def _rank_main(rank, world_size, store_path, fn, args, results):
    import traceback

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # ranks share a few cores; oversubscription only slows them down
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    # Plain pickle, by value: a multiprocessing queue would pass tensors as file descriptors that the
    # parent can only collect while this rank's process is still alive (FileNotFoundError otherwise).
    results.put((rank, True, pickle.dumps(out)))
    dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 60.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return its results by rank."""
    ctx = _context(fn)
    tmp = tempfile.mkdtemp(prefix="megapmp-ranks-")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, os.path.join(tmp, "store"), fn, args, results),
                         daemon=True) for r in range(world_size)]
    outputs, errors = {}, {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        first_error_at = None
        exited_at = {}  # rank -> when its process was first seen dead without a report
        while len(outputs) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.05)
                (outputs if ok else errors)[rank] = value
                if not ok:
                    first_error_at = first_error_at or time.monotonic()
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            if now > deadline or (first_error_at is not None and now > first_error_at + _GRACE_S):
                break
            for r, p in enumerate(procs):
                if p.exitcode is not None and r not in outputs and r not in errors:
                    # A report may still be in the pipe: wait a little before calling it lost.
                    if now - exited_at.setdefault(r, now) > 0.5:
                        errors[r] = f"rank {r} exited with code {p.exitcode} without reporting"
                        first_error_at = first_error_at or now
        missing = [r for r in range(world_size) if r not in outputs and r not in errors]
    finally:
        done = len(outputs) == world_size
        for p in procs:
            if p.pid is None:  # never started
                continue
            if not done:
                p.terminate()  # a rank left waiting in a collective would never return
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        report = "\n".join(f"----- rank {r} -----\n{tb}" for r, tb in sorted(errors.items()))
        raise RankError(f"{len(errors)} of {world_size} ranks failed:\n{report}")
    if missing:
        raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout} s")
    return [pickle.loads(outputs[r]) for r in range(world_size)]
