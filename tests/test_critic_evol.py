"""Critic-Evol (tools/synthesize_pairs.py critic-evol): the critic's structured verdict parsed robustly, pairs
with provenance, resume and determinism, against a scripted OpenAI-compatible server (well-formed, partial and
malformed reviews on demand) and against tiny HF models served by tools/serve_models.py (gibberish: every
answer must be counted and dropped, never crash)."""

from __future__ import annotations

import json

import pytest

from megapmp.synth.critic_evol import CriticEvolConfig, critic_evol, example_order
from megapmp.synth.llm import OpenAIBackend, SamplingParams
from megapmp.synth.prompts import CRITIC_EXAMPLES, critic_prompt, parse_critique
from scripted_openai import ScriptedServer
from test_synth_backends import _DiesAfter, _Interrupt, server, tiny_models  # noqa: F401
from tool_loader import load_tool


def review(reflection=None, criteria=None, code=None, feedback=None, begin="-- BEGIN [{}] --", end="-- END [{}] --"):
    text = ""
    for name, body in (("REFLECTION", reflection), ("CRITERIA", criteria), ("ATTEMPT_2", code),
                       ("FEEDBACK", feedback)):
        if body is not None:
            body = f"```python\n{body}\n```" if name == "ATTEMPT_2" else body
            text += f"{begin.format(name)}\n{body}\n{end.format(name)}\n"
    return text


FIX = review("It triples instead of doubling.", "Correctness first.", "def double(x):\n    return x * 2",
             "[ATTEMPT_1] multiplies by 3; [ATTEMPT_2] by 2.")
# instruction -> (weak answer, critic review)
CASES = {
    "revise: double a number": ("```python\ndef double(x):\n    return x * 3\n```", FIX),
    "accept: add two numbers": ("def add(a, b):\n    return a + b", review("Correct and simple.")),
    "garbage: say hello": ("def hello():\n    return 'hello'", "Looks fine to me!"),
    "incomplete: square": ("def square(x):\n    return x * x * x", review("Cubes.", "Correctness.")),
    "syntax: negate": ("def neg(x):\n    return x", review("Wrong.", "Correct.", "def neg(x:\n    return -x",
                                                          "[ATTEMPT_2] negates.")),
    "identical: halve": ("def half(x):\n    return x / 2", review("Fine?", "Clarity.",
                                                                "def half(x):\n    # halve it\n    return x / 2",
                                                                "[ATTEMPT_2] adds a comment.")),
    "noref: increment": ("def inc(x):\n    return x - 1", review("Decrements.", "Correct.",
                                                                "def inc(x):\n    return x + 1", "Now it adds one.")),
    "prose: anything": ("I cannot write code for that.", FIX),
    "lower: double a number again": ("def double(x):\n    return x * 3",
                            review("Triples.", "Correct.", "def double(x):\n    return 2 * x", "[attempt_1] triples.",
                                   begin="--begin [{}]--", end="--END [{}]  --").lower()
                            + "-- BEGIN [INSTRUCTION] --\nan invented next example\n-- END [INSTRUCTION] --\n"
                            + review("x", "y", "def z(): pass", "[ATTEMPT_2]")),
}
GIVEN = {"id": "given", "instruction": "given: double a number", "response": "def double(x):\n    return x + x + x",
         "source": "precomputed"}


def last_instruction(prompt: str) -> str:
    return prompt.rsplit("-- BEGIN [INSTRUCTION] --\n", 1)[1].split("\n-- END [INSTRUCTION] --", 1)[0]


def scripted_reply(model: str, prompt: str):
    if model == "weak":
        return CASES[prompt][0]
    instruction = last_instruction(prompt)
    return FIX if instruction.startswith("given") else CASES[instruction][1]


def records() -> list[dict]:
    return [{"id": f"r{i}", "instruction": k, "source": "unit"} for i, k in enumerate(CASES)] + [dict(GIVEN)]


CONFIG = CriticEvolConfig(weak_sampling=SamplingParams(temperature=0.7, max_tokens=64, seed=3),
                          critic_sampling=SamplingParams(temperature=0.5, max_tokens=256, seed=3), seed=3, batch_size=4)


