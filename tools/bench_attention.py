#!/usr/bin/env python
"""Time the attention backends on CodePMP-shaped packed pairs, and print what megapmp would use here.

    python tools/bench_attention.py              # the backend report only (megapmp.accelerators)
    python tools/bench_attention.py --bench      # plus forward + backward of each usable backend, one JSON line each

Each record: layout, backend, rows, median seconds, attention TFLOP/s on the attended pairs
(megapmp.flops) and the relative error of output and dq against the dense ``sdpa`` reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.accelerators import backend_report, format_report  # noqa: E402
from megapmp.data.datasets import Pair  # noqa: E402
from megapmp.data.packing import pack_pairs  # noqa: E402
from megapmp.flops import attention_pairs  # noqa: E402
from megapmp.model.attention import AttentionInputs, attention, backend_available  # noqa: E402


def benchmark_attention(device: str = "auto", seq_len: int = 2048, pairs: int = 48, lengths=(100, 300),
                        heads: int = 28, kv_heads: int = 4, head_dim: int = 128, steps: int = 10,
                        backends=None, seed: int = 0) -> list[dict]:
    """Forward + backward of each usable attention backend on CodePMP-shaped packed rows (prompt and
    each response uniform in ``lengths``; Qwen2-7B heads by default), both pair layouts, the same rows
    for every backend. Reports median seconds, TFLOP/s on the attended pairs (``megapmp.flops``) and the
    relative error of output and dq against the dense ``sdpa`` reference. CPU: process time, 1 thread."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        return _run_benchmark(device, dtype, seq_len, pairs, lengths, heads, kv_heads, head_dim, steps, backends, seed)
    finally:
        torch.set_num_threads(threads)


def _run_benchmark(device, dtype, seq_len, pairs, lengths, heads, kv_heads, head_dim, steps, backends, seed):
    cuda = device.type == "cuda"
    rng = np.random.default_rng(seed)
    items = [Pair(*(np.arange(rng.integers(lengths[0], lengths[1] + 1)) for _ in range(3))) for _ in range(pairs)]
    names = backends or ["sdpa", "segmented", "flash_attn", "torch_varlen"]
    clock = time.perf_counter if cuda else time.process_time
    results = []
    for layout in ("duplicated", "shared-prefix"):
        packed = pack_pairs(items, seq_len, layout, pad_id=0)
        attn = AttentionInputs.from_segments(packed.segment_ids, packed.branch_ids).to(device)
        rows = attn.shape[0]
        torch.manual_seed(seed)
        q = torch.randn(rows, seq_len, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(rows, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(rows, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(q)
        flops = 3 * 4 * heads * head_dim * attention_pairs(packed.segment_ids, packed.branch_ids)
        reference = None
        for name in names:
            ok, reason = backend_available(name, device, dtype)
            if not ok:
                results.append({"layout": layout, "backend": name, "skipped": reason})
                continue

            def once():
                out = attention(q, k, v, attn, name)
                dq, = torch.autograd.grad(out, q, grad)
                return out.detach(), dq

            out, dq = once()  # warm-up, plan building, and the values compared below
            if name == "sdpa":
                reference = (out.float(), dq.float())
            times = []
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                once()
                if cuda:
                    torch.cuda.synchronize()
                times.append(clock() - start)
            seconds = float(np.median(times))
            record = {"layout": layout, "backend": name, "rows": rows, "seconds": seconds,
                      "attn_tflops": flops / seconds / 1e12}
            if reference is not None:
                record["rel_err_out"] = float((out.float() - reference[0]).norm() / reference[0].norm())
                record["rel_err_dq"] = float((dq.float() - reference[1]).norm() / reference[1].norm())
            results.append(record)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench_attention.py", description="Print what megapmp would use here; --bench times attention.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention", default="auto", help="attention backend to resolve (default auto)")
    parser.add_argument("--bench", action="store_true", help="time the attention backends on packed pairs")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--lengths", default="100,300", help="LO,HI tokens of the prompt and of each response")
    parser.add_argument("--heads", default="28,4,128", help="query heads, kv heads, head dim (Qwen2-7B)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backends", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(format_report(backend_report(device, dtype, args.attention)))
    if args.bench:
        heads, kv_heads, head_dim = (int(x) for x in args.heads.split(","))
        lo, hi = (int(x) for x in args.lengths.split(","))
        for record in benchmark_attention(str(device), args.seq_len, args.pairs, (lo, hi), heads, kv_heads, head_dim,
                                          args.steps, args.backends.split(",") if args.backends else None):
            print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
