"""Evaluation: metrics against hand-computed values and brute force, answer extraction, data adapters on
hand-written fixtures (and parsing counts of the real files when MEGAPMP_DATA has them), the reward scorer,
and tools/evaluate.py end to end on a tiny random checkpoint."""

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from megapmp.eval import metrics
from megapmp.eval.answers import (extract_gsm8k_answer, extract_math_answer, gsm8k_equivalent, is_correct,
                                  last_boxed, math_equivalent, normalize_math_answer, parse_number)
from megapmp.eval.formats import (PASSAGE_TEMPLATE, DataError, detect_format, load_candidate_sets,
                                   load_codepmp_bon, load_codeprefbench, load_gsm8k_solutions, load_logiqa2,
                                   load_pairs, load_reclor)
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEGAPMP_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------------
# pairwise metrics


def test_rm_accuracy_counts_ties_as_wrong():
    assert metrics.rm_accuracy([1, 2, 3, 5], [0, 2, 4, 1]) == 0.5
    assert np.isnan(metrics.rm_accuracy([], []))
    s = metrics.pair_summary([1, 2, 3, 5], [0, 2, 4, 1])
    assert (s["correct"], s["ties"], s["wrong"], s["pairs"]) == (2, 1, 1, 4)
    assert s["mean_margin"] == pytest.approx((1 + 0 - 1 + 4) / 4)
    with pytest.raises(ValueError):
        metrics.rm_accuracy([1, 2], [1])


def test_codeprefbench_counts_ties_as_half():
    r_c = [3, 1, 2, 2, 0]
    r_r = [1, 1, 5, 1, 0]
    out = metrics.codeprefbench_accuracy(r_c, r_r, ["a", "a", "a", "b", "b"])
    assert out["aspects"]["a"] == {"pairs": 3, "accuracy": pytest.approx((1 + 0.5 + 0) / 3), "ties": 1}
    assert out["aspects"]["b"] == {"pairs": 2, "accuracy": pytest.approx((1 + 0.5) / 2), "ties": 1}
    assert out["overall"] == pytest.approx(3 / 5)
    assert out["macro"] == pytest.approx((0.5 + 0.75) / 2)


def test_multiple_choice_tie_rules():
    scores = [[1, 3, 2], [2, 2, 1], [5, 1, 1], [0, 0, 0], [1, 4, 4]]
    answers = [1, 0, 0, 2, 1]
    out = metrics.multiple_choice_accuracy(scores, answers)
    assert out["accuracy"] == pytest.approx(2 / 5)  # a tie at the top is wrong
    assert out["first_max"] == pytest.approx(4 / 5)  # q1 (first of the tie is right), q4 (first of the tie)
    assert out["expected_random_tiebreak"] == pytest.approx((1 + 0.5 + 1 + 1 / 3 + 0.5) / 5)
    assert out["top_ties"] == 3
    with pytest.raises(ValueError):
        metrics.multiple_choice_accuracy([[1, 2]], [2])


# ---------------------------------------------------------------------------------------------------
# Best-of-N


