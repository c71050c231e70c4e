"""Pipeline executor parity: every schedule, split over 1, 2 or 4 gloo ranks, gives the loss metrics and
every parameter gradient of the single-device model run on the same micro-batches with gradient
accumulation.

Tolerance: fp32 on CPU, atol 1e-6 + rtol 1e-5. Each stage runs the same ops on the same shapes as the
single-device model, and every stage accumulates micro-batch gradients in the same order (B(m) in
increasing m for each chunk), so gradients agree to the bit except where the summation order must
differ: the tied embedding, whose two copies' gradients are each summed over micro-batches and then
added across stages (single-device adds both parts within each micro-batch), ~1e-9 here.
"""
import dataclasses

import numpy as np
import pytest
import torch

from distributed_utils import run_ranks
from megapmp.config import model_preset
from megapmp.data.datasets import Pair
from megapmp.data.packing import pack_pairs
from megapmp.model.attention import attention_inputs
from functools import partial

from megapmp.loss import Heads, pmp_loss
from megapmp.model import Qwen2RewardModel
from megapmp.parallel.pipeline import (build_stage_chunks, layer_split, reduce_tied_embedding_grads,
                                       run_schedule, sync_tied_embeddings, tied_duplicate_params)
from megapmp.parallel.schedules import build_schedule
from megapmp.parallel.topology import ParallelContext, ParallelDims

ATOL, RTOL = 1e-6, 1e-5
VOCAB = 384
LOSS = dict(rm_coef=1.0, lm_coef=0.5)


def make_config(tied: bool, layers: int):
    return dataclasses.replace(model_preset("tiny"), vocab_size=VOCAB, tie_word_embeddings=tied,
                               num_hidden_layers=layers)


def pmp_loss_fn(last_chunk, **loss_kwargs):
    """run_schedule's loss_fn: pmp_loss with the last chunk's heads (what megapmp.parallel.engine passes)."""
    return lambda hidden, batch: pmp_loss(hidden, Heads.of(last_chunk), batch, **loss_kwargs)


def make_model(config) -> Qwen2RewardModel:
    torch.manual_seed(0)
    model = Qwen2RewardModel(config)
    model.init_weights()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped or misplaced op shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_micro_batches(num_microbatches: int, seed: int = 0) -> list:
    """Random pairs, 1-5 per micro-batch, so rows per micro-batch vary; both packing layouts."""
    rng = np.random.default_rng(seed)
    batches = []
    for m in range(num_microbatches):
        pairs = [Pair(*(rng.integers(1, VOCAB, rng.integers(2, 7)) for _ in range(3)))
                 for _ in range(int(rng.integers(1, 6)))]
        layout = "duplicated" if m % 2 == 0 else "shared-prefix"
        batches.append(pack_pairs(pairs, seq_len=24, layout=layout, pad_id=0).to_torch())
    return batches


def loss_kwargs(batches) -> dict:
    return dict(LOSS, global_pairs=sum(b.num_pairs for b in batches),
                global_lm_tokens=sum(b.num_lm_tokens for b in batches))


def reference(model, batches):
    """Single-device step: (summed metrics [5], {parameter name: grad})."""
    model.zero_grad(set_to_none=True)
    totals = torch.zeros(5)
    for batch in batches:
        hidden = model(batch.input_ids, batch.position_ids, attention_inputs(batch))
        out = pmp_loss(hidden, Heads.of(model), batch, **loss_kwargs(batches))
        out.loss.backward()
        totals += torch.stack([out.loss.detach(), out.rm_loss, out.lm_loss, out.correct, out.margin_sum])
    return totals, {n: p.grad.clone() for n, p in model.named_parameters()}


def pipeline_step(ctx, schedule_name, chunks_per_stage, config, full_state, batches):
    """Build this stage's chunks from the full model's weights, run the schedule and return
    (metrics, {parameter name: grad}) for this stage."""
    chunks = build_stage_chunks(partial(Qwen2RewardModel, config), config.num_hidden_layers, ctx.pp_rank, ctx.pp_size,
                                chunks_per_stage)
    for chunk in chunks:
        chunk.load_state_dict({k: full_state[k] for k in chunk.state_dict()})
        if config.tie_word_embeddings and chunk.lm_head is not None and chunk.embed_tokens is None:
            torch.nn.init.zeros_(chunk.lm_head.weight.data)  # sync_tied_embeddings must restore it
    sync_tied_embeddings(chunks, ctx)
    actions = build_schedule(schedule_name, ctx.pp_size, len(batches), chunks_per_stage)[ctx.pp_rank]
    totals = run_schedule(actions, chunks, batches, ctx, pmp_loss_fn(chunks[-1], **loss_kwargs(batches)))
    reduce_tied_embedding_grads(chunks, ctx)
    grads = {}
    for chunk in chunks:
        grads.update({n: p.grad for n, p in chunk.named_parameters()})
    return totals, grads


def compare(ctx, case) -> dict:
    """Run one case on this rank; return its errors (asserted in the test process)."""
    schedule_name, tied, chunks_per_stage, num_microbatches = case
    config = make_config(tied, layers=2 * ctx.pp_size * chunks_per_stage)
    model = make_model(config)
    batches = make_micro_batches(num_microbatches, seed=num_microbatches)
    ref_totals, ref_grads = reference(model, batches)
    totals, grads = pipeline_step(ctx, schedule_name, chunks_per_stage, config, model.state_dict(), batches)
    errors = {}
    for name, grad in grads.items():
        ref = ref_grads["embed_tokens.weight" if tied and name == "lm_head.weight" else name]
        errors[name] = (float((grad - ref).abs().max()), float((grad - ref).abs().sub(RTOL * ref.abs()).max()))
    return {"metrics": (totals.tolist(), ref_totals.tolist()), "grads": errors, "ref_names": sorted(ref_grads)}


