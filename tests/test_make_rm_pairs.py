"""tools/make_rm_pairs.py: CodePMP's appendix-D recipes on fixtures in the real formats (tests/fixtures/:
Math-Shepherd's {input, label, task} with the 'ки' step tag, written from its dataset card; LogiQA 2.0 lines and a
ReClor JSON array, written by tests/fixtures/make_data.py from the formats megapmp.eval.formats reads).

Each recipe: the counts, the split by question with its no-leakage check, determinism under --seed, a malformed
record refused as FILE:LINE. The sampled recipe runs against scripted backends (exact, resumable) and once
against tools/serve_models.py on loopback.
"""
import json
import sys
from pathlib import Path

import pytest

from megapmp.synth import rm_pairs
from megapmp.synth.llm import Backend, Completion
from megapmp.synth.sampled import (ChoiceQuestion, ModelJudge, ModelSpec, RuleJudge, SamplingSettings, extract_choice,
                                   read_samples, sample_and_judge, sample_groups)
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
MATHSHEPHERD = FIXTURES / "mathshepherd_sample.jsonl"
LOGIQA2 = FIXTURES / "data" / "logiqa2" / "dev.txt"
RECLOR = FIXTURES / "reclor_sample.json"


TOOL = load_tool("make_rm_pairs")


def run(*args) -> int:
    return TOOL.main([str(a) for a in args])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def outputs(directory: Path):
    return read(directory / "train.jsonl"), read(directory / "test.jsonl"), json.loads((directory / "stats.json").read_text())


def assert_no_question_on_both_sides(train, test):
    assert not {p["group"] for p in train} & {p["group"] for p in test}
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}


# ---------------------------------------------------------------------------------------------------- mathshepherd


def test_mathshepherd_record_parsing():
    rec = read(MATHSHEPHERD)[0]
    question, solution, steps, task = rm_pairs.parse_mathshepherd(rec, "f", 1)
    assert question == ("A baker makes 12 rolls in the morning and 8 in the afternoon. He sells 15. How many rolls "
                        "are left?")
    assert solution == ("Step 1: He makes 12 + 8 = <<12+8=20>>20 rolls.\n"
                        "Step 2: He has 20 - 15 = <<20-15=5>>5 rolls left. The answer is: 5")
    assert (steps, task) == ([True, True], "GSM8K")
    assert rm_pairs.is_correct_solution([False, True, True], "final") and not rm_pairs.is_correct_solution(
        [False, True, True], "all")


def test_mathshepherd_40k_and_800k(tmp_path, capfd):
    # Five questions; q5 has no incorrect solution. Seed 3 holds out one question (round(0.25 x 5)).
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path / "a", "--test-fraction", 0.25,
               "--seed", 3) == 0
    err = capfd.readouterr().err
    train, test, stats = outputs(tmp_path / "a")
    assert "none on both sides (checked: question ids and prompt texts)" in err
    assert stats["split"]["train_questions"] + stats["split"]["test_questions"] == 5
    assert stats["split"]["test_questions"] == 1
    assert_no_question_on_both_sides(train, test)
    # 40k: one pair per question that has both kinds; the test side: one correct + one incorrect per question.
    for side in (train, test):
        groups = [p["group"] for p in side]
        assert len(groups) == len(set(groups))
    assert len(train) + len(test) == 4  # q1..q4; q5 has no incorrect solution
    assert stats["dropped"]["question_without_correct_and_incorrect"] == 1
    assert stats["dropped"]["duplicate_response"] == 1  # q2's repeated solution
    assert stats["read"] == {"records_GSM8K": 11, "records_MATH": 3}
    for p in train + test:
        assert "ки" not in p["chosen"] + p["rejected"] and p["chosen"].startswith("Step 1:")
        assert p["group"].startswith("mathshepherd-") and not p["prompt"].endswith("Step")

    # 800k: every correct x incorrect combination of the training questions (q1: 2 x 2, q2: 1 x 1, q3: 1 x 2,
    # q4: 1 x 2 under rule "all"), the same split and the same test pairs as 40k.
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path / "b", "--test-fraction", 0.25,
               "--seed", 3, "--style", "800k") == 0
    train8, test8, stats8 = outputs(tmp_path / "b")
    combos = {"A baker ": 4, "Mia read": 1, "What is ": 2, "Sam has ": 2}
    held_out = {p["prompt"][:8] for p in test8}
    assert len(train8) == sum(n for k, n in combos.items() if k not in held_out)
    assert test8 == test and stats8["split"] == stats["split"]
    # --max-pairs-per-question caps the combinations; --rule final makes q3's third solution correct.
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path / "c", "--test-fraction", 0,
               "--style", "800k", "--max-pairs-per-question", 2, "--rule", "final") == 0
    train_c, test_c, _ = outputs(tmp_path / "c")
    assert test_c == [] and max(sum(p["group"] == g for p in train_c) for g in {p["group"] for p in train_c}) == 2
    q3 = [p for p in train_c if p["prompt"].startswith("What is")]
    assert len(q3) == 2 and any("checking gives 8" in p["chosen"] for p in q3)


