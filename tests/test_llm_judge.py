"""codeprefbench --judge openai: CodeFavor's LLM-judge protocol against OpenAI-compatible servers on loopback.
A scripted server gives exact verdicts, malformed ones, 503s and failures on demand (an always-"A" judge scores
exactly 0.5 in both orders; unparseable answers count 0.5; a failed request leaves the others in the cache and
a rerun asks only for what is missing); the tiny HF models of tools/serve_models.py give the real path."""

from __future__ import annotations

import json
import re
import threading

import pytest

from megapmp.eval.llm_judge import parse_verdict
from scripted_openai import ScriptedServer
from test_judge import ASPECTS, codeprefbench_files
from test_synth_backends import server, tiny_models  # noqa: F401  (fixtures: one shared server process)
from tool_loader import load_tool

TASK = re.compile(r"Write f(\d+)\(x\) returning x (\S+) (\d+)\.")
CODE = re.compile(r"\[CODE_([AB])\]\n```python\n(.*?)\n```", re.DOTALL)


def codes(prompt: str) -> dict[str, str]:
    return {name: code for name, code in CODE.findall(prompt)}


def better_one(prompt: str) -> str:
    """The code of the prompt that does what its instruction says (CODE A or B)."""
    _, op, c = TASK.search(prompt).groups()
    return next(name for name, code in codes(prompt).items() if f"return x {op} {c}" in code)


def run(url: str, files, out, *extra) -> int:
    return load_tool("evaluate").main(["codeprefbench", "--judge", "openai", "--model", "judge", "--base-url", url,
                                       "--data", *files, "--output", str(out), "--concurrency", "4", "--timeout", "30",
                                       "--no-progress", *extra])


def test_parse_verdict():
    assert parse_verdict("[FEEDBACK]\nA is slow.\n\n[RESULT]\n[CODE_B] is better than [CODE_A] on the criteria.") == 1
    assert parse_verdict("**Result**: Code A is better than Code B.") == 0
    assert parse_verdict("CODE_1 is better than CODE_2") == 0
    assert parse_verdict("Between CODE_A and CODE_B, CODE_B is better.") == 1
    assert parse_verdict("[RESULT] Neither CODE_A nor CODE_B is better.") is None
    assert parse_verdict("[RESULT] Both are equally good.") is None  # no 'better': undecided
    assert parse_verdict("The code and the tests are better now.") is None  # 'code and' names no code
    assert parse_verdict("CODE_A is better. [RESULT] CODE_B is better than CODE_A.") == 1  # the RESULT section
    # "result" as a word after the heading is not a heading; a negated "better" is no verdict
    assert parse_verdict("[RESULT]\n[CODE_B] is better than [CODE_A] on the criteria, since it returns correct "
                         "results.") == 1
    assert parse_verdict("[RESULT] [CODE_A] is not better than [CODE_B].") is None
    assert parse_verdict("[RESULT] CODE_A isn't better than CODE_B. CODE_B is better than CODE_A.") == 1
    for hostile in (None, 7, "", "RESULT" * 1000, "[RESULT]" * 1000, "better " * 10000):
        assert parse_verdict(hostile) is None


def test_an_llm_that_always_says_A_scores_exactly_half(tmp_path):
    files = codeprefbench_files(tmp_path / "cpb")
    with ScriptedServer(lambda model, prompt: "[FEEDBACK] Fine.\n[RESULT] [CODE_A] is better than [CODE_B].",
                        ("judge",)) as s:
        assert run(s.url, files, tmp_path / "a.json") == 0
        asked = list(s.requests)
    r = json.loads((tmp_path / "a.json").read_text())["results"]
    assert r["judge"] == "openai" and r["overall"] == 0.5 and set(r["aspects"]) == set(ASPECTS)
    for v in r["aspects"].values():
        assert (v["accuracy"], v["accuracy_chosen_first"], v["accuracy_chosen_second"], v["undecided"]) == \
            (0.5, 1.0, 0.0, 0)
    assert len(asked) == 2 * 4 * 6 and all(q["temperature"] == 0 for q in asked)  # both orders, greedy
    assert all(q["path"].endswith("/chat/completions") for q in asked)
    # CodeFavor's protocol: comments stripped except for human preference, the aspect's criterion asked about
    human = [q["prompt"] for q in asked if "human developer" in q["prompt"]]
    assert len(human) == 12 and all("# combine" in p for p in human)
    assert not any("# combine" in q["prompt"] for q in asked if "human developer" not in q["prompt"])


