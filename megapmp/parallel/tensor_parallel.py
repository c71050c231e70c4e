"""Tensor-parallel layers (Megatron ``tensor_parallel/layers.py``); the vocab-parallel cross entropy is
megapmp_kernels.fused_pair_loss's (one loss primitive).

Shape legend: T = TP size, N tokens, H hidden, V vocabulary (padded). A weight "sharded on dim d" means
rank t holds the t-th of T equal contiguous slices along d; the full tensor is their concatenation.
The layers subclass ``nn.Linear`` / ``nn.Embedding`` with local shapes, so code that initialises or
inspects plain layers (``init_weights``, optimizer grouping) handles them unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megapmp.parallel.collectives import (
    copy_to_tp, gather_from_sequence, gather_from_tp, group_rank, group_size, reduce_from_tp,
    reduce_scatter_to_sequence, scatter_to_tp,
)


def _local(full: int, size: int, what: str) -> int:
    if full % size:
        raise ValueError(f"{what}={full} is not divisible by the tensor-parallel size {size}")
    return full // size


class ColumnParallelLinear(nn.Linear):
    """y = x A^T + b with A [out, in] and b sharded on the output dim: rank t computes y[..., t-th slice].

    Input: by default replicated, entering through ``copy_to_tp``; with ``sequence_parallel`` an SP
    token shard [N/T, in], all-gathered (backward reduce-scatter). ``input_prepared`` skips both: the
    caller applied that collective once for several layers reading the same input (q, k, v).
    Output: the local slice [..., out/T], or the full [..., out] with ``gather_output``.
    ``local_out_features`` overrides out/T (replicated kv heads hold one head each, not kv/T).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None,
                 gather_output: bool = False, sequence_parallel: bool = False, input_prepared: bool = False,
                 local_out_features: int | None = None, device=None, dtype=None):
        size = group_size(group)
        if local_out_features is None:
            local_out_features = _local(out_features, size, "out_features")
        super().__init__(in_features, local_out_features, bias, device=device, dtype=dtype)
        self.group = group
        self.full_out_features = out_features
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.input_prepared = input_prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_prepared:
            x = gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # [..., out/T]
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        entry = "prepared" if self.input_prepared else "sequence gather" if self.sequence_parallel else "copy"
        return (f"{super().extra_repr()}, full_out_features={self.full_out_features}, "
                f"tp={group_size(self.group)}, input={entry}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Linear):
    """y = x A^T + b with A [out, in] sharded on the input dim; b [out] is replicated.

    Each rank computes the partial product x_t A_t^T from its input slice [..., in/T]; the partials are
    all-reduced (replicated output [..., out]) or, with ``sequence_parallel``, reduce-scattered to an
    SP token shard [N/T, out]. The bias is added after the reduction, once.
    ``input_is_parallel=False`` first slices a replicated input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group=None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, device=None, dtype=None):
        size = group_size(group)
        super().__init__(_local(in_features, size, "in_features"), out_features, bias, device=device, dtype=dtype)
        self.group = group
        self.full_in_features = in_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        partial = F.linear(x, self.weight)  # [..., out], this rank's share of the sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(partial, self.group)  # [N/T, out]
        else:
            y = reduce_from_tp(partial, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, full_in_features={self.full_in_features}, "
                f"tp={group_size(self.group)}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Embedding):
    """Embedding with the vocabulary rows sharded: rank t holds rows [t*V/T, (t+1)*V/T).

    Each rank looks up the ids it owns and writes zeros elsewhere; the sum over ranks (all-reduce, or
    reduce-scatter to an SP token shard [N/T, H]) is the full lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group=None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        size = group_size(group)
        super().__init__(_local(num_embeddings, size, "vocab_size (padded)"), embedding_dim,
                         device=device, dtype=dtype)
        self.group = group
        self.full_num_embeddings = num_embeddings
        self.vocab_start = group_rank(group) * self.num_embeddings
        self.sequence_parallel = sequence_parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.num_embeddings)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)  # [..., H] partial
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, full_num_embeddings={self.full_num_embeddings}, "
                f"vocab_start={self.vocab_start}, sequence_parallel={self.sequence_parallel}")


# -- GQA sharding ------------------------------------------------------------------------------------

def check_tp_compatible(config, tp: int) -> None:
    """Raise one ValueError naming every factor that prevents splitting ``config`` over ``tp`` ranks."""
    problems = config.tp_problems(tp)
    if problems:
        raise ValueError(f"cannot split the model over tp={tp}: " + "; ".join(problems))


def attention_head_shards(num_heads: int, num_kv_heads: int, tp: int, tp_rank: int):
    """(q heads, kv heads, kv_replicated) held by ``tp_rank``: ranges of global head indices.

    q heads are split contiguously. kv heads are split too when kv % tp == 0; when tp % kv == 0 each
    rank keeps the single kv head its q heads read (kv head j serves q heads [j*g, (j+1)*g), g = q / kv,
    the ``repeat_interleave`` grouping of the attention), shared by tp / kv ranks.
    """
    if num_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
        raise ValueError(f"num_attention_heads={num_heads}, num_key_value_heads={num_kv_heads} cannot be "
                         f"split over tp={tp}: heads % tp must be 0 and kv % tp or tp % kv must be 0")
    q_local = num_heads // tp
    q = range(tp_rank * q_local, (tp_rank + 1) * q_local)
    if num_kv_heads % tp == 0:
        kv_local = num_kv_heads // tp
        return q, range(tp_rank * kv_local, (tp_rank + 1) * kv_local), False
    kv_head = tp_rank * num_kv_heads // tp
    return q, range(kv_head, kv_head + 1), True
