"""Data parallelism: gradient summation over ``ctx.dp_group`` and a ZeRO-1 distributed optimizer.

The loss of every rank is already normalised by the *global* number of pairs / target tokens of the
step (megapmp.data.loader), so the gradient of the global loss is the plain SUM of the DP ranks'
gradients -- never an average.

    sync = GradSync(params, ctx.dp_group, bucket_mb=25, overlap=True)
    sync.start_step(num_micro_batches)      # before the first backward of a step
    ...backward of every micro-batch...     # buckets fire asynchronously once their grads are final
    sync.finish()                           # launch what is left (in bucket order), wait for all

    zero = DistributedOptimizer(named_params, ctx.dp_group, lr=..., weight_decay=..., betas=..., eps=...)
    grad_slice = zero.reduce_scatter_grads()          # this rank's slice of the summed flat gradient
    zero.step(grad_slice, lr=lr, scale=clip_coef)     # AdamW on the slice, then all-gather the params

Overlap (Megatron's DDP): a post-accumulate-grad hook counts, per parameter, the backward passes of the
step; the ``num_micro_batches``-th one is the last (no DP traffic during accumulation). A bucket whose
parameters are all final is launched with ``all_reduce(async_op=True)`` -- but only after every lower
bucket, so all ranks post their collectives in the same order whatever their backward timing. A
parameter a micro-batch never touched (e.g. the score head of a micro-batch without pairs) reaches
its count late or never; ``finish`` launches such buckets then. Each bucket carries one extra element
per parameter, 1 where this rank has a gradient, so a parameter without a gradient on *any* rank keeps
``grad = None`` (and AdamW skips it, exactly as in a single process).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from megapmp.device import host_values_to


def _dp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class GradSync:
    """Bucketed, backward-overlapped SUM all-reduce of gradients over a DP group (no-op for one rank).

    ``params``: this rank's parameters in model order (buckets are cut in reverse order, the order
    backward produces gradients). ``overlap=False`` reduces everything in ``finish`` (the simple
    fallback, and what tests compare against).
    """

    def __init__(self, params: list[nn.Parameter], group, *, bucket_mb: float = 25.0, overlap: bool = True):
        self.group = group
        self.enabled = _dp_size(group) > 1
        self.overlap = overlap and self.enabled
        self.params = [p for p in params if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        limit = max(1, int(bucket_mb * 2**20))
        current, size = [], 0
        for p in reversed(self.params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.handles = []
        if self.overlap:
            for p in self.params:
                self.handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._reset(0)

    def _reset(self, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        self.counts = {id(p): 0 for p in self.params}
        self.pending = [len(b) for b in self.buckets]  # parameters not yet final, per bucket
        self.next_bucket = 0  # lowest bucket not launched
        self.inflight: list[tuple[int, torch.Tensor, object]] = []
        self.active = False

    def start_step(self, micro_batches: int) -> None:
        """Arm the hooks for a step of ``micro_batches`` backward passes per parameter."""
        self._reset(micro_batches)
        self.active = self.overlap

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.active:
            return
        key = id(p)
        self.counts[key] += 1
        if self.counts[key] == self.micro_batches:
            self.pending[self.bucket_of[key]] -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_bucket < len(self.buckets) and self.pending[self.next_bucket] == 0:
            self._launch(self.next_bucket)

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        ref = bucket[0]
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype) for p in bucket]
        present = host_values_to([float(p.grad is not None) for p in bucket], ref.device, ref.dtype)
        flat = torch.cat(pieces + [present])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.inflight.append((b, flat, work))
        self.next_bucket = b + 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not yet launched (in order), wait for every reduction, write the sums
        back into ``.grad``. Call once per step after the last backward."""
        self.active = False
        if not self.enabled:
            return
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
        for b, flat, work in self.inflight:
            work.wait()
            bucket = self.buckets[b]
            present = flat[-len(bucket):]
            offset = 0
            for i, p in enumerate(bucket):
                n = p.numel()
                if present[i] > 0:
                    p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
                else:
                    p.grad = None
                offset += n
        self.inflight = []

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class DistributedOptimizer:
    """ZeRO-1 AdamW: fp32 master parameters and Adam moments sharded over the DP ranks.

    The parameters of this rank (``named_params``: (name, Parameter) in a fixed order) are viewed as one
    flat vector of N elements, padded to a multiple of D = DP size; DP rank d owns the contiguous slice
    ``[d*S, (d+1)*S)``, S = ceil(N / D). Per step: reduce-scatter the flat gradient (SUM), AdamW on the
    owned slice, all-gather the updated slices into every rank's parameters.

    The update is torch.optim.AdamW's single-tensor algorithm, element by element: decoupled weight
    decay ``p *= 1 - lr*wd`` (wd = 0 on 1-D parameters), ``m = lerp(m, g, 1-b1)``, ``v = b2 v + (1-b2) g^2``,
    ``p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)``. The step count t is kept per parameter
    and a parameter that has no gradient on any DP rank is skipped (as torch skips ``grad is None``), so
    the curve equals the unsharded optimizer's.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], group, *, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float):
        self.group = group
        self.dp_size = _dp_size(group)
        self.dp_rank = 0 if group is None else dist.get_rank(group)
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        ref = self.named[0][1]
        self.device = ref.device
        self.sizes = [p.numel() for _, p in self.named]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = self.offsets[-1]
        self.shard = math.ceil(self.numel / self.dp_size)
        self.start = self.dp_rank * self.shard
        self.end = min(self.start + self.shard, self.numel)  # owned real elements [start, end)
        owned = max(0, self.end - self.start)
        # Which parameter each owned element belongs to, and its decay factor mask.
        seg = torch.zeros(self.shard, dtype=torch.long)
        decay = torch.zeros(self.shard, dtype=torch.bool)
        for i, (_, p) in enumerate(self.named):
            lo, hi = max(self.offsets[i], self.start), min(self.offsets[i + 1], self.end)
            if lo < hi:
                seg[lo - self.start: hi - self.start] = i
                decay[lo - self.start: hi - self.start] = p.ndim >= 2
        self.segment = seg.to(self.device)
        self.decay_mask = decay.to(self.device)
        self.valid = torch.arange(self.shard, device=self.device) < owned
        self.master = self._flat_params()[self.start: self.start + self.shard].float().clone()
        self.exp_avg = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
        # Per parameter, like torch's state["step"]; on the device, so a step never waits to read `present`.
        self.steps = torch.zeros(len(self.named), dtype=torch.float64, device=self.device)

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        pad = self.shard * self.dp_size - flat.numel()
        return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat

    def _flat_params(self) -> torch.Tensor:
        return self._padded(torch.cat([p.detach().reshape(-1).float() for _, p in self.named]))

    @torch.no_grad()
    def reduce_scatter_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's slice [S] of the DP-summed flat gradient, per-parameter bool "has a gradient on
        some rank"). Frees the local ``.grad`` tensors."""
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for _, p in self.named]
        present = host_values_to([float(p.grad is not None) for _, p in self.named], self.device, torch.float32)
        flat = self._padded(torch.cat(pieces))
        if self.dp_size > 1:
            out = flat.new_empty(self.shard)
            (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, flat, group=self.group)
            dist.all_reduce(present, group=self.group)
        else:
            out = flat
        for _, p in self.named:
            p.grad = None
        return out, present > 0

    def norm_weights(self, counted: list[bool]) -> torch.Tensor:
        """[S] float 1/0: which owned elements count in the global gradient norm (``counted`` per parameter)."""
        per_param = torch.tensor([float(c) for c in counted], device=self.device)
        return per_param[self.segment] * self.valid

    @torch.no_grad()
    def step(self, grad: torch.Tensor, present: torch.Tensor, *, lr: float, scale: torch.Tensor | float = 1.0) -> None:
        beta1, beta2 = self.betas
        self.steps += present.double()
        active = present[self.segment] & self.valid  # [S]
        g = grad * scale
        t = self.steps.clamp(min=1)
        bc1 = (1 - beta1 ** t)[self.segment]
        bc2_sqrt = (1 - beta2 ** t).sqrt()[self.segment]
        decay = torch.where(self.decay_mask, 1 - lr * self.weight_decay, 1.0).float()
        master = torch.where(active, self.master * decay, self.master)
        exp_avg = torch.where(active, self.exp_avg.lerp(g, 1 - beta1), self.exp_avg)
        exp_avg_sq = torch.where(active, self.exp_avg_sq * beta2 + (1 - beta2) * g * g, self.exp_avg_sq)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt.float()) + self.eps
        update = exp_avg / denom * (lr / bc1).float()
        self.master = torch.where(active, master - update, master)
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq
        self._all_gather_params()

    @torch.no_grad()
    def _all_gather_params(self) -> None:
        if self.dp_size > 1:
            full = self.master.new_empty(self.shard * self.dp_size)
            (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(full, self.master, group=self.group)
        else:
            full = self.master
        for i, (_, p) in enumerate(self.named):
            p.copy_(full[self.offsets[i]: self.offsets[i + 1]].view_as(p).to(p.dtype))

    # -- checkpoints: this rank's slice, and loading from full per-parameter tensors ---------------

    def shard_state(self) -> dict[str, torch.Tensor]:
        return {"master": self.master.cpu(), "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(),
                "steps": self.steps.cpu()}

    def flat_layout(self) -> dict:
        return {"names": [n for n, _ in self.named], "shapes": [list(p.shape) for _, p in self.named],
                "numel": self.numel, "shard": self.shard, "dp": self.dp_size}

    @torch.no_grad()
    def load_local(self, local_states: dict[str, dict]) -> None:
        """From per-parameter *local* (TP-sliced) tensors: {name: {"exp_avg", "exp_avg_sq", "step"}}; the
        master copy is re-read from the (already loaded) parameters."""
        self.master = self._flat_params()[self.start: self.start + self.shard].float().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            flat = self._padded(torch.cat([
                local_states[n][key].reshape(-1).float() if n in local_states else torch.zeros(p.numel())
                for n, p in self.named]).to(self.device))
            setattr(self, key, flat[self.start: self.start + self.shard].clone())
        self.steps = torch.tensor([float(local_states[n]["step"]) if n in local_states else 0.0
                                   for n, _ in self.named], dtype=torch.float64, device=self.device)