def brute_force(scores, correct, n):
    """Average over every n-subset of the expected correctness with ties at the top broken uniformly."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(scores)), n))
    for subset in subsets:
        top = max(scores[i] for i in subset)
        tied = [i for i in subset if scores[i] == top]
        total += sum(correct[i] for i in tied) / len(tied)
    return total / len(subsets)


def test_best_of_n_by_hand():
    # Four candidates scored 4 > 3 > 2 > 1, the middle two correct. N=2: of the 6 pairs, the 3 holding
    # the top-scored (wrong) one are wrong, {3,2}, {3,1}, {2,1} are right -> 1/2.
    scores, correct = [4, 3, 2, 1], [0, 1, 1, 0]
    assert metrics.best_of_n_question(scores, correct, 1) == pytest.approx(0.5)
    assert metrics.best_of_n_question(scores, correct, 2) == pytest.approx(0.5)
    assert metrics.best_of_n_question(scores, correct, 3) == pytest.approx(0.25)  # only {3,2,1} is right
    assert metrics.best_of_n_question(scores, correct, 4) == 0.0
    # Ties: a and b tie at the top, only a is correct. Pairs {a,b}: 1/2, {a,c}: 1, {b,c}: 0 -> 1/2.
    assert metrics.best_of_n_question([1, 1, 0], [1, 0, 0], 2) == pytest.approx(0.5)
    assert metrics.best_of_n_question([1, 1, 0], [1, 0, 0], 3) == pytest.approx(0.5)
    assert metrics.best_of_n_question([1, 1, 0], [1, 0, 0], 1) == pytest.approx(1 / 3)
    # All tied: any N gives the fraction correct.
    for n in (1, 2, 3, 4):
        assert metrics.best_of_n_question([7, 7, 7, 7], [1, 0, 1, 1], n) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.best_of_n_question([1, 2], [1, 0], 3)


def test_best_of_n_exact_equals_brute_force_enumeration():
    rng = np.random.default_rng(7)
    for _ in range(40):
        m = int(rng.integers(1, 9))
        scores = rng.integers(0, 4, m).astype(float).tolist()  # few distinct values: many ties
        correct = rng.integers(0, 2, m).astype(bool).tolist()
        for n in range(1, m + 1):
            assert metrics.best_of_n_question(scores, correct, n) == pytest.approx(brute_force(scores, correct, n),
                                                                                  abs=1e-12)


def test_best_of_n_large_m_is_exact_and_in_range():
    rng = np.random.default_rng(0)
    scores, correct = rng.normal(size=256), rng.random(256) < 0.3
    order = np.argsort(scores)
    # Without ties, N = M picks the top-scored candidate; N = 1 is the fraction correct.
    assert metrics.best_of_n_question(scores, correct, 256) == float(correct[order[-1]])
    assert metrics.best_of_n_question(scores, correct, 1) == pytest.approx(correct.mean())
    # P(j is the max of a random n-subset) sums to 1 over j.
    for n in (2, 16, 128):
        assert metrics.best_of_n_question(scores, np.ones(256, bool), n) == pytest.approx(1.0)


def _question_set(seed=3, questions=30):
    rng = np.random.default_rng(seed)
    scores, correct = [], []
    for _ in range(questions):
        m = int(rng.integers(4, 10))
        scores.append(rng.integers(0, 5, m).astype(float))
        correct.append(rng.random(m) < 0.4)
    return scores, correct


def test_monte_carlo_agrees_with_exact_within_three_standard_errors():
    scores, correct = _question_set()
    for n in (1, 2, 4):
        exact = metrics.best_of_n_exact(scores, correct, n)
        mc = metrics.best_of_n_monte_carlo(scores, correct, n, draws=2000, seed=11)
        assert mc.questions == exact.questions == 30
        assert mc.stderr > 0
        assert abs(mc.value - exact.value) < 3 * mc.stderr, (n, mc, exact)
        # The exact per-question mean and its s.e. across questions.
        per_q = [brute_force(list(s), list(c), n) for s, c in zip(scores, correct)]
        assert exact.value == pytest.approx(np.mean(per_q))
        assert exact.stderr == pytest.approx(np.std(per_q, ddof=1) / np.sqrt(len(per_q)))


def test_single_draw_protocol_is_the_papers_and_reproducible():
    scores, correct = _question_set(seed=5)
    n = 4
    first = metrics.best_of_n_single_draw(scores, correct, n)
    assert first == metrics.best_of_n_single_draw(scores, correct, n)
    # Re-implemented as CodePMP's script does it: random.seed(123); random.sample per question; stable sort.
    rng = random.Random(123)
    outcomes = []
    for s, c in zip(scores, correct):
        items = rng.sample([{"i": i, "reward": float(s[i])} for i in range(len(s))], n)
        items.sort(key=lambda x: x["reward"], reverse=True)
        outcomes.append(bool(c[items[0]["i"]]))
    assert first.value == pytest.approx(np.mean(outcomes))
    assert first.questions == len(scores)


def test_curve_baselines_and_n_values():
    assert metrics.default_n_values(4) == [1, 2, 4]
    assert metrics.default_n_values(6) == [1, 2, 4, 6]
    assert metrics.default_n_values(1) == [1]
    assert metrics.default_n_values(300)[-1] == 256
    correct = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert metrics.random_pick(correct) == pytest.approx((0.25 + 0.5 + 0) / 3)
    # oracle N=2: 1 - C(3,2)/C(4,2) = 1/2; 1 - C(2,2)/C(4,2) = 5/6; 0
    assert metrics.oracle_curve(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    scores = [np.arange(4.0), np.arange(4.0), np.arange(4.0)]
    curve = metrics.best_of_n_curve(scores, correct, mc_draws=50)
    assert [r["n"] for r in curve["rows"]] == [1, 2, 4]
    assert curve["rows"][0]["accuracy"] == pytest.approx(curve["random_pick"])
    assert curve["rows"][-1]["oracle"] == pytest.approx(2 / 3)
    assert curve["mixed_questions"] == 2
    # Questions with fewer candidates than N are left out of that row.
    short = metrics.best_of_n_exact([np.arange(2.0), np.arange(4.0)], [[1, 0], [0, 0, 0, 1]], 4)
    assert short.questions == 1 and short.value == 1.0


# ---------------------------------------------------------------------------------------------------
# answers


@pytest.mark.parametrize("text,answer", [
    ("She pays 5 * 4 = 20 dollars.\n#### 20", "20"),
    ("Total: $1,250.\n#### 1,250", "1250"),
    ("So the result is 3.5 liters.", "3.5"),
    ("First 12, then 7 more.\nA: 19", "19"),
    ("The answer is 42. (Check: 6 * 7 = 42.) Extra 3", "42"),
    ("#### -5", "-5"),
    ("no digits here", None),
])
def test_gsm8k_extraction(text, answer):
    assert extract_gsm8k_answer(text) == answer


def test_gsm8k_equivalence():
    assert gsm8k_equivalent("18.00", "18") and gsm8k_equivalent("1,000", "1000")
    assert gsm8k_equivalent("0.1", ".1") and not gsm8k_equivalent("18", "19")
    assert not gsm8k_equivalent(None, "1")
    assert parse_number("$12.50") == Fraction(25, 2) and parse_number("45%") == 45
    assert parse_number("\\frac{3}{4}") == Fraction(3, 4) and parse_number("abc") is None


@pytest.mark.parametrize("text,boxed", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{a{b}c} then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
    ("thus \\boxed 7", "7"),
    ("\\fbox{x+1}", "x+1"),
    ("nothing boxed", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("a,b,equal", [
    ("\\dfrac{1}{2}", "\\frac12", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("x = 5", "5", True),
    ("10.", "10", True),
    ("3/4", "\\tfrac{3}{4}", True),
    ("90^\\circ", "90", True),
    ("\\$5", "5", True),
    ("5\\%", "5", True),
    ("\\text{(A)}", "(A)", True),
    ("1,000", "1000", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),  # equal as numbers
    ("x+1", "1+x", False),  # no symbolic algebra
    ("\\frac{1}{3}", "0.33", False),
])
def test_math_equivalence(a, b, equal):
    assert math_equivalent(a, b) is equal


def test_is_correct_detects_answer_type():
    gold_gsm = "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    assert is_correct("3 and 4 make 7.\n#### 7", gold_gsm) and not is_correct("#### 8", gold_gsm)
    gold_math = "The sum is $\\boxed{\\dfrac{3}{4}}$."
    assert is_correct("So we get \\boxed{\\frac34}.", gold_math)
    assert is_correct("The answer is: 0.75", gold_math)
    assert not is_correct("So \\boxed{\\frac{4}{3}}", gold_math)
    assert extract_math_answer("\\frac{1}{2}") == "\\frac{1}{2}"  # a bare gold answer
    assert is_correct("\\boxed{2}", "2", "math") and normalize_math_answer(None) is None


# ---------------------------------------------------------------------------------------------------
# adapters on hand-written fixtures


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        Path(path).write_text(text)
    return path


def test_gsm8k_solutions_adapter(tmp_path):
    keys = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    record = {"question": "Kim has 2 bags of 5 plums. How many plums?", "ground_truth": "2 * 5 = 10\nA: 10"}
    record.update({k: {"solution": f"{k}: 2 * 5 = {10 + i % 2}\nA: {10 + i % 2}", "is_correct": i % 2 == 0}
                   for i, k in enumerate(keys)})
    path = write_jsonl(tmp_path / "sol.jsonl", [record, record])
    assert detect_format(path) == "gsm8k-solutions"
    sets = load_gsm8k_solutions(path)
    assert len(sets) == 2 and sets[0].prompt == record["question"]
    assert sets[0].correct == [True, False, True, False] and sets[0].responses[1].startswith("6b_verification")
    assert len(load_gsm8k_solutions(path, limit=1)) == 1
    del record["175b_verification"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=r"bad.jsonl:1 field '175b_verification': missing field"):
        load_gsm8k_solutions(bad)


def test_candidates_adapter(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "q1", "prompt": "P1", "candidates": [{"response": "a", "correct": True}, {"response": "b", "correct": False}]},
        {"prompt": "P2", "candidates": [{"response": "c", "correct": False}]},
    ])
    fmt, sets = load_candidate_sets(path)
    assert fmt == "candidates" and [s.id for s in sets] == ["q1", "line2"]
    assert sets[0].responses == ["a", "b"] and sets[0].answer == 0 and sets[1].answer is None
    (tmp_path / "broken.jsonl").write_text('{"prompt": "P", "candidates": [{"response": "a", "correct": "yes"}]}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:1 field 'candidates\[0\].correct'"):
        load_candidate_sets(tmp_path / "broken.jsonl", "candidates")
    (tmp_path / "notjson.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"notjson.jsonl:1: malformed JSON"):
        load_candidate_sets(tmp_path / "notjson.jsonl", "candidates")
    with pytest.raises(DataError, match="no such file"):
        load_candidate_sets(tmp_path / "missing.jsonl", "candidates")


def test_codepmp_bon_adapter_groups_lines_by_id(tmp_path):
    shards = tmp_path / "bon"
    shards.mkdir()
    gsm_gold = "She has 4 * 3 = <<4*3=12>>12 eggs.\n#### 12"
    math_gold = "Hence $\\boxed{\\frac{1}{2}}$."
    # CodePMP order: by the number after the last "_": shard_2 before shard_10.
    write_jsonl(shards / "gsm8k_test_10.json", [
        {"id": "g1", "input": "### Instruction:\nQ1\n\n### Response:", "output": "4 * 3 = 12\n#### 12",
         "gold_answer": gsm_gold},
        {"id": "m1", "input": "Q2", "output": ["so \\boxed{0.5}", "so \\boxed{\\dfrac12}", "The answer is 2"],
         "gold_answer": math_gold},
    ])
    write_jsonl(shards / "gsm8k_test_2.json", [
        {"id": "g1", "input": "### Instruction:\nQ1\n\n### Response:", "output": "It is 13.", "gold_answer": gsm_gold},
    ])
    assert detect_format(shards) == "codepmp-bon"
    sets = load_codepmp_bon(shards)
    assert [s.id for s in sets] == ["g1", "m1"]
    assert sets[0].responses == ["It is 13.", "4 * 3 = 12\n#### 12"] and sets[0].correct == [False, True]
    assert sets[0].meta["answer_type"] == "gsm8k" and sets[1].meta["answer_type"] == "math"
    assert sets[1].correct == [True, True, False]
    assert len(load_codepmp_bon(shards, limit=1)) == 1
    write_jsonl(shards / "gsm8k_test_11.json", [{"id": "g1", "input": "### Instruction:\nQ1\n\n### Response:",
                                                  "output": "x", "gold_answer": "#### 99"}])
    with pytest.raises(DataError, match="gsm8k_test_11.json:1: id 'g1' has gold_answer"):
        load_codepmp_bon(shards)


def test_logiqa2_and_reclor_adapters(tmp_path):
    logiqa = write_jsonl(tmp_path / "dev.txt", [
        {"id": 5, "answer": 2, "text": "All cats purr.", "question": "Which follows?",
         "options": ["A dog purrs.", "No cat purrs.", "Some purring animal is a cat.", "Cats bark."], "type": {}},
    ])
    assert detect_format(logiqa) == "logiqa2"
    (s,) = load_logiqa2(logiqa)
    assert s.id == "5" and s.answer == 2 and len(s.responses) == 4
    assert s.prompt == ("Instruction: Please answer the following questions based on the passages.\n\n"
                        "Passage: All cats purr.\n\nQuestion: Which follows?\n\nResponse:")
    assert s.prompt == PASSAGE_TEMPLATE.replace("{passage}", "All cats purr.").replace("{question}", "Which follows?")
    reclor_records = [{"context": "Rain wets roads.", "question": "What follows?", "answers": ["a", "b", "c", "d"],
                       "label": 3, "id_string": "train_0"}]
    array = tmp_path / "val.json"
    array.write_text(json.dumps(reclor_records))
    assert detect_format(array) == "reclor"
    (r,) = load_reclor(array)
    assert r.id == "train_0" and r.answer == 3 and "Passage: Rain wets roads." in r.prompt
    assert load_reclor(write_jsonl(tmp_path / "val.jsonl", reclor_records))[0].answer == 3
    del reclor_records[0]["label"]
    array.write_text(json.dumps(reclor_records))
    with pytest.raises(DataError, match="unlabelled"):
        load_reclor(array)
    bad = write_jsonl(tmp_path / "bad.txt", [{"id": 1, "answer": 4, "text": "t", "question": "q",
                                               "options": ["a", "b", "c", "d"]}])
    with pytest.raises(DataError, match="bad.txt:1 field 'answer': answer index 4 outside"):
        load_logiqa2(bad)


def test_codeprefbench_and_pairs_adapters(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    write_jsonl(bench / "correctness-alignment.jsonl.gz", [
        {"task_id": "T/0", "instruction": "Add.", "choices": ["def f(a,b): return a-b", "def f(a,b): return a+b"],
         "gt_choice": 1},
        {"task_id": "T/1", "instruction": "Neg.", "choices": ["def g(x): return -x", "def g(x): return x"],
         "gt_choice": 0},
    ], gz=True)
    write_jsonl(bench / "efficiency-alignment.jsonl.gz", [
        {"task_id": "T/2", "instruction": "Sum.", "choices": ["sum(xs)", "loop"], "gt_choice": 0}], gz=True)
    assert detect_format(bench / "correctness-alignment.jsonl.gz") == "codeprefbench"
    pairs = load_codeprefbench([bench])
    assert [(p.id, p.group) for p in pairs] == [("T/0", "correctness-alignment"), ("T/1", "correctness-alignment"),
                                                ("T/2", "efficiency-alignment")]
    assert pairs[0].chosen == "def f(a,b): return a+b" and pairs[0].rejected == "def f(a,b): return a-b"
    assert len(load_codeprefbench([bench], limit=1)) == 2  # per aspect
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                               {"query": "q", "better": "b", "worse": "w"}])
    assert detect_format(p) == "pairs"
    assert [(x.prompt, x.chosen, x.rejected) for x in load_pairs(p)] == [("p", "c", "r"), ("q", "b", "w")]


# ---------------------------------------------------------------------------------------------------
# the real evaluation data (parsing counts only), skipped where absent


def _real(relative):
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not present (set MEGAPMP_DATA to the shared data directory)")
    return path


def test_real_gsm8k_solutions_parse():
    sets = load_gsm8k_solutions(_real("gsm8k/example_model_solutions.jsonl"))
    assert len(sets) == 1319 and all(len(s.responses) == 4 for s in sets)
    assert sum(0 < sum(s.correct) < 4 for s in sets) == 731


def test_real_logiqa2_parses():
    sets = load_logiqa2(_real("logiqa2/dev.txt"))
    # 1,568 newline-terminated lines plus a last line without a newline: 1,569 questions.
    assert len(sets) == 1569 and all(len(s.responses) == 4 and s.answer is not None for s in sets)


def test_real_codeprefbench_parses():
    pairs = load_codeprefbench([_real("codeprefbench")])
    groups = [p.group for p in pairs]
    assert groups.count("correctness-alignment") == 660 and groups.count("efficiency-alignment") == 352


# ---------------------------------------------------------------------------------------------------
# the scorer and tools/evaluate.py on a tiny random checkpoint


def make_checkpoint(root: Path, seed: int = 0, shard: str | None = None) -> Path:
    """A one-step-old random tiny model saved as the trainer saves it, its trainer.json recording the
    training shard (a real one when ``shard`` is given, else a byte-tokenizer sidecar)."""
    from megapmp.checkpoint import save_checkpoint
    from megapmp.config import TrainConfig, model_preset
    from megapmp.data.shards import ShardMeta
    from megapmp.data.tokenizers import ByteTokenizer
    from megapmp.model import Qwen2RewardModel

    cfg = TrainConfig()
    cfg.model = model_preset("tiny")
    cfg.model.num_hidden_layers = 1
    if shard is None:
        tok = ByteTokenizer()
        meta = ShardMeta(kind="pairs", tokenizer=tok.identity(), vocab_size=tok.vocab_size, padded_vocab_size=384,
                         vocab_multiple=128, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype="uint16",
                         template={"name": "none", "text": "{prompt}"}, eos_policy="response")
        cfg.data.train = [str(root / "data" / "train")]
    else:
        meta = ShardMeta.load(shard)
        cfg.data.train = [shard]
        cfg.model.vocab_size = meta.padded_vocab_size
    torch.manual_seed(seed)
    model = Qwen2RewardModel(cfg.model)
    model.init_weights()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards spread enough that ties are unlikely
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    trainer_state = {"step": 3, "skipped_steps": 0, "consecutive_nonfinite": 0, "optimizer": {}, "loader": {},
                     "rng": {}, "config": asdict(cfg), "shard_meta": asdict(meta)}
    save_checkpoint(root / "checkpoints", 3, model_state=state, optimizer_tensors={}, trainer_state=trainer_state)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval_run"))


def test_scorer_matches_an_unpacked_forward(run_dir):
    from megapmp.eval.reward_model import RewardScorer
    from megapmp.model.attention import AttentionInputs

    scorer = RewardScorer.load(run_dir, progress=False)
    assert scorer.describe()["step"] == 3 and scorer.describe()["template"]["text"] == "{prompt}"
    prompts = ["Add two numbers.", "Add two numbers.", "Reverse a list.", "Add two numbers.", "Sort."]
    responses = ["def f(a, b): return a + b", "def f(a, b): return a - b", "xs[::-1]", "lambda a, b: b + a", "x"]
    got = scorer.score(prompts, responses)
    dup = RewardScorer.load(run_dir, progress=False, layout="duplicated", batch_tokens=64).score(prompts, responses)
    np.testing.assert_allclose(got, dup, atol=1e-5)
    for p, r, value in zip(prompts, responses, got):
        ids = list(p.encode()) + list(r.encode()) + [256]  # byte tokenizer, EOS appended
        x = torch.tensor([ids])
        attn = AttentionInputs.for_padded_causal([len(ids)], len(ids))
        with torch.no_grad():
            hidden = scorer.model(x, torch.arange(len(ids))[None], attn)
            expected = float(scorer.model.rewards(hidden)[0, -1])
        assert value == pytest.approx(expected, abs=1e-5)
    r_c, r_r = scorer.score_pairs(prompts[:2], responses[:2], responses[2:4])
    np.testing.assert_allclose(r_c, got[:2], atol=1e-5)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A checkpoint trained (nominally) on a shard with a BPE tokenizer and the codepmp template."""
    from megapmp.data.preprocess import build_shard

    root = tmp_path_factory.mktemp("bpe_run")
    write_jsonl(root / "pairs.jsonl", [{"prompt": f"Sum {i} and {i + 1}.", "chosen": f"return {i} + {i + 1}",
                                        "rejected": f"return {i} - {i + 1}"} for i in range(40)])
    build_shard([str(root / "pairs.jsonl")], str(root / "data" / "pairs"), tokenizer="bpe:300", template="codepmp",
                progress=False, workers=1)
    return make_checkpoint(root, shard=str(root / "data" / "pairs"))


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_hf_export_and_shard_score_like_the_checkpoint(which, run_dir, bpe_run, tmp_path):
    from megapmp.eval.reward_model import RewardScorer

    run = run_dir if which == "byte" else bpe_run
    prompts, chosen, rejected = ["Sum 1 and 2.", "Sum 3 and 4. café"], ["return 1 + 2", "return 3 + 4"], \
        ["return 1 - 2", "return 3 - 4"]
    scorer = RewardScorer.load(run, progress=False)
    r_c, r_r = scorer.score_pairs(prompts, chosen, rejected)
    if which == "bpe":
        assert scorer.describe()["template"]["name"] == "codepmp" and scorer.describe()["tokenizer"]["family"] == "hf"
        # The training shard's own tokens score like the texts (same tokenizer, template and EOS policy).
        from megapmp.data.datasets import PairDataset

        shard = PairDataset(str(run / "data" / "pairs"))
        s_c, s_r = scorer.score_token_pairs([shard[1], shard[3]])
        t_c, t_r = scorer.score_pairs(["Sum 1 and 2.", "Sum 3 and 4."], ["return 1 + 2", "return 3 + 4"],
                                      ["return 1 - 2", "return 3 - 4"])
        np.testing.assert_allclose(np.r_[s_c, s_r], np.r_[t_c, t_r], atol=1e-5)
    from megapmp.convert.export import export_to_hf

    export_to_hf(run, tmp_path / "hf")
    hf = RewardScorer.load(tmp_path / "hf", progress=False)
    # The byte run records EOS appended; the bpe shard has the default, no EOS (reward at the last token).
    assert hf.describe()["kind"] == "hf"
    assert hf.describe()["eos_policy"] == scorer.describe()["eos_policy"] == ("response" if which == "byte" else "none")
    assert hf.describe()["template"]["text"] == scorer.describe()["template"]["text"]
    h_c, h_r = hf.score_pairs(prompts, chosen, rejected)
    np.testing.assert_allclose(np.r_[h_c, h_r], np.r_[r_c, r_r], atol=1e-5)


