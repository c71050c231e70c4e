"""Apply tensor (and sequence) parallelism to a plain ``Qwen2RewardModel``, from outside, by module name
(torchtitan's ``parallelize_llama``).

The model passed in holds the full weights; each swapped module gets this rank's slice of them, so a
model initialised with a seed and then parallelized computes exactly what the single-device model does.

Plan (T = TP size)::

    embed_tokens                         vocab-parallel embedding (rows sharded)
    layers.i.self_attn.{q,k,v}_proj      column-parallel (heads sharded; kv heads replicated if T > kv)
    layers.i.self_attn.o_proj            row-parallel
    layers.i.mlp.{gate,up}_proj          column-parallel
    layers.i.mlp.down_proj               row-parallel
    lm_head                              column-parallel over the vocabulary, logits NOT gathered
                                         (the loss uses vocab-parallel CE); stays tied to embed_tokens
    norms, score                         replicated

One collective enters each TP region, applied to the module's input by a forward pre-hook on
``self_attn`` / ``mlp``: ``copy_to_tp`` (replicated residual stream) or, with sequence parallelism,
``gather_from_sequence`` (the residual stream is a token shard). q/k/v and gate/up share it.

Sequence parallelism shards the *flattened* token axis: hidden states between TP regions are
[R*S/T, H], rank t holding the contiguous tokens [t*R*S/T, (t+1)*R*S/T) (needs R*S % T == 0; rows
need not divide). Megatron's [S, B, H] layout splits its leading dim the same way; for our [R, S, H]
flattening keeps every gather/scatter a contiguous dim-0 op and makes the packed batch's flat indices
(``chosen_index``, ``rejected_index``) map to a shard by one division. The attention still sees
whole rows: its pre-hook all-gathers and reshapes to [R, S, H] before q/k/v, so the packed mask and
RoPE are untouched. The model's output under SP is the final-normed shard [R*S/T, H].

Gradients: see ``allreduce_tp_replicated_grads``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megapmp.parallel.collectives import copy_to_tp, gather_from_sequence
from megapmp.parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, attention_head_shards, check_tp_compatible,
)


@dataclass(frozen=True)
class TPLayout:
    """How one rank's tensor relates to the full parameter.

    kind "shard": the full tensor is the concatenation over TP ranks along ``dim``.
    kind "replicated": every TP rank holds the full tensor. ``partial_grad``: each rank's gradient is
        only its sequence shard's share (SP norms, score, row-parallel bias) and must be all-reduced.
    kind "kv_replica": dim-0 slot ``slot`` of ``slots`` equal slots (one kv head), held by T / slots
        ranks, whose gradients are partial (each rank's q heads only) and must be summed.
    """

    kind: str = "replicated"
    dim: int = 0
    slot: int = 0
    slots: int = 1
    partial_grad: bool = False


REPLICATED = TPLayout()


def parallelize_model(model: nn.Module, ctx, *, sequence_parallel: bool = False) -> nn.Module:
    """Swap ``model``'s modules for TP ones holding this rank's slices (in place; returns ``model``).

    Works on a pipeline stage too (missing layers / embedding / heads are skipped). Records
    ``model.tp_layouts`` (parameter name -> TPLayout) and ``model.tp_sequence_parallel``.
    """
    config = model.config
    tp, rank, group = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    check_tp_compatible(config, tp)
    layouts: dict[str, TPLayout] = {}
    shard0, shard1 = TPLayout("shard", 0), TPLayout("shard", 1)
    sp_replicated = TPLayout(partial_grad=sequence_parallel)

    tied = model.embed_tokens is not None and model.lm_head is not None \
        and model.lm_head.weight is model.embed_tokens.weight
    if model.embed_tokens is not None:
        full = model.embed_tokens
        embed = VocabParallelEmbedding(full.num_embeddings, full.embedding_dim, group=group,
                                       sequence_parallel=sequence_parallel, device="meta")
        embed.weight = _param(full.weight, shard0, rank, tp)
        model.embed_tokens = embed
        layouts["embed_tokens.weight"] = shard0

    q_heads, kv_heads, kv_replicated = attention_head_shards(
        config.num_attention_heads, config.num_key_value_heads, tp, rank)
    head_dim = config.head_dim
    kv_layout = TPLayout("kv_replica", 0, kv_heads.start, config.num_key_value_heads) if kv_replicated else shard0
    for i, layer in model.layers.items():
        prefix = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        col = dict(group=group, input_prepared=True)
        attn.q_proj = _column(attn.q_proj, shard0, rank, tp, col)
        attn.k_proj = _column(attn.k_proj, kv_layout, rank, tp, col, local_out=len(kv_heads) * head_dim)
        attn.v_proj = _column(attn.v_proj, kv_layout, rank, tp, col, local_out=len(kv_heads) * head_dim)
        attn.o_proj = _row(attn.o_proj, rank, tp, group, sequence_parallel)
        mlp.gate_proj = _column(mlp.gate_proj, shard0, rank, tp, col)
        mlp.up_proj = _column(mlp.up_proj, shard0, rank, tp, col)
        mlp.down_proj = _row(mlp.down_proj, rank, tp, group, sequence_parallel)
        for proj, layout in (("q_proj", shard0), ("k_proj", kv_layout), ("v_proj", kv_layout)):
            layouts[f"{prefix}self_attn.{proj}.weight"] = layout
            layouts[f"{prefix}self_attn.{proj}.bias"] = layout
        layouts[f"{prefix}self_attn.o_proj.weight"] = shard1
        layouts[f"{prefix}mlp.gate_proj.weight"] = shard0
        layouts[f"{prefix}mlp.up_proj.weight"] = shard0
        layouts[f"{prefix}mlp.down_proj.weight"] = shard1
        for name, row in (("self_attn.o_proj", attn.o_proj), ("mlp.down_proj", mlp.down_proj)):
            if row.bias is not None:  # added after the reduction: replicated
                layouts[f"{prefix}{name}.bias"] = sp_replicated
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layouts[f"{prefix}{norm}.weight"] = sp_replicated
        attn.register_forward_pre_hook(_AttentionInput(group, sequence_parallel))
        mlp.register_forward_pre_hook(_MLPInput(group, sequence_parallel))

    if model.norm is not None:
        layouts["norm.weight"] = sp_replicated
    if model.lm_head is not None:
        full = model.lm_head
        head = ColumnParallelLinear(full.in_features, full.out_features, bias=False, group=group,
                                    sequence_parallel=sequence_parallel, device="meta")
        head.weight = model.embed_tokens.weight if tied else _param(full.weight, shard0, rank, tp)
        model.lm_head = head
        layouts["lm_head.weight"] = shard0
    if model.score is not None:
        # The reward is read at owned token indices of the SP shard, so its grad is partial there.
        layouts["score.weight"] = sp_replicated

    model.tp_layouts = layouts
    model.tp_sequence_parallel = sequence_parallel
    return model


def _param(full: torch.Tensor, layout: TPLayout, rank: int, tp: int) -> nn.Parameter:
    return nn.Parameter(shard_tensor(full.detach(), layout, rank, tp), requires_grad=full.requires_grad)


def shard_tensor(full: torch.Tensor, layout: TPLayout, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a full tensor under ``layout`` (a copy; replicated tensors are returned as is)."""
    if layout.kind == "replicated":
        return full
    if layout.kind == "shard":
        n = full.shape[layout.dim] // tp
        return full.narrow(layout.dim, rank * n, n).clone()
    if layout.kind == "kv_replica":
        n = full.shape[0] // layout.slots
        return full.narrow(0, layout.slot * n, n).clone()
    raise ValueError(f"unknown layout kind {layout.kind!r}")


def _column(full: nn.Linear, layout: TPLayout, rank: int, tp: int, kwargs: dict, local_out=None):
    layer = ColumnParallelLinear(full.in_features, full.out_features, bias=full.bias is not None,
                                 local_out_features=local_out, device="meta", **kwargs)
    layer.weight = _param(full.weight, layout, rank, tp)
    if full.bias is not None:
        layer.bias = _param(full.bias, layout, rank, tp)
    return layer


def _row(full: nn.Linear, rank: int, tp: int, group, sequence_parallel: bool):
    layer = RowParallelLinear(full.in_features, full.out_features, bias=full.bias is not None, group=group,
                              sequence_parallel=sequence_parallel, device="meta")
    layer.weight = _param(full.weight, TPLayout("shard", 1), rank, tp)
    if full.bias is not None:
        layer.bias = nn.Parameter(full.bias.detach(), requires_grad=full.bias.requires_grad)
    return layer


class _AttentionInput:
    """Pre-hook of ``self_attn``: the one collective entering the attention's TP region."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, module, args):
        x, rope, attn = args
        if self.sequence_parallel:
            rows, seq_len = attn.shape
            x = gather_from_sequence(x, self.group).view(rows, seq_len, -1)  # [N/T, H] -> [R, S, H]
        else:
            x = copy_to_tp(x, self.group)
        return (x, rope, attn)


class _MLPInput:
    """Pre-hook of ``mlp``: the MLP is token-wise, so under SP the gathered [N, H] needs no reshape."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, module, args):
        (x,) = args
        x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return (x,)


# -- gradients and full tensors -----------------------------------------------------------------------

def tp_layout(model: nn.Module, name: str) -> TPLayout:
    return getattr(model, "tp_layouts", {}).get(name, REPLICATED)


def tp_replicated_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters every TP rank holds in full (norms, score, row-parallel biases)."""
    return [(n, p) for n, p in model.named_parameters() if tp_layout(model, n).kind == "replicated"]


def tp_partial_grad_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose gradient after backward is only this rank's share of the TP sum."""
    return [(n, p) for n, p in model.named_parameters()
            if tp_layout(model, n).partial_grad or tp_layout(model, n).kind == "kv_replica"]


@torch.no_grad()
def allreduce_tp_replicated_grads(model: nn.Module, ctx) -> None:
    """Complete the gradients that backward leaves partial across the TP group; call once per optimizer
    step after the last backward (before the data-parallel reduction and clipping; they commute).

    - Under sequence parallelism the replicated norm weights, the score head and row-parallel biases
      see only this rank's tokens: their gradients are all-reduced (summed) over TP.
    - Replicated kv heads (T > kv): each copy's gradient covers only the q heads of its rank; the
      copies of one head are summed (each rank contributes its slot of a zero buffer to one all-reduce).
    Without SP and with kv split evenly there is nothing to do. One all-reduce per dtype.
    """
    if ctx.tp_size == 1:
        return
    by_dtype: dict[torch.dtype, list] = {}
    for name, p in tp_partial_grad_params(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must contribute the same buffer layout
        by_dtype.setdefault(p.grad.dtype, []).append((p, tp_layout(model, name)))
    for dtype, items in by_dtype.items():
        pieces = []
        for p, layout in items:
            if layout.kind == "kv_replica":
                slots = p.grad.new_zeros(layout.slots, p.grad.numel())
                slots[layout.slot] = p.grad.reshape(-1)
                pieces.append(slots.reshape(-1))
            else:
                pieces.append(p.grad.reshape(-1))
        flat = torch.cat(pieces)
        dist.all_reduce(flat, group=ctx.tp_group)
        offset = 0
        for p, layout in items:
            n = p.grad.numel()
            if layout.kind == "kv_replica":
                p.grad.copy_(flat[offset + layout.slot * n: offset + (layout.slot + 1) * n].view_as(p.grad))
                n *= layout.slots
            else:
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
            offset += n


def grad_norm_sq(model: nn.Module, ctx) -> torch.Tensor:
    """fp32 sum of squared gradients of this rank, counting every element of the full model once per TP
    group (sharded: all; replicated: on tp_rank 0 only; a kv_replica slot: on its first holder only).
    Sum it over ``ctx.mp_group`` (TP x PP) for the model's squared norm; call after
    ``allreduce_tp_replicated_grads`` and the DP reduction."""
    total = torch.zeros((), dtype=torch.float32)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        layout = tp_layout(model, name)
        if layout.kind == "replicated" and ctx.tp_rank != 0:
            continue
        if layout.kind == "kv_replica" and ctx.tp_rank % (ctx.tp_size // layout.slots) != 0:
            continue
        total = total.to(p.grad.device) + p.grad.float().pow(2).sum()
    return total


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, ctx, max_norm: float) -> torch.Tensor:
    """Global gradient norm over TP x PP (``grad_norm_sq`` summed over ``ctx.mp_group``), and clip to
    ``max_norm`` (0 or inf: only measure). Under PP with embeddings tied across the first and last
    stage, the pipeline code must count that matrix once."""
    sq = grad_norm_sq(model, ctx)
    if ctx.mp_group is not None:
        dist.all_reduce(sq, group=ctx.mp_group)
    norm = sq.sqrt()
    if max_norm and max_norm != float("inf"):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device))
    return norm


@torch.no_grad()
def gather_full_tensor(local: torch.Tensor, layout: TPLayout, ctx) -> torch.Tensor:
    """The full tensor from every TP rank's part (collective over the TP group)."""
    if layout.kind == "replicated" or ctx.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    if layout.kind == "shard":
        return torch.cat(parts, dim=layout.dim)
    holders = ctx.tp_size // layout.slots  # slot s lives on ranks [s*holders, (s+1)*holders)
    return torch.cat([parts[s * holders] for s in range(layout.slots)], dim=0)


def full_state_dict(model: nn.Module, ctx, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full parameters (or, with ``grads``, full gradients) by name, on every TP rank (collective)."""
    out = {}
    for name, p in model.named_parameters():
        local = p.grad if grads else p.detach()
        if local is None:
            local = torch.zeros_like(p)
        out[name] = gather_full_tensor(local, tp_layout(model, name), ctx)
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ctx) -> None:
    """Copy this rank's slices of full tensors (e.g. a layout-independent checkpoint) into ``model``."""
    for name, p in model.named_parameters():
        if name in state:
            p.copy_(shard_tensor(state[name], tp_layout(model, name), ctx.tp_rank, ctx.tp_size))
