#!/usr/bin/env python
"""Memory and time of the fused packed-pair loss against the seed's naive logits path. Prints ONE JSON line.

Every side computes the PMP loss of one micro-batch, forward and backward,

    loss = lm_sum / T + rm_sum / N,   lm_sum = CE over T chosen-response tokens,  rm_sum = -log sigmoid(margins)

from the same inputs: hidden rows of the T target tokens [T, H], the LM head [V, H], targets [T], the
reward rows of N pairs [N, H] x 2 and the score head [1, H]; gradients w.r.t. all five.

Sides (--sides; default naive,triton_recompute,triton on CUDA, naive,torch,chunked on CPU), all measured
in one run from the same inputs:
  naive             the seed implementation: logits [T, V] in the model dtype (kept alive until backward is
                    done, as the seed's model output is), an fp32 copy, F.cross_entropy
                    (megapmp_kernels.pair_loss.naive_pair_loss).
  triton            fused_pair_loss(backend="triton"): gradients made in forward, --chunk-tokens target rows
                    at a time (bf16 logits by cuBLAS, Triton softmax - onehot in place, cuBLAS dH / dW).
  triton_recompute  fused_pair_loss(backend="triton_recompute"): tiled Triton log-sum-exp, logits
                    recomputed in backward (--chunk-bytes of grad-logits at a time).
  torch             fused_pair_loss(backend="torch"): chunks of --chunk-tokens rows, gradients in forward
                    (the CPU path; on CUDA its dW GEMM runs in fp32).
  chunked           the torch backend's LM algorithm called directly (ChunkedLinearCrossEntropy + fp32
                    rewards), --chunk-tokens rows at a time.
Each side S reports S_ms, S_peak_bytes, S_workspace_bytes, S_speedup (naive_ms / S_ms), S_memory_ratio,
S_max_rel_err and S_rel_err. The fused_* keys (and speedup, memory_ratio, max_rel_err, fused_impl) repeat
the side that --backend selects (auto: triton on CUDA when triton works, torch otherwise), as before.

Memory (peak bytes above the baseline once the inputs exist; both sides include their gradient outputs,
whose total is grad_bytes, so *_workspace_bytes = peak - grad_bytes is what each side needs on top of
what any implementation must return):
  cuda  torch.cuda.max_memory_allocated() - memory_allocated() before the measured step (after a warm-up
        step, which also autotunes the kernels), one process.
  cpu   torch has no CPU allocator statistics, so: a fresh subprocess per side, run with
        MALLOC_MMAP_THRESHOLD_=65536 (every allocation over 64 KiB is its own mapping, returned to the OS
        when freed, so RSS follows the live tensors instead of glibc's free lists): a warm-up step,
        malloc_trim, reset the kernel's peak-RSS counter (/proc/self/clear_refs 5), then VmHWM - VmRSS
        around the measured step.

Time: median of --reps forward+backward steps. CUDA: events after synchronising. CPU: a third process
(default allocator) alternating naive and fused steps, --threads intra-op threads, so that load from other
processes hits both sides alike. On CPU compare ratios only (DESIGN.md principle 12).

max_rel_err: max over loss terms and gradients of ||fused - naive|| / ||naive|| (naive computes bf16
logits on GPU, so expect ~1e-3 there; fp32 on CPU ~1e-6); rel_err has each term.

Shapes (--tokens / --pairs override T / N):
  qwen2-1.5b  V=151936 H=1536 T=4096 N=16  (GPU; 4k-16k tokens)
  qwen2-7b    V=152064 H=3584 T=4096 N=16  (GPU)
  small       V=16384  H=256  T=1024 N=8   (CPU)
  medium      V=32768  H=512  T=2048 N=16  (CPU)
--chunk-bytes: triton_recompute's backward grad-logits workspace. Default: the library's 256 MiB on the
Qwen2 shapes; on the reduced CPU shapes the same budget scaled by T*V / (4096*152064), i.e. the fraction
of the logits it covers at Qwen2 scale with 4k tokens, so that the reduced shapes keep the real proportions.
--chunk-tokens: rows per logits chunk of triton, torch and chunked. Default on CUDA: the library's
GRAD_IN_FORWARD_CHUNK_TOKENS; on CPU: the rows whose fp32 logits fit --chunk-bytes (as before).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from megapmp.io import get_logger

SHAPES = {
    "qwen2-1.5b": dict(vocab=151936, hidden=1536, tokens=4096, pairs=16),
    "qwen2-7b": dict(vocab=152064, hidden=3584, tokens=4096, pairs=16),
    "small": dict(vocab=16384, hidden=256, tokens=1024, pairs=8),
    "medium": dict(vocab=32768, hidden=512, tokens=2048, pairs=16),
}
QWEN_SCALE = 4096 * 152064
ALL_SIDES = ("naive", "triton", "triton_recompute", "torch", "chunked")
ACCUMULATE_MODES = ("addmm", "mm", "cast")
DEFAULT_SIDES = {"cuda": ("naive", "triton_recompute", "triton"), "cpu": ("naive", "torch", "chunked")}
NAMES = ["lm_sum", "rm_sum", "d_hidden", "d_lm_weight", "d_chosen", "d_rejected", "d_score"]


log = get_logger("bench_loss")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-1.5b on cuda, small on cpu")
    p.add_argument("--tokens", type=int, default=None, help="T, target tokens (overrides the shape's)")
    p.add_argument("--pairs", type=int, default=None, help="N, pairs (overrides the shape's)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="model dtype; default bf16 on "
                   "cuda, fp32 on cpu")
    p.add_argument("--backend", choices=["auto", "triton", "triton_recompute", "torch"], default="auto",
                   help="the side the fused_* keys report (auto: triton on CUDA when triton works, else torch); "
                        "added to --sides if missing")
    p.add_argument("--sides", default=None, help="comma-separated sides to measure, from "
                   f"{','.join(ALL_SIDES)} (default: {','.join(DEFAULT_SIDES['cuda'])} on cuda, "
                   f"{','.join(DEFAULT_SIDES['cpu'])} on cpu); naive is always measured")
    p.add_argument("--chunk-bytes", type=int, default=None, help="triton_recompute's backward workspace (see above)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="rows per logits chunk of triton, torch and "
                   "chunked (see above)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side (default 20 cuda, 3 cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute-config", default=None, metavar="BT,BV,BD,WARPS,STAGES",
                   help="run triton_recompute with this one tile config instead of autotuning its candidates "
                        "(a cold autotune compiles and times 12 configs: most of a device check's minute)")
    p.add_argument("--accumulate", default="", metavar="MODE,...",
                   help="also time the triton side with its fp32 accumulation of the LM head's gradient pinned to "
                        "each MODE (addmm, mm, cast; megapmp_kernels.pair_loss.fp32_accumulation_mode), as sides "
                        "triton@MODE; the probed mode is reported as fp32_accumulation_mode")
    p.add_argument("--compile-report", action="store_true", help="no benchmark: compile the kernels' autotune "
                   "candidates for sm_90 on this machine (no GPU needed) and print one JSON line with registers, "
                   "spills, shared memory and HGMMA / LDGSTS counts per config")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a side's name, or "timing"
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("qwen2-1.5b" if args.device == "cuda" else "small")
    shape = SHAPES[args.shape]
    args.tokens = args.tokens or shape["tokens"]
    args.pairs = args.pairs or shape["pairs"]
    args.vocab, args.hidden = shape["vocab"], shape["hidden"]
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.reps = args.reps or (20 if args.device == "cuda" else 3)
    if args.chunk_bytes is None:
        from megapmp_kernels.pair_loss import DEFAULT_CHUNK_BYTES

        scale = 1.0 if args.shape.startswith("qwen2") else min(1.0, args.tokens * args.vocab / QWEN_SCALE)
        args.chunk_bytes = int(DEFAULT_CHUNK_BYTES * scale)
    if args.chunk_tokens is None:
        from megapmp_kernels.pair_loss import GRAD_IN_FORWARD_CHUNK_TOKENS

        args.chunk_tokens = GRAD_IN_FORWARD_CHUNK_TOKENS if args.device == "cuda" else chunked_rows(args)
    if args.chunk_tokens <= 0 or args.chunk_bytes <= 0:
        p.error("--chunk-tokens and --chunk-bytes must be positive")
    args.fused_side = fused_side(args)
    sides = args.sides.split(",") if args.sides else list(DEFAULT_SIDES[args.device])
    sides += [f"triton@{mode}" for mode in args.accumulate.split(",") if mode]
    unknown = sorted(x for x in sides if side_backend(x)[0] not in ALL_SIDES
                     or (side_backend(x)[1] is not None and (side_backend(x)[0] != "triton"
                                                             or side_backend(x)[1] not in ACCUMULATE_MODES)))
    if unknown:
        p.error(f"--sides / --accumulate: unknown side(s) {unknown}; choose from {','.join(ALL_SIDES)} and "
                f"triton@MODE with MODE in {','.join(ACCUMULATE_MODES)}")
    if args.recompute_config:
        try:
            bt, bv, bd, warps, stages = (int(x) for x in args.recompute_config.split(","))
        except ValueError:
            p.error(f"--recompute-config {args.recompute_config!r}: expected five integers BT,BV,BD,WARPS,STAGES")
        args.recompute_config = {"BT": bt, "BV": bv, "BD": bd, "num_warps": warps, "num_stages": stages}
    # naive first (the reference of every error), each side once, in the order given
    args.sides = list(dict.fromkeys(["naive", *sides, args.fused_side]))
    return args


def fused_side(args) -> str:
    """The backend --backend selects for the fused_* keys (auto: fused_pair_loss's own rule)."""
    if args.backend != "auto":
        return args.backend
    if args.device != "cuda":
        return "torch"
    from megapmp_kernels.pair_loss import triton_available

    return "triton" if triton_available("cuda") else "torch"


def make_inputs(args):
    """The five leaves and the targets, drawn on the device itself (a 7B LM head is 0.5G values: made on
    the host and copied, that alone took a large part of a device check's minute)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    T, H, V, N = args.tokens, args.hidden, args.vocab, args.pairs

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=args.device, dtype=dtype) * scale).requires_grad_()

    leaves = [randn(T, H), randn(V, H, scale=0.02), randn(N, H), randn(N, H), randn(1, H, scale=0.02)]
    targets = torch.randint(0, V, (T,), generator=g, device=args.device)
    return leaves, targets


def side_backend(side: str) -> tuple[str, str | None]:
    """"triton@mm" -> ("triton", "mm"): the triton side with its fp32 accumulation mode pinned."""
    backend, _, mode = side.partition("@")
    return backend, mode or None


def make_step(side, args, leaves, targets):
    import torch
    from megapmp_kernels.pair_loss import fused_pair_loss, naive_pair_loss

    h, w, c, r, s = leaves
    if side == "chunked":
        return chunked_step(args, leaves, targets)
    backend, _ = side_backend(side)
    config = args.recompute_config if backend == "triton_recompute" else None

    def step():
        if side == "naive":
            sums, logits = naive_pair_loss(h, w, targets, c, r, s)
        else:
            sums, logits = fused_pair_loss(h, w, targets, c, r, s, backend=backend, chunk_bytes=args.chunk_bytes,
                                           chunk_tokens=args.chunk_tokens, config=config), None
        loss = sums.lm_sum / args.tokens + sums.rm_sum / args.pairs
        grads = torch.autograd.grad(loss, leaves)
        del logits  # the seed's logits live until backward is done
        return [sums.lm_sum.detach(), sums.rm_sum.detach(), *grads]

    return step


def chunked_rows(args) -> int:
    """Rows per chunk of megapmp.loss's chunked CE for the --chunk-bytes budget of fp32 logits."""
    return max(1, args.chunk_bytes // (4 * args.vocab))


def chunked_step(args, leaves, targets):
    import torch
    import torch.nn.functional as F
    from megapmp_kernels.pair_loss import ChunkedLinearCrossEntropy

    h, w, c, r, s = leaves
    rows = args.chunk_tokens

    def step():
        lm_sum = ChunkedLinearCrossEntropy.apply(h, w, targets, rows)
        weight = s.float().reshape(-1)
        rm_sum = -F.logsigmoid(c.float() @ weight - r.float() @ weight).sum()
        grads = torch.autograd.grad(lm_sum / args.tokens + rm_sum / args.pairs, leaves)
        return [lm_sum.detach(), rm_sum.detach(), *grads]

    return step


def fused_impl(args) -> str:
    return {"torch": "torch-chunked", "triton": "triton-grad-in-forward",
            "triton_recompute": "triton-recompute"}[args.fused_side]


# -- CPU: one subprocess per side ---------------------------------------------------------------------

def _rss_kb():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def cpu_child(args) -> None:
    """--child naive|fused: peak RSS of one step (and its outputs); --child timing: both sides interleaved."""
    import torch

    torch.set_num_threads(args.threads)
    leaves, targets = make_inputs(args)
    if args.child == "timing":
        steps = {side: make_step(side, args, leaves, targets) for side in args.sides}
        times = {side: [] for side in steps}
        for side, step in steps.items():
            step()  # warm-up
        for _ in range(args.reps):  # alternate, so that load from other processes hits both sides alike
            for side, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[side].append(1000 * (time.perf_counter() - t0))
        print(json.dumps({side: statistics.median(t) for side, t in times.items()}), flush=True)
        return
    step = make_step(args.child, args, leaves, targets)
    libc = ctypes.CDLL("libc.so.6")
    out = step()  # warm-up (lazy initialisations stay out of the measured peak)
    del out
    gc.collect()
    libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError as e:  # the warm-up's peak then bounds the reading from above
        log(f"cannot reset the peak-RSS counter ({e}): the peak includes the warm-up step")
    base, _ = _rss_kb()
    out = step()
    _, peak = _rss_kb()
    torch.save([x.float() for x in out], args.out)
    print(json.dumps({"peak_bytes": (peak - base) * 1024}), flush=True)


def run_cpu(args, report) -> dict:
    """Times first (one process alternating every side), then each side's memory in a process of its own;
    ``report(side, measured)`` as each side's memory child finishes."""
    import torch

    results, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-loss-") as tmp:
        for side in ("timing", *args.sides):
            path = os.path.join(tmp, f"{side}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--out", path, "--device", "cpu",
                   "--shape", args.shape, "--tokens", str(args.tokens), "--pairs", str(args.pairs), "--dtype",
                   args.dtype, "--backend", args.backend, "--chunk-bytes", str(args.chunk_bytes), "--reps",
                   str(args.reps), "--threads", str(args.threads), "--seed", str(args.seed),
                   "--chunk-tokens", str(args.chunk_tokens), "--sides", ",".join(args.sides)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            if side != "timing":  # every freed tensor leaves RSS at once (exact live peak; slower allocation)
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            log(f"{side}: T={args.tokens} H={args.hidden} V={args.vocab} ...")
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{side} side failed:\n{done.stderr[-4000:]}")
            results[side] = json.loads(done.stdout.strip().splitlines()[-1])
            if side == "timing":
                continue
            outputs[side] = torch.load(path)
            report(side, {"peak_bytes": results[side]["peak_bytes"], "ms": results["timing"][side],
                          "rel_err": relative_errors(outputs[side], outputs["naive"])})
    return dict(device=f"cpu ({args.threads} thread{'s' if args.threads > 1 else ''})",
                memory_method="subprocess per side (MALLOC_MMAP_THRESHOLD_=65536): VmHWM - VmRSS around one step "
                              "after a warm-up step, malloc_trim and clear_refs; times from one process "
                              "alternating the sides")


def side_keys(side: str, measured: dict, naive: dict, grad_bytes: int) -> dict:
    """The JSON keys of one side: time, peak, workspace (peak less the gradients every side returns),
    ratios to naive, errors against naive."""
    peak, ms = measured.get("peak_bytes"), measured.get("ms")
    naive_peak, naive_ms = naive.get("peak_bytes"), naive.get("ms")
    keys = {f"{side}_ms": ms, f"{side}_peak_bytes": peak,
            f"{side}_workspace_bytes": peak - grad_bytes if peak is not None else None}
    if measured.get("ms_spread"):
        keys[f"{side}_ms_range"] = measured["ms_spread"]
    if measured.get("error"):
        keys[f"{side}_error"] = measured["error"]
    if side != "naive":
        errs = measured.get("rel_err") or {}
        keys.update({
            f"{side}_speedup": naive_ms / ms if naive_ms and ms else None,
            f"{side}_memory_ratio": naive_peak / peak if naive_peak and peak else None,
            f"{side}_workspace_ratio": (naive_peak - grad_bytes) / max(1, peak - grad_bytes)
            if naive_peak and peak else None,
            f"{side}_max_rel_err": max(errs.values()) if errs else None, f"{side}_rel_err": errs,
        })
    return keys


def relative_errors(got, want) -> dict:
    out = {}
    for name, a, b in zip(NAMES, got, want):
        a, b = a.float(), b.float()
        out[name] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return out


# -- CUDA: one process ----------------------------------------------------------------------------------

def run_cuda(args, report) -> dict:
    """Every side in this process, one after the other (naive first, the reference of every error);
    ``report(side, measured)`` as each finishes."""
    import torch
    from megapmp_kernels import pair_loss

    leaves, targets = make_inputs(args)
    naive_out = None
    for side in args.sides:
        backend, mode = side_backend(side)
        step = make_step(side, args, leaves, targets)
        key = (leaves[1].device.type, leaves[1].device.index, leaves[1].dtype)
        probed = pair_loss._FP32_ACCUMULATION.get(key)
        if mode is not None:  # pin the triton side's accumulation through the probe's cache, for this side only
            pair_loss._FP32_ACCUMULATION[key] = mode
        try:
            out = step()  # warm-up; compiles (and autotunes, unless --recompute-config) the fused kernels
            del out
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            times = []
            for _ in range(args.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            measured = {"peak_bytes": peak, "ms": statistics.median(times), "ms_spread": [min(times), max(times)]}
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # an unsupported mode raises RuntimeError
            log(f"{side}: {type(e).__name__}: {e}")
            measured, out = {"peak_bytes": None, "ms": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}, None
            gc.collect()
            torch.cuda.empty_cache()
        finally:
            if mode is not None:
                if probed is None:
                    pair_loss._FP32_ACCUMULATION.pop(key, None)
                else:
                    pair_loss._FP32_ACCUMULATION[key] = probed
        if side == "naive":
            naive_out = out
        measured["rel_err"] = relative_errors(out, naive_out) if out is not None and naive_out is not None else {}
        del out
        report(side, measured)
    return dict(device=torch.cuda.get_device_name(), memory_method="torch.cuda.max_memory_allocated - baseline")


def main(argv=None) -> dict:
    args = parse(argv)
    if args.compile_report:
        os.environ.pop("TRITON_INTERPRET", None)
        from megapmp_kernels.pair_loss import compile_report

        rows = compile_report()
        result = {"compile_report": rows, "target": "sm_90",
                  "ok": all("error" not in r and r["stl"] == 0 and (r["hgmma"] > 0) for r in rows)}
        print(json.dumps(result), flush=True)
        return result
    if args.child:
        cpu_child(args)
        return {}
    import torch

    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    T, H, V, N = args.tokens, args.hidden, args.vocab, args.pairs
    grad_bytes = elt * (T * H + V * H + 2 * N * H + H)
    head = {"tool": "bench_loss", "shape": args.shape, "tokens": T, "hidden": H, "vocab": V, "pairs": N,
            "dtype": args.dtype}
    measured = {}

    def report(side, result):
        """One JSON line per side as it finishes: a bench killed later keeps it."""
        measured[side] = result
        line = {**head, "line": "side", "side": side, **side_keys(side, result, measured["naive"], grad_bytes)}
        print(json.dumps({k.replace(f"{side}_", "", 1) if k.startswith(f"{side}_") else k: v
                          for k, v in line.items()}), flush=True)

    res = run_cpu(args, report) if args.device == "cpu" else run_cuda(args, report)
    result = {
        **head, "line": "summary", "device": res["device"], "sides": args.sides, "fused_impl": fused_impl(args),
        "chunk_bytes": args.chunk_bytes, "chunk_tokens": args.chunk_tokens, "chunked_rows": args.chunk_tokens,
        "recompute_config": args.recompute_config, "fp32_accumulation_mode": accumulation_mode(args),
        "grad_bytes": grad_bytes, "memory_method": res["memory_method"], "torch": torch.__version__,
    }
    naive = measured["naive"]
    for side, side_result in measured.items():
        result.update(side_keys(side, side_result, naive, grad_bytes))
    fused = side_keys("fused", measured[args.fused_side], naive, grad_bytes)  # the --backend side, as before
    result.update(fused)
    result.update(speedup=fused["fused_speedup"], memory_ratio=fused["fused_memory_ratio"],
                  workspace_ratio=fused["fused_workspace_ratio"], max_rel_err=fused["fused_max_rel_err"],
                  rel_err=fused["fused_rel_err"])
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print(json.dumps(result), flush=True)
    return result


def accumulation_mode(args) -> str:
    """How the triton side adds a bf16 / fp16 GEMM into its fp32 accumulator on this device (the probe's
    answer, megapmp_kernels.pair_loss.fp32_accumulation_mode); "fp32" for fp32 models, which need none."""
    import torch
    from megapmp_kernels.pair_loss import fp32_accumulation_mode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    return "fp32" if dtype == torch.float32 else fp32_accumulation_mode(torch.device(args.device), dtype)


if __name__ == "__main__":
    main()