def test_evaluate_rm_accuracy_end_to_end(run_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Return {i} plus one.", "chosen": f"return {i} + 1", "rejected": f"return {i} - 1"}
        for i in range(6)])
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "rm-accuracy", "--model", str(run_dir),
                           "--data", str(pairs), "--output", str(report_path), "--markdown", str(tmp_path / "r.md"),
                           "--plot", str(tmp_path / "r.png"), "--no-progress", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["task"] == "rm-accuracy" and report["data"]["format"] == "pairs"
    assert report["model"]["kind"] == "megapmp-checkpoint" and report["model"]["step"] == 3
    results = report["results"]
    assert results["pairs"] == 6 and results["correct"] + results["ties"] + results["wrong"] == 6
    assert results["accuracy"] == pytest.approx(results["correct"] / 6)
    assert "accuracy" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A bad file is a clear error, exit 1.
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": 3, "rejected": "r"}\n')
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "rm-accuracy", "--model", str(run_dir),
                           "--data", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "bad.jsonl:1 field 'chosen': expected a string, got int" in proc.stderr


@pytest.mark.parametrize("line, field, bad", [(2, "prompt", ""), (3, "chosen", " \n\t ")],
                         ids=["empty-prompt", "whitespace-response"])
def test_evaluate_refuses_a_record_preprocessing_refuses_in_its_words(line, field, bad, run_dir, tmp_path, capsys):
    """An empty prompt (a numpy broadcast error without file or line before) or a whitespace-only response
    (scored before, though preprocessing refuses it): the one-line FILE:LINE message preprocessing gives."""
    records = [{"prompt": f"Return {i} plus one.", "chosen": f"return {i} + 1", "rejected": f"return {i} - 1"}
               for i in range(4)]
    records[line - 1][field] = bad
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    expected = f"{pairs}:{line} field '{field}': empty field"
    assert _evaluate_main(["rm-accuracy", "--model", str(run_dir), "--data", str(pairs), "--output",
                           str(tmp_path / "r.json"), "--no-progress", "--threads", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"evaluate.py: error: {expected}"
    assert not (tmp_path / "r.json").exists()
    preprocess = load_tool("preprocess_pairs")
    assert preprocess.main(["--input", str(pairs), "--output-prefix", str(tmp_path / "shard"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {expected}"


def _evaluate_main(argv):
    return load_tool("evaluate").main(argv)


def test_evaluate_best_of_n_multiple_choice_and_codeprefbench(run_dir, tmp_path):
    rng = random.Random(0)
    sets = [{"id": f"q{i}", "prompt": f"Question {i}",
             "candidates": [{"response": f"answer {i}.{j}", "correct": rng.random() < 0.4} for j in range(8)]}
            for i in range(5)]
    data = write_jsonl(tmp_path / "cands.jsonl", sets)
    out = tmp_path / "bon.json"
    assert _evaluate_main(["best-of-n", "--model", str(run_dir), "--data", str(data), "--output", str(out),
                           "--markdown", str(tmp_path / "bon.md"), "--plot", str(tmp_path / "bon.png"),
                           "--mc-draws", "200", "--save-scores", str(tmp_path / "scores.jsonl"),
                           "--no-progress"]) == 0
    r = json.loads(out.read_text())["results"]
    assert [row["n"] for row in r["rows"]] == [1, 2, 4, 8] and r["questions"] == 5 and r["candidates"] == 40
    saved = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    scores = [np.array(s["scores"]) for s in saved]
    correct = [s["correct"] for s in saved]
    for row in r["rows"]:
        assert row["accuracy"] == pytest.approx(metrics.best_of_n_exact(scores, correct, row["n"]).value)
        assert abs(row["monte_carlo"] - row["accuracy"]) < 4 * row["monte_carlo_stderr"] + 1e-9
    assert (tmp_path / "bon.png").stat().st_size > 1000 and "| N |" in (tmp_path / "bon.md").read_text()

    logiqa = write_jsonl(tmp_path / "dev.txt", [
        {"id": i, "answer": i % 4, "text": f"Passage {i}.", "question": "Which?", "options": list("abcd"), "type": {}}
        for i in range(4)])
    assert _evaluate_main(["multiple-choice", "--model", str(run_dir), "--data", str(logiqa), "--output",
                           str(tmp_path / "mc.json"), "--no-progress"]) == 0
    mc = json.loads((tmp_path / "mc.json").read_text())["results"]
    assert mc["questions"] == 4 and mc["chance"] == 0.25 and 0 <= mc["accuracy"] <= 1

    bench = write_jsonl(tmp_path / "correctness-alignment.jsonl.gz", [
        {"task_id": f"T/{i}", "instruction": "Write f.", "choices": [f"def f(): return {i}", "pass"],
         "gt_choice": i % 2} for i in range(4)], gz=True)
    assert _evaluate_main(["codeprefbench", "--model", str(run_dir), "--data", str(bench), "--output",
                           str(tmp_path / "cpb.json"), "--no-progress"]) == 0
    cpb = json.loads((tmp_path / "cpb.json").read_text())["results"]
    assert list(cpb["aspects"]) == ["correctness-alignment"] and cpb["pairs"] == 4


def test_evaluate_rm_accuracy_on_a_shard_matches_the_texts(bpe_run, run_dir, tmp_path):
    prefix = bpe_run / "data" / "pairs"
    common = ["--limit", "10", "--no-progress"]
    assert _evaluate_main(["rm-accuracy", "--model", str(bpe_run), "--data", str(prefix), "--output",
                           str(tmp_path / "shard.json"), *common]) == 0
    assert _evaluate_main(["rm-accuracy", "--model", str(bpe_run), "--data", str(bpe_run / "pairs.jsonl"), "--output",
                           str(tmp_path / "text.json"), *common]) == 0
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("shard", "text")]
    assert [r["data"]["format"] for r in reports] == ["shard", "pairs"]
    shard, text = (r["results"] for r in reports)
    assert shard["pairs"] == text["pairs"] == 10
    assert shard["mean_margin"] == pytest.approx(text["mean_margin"], abs=1e-5)
    # A shard tokenized differently from the model's inputs is refused.
    assert _evaluate_main(["rm-accuracy", "--model", str(run_dir), "--data", str(prefix), "--output",
                           str(tmp_path / "x.json"), *common]) == 2


def test_evaluate_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        _evaluate_main(["best-of-n", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--format", "--output", "--markdown", "--plot", "--limit", "--n-values",
                 "--mc-draws", "--answer-type", "--template", "--eos-policy", "--batch-tokens"):
        assert flag in text
