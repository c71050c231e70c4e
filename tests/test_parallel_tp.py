"""Tensor / sequence parallelism against single-device modules, on 2 (and 4) gloo ranks.

Every check compares outputs, input gradients and weight-gradient slices with the single-device
computation on identical data (each rank rebuilds the reference from the same seeds).

Tolerance, fp32: rtol 1e-5 and atol 1e-5 x the reference tensor's largest magnitude. TP computes the
same products with the reduction split differently (a row-parallel matmul sums T partial dot products
instead of one; vocab-parallel CE combines per-shard max/sum-exp): ~1e-7 relative rounding per op,
a few ulps after two layers and backward. atol is scaled per tensor because elementwise relative
error is meaningless for entries that cancel to ~0; a wrong shard, a missing or doubled reduction
shows up as O(1) relative error, far above this.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from distributed_utils import run_ranks
from megapmp.config import model_preset
from megapmp.data.datasets import Pair
from megapmp.data.packing import pack_pairs
from megapmp.model.attention import attention_inputs
from megapmp.loss import Heads, fp32_rewards, pair_rewards, pmp_loss, reward_rows
from megapmp.model import Qwen2RewardModel
from megapmp.parallel import collectives as C
from megapmp.parallel.parallelize import (
    allreduce_tp_replicated_grads, clip_grad_norm_, full_state_dict, load_full_state_dict, parallelize_model,
    tp_partial_grad_params, tp_replicated_params,
)
from megapmp.parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, attention_head_shards, check_tp_compatible,
)
from megapmp.parallel.topology import ParallelContext, ParallelDims

RTOL = 1e-5


def close(actual, expected, what=""):
    atol = RTOL * max(float(expected.detach().abs().max()), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def seeded(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tp_context(world):
    return ParallelDims(tp=world, world_size=world).build()


def chunk(x, rank, world, dim=0):
    return x.chunk(world, dim=dim)[rank]


# -- collectives ------------------------------------------------------------------------------------

def _collective(rank, world, name):
    group = tp_context(world).tp_group
    xs = [seeded(10 + r, 2, 4, 6) for r in range(world)]  # rank r's input when inputs differ
    common = seeded(99, 2, 4, 6)  # a replicated input / gradient
    tokens = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    if name == "copy_to_tp":
        x = common.clone().requires_grad_()
        y = C.copy_to_tp(x, group)
        close(y, common, "fwd")
        gs = [seeded(20 + r, 2, 4, 6) for r in range(world)]
        y.backward(gs[rank])
        close(x.grad, sum(gs), "bwd = sum of per-rank grads")
    elif name == "reduce_from_tp":
        x = xs[rank].clone().requires_grad_()
        y = C.reduce_from_tp(x, group)
        close(y, sum(xs), "fwd")
        y.backward(common)
        close(x.grad, common, "bwd = identity")
    elif name == "gather_from_tp":
        x = xs[rank].clone().requires_grad_()
        y = C.gather_from_tp(x, group)
        close(y, torch.cat(xs, -1), "fwd")
        g = seeded(30, *y.shape)
        y.backward(g)
        close(x.grad, chunk(g, rank, world, -1), "bwd = split")
    elif name == "scatter_to_tp":
        x = common.clone().requires_grad_()
        y = C.scatter_to_tp(x, group)
        close(y, chunk(common, rank, world, -1), "fwd")
        gs = [seeded(40 + r, *y.shape) for r in range(world)]
        y.backward(gs[rank])
        close(x.grad, torch.cat(gs, -1), "bwd = all-gather")
    elif name == "scatter_to_sequence":
        x = common.clone().requires_grad_()
        y = C.scatter_to_sequence(x, group)
        close(y, chunk(tokens(common), rank, world), "fwd")
        gs = [seeded(50 + r, *y.shape) for r in range(world)]
        y.backward(gs[rank])
        close(x.grad, torch.cat(gs).view_as(common), "bwd = all-gather")
    elif name == "gather_from_sequence":
        for reduce_grads in (True, False):
            x = tokens(xs[rank]).clone().requires_grad_()
            y = C.gather_from_sequence(x, group, reduce_grads=reduce_grads)
            close(y, torch.cat([tokens(t) for t in xs]), "fwd")
            gs = [seeded(60 + r, *y.shape) for r in range(world)]
            y.backward(gs[rank] if reduce_grads else gs[0])
            expected = chunk(sum(gs), rank, world) if reduce_grads else chunk(gs[0], rank, world)
            close(x.grad, expected, f"bwd reduce_grads={reduce_grads}")
    elif name == "reduce_scatter_to_sequence":
        x = xs[rank].clone().requires_grad_()
        y = C.reduce_scatter_to_sequence(x, group)
        close(y, chunk(tokens(sum(xs)), rank, world), "fwd")
        gs = [seeded(70 + r, *y.shape) for r in range(world)]
        y.backward(gs[rank])
        close(x.grad, torch.cat(gs).view_as(x), "bwd = all-gather")
        with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
            C.reduce_scatter_to_sequence(seeded(0, 3, 6), group)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", ["copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
                                  "scatter_to_sequence", "gather_from_sequence", "reduce_scatter_to_sequence"])
def test_collective_forward_backward(name):
    run_ranks(2, _collective, name)


def test_collectives_are_identities_without_group():
    x = seeded(0, 2, 3, 4)
    for fn in (C.copy_to_tp, C.reduce_from_tp, C.gather_from_tp, C.scatter_to_tp):
        assert fn(x, None) is x
    for fn in (C.scatter_to_sequence, C.gather_from_sequence, C.reduce_scatter_to_sequence):
        assert torch.equal(fn(x, None), x.reshape(6, 4))  # SP always speaks in flat tokens


# -- layers -----------------------------------------------------------------------------------------

def _column(rank, world):
    group = tp_context(world).tp_group
    torch.manual_seed(0)
    full = nn.Linear(8, 6)
    x_full = seeded(1, 3, 4, 8)
    upstream = seeded(2, 3, 4, 6)
    for gather_output, sp in ((False, False), (True, False), (False, True)):
        layer = ColumnParallelLinear(8, 6, group=group, gather_output=gather_output, sequence_parallel=sp)
        with torch.no_grad():
            layer.weight.copy_(chunk(full.weight, rank, world))
            layer.bias.copy_(chunk(full.bias, rank, world))
        full.zero_grad()
        x_ref = x_full.clone().requires_grad_()
        y_ref = full(x_ref)
        (y_ref * upstream).sum().backward()
        x = (chunk(x_ref.detach().reshape(-1, 8), rank, world) if sp else x_full).clone().requires_grad_()
        y = layer(x)
        what = f"gather_output={gather_output} sp={sp}"
        if gather_output:
            close(y, y_ref, what)
            (y * upstream).sum().backward()  # every rank computes the whole loss
        else:
            local_up = chunk(upstream.reshape(-1, 6) if sp else upstream, rank, world, -1)
            close(y, chunk(y_ref.reshape(-1, 6) if sp else y_ref, rank, world, -1), what)
            (y * local_up).sum().backward()  # the ranks' terms add up to the whole loss
        expected_dx = chunk(x_ref.grad.reshape(-1, 8), rank, world) if sp else x_ref.grad
        close(x.grad, expected_dx, f"input grad {what}")
        close(layer.weight.grad, chunk(full.weight.grad, rank, world), f"weight grad {what}")
        close(layer.bias.grad, chunk(full.bias.grad, rank, world), f"bias grad {what}")


def _row(rank, world):
    group = tp_context(world).tp_group
    torch.manual_seed(0)
    full = nn.Linear(6, 8)
    x_full = seeded(1, 3, 4, 6)
    upstream = seeded(2, 3, 4, 8)
    for input_is_parallel, sp in ((True, False), (False, False), (True, True)):
        layer = RowParallelLinear(6, 8, group=group, input_is_parallel=input_is_parallel, sequence_parallel=sp)
        with torch.no_grad():
            layer.weight.copy_(chunk(full.weight, rank, world, 1))
            layer.bias.copy_(full.bias)
        full.zero_grad()
        x_ref = x_full.clone().requires_grad_()
        y_ref = full(x_ref)
        (y_ref * upstream).sum().backward()
        x = (chunk(x_full, rank, world, -1) if input_is_parallel else x_full).clone().requires_grad_()
        y = layer(x)
        what = f"input_is_parallel={input_is_parallel} sp={sp}"
        if sp:
            close(y, chunk(y_ref.reshape(-1, 8), rank, world), what)
            (y * chunk(upstream.reshape(-1, 8), rank, world)).sum().backward()
            torch.distributed.all_reduce(layer.bias.grad, group=group)  # replicated bias, SP: partial grad
        else:
            close(y, y_ref, what)
            (y * upstream).sum().backward()
        expected_dx = chunk(x_ref.grad, rank, world, -1) if input_is_parallel else x_ref.grad
        close(x.grad, expected_dx, f"input grad {what}")
        close(layer.weight.grad, chunk(full.weight.grad, rank, world, 1), f"weight grad {what}")
        close(layer.bias.grad, full.bias.grad, f"bias grad {what}")


def _embedding(rank, world):
    group = tp_context(world).tp_group
    torch.manual_seed(0)
    full = nn.Embedding(12, 5)
    ids = torch.randint(0, 12, (3, 4), generator=torch.Generator().manual_seed(1))
    upstream = seeded(2, 3, 4, 5)
    for sp in (False, True):
        layer = VocabParallelEmbedding(12, 5, group=group, sequence_parallel=sp)
        with torch.no_grad():
            layer.weight.copy_(chunk(full.weight, rank, world))
        full.zero_grad()
        y_ref = full(ids)
        (y_ref * upstream).sum().backward()
        y = layer(ids)
        if sp:
            close(y, chunk(y_ref.reshape(-1, 5), rank, world), "sp fwd")
            (y * chunk(upstream.reshape(-1, 5), rank, world)).sum().backward()
        else:
            close(y, y_ref, "fwd")
            (y * upstream).sum().backward()
        close(layer.weight.grad, chunk(full.weight.grad, rank, world), f"weight grad sp={sp}")


@pytest.mark.parametrize("fn", [_column, _row, _embedding], ids=["column", "row", "vocab_embedding"])
def test_layer_matches_single_device(fn):
    run_ranks(2, fn)


# -- sharding rules ----------------------------------------------------------------------------------

def test_gqa_kv_heads_split():
    shards = [attention_head_shards(4, 2, 2, r) for r in range(2)]
    assert shards == [(range(0, 2), range(0, 1), False), (range(2, 4), range(1, 2), False)]


@pytest.mark.parametrize("heads, kv, tp", [(4, 1, 2), (8, 2, 4), (4, 2, 4), (12, 2, 4)])
def test_gqa_kv_heads_replicated(heads, kv, tp):
    for rank in range(tp):
        q, kv_range, replicated = attention_head_shards(heads, kv, tp, rank)
        assert replicated and len(kv_range) == 1
        # Every local q head reads the kv head this rank keeps (repeat_interleave grouping).
        assert {h // (heads // kv) for h in q} == {kv_range.start}


@pytest.mark.parametrize("heads, kv, tp, fragments", [
    (4, 3, 2, ["num_key_value_heads=3", "tp=2"]),
    (6, 2, 4, ["num_attention_heads=6 is not divisible by tp=4"]),
    (12, 4, 3, ["num_key_value_heads=4 (num_attention_heads=12) can neither be split over tp=3"]),
])
def test_gqa_impossible_layouts_raise(heads, kv, tp, fragments):
    config = model_preset("tiny")
    config.num_attention_heads, config.num_key_value_heads, config.hidden_size = heads, kv, 8 * heads
    with pytest.raises(ValueError) as info:
        check_tp_compatible(config, tp)
    for fragment in fragments:
        assert fragment in str(info.value)
    with pytest.raises(ValueError, match=f"tp={tp}"):
        attention_head_shards(heads, kv, tp, 0)


def test_tp_check_names_every_factor():
    config = model_preset("tiny")
    config.vocab_size, config.intermediate_size = 385, 175
    with pytest.raises(ValueError) as info:
        check_tp_compatible(config, 2)
    message = str(info.value)
    assert "vocab_size=385 is not divisible by tp=2" in message and "padded_vocab_size" in message
    assert "intermediate_size=175 is not divisible by tp=2" in message
    check_tp_compatible(model_preset("qwen2-7b"), 4)  # 28 heads, 4 kv heads, 152064 vocab
    check_tp_compatible(model_preset("qwen2-1.5b"), 4)  # 12 heads, 2 kv heads replicated
    with pytest.raises(ValueError, match="num_attention_heads=28 is not divisible by tp=8"):
        check_tp_compatible(model_preset("qwen2-7b"), 8)


# -- the whole model -------------------------------------------------------------------------------

def make_model(kv_heads=2, tied=True) -> Qwen2RewardModel:
    config = model_preset("tiny")
    config.num_key_value_heads, config.tie_word_embeddings = kv_heads, tied
    torch.manual_seed(0)
    model = Qwen2RewardModel(config)
    model.init_weights()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped op or wrong shard shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name == "score.weight":
                p.mul_(20.0)  # rewards of O(1): the margin is not lost in rounding
    return model


def make_batch(layout: str, seq_len: int = 48):
    rng = np.random.default_rng(0)
    tokens = lambda lo, hi: rng.integers(1, 384, rng.integers(lo, hi))  # noqa: E731
    pairs = [Pair(tokens(3, 12), tokens(2, 10), tokens(2, 10)) for _ in range(7)]
    return pack_pairs(pairs, seq_len, layout, pad_id=0).to_torch()


def _model_parity(rank, world, tp, sequence_parallel, layout, kv_heads, checkpointing, tied=True):
    ctx = ParallelDims(tp=tp, world_size=world).build()
    reference = make_model(kv_heads, tied)
    model = parallelize_model(copy.deepcopy(reference), ctx, sequence_parallel=sequence_parallel)
    model.activation_checkpointing = checkpointing
    batch = make_batch(layout)
    attn = attention_inputs(batch)
    counts = dict(global_pairs=batch.num_pairs, global_lm_tokens=batch.num_lm_tokens)
    coefs = dict(rm_coef=1.0, lm_coef=0.5, lm_chunk=13)  # several LM chunks, the last one ragged

    # Parameters: slicing then gathering back gives the single-device weights bit for bit.
    for name, full in full_state_dict(model, ctx).items():
        assert torch.equal(full, reference.state_dict()[name]), name

    hidden_ref = reference(batch.input_ids, batch.position_ids, attn)
    out_ref = pmp_loss(hidden_ref, Heads.of(reference), batch, **coefs, **counts)
    out_ref.loss.backward()

    hidden = model(batch.input_ids, batch.position_ids, attn)
    out = pmp_loss(hidden, Heads.of(model), batch, tp_group=ctx.tp_group, sequence_parallel=sequence_parallel,
                   **coefs, **counts)
    out.loss.backward()
    allreduce_tp_replicated_grads(model, ctx)

    with torch.no_grad():
        if sequence_parallel:
            assert hidden.shape == (batch.input_ids.numel() // tp, 64)
            close(hidden, chunk(hidden_ref.reshape(-1, 64), ctx.tp_rank, tp), "hidden shard")
            rows = reward_rows(hidden, batch.chosen_index, batch.rejected_index, ctx.tp_group, sequence_parallel=True)
            rewards = [C.reduce_from_tp(fp32_rewards(r, model.score.weight), ctx.tp_group) for r in rows]
        else:
            close(hidden, hidden_ref, "hidden")
            rewards = pair_rewards(hidden, model.score.weight, batch.chosen_index, batch.rejected_index)
        rewards_ref = pair_rewards(hidden_ref, reference.score.weight, batch.chosen_index, batch.rejected_index)
        for r, r_ref in zip(rewards, rewards_ref):
            close(r, r_ref, "rewards")
    for field in ("loss", "rm_loss", "lm_loss", "margin_sum"):
        close(getattr(out, field), getattr(out_ref, field), field)
    assert out.correct == out_ref.correct and out.num_pairs == out_ref.num_pairs

    grads = full_state_dict(model, ctx, grads=True)
    ref_grads = dict(reference.named_parameters())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        close(grad, ref_grads[name].grad, f"grad of {name}")

    # The global grad norm over TP counts every element once.
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    close(clip_grad_norm_(model, ctx, 0.0), ref_norm, "grad norm")
    return out.loss.item()


@pytest.mark.parametrize("sequence_parallel, layout, kv_heads, checkpointing, tied", [
    (False, "shared-prefix", 2, False, True),
    (True, "shared-prefix", 2, False, True),
    (False, "duplicated", 1, True, False),
    (True, "shared-prefix", 1, True, True),
], ids=["tp2-kv-split", "tp2-sp-kv-split", "tp2-kv-replicated-ckpt-untied", "tp2-sp-kv-replicated-ckpt"])
def test_tiny_model_matches_single_device(sequence_parallel, layout, kv_heads, checkpointing, tied):
    losses = run_ranks(2, _model_parity, 2, sequence_parallel, layout, kv_heads, checkpointing, tied,
                       timeout=120)
    assert losses[0] == losses[1]  # the loss is replicated over the TP group


def test_tp2_inside_dp2_world_4_with_sequence_parallel():
    # Groups other than WORLD: a stray default-group collective would mix the two replicas.
    run_ranks(4, _model_parity, 2, True, "shared-prefix", 1, False, timeout=120)


def test_tp4_replicated_kv_heads():
    run_ranks(4, _model_parity, 4, True, "duplicated", 2, False, timeout=120)


def _meta_and_state_roundtrip(rank, world):
    ctx = tp_context(world)
    with torch.device("meta"):
        model = Qwen2RewardModel(model_preset("tiny"))
    parallelize_model(model, ctx, sequence_parallel=True)
    attn = model.layers["0"].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32) and model.embed_tokens.weight.shape == (192, 64)
    model.to_empty(device="cpu")
    model.init_weights()  # re-ties lm_head to the embedding shard
    assert model.lm_head.weight is model.embed_tokens.weight
    reference = make_model()
    load_full_state_dict(model, reference.state_dict(), ctx)
    for name, full in full_state_dict(model, ctx).items():
        assert torch.equal(full, reference.state_dict()[name]), name
    names = {n for n, _ in tp_partial_grad_params(model)}
    assert names == {n for n, _ in tp_replicated_params(model)} == {
        "norm.weight", "score.weight",
        *(f"layers.{i}.{k}.weight" for i in range(2) for k in ("input_layernorm", "post_attention_layernorm"))}


def test_meta_init_and_full_state_dict_roundtrip():
    run_ranks(2, _meta_and_state_roundtrip)


def test_single_process_parallelize_is_exact():
    reference = make_model()
    batch = make_batch("shared-prefix")
    attn = attention_inputs(batch)
    hidden_ref = reference(batch.input_ids, batch.position_ids, attn)
    for sp in (False, True):
        model = parallelize_model(copy.deepcopy(reference), ParallelContext.single(), sequence_parallel=sp)
        hidden = model(batch.input_ids, batch.position_ids, attn)
        assert torch.equal(hidden.reshape(hidden_ref.shape), hidden_ref)
