"""The two row-wise Triton kernels of the gradients-in-forward LM cross-entropy (pair_loss's "triton" backend).

The caller (pair_loss._lm_grad_in_forward) materialises one chunk of logits [c, V_local] with a cuBLAS
GEMM in the compute dtype; these kernels do everything between that GEMM and the two gradient GEMMs:

  ``row_lse``                 kernel A, read-only: per row, an online max / sum-exp in fp32 over the
                              logits (any float dtype) -> log-sum-exp [c] fp32, and the target's logit
                              [c] fp32 where the target falls in this rank's vocab slice (0 elsewhere).
  ``softmax_minus_onehot_``   kernel B, in place: the chunk becomes exp(logit - lse) - onehot(target)
                              (fp32 math, stored back in the logits dtype) for valid rows and 0 for
                              ``ignore_index`` rows -- the gradient of the summed CE w.r.t. the logits,
                              at scale 1. ``lse`` is the *global* log-sum-exp: with a vocab-parallel
                              group the caller combines kernel A's per-rank results before kernel B.

One program per row, the vocabulary walked in BLOCK_V columns: both kernels are memory-bound (A reads the
chunk once, B reads and writes it once) next to the three [c x V x H] GEMMs around them, so they need
bandwidth, not tensor cores. Row offsets are int64 (c * V passes 2^31 at c = 16k, V = 152k).

Each kernel has a torch twin (``backend="torch"``), the reference of the tests. Importing this module never
requires triton; the kernels are jitted at first use (TRITON_INTERPRET=1 runs them on CPU for tests).
"""
from __future__ import annotations

import os

import torch

try:  # optional: the torch twins need nothing beyond torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

IGNORE_INDEX = -100
# GPU launch: 4096 columns per step (8 KiB of bf16 per row and iteration, 16 values per thread at 8
# warps). Not tuned on a GPU: no device was lent when this was written; kernel time is small next to
# the GEMMs (A reads, B reads and writes, one [c x V] chunk: ~2.5 + 5 GB at c = 8192, V = 152k).
GPU_BLOCK_V, GPU_NUM_WARPS = 4096, 8
INTERPRET_BLOCK_V = 32  # CPU tests: small blocks, so that odd vocab sizes exercise the column mask

