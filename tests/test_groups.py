"""Group rows ``[P R1 ... RK]`` against the same pairs expanded: attention structure, packing, and the
loss, its gradients and the rewards for every CPU attention backend and FlexAttention's mask.

The reference is the expanded form itself: every labelled pair (i better than j) of each group packed as
its own pair, in the duplicated layout ``[P Ri][P Rj]`` (and shared-prefix), through the same model and
``pmp_loss``, normalised by the same pair count. With the "pairs" LM weighting the two are the same
objective, term for term.

Tolerances (fp32, CPU): the loss within 1e-6 relative (measured 0 to 1.4e-7: the group and expanded
batches run the same maths on differently shaped tensors, so only summation order differs); gradients:
the whole gradient's relative L2 error within 1e-6 (measured 2.2e-7 to 3.1e-7 over 6 draws) and each
parameter tensor's within 5e-6 (measured <= 6.7e-7; three fp32 layouts of the same pairs are each
~6e-7 from one another there, so this is fp32's own floor, not the layout); rewards within 1e-5 absolute
(as tests/test_attention_backends.py: ~1e-6 on O(1) values).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from megapmp.config import model_preset
from megapmp.data.datasets import Pair, expand_group
from megapmp.data.groups import Group, GroupTable, labelled_pairs, lm_weights, response_wins
from megapmp.data.packing import (MAX_BRANCH, flatten_rows, group_packed_length, group_pieces, pack_groups,
                                   pack_pairs)
from megapmp.loss import Heads, pmp_loss
from megapmp.model import AttentionInputs, Qwen2RewardModel, build_mask
from megapmp.model import attention as attention_fn
from megapmp.model.attention import ATTENTION_BACKENDS, attention_inputs, packed_rows_mask_mod, segment_structure

CONFIG = model_preset("tiny")
V = CONFIG.vocab_size
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-6
PARAM_RTOL = 5e-6
REWARD_ATOL = 1e-5


def random_groups(seed: int, n: int = 4, sizes=(2, 7), prompt=(3, 20), response=(2, 30), scores=False) -> list:
    """Groups of random tokens with boolean (or 3-level score) labels, each with at least one pair."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        k = int(rng.integers(*sizes))
        labels = rng.integers(0, 3 if scores else 2, k).astype(np.float64)
        if labels.min() == labels.max():
            labels[0] += 1
        groups.append(Group(rng.integers(2, V, rng.integers(*prompt)),
                            tuple(rng.integers(2, V, rng.integers(*response)) for _ in range(k)), labels))
    return groups


def expanded(groups) -> list[Pair]:
    return [pair for group in groups for pair in expand_group(group)]


# ---------------------------------------------------------------- labels and pairs


def test_labelled_pairs_wins_and_lm_weights():
    labels = np.array([1.0, 0.0, 1.0, 0.0, 0.0])  # 2 correct x 3 incorrect
    assert labelled_pairs(labels).tolist() == [[0, 1], [0, 3], [0, 4], [2, 1], [2, 3], [2, 4]]
    assert response_wins(labels).tolist() == [3, 0, 3, 0, 0]
    assert lm_weights(labels, "distinct").tolist() == [1, 0, 1, 0, 0]
    assert lm_weights(labels, "pairs").tolist() == [3, 0, 3, 0, 0]
    scores = np.array([0.5, 0.9, 0.5, 0.1])  # a tie (0 and 2) makes no pair
    assert labelled_pairs(scores).tolist() == [[0, 3], [1, 0], [1, 2], [1, 3], [2, 3]]
    assert lm_weights(scores, "distinct").tolist() == [1, 1, 1, 0]


