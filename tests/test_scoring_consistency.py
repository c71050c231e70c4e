"""A text's reward is a function of the text alone (megapmp.eval.batch_invariant).

fp32 on the CPU, bit for bit: scored alone, in batches of 1..64 mixed lengths, in any order, in either
packing (rows / flat), with any GEMM tile. The same check fails on a batch-dependent variant (one GEMM
over the whole batch and bucketed attention: the packed scorer's way). bf16 autocast on the CPU is bit
for bit batch-invariant as well, and within a stated tolerance of fp32. Against transformers on the HF
export (an independent implementation), with right or left padding: within 1e-5.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

from megapmp.eval.batch_invariant import score_sequences, tiled_linear
from megapmp.eval.reward_model import RewardScorer
from tests.test_eval_metrics import make_checkpoint

HF_ATOL = 1e-5  # measured: 2.6e-6 at most for rewards up to 4.5 (tiny model, fp32, right and left padding)
BF16_ATOL = 0.05  # measured: 0.018 at most between bf16 autocast and fp32 (tiny model, CPU)


def codepmp_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """CodePMP-shaped (prompt, response) texts of mixed lengths: a task description and a code answer."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for i in range(n):
        prompts.append(f"Write a Python function `f{i}` that " + "handles the edge cases carefully, " * rng.randint(0, 6)
                       + "and returns the result.")
        body = "".join(f"    x{j} = x{j - 1} * {rng.randint(2, 9)} + {j}\n" for j in range(1, rng.randint(1, 25)))
        responses.append(f"def f{i}(x0):\n{body}    return x0\n")
    return prompts, responses


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("consistency_run"))


@pytest.fixture(scope="module")
def scorer(run_dir, one_thread):
    return RewardScorer.load(run_dir, progress=False, batch_invariant=True)


@pytest.fixture(scope="module")
def sequences(scorer):
    prompts, responses = codepmp_texts(64)
    ids, cut = scorer.sequences(prompts, responses)
    assert not any(cut) and len({len(s) for s in ids}) > 30  # mixed lengths
    return ids


def inconsistencies(score, sequences, alone) -> list[str]:
    """The batchings (size, order, packing) in which some sequence's reward differs from ``alone``, the
    rewards of each sequence scored by itself."""
    rng = random.Random(1)
    found = []
    for size in (2, 3, 8, 17, 33, 64):
        members = rng.sample(range(len(sequences)), size)
        for packing in ("flat", "rows"):
            got = score([sequences[i] for i in members], packing=packing)
            if not np.array_equal(got, alone[members]):
                found.append(f"batch of {size} ({packing})")
    if not np.array_equal(score(sequences[::-1], packing="flat")[::-1], alone):
        found.append("all 64, reversed")
    return found


def test_fp32_reward_is_bitwise_independent_of_batch_size_order_and_packing(scorer, sequences):
    score = functools.partial(score_sequences, scorer.model, pad_id=scorer.recipe.pad_id, device="cpu")
    alone = np.array([score([s])[0] for s in sequences])
    assert len(set(alone.tolist())) == len(alone)  # distinct rewards: equality is not a coincidence
    assert inconsistencies(score, sequences, alone) == []
    # The GEMM tile is part of the recipe (a GEMM of another shape may round otherwise): any tile is
    # batch-invariant, and two tiles agree to rounding.
    odd_tile = functools.partial(score, tile_tokens=37)
    odd_alone = np.array([odd_tile([s])[0] for s in sequences[:16]])
    assert np.array_equal(odd_tile(sequences[:16][::-1])[::-1], odd_alone)
    np.testing.assert_allclose(odd_alone, alone[:16], atol=1e-5)
    # The scorer's own path (chunked by batch_tokens) gives the same bits.
    small_chunks = RewardScorer(scorer.model, scorer.recipe, batch_invariant=True, batch_tokens=300, progress=False)
    assert np.array_equal(small_chunks.score_sequences(sequences), alone)


def test_a_batch_dependent_variant_is_caught(scorer, sequences):
    """The packed scorer's way: one GEMM over all the batch's tokens, problems bucketed with their
    neighbours (segmented attention's length buckets). Its rewards agree to rounding, not to the bit."""
    score = functools.partial(score_sequences, scorer.model, pad_id=scorer.recipe.pad_id, device="cpu")
    alone = np.array([score([s])[0] for s in sequences])
    broken = functools.partial(score, tile_tokens=None, per_sequence=False)
    found = inconsistencies(broken, sequences, alone)
    assert len(found) >= 3, found
    np.testing.assert_allclose(broken(sequences), alone, atol=1e-5)  # only the last bits differ


