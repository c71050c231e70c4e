"""The model-free CodePMP pair path: collect -> describe -> mutate -> filter -> JSONL -> shards.

Mutants of hand-written, trusted functions are executed in-process to show they change behaviour;
generated code from real sources is never executed here.
"""

from __future__ import annotations

import ast
import difflib
import json
import sysconfig
import textwrap
from pathlib import Path

import pytest

from megapmp.data.preprocess import build_shard
from megapmp.synth import stages
from megapmp.synth.collect import CollectConfig, collect
from megapmp.synth.filters import PairFilter
from megapmp.synth.rules import MUTATION_KINDS, describe, mutate
from tool_loader import load_tool

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A few stdlib modules: real code with docstrings, comments and odd formatting (~80 pairs).
SMALL_SOURCES = [STDLIB / "json", STDLIB / "heapq.py", STDLIB / "bisect.py", STDLIB / "textwrap.py",
                 STDLIB / "fractions.py"]


TOOL = load_tool("synthesize_pairs")


# ---------------------------------------------------------------------------------------------------
# Mutations: each kind compiles, changes behaviour, and leaves the rest of the text untouched

# name, source, inputs (argument tuples). Every site of the kind changes some output on these inputs.
KIND_CASES = {
    "operator_swap": ("score", '''
        def score(a, b, c):
            """Combine three numbers."""
            if a < b and c != 0:
                return a + b * c
            return a - c
        ''', [(a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]),
    "off_by_one": ("window", '''
        def window(xs, k):
            out = []
            for i in range(len(xs) - k + 1):
                out.append(sum(xs[i:i + k]))
            return out
        ''', [([1, 2, 3, 4, 5], 2), ([4, 1, 7], 1), ([2, 9, 4, 6], 3)]),
    "drop_statement": ("normalize", '''
        def normalize(xs):
            total = sum(xs)
            if total == 0:
                return list(xs)
            scaled = [x / total for x in xs]
            scaled.sort()
            return scaled
        ''', [([3, 1, 2],), ([0, 0],), ([1, -1],)]),
    "wrong_variable": ("affine", '''
        def affine(x, scale, shift):
            y = x * scale
            return y + shift
        ''', [(2, 3, 5), (7, -1, 4)]),
    # Loops over a shrinking list: a negated loop condition must still terminate in this process.
    "negate_condition": ("drain", '''
        def drain(items, limit):
            taken = []
            while items:
                taken.append(items.pop())
                if len(taken) > limit:
                    return taken
            return taken if taken else None
        ''', [([1, 2, 3], 1), ([1, 2, 3], 5), ([], 0)]),
}


def _run(code: str, name: str, inputs: list[tuple]) -> list:
    namespace: dict = {}
    exec(compile(code, "<test>", "exec"), namespace)  # trusted, hand-written snippets only
    outputs = []
    for args in inputs:
        try:
            outputs.append(repr(namespace[name](*[list(a) if isinstance(a, list) else a for a in args])))
        except Exception as e:  # a mutant that raises behaves differently too
            outputs.append(f"raised {type(e).__name__}")
    return outputs


@pytest.mark.parametrize("kind", MUTATION_KINDS)
def test_mutation_kind_changes_behaviour_and_nothing_else(kind):
    name, source, inputs = KIND_CASES[kind]
    code = textwrap.dedent(source).lstrip()
    expected = _run(code, name, inputs)
    seen = set()
    for seed in range(6):
        m = mutate(code, seed=seed, key="case", kinds=(kind,))
        assert m is not None and m.kind == kind
        seen.add(m.detail + str(m.line))
        compile(m.code, "<mutant>", "exec")
        assert ast.unparse(ast.parse(m.code)) != ast.unparse(ast.parse(code))
        assert _run(m.code, name, inputs) != expected, f"{kind} {m.detail}: same behaviour"
        # Formatting: one hunk, on the mutated line (or the dropped statement's lines) only.
        opcodes = [op for op in difflib.SequenceMatcher(None, code.splitlines(), m.code.splitlines()).get_opcodes()
                   if op[0] != "equal"]
        assert len(opcodes) == 1, opcodes
        tag, i1, i2, j1, j2 = opcodes[0]
        assert i1 + 1 == m.line
        if kind == "drop_statement":
            assert tag == "delete"
        else:
            assert (tag, i2 - i1, j2 - j1) == ("replace", 1, 1)
    assert len(seen) > 1, "the seed should pick different sites"


def test_mutation_keeps_comments_quotes_and_spacing():
    code = textwrap.dedent('''
        def total_price(items,   tax=0.2):  # odd spacing on purpose
            """Sum prices; 'single' and "double" quotes stay."""
            subtotal  =  sum(p for p in items)   # trailing comment
            # a comment line between statements
            return round(subtotal*(1+tax), 2)
        ''').lstrip()
    lines = code.splitlines()
    for seed in range(10):
        m = mutate(code, seed=seed, key="fmt")
        mutant_lines = m.code.splitlines()
        changed = [line for line in mutant_lines if line not in lines]
        assert len(changed) <= 1
        # Every original line is still there verbatim, except the one mutated or dropped.
        assert sum(line not in mutant_lines for line in lines) == 1


def test_mutation_is_deterministic_and_verified():
    code = KIND_CASES["operator_swap"][1]
    code = textwrap.dedent(code).lstrip()
    assert mutate(code, seed=3, key="a") == mutate(code, seed=3, key="a")
    # An edit whose text would parse with another precedence is rejected, not mislabelled: in
    # `a | (b & c)`, swapping either operator gives text that re-associates as `(a ? b) ? c`.
    tricky = "def f(a, b, c):\n    return a | b & c\n"
    assert all(mutate(tricky, seed=s, key="p", kinds=("operator_swap",)) is None for s in range(8))
    assert mutate("def f(a, b, c):\n    return a & b | c\n", seed=0, key="p", kinds=("operator_swap",)).code in (
        "def f(a, b, c):\n    return a | b | c\n", "def f(a, b, c):\n    return a & b & c\n")
    assert mutate("def f():\n    return None\n", seed=0, key="k") is None


# ---------------------------------------------------------------------------------------------------
# Description


def test_describe_function_with_docstring_args_annotations_comments():
    code = textwrap.dedent('''
        def retry(fn, attempts: int = 3, *, delay: float = 0.5) -> object:
            """Call fn until it succeeds.

            Longer explanation that the first-paragraph mode leaves out.
            """
            for _ in range(attempts):  # bounded: never loop forever
                try:
                    return fn()
                except OSError:
                    time.sleep(delay)
            raise RuntimeError("gave up")
        ''').lstrip()
    text = describe(code, "retry")
    assert text == (
        "Write a Python function `retry(fn, attempts: int=3, *, delay: float=0.5) -> object` that calls fn "
        "until it succeeds.\n\n"
        "It returns a value of type `object`. It raises `RuntimeError`. It calls `range`, `fn` and `time.sleep`.\n\n"
        "Implementation notes: bounded: never loop forever.")


def test_describe_method_class_and_too_little_content():
    method = "@property\ndef size(self) -> int:\n    \"\"\"Number of items.\"\"\"\n    return len(self._items)\n"
    assert describe(method, "Bag.size").startswith(
        "Write a Python method `size(self) -> int` of the class `Bag`, decorated with `@property`. "
        "Number of items.")
    cls = "class Point(NamedTuple):\n    \"\"\"A 2-D point.\"\"\"\n    x: float\n    y: float\n"
    assert describe(cls, "Point") == ("Write a Python class `Point(NamedTuple)`. A 2-D point.\n\n"
                                      "It defines `x` and `y`.")
    # No docstring, no comments, one fact: a bare signature is not a description.
    assert describe("def f(x):\n    y = x\n    return y\n", "f") is None


# ---------------------------------------------------------------------------------------------------
# Collection

LONG_FUNCTION = textwrap.dedent('''
    def tokenize_line(line, keep_comments=False):
        """Split one line of a config file into tokens."""
        tokens = []
        word = ""
        quoted = False
        for index, char in enumerate(line):
            if char == '"':
                quoted = not quoted
                continue
            if char == "#" and not quoted:
                if keep_comments:
                    tokens.append(line[index:])
                break
            if char.isspace() and not quoted:
                if word:
                    tokens.append(word)
                word = ""
                continue
            word += char
        if word:
            tokens.append(word)
        return tokens
    ''').lstrip()
GOOD = LONG_FUNCTION + textwrap.dedent('''

    class Stack:
        """A list-backed stack."""

        def push(self, item):
            # append at the end: amortised O(1)
            self._items.append(item)
            return len(self._items)

        @property
        def top(self):
            """The last item pushed."""
            return self._items[-1]
    ''')


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _fixture_repo(root: Path) -> Path:
    repo = root / "myrepo"
    _write(repo / ".git" / "HEAD", "ref: refs/heads/main\n")
    _write(repo / ".git" / "refs" / "heads" / "main", "0123456789abcdef0123456789abcdef01234567\n")
    _write(repo / "LICENSE", "MIT License\n\nPermission is hereby granted, free of charge, to any person ...\n")
    _write(repo / "pkg" / "good.py", "import os\n\n\n" + GOOD)
    _write(repo / "pkg" / "good_copy.py", ("import os\n\n\n" + GOOD).replace("\n", "   \r\n"))  # exact duplicate
    near = LONG_FUNCTION.replace("tokenize_line", "split_line").replace('word = ""\n        continue',
                                                                         'word = ""\n        continue  # next')
    _write(repo / "pkg" / "near.py", near)
    _write(repo / "pkg" / "generated.py", "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + GOOD)
    _write(repo / "pkg" / "msg_pb2.py", "\n".join(f"X{i} = {i}" for i in range(50)) + "\n")
    _write(repo / "pkg" / "latin.py", "# caf\xe9\n".encode("latin-1") + GOOD.encode())
    _write(repo / "pkg" / "tiny.py", "x = 1\n")
    _write(repo / "web" / "bundle.js", "var a=1;" * 800 + "\n")
    _write(repo / "web" / "util.go", "package util\n\n// Add adds.\nfunc Add(a, b int) int {\n\treturn a + b\n}\n")
    notebook = {"nbformat": 4, "cells": [
        {"cell_type": "markdown", "source": ["# Title"]},
        {"cell_type": "code", "source": ["%matplotlib inline\n", "def area(w, h):\n",
                                         "    \"\"\"Area of a rectangle.\"\"\"\n", "    product = w * h\n",
                                         "    return product\n"]}]}
    _write(repo / "nb" / "demo.ipynb", json.dumps(notebook))
    _write(repo / "vendor" / "lib" / "LICENSE.txt", "Apache License, Version 2.0\n")
    _write(repo / "vendor" / "lib" / "helpers.py", textwrap.dedent('''
        def double(x):
            """Twice x, for anything that supports addition."""
            y = x + x
            return y
        '''))
    return repo


def test_collect_filters_dedupes_and_records_provenance(tmp_path):
    repo = _fixture_repo(tmp_path)
    snippets, stats = collect([repo], CollectConfig(min_lines=3))
    files = stats.files.as_dict()
    assert files["dropped"] == {"generated": 2, "minified": 1, "non_utf8": 1, "too_small": 1}
    assert stats.snippets.as_dict()["dropped"]["exact_duplicate"] == 3  # good_copy.py: the first in walk order wins
    assert stats.snippets.as_dict()["dropped"]["near_duplicate"] == 1  # near.py
    names = {(s["path"], s["name"]) for s in snippets}
    assert names == {("pkg/good.py", "tokenize_line"), ("pkg/good.py", "Stack.push"), ("pkg/good.py", "Stack.top"),
                     ("nb/demo.ipynb", "area"), ("vendor/lib/helpers.py", "double"), ("web/util.go", "util")}
    by_name = {s["name"]: s for s in snippets}
    push = by_name["Stack.push"]
    assert push["repo"] == "myrepo" and push["license"] == "MIT" and push["language"] == "python"
    assert push["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert push["code"].startswith("def push(self, item):\n    # append at the end")  # dedented, as written
    assert (GOOD.splitlines()[push["lineno"] - 4]).strip() == "def push(self, item):"  # 3 header lines in good.py
    assert by_name["Stack.top"]["code"].startswith("@property\ndef top(self):")
    assert by_name["double"]["license"] == "Apache-2.0"  # the nearest licence wins
    assert by_name["util"]["language"] == "go" and by_name["util"]["code"].startswith("package util")
    assert "# %matplotlib inline" not in by_name["area"]["code"] and "product = w * h" in by_name["area"]["code"]
    assert len({s["id"] for s in snippets}) == len(snippets)
    # Python only, and the same walk again: same snippets, same order, same ids.
    python_only, _ = collect([repo], CollectConfig(languages=("python",)))
    assert [s for s in snippets if s["language"] == "python"] == python_only


# ---------------------------------------------------------------------------------------------------
# The CLI: determinism, resume, shards


def _rules(out: Path, *extra: str) -> int:
    return TOOL.main(["rules", "--source", *map(str, SMALL_SOURCES), "--output", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "pairs.jsonl"
    assert _rules(out, "--seed", "7", "--stats", str(out.with_suffix(".stats.json"))) == 0
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["pairs_written"] == len(out.read_bytes().splitlines()) > 50
    return out.read_bytes()


def test_cli_is_deterministic(tmp_path, reference):
    out = tmp_path / "again.jsonl"
    assert _rules(out, "--seed", "7") == 0
    assert out.read_bytes() == reference
    assert _rules(tmp_path / "other.jsonl", "--seed", "8") == 0
    assert (tmp_path / "other.jsonl").read_bytes() != reference
    assert not list(tmp_path.glob("*.partial*"))


def test_cli_workers_give_identical_output(tmp_path, reference):
    out = tmp_path / "w2.jsonl"
    assert _rules(out, "--seed", "7", "--workers", "2") == 0
    assert out.read_bytes() == reference


def test_limit_gives_a_prefix(tmp_path, reference):
    out = tmp_path / "head.jsonl"
    assert _rules(out, "--seed", "7", "--limit", "25") == 0
    assert out.read_bytes().splitlines() == reference.splitlines()[:25]


def _interrupted_run(out: Path, monkeypatch, after: int) -> Path:
    """Run until the `after`-th pair is about to be written, then raise as a Ctrl-C would."""
    real_write = stages.ResumableJsonlWriter.write
    calls = {"n": 0}

    def write_then_die(self, record):
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt
        real_write(self, record)

    monkeypatch.setattr(stages.ResumableJsonlWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _rules(out, "--seed", "7", "--flush-every", "8")
    monkeypatch.setattr(stages.ResumableJsonlWriter, "write", real_write)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_bytes().splitlines()) == after - 1
    return partial


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, reference, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    partial = _interrupted_run(out, monkeypatch, after=40)
    # A kill can also tear the last line: keep 20 whole lines and half of the 21st.
    lines = partial.read_bytes().splitlines(keepends=True)
    partial.write_bytes(b"".join(lines[:20]) + lines[20][: len(lines[20]) // 2])
    # Other options must not silently mix into the partial output.
    assert _rules(out, "--seed", "8") == 1 and partial.exists()
    assert _rules(out, "--seed", "7", "--stats", str(tmp_path / "stats.json")) == 0
    assert out.read_bytes() == reference
    assert not partial.exists() and not (tmp_path / "pairs.jsonl.partial.json").exists()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["resumed_pairs"] == 20 and stats["pairs_written"] == len(reference.splitlines())


def test_resume_with_a_smaller_limit_gives_a_prefix(tmp_path, reference, monkeypatch):
    out = tmp_path / "pairs.jsonl"
    _interrupted_run(out, monkeypatch, after=30)
    assert _rules(out, "--seed", "7", "--limit", "10") == 0
    assert out.read_bytes().splitlines() == reference.splitlines()[:10]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(tmp_path, reference, capsys):
    """Two runs on one output would interleave their lines and rename each other's half-written file: the
    second is refused in one line, and the first's partial output is untouched and finishes as it would."""
    out = tmp_path / "pairs.jsonl"
    first = stages.ResumableJsonlWriter(out, {"run": "first"})
    with first:
        first.write({"id": "a", "text": "kept"})
        first._sync()
        with pytest.raises(stages.OutputInUseError):  # the same options, which a resume would have taken
            stages.ResumableJsonlWriter(out, {"run": "first"}).__enter__()
        assert _rules(out, "--seed", "7") == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {out}.partial is being written by another process: one run per output at a time; "
                       "wait for it to end, or pass another output")
        assert first.partial.read_bytes() == b'{"id": "a", "text": "kept"}\n' and not out.exists()
        first.write({"id": "b", "text": "kept"})
        first.finish()
    assert out.read_bytes() == b'{"id": "a", "text": "kept"}\n{"id": "b", "text": "kept"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]
    assert _rules(out, "--seed", "7") == 0 and out.read_bytes() == reference  # free again once it ended


def test_a_start_that_locks_a_partial_file_renamed_away_opens_it_again(tmp_path, monkeypatch):
    """The other order: the second run opens OUTPUT.partial, the first finishes (renames it to OUTPUT and
    lets go), and only then does the second take the lock, on what is now the finished output. It must see
    that and start on a new partial file rather than append to, and later rename, the finished one."""
    out = tmp_path / "pairs.jsonl"
    first = stages.ResumableJsonlWriter(out, {"run": "first"}).__enter__()
    first.write({"id": "a", "text": "first"})
    import fcntl

    real_flock, calls = fcntl.flock, []

    def finish_the_first_run_then_lock(fd, operation):
        if not calls:
            first.finish()
        calls.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", finish_the_first_run_then_lock)
    with stages.ResumableJsonlWriter(out, {"run": "second"}) as second:
        assert len(calls) == 2 and not second.resuming and second.done == set()
        second.write({"id": "z", "text": "second"})
        second._sync()
        assert out.read_bytes() == b'{"id": "a", "text": "first"}\n'  # the finished output, untouched
        assert second.partial.read_bytes() == b'{"id": "z", "text": "second"}\n'
        second.finish()
    assert out.read_bytes() == b'{"id": "z", "text": "second"}\n'


def test_a_stage_output_resumes_its_dropped_ids_and_lets_the_lock_go_on_an_error(tmp_path, monkeypatch):
    """StageOutput (the LLM stages' writer): a resume reads the dropped ids up to the first line that is not
    one of its records (torn, or no "reason") and cuts the file there; an error while it opens lets the
    output's lock go, so the next start in the same process is not refused."""
    from megapmp.synth.generate import StageOutput

    out = tmp_path / "pairs.jsonl"
    with StageOutput(out, {"run": 1}) as first:
        first.write({"id": "a"})
        first.drop("b", "no code")
        first.sync()
    dropped = first.dropped_path
    dropped.write_bytes(dropped.read_bytes() + b'{"id": "c"}\n{"id": "d", "reason": "late"}\n')
    with StageOutput(out, {"run": 1}):  # an id that is not a string is not one of its records either
        pass
    dropped.write_bytes(dropped.read_bytes() + b'{"id": ["e"], "reason": "x"}\n{"id": "f", "reason": "late"}\n')
    with StageOutput(out, {"run": 1}) as second:
        assert second.done == {"a", "b"} and second.resumed_dropped == {"no code": 1}
    assert dropped.read_bytes() == b'{"id": "b", "reason": "no code"}\n'

    def fail(self):
        raise OSError("disk gone")

    monkeypatch.setattr(StageOutput, "_open_dropped", fail)
    failed = StageOutput(out, {"run": 1})
    with pytest.raises(OSError, match="disk gone"):
        failed.__enter__()
    monkeypatch.undo()
    with StageOutput(out, {"run": 1}) as third:  # refused as "being written by another process" before
        third.finish()
    assert out.read_bytes() == b'{"id": "a"}\n'


def test_pairs_have_provenance_and_preprocess_without_rejects(tmp_path, reference):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(reference)
    records = [json.loads(line) for line in reference.splitlines()]
    for r in records:
        assert {"id", "prompt", "chosen", "rejected", "repo", "path", "license", "name", "mutation"} <= r.keys()
        assert r["chosen"] != r["rejected"] and r["prompt"].startswith("Write a Python")
        assert PairFilter().reason_to_drop(r["prompt"], r["chosen"], r["rejected"]) is None
    assert {r["mutation"] for r in records} == set(MUTATION_KINDS)
    stats = build_shard([str(pairs)], str(tmp_path / "shard"), progress=False)
    assert stats["rejected"] == 0 and stats["pairs"] == len(records)


def test_collect_subcommand_and_rules_from_snippets(tmp_path, reference):
    snippets = tmp_path / "snippets.jsonl"
    assert TOOL.main(["collect", "--source", *map(str, SMALL_SOURCES), "--languages", "python",
                      "--output", str(snippets), "--no-progress"]) == 0
    out = tmp_path / "pairs.jsonl"
    assert TOOL.main(["rules", "--snippets", str(snippets), "--output", str(out), "--seed", "7",
                      "--no-progress"]) == 0
    assert out.read_bytes() == reference


def test_help_documents_every_flag(capsys):
    for command in ("rules", "collect"):
        with pytest.raises(SystemExit):
            TOOL.main([command, "--help"])
        text = capsys.readouterr().out
        parser = TOOL.build_parser()._subparsers._group_actions[0].choices[command]
        for action in parser._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[0] in text