def test_mathshepherd_is_deterministic_under_the_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path / name, "--seed", seed,
                   "--test-fraction", 0.4) == 0
    same = [(tmp_path / n / "train.jsonl").read_bytes() + (tmp_path / n / "test.jsonl").read_bytes() for n in "abc"]
    assert same[0] == same[1]
    splits = {n: sorted({p["group"] for p in read(tmp_path / n / "test.jsonl")}) for n in "ac"}
    assert splits["a"] != splits["c"]  # another seed holds out other questions


@pytest.mark.parametrize("case", ["label", "json", "tag_in_question"])
def test_mathshepherd_bad_record_is_refused_with_file_and_line(tmp_path, capfd, case):
    lines = MATHSHEPHERD.read_text(encoding="utf-8").splitlines()
    good = json.loads(lines[0])
    bad = {"label": json.dumps({**good, "label": good["label"].replace("rolls. +", "rolls. ?", 1)}, ensure_ascii=False),
           "json": '{"input": "x ки", "label": ',
           "tag_in_question": json.dumps({"input": "How many ки? Step 1: 2 ки", "label": "How many +? Step 1: 2 +",
                                          "task": "GSM8K"}, ensure_ascii=False)}[case]
    source = tmp_path / "ms.jsonl"
    source.write_text("\n".join(lines[:3] + [bad] + lines[3:]) + "\n", encoding="utf-8")
    assert run("mathshepherd", "--input", source, "--output-dir", tmp_path / "out") == 2
    err = capfd.readouterr().err
    expected = {"label": f"error: {source}:4 field 'label': has '?' where 'input' has step tag 1 (expected + or -)",
                "json": f"error: {source}:4: malformed JSON",
                "tag_in_question": f"error: {source}:4 field 'input': a step tag stands inside the question"}[case]
    assert expected in err
    assert not (tmp_path / "out" / "train.jsonl").exists()
    # Skip mode sets it aside, counts it, and keeps everything else.
    rejects = tmp_path / "rejects.jsonl"
    assert run("mathshepherd", "--input", source, "--output-dir", tmp_path / "out", "--on-error", "skip",
               "--rejects", rejects) == 0
    assert [r["line"] for r in read(rejects)] == [4]
    assert outputs(tmp_path / "out")[2]["bad_records"] == 1


def test_outputs_are_not_replaced_without_overwrite(tmp_path, capfd):
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path) == 0
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path) == 2
    assert "train.jsonl, test.jsonl exist; pass --overwrite" in capfd.readouterr().err
    assert run("mathshepherd", "--input", MATHSHEPHERD, "--output-dir", tmp_path, "--overwrite") == 0


# ---------------------------------------------------------------------------------------------------- options


