"""Parallel layout: one rank matrix, the process groups cut from it, and the context that carries them.

Megatron's order, tensor-parallel fastest, then data-parallel, then pipeline::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the ranks of a TP group are neighbours (one node, NVLink) and a pipeline group strides across
nodes. ``ParallelDims`` is pure arithmetic (testable without processes); ``ParallelDims.build``
creates the groups. A ``ParallelContext`` is passed down explicitly; nothing here is global.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions. ``dp=-1`` means world_size / (tp * pp).

    ``vpp`` is the number of virtual pipeline stages (model chunks) per pipeline rank, for the
    interleaved schedule; it adds no process group.
    """

    tp: int = 1
    pp: int = 1
    dp: int = -1
    world_size: int = 1
    vpp: int = 1

    @classmethod
    def from_config(cls, parallel, world_size: int) -> "ParallelDims":
        """From a ``megapmp.config.ParallelConfig`` (tp, pp), data parallel filling the rest."""
        return cls(tp=parallel.tp, pp=parallel.pp, dp=-1, world_size=world_size,
                   vpp=getattr(parallel, "vpp", 1))

    def resolved(self) -> "ParallelDims":
        """This layout with ``dp=-1`` replaced by its inferred value, validated."""
        dims = self
        if self.dp == -1 and _is_pos_int(self.tp) and _is_pos_int(self.pp) and _is_pos_int(self.world_size) \
                and self.world_size % (self.tp * self.pp) == 0:
            dims = replace(self, dp=self.world_size // (self.tp * self.pp))
        dims.validate()
        return dims

    def validate(self) -> None:
        """Raise one ValueError naming every offending factor."""
        problems = []
        for name in ("tp", "pp", "world_size", "vpp"):
            if not _is_pos_int(getattr(self, name)):
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not (_is_pos_int(self.dp) or self.dp == -1):
            problems.append(f"dp={self.dp!r} must be a positive integer or -1 (inferred)")
        if not problems:
            if self.dp == -1:
                if self.world_size % (self.tp * self.pp):
                    problems.append(f"world_size {self.world_size} is not divisible by tp={self.tp} x pp={self.pp} "
                                    f"= {self.tp * self.pp}, so dp cannot be inferred")
            elif self.tp * self.pp * self.dp != self.world_size:
                problems.append(f"tp={self.tp} x pp={self.pp} x dp={self.dp} = {self.tp * self.pp * self.dp} "
                                f"!= world_size {self.world_size}")
            if self.vpp > 1 and self.pp == 1:
                problems.append(f"vpp={self.vpp} virtual stages need pp > 1 (pp={self.pp})")
        if problems:
            raise ValueError("invalid ParallelDims: " + "; ".join(problems))

    # -- the rank matrix (pure) ------------------------------------------------------------------

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        d = self.resolved()
        return pp_rank * (d.dp * d.tp) + dp_rank * d.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        d = self.resolved()
        if not 0 <= rank < d.world_size:
            raise ValueError(f"rank {rank} outside 0..{d.world_size - 1}")
        return rank // (d.dp * d.tp), rank // d.tp % d.dp, rank % d.tp

    def tp_groups(self) -> list[list[int]]:
        """Ranks that shard one layer's weights: same (pp, dp), tp_rank = 0..tp-1."""
        d = self.resolved()
        return [[d.rank_of(p, q, t) for t in range(d.tp)] for p in range(d.pp) for q in range(d.dp)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks holding the same weight shard, whose gradients are averaged: same (pp, tp)."""
        d = self.resolved()
        return [[d.rank_of(p, q, t) for q in range(d.dp)] for p in range(d.pp) for t in range(d.tp)]

    def pp_groups(self) -> list[list[int]]:
        """One pipeline, in stage order: same (dp, tp), pp_rank = 0..pp-1."""
        d = self.resolved()
        return [[d.rank_of(p, q, t) for p in range(d.pp)] for q in range(d.dp) for t in range(d.tp)]

    def mp_groups(self) -> list[list[int]]:
        """One model replica (tp x pp ranks with the same dp_rank): the gradient-norm reduction group."""
        d = self.resolved()
        return [[d.rank_of(p, q, t) for p in range(d.pp) for t in range(d.tp)] for q in range(d.dp)]

    def embedding_groups(self) -> list[list[int]]:
        """First and last stage of each pipeline (tied embedding / LM head gradients); pp > 1 only."""
        return [[g[0], g[-1]] for g in self.pp_groups()] if self.resolved().pp > 1 else []

    # -- groups ------------------------------------------------------------------------------------

    def build(self, rank: int | None = None) -> "ParallelContext":
        """Create every process group and return this rank's context.

        With torch.distributed initialised, every rank must call this (``dist.new_group`` is
        collective and must see the groups in the same order everywhere). With world_size 1 and no
        process group, returns the single-process context without touching torch.distributed.
        """
        d = self.resolved()
        if not (dist.is_available() and dist.is_initialized()):
            if d.world_size != 1:
                raise RuntimeError(f"world_size {d.world_size} needs torch.distributed initialised first")
            return ParallelContext.single(d)
        if dist.get_world_size() != d.world_size:
            raise ValueError(f"ParallelDims.world_size={d.world_size} but torch.distributed has "
                             f"{dist.get_world_size()} ranks")
        rank = dist.get_rank() if rank is None else rank
        mine = {}
        for kind, groups in (("tp", d.tp_groups()), ("dp", d.dp_groups()), ("pp", d.pp_groups()),
                             ("mp", d.mp_groups()), ("embedding", d.embedding_groups())):
            for ranks in groups:
                group = dist.new_group(ranks)  # every rank, every group, same order
                if rank in ranks:
                    mine[kind] = (group, ranks)
        pp_rank, dp_rank, tp_rank = d.coords(rank)
        embedding = mine.get("embedding", (None, []))
        return ParallelContext(
            dims=d, rank=rank, tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp_rank,
            tp_group=mine["tp"][0], dp_group=mine["dp"][0], pp_group=mine["pp"][0], mp_group=mine["mp"][0],
            embedding_group=embedding[0], tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1],
            pp_ranks=mine["pp"][1], embedding_ranks=embedding[1])


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class ParallelContext:
    """This rank's place in the layout and its process groups.

    A group of ``None`` means "no group: this dimension has size 1 in a single-process run" --
    never "the default group". Collectives in megapmp.parallel treat None and size-1 groups as no-ops.
    ``pp_ranks`` lists the global ranks of this rank's pipeline in stage order (p2p peers are
    ``pp_ranks[pp_rank - 1]`` and ``pp_ranks[pp_rank + 1]``).
    """

    dims: ParallelDims
    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    tp_group: object = None
    dp_group: object = None
    pp_group: object = None
    mp_group: object = None  # tp x pp ranks of one model replica
    embedding_group: object = None  # first + last stage of this pipeline, when pp > 1
    tp_ranks: list = field(default_factory=lambda: [0])
    dp_ranks: list = field(default_factory=lambda: [0])
    pp_ranks: list = field(default_factory=lambda: [0])
    embedding_ranks: list = field(default_factory=list)

    @classmethod
    def single(cls, dims: ParallelDims | None = None) -> "ParallelContext":
        """One process, no torch.distributed."""
        return cls(dims=dims or ParallelDims(1, 1, 1, 1))

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def vpp_size(self) -> int:
        return self.dims.vpp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def prev_stage_rank(self) -> int | None:
        return self.pp_ranks[self.pp_rank - 1] if self.pp_rank > 0 else None

    @property
    def next_stage_rank(self) -> int | None:
        return self.pp_ranks[self.pp_rank + 1] if not self.is_last_stage else None


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
    """This process's ParallelContext for ``cfg.parallel`` over the current world (1 without torch.distributed)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    ctx = ParallelDims.from_config(parallel_cfg, world).build()
    if ctx.pp_group is not None and ctx.pp_size > 1:
        # NCCL creates communicators lazily; a first collective on the pipeline group makes its p2p
        # sends find an initialised communicator (batch_isend_irecv must not be the first call).
        dist.barrier(group=ctx.pp_group)
    return ctx
