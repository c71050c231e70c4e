"""Commit-Instruct: code-preference pairs from a git repository's history (CodeFavor, arXiv 2410.03837).

A commit that changes a few lines of one Python function is a natural pair: the code before and after,
with the commit message saying what changed. The walk (plain `git` subprocesses, oldest commit first)
keeps commits that pass these filters, each counted under its reason when it does not:

  commits stage   merge (more than one parent), root_commit (no parent), no_change, multi_file (more
                  than one file touched; a rename counts as two), not_python (the file is not *.py),
                  binary, large_diff (added + deleted lines > max_changed_lines, default 30), revert
                  (subject starts with "Revert"), uninformative_message (fewer than 2 words, or a word
                  from UNINFORMATIVE_WORDS: wip, typo, format, lint, whitespace, rename, bump, ...; so
                  format-only, whitespace-only and rename-only commits are named as such), and, model-free
                  only, no_improvement_keyword (no word starting with one of IMPROVEMENT_KEYWORDS: fix,
                  bug, correct, improve, faster, handle, ...)
  extract stage   file_added / file_deleted, not_utf8, syntax_error (either side), no_code_change (the
                  two ASTs are equal: whitespace, comments, formatting), docstring_only,
                  change_outside_function (module-level code changed), function_added_or_removed,
                  too_many_functions (> max_functions, default 2), function_too_long (> max_function_lines)

Each surviving commit yields the changed functions' source before and after (methods dedented, with
their decorators; several functions joined by a blank line).

Model-free variant (no backend): prompt = the cleaned commit message (trailers such as Signed-off-by,
issue references like "(#12)" and conventional-commit prefixes such as "fix(io):" removed), chosen =
the code after the commit, rejected = the code before. This assumes the commit improves the code; the
improvement-keyword filter above is what makes that assumption reasonable, and it is still only an
assumption (a "fix" can be wrong).

With a backend, CodeFavor's three stages (prompts in `megapmp.synth.prompts`): explain the change
(drop: explain_empty_response), judge whether it is an improvement (keep only "yes"; drop:
judge_unparseable, not_improvement), rewrite into an instruction + naive code + improved code (drop:
rewrite_missing_section / _missing_code_block / _empty_instruction / _duplicate_section,
rewrite_syntax_error). Then the pair filter (PairFilter) for both variants: empty_response,
short_prompt, identical, length_ratio.

Output and resume: as in `generate` (OUTPUT.partial + OUTPUT.partial.dropped, renamed at the end; a rerun
skips every finished commit).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megapmp.synth.filters import PairFilter, StageStats
from megapmp.synth.generate import RunStats, StageOutput, run_batches, text_digest
from megapmp.synth.llm import Backend, SamplingParams
from megapmp.synth.prompts import (EXPLAIN_PROMPT, JUDGE_PROMPT, REWRITE_PROMPT, explain_prompt, judge_prompt,
                                   parse_judgement, parse_rewrite, rewrite_prompt)
from megapmp.synth.stages import ids_digest

IMPROVEMENT_KEYWORDS = ("fix", "bug", "correct", "improv", "faster", "speed", "perf", "optimi", "handl",
                        "avoid", "prevent", "edge", "crash", "leak", "race", "wrong", "incorrect", "broken",
                        "robust", "safe", "validat", "overflow", "regression", "off-by-one", "error",
                        "exception", "fail")
UNINFORMATIVE_WORDS = ("wip", "typo", "typos", "format", "formatting", "reformat", "reformatted", "lint",
                       "linting", "whitespace", "pep8", "black", "isort", "flake8", "rename", "renamed",
                       "renaming", "bump", "changelog", "tmp", "temp", "todo", "fixup!", "squash!")
TRAILER = re.compile(r"^[A-Za-z][A-Za-z-]*-by:|^Change-Id:|^Co-authored-by:|^Closes? #|^Fixes #|^Refs? #",
                     re.IGNORECASE)
CONVENTIONAL_PREFIX = re.compile(r"^[a-z]+(\([^)]*\))?!?:\s*", re.IGNORECASE)
ISSUE_REF = re.compile(r"\s*\(#\d+\)|\s*\(?(gh-|#)\d+\)?")


@dataclass(frozen=True)
class CommitConfig:
    max_changed_lines: int = 30  # added + deleted lines of the commit's diff
    max_functions: int = 2  # changed functions per commit
    max_function_lines: int = 80  # lines of each changed function, before and after
    rev: str = "HEAD"

    def __post_init__(self):
        if self.max_changed_lines < 1 or self.max_functions < 1 or self.max_function_lines < 1:
            raise ValueError("max_changed_lines, max_functions and max_function_lines must be >= 1")


@dataclass
class Commit:
    sha: str
    parents: list[str]
    message: str
    files: list[tuple[str, int | None, int | None]] = field(default_factory=list)  # path, added, deleted


def git(repo: str | os.PathLike, *args: str) -> bytes:
    result = subprocess.run(["git", "-C", str(repo), "-c", "core.quotepath=off", *args], capture_output=True)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, ["git", *args], result.stdout, result.stderr)
    return result.stdout


def walk_commits(repo: str | os.PathLike, rev: str = "HEAD") -> list[Commit]:
    """Every commit reachable from `rev`, oldest first, with its parents, message and numstat."""
    try:
        raw = git(repo, "log", "--reverse", "--no-renames", "--no-color", "--no-ext-diff", "--numstat",
                  "--format=%x1e%H%x1f%P%x1f%B%x1f", rev, "--")
    except FileNotFoundError:
        raise ValueError("the commits subcommand needs the `git` executable on PATH") from None
    except subprocess.CalledProcessError as e:
        raise ValueError(f"git log in {repo} failed: {e.stderr.decode(errors='replace').strip()}") from None
    commits = []
    for chunk in raw.decode("utf-8", errors="replace").split("\x1e")[1:]:
        sha, parents, message, numstat = chunk.split("\x1f", 3)
        commit = Commit(sha, parents.split(), message.strip())
        for line in numstat.strip("\n").splitlines():
            if not line.strip():
                continue
            added, deleted, path = line.split("\t", 2)
            commit.files.append((path, None if added == "-" else int(added), None if deleted == "-" else int(deleted)))
        commits.append(commit)
    return commits


def clean_message(message: str) -> str:
    """Drop trailers and issue references; turn "fix(scope): x" into "X"."""
    lines = [ln.rstrip() for ln in message.strip().splitlines() if not TRAILER.match(ln.strip())]
    text = "\n".join(lines).strip()
    text = CONVENTIONAL_PREFIX.sub("", text, count=1)
    text = ISSUE_REF.sub("", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text[:1].upper() + text[1:]


def _words(message: str) -> list[str]:
    return re.findall(r"[a-z0-9!+-]+", message.lower())


def commit_reason_to_drop(commit: Commit, config: CommitConfig, require_keyword: bool) -> str | None:
    if len(commit.parents) > 1:
        return "merge"
    if not commit.parents:
        return "root_commit"
    if not commit.files:
        return "no_change"
    if len(commit.files) > 1:
        return "multi_file"
    path, added, deleted = commit.files[0]
    if not path.endswith(".py"):
        return "not_python"
    if added is None or deleted is None:
        return "binary"
    if added + deleted > config.max_changed_lines:
        return "large_diff"
    subject = commit.message.splitlines()[0] if commit.message else ""
    if subject.lower().startswith("revert"):
        return "revert"
    words = _words(clean_message(commit.message))
    if len(words) < 2 or any(w in UNINFORMATIVE_WORDS for w in _words(commit.message)):
        return "uninformative_message"
    if require_keyword and not any(w.startswith(k) for w in _words(commit.message) for k in IMPROVEMENT_KEYWORDS):
        return "no_improvement_keyword"
    return None


# ---------------------------------------------------------------------------------------------------
# before/after of the changed functions


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _functions(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level functions and methods (nested functions stay inside their parent), by qualified name."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{child.name}"] = child
    return out


def _skeleton(tree: ast.Module) -> str:
    """The module with every function replaced by its name: differs iff code outside functions changed."""
    class Blank(ast.NodeTransformer):
        def visit_FunctionDef(self, node):
            return ast.Expr(ast.Constant(f"<function {node.name}>"))

        visit_AsyncFunctionDef = visit_FunctionDef

    return ast.dump(Blank().visit(tree))


def _source(text: str, node: ast.AST) -> str:
    lines = text.splitlines()
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return textwrap.dedent("\n".join(lines[first - 1:node.end_lineno]))


def extract_change(before: str, after: str, config: CommitConfig) -> tuple[dict | None, str | None]:
    """-> ({"functions", "before", "after"}, None) or (None, reason)."""
    try:
        tb, ta = ast.parse(before), ast.parse(after)
    except (SyntaxError, ValueError):
        return None, "syntax_error"
    if ast.dump(tb) == ast.dump(ta):
        return None, "no_code_change"
    sb, sa = _strip_docstrings(ast.parse(before)), _strip_docstrings(ast.parse(after))
    if ast.dump(sb) == ast.dump(sa):
        return None, "docstring_only"
    fb, fa = _functions(tb), _functions(ta)
    if set(fb) != set(fa):
        return None, "function_added_or_removed"
    if _skeleton(ast.parse(before)) != _skeleton(ast.parse(after)):
        return None, "change_outside_function"
    changed = [name for name in fb if ast.dump(fb[name]) != ast.dump(fa[name])]
    if not changed:  # e.g. a change inside a class body outside its methods
        return None, "change_outside_function"
    if len(changed) > config.max_functions:
        return None, "too_many_functions"
    src_b = [_source(before, fb[n]) for n in changed]
    src_a = [_source(after, fa[n]) for n in changed]
    if max(len(s.splitlines()) for s in src_b + src_a) > config.max_function_lines:
        return None, "function_too_long"
    return {"functions": changed, "before": "\n\n".join(src_b), "after": "\n\n".join(src_a)}, None


def _show(repo: str, rev: str, path: str) -> bytes | None:
    try:
        return git(repo, "show", f"{rev}:{path}")
    except subprocess.CalledProcessError:
        return None


def load_change(repo: str, commit: Commit, config: CommitConfig) -> tuple[dict | None, str | None]:
    path = commit.files[0][0]
    before, after = _show(repo, commit.parents[0], path), _show(repo, commit.sha, path)
    if before is None:
        return None, "file_added"
    if after is None:
        return None, "file_deleted"
    try:
        before, after = before.decode("utf-8"), after.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    return extract_change(before, after, config)


# ---------------------------------------------------------------------------------------------------
# the run


def commit_instruct(repo: str | os.PathLike, output: str | os.PathLike, backend: Backend | None = None,
                    config: CommitConfig = CommitConfig(), params: SamplingParams = SamplingParams(),
                    pair_filter: PairFilter = PairFilter(), *, batch_size: int = 32, limit: int | None = None,
                    progress: bool = True) -> RunStats:
    """Pairs from `repo`'s history; model-free without `backend`, CodeFavor's three stages with one."""
    repo = str(Path(repo).resolve())
    repo_name = Path(repo).name
    start = time.perf_counter()
    walk = StageStats("commits", "commits")
    extract = StageStats("extract", "commits")
    model_stages = [StageStats(n, "commits") for n in ("explain", "judge", "rewrite")] if backend else []
    f_stage = StageStats("filter", "pairs")
    stats = RunStats("commits", [walk, extract, *model_stages, f_stage])

    with walk.timed():
        commits = walk_commits(repo, config.rev)
        candidates = []
        for c in commits:
            reason = commit_reason_to_drop(c, config, require_keyword=backend is None)
            if reason:
                walk.drop(reason)
            else:
                walk.keep()
                candidates.append(c)
    if limit is not None:
        candidates = candidates[:limit]
    stats.records_in = len(candidates)
    items = [{"id": f"{repo_name}:{c.sha}", "commit": c} for c in candidates]
    fingerprint = {"command": "commits", "repo": repo, "config": asdict(config),
                   "backend": backend.describe() if backend else None,
                   "sampling": params.to_dict() if backend else None,
                   "prompts_sha": text_digest(EXPLAIN_PROMPT, JUDGE_PROMPT, REWRITE_PROMPT) if backend else None,
                   "filter": [pair_filter.min_length_ratio, pair_filter.max_length_ratio, pair_filter.min_prompt_chars],
                   "inputs_sha256": ids_digest(i["id"] for i in items)}

    def base_record(item: dict, change: dict) -> dict:
        c: Commit = item["commit"]
        return {"id": item["id"], "repo": repo_name, "commit": c.sha, "parent": c.parents[0],
                "path": c.files[0][0], "functions": change["functions"], "message": c.message,
                "language": "python"}

    def finish_pair(item, change, prompt, chosen, rejected, extra) -> tuple[dict | None, str | None]:
        with f_stage.timed():
            reason = pair_filter.reason_to_drop(prompt, chosen, rejected)
        if reason:
            f_stage.drop(reason)
            return None, reason
        f_stage.keep()
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **base_record(item, change), **extra}, None

    def process(batch: list[dict]) -> list:
        results: list = [None] * len(batch)
        changes = {}
        with extract.timed():
            for i, item in enumerate(batch):
                change, reason = load_change(repo, item["commit"], config)
                if reason:
                    extract.drop(reason)
                    results[i] = (None, reason)
                else:
                    extract.keep()
                    changes[i] = change
        if backend is None:
            for i, change in changes.items():
                c = batch[i]["commit"]
                results[i] = finish_pair(batch[i], change, clean_message(c.message), change["after"],
                                         change["before"], {"method": "commit_message"})
            return results
        explain, judge, rewrite = model_stages
        msgs = {i: clean_message(batch[i]["commit"].message) for i in changes}

        def ask(stage: StageStats, idx: list[int], make_prompt) -> dict[int, str]:
            if not idx:
                return {}
            with stage.timed():
                outs = backend.run([make_prompt(i) for i in idx], params)
            stats.requests += len(idx)
            for c in outs:
                stats.finish_reasons[c.finish_reason] += 1
                stats.response_chars += len(c.text)
            return {i: c.text for i, c in zip(idx, outs)}

        explanations = ask(explain, list(changes), lambda i: explain_prompt(
            msgs[i], changes[i]["before"], changes[i]["after"]))
        keep = []
        for i, text in explanations.items():
            if text.strip():
                explain.keep()
                keep.append(i)
            else:
                explain.drop("empty_response")
                results[i] = (None, "explain_empty_response")
        verdicts = ask(judge, keep, lambda i: judge_prompt(
            msgs[i], changes[i]["before"], changes[i]["after"], explanations[i].strip()))
        keep = []
        for i, text in verdicts.items():
            verdict = parse_judgement(text)
            if verdict is None:
                judge.drop("unparseable")
                results[i] = (None, "judge_unparseable")
            elif not verdict:
                judge.drop("not_improvement")
                results[i] = (None, "not_improvement")
            else:
                judge.keep()
                keep.append(i)
        rewrites = ask(rewrite, keep, lambda i: rewrite_prompt(
            msgs[i], changes[i]["before"], changes[i]["after"], explanations[i].strip()))
        for i, text in rewrites.items():
            parsed, why = parse_rewrite(text)
            if parsed is None:
                rewrite.drop(why)
                results[i] = (None, f"rewrite_{why}")
                continue
            try:
                ast.parse(parsed["naive"])
                ast.parse(parsed["improved"])
            except (SyntaxError, ValueError):
                rewrite.drop("syntax_error")
                results[i] = (None, "rewrite_syntax_error")
                continue
            rewrite.keep()
            results[i] = finish_pair(batch[i], changes[i], parsed["instruction"], parsed["improved"],
                                     parsed["naive"], {"method": "codefavor", "model": backend.model,
                                                       "explanation": explanations[i].strip(),
                                                       "commit_before": changes[i]["before"],
                                                       "commit_after": changes[i]["after"]})
        return results

    with StageOutput(output, fingerprint) as out:
        todo = [i for i in items if i["id"] not in out.done]
        stats.skipped_done, stats.resumed_kept = len(items) - len(todo), out.resumed_kept
        stats.resumed_dropped = out.resumed_dropped
        run_batches(todo, out, stats, process, batch_size, progress, "commits", len(items))
        stats.written = out.writer.written
        out.finish()
    stats.seconds = time.perf_counter() - start
    return stats
