"""ParallelDims: the rank matrix (pure), validation messages, and real process groups on 4 gloo ranks."""
import itertools

import pytest
import torch
import torch.distributed as dist

from distributed_utils import run_ranks
from megapmp.parallel.topology import ParallelContext, ParallelDims


def layouts(world):
    return [(tp, pp, world // (tp * pp)) for tp, pp in itertools.product([1, 2, 4, 8], repeat=2)
            if world % (tp * pp) == 0]


@pytest.mark.parametrize("world", [4, 8])
def test_rank_matrix_megatron_order(world):
    for tp, pp, dp in layouts(world):
        dims = ParallelDims(tp=tp, pp=pp, dp=dp, world_size=world)
        for rank in range(world):
            p, d, t = dims.coords(rank)
            assert rank == p * dp * tp + d * tp + t == dims.rank_of(p, d, t)
        families = {"tp": dims.tp_groups(), "dp": dims.dp_groups(), "pp": dims.pp_groups(),
                    "mp": dims.mp_groups()}
        sizes = {"tp": tp, "dp": dp, "pp": pp, "mp": tp * pp}
        for name, groups in families.items():
            # Each family partitions the world into groups of its size.
            assert sorted(r for g in groups for r in g) == list(range(world)), (tp, pp, dp, name)
            assert all(len(g) == sizes[name] for g in groups)
        for g in dims.tp_groups():  # same (pp, dp), consecutive ranks
            assert g == list(range(g[0], g[0] + tp))
        for g in dims.dp_groups():
            assert len({(dims.coords(r)[0], dims.coords(r)[2]) for r in g}) == 1
        for g in dims.pp_groups():  # stage order
            assert [dims.coords(r)[0] for r in g] == list(range(pp))
            assert len({dims.coords(r)[1:] for r in g}) == 1
        assert dims.embedding_groups() == ([[g[0], g[-1]] for g in dims.pp_groups()] if pp > 1 else [])


def test_rank_matrix_explicit_world_8():
    dims = ParallelDims(tp=2, pp=2, dp=2, world_size=8)
    assert dims.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.mp_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert dims.coords(6) == (1, 1, 0)


def test_dp_inferred():
    assert ParallelDims(tp=2, pp=2, dp=-1, world_size=8).resolved().dp == 2
    assert ParallelDims(tp=4, world_size=4).resolved().dp == 1
    assert ParallelDims(tp=1, pp=1, world_size=8).resolved().dp == 8


@pytest.mark.parametrize("dims, fragments", [
    (ParallelDims(tp=3, pp=2, dp=1, world_size=4), ["tp=3 x pp=2 x dp=1 = 6 != world_size 4"]),
    (ParallelDims(tp=3, pp=1, dp=-1, world_size=4), ["world_size 4 is not divisible by tp=3 x pp=1 = 3"]),
    (ParallelDims(tp=0, pp=-1, dp=0, world_size=4, vpp=0),
     ["tp=0 must be a positive integer", "pp=-1 must be a positive integer", "dp=0 must be",
      "vpp=0 must be a positive integer"]),
    (ParallelDims(tp=2, pp=1, dp=2, world_size=4, vpp=2), ["vpp=2 virtual stages need pp > 1"]),
])
def test_validation_names_every_offending_factor(dims, fragments):
    with pytest.raises(ValueError) as info:
        dims.validate()
    for fragment in fragments:
        assert fragment in str(info.value)


def test_single_process_context_needs_no_torch_distributed():
    assert not dist.is_initialized()
    ctx = ParallelDims().build()
    assert (ctx.tp_size, ctx.dp_size, ctx.pp_size, ctx.world_size) == (1, 1, 1, 1)
    assert ctx.tp_group is ctx.dp_group is ctx.pp_group is ctx.mp_group is None
    assert ctx.is_first_stage and ctx.is_last_stage and ctx.pp_ranks == [0]
    assert ParallelContext.single().tp_rank == 0
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        ParallelDims(tp=2, world_size=2).build()


def _build_groups(rank, world):
    results = {}
    for tp, pp in ((2, 2), (2, 1), (1, 4)):
        dims = ParallelDims(tp=tp, pp=pp, world_size=world)
        ctx = dims.build()
        p, d, t = dims.coords(rank)
        assert (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank) == (p, d, t)
        assert ctx.pp_ranks == [dims.rank_of(s, d, t) for s in range(pp)]
        assert ctx.is_first_stage == (p == 0) and ctx.is_last_stage == (p == pp - 1)
        # Each group really contains the ranks the matrix says: summing the global ranks over it.
        for group, ranks in ((ctx.tp_group, ctx.tp_ranks), (ctx.dp_group, ctx.dp_ranks),
                             (ctx.pp_group, ctx.pp_ranks)):
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=group)
            assert x.item() == sum(ranks) and rank in ranks
        # Only the first and last stage of a pipeline share the (tied) embedding.
        assert (ctx.embedding_group is not None) == (pp > 1 and p in (0, pp - 1))
        results[(tp, pp)] = (ctx.tp_ranks, ctx.dp_ranks, ctx.pp_ranks)
    return results


def test_build_real_groups_world_4():
    results = run_ranks(4, _build_groups, timeout=60)
    assert results[3][(2, 2)] == ([2, 3], [3], [1, 3])
    assert results[1][(2, 1)] == ([0, 1], [1, 3], [1])
    assert results[2][(1, 4)] == ([2], [2], [0, 1, 2, 3])
