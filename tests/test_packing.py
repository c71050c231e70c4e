"""Packing invariants (property-tested), sampler determinism and resume, blending and DP slicing."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megapmp.data.datasets import Pair
from megapmp.data.loader import BlendedSampler, EpochShuffle, StepLoader, fit_micro_batch_tokens
from megapmp.data.packing import (IGNORE_INDEX, balance_into_budget, flatten_rows, pack_documents, pack_pairs,
                                   pair_packed_length)
from megapmp.data.preprocess import build_shard

PAD = 999


def make_pairs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Pair(*(rng.integers(0, 500, n).astype(np.int64) for n in plen)) for plen in lengths]


pair_lengths = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=12)


def visible(batch, row, col):
    """Independent statement of the attention rule: the (token, position) list a query can see."""
    seg, br = batch.segment_ids[row], batch.branch_ids[row]
    keys = [k for k in range(col + 1) if seg[k] == seg[col] and (br[k] == 0 or br[k] == br[col])]
    return [(int(batch.input_ids[row, k]), int(batch.position_ids[row, k])) for k in keys]


def locate(batch, flat):
    return divmod(int(flat), batch.shape[1])


@settings(max_examples=60, deadline=None)
@given(lengths=pair_lengths, seq_len=st.integers(80, 160), layout=st.sampled_from(["duplicated", "shared-prefix"]))
def test_pack_pairs_invariants(lengths, seq_len, layout):
    pairs = make_pairs(lengths)
    batch = pack_pairs(pairs, seq_len, layout, PAD)
    assert batch.shape[1] == seq_len
    check_pair_batch(batch, pairs, layout)


@settings(max_examples=60, deadline=None)
@given(lengths=pair_lengths, seq_len=st.integers(80, 160), layout=st.sampled_from(["duplicated", "shared-prefix"]),
       multiple=st.sampled_from([1, 2, 3, 8]))
def test_flatten_rows_keeps_every_invariant_in_one_row(lengths, seq_len, layout, multiple):
    pairs = make_pairs(lengths)
    rows = pack_pairs(pairs, seq_len, layout, PAD)
    flat = flatten_rows(rows, PAD, multiple)
    real = rows.num_real_tokens
    assert flat.shape[0] == 1 and flat.shape[1] % multiple == 0 and real <= flat.shape[1] < real + multiple
    # The real tokens, in order, with their positions, branches and labels; padding only at the end.
    keep = rows.segment_ids.ravel() >= 0
    for name in ("input_ids", "position_ids", "branch_ids", "labels"):
        assert getattr(flat, name)[0, :real].tolist() == getattr(rows, name).ravel()[keep].tolist(), name
    assert (flat.segment_ids[0, real:] == -1).all() and (flat.segment_ids[0, :real] >= 0).all()
    assert flat.num_lm_tokens == rows.num_lm_tokens and flat.num_real_tokens == real
    # Every attention segment of every row is exactly one segment of the flat row.
    assert len(np.unique(flat.segment_ids[0, :real])) == sum(len(np.unique(r[r >= 0])) for r in rows.segment_ids)
    check_pair_batch(flat, pairs, layout)


def check_pair_batch(batch, pairs, layout):
    rows, S = batch.shape
    assert batch.num_pairs == len(pairs)

    # Rows hold exactly the real tokens of their pairs, nothing is lost or split.
    assert batch.num_real_tokens == sum(int(pair_packed_length(*map(len, (p.prompt, p.chosen, p.rejected)), layout))
                                        for p in pairs)
    assert (batch.input_ids[batch.segment_ids < 0] == PAD).all()

    # Reward read-out positions: last token of each response, in one row, at the right position id.
    for pair, ci, ri in zip(pairs, batch.chosen_index, batch.rejected_index):
        (rc, cc), (rr, cr) = locate(batch, ci), locate(batch, ri)
        assert rc == rr, "a pair was split across rows"
        assert batch.input_ids[rc, cc] == pair.chosen[-1] and batch.input_ids[rr, cr] == pair.rejected[-1]
        p = len(pair.prompt)
        assert batch.position_ids[rc, cc] == p + len(pair.chosen) - 1
        assert batch.position_ids[rr, cr] == p + len(pair.rejected) - 1
        # Each response sees exactly its prompt and itself, in the duplicated layout's positions.
        expected_c = list(zip(np.concatenate([pair.prompt, pair.chosen]).tolist(), range(p + len(pair.chosen))))
        expected_r = list(zip(np.concatenate([pair.prompt, pair.rejected]).tolist(), range(p + len(pair.rejected))))
        assert visible(batch, rc, cc) == expected_c
        assert visible(batch, rr, cr) == expected_r
        # LM targets: the chosen tokens, predicted from the token before each.
        labels = batch.labels[rc, cc - len(pair.chosen) : cc]
        assert labels.tolist() == pair.chosen.tolist()

    assert batch.num_lm_tokens == sum(len(p.chosen) for p in pairs)

    # cu_seqlens tile the flattened rows, with a boundary at every row start.
    cu = batch.cu_seqlens
    assert cu[0] == 0 and cu[-1] == rows * S and (np.diff(cu) > 0).all()
    assert set(range(0, rows * S, S)) <= set(cu.tolist())
    assert batch.max_seqlen == int(np.diff(cu).max())
    flat_segments = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    seg = batch.segment_ids.ravel()
    for a in np.unique(flat_segments):
        ids = seg[flat_segments == a]
        assert len(set(ids.tolist())) == 1, "a cu_seqlens segment mixes attention segments"


def test_shared_prefix_saves_the_prompt():
    pairs = make_pairs([(30, 10, 12), (25, 7, 9)])
    dup = pack_pairs(pairs, 256, "duplicated", PAD)
    shared = pack_pairs(pairs, 256, "shared-prefix", PAD)
    assert dup.num_real_tokens - shared.num_real_tokens == 30 + 25
    # Shared-prefix positions restart at len(P) for the rejected response.
    row, col = locate(shared, shared.rejected_index[0])
    assert shared.position_ids[row, col - 11 : col + 1].tolist() == list(range(30, 42))
    assert (shared.branch_ids[row, 30:40] == 1).all() and (shared.branch_ids[row, 40:52] == 2).all()


def test_first_fit_fills_earlier_rows_and_rejects_oversize():
    pairs = make_pairs([(20, 10, 10), (20, 10, 10), (2, 1, 1)])  # 60, 60, 6 tokens duplicated
    batch = pack_pairs(pairs, 70, "duplicated", PAD)
    assert batch.shape[0] == 2
    assert locate(batch, batch.chosen_index[2])[0] == 0, "the small pair should fill row 0's gap"
    with pytest.raises(ValueError, match="more than a row"):
        pack_pairs(make_pairs([(50, 20, 20)]), 100, "duplicated", PAD)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=10), seq_len=st.integers(40, 90))
def test_pack_documents(lengths, seq_len):
    rng = np.random.default_rng(1)
    pieces = [rng.integers(0, 500, n) for n in lengths]
    batch = pack_documents(pieces, seq_len, PAD)
    assert batch.num_real_tokens == sum(lengths)
    assert batch.num_lm_tokens == sum(n - 1 for n in lengths)
    assert len(batch.chosen_index) == 0
    # Every label is the next token of the same segment.
    ids, labels, seg = batch.input_ids, batch.labels, batch.segment_ids
    r, c = np.nonzero(labels != IGNORE_INDEX)
    assert (labels[r, c] == ids[r, c + 1]).all() and (seg[r, c] == seg[r, c + 1]).all()


def test_epoch_shuffle_resume_and_coverage():
    s = EpochShuffle(10, seed=3)
    first_epoch = s.take(10)
    assert sorted(first_epoch.tolist()) == list(range(10))
    s.take(4)
    state = s.state_dict()
    rest = s.take(13)
    t = EpochShuffle(10, seed=3)
    t.load_state_dict(state)
    assert t.take(13).tolist() == rest.tolist()
    assert not np.array_equal(EpochShuffle(10, seed=3).take(10), EpochShuffle(10, seed=4).take(10))


def test_blended_sampler_exact_mix_and_resume():
    s = BlendedSampler([100, 50], weights=[3, 1], seed=0)
    draws = s.take(40)
    assert (draws[:, 0] == 0).sum() == 30
    for k in range(1, 41):  # the mix is exact at every prefix, within one draw
        assert abs((draws[:k, 0] == 0).sum() - 0.75 * k) <= 1
    state = json.loads(json.dumps(s.state_dict()))
    more = s.take(25)
    t = BlendedSampler([100, 50], weights=[3, 1], seed=0)
    t.load_state_dict(state)
    assert t.take(25).tolist() == more.tolist()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    rng = np.random.default_rng(0)
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": "p" * int(rng.integers(3, 30)) + str(i),
                                "chosen": "c" * int(rng.integers(1, 40)),
                                "rejected": "r" * int(rng.integers(1, 40))}) + "\n")
    build_shard([str(root / "pairs.jsonl")], str(root / "shard"), progress=False)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": "d" * int(rng.integers(5, 300)) + str(i)}) + "\n")
    build_shard([str(root / "docs.jsonl")], str(root / "docs"), kind="documents", keys=("text",), progress=False)
    return str(root / "shard")


def test_step_loader_dp_slices_and_global_counts(shard):
    kwargs = dict(items_per_step=16, micro_batches=2, seq_len=256, layout="duplicated", seed=7)
    ranks = [StepLoader([shard], dp_rank=r, dp_size=2, **kwargs) for r in range(2)]
    single = StepLoader([shard], **kwargs)
    for _ in range(3):
        steps = [r.next_step() for r in ranks]
        whole = single.next_step()
        assert all(np.array_equal(s.step_items, whole.step_items) for s in steps)
        pairs = sum(mb.num_pairs for s in steps for mb in s.micro_batches)
        lm = sum(mb.num_lm_tokens for s in steps for mb in s.micro_batches)
        assert pairs == whole.global_pairs == 16
        assert lm == whole.global_lm_tokens
        # The ranks' micro-batches are the single process's pairs, in order.
        tokens = lambda ss: [mb.input_ids.ravel()[mb.chosen_index].tolist() for s in ss for mb in s.micro_batches]
        assert sum(tokens(steps), []) == sum(tokens([whole]), [])


def test_step_loader_resume_gives_identical_batches(shard):
    kwargs = dict(items_per_step=8, micro_batches=2, seq_len=200, layout="shared-prefix", seed=1)
    a = StepLoader([shard], **kwargs)
    for _ in range(5):  # cross an epoch boundary (64 pairs / 8 per step) later on
        a.next_step()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_step() for _ in range(6)]
    b = StepLoader([shard], **kwargs)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_step()
        for x, y in zip(got.micro_batches, want.micro_batches):
            assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
            assert np.array_equal(x.chosen_index, y.chosen_index)


def test_step_loader_rejects_bad_split(shard):
    with pytest.raises(ValueError, match="not divisible"):
        StepLoader([shard], items_per_step=10, micro_batches=3, seq_len=256)
    with pytest.raises(ValueError, match="packing 'padded'"):
        StepLoader([shard], items_per_step=8, seq_len=256, packing="padded")


@pytest.mark.parametrize("kind_layout", [("pairs", "duplicated"), ("pairs", "shared-prefix"), ("documents", None)])
def test_step_loader_flat_packing_is_the_rows_without_padding(shard, kind_layout):
    kind, layout = kind_layout
    # seq_len 136: the shard's longest pair needs 135 tokens duplicated (the loader refuses it at open otherwise)
    kwargs = dict(kind=kind, items_per_step=8, micro_batches=2, seq_len=136, seed=3,
                  **({"layout": layout} if layout else {}))
    prefix = shard if kind == "pairs" else shard[: -len("shard")] + "docs"
    rows = StepLoader([prefix], **kwargs)
    flat = StepLoader([prefix], packing="flat", pad_multiple=4, **kwargs)
    for _ in range(3):
        a, b = rows.next_step(), flat.next_step()
        assert (a.global_pairs, a.global_lm_tokens) == (b.global_pairs, b.global_lm_tokens)
        for x, y in zip(a.micro_batches, b.micro_batches):
            assert y.shape[0] == 1 and y.shape[1] % 4 == 0
            keep = x.segment_ids.ravel() >= 0
            for name in ("input_ids", "position_ids", "labels", "branch_ids"):
                assert getattr(y, name)[0, : keep.sum()].tolist() == getattr(x, name).ravel()[keep].tolist(), name
            assert y.num_lm_tokens == x.num_lm_tokens > 0
            # One cu_seqlens run per real segment of the rows, plus the tail padding run if any.
            real_runs = sum(len(np.unique(row[row >= 0])) for row in x.segment_ids)
            assert len(y.cu_seqlens) - 1 == real_runs + int(y.shape[1] > keep.sum())
            if kind == "pairs":
                assert len(y.chosen_index) == len(x.chosen_index) > 0
                for index in ("chosen_index", "rejected_index"):
                    got, want = getattr(y, index), getattr(x, index)
                    assert y.input_ids.ravel()[got].tolist() == x.input_ids.ravel()[want].tolist()
                    assert y.position_ids.ravel()[got].tolist() == x.position_ids.ravel()[want].tolist()


# -- token budgets: every micro-batch the same shape ---------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=40), groups=st.integers(1, 6),
       slack=st.integers(0, 100), multiple=st.sampled_from([1, 2]))
def test_balance_into_budget_fits_every_item_once(lengths, groups, slack, multiple):
    budget = max(lengths) + slack
    split = balance_into_budget(np.array(lengths), groups, budget, multiple)
    assert sorted(i for g in split for i in g) == list(range(len(lengths)))  # every item exactly once
    assert all(g == sorted(g) for g in split)  # original order inside a group
    assert all(sum(lengths[i] for i in g) <= budget for g in split)
    assert len(split) >= groups and (len(split) - groups) % multiple == 0
    if len(split) > groups:  # more groups only when the longest-first split into fewer overflowed
        assert balance_into_budget(np.array(lengths), groups, 10**9, 1) != split


def test_balance_into_budget_evens_the_totals_and_refuses_an_item_over_the_budget():
    split = balance_into_budget(np.array([9, 1, 8, 2, 7, 3]), 3, 10)
    assert sorted(sum([9, 1, 8, 2, 7, 3][i] for i in g) for g in split) == [10, 10, 10]
    assert len(balance_into_budget(np.array([6, 6, 6]), 2, 10)) == 3  # two groups cannot hold three 6s
    with pytest.raises(ValueError, match="item 1 needs 11 tokens, more than the micro-batch budget of 10"):
        balance_into_budget(np.array([3, 11]), 1, 10)


def test_the_fitted_budget_holds_a_longest_item_no_trial_drew():
    """One item of 3,000 tokens among 5,000 of 100: the trials never draw it, the budget still holds it (the
    candidate range was empty: argmin of an empty sequence)."""
    fit = fit_micro_batch_tokens(np.array([100] * 5000 + [3000]), None, 8, 2, seed=0)
    assert fit.tokens >= 3000 and fit.tokens % 128 == 0


def test_fitted_budget_minimises_the_padded_tokens_of_simulated_steps():
    """Against brute force on the same simulated steps (the fit's own draws, replayed from its seed): no
    multiple of 128 the fit may choose (at least the longest item and the smallest 4-way split maximum of
    any step) pads less than the fitted T, with the micro-batch counts balance_into_budget itself gives."""
    rng = np.random.default_rng(3)
    pool = rng.integers(300, 1300, 500)
    fit = fit_micro_batch_tokens(pool, None, 32, 4, trials=24, seed=9)
    sim = np.random.default_rng([9, 0x7B])
    draws = [sim.choice(pool, size=32) for _ in range(24)]
    real = sum(int(d.sum()) for d in draws)

    def padded(budget):
        return sum(len(balance_into_budget(d, 4, budget)) * budget for d in draws)

    def heaviest(d):
        return max(sum(int(d[i]) for i in g) for g in balance_into_budget(d, 4, 10**9))

    lowest = max(int(pool.max()), min(heaviest(d) for d in draws))
    candidates = [t for t in range(128, 3 * fit.tokens, 128) if t >= lowest]
    assert fit.tokens in candidates and fit.fitted
    assert padded(fit.tokens) == min(padded(t) for t in candidates)
    assert fit.expected_padding == pytest.approx(padded(fit.tokens) / real - 1)
    assert fit.extra_micro_batch_rate == pytest.approx(
        sum(len(balance_into_budget(d, 4, fit.tokens)) > 4 for d in draws) / 24)


@pytest.mark.parametrize("layout", ["duplicated", "shared-prefix"])
def test_token_budget_loader_gives_one_shape_and_the_same_pairs(shard, layout):
    """With a token budget every micro-batch is [1, T]; the step holds the same pairs with the same global
    counts as without one (only their split into micro-batches differs); resume gives identical batches."""
    kwargs = dict(items_per_step=8, micro_batches=2, seq_len=200, layout=layout, packing="flat", seed=5)
    plain = StepLoader([shard], **kwargs)
    budget = StepLoader([shard], micro_batch_tokens="auto", **kwargs)
    T = budget.micro_batch_tokens
    assert T % 128 == 0 and budget.token_budget.fitted
    for _ in range(6):
        a, b = plain.next_step(), budget.next_step()
        assert (a.global_pairs, a.global_lm_tokens) == (b.global_pairs, b.global_lm_tokens)
        assert np.array_equal(a.step_items, b.step_items)
        assert {m.shape for m in b.micro_batches} == {(1, T)} and len(b.micro_batches) >= 2
        chosen = lambda step: sorted(t for m in step.micro_batches for t in m.input_ids.ravel()[m.chosen_index].tolist())
        assert chosen(a) == chosen(b)  # the same responses, wherever they sit
        assert sum(m.num_real_tokens for m in a.micro_batches) == sum(m.num_real_tokens for m in b.micro_batches)
    state = budget.state_dict()
    want = budget.next_step()
    again = StepLoader([shard], micro_batch_tokens="auto", **kwargs)
    again.load_state_dict(state)
    got = again.next_step()
    assert again.micro_batch_tokens == T
    for x, y in zip(got.micro_batches, want.micro_batches):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.chosen_index, y.chosen_index)


def test_token_budget_settings_are_checked(shard):
    kwargs = dict(items_per_step=8, micro_batches=2, seq_len=200, seed=5)
    with pytest.raises(ValueError, match="needs packing='flat'"):
        StepLoader([shard], micro_batch_tokens="auto", **kwargs)
    with pytest.raises(ValueError, match=r"must hold the longest item of the shards \(\d+ tokens\)"):
        StepLoader([shard], packing="flat", micro_batch_tokens=16, **kwargs)
    with pytest.raises(ValueError, match="'auto' or a positive integer"):
        StepLoader([shard], packing="flat", micro_batch_tokens="big", **kwargs)
    fixed = StepLoader([shard], packing="flat", micro_batch_tokens=512, **kwargs)
    assert {m.shape for m in fixed.next_step().micro_batches} == {(1, 512)} and not fixed.token_budget.fitted