def test_options_logiqa2_and_reclor(tmp_path):
    assert run("options", "--input", LOGIQA2, "--output-dir", tmp_path / "lq", "--seed", 5) == 0
    train, test, stats = outputs(tmp_path / "lq")
    records = read(LOGIQA2)
    assert stats["read"]["records"] == len(records) == 100
    # The generated questions repeat prompts (same passage, question and options set): grouped, never split.
    assert_no_question_on_both_sides(train, test)
    assert len(train) + len(test) == 3 * (stats["train"]["questions"] + stats["test"]["questions"])
    first = records[0]
    pairs = [p for p in train + test if p["group"] == str(first["id"])]
    assert len(pairs) == 3 and {p["chosen"] for p in pairs} == {first["options"][first["answer"]]}
    assert {p["rejected"] for p in pairs} == {o for i, o in enumerate(first["options"]) if i != first["answer"]}
    assert pairs[0]["prompt"].startswith("Instruction: Please answer the following questions based on the passages.")
    assert first["text"] in pairs[0]["prompt"] and pairs[0]["prompt"].endswith("Response:")
    # ReClor's JSON array; its val split given as a file: a question also in the training input is removed.
    assert run("options", "--input", RECLOR, "--test-input", RECLOR, "--output-dir", tmp_path / "rc") == 0
    train, test, stats = outputs(tmp_path / "rc")
    assert test == [] and stats["split"]["test_questions_removed_as_in_train"] == 8 and len(train) == 24


def test_options_bad_record(tmp_path, capfd):
    lines = LOGIQA2.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[1])
    bad["answer"] = 7
    source = tmp_path / "dev.txt"
    source.write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n", encoding="utf-8")
    assert run("options", "--input", source, "--format", "logiqa2", "--output-dir", tmp_path / "o") == 2
    assert f"error: {source}:2 field 'answer': answer index 7 outside the 4 options" in capfd.readouterr().err


def logiqa_record(i: int, qid: int) -> dict:
    return {"id": qid, "answer": 0, "text": f"Passage {i}.", "question": "Which follows?",
            "options": [f"right {i}", f"wrong {i}", f"worse {i}", f"worst {i}"]}


def test_held_out_files_number_their_own_questions(tmp_path):
    """LogiQA 2.0's dev and test files reuse ids for other questions: a test question is removed for its
    prompt, never for its id, and --exclude keeps the evaluation's questions out of both sides."""
    dev, test = tmp_path / "dev.txt", tmp_path / "test.txt"
    dev.write_text("".join(json.dumps(logiqa_record(i, 100 + i)) + "\n" for i in range(4)))
    # ids 100-102 name other questions here; the last record is dev's question 0 under another id
    test.write_text("".join(json.dumps(logiqa_record(10 + i, 100 + i)) + "\n" for i in range(3))
                    + json.dumps(logiqa_record(0, 555)) + "\n")
    assert run("options", "--input", dev, "--test-input", test, "--output-dir", tmp_path / "a") == 0
    train, held_out, stats = outputs(tmp_path / "a")
    assert stats["split"]["test_questions_removed_as_in_train"] == 1 and len(train) == 4 * 3
    assert sorted({p["group"] for p in held_out}) == ["test:100", "test:101", "test:102"]
    assert_no_question_on_both_sides(train, held_out)
    assert run("options", "--input", dev, "--exclude", test, "--test-fraction", 0, "--output-dir", tmp_path / "b") == 0
    train, _, stats = outputs(tmp_path / "b")
    assert stats["read"]["questions_excluded_as_in_exclude_files"] == 1 and stats["excluded_from"] == [str(test)]
    assert sorted({p["group"] for p in train}) == ["101", "102", "103"]
    # the sampled command's ids (its samples are keyed by them) do not collide either
    train_q = TOOL.choice_questions(TOOL.read_choice_sets([str(dev)], "logiqa2"))
    test_q = TOOL.choice_questions(TOOL.read_choice_sets([str(test)], "logiqa2"), TOOL.TEST_ID_PREFIX)
    assert len({q.id for q in train_q + test_q}) == 8


def test_split_helpers_keep_a_prompt_on_one_side():
    groups = [rm_pairs.QuestionGroup(str(i), f"prompt {i % 5}", ["a", "b"], [True, False]) for i in range(20)]
    train, test = rm_pairs.split_groups(groups, 0.4, seed=0)
    assert len({g.split_key for g in test}) == 2 and len(train) + len(test) == 20
    rm_pairs.check_no_leakage(train, test)
    with pytest.raises(ValueError, match="the split leaks: 1 question ids and 1 prompts"):
        rm_pairs.check_no_leakage(train, test + [train[0]])


# ---------------------------------------------------------------------------------------------------- sampled


