"""Optional accelerators: what is installed, what the run will use, and the module swaps behind checks.

Nothing here is needed to import megapmp or to train: every optional package is imported inside a
try block, and each fast path falls back to the plain PyTorch module with the reason recorded, so
``backend_report`` (logged once at start) says both what was chosen and why anything was not.

    detect_accelerators()                -> {name: Probe}: torch/CUDA, flash_attn, torch varlen,
                                            transformer_engine, apex (fused RMSNorm, FusedAdam), triton
    select_attention_backend(name, ...)  -> (concrete backend, reason); "auto" picks the best usable one
    apply_fast_paths(model, ...)         -> swaps RMSNorm -> apex FusedRMSNorm / TE RMSNorm, nn.Linear ->
                                            te.Linear, in place, keeping every parameter name; returns lines
    fp8_autocast(enabled)                -> TE's FP8 context for the forward (nullcontext when off)
    backend_report(...) / format_report  -> the dict / one line the trainer logs at start

The swaps keep names, so checkpoints, the HF converter and name-based parallelism see the same keys;
they only touch modules whose type is exactly ``nn.Linear`` / megapmp's ``RMSNorm`` (tensor-parallel
layers are left alone). Not provided: TE's fused norm+linear modules (``LayerNormLinear``,
``LayerNormMLP``), which merge a norm into the following projections under new parameter names.
Apex's FusedAdam is chosen by ``megapmp.optim.build_optimizer`` (optimizer.backend), reported here.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from megapmp.model.attention import ATTENTION_BACKENDS, backend_available, resolve_attention_backend

FAST_PATH_MODES = ("auto", "on", "off")


@dataclass
class Probe:
    available: bool
    version: str | None
    detail: str


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` ("auto" | "fp32" | "bf16" | "fp16") on ``device``: bf16 autocast
    on GPUs (fp32 master weights), plain fp32 (None: no autocast) on CPUs unless asked otherwise."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _module_version(module) -> str | None:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module.__name__.split(".")[0].replace("_", "-"))
        except Exception:
            version = None
    return None if version is None else str(version)


def _probe(module_name: str) -> Probe:
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # broken CUDA builds raise OSError/RuntimeError at import, not ImportError
        return Probe(False, None, f"not importable ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    return Probe(True, _module_version(module), "importable")


def probe_apex_rmsnorm() -> Probe:
    base = _probe("apex")
    if not base.available:
        return base
    try:
        from apex.normalization import FusedRMSNorm  # noqa: F401

        importlib.import_module("fused_layer_norm_cuda")  # the CUDA extension FusedRMSNorm calls
    except Exception as error:
        return Probe(False, base.version, f"apex without its fused_layer_norm_cuda extension ({type(error).__name__})")
    return Probe(True, base.version, "apex.normalization.FusedRMSNorm")


def probe_apex_adam() -> Probe:
    base = _probe("apex")
    if not base.available:
        return base
    try:
        from apex.optimizers import FusedAdam  # noqa: F401

        importlib.import_module("amp_C")  # the multi-tensor CUDA extension FusedAdam needs
    except Exception as error:
        return Probe(False, base.version, f"apex without its amp_C extension ({type(error).__name__})")
    return Probe(True, base.version, "apex.optimizers.FusedAdam")


def probe_transformer_engine() -> Probe:
    probe = _probe("transformer_engine.pytorch")
    if probe.available and probe.version is None:
        probe.version = _module_version(importlib.import_module("transformer_engine"))
    return probe


def detect_accelerators() -> dict[str, Probe]:
    """What this process could use. Imports each optional package once (transformer_engine takes seconds)."""
    from megapmp.model.attention import _flash_attn_usable, _torch_varlen_usable

    cuda = torch.cuda.is_available()
    device_detail = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    flash_ok, flash_detail = _flash_attn_usable()
    varlen_ok, varlen_detail = _torch_varlen_usable()
    return {
        "torch": Probe(True, torch.__version__, f"CUDA {torch.version.cuda}, {device_detail}" if cuda else device_detail),
        "flash_attn": Probe(flash_ok, flash_detail.split()[-1] if flash_ok else None, flash_detail),
        "torch_varlen": Probe(varlen_ok, torch.__version__ if varlen_ok else None, varlen_detail),
        "transformer_engine": probe_transformer_engine(),
        "apex_rmsnorm": probe_apex_rmsnorm(),
        "apex_adam": probe_apex_adam(),
        "triton": _probe("triton"),
    }


def select_attention_backend(name: str, device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """The backend the model should be built with, and why. ``auto`` resolves to the best usable one
    for this device and compute dtype; an explicit name that cannot run here raises ValueError."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(ATTENTION_BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        chosen = resolve_attention_backend("auto", device, dtype)
        skipped = [backend_available(other, device, dtype)[1] for other in ("flash_attn", "torch_varlen")
                   if other != chosen]
        return chosen, "auto" + (f" (skipped {'; '.join(skipped)})" if chosen == "segmented" else "")
    ok, reason = backend_available(name, device, dtype)
    if not ok:
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    return name, "requested"


# ---------------------------------------------------------------- module swaps


def _swap(model: nn.Module, match, make) -> int:
    """Replace every submodule with ``match(module)`` by ``make(module)``, keeping its name."""
    targets = [(name, module) for name, module in model.named_modules() if name and match(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))
    return len(targets)


def _copy_params(new: nn.Module, old: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in old.named_parameters(recurse=False):
            getattr(new, name).copy_(param)
    return new


def _check_mode(option: str, mode: str) -> None:
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"{option}={mode!r}: expected one of {', '.join(FAST_PATH_MODES)}")


