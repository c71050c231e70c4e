"""Training on response groups: the trainer with data.layout = group against the same groups expanded into
pairs, a pair shard in the group layout against shared-prefix, the loader's counts and token budgets,
exact resume, and tensor / sequence / pipeline / data parallel layouts against a single process.

Tolerances: a group step and its expanded step are the same fp32 maths in another summation order
(tests/test_groups.py: ~1e-7 per step); over 10 optimizer steps 1e-5 relative, as the golden and the
parallel curves (tests/test_parallel_train.py) -- measured ~1e-7. A pair shard packed in the group layout
is the shared-prefix row itself, so that curve is compared bit for bit; so is a resumed one.
"""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megapmp.config import load_train_config
from megapmp.data.datasets import GroupDataset, expand_group
from megapmp.data.loader import StepLoader
from megapmp.data.packing import pack_groups, pack_pairs
from megapmp.data.preprocess import build_shard
from megapmp.train import Trainer
from tests.distributed_utils import run_ranks
from tests.test_train import TINY, pair_shard

RTOL = 1e-5
STEPS = 10
FAST = [("steps", str(STEPS)), ("data.seq_len", "256"), ("data.items_per_step", "8"), ("data.micro_batches", "2"),
        ("logging.progress", "false"), ("logging.eval_interval", "0"), ("checkpoint.interval", "0"),
        ("num_threads", "1")]