def scripted_judge(failing: set[int], attempts: dict, lock: threading.Lock):
    """Verdicts by task: 0 right, 1 always A, 2 'neither', 3 gibberish, 4 wrong, 5 right after one 503.
    Tasks in `failing` answer HTTP 500 every time."""

    def reply(model, prompt):
        i = int(TASK.search(prompt).group(1)) % 6
        if i in failing:
            return 500
        with lock:
            attempts[prompt] = attempts.get(prompt, 0) + 1
            first_try = attempts[prompt] == 1
        right = better_one(prompt)
        wrong = "B" if right == "A" else "A"
        if i == 5 and first_try:
            return 503
        return {0: f"[RESULT] [CODE_{right}] is better than [CODE_{wrong}].",
                1: "[RESULT] [CODE_A] is better than [CODE_B].",
                2: "[RESULT] Neither code is better.",
                3: "fjdk slq the",
                4: f"Result: CODE_{wrong} is better than CODE_{right}.",
                5: f"[RESULT] [CODE_{right}] is better than [CODE_{wrong}]."}[i]

    return reply


def test_verdicts_undecided_answers_retries_and_resume(tmp_path):
    files = codeprefbench_files(tmp_path / "cpb")
    lock, attempts = threading.Lock(), {}
    # a server that fails task 4 for good: the run ends with one error, the other answers are cached
    with ScriptedServer(scripted_judge({4}, attempts, lock), ("judge",)) as s:
        assert run(s.url, files, tmp_path / "r.json", "--max-retries", "1") == 2
        sent_first = len(s.requests)
    cache = tmp_path / "r.judge.jsonl"
    cached = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(cached) == 2 * 4 * 5 and not (tmp_path / "r.json").exists()
    assert sent_first == 2 * 4 * 5 + 2 * 4 * 2 + 2 * 4  # 40 answers + 16 tries of the failing ones + 8 503s
    # the rerun asks only for the 8 missing answers (task 4 in both orders, every aspect)
    with ScriptedServer(scripted_judge(set(), attempts, lock), ("judge",)) as s:
        assert run(s.url, files, tmp_path / "r.json", "--max-retries", "1", "--markdown",
                   str(tmp_path / "r.md")) == 0
        assert len(s.requests) == 8
    r = json.loads((tmp_path / "r.json").read_text())["results"]
    for v in r["aspects"].values():  # (1 + 0.5 + 0.5 + 0.5 + 0 + 1) / 6, 'neither' and gibberish count 0.5
        assert v["accuracy"] == pytest.approx(3.5 / 6, abs=1e-12) and v["undecided"] == 4 and v["pairs"] == 6
    assert r["llm"]["answers_from_cache"] == 40 and r["llm"]["requests_sent"] == 8
    assert "undecided answers" in (tmp_path / "r.md").read_text()


def test_openai_judge_against_a_tiny_served_model(server, tmp_path):  # noqa: F811
    """The real path: tools/serve_models.py's tiny random model answers gibberish, every answer is undecided and
    counted 0.5 (the report still has all four aspects)."""
    files = codeprefbench_files(tmp_path / "cpb", n=2)
    out = tmp_path / "tiny.json"
    assert load_tool("evaluate").main(["codeprefbench", "--judge", "openai", "--model", "strong", "--base-url",
                                       server.url, "--data", *files, "--output", str(out), "--max-tokens", "8",
                                       "--concurrency", "2", "--timeout", "60", "--no-progress"]) == 0
    r = json.loads(out.read_text())["results"]
    assert set(r["aspects"]) == set(ASPECTS) and r["llm"]["model"] == "strong"
    for v in r["aspects"].values():
        assert v["pairs"] == 2 and 0 <= v["undecided"] <= 4 and 0 <= v["accuracy"] <= 1
    # an unreachable server: retried, then one line and exit 2
    assert load_tool("evaluate").main(["codeprefbench", "--judge", "openai", "--model", "strong", "--base-url",
                                       "http://127.0.0.1:9", "--data", files[0], "--output", str(tmp_path / "x.json"),
                                       "--max-retries", "0", "--no-progress"]) == 2
    assert load_tool("evaluate").main(["codeprefbench", "--judge", "openai", "--model", "strong", "--data", files[0],
                                       "--output", str(tmp_path / "x.json"), "--no-progress"]) == 2  # no --base-url