def test_group_table_counts_from_the_index_match_the_groups():
    groups = random_groups(3, n=6, scores=True)
    lengths = np.concatenate([[len(g.prompt), *(len(r) for r in g.responses)] for g in groups])
    labels = np.concatenate([[np.nan, *g.labels] for g in groups])
    document_index = np.concatenate([[0], np.cumsum([1 + len(g.responses) for g in groups])])
    table = GroupTable.build(document_index, lengths, labels)
    assert table.pairs.tolist() == [len(g.pairs) for g in groups]
    for weighting in ("distinct", "pairs"):
        want = [int(sum(len(r) * w for r, w in zip(g.responses, lm_weights(g.labels, weighting)))) for g in groups]
        assert table.lm_tokens[weighting].tolist() == want
    bad = labels.copy()
    bad[0] = 1.0
    with pytest.raises(ValueError, match="group 0 .*a prompt's label is not NaN"):
        GroupTable.build(document_index, lengths, bad, "x")
    tie = labels.copy()
    tie[document_index[2] + 1 : document_index[3]] = 0.25
    with pytest.raises(ValueError, match="group 2 has no labelled pair"):
        GroupTable.build(document_index, lengths, tie, "x")


# ---------------------------------------------------------------- packing and attention structure


def test_group_row_structure_positions_and_readouts():
    group = Group(np.arange(10, 14), (np.arange(20, 23), np.arange(30, 35), np.arange(40, 42)), np.array([1., 0., 1.]))
    b = pack_groups([group], 16, pad_id=0)
    assert b.layout == "group" and b.shape == (1, 16)
    assert b.branch_ids[0].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 2 + [0] * 2
    assert b.position_ids[0, :14].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 4, 5]  # each Ri from P's end
    assert segment_structure(b.segment_ids, b.branch_ids).tolist() == [[0, 4, 3, 5, 2]]
    assert b.response_index.tolist() == [6, 11, 13]
    assert list(zip(b.chosen_index.tolist(), b.rejected_index.tolist())) == [(6, 11), (13, 11)]
    # LM targets of the two correct responses: each first token from the prompt's last position (3)
    assert b.lm_index.tolist() == [3, 4, 5, 3, 12] and b.lm_targets.tolist() == [20, 21, 22, 40, 41]
    attn = AttentionInputs.from_segments(b.segment_ids, b.branch_ids)
    assert torch.equal(attn.default_position_ids()[0, :14], torch.as_tensor(b.position_ids[0, :14]))
    mask = build_mask(attn.segment_ids, attn.branch_ids)[0, 0]
    assert mask[13, :4].all() and not mask[13, 4:12].any() and mask[13, 12:14].all()  # R3 sees P and R3 only


def test_group_rows_flops_count_exactly_the_mask():
    """megapmp.flops credits a group row the (query, key) pairs its mask allows, no more (exact convention),
    and its LM head one logits row per position with a target: a prompt end predicting several first tokens,
    or a winner's positions repeated once per pair it wins (lm_weighting = pairs), are computed once."""
    from megapmp.flops import attention_pairs, batch_flops

    b = pack_groups(random_groups(23, n=5), 128, pad_id=0)
    mask = build_mask(torch.as_tensor(b.segment_ids), torch.as_tensor(b.branch_ids))
    padding = int((b.segment_ids < 0).sum())  # a padding token attends to itself
    assert attention_pairs(b.segment_ids, b.branch_ids, "exact") == int(mask.sum()) - padding
    per_row = 3 * 2 * CONFIG.hidden_size * CONFIG.vocab_size
    positions = set(b.lm_index.tolist())
    assert len(positions) < len(b.lm_index)  # prompt ends with several targets
    assert batch_flops(CONFIG, b).lm_head == per_row * len(positions)
    weighted = pack_groups(random_groups(23, n=5), 128, pad_id=0, lm_weighting="pairs")
    assert len(weighted.lm_index) > len(b.lm_index) and set(weighted.lm_index.tolist()) == positions
    assert batch_flops(CONFIG, weighted) == batch_flops(CONFIG, b)  # the same model FLOPs


