#!/usr/bin/env python
"""Packing efficiency of megapmp's pair packing against the seed's padded batches, on real code.

Pairs are made from the Python standard library this interpreter ships (sysconfig's "stdlib" path,
site-packages excluded, files in sorted order): every function (def / async def) with a docstring gives
one pair with
    prompt   = its signature ("def name(args) -> ret:") + newline + its docstring,
    chosen   = the function's source (dedented),
    rejected = the same source with ONE line dropped (a non-blank line after the docstring, chosen by a
               seeded RNG; a line of the docstring if the body has nothing else).
The pairs go through the real pipeline: a JSONL file -> megapmp.data.preprocess.build_shard (EOS appended
to each response, the default) with --max-length (default 1024) tokens per prompt + response, pairs over
it dropped and counted (dropped_overlong) -> megapmp.data.datasets.PairDataset. The pairs are then shuffled
(seeded) and accounted for in two ways:

  seed     CodePMP's reward_trainer (HF Trainer): batches of --seed-batch (4) pairs; the chosen sequences
           (P+C) are padded to the longest in the batch, and the rejected sequences (P+R) separately to theirs.
           efficiency = real tokens / padded tokens, where real = sum(P+C) + sum(P+R).
  megapmp  megapmp.data.packing.pack_pairs over consecutive groups of --pairs-per-pack pairs into rows of
           --seq-len tokens (first-fit of whole pairs), layouts
             duplicated     [P C][P R]: real tokens = 2P + C + R per pair
             shared-prefix  [P C R]:    real tokens =  P + C + R per pair (P counted once)
           efficiency = real tokens / (rows * seq_len).

shared_prefix_token_reduction = 1 - (shared-prefix row tokens) / (duplicated row tokens): the fraction of
row tokens (compute) shared-prefix packing saves against duplicated packing at the same seq_len and
pack size; shared_prefix_real_token_reduction is the same for real tokens only (the repeated prompts).
*_row_tokens_per_pair are padded/row tokens per pair, the cost that decides throughput.

Prints ONE JSON line: the top-level keys are for the first --seq-len and first --pairs-per-pack, and
`grid` holds the same keys for every (seq_len, pairs_per_pack) combination. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from megapmp.io import get_logger


log = get_logger(None)


def stdlib_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _signature(node) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def pairs_from_source(source: str, rng: random.Random):
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not doc.strip():
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # decorators belong to the source
        body = lines[first - 1 : node.end_lineno]
        if len(body) < 2:
            continue
        chosen = textwrap.dedent("\n".join(body))
        chosen_lines = chosen.splitlines()
        doc_end = node.body[0].end_lineno - first  # index of the docstring's last line within chosen_lines
        candidates = [i for i in range(doc_end + 1, len(chosen_lines)) if chosen_lines[i].strip()]
        if not candidates:
            candidates = [i for i in range(1, len(chosen_lines)) if chosen_lines[i].strip()]
        if not candidates:
            continue
        drop = rng.choice(candidates)
        rejected = "\n".join(line for i, line in enumerate(chosen_lines) if i != drop)
        if not rejected.strip():
            continue
        yield {"prompt": f"{_signature(node)}\n{doc}", "chosen": chosen, "rejected": rejected}


def write_pairs(path: Path, seed: int, limit_files: int | None) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    stats = {"files": 0, "unreadable_files": 0, "functions": 0}
    with open(path, "w", encoding="utf-8") as out:
        for i, file in enumerate(stdlib_files(root)):
            if limit_files is not None and i >= limit_files:
                break
            try:
                source = file.read_bytes().decode("utf-8")
                pairs = list(pairs_from_source(source, rng))
            except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
                stats["unreadable_files"] += 1
                continue
            stats["files"] += 1
            for pair in pairs:
                out.write(json.dumps(pair) + "\n")
                stats["functions"] += 1
    stats["stdlib"] = str(root)
    return stats


def seed_padded(p: np.ndarray, c: np.ndarray, r: np.ndarray, batch: int) -> tuple[int, int]:
    """(real, padded) tokens when chosen and rejected sequences are each padded to their batch's longest."""
    real = padded = 0
    for s in range(0, len(p), batch):
        pc, pr = p[s : s + batch] + c[s : s + batch], p[s : s + batch] + r[s : s + batch]
        real += int(pc.sum() + pr.sum())
        padded += int(len(pc) * pc.max() + len(pr) * pr.max())
    return real, padded