__all__ = ["row_lse", "softmax_minus_onehot_"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


if tl is not None:

    def _row_lse_kernel(LOGITS, TGT, LSE, Z, V, stride_row, vocab_start, BLOCK_V: tl.constexpr):
        """Program = one row: LSE[row] = log sum_v exp(x_v), Z[row] = x_{target - vocab_start} (or 0)."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        local = tl.load(TGT + row).to(tl.int64) - vocab_start  # any value: out of range never matches
        m = float("-inf")  # running max, base-2 units
        s = 0.0  # running sum of 2^(x - m)
        z = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
            z += tl.sum(tl.where((cols == local) & ok, x, 0.0), axis=0)  # a target past V hits padding
            x2 = x * 1.4426950408889634
            m_new = tl.maximum(m, tl.max(x2, axis=0))
            s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x2 - m_new), axis=0)  # masked columns: 2^-inf = 0
            m = m_new
        tl.store(LSE + row, (m + tl.log2(s)) * 0.6931471805599453)
        tl.store(Z + row, z)

    def _softmax_minus_onehot_kernel(LOGITS, TGT, LSE, V, stride_row, vocab_start, ignore_index,
                                     BLOCK_V: tl.constexpr):
        """Program = one row, in place: x_v <- exp(x_v - LSE[row]) - [v == target] (0 for ignored rows)."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride_row
        target = tl.load(TGT + row).to(tl.int64)
        local = target - vocab_start
        keep = target != ignore_index
        lse = tl.load(LSE + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp2((x - lse) * 1.4426950408889634) - tl.where(cols == local, 1.0, 0.0)
            g = tl.where(keep, g, 0.0)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=ok)


_KERNELS: dict | None = None


def _kernels() -> dict:
    global _KERNELS
    if _KERNELS is None:
        if triton is None:
            raise RuntimeError("the triton backend of fused_pair_loss needs triton, which is not importable")
        _KERNELS = {"lse": triton.jit(_row_lse_kernel), "grad": triton.jit(_softmax_minus_onehot_kernel)}
    return _KERNELS


def compile_for_gpu(arch: int = 90, dtypes=("bf16", "fp32")) -> dict[str, int]:
    """Compile both kernels for sm_<arch> without a GPU (``triton.compile`` on a GPUTarget, the launch
    configuration of a real run) and return the size of each cubin: the type and layout errors of real
    compilation, which the CPU interpreter never meets, surface here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting():
        raise RuntimeError("compile_for_gpu needs a process without TRITON_INTERPRET (it patches triton.language)")
    pointers = {"LOGITS": "*{dt}", "TGT": "*i64", "LSE": "*fp32", "Z": "*fp32"}
    sizes = {}
    for dt in dtypes:
        for name, fn in (("lse", _row_lse_kernel), ("grad", _softmax_minus_onehot_kernel)):
            names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
            signature = {a: "constexpr" if a == "BLOCK_V" else pointers.get(a, "i64").format(dt=dt) for a in names}
            source = ASTSource(fn=triton.jit(fn), signature=signature,
                               constexprs={(names.index("BLOCK_V"),): GPU_BLOCK_V})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": GPU_NUM_WARPS})
            sizes[f"{name}_{dt}"] = len(compiled.asm["cubin"])
    return sizes


def _launch_options(block_v: int | None) -> dict:
    if block_v is not None:
        return {"BLOCK_V": block_v}
    if _interpreting():
        return {"BLOCK_V": INTERPRET_BLOCK_V}
    return {"BLOCK_V": GPU_BLOCK_V, "num_warps": GPU_NUM_WARPS}


def _check(logits: torch.Tensor, targets: torch.Tensor):
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, V] with unit column stride, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)} must be [rows] = [{logits.shape[0]}]")
    return targets.contiguous()


def row_lse(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0, backend: str = "triton",
            block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel A. logits [c, V_local]; targets [c] global ids. Returns (lse [c], z [c]), both fp32: the
    log-sum-exp of each row and the logit of its target where vocab_start <= target < vocab_start + V_local
    (else 0)."""
    targets = _check(logits, targets)
    rows, V = logits.shape
    if backend == "torch":
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        local = targets - vocab_start
        owned = (local >= 0) & (local < V)
        picked = x.gather(1, local.clamp(0, max(V - 1, 0))[:, None]).squeeze(1)
        return lse, torch.where(owned, picked, torch.zeros_like(picked))
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    z = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kernels()["lse"][(rows,)](logits, targets, lse, z, V, logits.stride(0), vocab_start,
                                   **_launch_options(block_v))
    return lse, z


def softmax_minus_onehot_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *, vocab_start: int = 0,
                          ignore_index: int = IGNORE_INDEX, backend: str = "triton",
                          block_v: int | None = None) -> torch.Tensor:
    """Kernel B, in place: logits [c, V_local] become softmax - onehot(targets) (rows whose target is
    ``ignore_index``: 0), with the global ``lse`` [c] fp32. Returns ``logits``."""
    targets = _check(logits, targets)
    rows, V = logits.shape
    if backend == "torch":
        g = (logits.float() - lse.float()[:, None]).exp_()
        local = targets - vocab_start
        owned = (local >= 0) & (local < V) & (targets != ignore_index)
        g[owned.nonzero().squeeze(-1), local[owned]] -= 1.0
        g[targets == ignore_index] = 0.0
        return logits.copy_(g)
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if rows:
        _kernels()["grad"][(rows,)](logits, targets, lse.float().contiguous(), V, logits.stride(0), vocab_start,
                                    ignore_index, **_launch_options(block_v))
    return logits
