"""tools/make_rm_pairs.py --groups: the appendix-D recipes written in the group form (one record per question,
every response with its label), against the same recipe's pairs: the same split, and exactly the same pairs
once a group is expanded -- through tools/preprocess_pairs.py --groups and the trainer's dataset, too."""
from collections import Counter

import pytest

from megapmp.data.datasets import GroupDataset, expand_group
from megapmp.data.preprocess import build_shard
from megapmp.synth import rm_pairs
from megapmp.synth.llm import Backend, Completion
from tests.test_make_rm_pairs import LOGIQA2, MATHSHEPHERD, outputs, run


def expanded_texts(groups) -> Counter:
    """(prompt, chosen, rejected) of every labelled pair of the group records."""
    return Counter((g["prompt"], g["responses"][i], g["responses"][j]) for g in groups
                   for i, ok_i in enumerate(g["labels"]) for j, ok_j in enumerate(g["labels"]) if ok_i and not ok_j)


def pair_texts(pairs) -> Counter:
    return Counter((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)


def test_mathshepherd_groups_hold_exactly_the_800k_pairs(tmp_path):
    common = ["--input", MATHSHEPHERD, "--test-fraction", 0.25, "--seed", 3, "--style", "800k"]
    assert run("mathshepherd", *common, "--output-dir", tmp_path / "pairs") == 0
    assert run("mathshepherd", *common, "--output-dir", tmp_path / "groups", "--groups") == 0
    pairs, test, stats = outputs(tmp_path / "pairs")
    groups, group_test, group_stats = outputs(tmp_path / "groups")
    assert group_test == test and group_stats["split"] == stats["split"]  # the test side stays pairs
    assert expanded_texts(groups) == pair_texts(pairs)
    assert len(groups) == len({p["group"] for p in pairs}) and group_stats["train"]["pairs"] == len(pairs)
    assert group_stats["train_form"] == "groups" and all(g["id"] == g["group"] for g in groups)
    # 40k: a group of the one drawn pair, the same pair the pairs form draws
    assert run("mathshepherd", *common[:-2], "--output-dir", tmp_path / "g40", "--groups") == 0
    assert run("mathshepherd", *common[:-2], "--output-dir", tmp_path / "p40") == 0
    assert expanded_texts(outputs(tmp_path / "g40")[0]) == pair_texts(outputs(tmp_path / "p40")[0])
    # the group form feeds preprocess_pairs.py --groups and the trainer's dataset: the same pairs again
    build_shard([str(tmp_path / "groups" / "train.jsonl")], str(tmp_path / "shard"), kind="groups",
                keys=("prompt", "responses", "labels"), progress=False)
    dataset = GroupDataset(str(tmp_path / "shard"))
    assert int(dataset.table.pairs.sum()) == len(pairs)
    assert sum(len(expand_group(dataset[i])) for i in range(len(dataset))) == len(pairs)


def test_groups_refuse_a_pair_cap(tmp_path, capfd):
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path / "x", "--groups",
               "--max-pairs-per-question", "2") == 2
    assert "--groups keeps every labelled pair" in capfd.readouterr().err
    with pytest.raises(ValueError, match="keeps every labelled pair"):
        rm_pairs.build_split_pairs([], [], train_style="all", test_style="all", seed=0, max_pairs=2,
                                   drops=rm_pairs.Drops(), train_form="groups")


def test_options_groups(tmp_path):
    assert run("options", "--input", LOGIQA2, "--output-dir", tmp_path / "g", "--groups", "--seed", 5) == 0
    assert run("options", "--input", LOGIQA2, "--output-dir", tmp_path / "p", "--seed", 5) == 0
    groups, _, _ = outputs(tmp_path / "g")
    pairs, _, _ = outputs(tmp_path / "p")
    assert all(len(g["responses"]) == 4 and sum(g["labels"]) == 1 for g in groups)
    assert expanded_texts(groups) == pair_texts(pairs)


class AnswersA(Backend):
    """Greedy answers A, sampled answers B: right for some questions, wrong for others."""

    def __init__(self, model):
        self.model, self.mode = model, "chat"

    def generate(self, prompts, params):
        letter = "A" if params.temperature == 0 else "B"
        return [Completion(f"{self.model}: the answer is {letter}.", "stop") for _ in prompts]

    def generate_chat(self, conversations, params):
        return self.generate([c[-1]["content"] for c in conversations], params)


def test_sampled_groups(tmp_path, monkeypatch):
    import megapmp.synth.llm as llm

    monkeypatch.setattr(llm, "make_backend", lambda backend, model, **kwargs: AnswersA(model))
    common = ["sampled", "--input", LOGIQA2, "--limit", "12", "--backend", "openai", "--base-url", "http://unused",
              "--model", "m1", "--model", "m2", "--grid", "0,1", "--test-fraction", "0", "--no-progress"]
    assert run(*common, "--output-dir", tmp_path / "g", "--groups") == 0
    assert run(*common, "--output-dir", tmp_path / "p") == 0
    groups, _, stats = outputs(tmp_path / "g")
    pairs, _, _ = outputs(tmp_path / "p")
    # 2 models x 2 grid values per question; both labels where one of the two letters is right
    assert groups and all(len(g["responses"]) == 4 and 0 < sum(g["labels"]) < 4 for g in groups)
    assert expanded_texts(groups) == pair_texts(pairs) and stats["train"]["pairs"] == len(pairs)