def _rank_main(rank, world_size, cases):
    ctx = ParallelDims(pp=world_size, world_size=world_size).build()
    return [compare(ctx, case) for case in cases]


def check(results_per_rank, cases, tied_names=("embed_tokens.weight", "lm_head.weight")):
    for i, case in enumerate(cases):
        results = [r[i] for r in results_per_rank]
        for r in results:  # every stage reports the last stage's metrics (broadcast)
            totals, ref = r["metrics"]
            assert totals == pytest.approx(ref, rel=RTOL, abs=ATOL), case
        checked = {}
        for r in results:
            for name, (max_abs, max_excess) in r["grads"].items():
                assert max_excess <= ATOL, f"{case}: {name} grad off by {max_abs:.3g}"
                checked[name] = checked.get(name, 0) + 1
        # Every parameter of the single-device model is checked on exactly one stage; a tied split model
        # also checks the last stage's LM-head copy.
        tied = case[1] and len(results) > 1
        ref_names = set(results[0]["ref_names"]) | ({"lm_head.weight"} if tied else set())
        assert set(checked) == ref_names, case
        assert all(n == 1 for n in checked.values()), case


CASES_2 = [
    ("afab", False, 1, 4),
    ("1f1b", False, 1, 4),
    ("1f1b", True, 1, 3),
    ("1f1b", True, 1, 1),  # fewer micro-batches than stages
    ("afab", True, 2, 3),
    ("interleaved", True, 2, 4),
    ("interleaved", False, 2, 2),
]
CASES_4 = [
    ("1f1b", True, 1, 6),
    ("afab", False, 1, 2),
    ("interleaved", True, 2, 4),
]


def test_two_stages_match_single_device():
    check(run_ranks(2, _rank_main, CASES_2, timeout=120), CASES_2)


def test_four_stages_match_single_device():
    check(run_ranks(4, _rank_main, CASES_4, timeout=120), CASES_4)


@pytest.fixture
def one_thread():
    """Like the ranks: on 2 shared cores, 2 intra-op threads make this tiny model ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("schedule_name", ["afab", "1f1b"])
@pytest.mark.parametrize("tied", [False, True])
def test_one_stage_matches_single_device(schedule_name, tied, one_thread):
    """pp = 1: no communication, no torch.distributed; the executor alone."""
    check([[compare(ParallelContext.single(), (schedule_name, tied, 1, 3))]], [(schedule_name, tied, 1, 3)])


def test_layer_split_and_stage_chunks():
    assert layer_split(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="at least one layer"):
        layer_split(3, 4)
    config = make_config(tied=True, layers=8)
    def held(chunk):  # one parameter per layer is enough to see which layers a chunk holds
        return sorted(n for n, _ in chunk.named_parameters()
                      if not n.startswith("layers.") or n.endswith("mlp.up_proj.weight"))

    names = [[held(chunk) for chunk in build_stage_chunks(partial(Qwen2RewardModel, config), config.num_hidden_layers, stage, 2, 2)] for stage in range(2)]
    assert names[0][0] == ["embed_tokens.weight", "layers.0.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"]
    assert names[1][0] == ["layers.2.mlp.up_proj.weight", "layers.3.mlp.up_proj.weight"]
    assert names[0][1] == ["layers.4.mlp.up_proj.weight", "layers.5.mlp.up_proj.weight"]
    assert names[1][1] == ["layers.6.mlp.up_proj.weight", "layers.7.mlp.up_proj.weight", "lm_head.weight",
                           "norm.weight", "score.weight"]


@pytest.mark.parametrize("tied", [False, True])
def test_tied_duplicate_is_the_last_stages_lm_head(tied):
    config = make_config(tied=tied, layers=4)
    for pp in (1, 2, 3):
        for stage in range(pp):
            ctx = ParallelContext(dims=ParallelDims(pp=pp, world_size=pp), pp_rank=stage, pp_ranks=list(range(pp)))
            chunks = build_stage_chunks(partial(Qwen2RewardModel, config), config.num_hidden_layers, stage, pp)
            expected = [chunks[-1].lm_head.weight] if tied and pp > 1 and stage == pp - 1 else []
            assert tied_duplicate_params(chunks, ctx) == expected


def test_forward_context_wraps_forwards_and_lossless_microbatches_send_zero_grads(one_thread):
    """A micro-batch whose loss has no terms still runs its backward (the earlier stages wait for
    it), with zero gradients; forward_context is entered once per chunk forward."""
    config = make_config(tied=False, layers=2)
    model = make_model(config)
    batches = make_micro_batches(2)
    entered = []

    def counting_context():
        entered.append(1)
        return torch.autocast("cpu", enabled=False)

    kwargs = dict(loss_kwargs(batches), rm_coef=0.0, lm_coef=0.0)
    totals = run_schedule(build_schedule("1f1b", 1, 2)[0], [model], batches, ParallelContext.single(),
                          pmp_loss_fn(model, **kwargs), forward_context=counting_context)
    assert len(entered) == 2
    assert totals.tolist() == [0.0] * 5
    for name, p in model.named_parameters():  # the heads took no part: no gradient at all
        assert (p.grad is None) if name in ("lm_head.weight", "score.weight") else not p.grad.any(), name
