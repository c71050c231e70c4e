"""Paired autograd collectives over an explicit process group (Megatron's ``mappings.py``).

Each function is the forward half of a pair whose backward is the other half: the gradient of a
collective is its adjoint. With ``group=None`` (a single-process run) or a group of one rank each is
an identity -- ``None`` here never means the default group.

Notation: t indexes the ranks of the group (size T); x_t is rank t's input, y_t its output, and
g_t = dL/dy_t the gradient arriving at rank t. The sequence-parallel (SP) functions work on the
*token axis*: all dims but the last, flattened. A tensor [R, S, H] is seen as [N = R*S, H] and
rank t owns the contiguous tokens [t*N/T, (t+1)*N/T), so an SP shard is [N/T, H].
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# -- raw (non-autograd) collectives -------------------------------------------------------------------

def all_reduce_copy(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`x` reduced over `group` with `op`, into a new tensor; no autograd (the vocab-parallel loss uses it
    for its max and sums)."""
    out = x.clone(memory_format=torch.contiguous_format)  # the input may be saved by other autograd nodes
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather_first(x: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] per rank -> [T*n, ...], rank order."""
    x = x.contiguous()
    out = x.new_empty((group_size(group) * x.shape[0], *x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] per rank -> [N/T, ...]: rank t's chunk of the sum over ranks."""
    size = group_size(group)
    _check_divisible(x.shape[0], size)
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)
    return out


def _split_first(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    _check_divisible(x.shape[0], size)
    n = x.shape[0] // size
    return x.narrow(0, group_rank(group) * n, n).clone()


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[-1] % size:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the group size {size}")
    n = x.shape[-1] // size
    return x.narrow(-1, group_rank(group) * n, n).contiguous()


def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    gathered = _all_gather_first(x.movedim(-1, 0), group)  # [T*n, ...]
    return gathered.movedim(0, -1).contiguous()


def _check_divisible(tokens: int, size: int) -> None:
    if tokens % size:
        raise ValueError(f"sequence parallel needs the token count (rows * seq_len = {tokens}) divisible by "
                         f"the tensor-parallel size {size}")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _trivial(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


# -- tensor-parallel region boundaries -----------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_copy(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region with a replicated input.

    forward  y_t = x                     (every rank already holds the same x)
    backward dL/dx = sum_t g_t           (all-reduce: each rank's y_t feeds only its weight shard,
                                          so each g_t is a partial gradient)
    """
    return x if _trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region whose ranks hold partial sums (row-parallel output).

    forward  y = sum_t x_t               (all-reduce; y is replicated)
    backward dL/dx_t = g                 (identity: y is replicated, so g is already the full gradient)
    """
    return x if _trivial(group) else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate last-dim shards (column-parallel output with gather_output).

    forward  y = [x_0 | x_1 | ... | x_{T-1}]      (all-gather along the last dim)
    backward dL/dx_t = g[..., t-th slice]          (split: y is replicated, g is complete on every rank)
    """
    return x if _trivial(group) else _GatherFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's last-dim slice of a replicated tensor (row-parallel input that is not yet split).

    forward  y_t = x[..., t-th slice]
    backward dL/dx = [g_0 | ... | g_{T-1}]         (all-gather: each rank's gradient covers its slice)
    """
    return x if _trivial(group) else _ScatterToTP.apply(x, group)


# -- sequence parallel (token axis) ---------------------------------------------------------------------

class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, reduce_grads):
        ctx.group, ctx.reduce_grads = group, reduce_grads
        return _all_gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grads:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first(grad, ctx.group), None


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's token shard of a replicated tensor: [..., H] -> [N/T, H].

    forward  y_t = x[t-th token chunk]
    backward dL/dx = concat_t g_t                  (all-gather: each rank's gradient covers its tokens)
    """
    x = _tokens(x)
    return x if _trivial(group) else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group, *, reduce_grads: bool = True) -> torch.Tensor:
    """All-gather token shards: [N/T, H] -> [N, H].

    forward  y = concat_t x_t                       (replicated on every rank)
    backward with reduce_grads (the SP entry of a TP region, Megatron's default): each rank's y feeds
             only its weight shard, so g_t is partial and
             dL/dx_t = (sum_s g_s)[t-th token chunk]          (reduce-scatter)
    backward without: the ranks compute the same thing from y, so g is complete everywhere and
             dL/dx_t = g[t-th token chunk]                    (split)
    """
    x = _tokens(x)
    return x if _trivial(group) else _GatherFromSequence.apply(x, group, reduce_grads)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region into SP: sum partial outputs and keep this rank's tokens: [..., H] -> [N/T, H].

    forward  y_t = (sum_s x_s)[t-th token chunk]   (reduce-scatter)
    backward dL/dx_s = concat_t g_t                 (all-gather: every x_s contributed to every chunk)
    """
    x = _tokens(x)
    return x if _trivial(group) else _ReduceScatterToSequence.apply(x, group)
