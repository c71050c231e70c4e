#!/usr/bin/env python
"""Benchmark offline pair preprocessing: megapmp's build_shard against the plain loop a user would write.

Generates a deterministic, CodePMP-shaped JSONL file of {prompt, chosen, rejected} pairs (prompt: a short
code description built from real standard-library docstrings; chosen/rejected: slices of real
standard-library source of a few hundred characters, rejected often a damaged copy of chosen), trains one
byte-level BPE on a sample of it (unless --tokenizer says otherwise) and then times, each run in a fresh
Python subprocess so that peak RSS is per run:

  baseline       single process: read the JSONL line by line, json.loads, encode prompt/chosen/rejected
                 with tokenizers.Tokenizer.from_file(...).encode(text, add_special_tokens=False).ids
                 (TOKENIZERS_PARALLELISM=false, i.e. one thread, like any plain loop), append EOS to each
                 response and write a Megatron-style MMIDIDX shard (tokens appended to the .bin as they
                 come, lengths kept in lists, index written at the end) -- what Megatron's
                 preprocess_data.py + IndexedDatasetBuilder do, minus its worker pool.
  megapmp_wN     megapmp.data.preprocess.build_shard(..., workers=N) for each N in --workers; the time is
                 the whole call (tokenizer load, worker start-up, sidecar checksums included).
  megapmp big    build_shard with workers=max(--workers) on the --big-pairs file, to check that peak RSS
                 stays flat as the input grows.

Peak RSS is ru_maxrss of getrusage(RUSAGE_SELF) (the main process) and of getrusage(RUSAGE_CHILDREN)
(the largest single worker process) as printed by the child at its end. `peak_rss_mb_*` is
main + workers * largest worker, an upper bound on the sum over all processes; the `_100k` keys are the
--pairs run and the `_400k` keys the --big-pairs run whatever their sizes (both at the largest --workers).

Shared-machine context is reported with the results: `cpu_scaling_2proc` (how much work 2 concurrent
CPU-bound processes get done versus 1, 2.0 being two free cores) bounds any workers=2 speedup, and
`other_load_cores_max` is the most CPU other processes used during any run (from /proc/stat minus the
run's own CPU time). `*_cpu_s_per_1k_pairs` is CPU time (main + workers) per 1000 pairs. `outputs_identical`
says whether the baseline's .bin/.idx are byte-identical to megapmp's at every worker count.

Prints ONE JSON line on stdout; progress goes to stderr. Ratios (speedup_*) are what to compare across
machines; absolute rates depend on the CPU.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megapmp.io import get_logger, sha256_file

# Modules whose source (read via inspect.getsource) is the code text of the synthetic pairs.
SOURCE_MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "csv", "dataclasses", "datetime", "difflib",
    "email.message", "enum", "fractions", "functools", "gettext", "gzip", "heapq", "http.client", "inspect",
    "ipaddress", "json.decoder", "json.encoder", "logging", "pathlib", "pprint", "random", "shlex", "shutil",
    "statistics", "string", "tarfile", "textwrap", "threading", "tokenize", "typing", "urllib.parse", "zipfile",
)
PROMPT_OPENERS = ("Write a Python function", "Implement", "Create a helper", "Write code for",
                  "Implement a Python method", "Provide an implementation of")


log = get_logger(None)


# --------------------------------------------------------------------------------------------------
# Synthetic data


def _corpus():
    """(per-module source lines, [(signature, docstring)]) from the standard library, in a fixed order."""
    sources, described = [], []
    for name in SOURCE_MODULES:
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (OSError, TypeError, ImportError):
            continue
        sources.append(source.splitlines(keepends=True))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 20:
                    args = ", ".join(a.arg for a in node.args.args) if not isinstance(node, ast.ClassDef) else ""
                    described.append((f"{node.name}({args})", " ".join(doc.split())))
    return sources, described


def _code_slice(rng: random.Random, sources, target_chars: int) -> str:
    lines = rng.choice(sources)
    start = rng.randrange(len(lines))
    out, size = [], 0
    for line in lines[start:]:
        out.append(line)
        size += len(line)
        if size >= target_chars:
            break
    text = "".join(out).strip("\n")
    return text if text.strip() else "pass"


def _response_length(rng: random.Random) -> int:
    # Log-normal around ~450 characters, clipped: "a few hundred characters", with a tail.
    return int(min(3000, max(80, rng.lognormvariate(6.1, 0.55))))


def _make_pair(rng: random.Random, sources, described) -> dict:
    signature, doc = rng.choice(described)
    sentences = re.split(r"(?<=[.!?])\s+", doc)
    keep = " ".join(sentences[: rng.randint(1, 4)])[: rng.randint(80, 600)]
    prompt = f"{rng.choice(PROMPT_OPENERS)} `{signature}`. {keep}"
    chosen = _code_slice(rng, sources, _response_length(rng))
    if rng.random() < 0.5:  # a weaker model's attempt: the same code with lines dropped
        lines = chosen.splitlines()
        dropped = {rng.randrange(len(lines)) for _ in range(max(1, len(lines) // 6))}
        rejected = "\n".join(line for i, line in enumerate(lines) if i not in dropped or len(lines) == 1)
    else:  # an unrelated, usually shorter, attempt
        rejected = _code_slice(rng, sources, int(_response_length(rng) * 0.8))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected or "pass"}


def generate(path_small: Path, n_small: int, path_big: Path | None, n_big: int, seed: int) -> None:
    """The first n_small pairs of the big file are exactly the small file."""
    sources, described = _corpus()
    rng = random.Random(seed)
    total = max(n_small, n_big if path_big else 0)
    small = open(path_small, "w", encoding="utf-8")
    big = open(path_big, "w", encoding="utf-8") if path_big else None
    try:
        for i in range(total):
            line = json.dumps(_make_pair(rng, sources, described)) + "\n"
            if i < n_small:
                small.write(line)
            if big:
                big.write(line)
    finally:
        small.close()
        if big:
            big.close()


def sample_texts(path: Path, n_pairs: int):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= n_pairs:
                return
            record = json.loads(line)
            yield record["prompt"]
            yield record["chosen"]
            yield record["rejected"]


# --------------------------------------------------------------------------------------------------
# Child processes (one measured run each)


def _rss_report() -> dict:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # Linux reports ru_maxrss in KiB. cpu_s: CPU seconds of this process and its waited-for workers.
    return {"rss_main_mb": me.ru_maxrss / 1024, "rss_children_mb": kids.ru_maxrss / 1024,
            "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}


def child_baseline(input_path: str, tokenizer: str, prefix: str) -> dict:
    """The plain single-process loop with a Megatron-style builder."""
    import struct

    import numpy as np

    start = time.perf_counter()
    if tokenizer == "byte":
        encode, eos_id, vocab_size = (lambda text: list(text.encode("utf-8"))), 256, 258
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
        eos_id = tok.token_to_id("<|endoftext|>")
        vocab_size = tok.get_vocab_size(with_added_tokens=True) + 1  # megapmp appends <|pad|> when absent
        if tok.token_to_id("<|pad|>") is not None:
            vocab_size -= 1
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    sequence_lengths, document_indices = [], [0]
    pairs = tokens = 0
    with open(prefix + ".bin", "wb") as data_file, open(input_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for key, eos in (("prompt", []), ("chosen", [eos_id]), ("rejected", [eos_id])):
                ids = encode(record[key]) + eos
                data_file.write(np.array(ids, dtype=dtype).tobytes(order="C"))
                sequence_lengths.append(len(ids))
                tokens += len(ids)
            document_indices.append(len(sequence_lengths))
            pairs += 1
    # Megatron's _IndexWriter layout (MMIDIDX v1).
    lengths = np.array(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    code = {np.uint16: 8, np.int32: 4}[dtype]
    with open(prefix + ".idx", "wb") as idx:
        idx.write(b"MMIDIDX\x00\x00")
        idx.write(struct.pack("<Q", 1))
        idx.write(struct.pack("<B", code))
        idx.write(struct.pack("<Q", len(lengths)))
        idx.write(struct.pack("<Q", len(document_indices)))
        idx.write(lengths.tobytes(order="C"))
        idx.write(pointers.tobytes(order="C"))
        idx.write(np.array(document_indices, dtype=np.int64).tobytes(order="C"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs": pairs, "tokens": tokens, **_rss_report()}


def child_megapmp(input_path: str, tokenizer: str, prefix: str, workers: int) -> dict:
    from megapmp.data.preprocess import build_shard

    start = time.perf_counter()
    counts = build_shard([input_path], prefix, tokenizer=tokenizer, workers=workers, overwrite=True,
                         progress=False)  # --repeat rebuilds the same prefix
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs": counts["pairs"], "tokens": counts["tokens"],
            "internal_seconds": counts["seconds"], **_rss_report()}


def _busy_cpu_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine so far (all processes, all users), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(args: list[str]) -> dict:
    """One measured run in a fresh interpreter. `other_load_cores` is the CPU that other processes on the
    machine used meanwhile, in cores: a shared machine's noise, reported so results can be judged."""
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    busy0, t0 = _busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", *args], env=env,
                          stdout=subprocess.PIPE, text=True)
    busy1, wall = _busy_cpu_seconds(), time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if busy0 is not None and busy1 is not None:
        result["other_load_cores"] = max(0.0, (busy1 - busy0) - result["cpu_s"]) / wall
    return result


