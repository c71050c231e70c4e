"""Fused packed-pair loss: the CodePMP LM + pairwise-reward terms without [tokens x vocab] logits.

    lm_sum = sum_{t valid} logsumexp_v(h_t . W_v) - h_t . W_{y_t}          (CE over chosen-response tokens)
    rm_sum = sum_i -log sigmoid(r_chosen_i - r_rejected_i),  r = h . w_score  (fp32)

``fused_pair_loss`` is one autograd Function computing both sums (and the detached margins
r_chosen - r_rejected). Its caller selects the rows: the hidden states of the LM-target tokens
[T, H] and of the two read-out tokens of each pair [N, H] x 2; their gradients flow back through
that selection. It is megapmp's only implementation of the loss (megapmp.loss.pmp_loss calls it),
with three backends (BACKENDS):

* ``"torch"`` (any device; the CPU path) -- ``ChunkedLinearCrossEntropy``: chunks of T target rows
  against the whole (local) vocabulary, softmax - onehot turned into dH and dW in forward, backward a
  scale; no logit recompute, which on a CPU measures faster than recomputing (tools/bench_loss.py,
  chunked_* vs the recomputing torch twin below). The reward term in plain fp32 autograd.
* ``"triton"`` (the CUDA default) -- gradients made in forward on the GPU (``_lm_grad_in_forward``):
  per chunk of ``chunk_tokens`` target rows (GRAD_IN_FORWARD_CHUNK_TOKENS), logits [c, V_local] =
  h_c @ W^T by one cuBLAS GEMM in the compute dtype into one reused buffer; ``row_lse`` (Triton,
  softmax_grad.py) gives each row's log-sum-exp and target logit in fp32 (combined over a
  vocab-parallel group by ``combine_partials``); ``softmax_minus_onehot_`` (Triton) overwrites the
  chunk in place with softmax - onehot (0 for ignore_index rows); cuBLAS then gives dH_c = g @ W and
  dW += g^T @ h_c, accumulated in fp32 (``accumulate_fp32``: the out_dtype GEMM where the device has
  one). Loss sum and gradients at scale 1; backward multiplies them by the upstream gradient. Against
  recomputing, one [T x V x H] GEMM fewer and all three GEMMs in cuBLAS; the cost is the [c x V]
  logits chunk and an fp32 [V, H] accumulator (measured on an H200: see GRAD_IN_FORWARD_CHUNK_TOKENS).
  No host synchronisation in the chunk loop. The reward term as in triton_recompute.
* ``"triton_recompute"`` -- one autograd Function over two Triton kernels (CUDA; on CPU under
  ``TRITON_INTERPRET=1``, fp32 only), the least memory; measured slower than the naive path at
  Qwen2-7B on an H200 (135.4 vs 106.4 ms, 16k tokens), kept selectable to measure side by side:
  - ``lse_partials``: for blocks of BT tokens, the vocabulary is tiled in BV columns and each logit
    tile h[BT, H] @ W[BV, H]^T is accumulated in fp32 over H in BD slices (``tl.dot``); an online
    max / sum-exp per token gives one log-sum-exp per (token, vocab split), and the tile holding the
    target picks its logit. The grid is (token blocks, vocab splits): the splits give the GPU enough
    programs when T is small, and token blocks vary fastest so that programs running together read
    the same W tiles (L2 reuse). Splits are combined in torch (``combine_partials``).
  - ``grad_logits``: recomputes the logit tiles of one vocab chunk [v0, v1) for all T tokens and
    writes  g = (exp(z - lse) - onehot(y)) * dL/dlm_sum  in the weight's dtype; cuBLAS then gives
    dW[v0:v1] = g^T @ h (each row of dW written once, fp32 accumulation inside the GEMM) and
    dH += g @ W[v0:v1] (fp32 accumulator [T, H]).
``lse_partials`` / ``grad_logits`` keep a chunked torch twin each (``backend="torch"``): the kernels'
references in the tests, with the same memory behaviour (nothing larger than one [T x chunk] block).

The triton_recompute backward is deterministic: no atomics anywhere (the forward reduces splits in torch, the gradient
kernel writes disjoint tiles, and the dH / dW contractions are plain GEMMs). Its workspace is one
[T x chunk] block of grad-logits (``chunk_bytes``, default 256 MiB; the chunk runs over the
*vocabulary* so that dW needs no accumulation) plus the fp32 dH accumulator [T, H].

Vocab-parallel: ``lm_weight`` may be this rank's rows [V/tp, H] of the LM head, ``vocab_start`` its
first global id, ``group`` the tensor-parallel group. Each rank computes local log-sum-exps and the
target logit where it owns the target; ``combine_partials`` all-reduces them (max, then one sum of
[2, T]; the "triton" backend once per row chunk). Backward needs no collective: the returned dH is this rank's partial, which the caller's
``copy_to_tp`` (or the sequence-parallel all-gather's reduce-scatter) sums, as in Megatron.

``pair_loss_reference`` is the naive full-logits torch formulation (fp32 logits, autograd) the tests
compare against; ``naive_pair_loss`` is the seed implementation's path (logits in the model dtype,
an fp32 copy, F.cross_entropy), the baseline of ``tools/bench_loss.py``.

Precision: the logit GEMMs run in ``compute_dtype`` (the autocast dtype where autocast is on, else
lm_weight's dtype) with fp32 accumulation, every softmax / log-sum-exp quantity in fp32; fp32 operands
use tf32 only where torch.backends.cuda.matmul.allow_tf32 says torch would. Gradients come back in
each input's dtype.

Importing this module never requires triton; the kernels are jitted at first use, so
``TRITON_INTERPRET`` is read then (set it before the first call, not necessarily before import).
``compile_report()`` (``tools/bench_loss.py --compile-report``) compiles every autotune candidate for
sm_90 on a machine without a GPU and reports registers, spills and HGMMA / cp.async use.

Performance (P = T * V * H). triton_recompute: 2P forward (Triton) + 2P recompute (Triton) + 4P
(cuBLAS dW, dH) = 8P FLOPs. naive: 6P (cuBLAS) + ~44 bytes of elementwise traffic per logit. triton
(grad in forward): 6P, all cuBLAS, + ~6 bytes per bf16 logit in the row kernels + one fp32 [V, H]
read-modify-write per chunk. Measured on an H200 (bf16, Qwen2-7B shape, 16k tokens, fwd+bwd, outside
this repo): naive 106.4 ms / 32.5 GB peak, triton_recompute 135.4 ms / 1.6 GB, a prototype of the
grad-in-forward path 89.9 ms / 6.8 GB at 8192-row chunks (1.5B shape: naive 60.5, recompute 59.4,
prototype 42.6 ms). This module's "triton" backend itself is not yet timed on a GPU:
``tools/bench_loss.py --device cuda --shape qwen2-7b --tokens 16384`` measures all three side by side.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # the kernels are optional: the torch backend needs nothing beyond torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

from megapmp_kernels.softmax_grad import row_lse, softmax_minus_onehot_

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 256 << 20  # grad-logits workspace of the backward (and the torch forward's logits)
# "triton" (gradients in forward): target rows per [rows x V] logits chunk. Measured on an H200 (bf16,
# 16k tokens, a prototype of this path): Qwen2-7B shape 89.9 ms fwd+bwd at 8192 rows (6.8 GB peak), 96.0 at
# 4096 (4.5 GB), 104.7 at 2048 (3.7 GB), naive 106.4 ms / 32.5 GB -- larger chunks amortise the fp32 dW
# read-modify-write (one [V, H] pass per chunk) and give cuBLAS taller GEMMs.
GRAD_IN_FORWARD_CHUNK_TOKENS = 8192
DEFAULT_TORCH_CHUNK_TOKENS = 4096  # "torch": rows per fp32 [rows x V] logits block (the CPU path)
BACKENDS = ("torch", "triton", "triton_recompute")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

__all__ = ["BACKENDS", "PairLossSums", "fused_pair_loss", "ChunkedLinearCrossEntropy", "pair_loss_reference", "naive_pair_loss", "combine_partials",
           "lse_partials", "grad_logits", "row_lse", "softmax_minus_onehot_", "accumulate_fp32",
           "fp32_accumulation_mode", "triton_available", "triton_error"]


class PairLossSums(NamedTuple):
    lm_sum: torch.Tensor  # fp32 scalar: summed CE over valid target tokens (this micro-batch)
    rm_sum: torch.Tensor  # fp32 scalar: summed -log sigmoid(r_chosen - r_rejected)
    margins: torch.Tensor  # fp32 [N], detached: r_chosen - r_rejected


# -- triton availability ------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_error(device: torch.device | str | None = None) -> str | None:
    """Why the triton backend cannot run on ``device`` (None: it can)."""
    if triton is None:
        return "triton is not importable"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda" and not _interpreting():
        return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests), got {device}"
    return None


def triton_available(device: torch.device | str | None = "cuda") -> bool:
    return triton_error(device) is None


# -- Triton kernels (plain functions here, jitted on first use; see _kernels) ---------------------------

if tl is not None:

    def _lse_partials_kernel(H, W, TGT, LSE, Z, T, V, D, stride_ht, stride_wv, vocab_start,
                             BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """Program (token block, vocab split): log-sum-exp of the split's logits and the target logit.

        LSE, Z: [num_splits, T] fp32. A split past the vocabulary writes lse = -inf, z = 0.
        """
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        per_split = tl.cdiv(tl.cdiv(V, BV), tl.num_programs(1))  # vocab blocks per split
        rows = pid_t * BT + tl.arange(0, BT)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64) - vocab_start  # local id (any value)
        m = tl.full([BT], float("-inf"), tl.float32)  # running max, base-2 units
        s = tl.zeros([BT], tl.float32)  # running sum of 2^(x - m)
        z = tl.zeros([BT], tl.float32)  # target logit, natural units
        for vb in range(0, per_split):
            cols = (pid_s * per_split + vb) * BV + tl.arange(0, BV)
            col_ok = cols < V
            cols64 = cols.to(tl.int64)
            acc = tl.zeros([BT, BV], tl.float32)
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                d_ok = ds < D
                h = tl.load(H + rows64[:, None] * stride_ht + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                w = tl.load(W + cols64[:, None] * stride_wv + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                            other=0.0)
                acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
            hit = (cols64[None, :] == tgt[:, None]) & col_ok[None, :]
            z += tl.sum(tl.where(hit, acc, 0.0), axis=1)
            x = tl.where(col_ok[None, :], acc * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf) when a block is empty
            s = s * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
            m = m_new
        nonempty = s > 0.0
        lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, s, 1.0))) * 0.6931471805599453, float("-inf"))
        out = pid_s * T + rows
        tl.store(LSE + out, lse, mask=row_ok)
        tl.store(Z + out, z, mask=row_ok)

    def _grad_logits_kernel(H, W, TGT, LSE, SCALE, G, T, V, D, stride_ht, stride_wv, stride_gt, vocab_start,
                            v_lo, v_hi, ignore_index,
                            BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
        """Program (token block, vocab block of [v_lo, v_hi)): G = (softmax - onehot) * scale, [T, v_hi - v_lo].

        Rows whose target is ignore_index get 0. SCALE: a 1-element fp32 tensor (dL/dlm_sum).
        """
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_t * BT + tl.arange(0, BT)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        cols = v_lo + pid_v * BV + tl.arange(0, BV)  # local vocab ids
        col_ok = cols < v_hi
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BT, BV], tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            h = tl.load(H + rows64[:, None] * stride_ht + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            w = tl.load(W + cols64[:, None] * stride_wv + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        tgt_raw = tl.load(TGT + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        scale = tl.load(SCALE)
        row_scale = tl.where(row_ok & (tgt_raw != ignore_index), scale, 0.0)
        p = tl.exp2((acc - lse[:, None]) * 1.4426950408889634)
        onehot = cols64[None, :] == (tgt_raw - vocab_start)[:, None]
        g = (p - tl.where(onehot, 1.0, 0.0)) * row_scale[:, None]
        dst = G + rows64[:, None] * stride_gt + (cols64 - v_lo)[None, :]
        tl.store(dst, g.to(G.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_KERNELS: dict | None = None
# Interpreter (CPU tests): small tiles; tl.dot needs every dim >= 16.
_INTERPRET_CONFIG = {"BT": 16, "BV": 32, "BD": 16}


# H100 candidates, not timed (no GPU was lent when they were written). compile_report() compiles each
# for sm_90 on any machine: for bf16 / fp16 / fp32-as-tf32 every one shows HGMMA (wgmma), LDGSTS
# (cp.async, num_stages deep) and no spill stores; fp32 "ieee" (torch's default when tf32 is off) has
# no tensor-core path (FMA) and the 128x128 lse tiles spill a little. Shared memory per stage is
# (BT + BV) * BD * elt bytes; the autotuner drops configs that fail to launch.
_TILES = {  # (BT, BV, BD, num_warps, num_stages)
    ("lse", 2): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (64, 128, 64, 4, 4),
                 (128, 64, 64, 4, 4), (64, 128, 32, 4, 5)],
    ("grad", 2): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                  (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    ("lse", 4): [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                 (64, 64, 32, 4, 3)],
    ("grad", 4): [(128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
                  (64, 64, 32, 4, 3)],
}


def _gpu_configs(kernel: str, elt: int):
    return [triton.Config({"BT": bt, "BV": bv, "BD": bd}, num_warps=warps, num_stages=stages)
            for bt, bv, bd, warps, stages in _TILES[(kernel, 4 if elt >= 4 else 2)]]


def _kernels() -> dict:
    """Jit (once, on first use) the two kernels: raw, and autotuned per operand width (16 / 32 bit)."""
    global _KERNELS
    if _KERNELS is None:
        if triton is None:
            raise RuntimeError("the triton backend of fused_pair_loss needs triton, which is not importable")
        kernels = {"lse": triton.jit(_lse_partials_kernel), "grad": triton.jit(_grad_logits_kernel)}
        # T is not in the keys: it changes every packed micro-batch and would re-tune each step.
        tuned = {(name, elt): triton.autotune(_gpu_configs(name, elt), key=["V", "D"])(fn)
                 for name, fn in kernels.items() for elt in (2, 4)}
        _KERNELS = {"raw": kernels, "tuned": tuned}
    return _KERNELS


def _launch(name: str, grid_of, args, elt: int, precision: str, config: dict | None):
    """Run kernel `name` with an explicit tile config, the interpreter's small one, or autotuned."""
    kernels = _kernels()
    cfg = config or (_INTERPRET_CONFIG if _interpreting() else None)
    if cfg is None:
        kernels["tuned"][(name, 4 if elt >= 4 else 2)][lambda meta: grid_of(meta["BT"], meta["BV"])](
            *args, PRECISION=precision)
    else:
        kw = {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}
        kernels["raw"][name][grid_of(cfg["BT"], cfg["BV"])](*args, BT=cfg["BT"], BV=cfg["BV"], BD=cfg["BD"],
                                                             PRECISION=precision, **kw)