class ScriptedBackend(Backend):
    """Answers by temperature: greedy -> the right option, otherwise a wrong one, or no letter at all.
    Fails once after `fail_after` requests (to interrupt a run)."""

    def __init__(self, model: str, fail_after: int | None = None):
        self.model, self.mode, self.calls, self.fail_after = model, "chat", 0, fail_after

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise RuntimeError("server went away")
            right = prompt.split("RIGHT=")[1][0]
            wrong = "A" if right != "A" else "B"
            text = {0.0: f"Reasoning... The answer is {right}.", 0.5: f"I think the answer is ({wrong})",
                    1.0: "No idea."}[params.temperature]
            out.append(Completion(f"{self.model}: {text} seed={params.seed}", "stop"))
        return out

    def generate_chat(self, conversations, params):
        return self.generate([c[-1]["content"] for c in conversations], params)


def questions(n=4):
    return [ChoiceQuestion(f"q{i}", f"Passage {i}. RIGHT={'ABCD'[i % 4]}", ("wolf", "xenon", "yak", "zebra"), i % 4)
            for i in range(n)]


def specs(*backends):
    return [ModelSpec(b.model, {"model": b.model}, lambda b=b: b) for b in backends]


SETTINGS = SamplingSettings(grid=(0.0, 0.5, 1.0), max_tokens=16, seed=10, batch_size=5)


def test_extract_choice():
    opts = ("red", "green", "blue", "black")
    assert extract_choice("so the answer is (C).", opts) == 2
    assert extract_choice("The answer is A. On reflection, the answer is: d", opts) == 3
    assert extract_choice("B. because", opts) == 1 and extract_choice("(A)", opts) == 0
    assert extract_choice("It must be green.", opts) == 1
    assert extract_choice("red or green?", opts) is None and extract_choice("The answer is E", opts) is None
    # a small letter is an option only where a sentence ends; a letter past the options is a word
    assert extract_choice("The answer is a direct consequence of the passage.", opts) is None  # not A
    assert extract_choice("The answer is C.\n\nAnswer: I hope this helps", opts) == 2


def test_sampled_pairs_are_correct_x_incorrect_and_resume_exactly(tmp_path):
    qs = questions()
    out = tmp_path / "samples.jsonl"
    stats = sample_and_judge(qs, specs(ScriptedBackend("m1"), ScriptedBackend("m2")), SETTINGS, out, RuleJudge(),
                             progress=False)
    assert stats.written == 4 * 2 * 3
    samples = read_samples(out)
    assert [s["id"] for s in samples[:2]] == ["q0|m1|0|0", "q1|m1|0|0"]
    assert {(s["grid_value"], s["correct"]) for s in samples} == {(0.0, True), (0.5, False), (1.0, None)}
    drops = rm_pairs.Drops()
    groups = sample_groups(samples, qs, "incorrect", drops)
    assert [len(g.responses) for g in groups] == [6] * 4 and drops.seen["samples_without_answer"] == 8
    pairs = rm_pairs.pair_records(groups, "all", 0, None, drops)
    assert len(pairs) == 4 * (2 * 4)  # per question: 2 correct (one per model) x 4 incorrect
    assert all("The answer is" in p["chosen"] and "RIGHT" in p["prompt"] for p in pairs)
    assert len(rm_pairs.pair_records(sample_groups(samples, qs, "drop", rm_pairs.Drops()), "all", 0, None, drops)) == 16

    # Interrupted after 7 requests of the second model, then rerun: the same file as the uninterrupted run.
    out2 = tmp_path / "resumed.jsonl"
    with pytest.raises(RuntimeError, match="server went away"):
        sample_and_judge(qs, specs(ScriptedBackend("m1"), ScriptedBackend("m2", fail_after=7)), SETTINGS, out2,
                         RuleJudge(), progress=False)
    assert not out2.exists() and len(read_samples(Path(f"{out2}.partial"))) == 12 + 5
    sample_and_judge(qs, specs(ScriptedBackend("m1", fail_after=0), ScriptedBackend("m2")), SETTINGS, out2,
                     RuleJudge(), progress=False)  # m1 is never asked again: all its samples are done
    assert out2.read_bytes() == out.read_bytes()
    # Finished: reused with the same options, refused with others.
    assert sample_and_judge(qs, specs(ScriptedBackend("m1", fail_after=0), ScriptedBackend("m2", fail_after=0)),
                            SETTINGS, out2, RuleJudge(), progress=False) is None
    with pytest.raises(ValueError, match="sampled with other options"):
        sample_and_judge(qs, specs(ScriptedBackend("m1")), SETTINGS, out2, RuleJudge(), progress=False)