def megapmp_packed(dataset, order: np.ndarray, seq_len: int, per_pack: int, layout: str, pad_id: int):
    """(real, row tokens, rows) when groups of per_pack pairs are packed with pack_pairs."""
    from megapmp.data.packing import pack_pairs

    real = row_tokens = rows = 0
    for s in range(0, len(order), per_pack):
        batch = pack_pairs([dataset[int(i)] for i in order[s : s + per_pack]], seq_len, layout, pad_id)
        real += batch.num_real_tokens
        row_tokens += batch.input_ids.size
        rows += batch.shape[0]
    return real, row_tokens, rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="bpe:4096", metavar="SPEC",
                   help="bpe:N (default bpe:4096: a byte-level BPE trained by build_shard on the pairs), byte, or "
                        "a tokenizer.json / tokenizer directory")
    p.add_argument("--max-length", type=int, default=1024,
                   help="max tokens of prompt + response (EOS included), for each response; longer pairs are "
                        "dropped and counted in dropped_overlong (default 1024, the paper's)")
    p.add_argument("--seq-len", default="2048,4096", metavar="S,S,...",
                   help="megapmp row lengths to report (default 2048,4096; each must be >= 2 * --max-length so "
                        "any pair fits in the duplicated layout)")
    p.add_argument("--pairs-per-pack", default="64,256", metavar="N,N,...",
                   help="pairs packed together per pack_pairs call, i.e. per micro-batch (default 64,256)")
    p.add_argument("--seed-batch", type=int, default=4,
                   help="pairs per padded batch of the seed trainer (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for the dropped line and the shuffle (default 0)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="build_shard tokenizer processes (default min(2, cpus))")
    p.add_argument("--limit-files", type=int, default=None,
                   help="use only the first N stdlib files (for a quick look)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep the JSONL and shard there; default: a temporary directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megapmp.data.datasets import PairDataset
    from megapmp.data.preprocess import build_shard

    seq_lens = [int(x) for x in args.seq_len.split(",") if x]
    packs = [int(x) for x in args.pairs_per_pack.split(",") if x]
    too_short = [s for s in seq_lens if s < 2 * args.max_length]
    if too_short or not seq_lens or not packs or min(packs) < 1:
        raise SystemExit(f"--seq-len values must be >= 2 * --max-length ({2 * args.max_length}): {too_short}; "
                         "--pairs-per-pack values must be positive")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_packing."))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        jsonl = work / "stdlib_pairs.jsonl"
        log(f"extracting pairs from the standard library into {jsonl} ...")
        source_stats = write_pairs(jsonl, args.seed, args.limit_files)
        log(f"  {source_stats['functions']} functions with docstrings in {source_stats['files']} files")
        log(f"tokenizing with {args.tokenizer} (max length {args.max_length}) ...")
        counts = build_shard([str(jsonl)], str(work / "shard"), tokenizer=args.tokenizer, workers=args.workers,
                             max_length=args.max_length, overlong="error", on_error="skip",
                             rejects_path=str(work / "rejects.jsonl"), overwrite=True,  # --keep reruns
                             progress=False)
        reasons = [json.loads(line)["reason"] for line in open(work / "rejects.jsonl", encoding="utf-8")]
        dropped_overlong = sum("--max-length" in reason for reason in reasons)
        ds = PairDataset(str(work / "shard"))
        pad_id = ds.meta.pad_id
        order = np.random.default_rng(args.seed).permutation(len(ds))
        p = ds.prompt_lengths.astype(np.int64)[order]
        c = ds.chosen_lengths.astype(np.int64)[order]
        r = ds.rejected_lengths.astype(np.int64)[order]
        n = len(ds)
        seed_real, seed_padded_tokens = seed_padded(p, c, r, args.seed_batch)
        log(f"{n} pairs; seed padded efficiency {seed_real / seed_padded_tokens:.4f}")

        grid = []
        for seq_len in seq_lens:
            for per_pack in packs:
                dup_real, dup_rows_tok, dup_rows = megapmp_packed(ds, order, seq_len, per_pack, "duplicated", pad_id)
                sp_real, sp_rows_tok, sp_rows = megapmp_packed(ds, order, seq_len, per_pack, "shared-prefix", pad_id)
                assert dup_real == seed_real, "duplicated real tokens must equal the seed's real tokens"
                entry = {
                    "seq_len": seq_len, "pairs_per_pack": per_pack,
                    "seed_padded_efficiency": round(seed_real / seed_padded_tokens, 4),
                    "megapmp_duplicated_efficiency": round(dup_real / dup_rows_tok, 4),
                    "megapmp_shared_prefix_efficiency": round(sp_real / sp_rows_tok, 4),
                    "shared_prefix_token_reduction": round(1 - sp_rows_tok / dup_rows_tok, 4),
                    "shared_prefix_real_token_reduction": round(1 - sp_real / dup_real, 4),
                    "seed_row_tokens_per_pair": round(seed_padded_tokens / n, 1),
                    "megapmp_duplicated_row_tokens_per_pair": round(dup_rows_tok / n, 1),
                    "megapmp_shared_prefix_row_tokens_per_pair": round(sp_rows_tok / n, 1),
                    "duplicated_rows": dup_rows, "shared_prefix_rows": sp_rows,
                }
                log(f"  seq_len {seq_len}, {per_pack} pairs/pack: duplicated {entry['megapmp_duplicated_efficiency']}, "
                    f"shared-prefix {entry['megapmp_shared_prefix_efficiency']}, "
                    f"saves {entry['shared_prefix_token_reduction']:.1%} of row tokens")
                grid.append(entry)

        out = {"pairs": n, "dropped_overlong": dropped_overlong,
               "rejected_other": len(reasons) - dropped_overlong, **grid[0],
               "tokens": counts["tokens"],
               "mean_prompt_tokens": round(float(p.mean()), 1),
               "mean_chosen_tokens": round(float(c.mean()), 1),
               "mean_rejected_tokens": round(float(r.mean()), 1),
               "max_length": args.max_length, "seed_batch": args.seed_batch,
               "tokenizer": args.tokenizer, "source": source_stats,
               "python": sys.version.split()[0], "grid": grid, "wall_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(out), flush=True)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