def arithmetic_groups(path: Path, n: int, seed: int = 0) -> None:
    """Groups of 2-6 answers to 'What is a plus b?', some right, some wrong (GSM8K-like, in miniature)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            labels = [rng.random() < 0.5 for _ in range(rng.randint(2, 6))]
            if len(set(labels)) == 1:  # a group needs a right and a wrong answer
                labels[0] = not labels[0]
            responses = [f"{a} + {b} = {a + b if ok else a + b + rng.choice([-3, -1, 1, 2, 10])}"
                         + ("." if rng.random() < 0.5 else "") for ok in labels]
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "responses": responses, "labels": labels}) + "\n")


def group_shard(root: Path, name: str, n: int, seed: int = 0) -> Path:
    arithmetic_groups(root / f"{name}.jsonl", n, seed)
    build_shard([str(root / f"{name}.jsonl")], str(root / name), kind="groups", keys=("prompt", "responses", "labels"),
                progress=False)
    return root / name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("group_data")
    group_shard(root, "groups", 300)
    pair_shard(root, "pairs", 200)
    return root


def overrides(shards, name="groups", *extra):
    return FAST + [("data.train", str(shards / name))] + list(extra)


def curve(shards, run_dir, *extra, name="groups"):
    history = Trainer(load_train_config(str(TINY), overrides(shards, name, *extra)), run_dir).fit()
    return history


def test_group_layout_follows_the_expanded_pairs_curve(shards, tmp_path):
    group = curve(shards, tmp_path / "group", ("data.layout", "group"), ("data.lm_weighting", "pairs"))
    for layout in ("duplicated", "shared-prefix"):
        expanded = curve(shards, tmp_path / layout, ("data.layout", layout))
        assert [r["pairs"] for r in group] == [r["pairs"] for r in expanded]
        assert [r["loss"] for r in group] == pytest.approx([r["loss"] for r in expanded], rel=RTOL), layout
        assert [r["rm_acc"] for r in group] == pytest.approx([r["rm_acc"] for r in expanded], abs=1e-12)
    # the group rows hold far fewer tokens than the expanded pairs
    assert sum(r["tokens"] for r in group) < 0.5 * sum(r["tokens"] for r in expanded)
    # distinct weighting: the same pairs, fewer LM targets, so another (still decreasing) curve
    distinct = curve(shards, tmp_path / "distinct", ("data.layout", "group"))
    assert [r["pairs"] for r in distinct] == [r["pairs"] for r in group]
    assert distinct[0]["rm_loss"] == pytest.approx(group[0]["rm_loss"], rel=RTOL)
    assert distinct[-1]["loss"] < distinct[0]["loss"]


def test_a_pair_shard_in_the_group_layout_is_shared_prefix_bit_for_bit(shards, tmp_path):
    group = curve(shards, tmp_path / "group", ("data.layout", "group"), name="pairs")
    shared = curve(shards, tmp_path / "shared", ("data.layout", "shared-prefix"), name="pairs")
    assert [(r["loss"], r["grad_norm"]) for r in group] == [(r["loss"], r["grad_norm"]) for r in shared]


def test_loader_counts_come_from_the_index(shards):
    dataset = GroupDataset(str(shards / "groups"))
    for weighting in ("distinct", "pairs"):
        loader = StepLoader([str(shards / "groups")], items_per_step=8, micro_batches=2, seq_len=256, layout="group",
                            packing="flat", lm_weighting=weighting)
        for _ in range(3):
            step = loader.next_step()
            assert step.global_pairs == sum(m.num_pairs for m in step.micro_batches)
            assert step.global_lm_tokens == sum(m.num_lm_tokens for m in step.micro_batches)
            drawn = step.step_items[:, 1]
            assert step.global_pairs == int(dataset.table.pairs[drawn].sum())


def test_packed_lengths_from_the_index_are_what_packing_makes(shards):
    dataset = GroupDataset(str(shards / "groups"))
    items = np.arange(0, 300, 37)
    for layout, seq_len in (("group", 256), ("group", 40), ("duplicated", 256), ("shared-prefix", 256)):
        want = []
        for i in items.tolist():
            group = dataset[i]
            packed = (pack_groups([group], seq_len, 0) if layout == "group" else
                      pack_pairs(expand_group(group), seq_len, layout, 0))
            want.append(packed.num_real_tokens)
        assert dataset.packed_lengths(items, layout, seq_len).tolist() == want, (layout, seq_len)


def test_a_pair_shard_in_the_group_layout_is_counted_as_packed_when_a_pair_is_split(shards):
    """Rows shorter than some [P C R]: the loader packs such a pair as [P C][P R] (pack_groups), so the token
    budget must count its prompt twice (it counted [P C R] and stopped at the step that drew one)."""
    from megapmp.data.packing import groups_of_pairs

    probe = StepLoader([str(shards / "pairs")], items_per_step=8, micro_batches=2, seq_len=256, layout="group")
    ds, items = probe.datasets[0], np.arange(len(probe.datasets[0]))
    whole = ds.prompt_lengths + ds.chosen_lengths + ds.rejected_lengths
    seq_len = int(np.median(whole))
    assert (whole > seq_len).any() and (whole <= seq_len).any()  # both cases below
    assert (ds.prompt_lengths + np.maximum(ds.chosen_lengths, ds.rejected_lengths) <= seq_len).all()  # each fits
    loader = StepLoader([str(shards / "pairs")], items_per_step=8, micro_batches=2, seq_len=seq_len, layout="group")
    packed = [pack_groups(groups_of_pairs([ds[i]]), seq_len, 0).num_real_tokens for i in items.tolist()]
    assert loader.item_lengths(0, items).tolist() == packed
    budgeted = StepLoader([str(shards / "pairs")], items_per_step=8, micro_batches=2, seq_len=seq_len, layout="group",
                          packing="flat", micro_batch_tokens="auto")
    for _ in range(5):
        assert all(m.shape == (1, budgeted.micro_batch_tokens) for m in budgeted.next_step().micro_batches)


def test_token_budget_keeps_groups_whole_and_says_when_one_cannot_fit(shards):
    loader = StepLoader([str(shards / "groups")], items_per_step=8, micro_batches=2, seq_len=256, layout="group",
                        packing="flat", micro_batch_tokens="auto")
    budget = loader.micro_batch_tokens
    for _ in range(3):
        step = loader.next_step()
        assert all(m.shape == (1, budget) for m in step.micro_batches)
        assert step.global_pairs == sum(m.num_pairs for m in step.micro_batches)
    longest = int(GroupDataset(str(shards / "groups")).packed_lengths(np.arange(300), "group", 256).max())
    with pytest.raises(ValueError, match=f"longest item of the shards \\({longest} tokens\\)"):
        StepLoader([str(shards / "groups")], items_per_step=8, micro_batches=2, seq_len=256, layout="group",
                   packing="flat", micro_batch_tokens=longest - 1)


def test_groups_that_cannot_fit_a_row_are_found_at_open(shards):
    """In the group layout a group is split between responses: it fits when each response fits with its
    prompt; in a pair layout each labelled pair must fit whole. Refused at open, or left out (drop)."""
    dataset = GroupDataset(str(shards / "groups"))
    seq_len = int(np.median(dataset.segment_needs("group", 256)))
    with pytest.raises(ValueError, match=f"of 300 groups do not fit a row of data.seq_len={seq_len} tokens in the "
                                         "group layout"):
        StepLoader([str(shards / "groups")], items_per_step=8, seq_len=seq_len, layout="group")
    loader = StepLoader([str(shards / "groups")], items_per_step=8, seq_len=seq_len, layout="group", overlong="drop")
    dropped, unit = loader.dropped[str(shards / "groups")]
    assert 0 < dropped < 300 and unit == "groups"
    kept = loader.kept[0]
    assert (dataset.segment_needs("group", seq_len)[kept] <= seq_len).all()
    loader.next_step()  # every drawn group packs
    # a pair layout needs each pair whole: the exact longest pair, not the bound of the two longest responses
    needs = dataset.segment_needs("duplicated", 0)
    for g in (0, 1, 2):
        group = dataset[g]
        want = max(2 * len(group.prompt) + len(group.responses[i]) + len(group.responses[j]) for i, j in group.pairs)
        assert needs[g] == want


def test_resume_reproduces_the_uninterrupted_group_curve(shards, tmp_path):
    run = tmp_path / "run"
    whole = curve(shards, run, ("data.layout", "group"), ("checkpoint.interval", "5"), ("checkpoint.keep_last", "0"))
    resumed = curve(shards, run, ("data.layout", "group"), ("checkpoint.interval", "5"), ("checkpoint.keep_last", "0"),
                    ("checkpoint.resume", str(run / "checkpoints" / "step_00000005")))
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in whole[5:]]


# ---------------------------------------------------------------- parallel layouts


def train_layouts(rank, world_size, runs):
    torch.set_num_threads(1)
    out = []
    for run_dir, extra in runs:
        history = Trainer(load_train_config(str(TINY), extra), run_dir).fit()
        out.append([r["loss"] for r in history])
    return out


def parallel_flags(tp, pp, sp=False, zero=False):
    return [("parallel.tp", str(tp)), ("parallel.pp", str(pp)), ("parallel.sequence_parallel", str(sp).lower()),
            ("parallel.distributed_optimizer", str(zero).lower())]


WORLD2 = {"tp2 sp": dict(tp=2, pp=1, sp=True), "pp2": dict(tp=1, pp=2), "dp2 zero1": dict(tp=1, pp=1, zero=True)}


@pytest.mark.slow
def test_parallel_layouts_match_the_single_process_on_groups(shards, tmp_path):
    group = [("data.layout", "group")]
    single = [r["loss"] for r in curve(shards, tmp_path / "single", *group)]
    runs = [(str(tmp_path / name.replace(" ", "_")), overrides(shards, "groups", *group, *parallel_flags(**flags)))
            for name, flags in WORLD2.items()]
    results = run_ranks(2, train_layouts, runs, timeout=600)
    assert results[1] == results[0], "every rank must report the same global loss"
    for name, losses in zip(WORLD2, results[0]):
        assert losses == pytest.approx(single, rel=RTOL), name
    (losses,) = run_ranks(4, train_layouts, [(str(tmp_path / "tp2pp2sp"),
                                              overrides(shards, "groups", *group, *parallel_flags(2, 2, sp=True)))],
                          timeout=600)[0]
    assert losses == pytest.approx(single, rel=RTOL), "tp2 pp2 sp"
