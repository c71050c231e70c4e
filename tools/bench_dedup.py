#!/usr/bin/env python
"""Benchmark near-duplicate removal: megapmp's own MinHash/LSH against datasketch's, on the stdlib corpus.

The corpus is what `collect` keeps from the Python standard library's source (sysconfig's `stdlib` path,
or --source): Python files cut into function snippets, filtered and exactly deduplicated, in walk order,
with near-dedup off. Both sides then see the same snippet stream and decide the same way: 5-token
shingles, 128 permutations in 16 bands x 8 rows, a candidate confirmed by its estimated Jaccard >=
--threshold, the first occurrence kept.

  own         megapmp.synth.collect.NearDuplicateIndex (numpy multiply-shift hashes over CRC32 token shingles)
  datasketch  datasketch.MinHash (seed 0, the same shingles folded to 32 bits, its own hashing and
              permutations) + datasketch.MinHashLSH(params=(16, 8))

Each side runs --repeats times, alternating, in this process; its time is the fastest run and covers
hashing, LSH lookups and inserts (tokenizing included on both sides). `*_cpu_s` is this process's CPU time
(both sides are single-threaded), which other load on a shared machine disturbs far less than `*_s` (wall).
The sides estimate Jaccard with different hash functions, so pairs near the threshold can fall either
way: `overlap` is |both removed| / |either removed|.

Prints ONE JSON line on stdout; progress goes to stderr. `datasketch_over_own` (CPU time; > 1: datasketch
slower) is what to compare across machines; absolute times depend on the CPU and on its other load.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megapmp.io import get_logger  # noqa: E402
from megapmp.synth.collect import TOKEN, CollectConfig, NearDuplicateIndex, collect  # noqa: E402

NUM_PERM, BANDS, SHINGLE = 128, 16, 5


log = get_logger("bench_dedup")


def shingle_hashes(code: str) -> np.ndarray:
    """The own index's 5-token shingles (CRC32 per token, polynomial combine), folded to the 32 bits that
    datasketch's default scheme takes."""
    ids = np.fromiter((zlib.crc32(t.encode()) for t in TOKEN.findall(code)), dtype=np.uint64)
    if len(ids) == 0:
        ids = np.zeros(1, np.uint64)
    k = min(SHINGLE, len(ids))
    shingles = np.zeros(len(ids) - k + 1, np.uint64)
    for j in range(k):
        shingles = shingles * np.uint64(1_000_003) + ids[j : len(ids) - k + 1 + j]
    return (shingles >> np.uint64(32)) ^ (shingles & np.uint64(0xFFFFFFFF))


def own_removed(codes: list[str], threshold: float) -> list[int]:
    index = NearDuplicateIndex(threshold, num_perm=NUM_PERM, bands=BANDS, shingle=SHINGLE)
    return [i for i, code in enumerate(codes) if not index.is_new(code)]


def datasketch_removed(codes: list[str], threshold: float) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    # One template's permutations shared by every sketch: building them per snippet would be timed too.
    template = MinHash(num_perm=NUM_PERM, seed=0)
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS))
    kept: dict[int, MinHash] = {}
    removed = []
    for i, code in enumerate(codes):
        sketch = MinHash(num_perm=NUM_PERM, seed=0, hashfunc=int, permutations=template.permutations,
                         scheme=template.scheme)
        sketch.update_batch(shingle_hashes(code).tolist())
        if any(sketch.jaccard(kept[j]) >= threshold for j in sorted(lsh.query(sketch))):
            removed.append(i)
            continue
        kept[i] = sketch
        lsh.insert(i, sketch)
    return removed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", default=None, metavar="DIR",
                   help="directories to collect snippets from (default: the Python standard library)")
    p.add_argument("--threshold", type=float, default=CollectConfig().near_dup_threshold)
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the fastest counts")
    p.add_argument("--limit", type=int, default=None, help="only the first N snippets (quick checks)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        import datasketch
    except ImportError:
        p.error("the datasketch side needs datasketch: pip install datasketch (it is in the dev extra)")

    sources = args.source or [sysconfig.get_paths()["stdlib"]]
    t0 = time.perf_counter()
    snippets, _ = collect(sources, CollectConfig(languages=("python",), near_dup_threshold=2.0))
    codes = [s["code"] for s in snippets][: args.limit]
    log(f"{len(codes)} snippets from {sources} in {time.perf_counter() - t0:.1f}s")

    sides = {"own": own_removed, "datasketch": datasketch_removed}
    best = {name: float("inf") for name in sides}
    best_cpu = dict(best)
    removed: dict[str, set[int]] = {}
    for r in range(args.repeats):
        for name, fn in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            result = set(fn(codes, args.threshold))
            best[name] = min(best[name], time.perf_counter() - t0)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
            if removed.setdefault(name, result) != result:
                raise RuntimeError(f"{name} removed other snippets on repeat {r + 1}: not deterministic")
            log(f"repeat {r + 1} {name}: {time.perf_counter() - t0:.2f}s wall, "
                f"{time.process_time() - c0:.2f}s cpu, {len(result)} removed")
    both, either = removed["own"] & removed["datasketch"], removed["own"] | removed["datasketch"]
    print(json.dumps({
        "corpus": "stdlib" if args.source is None else "custom", "snippets": len(codes),
        "threshold": args.threshold, "num_perm": NUM_PERM, "bands": BANDS, "repeats": args.repeats,
        "own_s": round(best["own"], 3), "datasketch_s": round(best["datasketch"], 3),
        "own_cpu_s": round(best_cpu["own"], 3), "datasketch_cpu_s": round(best_cpu["datasketch"], 3),
        "datasketch_over_own": round(best_cpu["datasketch"] / best_cpu["own"], 3),
        "own_removed": len(removed["own"]), "datasketch_removed": len(removed["datasketch"]),
        "both_removed": len(both), "overlap": round(len(both) / len(either), 3) if either else 1.0,
        "datasketch_version": datasketch.__version__, "numpy_version": np.__version__,
        "python": platform.python_version()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
