"""Pipeline parallelism: split the model into stage chunks, and run one stage's schedule.

    chunks = build_stage_chunks(config, ctx.pp_rank, ctx.pp_size, ctx.vpp_size)   # then load/init weights
    sync_tied_embeddings(chunks, ctx)                                             # after init or load
    actions = build_schedule("1f1b", ctx.pp_size, len(micro_batches), ctx.vpp_size)[ctx.pp_rank]
    totals = run_schedule(actions, chunks, micro_batches, ctx, pmp_loss_fn(chunks[-1], ...))
    reduce_tied_embedding_grads(chunks, ctx)                                      # before clipping

`ctx` is a ``megapmp.parallel.topology.ParallelContext``; only ``pp_group``, ``pp_ranks``
(global ranks of this pipeline's stages, in order), ``pp_rank`` and, for tied embeddings,
``embedding_group``/``embedding_ranks`` are used.

What travels between stages: only hidden states [R, S, H] forward and their gradients backward. Every
stage of a pipeline gets the same micro-batches from the loader (same dp_rank), so token ids, positions,
attention structure, labels and read-out indices are local everywhere, and so are the shapes: R varies
per micro-batch, but every stage reads it from its own copy of micro-batch m, so no shape header is
sent.

Tied embeddings with pp > 1 (Megatron's embedding group): the first stage's ``embed_tokens.weight``
and the last stage's ``lm_head.weight`` are two copies of one matrix. They start equal
(`sync_tied_embeddings`), their gradients are summed over the first and last stage after backward
(`reduce_tied_embedding_grads`), and both copies then take the same optimizer step. Count the matrix
once in the gradient norm and save it once (`tied_duplicate_params` names the copy to skip).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from megapmp.eval.scoring import attention_inputs
from megapmp.loss import LossOutput, pmp_loss
from megapmp.model.qwen2 import Qwen2RewardModel
from megapmp.parallel.schedules import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, communication_batches,
                                        peer_stage, virtual_stage)

METRICS = ("loss", "rm_loss", "lm_loss", "correct", "margin_sum")  # the rows of run_schedule's result


def layer_split(num_layers: int, num_virtual_stages: int) -> list[list[int]]:
    """Contiguous layer ids per virtual stage, as even as possible; earlier stages take the remainder
    (the last one also runs the heads and the loss)."""
    if num_layers < num_virtual_stages:
        raise ValueError(f"{num_layers} layers cannot fill {num_virtual_stages} pipeline stages x chunks: "
                         "every virtual stage needs at least one layer")
    base, extra = divmod(num_layers, num_virtual_stages)
    bounds = [0]
    for v in range(num_virtual_stages):
        bounds.append(bounds[-1] + base + (v < extra))
    return [list(range(bounds[v], bounds[v + 1])) for v in range(num_virtual_stages)]


def build_stage_chunks(config, stage: int, num_stages: int, num_chunks: int = 1,
                       **model_kwargs) -> list[Qwen2RewardModel]:
    """This stage's model chunks; chunk c is virtual stage c * num_stages + stage. Virtual stage 0 has
    the embedding, the last one the final norm, LM head and score head. Weights are uninitialised
    (call ``init_weights`` or load a state dict: parameter names are those of the full model)."""
    V = num_stages * num_chunks
    layers = layer_split(config.num_hidden_layers, V)
    chunks = []
    for c in range(num_chunks):
        v = virtual_stage(stage, c, num_stages)
        last = v == V - 1
        chunks.append(Qwen2RewardModel(config, layer_ids=layers[v], with_embedding=v == 0, with_final_norm=last,
                                       with_lm_head=last, with_score=last, **model_kwargs))
    return chunks


def pmp_loss_fn(last_chunk: Qwen2RewardModel, **loss_kwargs) -> Callable:
    """The loss_fn of run_schedule for PMP: ``pmp_loss`` with the last chunk's heads. loss_kwargs are
    pmp_loss's: rm_coef, lm_coef, global_pairs, global_lm_tokens (the whole step's counts), lm_chunk."""

    def loss_fn(hidden, batch) -> LossOutput:
        return pmp_loss(hidden, last_chunk.lm_head.weight, last_chunk.score.weight, batch, **loss_kwargs)

    return loss_fn


def run_schedule(actions: Sequence[Action], chunks: Sequence[nn.Module], micro_batches: Sequence, ctx,
                 loss_fn: Callable, *, forward_context: Callable = contextlib.nullcontext,
                 activation_shape: Callable | None = None, activation_dtype: torch.dtype | None = None,
                 broadcast_metrics: bool = True) -> torch.Tensor:
    """Run this stage's actions (one stage's list from ``megapmp.parallel.schedules``) for one step.

    chunks: this stage's model chunks (chunk c = virtual stage c * pp + pp_rank), each called as
        ``chunk(input_ids or hidden [R, S(, H)], position_ids, attention_inputs) -> hidden [R, S, H]``.
    micro_batches: torch PackedBatch objects, the same on every stage of the pipeline.
    loss_fn(hidden, batch) -> LossOutput: called on the last virtual stage only; backward starts from
        its ``loss``, which must already be normalised by the step's global counts (pmp_loss_fn).
    forward_context: entered around every chunk forward (e.g. ``lambda: torch.autocast(...)``) and the
        last stage's loss; backward runs outside it, as in the single-process trainer.
    activation_shape(batch) -> shape of the hidden states sent between stages; default (R, S, H).
    activation_dtype: dtype they travel in; default the chunks' parameter dtype. A stage output of
        another dtype is an error, not a silent cast.

    Gradients accumulate into the chunks' ``.grad`` (zero them before). Returns the step's summed
    ``METRICS`` (float32 [5]) of the last stage, broadcast to every stage of the pipeline unless
    broadcast_metrics is False (then zeros on the other stages).
    """
    P, stage, C = _pp_size(ctx), ctx.pp_rank, len(chunks)
    V = P * C
    used = {(a.microbatch, a.chunk) for a in actions}
    if any(not (0 <= m < len(micro_batches) and 0 <= c < C) for m, c in used):
        raise ValueError(f"stage {stage}: the schedule names micro-batches/chunks {sorted(used)} but "
                         f"{len(micro_batches)} micro-batches and {C} chunks were given")
    device = micro_batches[0].input_ids.device
    dtype = activation_dtype or next(chunks[0].parameters()).dtype
    if activation_shape is None:
        hidden_size = chunks[0].config.hidden_size

        def activation_shape(batch):
            return (*batch.input_ids.shape, hidden_size)

    inputs: dict = {}  # (m, c) -> received hidden [R, S, H] (leaf requiring grad)
    outputs: dict = {}  # (m, c) -> this chunk's output hidden, or the loss on the last virtual stage
    output_grads: dict = {}  # (m, c) -> received gradient w.r.t. the output
    input_grads: dict = {}  # (m, c) -> gradient w.r.t. the input, to send back
    totals = torch.zeros(len(METRICS), dtype=torch.float32, device=device)

    for step in communication_batches(list(actions)):
        if isinstance(step, tuple):
            _communicate(step, ctx, P, inputs, outputs, output_grads, input_grads,
                         lambda m: torch.empty(activation_shape(micro_batches[m]), dtype=dtype, device=device))
            continue
        m, c = step.microbatch, step.chunk
        v = virtual_stage(stage, c, P)
        if step.kind == F:
            batch = micro_batches[m]
            x = batch.input_ids if v == 0 else inputs[(m, c)]
            with forward_context():
                hidden = chunks[c](x, batch.position_ids, attention_inputs(batch))
                # The loss under the same autocast, as in the single-process trainer (fp32 rewards inside).
                out = loss_fn(hidden, batch) if v == V - 1 else None
            if out is not None:
                totals += torch.stack([out.loss.detach().float(), out.rm_loss.float(), out.lm_loss.float(),
                                       out.correct.float(), out.margin_sum.float()])
                # A micro-batch without loss terms still owes the earlier stages a (zero) gradient.
                hidden = out.loss if out.loss.requires_grad else hidden.sum() * 0.0
            elif hidden.dtype != dtype:
                raise TypeError(f"stage {stage} chunk {c} produced {hidden.dtype} activations, the pipeline "
                                f"sends {dtype} (activation_dtype)")
            outputs[(m, c)] = hidden
        elif step.kind == B:
            output = outputs.pop((m, c))
            torch.autograd.backward(output, grad_tensors=None if v == V - 1 else output_grads.pop((m, c)))
            if v > 0:
                input_grads[(m, c)] = inputs.pop((m, c)).grad
        else:
            raise ValueError(f"unknown action {step!r}")

    leftover = {name: sorted(d) for name, d in (("inputs", inputs), ("outputs", outputs),
                                                 ("output_grads", output_grads), ("input_grads", input_grads)) if d}
    if leftover:
        raise RuntimeError(f"stage {stage}: the schedule left unconsumed tensors {leftover}")
    if broadcast_metrics and P > 1:
        dist.broadcast(totals, src=ctx.pp_ranks[P - 1], group=ctx.pp_group)
    return totals


def _communicate(batch: tuple[Action, ...], ctx, P, inputs, outputs, output_grads, input_grads, new_buffer) -> None:
    """Post one batch of p2p actions together and wait for all of them (see schedules: a batch is
    what makes a simultaneous send and receive between two neighbours deadlock-free)."""
    ops, received = [], []
    for a in batch:
        key = (a.microbatch, a.chunk)
        peer = ctx.pp_ranks[peer_stage(a, ctx.pp_rank, P)]
        if a.kind == SEND_F:
            ops.append(dist.P2POp(dist.isend, outputs[key].detach().contiguous(), peer, ctx.pp_group))
        elif a.kind == SEND_B:
            ops.append(dist.P2POp(dist.isend, input_grads.pop(key).contiguous(), peer, ctx.pp_group))
        elif a.kind in (RECV_F, RECV_B):
            buffer = new_buffer(a.microbatch)
            (inputs if a.kind == RECV_F else output_grads)[key] = buffer
            ops.append(dist.P2POp(dist.irecv, buffer, peer, ctx.pp_group))
            received.append(buffer if a.kind == RECV_F else None)
        else:
            raise ValueError(f"not a communication action: {a!r}")
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    for buffer in received:
        if buffer is not None:
            buffer.requires_grad_()  # after the receive: autograd forbids writing into a leaf that requires grad


# ------------------------------------------------------------------------ tied embeddings


def tied_embedding_weight(chunks: Sequence[nn.Module], ctx) -> torch.Tensor | None:
    """This stage's copy of the tied embedding / LM head matrix, or None if it holds none or the
    model is not split across stages (a single stage ties the two by sharing one Parameter)."""
    if _pp_size(ctx) == 1 or not chunks[0].config.tie_word_embeddings:
        return None
    if ctx.pp_rank == 0:
        return chunks[0].embed_tokens.weight
    if ctx.pp_rank == _pp_size(ctx) - 1:
        return chunks[-1].lm_head.weight
    return None


def tied_duplicate_params(chunks: Sequence[nn.Module], ctx) -> list[nn.Parameter]:
    """The last stage's copy of a tied embedding ([] elsewhere): leave it out of the gradient norm
    and of checkpoints, so the matrix counts once."""
    weight = tied_embedding_weight(chunks, ctx)
    return [weight] if weight is not None and ctx.pp_rank == _pp_size(ctx) - 1 else []


@torch.no_grad()
def sync_tied_embeddings(chunks: Sequence[nn.Module], ctx) -> None:
    """Copy the first stage's embedding into the last stage's LM head (collective over the embedding
    group; call on every rank of the pipeline after init or load; a no-op where nothing is tied)."""
    weight = tied_embedding_weight(chunks, ctx)
    if weight is not None:
        dist.broadcast(weight, src=ctx.embedding_ranks[0], group=ctx.embedding_group)


@torch.no_grad()
def reduce_tied_embedding_grads(chunks: Sequence[nn.Module], ctx) -> None:
    """Sum the two copies' gradients over the first and last stage, so both equal the single-device
    gradient of the tied matrix. A missing gradient (e.g. lm_coef = 0) counts as zero."""
    weight = tied_embedding_weight(chunks, ctx)
    if weight is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ctx.embedding_group)


def _pp_size(ctx) -> int:
    return len(ctx.pp_ranks)