def test_parse_critique_reads_verdicts_and_names_every_malformed_one():
    revision, verdict = parse_critique(FIX)
    assert verdict == "revised" and revision == {"reflection": "It triples instead of doubling.",
                                                 "criteria": "Correctness first.",
                                                 "code": "def double(x):\n    return x * 2",
                                                 "feedback": "[ATTEMPT_1] multiplies by 3; [ATTEMPT_2] by 2."}
    assert parse_critique(review("All good.")) == (None, "accepted")
    assert parse_critique("All good.")[1] == "missing_reflection"
    assert parse_critique(review("", "c", "x = 1", "[ATTEMPT_2]"))[1] == "missing_reflection"  # empty reflection
    assert parse_critique(review("r", "c"))[1] == "incomplete_revision"
    assert parse_critique(review("r", None, "x = 1", "[ATTEMPT_2] ..."))[1] == "incomplete_revision"
    assert parse_critique(review("r", "c", "", "[ATTEMPT_2]"))[1] in ("incomplete_revision", "empty_revision")
    assert parse_critique(review("r", "c", "x = 1", "no names"))[1] == "feedback_without_reference"
    assert parse_critique(review("r", "c", "x = 1", "[ATTEMPT_2]").replace("-- END [FEEDBACK] --", ""))[1] == \
        "incomplete_revision"  # a review cut off by max_tokens
    for hostile in (None, 3, b"bytes", "-- BEGIN [REFLECTION] --" * 1000, "\x00" * 10):
        assert parse_critique(hostile)[0] is None
    # the first of a repeated section wins; a next invented example is not part of the review
    text = review("first", "c", "x = 1", "[ATTEMPT_2]") + review("second")
    assert parse_critique(text)[0]["reflection"] == "first"
    revision, verdict = parse_critique(CASES["lower: double a number again"][1])
    assert verdict == "revised" and revision["code"] == "def double(x):\n    return 2 * x"


def test_scripted_critic_pairs_counts_and_provenance(tmp_path):
    with ScriptedServer(scripted_reply, ("weak", "critic")) as s:
        weak, critic = OpenAIBackend(s.url, "weak", concurrency=3), OpenAIBackend(s.url, "critic", concurrency=3)
        stats = critic_evol(records(), tmp_path / "pairs.jsonl", critic, weak, CONFIG, progress=False)
        asked = list(s.requests)
    w, c, f = (stage.as_dict() for stage in stats.stages)
    assert (w["in"], w["kept"], w["dropped"]) == (10, 9, {"not_python": 1})
    assert c["in"] == 9 and c["kept"] == 3
    assert c["dropped"] == {"accepted": 1, "missing_reflection": 1, "incomplete_revision": 1,
                            "revision_syntax_error": 1, "revision_identical": 1, "feedback_without_reference": 1}
    assert f["kept"] == stats.written == 3
    pairs = {p["id"]: p for p in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines())}
    assert sorted(pairs) == ["given", "r0", "r8"]
    p = pairs["r0"]
    assert (p["prompt"], p["chosen"], p["rejected"]) == ("revise: double a number",
                                                         "def double(x):\n    return x * 2",
                                                         "def double(x):\n    return x * 3")
    assert p["criteria"] == "Correctness first." and p["method"] == "critic_evol" and p["source"] == "unit"
    assert (p["weak_model"], p["critic_model"]) == ("weak", "critic") and "instruction" not in p
    assert pairs["given"]["weak_model"] == "given" and pairs["given"]["rejected"] == GIVEN["response"]
    # requests: the weak model is not asked for the given answer; the critic gets CodeFavor's sampling and
    # the worked examples in the order drawn from (seed, id)
    weak_asked = [r for r in asked if r["model"] == "weak"]
    critic_asked = [r for r in asked if r["model"] == "critic"]
    assert len(weak_asked) == 9 and len(critic_asked) == 9
    assert all(r["temperature"] == 0.5 and r["seed"] == 3 and r["max_tokens"] == 256 for r in critic_asked)
    prompt = next(r["prompt"] for r in critic_asked if last_instruction(r["prompt"]).startswith("revise"))
    assert prompt == critic_prompt("revise: double a number", "def double(x):\n    return x * 3",
                                   example_order(3, "r0"))
    positions = [prompt.index(CRITIC_EXAMPLES[i]["instruction"]) for i in example_order(3, "r0")]
    assert positions == sorted(positions)
    assert not (tmp_path / "pairs.jsonl.partial.dropped").exists()  # removed once the run finishes


