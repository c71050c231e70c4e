"""The trainer's parallel plumbing: process-group start-up, building this rank's model part, the
step's forward/backward over TP/PP, gradient completion and the global gradient norm.

Init does not depend on the layout: every rank builds (and seeds, or loads ``init_from`` into) the full
single-process model, keeps its pipeline stage's chunks and then its TP slices, so any (tp, pp, dp)
run starts from exactly the single-process weights.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from megapmp.parallel.parallelize import parallelize_model, tp_layout
from megapmp.parallel.pipeline import (build_stage_chunks, reduce_tied_embedding_grads, sync_tied_embeddings,
                                       tied_duplicate_params)
from megapmp.parallel.topology import ParallelContext, ParallelDims


def init_distributed() -> bool:
    """``init_process_group`` from torchrun's environment when WORLD_SIZE > 1 (NCCL on CUDA, else gloo);
    sets the CUDA device from LOCAL_RANK. Returns whether torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def build_context(parallel_cfg) -> ParallelContext:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    dims = ParallelDims.from_config(parallel_cfg, world)
    ctx = dims.build()
    if ctx.pp_group is not None and ctx.pp_size > 1:
        # NCCL creates communicators lazily; a first collective on the pipeline group makes its p2p
        # sends find an initialised communicator (batch_isend_irecv must not be the first call).
        dist.barrier(group=ctx.pp_group)
    return ctx


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def stage_chunks(full: nn.Module, cfg, ctx: ParallelContext, device: torch.device) -> list[nn.Module]:
    """This rank's model chunks (pipeline stage part of ``full``, then TP-sliced), on ``device``."""
    if ctx.pp_size == 1:
        chunks = [full.to(device)]
    else:
        with torch.device("meta"):
            chunks = build_stage_chunks(cfg.model, ctx.pp_rank, ctx.pp_size, ctx.vpp_size,
                                        activation_checkpointing=cfg.activation_checkpointing,
                                        attention_backend=cfg.attention_backend)
        state = full.state_dict()
        for chunk in chunks:
            chunk.to_empty(device=device)
            chunk.rotary.reset_parameters()  # the non-persistent RoPE table
            mine = {k: v for k, v in state.items() if k in chunk.state_dict()}
            missing, _ = chunk.load_state_dict(mine, strict=False)
            if missing:
                raise RuntimeError(f"stage {ctx.pp_rank}: no weights for {missing}")
            chunk.tie_weights()
    if ctx.tp_size > 1:
        for chunk in chunks:
            parallelize_model(chunk, ctx, sequence_parallel=cfg.parallel.sequence_parallel)
    sync_tied_embeddings(chunks, ctx)
    return chunks


def named_parameters(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """(full-model name, parameter) over the chunks; a parameter shared inside a chunk appears once."""
    seen, out = set(), []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


def layouts(chunks: list[nn.Module]) -> dict:
    """name -> TPLayout for every parameter of the chunks."""
    return {name: tp_layout(chunk, name) for chunk in chunks for name, _ in chunk.named_parameters()}


def counted_in_norm(chunks: list[nn.Module], ctx: ParallelContext) -> dict[int, bool]:
    """id(param) -> whether this rank counts it in the global gradient norm: each element of the full
    model exactly once over TP x PP (TP-replicated tensors on tp_rank 0, a replicated kv head on its
    first holder, the last stage's tied LM-head copy never)."""
    skip = {id(p) for p in tied_duplicate_params(chunks, ctx)}
    table = layouts(chunks)
    out = {}
    for name, p in named_parameters(chunks):
        layout = table[name]
        counted = id(p) not in skip
        if layout.kind == "replicated" and ctx.tp_rank != 0:
            counted = False
        if layout.kind == "kv_replica" and ctx.tp_rank % (ctx.tp_size // layout.slots) != 0:
            counted = False
        out[id(p)] = counted
    return out


def tp_partial_sync(chunks: list[nn.Module], ctx: ParallelContext) -> None:
    """Complete TP-partial gradients (SP norms, score, replicated kv heads) and sum the tied embedding
    copies over the first and last pipeline stage."""
    from megapmp.parallel.parallelize import allreduce_tp_replicated_grads

    for chunk in chunks:
        allreduce_tp_replicated_grads(chunk, ctx)
    reduce_tied_embedding_grads(chunks, ctx)


def global_norm(local_sq: torch.Tensor, ctx: ParallelContext, *, over_dp: bool) -> torch.Tensor:
    """sqrt of ``local_sq`` summed over the model-parallel group (and the DP group when the gradients
    are DP-sharded, as under ZeRO-1)."""
    sq = local_sq.detach().clone()
    if ctx.mp_group is not None and dist.get_world_size(ctx.mp_group) > 1:
        dist.all_reduce(sq, group=ctx.mp_group)
    if over_dp and ctx.dp_group is not None and ctx.dp_size > 1:
        dist.all_reduce(sq, group=ctx.dp_group)
    return sq.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when clipping is off."""
    if not max_norm or max_norm == float("inf"):
        return torch.ones((), dtype=torch.float32, device=norm.device)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def autocast_context(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
