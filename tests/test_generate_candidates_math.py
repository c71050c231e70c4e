"""tools/generate_candidates.py math: MetaMath-prompted solutions for GSM8K / MATH, labelled by
megapmp.eval.answers, in the candidates format evaluate.py best-of-n reads; resumable."""
import json
from pathlib import Path

import pytest

from megapmp.eval import metrics
from megapmp.eval.formats import load_candidate_sets
from megapmp.synth.llm import Backend, Completion
from tool_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = REPO / "tests" / "fixtures" / "data" / "gsm8k" / "test.jsonl"


TOOL = load_tool("generate_candidates")


class Scripted(Backend):
    """Sample k answers with the k-th of `answers` (seeded requests), in MetaMath's style."""

    model, mode = "scripted", "completions"

    def __init__(self, answers):
        self.answers, self.prompts = answers, []

    def generate(self, prompts, params):
        self.prompts += prompts
        return [Completion(f"Some steps.\nThe answer is: {self.answers[params.seed]}", "stop") for _ in prompts]

    def generate_chat(self, conversations, params):
        raise AssertionError


def test_math_questions_are_read_and_labelled(tmp_path):
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"problem": "Compute $\\frac{1}{2} + \\frac{1}{4}$.",
                                     "solution": "The sum is $\\boxed{\\frac{3}{4}}$.", "level": "Level 1"}) + "\n")
    gsm = TOOL.read_math_questions(str(GSM8K_TEST))
    assert len(gsm) == 20 and gsm[0]["id"] == "line1" and gsm[0]["gold"].endswith("#### 38")
    questions = gsm[:1] + TOOL.read_math_questions(str(math_file))

    class Args:
        n, seed, temperature, top_p, max_tokens = 3, 0, 0.7, 1.0, 32

    backend = Scripted(["38", "39", "3/4"])
    out = TOOL.math_candidates(backend, questions, Args, None, ["gsm8k", "math"])
    assert [c["correct"] for c in out[0]] == [True, False, False]
    assert [c["correct"] for c in out[1]] == [False, False, True]  # "3/4" equals \frac{3}{4}
    assert [c["answer"] for c in out[0]] == ["38", "39", "3"]
    assert backend.prompts[0] == TOOL.METAMATH_PROMPT.format(instruction=gsm[0]["question"])
    assert backend.prompts[0].endswith("### Response: Let's think step by step.")


def test_math_input_errors_name_file_and_line(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    assert TOOL.main(["math", "--backend", "openai", "--base-url", "http://127.0.0.1:9", "--model", "m",
                      "--data", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"error: {bad}:2 field 'answer': no reference solution" in capfd.readouterr().err


def test_math_cli_with_a_served_model_resumes_and_feeds_best_of_n(tmp_path):
    from test_synth_backends import ThreadServer, make_tiny_model

    server = ThreadServer([make_tiny_model(tmp_path / "gen", 0)])
    try:
        out = tmp_path / "cands.jsonl"
        argv = ["math", "--backend", "openai", "--base-url", server.url, "--model", "gen", "--data", str(GSM8K_TEST),
                "--n", "4", "--max-tokens", "6", "--seed", "0", "--batch-size", "2", "--output", str(out),
                "--no-progress"]
        assert TOOL.main(argv + ["--limit", "2"]) == 0
        first = out.read_text()
        out.write_text(first + '{"id": "line3", "prom')  # an interrupted write
        assert TOOL.main(argv + ["--limit", "4"]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in records] == ["line1", "line2", "line3", "line4"] and out.read_text().startswith(first)
        for r in records:
            assert len(r["candidates"]) == 4 and r["meta"]["answer_type"] == "gsm8k"
            assert all(isinstance(c["correct"], bool) for c in r["candidates"])
        assert records[0]["meta"]["gold"] == "38" and records[0]["prompt"].startswith("Iris buys")
        # Another setting into the same file is refused.
        with pytest.raises(SystemExit, match="other settings"):
            TOOL.main(argv + ["--temperature", "0.1"])
        # evaluate.py best-of-n reads it as is, and reports the paper's grid up to the candidate count.
        fmt, sets = load_candidate_sets(str(out))
        assert fmt == "candidates" and len(sets) == 4
        assert metrics.default_n_values(4, limit=256) == [1, 2, 4]
        assert metrics.default_n_values(256, limit=256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    finally:
        server.close()
