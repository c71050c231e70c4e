"""Commit-Instruct on a git repository built here: the walk's filters, before/after extraction, the
model-free pairs, and CodeFavor's stages against the tiny served model (gibberish answers: the run must
finish, drop them under counted reasons, and resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megapmp.synth.commits import CommitConfig, clean_message, commit_instruct, extract_change
from megapmp.synth.llm import OpenAIBackend, SamplingParams
from megapmp.synth.prompts import parse_judgement, parse_rewrite
from test_synth_backends import server, tiny_models  # noqa: F401  (fixtures: one shared server)
from tool_loader import load_tool

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

V1 = '''"""Small math helpers."""

LIMIT = 10


def mean(xs):
    return sum(xs) / len(xs)


class Range:
    def clamp(self, x, lo, hi):
        return min(x, hi)
'''
V2 = V1.replace("    return sum(xs) / len(xs)", "    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)")
V3 = V2.replace("return min(x, hi)", "return min(x,  hi)  # keep x below hi")  # whitespace + comment only
V4 = V3.replace("return min(x,  hi)  # keep x below hi", "return max(lo, min(x, hi))")
V5 = V4 + "\n\ndef half(x):\n    return x / 2\n"
V6 = V5.replace("LIMIT = 10", "LIMIT = 20")
V7 = V6.replace("return x / 2", "return x // 2")


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent)}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def _commit(repo: Path, message: str, files: dict[str, str]) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
        _git(repo, "add", name)
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("history") / "mathlib"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    shas = {
        "root": _commit(repo, "Initial commit", {"mathutils.py": V1}),
        "fix_mean": _commit(repo, "fix(stats): handle an empty list in mean (#12)\n\nReturned ZeroDivisionError "
                                  "before.\n\nSigned-off-by: t <t@e>", {"mathutils.py": V2}),
        "spacing": _commit(repo, "Fix spacing in clamp", {"mathutils.py": V3}),
        "wip": _commit(repo, "wip", {"mathutils.py": V3 + "\n"}),
        "multi": _commit(repo, "Fix clamp and document it", {"mathutils.py": V3 + "\n# clamp note\n",
                                                             "README.md": "mathutils\n"}),
        "fix_clamp": _commit(repo, "Correct clamp: also enforce the lower bound", {"mathutils.py": V4}),
        "feature": _commit(repo, "Add a half helper", {"mathutils.py": V5}),
        "module": _commit(repo, "Fix the limit constant", {"mathutils.py": V6}),
        "fix_half": _commit(repo, "Use integer division in half to avoid floats", {"mathutils.py": V7}),
        "notes": _commit(repo, "Fix a note in the docs", {"notes.txt": "notes\n"}),
    }
    _git(repo, "revert", "--no-edit", shas["fix_half"])
    return repo, shas


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_model_free_pairs_and_filters(repo, tmp_path):
    repo_dir, shas = repo
    out = tmp_path / "pairs.jsonl"
    stats = commit_instruct(repo_dir, out, progress=False).as_dict()
    walk, extract, filt = stats["stages"]
    assert walk["dropped"] == {"root_commit": 1, "uninformative_message": 1, "multi_file": 1, "not_python": 1,
                               "revert": 1, "no_improvement_keyword": 1}
    assert extract["dropped"] == {"no_code_change": 1, "change_outside_function": 1}
    pairs = _lines(out)
    assert [p["commit"] for p in pairs] == [shas["fix_mean"], shas["fix_clamp"], shas["fix_half"]]
    mean, clamp, half = pairs
    assert mean["prompt"] == "Handle an empty list in mean\n\nReturned ZeroDivisionError before."
    assert mean["chosen"] == "def mean(xs):\n    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)"
    assert mean["rejected"] == "def mean(xs):\n    return sum(xs) / len(xs)"
    assert clamp["functions"] == ["Range.clamp"]
    assert clamp["chosen"] == "def clamp(self, x, lo, hi):\n    return max(lo, min(x, hi))"  # dedented method
    assert clamp["rejected"].startswith("def clamp(self, x, lo, hi):\n    return min(x,  hi)")
    assert half["chosen"].endswith("x // 2") and half["method"] == "commit_message"
    assert filt["kept"] == 3 == stats["written"]
    # --limit counts candidate commits (after the walk's filters): fix_mean, spacing, fix_clamp
    again = tmp_path / "again.jsonl"
    commit_instruct(repo_dir, again, progress=False, limit=3)
    assert again.read_text().splitlines() == out.read_text().splitlines()[:2]


def test_extract_change_reasons():
    cfg = CommitConfig()
    assert extract_change("def f(:\n", "x = 1\n", cfg) == (None, "syntax_error")
    assert extract_change("def f():\n    '''a'''\n    return 1\n", "def f():\n    '''b'''\n    return 1\n", cfg) == \
        (None, "docstring_only")
    assert extract_change("def f():\n    return 1\n", "def f():\n    return 1\ndef g():\n    return 2\n", cfg) == \
        (None, "function_added_or_removed")
    many = "".join(f"def f{i}():\n    return {i}\n" for i in range(3))
    assert extract_change(many, many.replace("return", "return -"), cfg) == (None, "too_many_functions")
    change, reason = extract_change("@dec\ndef f(x):\n    return x\n", "@dec\ndef f(x):\n    return -x\n", cfg)
    assert reason is None and change["before"] == "@dec\ndef f(x):\n    return x" and change["functions"] == ["f"]


def test_message_cleaning_and_response_parsers():
    assert clean_message("fix(io)!: close the file (#7)\n\nCo-authored-by: a <a@b>\nCloses #7") == "Close the file"
    assert parse_judgement("Yes, it fixes a bug.") is True
    assert parse_judgement("**No**") is False
    assert parse_judgement("maybe") is None
    good = ("[Instruction]\nWrite mean(xs) that returns 0.0 for an empty list.\n\n[Naive Code]\n```python\n"
            "def mean(xs):\n    return sum(xs) / len(xs)\n```\n\n[Improved Code]\n```python\ndef mean(xs):\n"
            "    return sum(xs) / len(xs) if xs else 0.0\n```\n")
    parsed, why = parse_rewrite(good)
    assert why is None and parsed["instruction"].startswith("Write mean") and parsed["improved"].endswith("0.0")
    assert parse_rewrite("[Instruction]\nx\n[Naive Code]\nno fence\n[Improved Code]\n```\ny\n```")[1] == \
        "missing_code_block"
    assert parse_rewrite("gibberish")[1] == "missing_section"


class _Interrupt(Exception):
    pass


class _DiesAfter:
    def __init__(self, backend, calls):
        self.backend, self.calls, self.model, self.mode = backend, calls, backend.model, backend.mode

    def describe(self):
        return self.backend.describe()

    def run(self, prompts, params):
        if self.calls == 0:
            raise _Interrupt()
        self.calls -= 1
        return self.backend.run(prompts, params)


MODEL_REASONS = {"explain_empty_response", "judge_unparseable", "not_improvement", "rewrite_missing_section",
                 "rewrite_missing_code_block", "rewrite_empty_instruction", "rewrite_duplicate_section",
                 "rewrite_syntax_error", "no_code_change", "change_outside_function", "function_added_or_removed", "empty_response",
                 "short_prompt", "identical", "length_ratio"}


def test_codefavor_stages_with_served_model_drop_and_resume(repo, server, tmp_path):
    repo_dir, _ = repo
    backend = OpenAIBackend(server.url, "strong", concurrency=4, timeout_s=30)
    params = SamplingParams(temperature=0.7, max_tokens=16, seed=1)
    full = tmp_path / "full.jsonl"
    stats = commit_instruct(repo_dir, full, backend, params=params, batch_size=2, progress=False)
    d = stats.as_dict()
    walk, extract, explain, judge, rewrite, filt = d["stages"]
    # with a model, no keyword filter: "Add a half helper" is a candidate too
    assert "no_improvement_keyword" not in walk["dropped"] and walk["kept"] == 6 == d["records_in"]
    assert extract["dropped"] == {"no_code_change": 1, "function_added_or_removed": 1, "change_outside_function": 1}
    assert extract["kept"] == explain["in"] == 3
    assert judge["in"] == explain["kept"] and rewrite["in"] == judge["kept"]
    assert d["model_requests"] == explain["in"] + judge["in"] + rewrite["in"]
    dropped = d["records_in"] - d["written"]
    assert dropped > 0  # gibberish does not parse
    assert d["written"] == filt["kept"]

    part = tmp_path / "part.jsonl"
    with pytest.raises(_Interrupt):  # batch 1 finishes (explain + judge [+ rewrite]), batch 2 dies
        commit_instruct(repo_dir, part, _DiesAfter(backend, 3), params=params, batch_size=2, progress=False)
    done = [json.loads(x) for x in (tmp_path / "part.jsonl.partial.dropped").read_text().splitlines()]
    assert len(done) + (tmp_path / "part.jsonl.partial").read_text().count("\n") == 2
    assert {r["reason"] for r in done} <= MODEL_REASONS
    resumed = commit_instruct(repo_dir, part, backend, params=params, batch_size=2, progress=False)
    assert part.read_bytes() == full.read_bytes()
    assert resumed.skipped_done == 2 and sum(resumed.resumed_dropped.values()) + resumed.resumed_kept == 2
    assert resumed.requests < stats.requests


def test_commits_cli(repo, server, tmp_path):
    repo_dir, _ = repo
    tool = load_tool("synthesize_pairs")
    out, st = tmp_path / "p.jsonl", tmp_path / "s.json"
    assert tool.main(["commits", "--repo", str(repo_dir), "--output", str(out), "--stats", str(st),
                      "--max-changed-lines", "1", "--no-progress"]) == 0
    s = json.loads(st.read_text())
    assert s["method"] == "commit_message" and s["stages"][0]["dropped"]["large_diff"] >= 1
    assert tool.main(["commits", "--repo", str(repo_dir), "--output", str(tmp_path / "m.jsonl"), "--backend",
                      "openai", "--base-url", server.url, "--model", "strong", "--max-tokens", "8", "--seed", "0",
                      "--no-progress", "--limit", "2"]) == 0
    assert tool.main(["commits", "--repo", str(repo_dir), "--output", str(out), "--backend", "openai"]) == 1