def test_scripted_critic_resume_and_determinism(tmp_path):
    with ScriptedServer(scripted_reply, ("weak", "critic")) as s:
        weak, critic = OpenAIBackend(s.url, "weak", concurrency=2), OpenAIBackend(s.url, "critic", concurrency=2)
        critic_evol(records(), tmp_path / "a.jsonl", critic, weak, CONFIG, progress=False)
        critic_evol(records(), tmp_path / "b.jsonl", critic, weak, CONFIG, progress=False)
        assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
        with pytest.raises(_Interrupt):  # the critic answers one batch, then the run dies
            critic_evol(records(), tmp_path / "c.jsonl", _DiesAfter(critic, 1), weak, CONFIG, progress=False)
        assert not (tmp_path / "c.jsonl").exists()
        before = len(s.requests)
        resumed = critic_evol(records(), tmp_path / "c.jsonl", critic, weak, CONFIG, progress=False)
        assert resumed.skipped_done == 4  # the first batch (kept and dropped ids) is not asked again
        assert len(s.requests) - before < 2 * len(records())
        with pytest.raises(ValueError, match="other options"):  # a resume with other options refuses to mix
            (tmp_path / "d.jsonl.partial").write_text("")
            (tmp_path / "d.jsonl.partial.json").write_text("{}")
            critic_evol(records(), tmp_path / "d.jsonl", critic, weak, CONFIG, progress=False)
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_needs_a_weak_model_or_given_answers(tmp_path):
    critic = OpenAIBackend("http://127.0.0.1:9", "critic")
    with pytest.raises(ValueError, match="no 'response' and no weak model"):
        critic_evol(records(), tmp_path / "x.jsonl", critic, None, CONFIG, progress=False)
    with pytest.raises(ValueError, match="missing 'instruction'"):
        critic_evol([{"id": "a", "instruction": " "}], tmp_path / "x.jsonl", critic, None, CONFIG, progress=False)


def test_cli_with_tiny_served_models(server, tmp_path):  # noqa: F811
    """The real path: tools/synthesize_pairs.py critic-evol against tools/serve_models.py (tiny random models:
    their answers are gibberish, so the run must drop every one under a counted reason)."""
    tool = load_tool("synthesize_pairs")
    instructions = tmp_path / "instructions.jsonl"
    rows = [{"id": f"i{i}", "instruction": f"Write a function that returns {i} plus one."} for i in range(3)]
    rows += [{"id": "g0", "instruction": "Sort a list.", "response": "def f(xs):\n    return sorted(xs)"}]
    instructions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--backend", "openai", "--base-url", server.url, "--critic-model", "strong", "--max-tokens", "8",
              "--critic-max-tokens", "12", "--seed", "0", "--batch-size", "2", "--timeout", "60", "--no-progress"]
    out, stats_path = tmp_path / "pairs.jsonl", tmp_path / "stats.json"
    assert tool.main(["critic-evol", "--input", str(instructions), "--weak-model", "weak", "--output", str(out),
                      "--stats", str(stats_path), *common]) == 0
    stats = json.loads(stats_path.read_text())
    weak, critic, filt = stats["stages"]
    assert weak["in"] == 4 and critic["in"] == weak["kept"] >= 1  # the given answer reaches the critic
    assert set(weak["dropped"]) <= {"empty_response", "not_python"}
    assert set(critic["dropped"]) <= {"accepted", "missing_reflection", "incomplete_revision", "empty_revision",
                                      "feedback_without_reference", "revision_syntax_error", "revision_identical"}
    assert stats["written"] == filt["kept"] and out.exists()
    assert stats["model_requests"] == 3 + critic["in"]
    # HumanEval's prompts as the instructions (the CPU demo input)
    he = tmp_path / "he.jsonl"
    assert tool.main(["critic-evol", "--humaneval", "--limit", "2", "--weak-model", "weak", "--output", str(he),
                      "--stats", str(tmp_path / "he.json"), *common]) == 0
    assert json.loads((tmp_path / "he.json").read_text())["records_in"] == 2 and he.exists()
    # bad input: one line, exit 1 like the other subcommands' model errors
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x"}) + "\n")
    assert tool.main(["critic-evol", "--input", str(bad), "--output", str(tmp_path / "o.jsonl"), *common]) == 1
