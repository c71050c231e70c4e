"""tools/make_gsm8k_pairs.py: one arithmetic step corrupted, the error carried forward, the final answer wrong.

Fixtures are hand-written GSM8K-style solutions (no GSM8K text in the repository)."""

import json
import random
import re
from fractions import Fraction

import pytest

from tool_loader import load_tool

mg = load_tool("make_gsm8k_pairs")

CHAIN_Q = ("Mara has 14 stickers. She buys 3 packs with 8 stickers each, then gives 11 stickers to her brother. "
           "How many stickers does she have now?")
CHAIN_A = ("The packs hold 3 * 8 = <<3*8=24>>24 stickers.\n"
           "Mara then has 14 + 24 = <<14+24=38>>38 stickers.\n"
           "After giving some away she has 38 - 11 = <<38-11=27>>27 stickers.\n"
           "#### 27")

MONEY_Q = "A lamp costs $12.50 and a desk costs 96 times as much. Jo buys 2 desks and pays with 3 bills of $1,000. " \
          "How much change does Jo get?"
MONEY_A = ("One desk costs 12.50 * 96 = $<<12.50*96=1200>>1,200.\n"
           "Two desks cost 2 * 1,200 = $<<2*1200=2400>>2,400.\n"
           "Jo pays 3 * 1,000 = $<<3*1000=3000>>3,000.\n"
           "The change is 3,000 - 2,400 = $<<3000-2400=600>>600.\n"
           "#### 600")

# Step 1 does not feed the answer: corrupting it cannot make the final answer wrong.
INDEPENDENT_Q = "Ravi walks 7 km on Monday and cycles 13 km on each of 4 days. How far does he cycle?"
INDEPENDENT_A = ("There and back he walks 7 * 2 = <<7*2=14>>14 km, which is not cycling.\n"
                 "Cycling: 13 * 4 = <<13*4=52>>52 km.\n"
                 "#### 52")

FRACTION_Q = "A tank holds 120 liters. Two fifths leak out, then a quarter of the rest is used. How much is left?"
FRACTION_A = ("Leaked: 2/5 * 120 = <<2/5*120=48>>48 liters.\n"
              "Rest: 120 - 48 = <<120-48=72>>72 liters.\n"
              "Used: 72 / 4 = <<72/4=18>>18 liters.\n"
              "Left: 72 - 18 = <<72-18=54>>54 liters.\n"
              "#### 54")

LONG_Q = "A farm has 5 barns with 23 cows each and sells 19 cows, then buys 4 times as many calves as it sold. " \
         "Each animal eats 2 bales a week. How many bales a week are needed?"
LONG_A = ("Cows: 5 * 23 = <<5*23=115>>115.\n"
          "After selling: 115 - 19 = <<115-19=96>>96 cows.\n"
          "Calves bought: 4 * 19 = <<4*19=76>>76.\n"
          "Animals: 96 + 76 = <<96+76=172>>172.\n"
          "Bales: 172 * 2 = <<172*2=344>>344 bales a week.\n"
          "#### 344")

NO_EQUATIONS_Q = "Lena has 3 red pens and no others. How many pens does she have?"
NO_EQUATIONS_A = "She has only the red pens, so she has 3 pens.\n#### 3"

