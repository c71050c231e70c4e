"""Optional accelerators: what is installed, and which attention backend the run will use and why.

Nothing here is needed to import megapmp or to train: every optional package is imported inside a
try block, so ``backend_report`` (logged once at start) says both what was chosen and why anything was not.

    detect_accelerators()                -> {name: Probe}: torch/CUDA, flash_attn, flex, torch varlen,
                                            apex FusedAdam, triton -- only what megapmp can use
    select_attention_backend(name, ...)  -> (concrete backend, reason); "auto" picks the best usable one
    backend_report(...) / format_report  -> the dict / one line the trainer logs at start

Apex's FusedAdam is chosen by ``megapmp.optim.build_optimizer`` (optimizer.backend), reported here.
transformer-engine and apex's fused RMSNorm are not probed: no code path of megapmp uses them (the model's
linears and RMSNorm are plain torch, fused by torch.compile on a GPU), and a report listing them would
suggest otherwise. `tools/bench_attention.py` times the attention backends and prints this report.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import torch

from megapmp.model.attention import (ATTENTION_BACKENDS, AUTO_CUDA_ORDER, backend_available, flash_attn_usable,
                                     flex_usable, resolve_attention_backend, torch_varlen_usable)


@dataclass
class Probe:
    available: bool
    version: str | None
    detail: str


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


def detect_accelerators() -> dict[str, Probe]:
    """What this process could use, of what megapmp uses. Imports each optional package once."""
    cuda = torch.cuda.is_available()
    device_detail = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    flash_ok, flash_detail = flash_attn_usable()
    varlen_ok, varlen_detail = torch_varlen_usable()
    flex_ok, flex_detail = flex_usable()
    return {
        "torch": Probe(True, torch.__version__, f"CUDA {torch.version.cuda}, {device_detail}" if cuda else device_detail),
        "flash_attn": Probe(flash_ok, flash_detail.split()[-1] if flash_ok else None, flash_detail),
        "flex": Probe(flex_ok, torch.__version__ if flex_ok else None, flex_detail),
        "torch_varlen": Probe(varlen_ok, torch.__version__ if varlen_ok else None, varlen_detail),
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
        skipped = [_why_skipped(other, device, dtype) for other in AUTO_CUDA_ORDER if other != chosen]
        return chosen, "auto" + (f" (skipped {'; '.join(skipped)})" if chosen == "segmented" else "")
    ok, reason = backend_available(name, device, dtype)
    if not ok:
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    return name, "requested"


def _why_skipped(name: str, device, dtype) -> str:
    ok, reason = backend_available(name, device, dtype)
    # Usable yet not chosen by auto: only flex on CPU, whose eager path has no backward there.
    return f"{reason}; auto picks {name} on CUDA only" if ok else reason


# ---------------------------------------------------------------- the start-of-run report


def backend_report(device, dtype: torch.dtype | None, attention_backend: str, *, optimizer_backend: str | None = None,
                   probes: dict[str, Probe] | None = None) -> dict:
    """Everything the trainer logs once at start, as a JSON-friendly dict."""
    probes = probes if probes is not None else detect_accelerators()
    chosen, why = select_attention_backend(attention_backend, device, dtype)
    return {
        "device": str(device),
        "compute_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "attention": {"requested": attention_backend, "chosen": chosen, "why": why},
        "optimizer": optimizer_backend,
        "installed": {name: asdict(probe) for name, probe in probes.items()},
    }


def format_report(report: dict) -> str:
    """One log line: chosen backends, then what is installed (name=version or name=-)."""
    installed = " ".join(f"{name}={p['version'] if p['available'] else '-'}" for name, p in report["installed"].items())
    attention = report["attention"]
    parts = [f"attention {attention['chosen']} ({attention['why']})"]
    if report["optimizer"]:
        parts.append(f"optimizer {report['optimizer']}")
    return "backends: " + "; ".join(parts) + f" | installed: {installed}"