def test_a_group_longer_than_a_row_is_split_with_the_prompt_repeated():
    rng = np.random.default_rng(1)
    group = Group(rng.integers(2, V, 6), tuple(rng.integers(2, V, n) for n in (9, 4, 8, 3, 7)),
                  np.array([1., 0., 0., 1., 0.]))
    assert group_pieces(6, [9, 4, 8, 3, 7], 20) == [[0, 1], [2, 3], [4]]  # first fit in order, 14 free per piece
    assert group_packed_length(6, [9, 4, 8, 3, 7], 20) == 3 * 6 + 31
    b = pack_groups([group], 20, pad_id=0)
    structure = segment_structure(b.segment_ids, b.branch_ids)
    assert structure[:, 1].tolist() == [6, 6, 6]  # every piece starts with the whole prompt
    flat = b.input_ids.reshape(-1)
    for start in structure[:, 0].tolist():
        assert flat[start : start + 6].tolist() == group.prompt.tolist()
    for i, at in enumerate(b.response_index.tolist()):  # each read-out is its response's last token
        assert flat[at] == group.responses[i][-1]
    # pairs across pieces point into different rows: the loss reads them all the same
    assert len(b.chosen_index) == len(group.pairs) == 6
    with pytest.raises(ValueError, match="response 0 of a group needs 15 tokens"):
        group_pieces(6, [9], 14)


def test_one_bound_on_responses_per_segment():
    import importlib  # megapmp.model.attention is also a function: the module by its name

    assert MAX_BRANCH == importlib.import_module("megapmp.model.attention").MAX_BRANCH == 127


def test_more_responses_than_branch_ids_make_more_segments():
    k = MAX_BRANCH + 3
    group = Group(np.array([5, 6]), tuple(np.array([7 + i % 50]) for i in range(k)), np.arange(k, dtype=float))
    b = pack_groups([group], 4096, pad_id=0)
    assert int(b.branch_ids.max()) == MAX_BRANCH and b.num_pairs == k * (k - 1) // 2
    assert segment_structure(b.segment_ids, b.branch_ids).shape[0] == 2


def test_flatten_rows_follows_every_index():
    groups = random_groups(2, n=5)
    rows = pack_groups(groups, 64, pad_id=0, lm_weighting="pairs")
    flat = flatten_rows(rows, pad_id=0, multiple=8)
    for name in ("chosen_index", "rejected_index", "response_index", "lm_index"):
        np.testing.assert_array_equal(flat.input_ids.reshape(-1)[getattr(flat, name)],
                                      rows.input_ids.reshape(-1)[getattr(rows, name)], err_msg=name)
    np.testing.assert_array_equal(flat.lm_targets, rows.lm_targets)


# ---------------------------------------------------------------- the loss equals the expanded one


def dense_flex_attention(q, k, v, attn):
    """SDPA over FlexAttention's own mask_mod rendered dense (torch's create_mask): how flex's rule is run
    forward and backward on a CPU, where flex itself has no backward."""
    rows, seq_len = attn.shape
    mask = create_mask(packed_rows_mask_mod(attn.segment_ids, attn.branch_ids), rows, None, seq_len, seq_len,
                       device=q.device)
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.fixture
def flex_dense_backend(monkeypatch):
    monkeypatch.setitem(ATTENTION_BACKENDS, "flex_dense", dense_flex_attention)
    return "flex_dense"


def loss_and_grads(batch, backend, *, global_pairs, global_lm_tokens, rm_coef=1.0, lm_coef=1.0):
    torch.manual_seed(0)
    model = Qwen2RewardModel(CONFIG, attention_backend=backend)
    model.init_weights()
    b = batch.to_torch()
    hidden = model(b.input_ids, b.position_ids, attention_inputs(b))
    out = pmp_loss(hidden, Heads.of(model), b, rm_coef=rm_coef, lm_coef=lm_coef, global_pairs=global_pairs,
                   global_lm_tokens=global_lm_tokens)
    out.loss.backward()
    rewards = model.rewards(hidden.detach()).reshape(-1)
    return out, {n: p.grad for n, p in model.named_parameters()}, rewards