def cpu_scaling_probe(seconds: float) -> float | None:
    """Sustained throughput of 2 concurrent CPU-bound processes over 1, on this machine right now
    (2.0 = two full cores). Tells whether a workers=2 speedup is possible at all."""
    if seconds <= 0:
        return None
    code = ("import time,sys\nt=time.perf_counter();n=0\n"
            "while time.perf_counter()-t<float(sys.argv[1]):\n    for i in range(100000): pass\n    n+=1\n"
            "print(n)")
    def run(k):
        procs = [subprocess.Popen([sys.executable, "-c", code, str(seconds)], stdout=subprocess.PIPE, text=True)
                 for _ in range(k)]
        return sum(int(p.communicate()[0]) for p in procs)
    one = run(1)
    two = run(2)
    return two / one


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=100_000,
                   help="pairs in the file every throughput run uses (default 100000)")
    p.add_argument("--big-pairs", type=int, default=400_000,
                   help="pairs in the bigger file for the RSS-flatness check, run once with the largest --workers "
                        "(default 400000; 0 skips it). Its first --pairs lines are the --pairs file")
    p.add_argument("--tokenizer", default="bpe:4096", metavar="SPEC",
                   help="bpe:N (default bpe:4096): train an N-token byte-level BPE once with "
                        "megapmp.data.tokenizers.train_bpe on the first --bpe-sample-pairs pairs and give its "
                        "tokenizer.json to every run; a path to a tokenizer.json; or byte")
    p.add_argument("--bpe-sample-pairs", type=int, default=10_000,
                   help="pairs the BPE is trained on (default 10000)")
    p.add_argument("--workers", default="1,2", metavar="N,N,...",
                   help="comma-separated worker counts for megapmp runs (default 1,2); speedup_wN and "
                        "megapmp_wN_* keys are reported for each")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each measurement on the --pairs file, interleaved (baseline, w1, w2, baseline, "
                        "...); the run of median time is reported (default 1)")
    p.add_argument("--cpu-probe-seconds", type=float, default=5.0,
                   help="before the runs, time 1 and then 2 concurrent busy-loop processes for this long and "
                        "report cpu_scaling_2proc (2.0 = two full cores; a shared or throttled VM gives less, "
                        "which caps any workers=2 speedup); 0 skips it (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep the data, tokenizer and shards there (reused: an existing data "
                        "file and tokenizer of the same settings are not regenerated); default: a temporary "
                        "directory removed at the end")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        mode, *rest = args._child
        if mode == "baseline":
            result = child_baseline(*rest)
        else:
            result = child_megapmp(rest[0], rest[1], rest[2], int(rest[3]))
        print(json.dumps(result))
        return 0

    workers = [int(w) for w in args.workers.split(",") if w]
    if not workers or min(workers) < 1:
        raise SystemExit("--workers needs positive counts")
    if args.pairs < 1:
        raise SystemExit("--pairs must be at least 1")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_preprocess."))
    work.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    try:
        tag = f"s{args.seed}_n{args.pairs}"
        small = work / f"pairs_{tag}.jsonl"
        big = work / f"pairs_s{args.seed}_n{args.big_pairs}.jsonl" if args.big_pairs else None
        if big == small:
            big = None
        if not small.exists() or (big and not big.exists()):
            log(f"generating {args.pairs} (+ big {args.big_pairs}) pairs in {work} ...")
            t = time.perf_counter()
            generate(small, args.pairs, big, args.big_pairs, args.seed)
            log(f"  done in {time.perf_counter() - t:.1f}s ({small.stat().st_size / 1e6:.1f} MB small)")

        tokenizer, tokenizer_label = args.tokenizer, args.tokenizer
        if args.tokenizer.startswith("bpe:"):
            vocab = int(args.tokenizer.split(":", 1)[1])
            tok_dir = work / f"bpe{vocab}_{tag}_{args.bpe_sample_pairs}"
            if not (tok_dir / "tokenizer.json").exists():
                log(f"training a {vocab}-token BPE on {args.bpe_sample_pairs} pairs ...")
                t = time.perf_counter()
                from megapmp.data.tokenizers import train_bpe

                train_bpe(sample_texts(small, args.bpe_sample_pairs), vocab, tok_dir)
                log(f"  done in {time.perf_counter() - t:.1f}s")
            tokenizer = str(tok_dir / "tokenizer.json")
        elif args.tokenizer != "byte":
            tokenizer = str(Path(args.tokenizer).resolve())

        runs: dict[str, list[dict]] = {}

        def run_once(name: str, child_args: list[str], i: int, repeat: int) -> None:
            log(f"run {name} ({i + 1}/{repeat}) ...")
            result = run_child(child_args)
            log(f"  {result['pairs'] / result['seconds']:.0f} pairs/s, {result['seconds']:.1f}s, "
                f"cpu {result['cpu_s']:.1f}s, rss main {result['rss_main_mb']:.0f} MB, largest worker "
                f"{result['rss_children_mb']:.0f} MB, other processes' load {result.get('other_load_cores', 0):.2f} cores")
            runs.setdefault(name, []).append(result)

        def median_run(name: str) -> dict:
            return sorted(runs[name], key=lambda r: r["seconds"])[len(runs[name]) // 2]

        scaling = cpu_scaling_probe(args.cpu_probe_seconds)
        if scaling is not None:
            log(f"cpu probe: 2 busy processes deliver {scaling:.2f}x the work of 1")
        # Interleaved, so that load from elsewhere on a shared machine hits every variant alike.
        plan = [("baseline", ["baseline", str(small), tokenizer, str(work / "baseline")])]
        plan += [(f"megapmp_w{w}", ["megapmp", str(small), tokenizer, str(work / f"megapmp_w{w}"), str(w)])
                 for w in workers]
        for i in range(args.repeat):
            for name, child_args in plan:
                run_once(name, child_args, i, args.repeat)
        base = median_run("baseline")
        mega = {w: median_run(f"megapmp_w{w}") for w in workers}
        wmax = max(workers)
        big_run = None
        if big:
            run_once(f"megapmp_w{wmax}_big", ["megapmp", str(big), tokenizer, str(work / "megapmp_big"), str(wmax)],
                     0, 1)
            big_run = runs[f"megapmp_w{wmax}_big"][0]

        identical = all(sha256_file(work / f"baseline.{ext}") == sha256_file(work / f"megapmp_w{w}.{ext}")
                        for w in workers for ext in ("bin", "idx"))
        if any(m["tokens"] != base["tokens"] or m["pairs"] != base["pairs"] for m in mega.values()):
            raise SystemExit("megapmp and the baseline disagree on pair/token counts")

        def total_rss(r: dict, w: int) -> float:
            return r["rss_main_mb"] + (w * r["rss_children_mb"] if w > 1 else 0.0)

        base_rate = base["pairs"] / base["seconds"]
        out = {"pairs": base["pairs"], "tokens": base["tokens"],
               "baseline_pairs_per_s": round(base_rate, 1),
               "baseline_tokens_per_s": round(base["tokens"] / base["seconds"], 1),
               "baseline_peak_rss_mb": round(base["rss_main_mb"], 1)}
        for w, m in mega.items():
            out[f"megapmp_w{w}_pairs_per_s"] = round(m["pairs"] / m["seconds"], 1)
            out[f"megapmp_w{w}_tokens_per_s"] = round(m["tokens"] / m["seconds"], 1)
        for w, m in mega.items():
            out[f"speedup_w{w}"] = round((m["pairs"] / m["seconds"]) / base_rate, 3)
        out["baseline_cpu_s_per_1k_pairs"] = round(1000 * base["cpu_s"] / base["pairs"], 3)
        for w, m in mega.items():
            out[f"megapmp_w{w}_cpu_s_per_1k_pairs"] = round(1000 * m["cpu_s"] / m["pairs"], 3)
        for w, m in mega.items():
            out[f"megapmp_w{w}_peak_rss_main_mb"] = round(m["rss_main_mb"], 1)
            out[f"megapmp_w{w}_peak_rss_worker_mb"] = round(m["rss_children_mb"], 1) if w > 1 else None
        small_w = mega[wmax]
        out.update({
            "rss_check_workers": wmax,
            "peak_rss_mb_100k": round(total_rss(small_w, wmax), 1),
            "peak_rss_main_mb_100k": round(small_w["rss_main_mb"], 1),
            "peak_rss_worker_mb_100k": round(small_w["rss_children_mb"], 1),
        })
        if big_run:
            out.update({
                "peak_rss_mb_400k": round(total_rss(big_run, wmax), 1),
                "peak_rss_main_mb_400k": round(big_run["rss_main_mb"], 1),
                "peak_rss_worker_mb_400k": round(big_run["rss_children_mb"], 1),
                "big_pairs_per_s": round(big_run["pairs"] / big_run["seconds"], 1),
            })
        out.update({
            "big_pairs": args.big_pairs, "repeat": args.repeat, "outputs_identical": identical,
            "cpu_scaling_2proc": None if scaling is None else round(scaling, 3),
            "other_load_cores_max": round(max(r.get("other_load_cores", 0.0) for rs in runs.values() for r in rs), 2),
            "tokenizer": tokenizer_label if tokenizer_label == "byte" else
            (f"{tokenizer_label} (trained on {args.bpe_sample_pairs} pairs)" if tokenizer_label.startswith("bpe:")
             else tokenizer_label),
            "cpu_count": os.cpu_count(), "device": "cpu",
            "python": sys.version.split()[0], "wall_s": round(time.perf_counter() - wall_start, 1),
        })
        print(json.dumps(out), flush=True)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