def compile_report(dtypes=("bf16", "fp32"), arch: int = 90) -> list[dict]:
    """Compile every autotune candidate for sm_<arch> without a GPU (triton.compile on a GPUTarget,
    arguments marked divisible by 16 as the launcher specialises them at real shapes) and read the
    cubin back with the cuobjdump that ships with triton: registers, spill stores (STL), shared
    memory, and the instructions that matter (HGMMA = wgmma tensor-core ops, LDGSTS = cp.async).
    fp32 is compiled as tf32 (torch.backends.cuda.matmul.allow_tf32); "ieee" has no tensor-core path."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    signatures = {
        "lse": dict(H="*{dt}", W="*{dt}", TGT="*i64", LSE="*fp32", Z="*fp32", T="i32", V="i32", D="i32",
                    stride_ht="i32", stride_wv="i32", vocab_start="i32"),
        "grad": dict(H="*{dt}", W="*{dt}", TGT="*i64", LSE="*fp32", SCALE="*fp32", G="*{dt}", T="i32", V="i32",
                     D="i32", stride_ht="i32", stride_wv="i32", stride_gt="i32", vocab_start="i32", v_lo="i32",
                     v_hi="i32", ignore_index="i32"),
    }
    aligned = ("H", "W", "G", "LSE", "Z", "D", "stride_ht", "stride_wv", "stride_gt", "v_lo")
    fns = {"lse": _lse_partials_kernel, "grad": _grad_logits_kernel}
    rows = []
    for dt in dtypes:
        elt = 4 if dt == "fp32" else 2
        for name, fn in fns.items():
            for bt, bv, bd, warps, stages in _TILES[(name, elt)]:
                sig = {a: t.format(dt=dt) for a, t in signatures[name].items()}
                const = {"BT": bt, "BV": bv, "BD": bd, "PRECISION": "tf32"}
                sig.update({c: "constexpr" for c in const})
                names = list(sig)
                attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in sig}
                row = {"kernel": name, "dtype": dt, "BT": bt, "BV": bv, "BD": bd, "num_warps": warps,
                       "num_stages": stages}
                try:
                    src = ASTSource(fn=triton.jit(fn), signature=sig, attrs=attrs,
                                    constexprs={(names.index(c),): v for c, v in const.items()})
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                              options={"num_warps": warps, "num_stages": stages})
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                                               capture_output=True, text=True).stdout
                        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", f.name],
                                              capture_output=True, text=True).stdout
                    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
                    row.update(shared_bytes=compiled.metadata.shared,
                               regs=int(found.group(1)) if found else None,
                               stack_bytes=int(found.group(2)) if found else None,
                               hgmma=sass.count("HGMMA"), ldgsts=sass.count("LDGSTS"), stl=sass.count("STL"))
                except Exception as e:  # report, don't stop: one bad config is information
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
    return rows


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul setting (tf32 only where torch would use it too)."""
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32 and not _interpreting()):
        return "ieee"
    return "tf32"