def assert_same_step(got, want):
    (out_a, grads_a, _), (out_b, grads_b, _) = got, want
    for term in ("loss", "rm_loss", "lm_loss"):
        a, b = float(getattr(out_a, term).detach()), float(getattr(out_b, term).detach())
        assert abs(a - b) <= LOSS_RTOL * abs(b), (term, a, b)
    assert float(out_a.correct) == float(out_b.correct)
    flat_a = torch.cat([g.reshape(-1) for g in grads_a.values()])
    flat_b = torch.cat([g.reshape(-1) for g in grads_b.values()])
    assert float((flat_a - flat_b).norm() / flat_b.norm()) < GRAD_RTOL
    for name in grads_b:
        assert float((grads_a[name] - grads_b[name]).norm() / grads_b[name].norm()) < PARAM_RTOL, name


CASES = [("segmented", "flat"), ("varlen_reference", "flat"), ("auto", "flat"), ("sdpa", "rows"),
         ("flex_dense", "rows"), ("flex_dense", "flat")]


@pytest.mark.parametrize("backend,packing", CASES)
def test_loss_gradients_and_rewards_equal_the_expanded_pairs(backend, packing, flex_dense_backend):
    groups = random_groups(7, scores=backend == "varlen_reference")
    pairs = expanded(groups)
    group_batch = pack_groups(groups, 256, pad_id=0, lm_weighting="pairs")
    pair_batch = pack_pairs(pairs, 256, "duplicated", pad_id=0)
    if packing == "flat":
        group_batch, pair_batch = flatten_rows(group_batch, 0), flatten_rows(pair_batch, 0)
    assert group_batch.num_pairs == pair_batch.num_pairs == len(pairs)
    assert group_batch.num_lm_tokens == pair_batch.num_lm_tokens  # the same targets, some at one position
    counts = dict(global_pairs=len(pairs), global_lm_tokens=pair_batch.num_lm_tokens)
    got = loss_and_grads(group_batch, backend, **counts)
    want = loss_and_grads(pair_batch, backend, **counts)
    assert_same_step(got, want)
    # rewards: each response's, read in the group row, against the same response read in every pair it is in
    group_rewards, pair_rewards = got[2], want[2]
    at = 0
    for g, group in enumerate(groups):
        first = sum(len(x.responses) for x in groups[:g])
        for i, j in group.pairs.tolist():
            for response, read in ((i, pair_batch.chosen_index[at]), (j, pair_batch.rejected_index[at])):
                torch.testing.assert_close(group_rewards[group_batch.response_index[first + response]],
                                           pair_rewards[read], rtol=0, atol=REWARD_ATOL)
            at += 1


def test_a_rule_without_branches_is_caught(monkeypatch):
    """The equality above can fail: the segment rule without the branch term (Ri seeing R1 .. Ri-1)."""

    def no_branch_rule(q, k, v, attn):
        segment_ids = attn.segment_ids
        mask = build_mask(segment_ids, torch.zeros_like(attn.branch_ids))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             enable_gqa=True)
        return out.transpose(1, 2)

    monkeypatch.setitem(ATTENTION_BACKENDS, "no_branch_rule", no_branch_rule)
    groups = random_groups(7)
    pairs = expanded(groups)
    pair_batch = pack_pairs(pairs, 256, "duplicated", pad_id=0)
    counts = dict(global_pairs=len(pairs), global_lm_tokens=pair_batch.num_lm_tokens)
    got = loss_and_grads(pack_groups(groups, 256, 0, lm_weighting="pairs"), "no_branch_rule", **counts)
    want = loss_and_grads(pair_batch, "sdpa", **counts)
    with pytest.raises(AssertionError):
        assert_same_step(got, want)


def test_rm_term_alone_equals_expanded_shared_prefix_with_distinct_lm_weighting():
    """RM finetuning (lm_coef = 0): the LM weighting plays no part, and shared-prefix is the other reference."""
    groups = random_groups(11, n=5, scores=True)
    pairs = expanded(groups)
    got = loss_and_grads(flatten_rows(pack_groups(groups, 512, 0), 0), "segmented", global_pairs=len(pairs),
                         global_lm_tokens=0, lm_coef=0.0)
    want = loss_and_grads(flatten_rows(pack_pairs(pairs, 512, "shared-prefix", 0), 0), "segmented",
                          global_pairs=len(pairs), global_lm_tokens=0, lm_coef=0.0)
    assert_same_step(got, want)