def apply_fast_paths(model: nn.Module, device, *, apex_rmsnorm: str = "auto", te_linear: str = "off",
                     te_rmsnorm: str = "off", probes: dict[str, Probe] | None = None) -> list[str]:
    """Swap modules for fused ones where installed, in place; returns one log line per fast path.

    Modes: ``auto`` (use when installed and on CUDA, else keep the torch module), ``on`` (same, but
    raise if it cannot be used), ``off``. Call after weights are loaded (values are copied into the new
    modules) and before the optimizer is built (the swapped modules own new parameter tensors) and
    before tensor parallelism is applied.
    """
    from megapmp.model.qwen2 import RMSNorm

    for option, mode in (("apex_rmsnorm", apex_rmsnorm), ("te_linear", te_linear), ("te_rmsnorm", te_rmsnorm)):
        _check_mode(option, mode)
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    probes = probes if probes is not None else {}
    lines = []

    def decide(option: str, mode: str, probe_name: str, probe_fn) -> bool:
        if mode == "off":
            lines.append(f"{option}: off")
            return False
        probe = probes.get(probe_name) or probe_fn()
        reason = None if probe.available else probe.detail
        if reason is None and not on_cuda:
            reason = f"needs a CUDA device, not {device.type}"
        if reason is not None:
            if mode == "on":
                raise RuntimeError(f"{option}=on but it cannot be used: {reason}")
            lines.append(f"{option}: not used ({reason})")
            return False
        return True

    is_rmsnorm = lambda m: type(m) is RMSNorm
    if decide("te_rmsnorm", te_rmsnorm, "transformer_engine", probe_transformer_engine):
        import transformer_engine.pytorch as te

        n = _swap(model, is_rmsnorm, lambda m: _copy_params(
            te.RMSNorm(m.weight.numel(), eps=m.eps, params_dtype=m.weight.dtype, device=m.weight.device), m))
        lines.append(f"te_rmsnorm: {n} RMSNorm -> transformer_engine.pytorch.RMSNorm")
    if decide("apex_rmsnorm", apex_rmsnorm, "apex_rmsnorm", probe_apex_rmsnorm):
        from apex.normalization import FusedRMSNorm

        def make_apex(m):
            return _copy_params(FusedRMSNorm(m.weight.numel(), eps=m.eps).to(m.weight.device, m.weight.dtype), m)

        n = _swap(model, is_rmsnorm, make_apex)
        lines.append(f"apex_rmsnorm: {n} RMSNorm -> apex.normalization.FusedRMSNorm")
    if decide("te_linear", te_linear, "transformer_engine", probe_transformer_engine):
        import transformer_engine.pytorch as te

        # FP8 GEMMs need both dims divisible by 16; smaller/odd ones stay torch Linear.
        layer_linear = lambda m: type(m) is nn.Linear and m.in_features % 16 == 0 and m.out_features % 16 == 0

        def make_te(m):
            new = te.Linear(m.in_features, m.out_features, bias=m.bias is not None, params_dtype=m.weight.dtype,
                            device=m.weight.device)
            return _copy_params(new, m)

        layers = getattr(model, "layers", model)  # decoder layers only: the heads stay torch (fp32 reward)
        n = _swap(layers, layer_linear, make_te)
        lines.append(f"te_linear: {n} decoder nn.Linear -> transformer_engine.pytorch.Linear")
    return lines


def fp8_autocast(enabled: bool):
    """Context for the forward pass: TE's FP8 autocast (delayed scaling, HYBRID = E4M3 forward, E5M2
    gradients) when ``enabled``; a nullcontext otherwise. Only te.Linear / TE modules run in FP8."""
    if not enabled:
        return contextlib.nullcontext()
    probe = probe_transformer_engine()
    if not probe.available:
        raise RuntimeError(f"fp8 needs transformer_engine: {probe.detail}")
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


# ---------------------------------------------------------------- the start-of-run report


def backend_report(device, dtype: torch.dtype | None, attention_backend: str, *, optimizer_backend: str | None = None,
                   fast_paths: list[str] | None = None, probes: dict[str, Probe] | None = None) -> dict:
    """Everything the trainer logs once at start, as a JSON-friendly dict."""
    probes = probes if probes is not None else detect_accelerators()
    chosen, why = select_attention_backend(attention_backend, device, dtype)
    return {
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "attention": {"requested": attention_backend, "chosen": chosen, "why": why},
        "optimizer": optimizer_backend,
        "fast_paths": list(fast_paths or []),
        "installed": {name: asdict(probe) for name, probe in probes.items()},
    }


def format_report(report: dict) -> str:
    """One log line: chosen backends, then what is installed (name=version or name=-)."""
    installed = " ".join(f"{name}={p['version'] if p['available'] else '-'}" for name, p in report["installed"].items())
    attention = report["attention"]
    parts = [f"attention {attention['chosen']} ({attention['why']})"]
    if report["optimizer"]:
        parts.append(f"optimizer {report['optimizer']}")
    parts += report["fast_paths"]
    return "backends: " + "; ".join(parts) + f" | installed: {installed}"


# ---------------------------------------------------------------- benchmark: python -m megapmp.backends --bench


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
    import time

    import numpy as np

    from megapmp.data.datasets import Pair
    from megapmp.data.packing import pack_pairs
    from megapmp.flops import attention_pairs
    from megapmp.model.attention import AttentionInputs, attention

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


def _main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print what megapmp would use here; --bench times attention.")
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
    raise SystemExit(_main())