def test_a_kill_while_finishing_the_samples_resumes(tmp_path, monkeypatch):
    """Killed between stamping the options and renaming .partial, a rerun with the same options resumes (it
    was refused as 'sampled with other options' when the stamp came after the rename)."""
    from megapmp.synth import sampled

    out, reference = tmp_path / "samples.jsonl", tmp_path / "reference.jsonl"
    sample_and_judge(questions(), specs(ScriptedBackend("m1")), SETTINGS, reference, RuleJudge(), progress=False)
    real = sampled.write_text_atomic

    def killed(path, text):
        monkeypatch.setattr(sampled, "write_text_atomic", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(sampled, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        sample_and_judge(questions(), specs(ScriptedBackend("m1")), SETTINGS, out, RuleJudge(), progress=False)
    stats = sample_and_judge(questions(), specs(ScriptedBackend("m1")), SETTINGS, out, RuleJudge(), progress=False)
    assert stats is not None and stats.skipped_done == 4 * 3 and out.read_bytes() == reference.read_bytes()
    assert sample_and_judge(questions(), specs(ScriptedBackend("m1")), SETTINGS, out, RuleJudge(),
                            progress=False) is None  # finished and stamped: reused


def test_model_judge(tmp_path):
    class Judge(Backend):
        model, mode = "judge", "completions"

        def generate(self, prompts, params):
            assert params.temperature == 0
            # The reference is in the prompt; this judge says yes when the response names it.
            return [Completion(" Yes" if f"answer is {p.split('Correct answer: ')[1][0]}" in p.split("Response:\n")[1]
                               else ("no." if "answer is" in p.split("Response:\n")[1] else "maybe"), "stop")
                    for p in prompts]

        def generate_chat(self, conversations, params):
            raise AssertionError

    samples_path = tmp_path / "s.jsonl"
    sample_and_judge(questions(2), specs(ScriptedBackend("m1")), SETTINGS, samples_path, ModelJudge(Judge()),
                     progress=False)
    verdicts = {(s["grid_value"], s["correct"]) for s in read_samples(samples_path)}
    assert verdicts == {(0.0, True), (0.5, False), (1.0, None)}
    assert all(s["judge"] == "model:judge" and "judge_reply" in s for s in read_samples(samples_path))


def test_sampled_cli_with_served_models(tmp_path, capfd):
    """The whole subcommand against tools/serve_models.py's server on loopback (tiny random models: their
    answers are noise, judged by rule), twice: the second run reuses the finished samples."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_synth_backends import ThreadServer, make_tiny_model

    server = ThreadServer([make_tiny_model(tmp_path / "m1", 0), make_tiny_model(tmp_path / "m2", 1)])
    try:
        argv = ["sampled", "--input", LOGIQA2, "--format", "logiqa2", "--backend", "openai", "--base-url", server.url,
                "--model", "m1", "--model", "m2", "--mode", "completions", "--grid", "0,1", "--max-tokens", "4",
                "--output-dir", tmp_path / "out", "--no-progress", "--test-fraction", "0.25"]
        small = tmp_path / "dev.txt"
        small.write_text("".join(LOGIQA2.read_text().splitlines(keepends=True)[:6]))
        argv[2] = small
        assert run(*argv) == 0
        samples = read(tmp_path / "out" / "samples.jsonl")
        assert len(samples) == 6 * 2 * 2 and {s["model"] for s in samples} == {"m1", "m2"}
        _, _, stats = outputs(tmp_path / "out")
        assert stats["read"]["samples"] == 24 and stats["sampling_run"]["written"] == 24
        assert run(*argv, "--overwrite") == 0
        assert "reusing the finished" in capfd.readouterr().err
    finally:
        server.close()