def _num_splits(device: torch.device, tokens: int, vocab: int) -> int:
    """Vocab splits of the forward grid: ~2 waves of programs, >= 8 tiles of 256 columns per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = max(1, math.ceil(tokens / 128))
    return max(1, min(math.ceil(2 * sms / token_blocks), math.ceil(vocab / 2048), 64))


def _check_rows(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor):
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"hidden {tuple(h.shape)} and lm_weight {tuple(w.shape)} must be [T, H] and [V, H]")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)} must be [T] = [{h.shape[0]}]")
    if h.dtype != w.dtype:
        h = h.to(w.dtype)
    return h.contiguous(), w.contiguous(), targets.contiguous()


# -- the two primitives, both backends -------------------------------------------------------------------

def lse_partials(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
                 backend: str = "torch", chunk_bytes: int = DEFAULT_CHUNK_BYTES, num_splits: int | None = None,
                 config: dict | None = None):
    """Per-split log-sum-exp and target logit of h @ w^T: two fp32 tensors [S, T] (see combine_partials).

    h: [T, H]; w: [V_local, H]; targets: [T] global ids (a target outside [vocab_start, vocab_start +
    V_local) contributes 0 to z). The torch backend's splits are its vocab chunks.
    """
    h, w, targets = _check_rows(h, w, targets)
    T, D = h.shape
    V = w.shape[0]
    if backend == "torch":
        cols = _chunk_cols(T, V, 4, chunk_bytes)
        lse, z = [], []
        local = targets - vocab_start
        for v0 in range(0, V, cols):
            logits = h.float() @ w[v0:v0 + cols].float().t()  # [T, c] fp32 (fp32 products, like tl.dot)
            inside = (local >= v0) & (local < v0 + logits.shape[1])
            picked = logits.gather(1, (local - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
            z.append(torch.where(inside, picked, torch.zeros_like(picked)))
            top = logits.amax(dim=-1)
            lse.append(top + logits.sub_(top[:, None]).exp_().sum(dim=-1).log())  # in place: one [T, c] block
        return torch.stack(lse), torch.stack(z)
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    problem = triton_error(h.device)
    if problem:
        raise RuntimeError(problem)
    S = num_splits or _num_splits(h.device, T, V)
    lse = torch.empty((S, T), dtype=torch.float32, device=h.device)
    z = torch.empty((S, T), dtype=torch.float32, device=h.device)
    if T == 0:
        return lse, z
    args = (h, w, targets, lse, z, T, V, D, h.stride(0), w.stride(0), vocab_start)
    _launch("lse", lambda bt, bv: (triton.cdiv(T, bt), S), args, w.element_size(), _precision(w.dtype), config)
    return lse, z


def grad_logits(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                v0: int, v1: int, *, vocab_start: int = 0, ignore_index: int = IGNORE_INDEX, backend: str = "torch",
                out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """dL/dlogits of the local vocab columns [v0, v1) for all T rows, in w's dtype: [T, v1 - v0].

    (softmax(h @ w^T) - onehot(targets)) * scale with the global ``lse`` [T] (fp32); rows whose target
    is ``ignore_index`` are 0. ``scale``: fp32 tensor with one element (dL/dlm_sum).
    """
    h, w, targets = _check_rows(h, w, targets)
    T, D = h.shape
    width = v1 - v0
    if out is None:
        out = torch.empty((T, width), dtype=w.dtype, device=h.device)
    if backend == "torch":
        if out.dtype == torch.float32:  # compute in place in `out`: one [T, c] block
            logits = torch.mm(h.float(), w[v0:v1].float().t(), out=out)
        else:
            logits = h.float() @ w[v0:v1].float().t()  # [T, c] fp32, rounded into `out` at the end
        p = logits.sub_(lse[:, None]).exp_()
        valid = targets != ignore_index
        local = targets - vocab_start - v0
        inside = valid & (local >= 0) & (local < width)
        rows = torch.nonzero(inside).squeeze(-1)
        p[rows, local[rows]] -= 1.0
        p.mul_((scale.float().reshape(()) * valid)[:, None])
        if p is not out:
            out.copy_(p)
        return out
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if T == 0 or width == 0:
        return out
    scale = scale.float().reshape(1).contiguous()
    lse = lse.float().contiguous()
    args = (h, w, targets, lse, scale, out, T, w.shape[0], D, h.stride(0), w.stride(0), out.stride(0),
            vocab_start, v0, v1, ignore_index)
    _launch("grad", lambda bt, bv: (triton.cdiv(T, bt), triton.cdiv(width, bv)), args, w.element_size(),
            _precision(w.dtype), config)
    return out


def _chunk_cols(tokens: int, vocab: int, elt: int, chunk_bytes: int) -> int:
    """Vocab columns per chunk so that a [tokens x cols] block of `elt`-byte values fits chunk_bytes."""
    cols = chunk_bytes // max(1, tokens * elt)
    if cols >= vocab:
        return max(1, vocab)
    return max(128, cols // 128 * 128)  # whole kernel tiles; never fewer than 128 columns


def combine_partials(lse_parts: torch.Tensor, z_parts: torch.Tensor, group=None):
    """lse [T] and target logit z [T] over the whole vocabulary from per-split (and per-rank) partials.

    lse_parts / z_parts: [S, T] of this rank. With a tensor-parallel ``group`` of several ranks, rank
    t's partials cover its vocab shard: all-reduce(max) of the local lse, then one all-reduce(sum) of
    [exp(lse_t - max), z_t].
    """
    lse = torch.logsumexp(lse_parts, dim=0)
    z = z_parts.sum(dim=0)
    if group is not None and dist.get_world_size(group) > 1:
        top = lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([(lse - top).exp(), z])
        dist.all_reduce(sums, group=group)
        lse, z = top + sums[0].log(), sums[1]
    return lse, z


# -- the autograd Function ---------------------------------------------------------------------------------

class _Options(NamedTuple):
    compute_dtype: torch.dtype
    vocab_start: int
    group: object
    reward_group: object
    ignore_index: int
    backend: str  # of the kernel primitives (lse_partials / grad_logits / row_lse / ...): "triton" or "torch"
    chunk_bytes: int
    num_splits: int | None
    config: dict | None
    recompute: bool = False  # "triton_recompute": lse in forward, logits recomputed in backward
    chunk_tokens: int = GRAD_IN_FORWARD_CHUNK_TOKENS  # "triton": target rows per logits chunk
    grad_enabled: bool = True  # a backward can follow (torch.is_grad_enabled() at the call)
    block_v: int | None = None  # "triton": BLOCK_V of the row kernels (tests pin it; None: per device)


class _FusedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, lm_weight, targets, chosen, rejected, score_weight, opts: _Options):
        device = (hidden if hidden is not None else chosen).device
        with torch.autocast(device.type, enabled=False):  # dtypes are explicit here (opts.compute_dtype, fp32)
            return _FusedPairLoss._forward(ctx, device, hidden, lm_weight, targets, chosen, rejected,
                                           score_weight, opts)

    @staticmethod
    def _forward(ctx, device, hidden, lm_weight, targets, chosen, rejected, score_weight, opts: _Options):
        lm_sum = torch.zeros((), dtype=torch.float32, device=device)
        rm_sum = torch.zeros((), dtype=torch.float32, device=device)
        margins = torch.zeros((0,), dtype=torch.float32, device=device)
        lse = None
        ctx.lm_grads, ctx.lm_grads_made = None, False  # grad-in-forward: (dH, dW, dtypes) until backward
        if hidden is not None and hidden.shape[0] and opts.recompute:
            lse_parts, z_parts = lse_partials(hidden.to(opts.compute_dtype), lm_weight.to(opts.compute_dtype),
                                              targets, vocab_start=opts.vocab_start,
                                              backend=opts.backend, chunk_bytes=opts.chunk_bytes,
                                              num_splits=opts.num_splits, config=opts.config)
            lse, z = combine_partials(lse_parts, z_parts, opts.group)
            valid = targets != opts.ignore_index
            lm_sum = torch.where(valid, lse - z, torch.zeros_like(lse)).sum()
        elif hidden is not None and hidden.shape[0]:
            # Grad mode is off inside forward and needs_input_grad ignores no_grad(): the caller said
            # whether a backward can follow (opts.grad_enabled); without one, no gradient work at all.
            need_hidden = opts.grad_enabled and ctx.needs_input_grad[0]
            need_weight = opts.grad_enabled and ctx.needs_input_grad[1]
            lm_sum, d_hidden, d_weight = _lm_grad_in_forward(hidden, lm_weight, targets, opts, need_hidden,
                                                             need_weight)
            ctx.lm_grads, ctx.lm_grads_made = (d_hidden, d_weight, hidden.dtype, lm_weight.dtype), True
            hidden = lm_weight = None  # nothing of the LM term is needed in backward but its gradients
        if chosen is not None and chosen.shape[0]:
            weight = score_weight.float().reshape(-1)
            margins = chosen.float() @ weight - rejected.float() @ weight  # [N]
            if opts.reward_group is not None:  # partial margins (rows owned elsewhere are zero): complete them
                dist.all_reduce(margins, group=opts.reward_group)
            rm_sum = -F.logsigmoid(margins).sum()
        ctx.opts = opts
        ctx.save_for_backward(hidden, lm_weight, targets, lse, chosen, rejected, score_weight, margins)
        ctx.mark_non_differentiable(margins)
        return lm_sum, rm_sum, margins

    @staticmethod
    def backward(ctx, grad_lm, grad_rm, _grad_margins):
        with torch.autocast(grad_lm.device.type, enabled=False):
            return _FusedPairLoss._backward(ctx, grad_lm, grad_rm)

    @staticmethod
    def _backward(ctx, grad_lm, grad_rm):
        hidden, lm_weight, targets, lse, chosen, rejected, score_weight, margins = ctx.saved_tensors
        opts = ctx.opts
        need = ctx.needs_input_grad
        d_hidden = d_weight = d_chosen = d_rejected = d_score = None
        if lse is not None and grad_lm is not None and (need[0] or need[1]):
            d_hidden, d_weight = _lm_backward(hidden, lm_weight, targets, lse, grad_lm, opts, need[0], need[1])
        elif ctx.lm_grads_made and grad_lm is not None and (need[0] or need[1]):
            d_hidden, d_weight = _scale_lm_grads(ctx, grad_lm)
        if margins.numel() and grad_rm is not None and (need[3] or need[4] or need[5]):
            weight = score_weight.float().reshape(-1)
            coef = (torch.sigmoid(margins) - 1.0) * grad_rm.float()  # d(-log sigmoid(m))/dm * upstream, [N]
            if need[3] or need[4]:
                d_pos = coef[:, None] * weight[None, :]  # [N, H]
                d_chosen = d_pos.to(chosen.dtype) if need[3] else None
                d_rejected = (-d_pos).to(rejected.dtype) if need[4] else None
            if need[5]:
                d_score = (coef @ (chosen.float() - rejected.float())).reshape(score_weight.shape).to(score_weight.dtype)
        return d_hidden, d_weight, None, d_chosen, d_rejected, d_score, None


def _lm_backward(hidden, lm_weight, targets, lse, grad_lm, opts: _Options, need_hidden: bool, need_weight: bool):
    """dH [T, H] (this rank's partial under vocab parallelism) and dW [V_local, H], chunked over the vocab."""
    h, w, targets = _check_rows(hidden.to(opts.compute_dtype), lm_weight.to(opts.compute_dtype), targets)
    T, V = h.shape[0], w.shape[0]
    # the grad-logits block is in w's dtype; the torch twin also needs an fp32 block for non-fp32 weights
    elt = w.element_size() if opts.backend == "triton" or w.dtype == torch.float32 else w.element_size() + 4
    cols = _chunk_cols(T, V, elt, opts.chunk_bytes)
    scale = grad_lm.float().reshape(1)
    d_weight = torch.empty_like(lm_weight) if need_weight else None
    acc = None  # fp32 dH accumulator
    buf = torch.empty(T * min(cols, V), dtype=w.dtype, device=h.device)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        g = grad_logits(h, w, targets, lse, scale, v0, v1, vocab_start=opts.vocab_start,
                        ignore_index=opts.ignore_index, backend=opts.backend,
                        out=buf[: T * (v1 - v0)].view(T, v1 - v0), config=opts.config)
        if need_weight:  # every row of dW written once: no accumulation
            if d_weight.dtype == g.dtype:
                torch.mm(g.t(), h, out=d_weight[v0:v1])
            else:  # e.g. fp32 master weights computed in bf16 under autocast
                d_weight[v0:v1].copy_(g.t() @ h)
        if need_hidden:
            if acc is None:
                acc = (g @ w[v0:v1]).float()
            elif acc.dtype == g.dtype:
                acc.addmm_(g, w[v0:v1])
            else:
                acc.add_(g @ w[v0:v1])
        del g
    d_hidden = acc.to(hidden.dtype) if need_hidden else None
    return d_hidden, d_weight


def _scale_lm_grads(ctx, grad_lm):
    """Backward of the grad-in-forward LM term: the forward's scale-1 gradients times dL/dlm_sum, each in
    its input's dtype. The scale is applied in fp32 (rounding it to bf16 would bias every gradient)."""
    if ctx.lm_grads is None:
        raise RuntimeError("fused_pair_loss (backend 'triton') supports one backward per forward (its LM "
                           "gradients are made in forward and handed on in place); recompute the loss to "
                           "differentiate again")
    d_hidden, d_weight, hidden_dtype, weight_dtype = ctx.lm_grads
    ctx.lm_grads = None  # free the buffers as soon as they are handed on
    scale = grad_lm.float()
    if d_hidden is not None:
        d_hidden = (d_hidden.float() * scale).to(hidden_dtype)
    if d_weight is not None:  # in place: the fp32 accumulator is handed on (fp32 master weights) or cast once
        d_weight = d_weight.mul_(scale).to(weight_dtype)
    return d_hidden, d_weight


def _lm_grad_in_forward(hidden, lm_weight, targets, opts: _Options, need_hidden: bool, need_weight: bool):
    """The "triton" backend's LM term: (lm_sum, dH, dW) at scale 1, in row chunks of opts.chunk_tokens.

    Per chunk: logits [c, V_local] = h_c @ W^T (cuBLAS, compute dtype, written into one reused buffer);
    kernel A (row_lse) -> lse, target logit; under vocab parallelism combine_partials all-reduces them;
    kernel B turns the logits into softmax - onehot in place; dH_c = g @ W and dW += g^T @ h_c (cuBLAS,
    dW accumulated in fp32). dH: [T, H] in the compute dtype (this rank's partial under vocab
    parallelism), dW: [V_local, H] fp32. No host synchronisation inside the loop.
    """
    # W (and h) cast to the compute dtype once per call: under autocast with fp32 master weights this is
    # the one bf16 copy of the LM head, shared by every chunk's three GEMMs.
    h, w, targets = _check_rows(hidden.to(opts.compute_dtype), lm_weight.to(opts.compute_dtype), targets)
    T, V = h.shape[0], w.shape[0]
    chunk = max(1, min(opts.chunk_tokens, T))
    group = _multi(opts.group)
    need_grads = need_hidden or need_weight
    logits_buf = torch.empty((chunk, V), dtype=w.dtype, device=h.device)  # the only vocabulary-sized buffer
    d_hidden = torch.empty_like(h) if need_hidden else None
    d_weight = None  # fp32 [V_local, H], created by the first chunk's GEMM
    lm_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        h_c, t_c = h[start:stop], targets[start:stop]
        logits = torch.mm(h_c, w.t(), out=logits_buf[: stop - start])
        lse, z = row_lse(logits, t_c, vocab_start=opts.vocab_start, backend=opts.backend, block_v=opts.block_v)
        if group is not None:
            lse, z = combine_partials(lse[None], z[None], group)
        lm_sum += torch.where(t_c != opts.ignore_index, lse - z, torch.zeros_like(lse)).sum()
        if not need_grads:
            continue
        g = softmax_minus_onehot_(logits, t_c, lse, vocab_start=opts.vocab_start, ignore_index=opts.ignore_index,
                                  backend=opts.backend, block_v=opts.block_v)
        if need_hidden:
            torch.mm(g, w, out=d_hidden[start:stop])
        if need_weight:
            d_weight = accumulate_fp32(d_weight, g.t(), h_c)
    if need_weight and d_weight is None:  # pragma: no cover - T == 0 never reaches here
        d_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    return lm_sum, d_hidden, d_weight


# -- fp32 accumulation of bf16 / fp16 GEMMs ------------------------------------------------------------------

_FP32_ACCUMULATION: dict = {}  # (device type, index, dtype) -> "addmm" | "mm" | "cast"


def fp32_accumulation_mode(device: torch.device, dtype: torch.dtype) -> str:
    """How ``accumulate_fp32`` adds a ``dtype`` GEMM into an fp32 tensor on ``device`` (probed once, cached).

    "addmm": torch.addmm(acc, a, b, out_dtype=fp32, out=acc) -- cuBLAS reads and writes the fp32
             accumulator itself, no temporary;
    "mm":    acc += torch.mm(a, b, out_dtype=fp32) -- one fp32 [V, H] temporary per chunk;
    "cast":  acc += a @ b -- the product rounded to ``dtype`` first (CPU: torch has no out_dtype GEMM
             there).
    The probe checks the value, not only that the call runs: the accumulator holds 1 + 2^-20, which a
    path that rounds it through bf16 / fp16 would lose.

    What to expect on the lent GPUs (torch 2.11.0+cu130; not yet run there): older torch refused an fp32
    ``self`` with bf16 operands in CUDA's ``_addmm_dtype_out_cuda`` ("self and mat2 must have the same
    dtype"), which would leave "mm" and its fp32 [V, H] temporary per chunk (0.93 GB at Qwen2-1.5B, 2.2 GB
    at 7B: memory and one more [V, H] read and write per chunk). The 2.11 wheel's libtorch_cuda.so carries
    the relaxed check instead ("self dtype must match either out_dtype or mat1 dtype"; its strings read on
    a CPU, 2026-12-07), so "addmm" is expected; the probe decides at run time either way. Whether the mode
    matters is measured by ``tools/bench_loss.py --accumulate addmm,mm,cast`` (tools/gpu_check.sh runs it),
    which pins each mode through this cache (_FP32_ACCUMULATION) for one side at a time.
    """
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key not in _FP32_ACCUMULATION:
        _FP32_ACCUMULATION[key] = _probe_fp32_accumulation(device, dtype)
    return _FP32_ACCUMULATION[key]


def _probe_fp32_accumulation(device: torch.device, dtype: torch.dtype) -> str:
    a = torch.ones((2, 3), dtype=dtype, device=device)
    b = torch.full((3, 2), 2.0 ** -10, dtype=dtype, device=device)
    start = 1.0 + 2.0 ** -20  # not representable in bf16 / fp16
    want = torch.full((2, 2), start + 3 * 2.0 ** -10, dtype=torch.float32, device=device)
    try:
        acc = torch.full((2, 2), start, dtype=torch.float32, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if torch.equal(acc, want):
            return "addmm"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    try:
        acc = torch.full((2, 2), start, dtype=torch.float32, device=device)
        prod = torch.mm(a, b, out_dtype=torch.float32)
        if prod.dtype == torch.float32 and torch.equal(acc.add_(prod), want):
            return "mm"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return "cast"


def accumulate_fp32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """acc + a @ b with acc fp32 (None: a new fp32 tensor a @ b); a, b in any one float dtype, the GEMM's
    own accumulation fp32 in every mode (see fp32_accumulation_mode; ``mode`` overrides the probe)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    mode = mode or fp32_accumulation_mode(a.device, a.dtype)
    if mode == "cast":
        return (a @ b).float() if acc is None else acc.add_(a @ b)  # add_ promotes in place: no fp32 temporary
    if acc is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    if mode == "addmm":
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(torch.mm(a, b, out_dtype=torch.float32))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The torch backend's LM term: sum_t CE(hidden[t] @ weight.T, targets[t]) in chunks of ``chunk``
    tokens, gradients made in forward. (Every row must be a real target: fused_pair_loss drops
    ``ignore_index`` rows before calling it.)

    The loss is the graph's last op and its output a scalar, so d(loss)/d(logits) = softmax - onehot is
    known while each chunk's logits are still at hand: forward turns them into grad_hidden [T, H] and
    accumulates grad_weight [V, H] there and then, and backward only scales the two by the incoming
    scalar. Against recomputing the logits in backward (the Triton path) this skips one [T x H x V]
    matmul, a third of the LM head's work, and holds one [chunk x V] buffer instead of logits,
    log-probabilities and their gradient: on a CPU the fastest of the torch formulations
    (tools/bench_loss.py). grad_weight is allocated at the same point in the step as a recomputing
    version's (loss backward runs first), so the step's peak does not grow -- except where several loss
    forwards wait for their backwards (the last stage of an all-forward-all-backward pipeline schedule),
    which each hold one [V, H] fp32 buffer until then; 1F1B keeps it at one. (On a GPU the [V, H] fp32
    accumulator is the bigger cost, hence the Triton kernels recompute.)

    Vocab-parallel (``group`` of several ranks, ``weight`` = this rank's rows [V/tp, H] from global id
    ``vocab_start``): per chunk one all-reduce(max) of the row maxima and one all-reduce(sum) of
    [sum-exp, target logit]; grad_hidden is then this rank's partial (summed by the caller's copy_to_tp
    or the sequence all-gather's reduce-scatter), grad_weight this rank's rows, exact.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, grad_enabled=True, vocab_start=0, group=None):
        # Grad mode is always off inside forward and needs_input_grad ignores no_grad(), so the caller
        # says whether a backward can follow (torch.is_grad_enabled()); without one, no gradient work.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        group = group if group is not None and dist.get_world_size(group) > 1 else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += _ce_chunk(hidden[rows], weight, targets[rows] - vocab_start,
                               grad_hidden[rows] if need_hidden else None, grad_weight, group)
        ctx.grads = (grad_hidden, grad_weight, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("ChunkedLinearCrossEntropy supports one backward per forward (its gradients are "
                               "made in forward and handed on in place); recompute the loss to differentiate again")
        grad_hidden, grad_weight, weight_dtype = ctx.grads
        ctx.grads = None  # free the buffers as soon as they are handed on
        # In place: these buffers are handed on as the gradients, no second copy of [V, H]. The scale
        # (lm_coef / global tokens) is applied in fp32: rounding it to bf16 would bias every gradient.
        if grad_hidden is not None:
            if grad_hidden.dtype == torch.float32:
                grad_hidden.mul_(grad_total)
            else:
                grad_hidden.copy_(grad_hidden.float() * grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _ce_chunk(h, weight, local_targets, grad_hidden_out, grad_weight_acc, group) -> torch.Tensor:
    """Summed CE of one chunk (``local_targets`` = ids relative to this rank's first vocab row); writes
    its d/dh into grad_hidden_out and adds its d/dW to grad_weight_acc (either may be None). A function
    of its own so the [c, V] buffer is freed before the next chunk's."""
    logits = (h @ weight.t()).float()  # [c, V(/tp)], the only vocabulary-sized buffer
    rows = torch.arange(len(local_targets), device=local_targets.device)
    if group is None:
        owned, target_logit = None, logits[rows, local_targets]
    else:
        owned = (local_targets >= 0) & (local_targets < weight.shape[0])
        rows = rows[owned]
        target_logit = torch.zeros(len(local_targets), dtype=torch.float32, device=logits.device)
        target_logit[rows] = logits[rows, local_targets[rows]]
    row_max = logits.amax(dim=-1)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    exp = logits.sub_(row_max[:, None]).exp_()  # in place: exp(logit - max)
    sum_exp = exp.sum(dim=-1)
    if group is not None:
        sums = torch.stack([sum_exp, target_logit])
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]
    total = (row_max + sum_exp.log() - target_logit).sum()  # log-sum-exp - target logit
    if grad_hidden_out is not None or grad_weight_acc is not None:
        grad_logits = exp.mul_(sum_exp.reciprocal()[:, None])  # softmax - onehot, in place, fp32
        grad_logits[rows, local_targets[rows] if owned is not None else local_targets] -= 1.0
        if grad_hidden_out is not None:
            grad_hidden_out.copy_(grad_logits.to(weight.dtype) @ weight)
        if grad_weight_acc is not None:  # in place into fp32 (autocast leaves it so): no [V, H] temporary
            grad_weight_acc.addmm_(grad_logits.t(), h.float())
    return total


def _multi(group):
    """``group`` if it has several ranks, else None (no collective needed)."""
    return group if group is not None and dist.get_world_size(group) > 1 else None


class _SumOverGroup(torch.autograd.Function):
    """forward: all-reduce(sum) over ``group``; backward: identity (each rank's input is its own share)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _torch_pair_loss(hidden, lm_weight, targets, chosen, rejected, score_weight, *, vocab_start, group,
                     ignore_index, chunk_tokens, reward_group) -> PairLossSums:
    """The torch backend: ChunkedLinearCrossEntropy for the LM term, plain autograd for the reward term."""
    device = (hidden if hidden is not None else chosen).device
    lm_sum = rm_sum = torch.zeros((), dtype=torch.float32, device=device)
    margins = torch.zeros((0,), dtype=torch.float32, device=device)
    if chosen is not None and chosen.shape[0]:
        # fp32 also inside autocast: rewards are compared with each other, and a bf16 product would round
        # away margins the loss still has to see.
        with torch.autocast(device.type, enabled=False):
            margins = chosen.float() @ score_weight.float().reshape(-1) - rejected.float() @ score_weight.float().reshape(-1)
            if reward_group is not None:
                margins = _SumOverGroup.apply(margins, reward_group)
            rm_sum = -F.logsigmoid(margins).sum()
        margins = margins.detach()
    if hidden is not None:
        valid = targets != ignore_index
        if not bool(valid.all()):
            hidden, targets = hidden[valid], targets[valid]
        lm_sum = ChunkedLinearCrossEntropy.apply(hidden, lm_weight, targets, chunk_tokens, torch.is_grad_enabled(),
                                                 vocab_start, group)
    return PairLossSums(lm_sum, rm_sum, margins)


def fused_pair_loss(hidden: torch.Tensor | None, lm_weight: torch.Tensor | None, targets: torch.Tensor | None,
                    chosen: torch.Tensor | None = None, rejected: torch.Tensor | None = None,
                    score_weight: torch.Tensor | None = None, *, vocab_start: int = 0, group=None,
                    ignore_index: int = IGNORE_INDEX, backend: str = "auto", chunk_bytes: int | None = None,
                    num_splits: int | None = None, config: dict | None = None,
                    compute_dtype: torch.dtype | None = None, chunk_tokens: int | None = None,
                    reward_group=None, block_v: int | None = None) -> PairLossSums:
    """Summed CE of the LM targets and summed pairwise -log sigmoid, in one autograd Function.

    hidden: [T, H] hidden states of the LM-target positions (None: no LM term); lm_weight: [V_local, H];
    targets: [T] global token ids (``ignore_index`` rows count 0). chosen / rejected: [N, H] hidden
    states at the pairs' read-out tokens, score_weight: [H] or [1, H] (None: no RM term). Gradients
    flow to hidden, lm_weight, chosen, rejected and score_weight. ``vocab_start`` / ``group``: see the
    module docstring (the dH of a vocab-parallel rank is partial). ``backend``: one of BACKENDS or
    "auto" (triton on CUDA when importable, else torch).

    torch backend: ``ChunkedLinearCrossEntropy`` over ``chunk_tokens`` target rows at a time (default
    DEFAULT_TORCH_CHUNK_TOKENS; gradients made in forward), the logit GEMMs in autocast's dtype where
    autocast is on. triton backend: gradients made in forward over ``chunk_tokens`` rows at a time
    (default GRAD_IN_FORWARD_CHUNK_TOKENS), cuBLAS GEMMs around two row kernels (softmax_grad.py);
    ``block_v`` pins their column block (tests). triton_recompute backend: ``num_splits`` / ``config``
    pin the forward's vocab splits and the kernels' tile sizes (tests; by default chosen per device,
    autotuned on CUDA), ``chunk_bytes`` bounds the backward's grad-logits block. ``compute_dtype`` is
    the dtype of the logit GEMMs (fp32 accumulation always; default: the autocast dtype where autocast
    is on for this device, as torch.mm would, else lm_weight's dtype). Gradients come back in each
    input's own dtype. The reward term is always fp32.

    ``reward_group`` (sequence parallelism): chosen / rejected are this rank's partial rows -- zero where
    another rank of the group holds the read-out token -- and the margins are summed over the group
    (backward: identity), so the score head's gradient is this rank's partial, to be summed over TP.
    """
    device = (hidden if hidden is not None else chosen).device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if compute_dtype is None and lm_weight is not None:
        compute_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                         else lm_weight.dtype)
    if hidden is not None and (lm_weight is None or targets is None):
        raise ValueError("the LM term needs lm_weight and targets")
    if chosen is not None and (rejected is None or score_weight is None or rejected.shape != chosen.shape):
        raise ValueError("the RM term needs rejected (shaped like chosen) and score_weight")
    if hidden is None and chosen is None:
        raise ValueError("fused_pair_loss needs the LM rows, the reward rows, or both")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if backend == "torch":
        return _torch_pair_loss(hidden, lm_weight, targets, chosen, rejected, score_weight, vocab_start=vocab_start,
                                group=group, ignore_index=ignore_index,
                                chunk_tokens=chunk_tokens or DEFAULT_TORCH_CHUNK_TOKENS,
                                reward_group=_multi(reward_group))
    problem = triton_error(device)
    if problem:
        raise RuntimeError(f"fused_pair_loss backend {backend!r}: {problem}")
    opts = _Options(compute_dtype, vocab_start, group, _multi(reward_group), ignore_index, "triton",
                    chunk_bytes or DEFAULT_CHUNK_BYTES, num_splits, config, recompute=backend == "triton_recompute",
                    chunk_tokens=chunk_tokens or GRAD_IN_FORWARD_CHUNK_TOKENS, grad_enabled=torch.is_grad_enabled(),
                    block_v=block_v)
    return PairLossSums(*_FusedPairLoss.apply(hidden, lm_weight, targets, chosen, rejected, score_weight, opts))


# -- references -------------------------------------------------------------------------------------------

def _up(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def pair_loss_reference(hidden, lm_weight, targets, chosen=None, rejected=None, score_weight=None, *,
                        ignore_index: int = IGNORE_INDEX) -> PairLossSums:
    """The naive formulation with full logits [T, V] in fp32 (fp64 for fp64 inputs) and autograd."""
    device = (hidden if hidden is not None else chosen).device
    lm_sum = rm_sum = torch.zeros((), dtype=torch.float32, device=device)
    margins = torch.zeros((0,), dtype=torch.float32, device=device)
    if hidden is not None:
        logits = _up(hidden) @ _up(lm_weight).t()
        lm_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if chosen is not None:
        weight = _up(score_weight).reshape(-1)
        margins = _up(chosen) @ weight - _up(rejected) @ weight
        rm_sum = -F.logsigmoid(margins).sum()
    return PairLossSums(lm_sum, rm_sum, margins.detach())


def naive_pair_loss(hidden, lm_weight, targets, chosen=None, rejected=None, score_weight=None, *,
                    ignore_index: int = IGNORE_INDEX):
    """The seed implementation's path: logits [T, V] in the model dtype, an fp32 copy, F.cross_entropy.

    Returns (PairLossSums, logits): the seed keeps the model-dtype logits alive (they are the model's
    output), so the benchmark holds them until backward is done, as the seed does.
    """
    logits = hidden @ lm_weight.t()  # [T, V] model dtype
    lm_sum = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    rm_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    margins = torch.zeros((0,), dtype=torch.float32, device=hidden.device)
    if chosen is not None:
        weight = score_weight.float().reshape(-1)
        margins = chosen.float() @ weight - rejected.float() @ weight
        rm_sum = -F.logsigmoid(margins).sum()
    return PairLossSums(lm_sum, rm_sum, margins.detach()), logits
