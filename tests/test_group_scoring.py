"""Scoring candidates in group rows (RewardScorer layout "group", the default of tools/evaluate.py) against
the per-candidate rows ([P R] each, layout "duplicated") and the two-per-prompt rows (shared-prefix).

Tolerance 1e-5 absolute on rewards (fp32, CPU): the same tokens see the same context in every layout, only
the tensor shapes (and so the summation order) differ; measured ~1.5e-6 on this tiny model's rewards of
O(1) (tests/test_scoring_consistency.py measures the same between its layouts).
"""
import json
import random

import numpy as np
import pytest

from megapmp.data.packing import MAX_BRANCH
from megapmp.eval.reward_model import RewardScorer
from tests.test_eval_metrics import _evaluate_main, make_checkpoint, write_jsonl
from tests.test_scoring_consistency import codepmp_texts

ATOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("group_scoring_run"))


def scores(run_dir, layout, prompts, responses, **kwargs):
    scorer = RewardScorer.load(run_dir, progress=False, layout=layout, **kwargs)
    return scorer.score(prompts, responses), scorer


def test_group_rows_score_like_per_candidate_rows(run_dir, one_thread):
    prompts, responses = codepmp_texts(48, seed=5)
    prompts = [prompts[i // 12] for i in range(48)]  # 4 questions x 12 candidates
    per_candidate, _ = scores(run_dir, "duplicated", prompts, responses)
    for layout, kwargs in (("group", {}), ("group", {"batch_tokens": 700}), ("shared-prefix", {})):
        got, scorer = scores(run_dir, layout, prompts, responses, **kwargs)
        np.testing.assert_allclose(got, per_candidate, rtol=0, atol=ATOL, err_msg=f"{layout} {kwargs}")
    assert scorer.describe()["attention_backend"] == "segmented"
    assert len(set(per_candidate.tolist())) == 48  # distinct rewards: equality is not a coincidence


def test_flex_scores_group_rows_like_per_candidate_rows(run_dir, one_thread):
    """FlexAttention (forward only on a CPU) on group rows padded to a power of two, as the scorer pads them
    for a compiled flex on a GPU."""
    prompts, responses = codepmp_texts(12, seed=6)
    prompts = [prompts[i // 6] for i in range(12)]
    want, _ = scores(run_dir, "duplicated", prompts, responses)
    got, scorer = scores(run_dir, "group", prompts, responses, attention_backend="flex")
    assert scorer.model.attention_backend == "flex"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_a_set_larger_than_a_forward_or_the_branch_ids_is_cut_with_the_prompt_repeated(run_dir, one_thread):
    n = MAX_BRANCH + 9  # more responses than one segment's branch ids
    prompts = ["Pick the right one."] * n
    responses = [f"option {i}: {'x' * (i % 7)}" for i in range(n)]
    want, _ = scores(run_dir, "duplicated", prompts, responses)
    for batch_tokens in (16384, 300):  # one segment per 127 responses; many forwards
        got, _ = scores(run_dir, "group", prompts, responses, batch_tokens=batch_tokens)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_overlong_responses_are_cut_like_in_every_layout(run_dir, one_thread):
    prompts = ["p " * 20] * 4  # 40 tokens: only the second response overflows 80
    responses = ["short", "y " * 60, "z", "w " * 10]
    want, per_candidate = scores(run_dir, "duplicated", prompts, responses, max_length=80)
    got, scorer = scores(run_dir, "group", prompts, responses, max_length=80)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert scorer.truncated == per_candidate.truncated == 1


def test_evaluate_best_of_n_and_multiple_choice_default_to_group_rows(run_dir, tmp_path, one_thread):
    # distinct texts: identical ones would tie in one layout and differ by an ulp in another, and BoN breaks
    # ties at random
    rng = random.Random(0)
    sets = [{"id": f"q{i}", "prompt": f"Question {i}: what is {i} squared?",
             "candidates": [{"response": f"Step {j}: it is {i * i + rng.choice([0, 1, 2])}.", "correct": j % 3 == 0}
                            for j in range(9)]} for i in range(6)]
    data = write_jsonl(tmp_path / "cands.jsonl", sets)
    reports = {}
    for layout in ("group", "duplicated"):
        extra = [] if layout == "group" else ["--layout", layout]
        out = tmp_path / f"bon_{layout}.json"
        assert _evaluate_main(["best-of-n", "--model", str(run_dir), "--data", str(data), "--output", str(out),
                               "--mc-draws", "0", "--save-scores", str(tmp_path / f"{layout}.jsonl"), "--no-progress",
                               *extra]) == 0
        reports[layout] = json.loads(out.read_text())
    assert reports["group"]["model"]["layout"] == "group"  # the default
    saved = {k: [json.loads(x)["scores"] for x in (tmp_path / f"{k}.jsonl").read_text().splitlines()] for k in reports}
    np.testing.assert_allclose(np.array(saved["group"]), np.array(saved["duplicated"]), rtol=0, atol=ATOL)
    assert [r["accuracy"] for r in reports["group"]["results"]["rows"]] == \
        pytest.approx([r["accuracy"] for r in reports["duplicated"]["results"]["rows"]])

    logiqa = write_jsonl(tmp_path / "dev.txt", [
        {"id": i, "answer": i % 4, "text": f"Passage {i}.", "question": "Which?", "options": ["a", "bb", "ccc", "d"],
         "type": {}} for i in range(6)])
    mc = {}
    for layout in ("group", "duplicated"):
        out = tmp_path / f"mc_{layout}.json"
        assert _evaluate_main(["multiple-choice", "--model", str(run_dir), "--data", str(logiqa), "--output", str(out),
                               "--layout", layout, "--save-scores", str(tmp_path / f"mc_{layout}.jsonl"),
                               "--no-progress"]) == 0
        mc[layout] = [json.loads(x)["scores"] for x in (tmp_path / f"mc_{layout}.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array(mc["group"]), np.array(mc["duplicated"]), rtol=0, atol=ATOL)


def test_bench_scoring_runs_every_layout_and_agrees_on_rewards():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "tools" / "bench_scoring.py"), "--n-values", "4,16",
                           "--questions", "2", "--repeats", "1", "--hidden", "64", "--layers", "1"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *rows, summary = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["n"] for r in rows] == [4, 16] and rows[1]["candidates"] == 32
    for row in rows:
        for layout in ("group", "shared-prefix", "duplicated"):
            assert row[layout]["seconds_median"] > 0
            assert row[layout]["max_abs_reward_diff_vs_per_candidate"] < ATOL
        assert row["tokens_per_candidate"]["group_one_prompt_per_question"] < row["tokens_per_candidate"]["duplicated"]
    assert set(summary["speedup_vs_per_candidate"]) == {"group", "shared-prefix"}


def test_rm_accuracy_on_a_group_shard_scores_every_labelled_pair(tmp_path, one_thread):
    from megapmp.data.datasets import GroupDataset
    from megapmp.data.preprocess import build_shard

    records = [{"prompt": f"What is {i} + {i}?", "responses": [f"{2 * i}", f"{2 * i + 1}", f"It is {2 * i}."],
                "labels": [True, False, True]} for i in range(5)]
    write_jsonl(tmp_path / "g.jsonl", records)
    build_shard([str(tmp_path / "g.jsonl")], str(tmp_path / "g"), kind="groups", keys=("prompt", "responses", "labels"),
                progress=False)
    run_dir = make_checkpoint(tmp_path / "run", shard=str(tmp_path / "g"))
    out = tmp_path / "acc.json"
    assert _evaluate_main(["rm-accuracy", "--model", str(run_dir), "--data", str(tmp_path / "g"), "--output", str(out),
                           "--no-progress"]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["pairs"] == int(GroupDataset(str(tmp_path / "g")).table.pairs.sum()) == 10