NUMBER = re.compile(r"(?<![\d.])(?<!\d,)(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def numbers(text):
    return [(m.start(), Fraction(m.group().replace(",", ""))) for m in NUMBER.finditer(text)]


def test_expression_parser_is_exact():
    ev = lambda s: mg.evaluate(mg.tokenize_expr(s))
    assert ev("3/5*400") == 240
    assert ev("2*4*50*.01") == 4
    assert ev("(2+3)**2 - -1") == 26
    assert ev("1,200*2") == 2400
    assert ev("10/4") == Fraction(5, 2)
    assert ev("5x") is None and ev("3+") is None and ev("4/0") is None and ev("") is None


def test_forced_corruption_carries_the_error_forward():
    rejected, result = mg.corrupt_solution(CHAIN_Q, CHAIN_A, random.Random(0), step=0, new_value=25)
    assert rejected == ("The packs hold 3 * 8 = 25 stickers.\n"
                        "Mara then has 14 + 25 = 39 stickers.\n"
                        "After giving some away she has 39 - 11 = 28 stickers.\n"
                        "#### 28")
    assert [(i, int(o), int(n)) for i, o, n in result.changed] == [(0, 24, 25), (1, 38, 39), (2, 27, 28)]
    assert mg.remove_annotations(CHAIN_A).endswith("#### 27")


@pytest.mark.parametrize("question,solution", [(CHAIN_Q, CHAIN_A), (MONEY_Q, MONEY_A), (FRACTION_Q, FRACTION_A),
                                               (LONG_Q, LONG_A)])
@pytest.mark.parametrize("seed", range(6))
def test_corruption_changes_exactly_the_step_and_its_dependents(question, solution, seed):
    rejected, result = mg.corrupt_solution(question, solution, random.Random(seed))
    assert rejected is not None, result
    chosen = mg.remove_annotations(solution)
    old_values = {old for _, old, _ in result.changed}
    mapping = {old: new for _, old, new in result.changed}
    got, want = numbers(chosen), numbers(rejected)
    assert len(got) == len(want), (chosen, rejected)
    differing = [i for i, ((_, a), (_, b)) in enumerate(zip(got, want)) if a != b]
    # Exactly the printed numbers equal to a changed step's old result differ, each now its new value.
    assert differing == [i for i, (_, a) in enumerate(got) if a in old_values]
    assert all(want[i][1] == mapping[got[i][1]] for i in differing)
    # The first difference is the corrupted step's printed result: its operands are untouched.
    steps = mg.parse_steps(solution)
    k = result.step
    assert steps[k].value == result.old and result.new != result.old
    assert got[differing[0]][1] == result.old
    row = solution[: steps[k].start].count("\n")
    before, after = chosen.splitlines()[row], rejected.splitlines()[row]
    assert before.split("=")[0] == after.split("=")[0]  # same operands: only the result is wrong
    # Every later step that used a changed value was recomputed from the new values.
    for i, old, new in result.changed[1:]:
        assert i > k
        tokens = [["num", t[1], mapping.get(t[2], t[2])] if t[0] == "num" else t for t in steps[i].tokens]
        assert mg.evaluate(tokens) == new
    # The final answer is wrong.
    final = mg.final_answer(solution)
    assert mg.final_answer(rejected) == mapping[final] != final
    assert rejected.splitlines()[-1].startswith("#### ")


def test_money_formatting_is_kept():
    rejected, result = mg.corrupt_solution(MONEY_Q, MONEY_A, random.Random(0), step=1, new_value=2500)
    assert "Two desks cost 2 * 1,200 = $2,500." in rejected
    assert "The change is 3,000 - 2,500 = $500." in rejected
    assert rejected.endswith("#### 500")
    assert mg.format_like(Fraction(5, 2), "2.50") == "2.50"
    assert mg.format_like(Fraction(1234), "1,200") == "1,234"
    assert mg.format_like(Fraction(1, 4), ".5") == ".25"


def test_step_not_feeding_the_answer_is_not_used():
    rejected, reason = mg.corrupt_solution(INDEPENDENT_Q, INDEPENDENT_A, random.Random(0), step=0)
    assert rejected is None and reason == "no_valid_corruption"
    for seed in range(5):
        rejected, result = mg.corrupt_solution(INDEPENDENT_Q, INDEPENDENT_A, random.Random(seed))
        assert result.step == 1 and mg.final_answer(rejected) != 52


def test_ambiguous_values_are_not_corrupted():
    # 18 is both a question number and a result: a later 18 could be either, so that step is not eligible.
    q = "Each of 18 boxes holds 2 balls. How many balls?"
    a = "Balls: 18 * 1 = <<18*1=18>>18, doubled: 18 * 2 = <<18*2=36>>36.\n#### 36"
    rejected, result = mg.corrupt_solution(q, a, random.Random(0), step=0)
    assert rejected is None and result == "no_eligible_step"


def test_example_without_equations_is_skipped():
    rejected, reason = mg.corrupt_solution(NO_EQUATIONS_Q, NO_EQUATIONS_A, random.Random(0))
    assert rejected is None and reason == "no_equations"


def test_cli_writes_pairs_and_counts_skips(tmp_path, capsys):
    source = tmp_path / "train.jsonl"
    records = [{"question": CHAIN_Q, "answer": CHAIN_A}, {"question": NO_EQUATIONS_Q, "answer": NO_EQUATIONS_A},
               {"question": LONG_Q, "answer": LONG_A}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, stats_path = tmp_path / "pairs.jsonl", tmp_path / "stats.json"
    assert mg.main(["--input", str(source), "--output", str(out), "--seed", "3", "--stats", str(stats_path),
                    "--no-progress"]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["gsm8k-train-1", "gsm8k-train-3"]
    stats = json.loads(stats_path.read_text())
    assert stats["questions"] == 3 and stats["pairs"] == 2 and stats["skipped"]["no_equations"] == 1
    for p, r in zip(pairs, (records[0], records[2])):
        assert p["prompt"] == r["question"] and p["chosen"] == mg.remove_annotations(r["answer"])
        assert "<<" not in p["rejected"] and p["rejected"] != p["chosen"]
        assert p["corrupted_final_answer"] != p["final_answer"]
        assert p["changed_steps"][0]["step"] == p["corrupted_step"]
    # Same seed, same pairs; --limit does not change the pairs it keeps.
    again = tmp_path / "again.jsonl"
    assert mg.main(["--input", str(source), "--output", str(again), "--seed", "3", "--limit", "1",
                    "--no-progress"]) == 0
    assert again.read_text().splitlines() == out.read_text().splitlines()[:1]


def test_cli_refuses_a_test_split(tmp_path, capsys):
    source = tmp_path / "test.jsonl"
    source.write_text(json.dumps({"question": CHAIN_Q, "answer": CHAIN_A}) + "\n")
    assert mg.main(["--input", str(source), "--output", str(tmp_path / "p.jsonl"), "--no-progress"]) == 1
    assert "test split" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_hostile_annotations_are_skipped_not_a_traceback(tmp_path, capsys):
    """Deeply nested parentheses (a RecursionError before), a run of unary signs, a 400-digit amount and an
    exponent-notation answer are opaque steps: the question is skipped and counted, the run goes on."""
    huge = "1" + "0" * 400 + ".5"
    answers = ["She has <<" + "(" * 3000 + "2" + ")" * 3000 + "=2>>2 apples.\n#### 2",
               "He has <<" + "-" * 3000 + "2=2>>2 pears.\n#### 2",
               f"It costs {huge} coins, and <<{huge}+1=1{'0' * 400}1.5>>1{'0' * 400}1.5 with the fee.\n#### 1{'0' * 400}1.5",
               "They have <<3*4=12>>12 cans.\n#### 1e999999999"]
    source = tmp_path / "train.jsonl"
    records = [{"question": f"Question {i}?", "answer": a} for i, a in enumerate(answers)]
    records.append({"question": CHAIN_Q, "answer": CHAIN_A})
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats_path = tmp_path / "stats.json"
    assert mg.main(["--input", str(source), "--output", str(tmp_path / "pairs.jsonl"), "--stats", str(stats_path),
                    "--no-progress"]) == 0
    stats = json.loads(stats_path.read_text())
    assert stats["questions"] == 5 and stats["pairs"] == 1 and stats["skipped_total"] == 4
    assert mg.evaluate(mg.tokenize_expr("(" * 40 + "2" + ")" * 40)) == 2  # ordinary nesting still evaluates