def test_tiled_linear_is_f_linear_and_row_independent():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 150, 48), torch.randn(40, 48), torch.randn(40)
    out = tiled_linear(x, w, b, tile_tokens=64)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-5)
    # A row alone (tile padded with zeros) is the same bits as in a full tile among other rows.
    assert torch.equal(tiled_linear(x[0, 7:8], w, b, tile_tokens=64), out[0, 7:8])


def test_the_invariant_scorer_scores_like_the_packed_scorer_in_both_layouts(run_dir, scorer, one_thread):
    prompts, responses = codepmp_texts(12, seed=3)
    prompts[5] = prompts[4]  # a shared prompt: shared-prefix packs the two responses behind one copy of it
    invariant = scorer.score(prompts, responses)
    for layout in ("shared-prefix", "duplicated"):
        packed = RewardScorer.load(run_dir, progress=False, layout=layout).score(prompts, responses)
        np.testing.assert_allclose(invariant, packed, atol=1e-5)


def test_bf16_is_batch_invariant_and_close_to_fp32(scorer, sequences):
    score = functools.partial(score_sequences, scorer.model, pad_id=scorer.recipe.pad_id, device="cpu",
                              autocast_dtype=torch.bfloat16)
    some = sequences[:24]
    alone = np.array([score([s])[0] for s in some])
    assert np.array_equal(score(some[::-1])[::-1], alone)
    assert np.array_equal(score(some, packing="rows"), alone)
    fp32 = score_sequences(scorer.model, some, pad_id=scorer.recipe.pad_id, device="cpu")
    assert np.abs(alone - fp32).max() <= BF16_ATOL
    assert not np.array_equal(alone, fp32)  # bf16 really ran


@pytest.mark.parametrize("side", ["right", "left"])
def test_transformers_on_the_hf_export_agrees_with_either_padding(run_dir, scorer, sequences, tmp_path, side):
    from transformers import AutoModelForSequenceClassification

    from megapmp.convert.export import export_to_hf

    export_to_hf(run_dir, tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    pad = model.config.pad_token_id
    assert pad != model.config.eos_token_id  # the pooling finds the last non-pad token: the EOS
    some = sequences[:16]
    width = max(len(s) for s in some)
    ids = torch.full((len(some), width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(some):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
    ours = scorer.score_sequences(some)
    np.testing.assert_allclose(hf, ours, atol=HF_ATOL, rtol=0)


def test_flex_scoring_aligns_every_sequence_to_a_block(scorer, sequences):
    """On CUDA the scorer runs the training backend, FlexAttention, with each sequence starting on a 128-token
    block so that its tiles do not depend on its neighbours. On the CPU (flex forward only, no GPU here) this
    checks the packing and that the rewards match the SDPA-per-sequence path to fp32 rounding; the bit-level
    claim on a GPU is unmeasured."""
    from megapmp.eval.batch_invariant import FLEX_ALIGN, pack_sequences

    batch = sequences[:9]
    _, _, attn, readout = pack_sequences(batch, "flat", scorer.recipe.pad_id, align=FLEX_ALIGN)
    assert all(start % FLEX_ALIGN == 0 for start in attn.starts.tolist())
    assert (readout + 1 - attn.starts).tolist() == [len(s) for s in batch]
    widths = {pack_sequences(sequences[:n], "flat", 0, align=FLEX_ALIGN, pow2_rows=True)[0].shape[1] for n in range(1, 40)}
    assert all(w >= 1024 and w & (w - 1) == 0 for w in widths) and len(widths) <= 6  # few compiled shapes
    score = functools.partial(score_sequences, scorer.model, pad_id=scorer.recipe.pad_id, device="cpu")
    np.testing.assert_allclose(score(batch, attention="flex"), score(batch), rtol=0, atol=1e-5)


def test_invariant_scoring_never_builds_a_dense_mask(scorer, sequences, monkeypatch):
    """Every sequence is its own SDPA problem: no [S, S] mask over the whole packed row (at 64 CodePMP-shaped
    texts that mask alone was 97% of the scoring time, 770M booleans). The model and its layers agree on the
    backend (a model built with the default sdpa, switched by set_attention_backend)."""
    import importlib

    attention_module = importlib.import_module("megapmp.model.attention")  # (the package exports a function of that name)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense [S, S] attention mask was built")

    monkeypatch.setattr(attention_module, "build_mask", no_dense_mask)
    got = score_sequences(scorer.model, sequences[:16], pad_id=scorer.recipe.pad_id, device="cpu")
    assert got.shape == (16,) and scorer.model.attention_backend == "segmented"
