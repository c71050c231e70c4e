"""The training engine: one object that runs an optimizer step of this rank's model part on any layout.

    engine = Engine(chunks, ctx, cfg.parallel, cfg.optimizer, device=device, amp_dtype=amp_dtype)
    engine.zero_grad()
    totals = engine.forward_backward(micro_batches, loss_fn, tokens=..., flops=...)   # device tensor
    engine.finish_grads()                     # DP / TP-partial / tied-embedding gradient completion
    norm = engine.clip_grad_norm(max_norm)    # global norm, each element of the full model counted once
    sums, norm = StepSums.read(totals, norm)  # the step's one device -> host read-back
    engine.optimizer_step(lr)

A single process is the layout tp = pp = dp = 1 and takes the same path: ``run_schedule`` with one stage
(1F1B over one stage is the plain forward-backward loop), gradient completion whose collectives are
no-ops, plain AdamW. What differs between layouts is decided here, once, at construction: the pipeline
schedule, ZeRO-1 (``DistributedOptimizer``, only with more than one data-parallel rank: over one rank it
would shard nothing) or the plain optimizer, and which parameters count in the gradient norm.

The loss function is the trainer's objective; the engine supplies what the layout decides::

    loss_fn(hidden, heads, batch, *, tp_group, sequence_parallel) -> megapmp.loss.LossOutput

with ``heads`` = ``megapmp.loss.Heads.of(last pipeline chunk)``, ``tp_group`` None for one TP
rank. Its ``loss`` must already be normalised by the whole step's counts (see megapmp.loss).

Checkpoint state: ``local_state()`` gives this rank's model and optimizer tensors for the sharded format,
``load_full_state()`` takes layout-independent full tensors and keeps this rank's slices; the plain
optimizer and its param groups are there for the single-file format (``optimizer``, ``param_names``,
``whole_model``). megapmp.checkpoint.save / resume use these; the trainer does not.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from megapmp.device import host_values_to
from megapmp.loss import Heads
from megapmp.optim import build_optimizer
from megapmp.parallel.data_parallel import DistributedOptimizer, GradSync
from megapmp.parallel.parallelize import (allreduce_tp_replicated_grads, load_full_state_dict, parallelize_model,
                                          shard_tensor, tp_layout)
from megapmp.parallel.pipeline import (build_stage_chunks, reduce_tied_embedding_grads, run_schedule,
                                       sync_tied_embeddings, tied_duplicate_params)
from megapmp.parallel.schedules import build_schedule
from megapmp.parallel.topology import ParallelContext


@dataclass(frozen=True)
class StepSums:
    """One optimizer step's sums over every micro-batch of every data-parallel rank (same on all ranks).

    loss, rm_loss, lm_loss are already normalised by the step's global counts (their sums are the step's
    loss); correct and margin_sum are summed over pairs, tokens over real (non-padding) tokens, flops is
    the model FLOPs of the step (megapmp.flops.step_flops).
    """

    loss: float
    rm_loss: float
    lm_loss: float
    correct: float
    margin_sum: float
    tokens: float
    flops: float

    @classmethod
    def read(cls, totals: torch.Tensor, grad_norm: torch.Tensor) -> tuple["StepSums", float]:
        """The sums (``forward_backward``'s float64 [7] device tensor) and the gradient norm, copied to the
        host together: one synchronisation per optimizer step, after all of the step's work is queued."""
        *values, norm = torch.cat([totals.double(), grad_norm.detach().double().reshape(1)]).tolist()
        return cls(*values), norm


def build_rank_chunks(full: nn.Module, build_chunk: Callable[..., nn.Module], ctx: ParallelContext,
                      device: torch.device, *, sequence_parallel: bool) -> list[nn.Module]:
    """This rank's model chunks on ``device``: its pipeline stage's part of ``full`` (weights copied by
    name), then TP-sliced. ``build_chunk`` makes an empty chunk (see pipeline.build_stage_chunks).

    Init does not depend on the layout: every rank builds (and seeds, or loads ``init_from`` into) the
    full single-process model and keeps its part, so any (tp, pp, dp) run starts from exactly the
    single-process weights.
    """
    if ctx.pp_size == 1:  # the whole model is the one chunk: no copy
        chunks = [full.to(device)]
    else:
        with torch.device("meta"):
            chunks = build_stage_chunks(build_chunk, full.config.num_hidden_layers, ctx.pp_rank, ctx.pp_size,
                                        ctx.vpp_size)
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
            parallelize_model(chunk, ctx, sequence_parallel=sequence_parallel)
    sync_tied_embeddings(chunks, ctx)
    return chunks


def named_parameters(chunks: Sequence[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """(full-model name, parameter) over the chunks; a parameter shared inside a chunk appears once."""
    seen, out = set(), []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


def parameter_layouts(chunks: Sequence[nn.Module]) -> dict:
    """name -> TPLayout for every parameter of the chunks."""
    return {name: tp_layout(chunk, name) for chunk in chunks for name, _ in chunk.named_parameters()}


def counted_in_norm(chunks: Sequence[nn.Module], ctx: ParallelContext) -> dict[int, bool]:
    """id(param) -> whether this rank counts it in the global gradient norm: each element of the full
    model exactly once over TP x PP (TP-replicated tensors on tp_rank 0, a replicated kv head on its
    first holder, the last stage's tied LM-head copy never)."""
    skip = {id(p) for p in tied_duplicate_params(chunks, ctx)}
    table = parameter_layouts(chunks)
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


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when clipping is off."""
    if not max_norm or max_norm == float("inf"):
        return torch.ones((), dtype=torch.float32, device=norm.device)
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def _sum_over(value: torch.Tensor, *groups) -> torch.Tensor:
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    return value


class Engine:
    """This rank's model chunks, their optimizer and gradient plumbing, for one layout (see module doc).

    chunks: this rank's pipeline chunks (chunk c = virtual stage c * pp + pp_rank), already TP-sliced;
    ctx: the topology; parallel_cfg / optimizer_cfg: ``cfg.parallel`` / ``cfg.optimizer``;
    amp_dtype: the autocast dtype of forward and loss (None: no autocast).
    """

    def __init__(self, chunks: Sequence[nn.Module], ctx: ParallelContext, parallel_cfg, optimizer_cfg, *,
                 device: torch.device, amp_dtype: torch.dtype | None):
        self.chunks, self.ctx, self.device, self.amp_dtype = list(chunks), ctx, device, amp_dtype
        self.params = named_parameters(self.chunks)
        self.param_names = {p: n for n, p in self.params}
        self.layouts = parameter_layouts(self.chunks)
        self.counted = counted_in_norm(self.chunks, ctx)
        # One stage: 1F1B is forward, backward per micro-batch (all-forward-all-backward would hold every
        # micro-batch's activations at once for nothing).
        self.schedule = parallel_cfg.schedule if ctx.pp_size > 1 else "1f1b"
        self.sequence_parallel = parallel_cfg.sequence_parallel and ctx.tp_size > 1
        self.hidden_size = self.chunks[0].config.hidden_size
        o = optimizer_cfg
        # ZeRO-1 over one DP rank shards nothing: plain AdamW is the same optimizer, with the same curve and
        # the plain checkpoint format (a one-process run of a multi-GPU config saves and resumes).
        self.zero = self.optimizer = None
        self.notes = []
        if parallel_cfg.distributed_optimizer and ctx.dp_size == 1:
            self.notes.append("parallel.distributed_optimizer = true with 1 data-parallel rank: nothing to shard, "
                              "using plain AdamW")
        if parallel_cfg.distributed_optimizer and ctx.dp_size > 1:
            self.zero = DistributedOptimizer(self.params, ctx.dp_group, lr=o.lr, weight_decay=o.weight_decay,
                                             betas=(o.beta1, o.beta2), eps=o.eps)
            self._zero_norm_weights = self.zero.norm_weights([self.counted[id(p)] for _, p in self.zero.named])
            self.optimizer_backend = f"ZeRO-1 AdamW over {ctx.dp_size} DP ranks"
        else:
            module = self.chunks[0] if len(self.chunks) == 1 else nn.ModuleList(self.chunks)
            self.optimizer, self.optimizer_backend = build_optimizer(
                module, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps, backend=o.backend)
        self.grad_sync = GradSync([p for _, p in self.params], None if self.zero else ctx.dp_group,
                                  bucket_mb=parallel_cfg.bucket_mb, overlap=parallel_cfg.overlap_grad_reduce)
        # ZeRO-1 only: this rank's reduce-scattered gradient slice and the clip factor, from finish_grads
        # and clip_grad_norm to optimizer_step.
        self._zero_grads = None
        self._zero_clip_scale = None
        if ctx.world_size > 1:  # the run's log says what layout it runs
            p, zero = parallel_cfg, self.zero is not None
            self.notes.append(
                f"layout: world {ctx.world_size} = tp {ctx.tp_size} x pp {ctx.pp_size} x dp {ctx.dp_size} "
                f"(vpp {ctx.vpp_size}, schedule {p.schedule if ctx.pp_size > 1 else '-'}, sequence parallel "
                f"{p.sequence_parallel}, distributed optimizer {zero}, DP overlap {p.overlap_grad_reduce}); "
                f"backend {dist.get_backend()}")

    @property
    def kind(self) -> str:
        """The optimizer-state format of a checkpoint: "zero1" (DP-sharded) or "adamw"."""
        return "zero1" if self.zero is not None else "adamw"

    @property
    def whole_model(self) -> nn.Module | None:
        """The whole model as one module, in a single-process run; None when the run has more than one rank.

        Single-device consumers (the single-file checkpoint format, held-out scoring) ask this instead of
        testing the world size, so the trainer never branches on the layout itself.
        """
        return self.chunks[0] if self.ctx.world_size == 1 else None

    # -- the step ---------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None
        self._zero_grads = self._zero_clip_scale = None

    def forward_backward(self, micro_batches: Sequence, loss_fn: Callable, *, tokens: float,
                         flops: float) -> torch.Tensor:
        """Forward and backward of every micro-batch (torch PackedBatch, the same on every stage of a
        pipeline); gradients accumulate into the parameters' .grad. ``tokens`` / ``flops``: this DP rank's
        counts, summed over DP in the same all-reduce as the loss sums.

        Returns the step's sums as a float64 [7] tensor on the device, in StepSums' field order, without
        waiting for the device: read it with ``StepSums.read`` once the step's work is queued."""
        ctx = self.ctx
        self.grad_sync.start_step(len(micro_batches))
        actions = build_schedule(self.schedule, ctx.pp_size, len(micro_batches), ctx.vpp_size)[ctx.pp_rank]
        heads = Heads.of(self.chunks[-1])  # the loss runs on the last virtual stage, which holds the heads
        tp_group = ctx.tp_group if ctx.tp_size > 1 else None

        def stage_loss(hidden, batch):
            return loss_fn(hidden, heads, batch, tp_group=tp_group, sequence_parallel=self.sequence_parallel)

        totals = run_schedule(actions, self.chunks, micro_batches, ctx, stage_loss,
                              forward_context=self._forward_context, activation_shape=self._activation_shape)
        counts = host_values_to([float(tokens), flops], totals.device, torch.float64)
        sums = torch.cat([totals.double(), counts])
        return _sum_over(sums, ctx.dp_group)  # each DP rank's loss is its share of the global one

    def _forward_context(self):
        # The loss too runs under autocast, so its logit GEMMs take the bf16 tensor-core path (softmax,
        # log-sum-exp and the rewards stay fp32 inside).
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _activation_shape(self, batch) -> tuple[int, ...]:
        rows, seq_len = batch.input_ids.shape
        if self.sequence_parallel:
            return (rows * seq_len // self.ctx.tp_size, self.hidden_size)  # an SP token shard
        return (rows, seq_len, self.hidden_size)

    def finish_grads(self) -> None:
        """DP sum (waits for the overlapped buckets), TP-partial and tied-embedding sums; under ZeRO-1 the
        DP reduce-scatter instead (this rank keeps its gradient slice for optimizer_step)."""
        self.grad_sync.finish()
        for chunk in self.chunks:
            allreduce_tp_replicated_grads(chunk, self.ctx)
        reduce_tied_embedding_grads(self.chunks, self.ctx)
        if self.zero is not None:
            self._zero_grads = self.zero.reduce_scatter_grads()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm (each element of the full model counted once), gradients scaled to
        ``max_norm`` (0 or inf: no clipping). Under ZeRO-1 the scale is applied in optimizer_step."""
        max_norm = max_norm or float("inf")
        ctx = self.ctx
        if self.zero is not None:
            local_sq = (self._zero_grads[0].float().pow(2) * self._zero_norm_weights).sum()
            norm = _sum_over(local_sq.detach().clone(), ctx.mp_group, ctx.dp_group).sqrt()
            self._zero_clip_scale = clip_coefficient(norm, max_norm)
            return norm
        counted = [p.grad for _, p in self.params if p.grad is not None and self.counted[id(p)]]
        # torch's own norm (and, below, its clip): one process computes exactly clip_grad_norm_.
        norm = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=self.device)
        if ctx.mp_group is not None and dist.get_world_size(ctx.mp_group) > 1:
            norm = _sum_over(norm.detach().float().square(), ctx.mp_group).sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for _, p in self.params], max_norm, norm)
        return norm

    def optimizer_step(self, lr: float) -> None:
        if self.zero is not None:
            grad, present = self._zero_grads
            self.zero.step(grad, present, lr=lr, scale=self._zero_clip_scale)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self._zero_grads = self._zero_clip_scale = None

    # -- checkpoint state ---------------------------------------------------------------------------

    def local_state(self) -> dict:
        """This rank's part of a sharded checkpoint: {"records", "model", "optimizer", "zero", "state_names"}.

        records: [name, local shape, TPLayout dict] per parameter; model: name -> local tensor, the tied
        LM-head copy of a pipeline's last stage left out (it is the embedding); optimizer: plain AdamW
        tensors "name.key" (None under ZeRO-1); zero: this DP rank's ZeRO-1 shard (None otherwise);
        state_names: parameters that have optimizer state.
        """
        skip = {id(p) for p in tied_duplicate_params(self.chunks, self.ctx)}
        records = [[n, list(p.shape), asdict(self.layouts[n])] for n, p in self.params]
        model = {n: p for n, p in self.params if id(p) not in skip}
        optimizer = zero = None
        if self.zero is None:
            optimizer = {f"{n}.{k}": v.reshape(()) if k == "step" else v
                         for n, p in self.params if id(p) not in skip
                         for k, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
            state_names = {key.rsplit(".", 1)[0] for key in optimizer}
        else:
            zero = self.zero.shard_state()
            state_names = {n for (n, p), steps in zip(self.zero.named, zero["steps"].tolist())
                           if steps > 0 and id(p) not in skip}
        return {"records": records, "model": model, "optimizer": optimizer, "zero": zero,
                "state_names": sorted(state_names)}

    @torch.no_grad()
    def load_full_state(self, model_state: dict, optimizer_states: dict, tie_word_embeddings: bool) -> None:
        """Full (layout-independent) weights and per-parameter AdamW states -> this rank's slices."""
        if tie_word_embeddings:
            model_state.setdefault("lm_head.weight", model_state["embed_tokens.weight"])
            if "embed_tokens.weight" in optimizer_states:
                optimizer_states.setdefault("lm_head.weight", optimizer_states["embed_tokens.weight"])
        for chunk in self.chunks:
            load_full_state_dict(chunk, model_state, self.ctx)
        local = {name: {k: v if k == "step" else shard_tensor(v, self.layouts[name], self.ctx.tp_rank, self.ctx.tp_size)
                        for k, v in optimizer_states[name].items()}
                 for name, _ in self.params if name in optimizer_states}
        if self.zero is not None:
            self.zero.load_local(local)
            return
        current = self.optimizer.state_dict()
        index = {p: i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        current["state"] = {index[p]: {k: v.to(self.device) if k != "step" else v.float().reshape(())
                                       for k, v in local[name].items()}
                            for name, p in self.params if name in local and p in index}
        self.optimizer.load_state_dict(current)