def test_split_group_equals_the_expanded_pairs():
    groups = random_groups(5, n=3, sizes=(6, 9), prompt=(8, 12), response=(10, 24))
    rows = pack_groups(groups, 64, pad_id=0, lm_weighting="pairs")  # every group needs several rows
    assert all(len(group_pieces(len(g.prompt), [len(r) for r in g.responses], 64)) > 1 for g in groups)
    pairs = expanded(groups)
    pair_batch = pack_pairs(pairs, 64, "duplicated", pad_id=0)
    counts = dict(global_pairs=len(pairs), global_lm_tokens=pair_batch.num_lm_tokens)
    assert_same_step(loss_and_grads(rows, "segmented", **counts), loss_and_grads(pair_batch, "segmented", **counts))
    unsplit = loss_and_grads(pack_groups(groups, 1024, 0, lm_weighting="pairs"), "segmented", **counts)
    split = loss_and_grads(rows, "segmented", **counts)
    whole = pack_groups(groups, 1024, 0)
    torch.testing.assert_close(split[2][rows.response_index], unsplit[2][whole.response_index], rtol=0,
                               atol=REWARD_ATOL)


def test_distinct_lm_term_is_each_chosen_response_once():
    """The default weighting against an independent computation: CE of each response that wins a pair,
    as the plain causal sequence [P R] alone, summed and divided by their token count."""
    groups = random_groups(13, n=3, scores=True)
    batch = pack_groups(groups, 512, pad_id=0)
    lm_tokens = sum(len(r) for g in groups for r, w in zip(g.responses, lm_weights(g.labels, "distinct")) if w)
    assert batch.num_lm_tokens == lm_tokens
    out, _, _ = loss_and_grads(batch, "segmented", global_pairs=batch.num_pairs, global_lm_tokens=lm_tokens,
                               rm_coef=0.0)
    torch.manual_seed(0)
    model = Qwen2RewardModel(CONFIG)
    model.init_weights()
    total = 0.0
    with torch.no_grad():
        for g in groups:
            for r, w in zip(g.responses, lm_weights(g.labels, "distinct")):
                if not w:
                    continue
                ids = torch.as_tensor(np.concatenate([g.prompt, r]))[None]
                attn = AttentionInputs.for_padded_causal([ids.shape[1]], ids.shape[1])
                logits = model.lm_logits(model(ids, torch.arange(ids.shape[1])[None], attn))[0].float()
                p = len(g.prompt)
                total += float(F.cross_entropy(logits[p - 1 : -1], ids[0, p:], reduction="sum"))
    assert float(out.lm_loss) == pytest.approx(total / lm_tokens, rel=1e-5)


# ---------------------------------------------------------------- FlexAttention's rule on group rows


def test_flex_mask_mod_is_the_dense_rule_on_group_rows():
    for packing in ("rows", "flat"):
        b = pack_groups(random_groups(17, n=6), 96, pad_id=0)
        b = flatten_rows(b, 0, multiple=50) if packing == "flat" else b
        attn = AttentionInputs.from_segments(b.segment_ids, b.branch_ids)
        rows, seq_len = attn.shape
        dense = create_mask(packed_rows_mask_mod(attn.segment_ids, attn.branch_ids), rows, None, seq_len, seq_len,
                            device="cpu")
        assert torch.equal(dense, build_mask(attn.segment_ids, attn.branch_ids))


def test_flex_forward_on_group_rows_matches_segmented():
    b = flatten_rows(pack_groups(random_groups(19, n=4), 128, pad_id=0), 0, multiple=50)
    attn = AttentionInputs.from_segments(b.segment_ids, b.branch_ids)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*attn.shape, h, 16, generator=generator) for h in (4, 2, 2))
    with torch.no_grad():
        torch.testing.assert_close(attention_fn(q, k, v, attn, "flex"), attention_fn(q, k, v, attn, "segmented"),
                                   rtol=0, atol=REWARD_ATOL)
