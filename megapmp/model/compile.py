"""Regional torch.compile: the decoder layer compiled on its own, as torchtitan does.

Compiling the layer rather than the whole model keeps compile time to one layer's graph, leaves the
embedding, the loss and the pipeline/TP plumbing eager, and composes with activation checkpointing (the
checkpoint wraps the compiled call). What is compiled is ``megapmp.model.qwen2.run_layer(layer, h, rope,
attn)``, a function taking the layer as an argument: dynamo then treats the parameters as graph inputs and
ONE graph per input shape serves all layers (measured on this CPU: 4 layers, 1 graph). Compiling each
layer module instead (``layer.compile()``) gave one graph per layer: 28 compiles per shape for Qwen2-1.5B.

Shapes: compiled with ``dynamic=False``, each distinct input shape is one more graph (~5 s each on an H200
for a Qwen2-1.5B layer). A run that compiles therefore gives every micro-batch ONE shape: the loader packs
each micro-batch into a flat row of exactly ``data.micro_batch_tokens`` tokens (a token budget fitted to
the shards' lengths by default; megapmp.data.loader), so the layers compile once, in the first step, and
never again. (The alternative, a dynamic token dimension, would put symbolic shapes through FlexAttention's
block mask and the inductor kernels of every layer; nothing of that has run on a GPU here, so the fixed
shape, as Megatron and torchtitan run, is the default.) Without a budget (``micro_batch_tokens = -1`` or
an explicit ``data.bucket_tokens``) rows are padded to multiples of ``bucket_tokens`` and each bucket a run
visits compiles once; dynamo's per-code recompile limit (8 by default) would silently fall back to eager
past that many buckets, so it is raised to ``max_shapes``.

Measured on an H200 (torch 2.11, Qwen2-1.5B layer, 9.7k-token packed row, FlexAttention, bf16): one layer
forward + backward 4.72 ms compiled vs 6.87 ms eager; first compile 6.5 s, a new bucket ~5 s.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from megapmp.config import COMPILE_SETTINGS

DEFAULT_BUCKET_TOKENS = 256  # padding per micro-batch <= 255 tokens (< 3% of a 9k-token micro-batch)


def compile_enabled(setting: str, device: torch.device, tp_size: int = 1) -> bool:
    """``TrainConfig.compile`` -> whether to compile: auto compiles on CUDA only (on a CPU the inductor C++
    build costs minutes of a short run and the segmented backend is already the fast path), and not under
    tensor parallelism, whose collectives inside custom autograd Functions split the layer's graph in ways
    no test has covered yet ("on" still compiles there)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda" and tp_size == 1
    return setting == "on"


def bucket_tokens(configured: int, shape_specialised: bool) -> int:
    """The flat row's padding multiple: ``data.bucket_tokens`` if set, else 256 when something compiled
    per input shape runs (the compiled layers, or FlexAttention's own compiled kernel), else 1."""
    if configured:
        return configured
    return DEFAULT_BUCKET_TOKENS if shape_specialised else 1


def token_budget(micro_batch_tokens: int, bucket_tokens_setting: int, packing: str,
                 shape_specialised: bool) -> int | str | None:
    """``data.micro_batch_tokens`` -> the loader's ``micro_batch_tokens``: a fixed budget, "auto" (fitted to
    the shards) or None (no budget). Automatic means a budget exactly when something compiled per input
    shape runs on flat rows and no bucket was asked for: the CPU default (nothing compiled) is untouched."""
    if micro_batch_tokens > 0:
        return micro_batch_tokens
    if micro_batch_tokens == 0 and shape_specialised and packing == "flat" and not bucket_tokens_setting:
        return "auto"
    return None


def allow_shapes(max_shapes: int) -> None:
    """Let dynamo keep ``max_shapes`` graphs per function (its default, 8, would silently drop back to eager
    past the eighth bucket: for flex that is the kernel materialising [R, H, S, S] scores)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_shapes)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * max_shapes)


_compiled_run_layer = None


def compile_layers(model: nn.Module, *, max_shapes: int = 64) -> int:
    """Run every decoder layer of ``model`` (a Qwen2RewardModel or pipeline chunk) through the compiled
    ``run_layer``, shared by all models of the process; returns how many layers. The module tree, and so
    every parameter name (checkpoints, TP slicing, converters), is unchanged."""
    global _compiled_run_layer
    from megapmp.model.qwen2 import run_layer

    allow_shapes(max_shapes)
    if _compiled_run_layer is None:
        _compiled_run_layer = torch.compile(run_layer, dynamic=False)
    model.run_layer = _compiled_run_layer
    return len(model.layers)


# dynamo's timers of the two top-level compile events: tracing + compiling a frame's forward graph, and the
# AOT-autograd backward graph, which is compiled lazily at the first backward of each shape. (torch's own
# calculate_time_spent() misses the latter when the backward runs outside dynamo's metrics context, as it
# does under a trainer's loss.backward(): measured 21 s of 60 on a CPU run.)
_COMPILE_EVENTS = ("_compile.compile_inner", "backward._backward_impl")


@contextmanager
def eager_layers(model: nn.Module):
    """Run ``model``'s layers eagerly inside the block: evaluation's [rows, seq_len] shapes and no-grad
    graphs would otherwise be compiled too, each new shape once more, and counted in no step's compile_s."""
    compiled = model.run_layer
    from megapmp.model.qwen2 import run_layer

    model.run_layer = run_layer
    try:
        yield model
    finally:
        model.run_layer = compiled


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (forward frames and backward graphs). The
    trainer reports the difference around each step and leaves it out of the step's rates. Not included:
    the JIT compile and autotuning of hand-written Triton kernels (the fused loss) on their first call."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(compilation_time_metrics.get(event, ())) for event in _COMPILE_EVENTS))
