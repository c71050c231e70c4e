"""Evaluation data adapters: each file format -> candidate sets (Best-of-N, multiple choice) or text pairs.

Files are read by path (``.gz`` transparently) and never copied anywhere. A bad record raises
:class:`DataError` naming the file, the 1-based line and the field, in preprocessing's words
(``FILE:LINE field 'X': reason``): every text that is scored (prompt, response, option) is read by the rule
preprocessing applies to its pairs (megapmp.io.text_field: present, a string, not empty or whitespace only).

Formats (``--format`` in tools/evaluate.py; :func:`detect_format` guesses from the first record):

gsm8k-solutions
    GSM8K ``example_model_solutions.jsonl``: ``{question, ground_truth, "6b_finetuning" | "6b_verification" |
    "175b_finetuning" | "175b_verification": {solution, is_correct}}`` -> 4 candidates per question,
    correctness from ``is_correct``. Prompt = the question.
candidates
    The generic candidate-set JSONL this module also writes:
    ``{"id", "prompt", "candidates": [{"response", "correct"}]}`` (``id`` optional: the line number).
codepmp-bon
    CodePMP's Best-of-N shards: lines ``{id, input, output, gold_answer}`` where ``output`` is one candidate
    string or a list of them; lines sharing an ``id`` are one question (in first-seen order, across all
    files of a directory, read in CodePMP's order: by the number after the last ``_`` of the name).
    Correctness: the candidate's final answer equals the gold answer's (:mod:`megapmp.eval.answers`,
    GSM8K ``#### n`` / last number, or MATH ``\\boxed{}``; ``answer_type`` auto-detects per question).
    Prompt = ``input`` as is.
logiqa2
    LogiQA 2.0 ``{id, answer, text, question, options[4], type}`` -> prompt = the passage and question in the
    paper's template (:data:`PASSAGE_TEMPLATE`), candidates = the options, ``answer`` the correct index.
reclor
    ReClor ``{context, question, answers[4], label, id_string}``, a JSON array (the official files) or JSONL;
    same template. The official test split has no labels and is refused.
codeprefbench
    CodePrefBench ``{task_id, instruction, choices[2], gt_choice}`` (``.jsonl.gz``); one file per aspect, the
    aspect being the file name stem (``correctness-alignment``). -> text pairs: chosen = choices[gt_choice].
pairs
    Preference pairs JSONL ``{prompt, chosen, rejected}`` (or CodePMP's ``query/better/worse``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megapmp.io import InputError, iter_jsonl as read_jsonl, text_field

GSM8K_SOLUTION_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
# CodePMP BoN_eval/RM_rank_inference_multi_option.py, "prompt_no_input_with_text" / "..._with_context":
# the option follows "Response:" directly.
PASSAGE_TEMPLATE = ("Instruction: Please answer the following questions based on the passages.\n\n"
                    "Passage: {passage}\n\nQuestion: {question}\n\nResponse:")
FORMATS = ("gsm8k-solutions", "candidates", "codepmp-bon", "logiqa2", "reclor", "codeprefbench", "pairs")


class DataError(ValueError):
    """A missing, unreadable or malformed evaluation file; the message names file, line and field."""


@dataclass
class CandidateSet:
    """One question: a prompt and its candidate responses with correctness labels."""

    id: str
    prompt: str
    responses: list[str]
    correct: list[bool]
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> int | None:
        """The index of the single correct candidate (multiple choice), else None."""
        hits = [i for i, c in enumerate(self.correct) if c]
        return hits[0] if len(hits) == 1 else None


@dataclass
class TextPair:
    """A preference pair in text; ``group`` is e.g. the CodePrefBench aspect."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    group: str = ""


# ------------------------------------------------------------------------------------------------
# reading


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a file")
    return path


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a JSONL file (``.gz`` allowed).

    Read through megapmp.io, the reader preprocessing uses: invalid UTF-8, lone surrogates,
    duplicate keys and truncated ``.gz`` files are DataErrors naming FILE:LINE."""
    path = _check_file(path)
    try:
        yield from read_jsonl(path)
    except InputError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def iter_records(path) -> Iterator[tuple[int, dict]]:
    """JSONL, or a JSON array of objects (ReClor's official files), with record numbers for errors."""
    path = _check_file(path)
    try:
        # Sniffed as bytes: a bad byte in the head is reported with its line by the JSONL reader.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4096).lstrip()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if head.startswith(b"["):
        try:
            with _open_text(path) as f:
                data = json.load(f)
        except (ValueError, OSError, EOFError) as e:  # UnicodeDecodeError is a ValueError
            raise DataError(f"{path}: not valid JSON ({e})") from None
        for i, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: record {i}: expected a JSON object")
            yield i, obj
    else:
        yield from iter_jsonl(path)


def bad_field(path, line_no, field: str, reason: str) -> DataError:
    """The DataError of a bad field, worded as preprocessing words it: ``FILE:LINE field 'X': reason``."""
    return DataError(str(InputError(str(path), line_no, field, reason)))


def require_field(path, line_no, obj: dict, key: str, kind, *, what: str | None = None, name: str | None = None):
    """``obj[key]`` checked to be of ``kind`` (str: a text, by preprocessing's rule; list; int: an integer or
    its decimal string; object: anything present), else a DataError naming FILE:LINE, the field (``name``,
    default ``key``: e.g. "175b_verification.solution" for a nested one) and, when missing, ``what`` it holds."""
    name = name or key
    if key not in obj:
        raise bad_field(path, line_no, name, "missing field" + (f" ({what})" if what else ""))
    if kind is str:
        try:
            return text_field(str(path), line_no, {name: obj[key]}, name)
        except InputError as e:
            raise DataError(str(e)) from None
    value = obj[key]
    if kind is list and not isinstance(value, list):
        raise bad_field(path, line_no, name, f"expected a list, got {type(value).__name__}")
    if kind is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_field(path, line_no, name, f"expected an integer index, got {value!r}")
    return value


def _texts(path, line_no, values: list, name: str) -> list[str]:
    """Each item of a list of texts (options, choices, outputs) by the text rule, named ``name[i]``."""
    return [require_field(path, line_no, {f"{name}[{i}]": v}, f"{name}[{i}]", str) for i, v in enumerate(values)]


def _limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ------------------------------------------------------------------------------------------------
# candidate sets


def load_gsm8k_solutions(path, limit: int | None = None) -> list[CandidateSet]:
    sets = []
    for line_no, obj in iter_jsonl(path):
        question = require_field(path, line_no, obj, "question", str)
        responses, correct = [], []
        for key in GSM8K_SOLUTION_KEYS:
            entry = require_field(path, line_no, obj, key, object)
            if not isinstance(entry, dict):
                raise bad_field(path, line_no, key, "expected an object {solution, is_correct}")
            solution = require_field(path, line_no, entry, "solution", str, name=f"{key}.solution")
            is_correct = entry.get("is_correct")
            if not isinstance(is_correct, bool):
                raise bad_field(path, line_no, f"{key}.is_correct", f"expected true or false, got {is_correct!r}")
            responses.append(solution)
            correct.append(is_correct)
        sets.append(CandidateSet(str(obj.get("id", f"line{line_no}")), question, responses, correct,
                                 {"sources": list(GSM8K_SOLUTION_KEYS)}))
        if limit is not None and len(sets) >= limit:
            break
    return sets


def candidates_record(path, line_no: int, obj: dict, *, labels_required: bool = True
                      ) -> tuple[str, list[str], list[bool | None]]:
    """(prompt, responses, labels) of one record of the candidates JSONL: ``{"id"?, "prompt", "candidates":
    [{"response": str, "correct": bool}, ...], "meta"?}``. With ``labels_required=False`` a candidate's
    ``correct`` may be absent (None: code-bon decides it by execution)."""
    prompt = require_field(path, line_no, obj, "prompt", str)
    candidates = require_field(path, line_no, obj, "candidates", list)
    if not candidates:
        raise bad_field(path, line_no, "candidates", "empty list")
    responses, labels = [], []
    for k, c in enumerate(candidates):
        if not isinstance(c, dict):
            raise bad_field(path, line_no, f"candidates[{k}]", "expected an object {response, correct}")
        response = require_field(path, line_no, c, "response", str, name=f"candidates[{k}].response")
        label = c.get("correct")
        if labels_required and not isinstance(label, bool):
            raise bad_field(path, line_no, f"candidates[{k}].correct", f"expected true or false, got {label!r}")
        if label is not None and not isinstance(label, bool):
            raise bad_field(path, line_no, f"candidates[{k}].correct", f"expected true, false or absent, got {label!r}")
        responses.append(response)
        labels.append(label)
    return prompt, responses, labels


def load_candidates(path, limit: int | None = None) -> list[CandidateSet]:
    sets = []
    for line_no, obj in iter_jsonl(path):
        prompt, responses, correct = candidates_record(path, line_no, obj)
        sets.append(CandidateSet(str(obj.get("id", f"line{line_no}")), prompt, responses, correct,
                                 obj.get("meta") or {}))
        if limit is not None and len(sets) >= limit:
            break
    return sets


def codepmp_shard_files(path) -> list[Path]:
    """A file as is; a directory -> its *.json / *.jsonl files in CodePMP's order (the number after the
    last '_' before the extension, then the name)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = [p for p in path.iterdir() if p.is_file() and re.search(r"\.jsonl?(\.gz)?$", p.name)]
    if not files:
        raise DataError(f"{path}: no .json/.jsonl shard files in the directory")

    def key(p: Path):
        stem = re.sub(r"\.jsonl?(\.gz)?$", "", p.name)
        number = re.search(r"_(\d+)$", stem)
        return (int(number.group(1)) if number else -1, p.name)

    return sorted(files, key=key)


def load_codepmp_bon(path, limit: int | None = None, answer_type: str = "auto") -> list[CandidateSet]:
    from megapmp.eval.answers import ANSWER_TYPES, detect_answer_type, is_correct

    if answer_type != "auto" and answer_type not in ANSWER_TYPES:
        raise DataError(f"answer type {answer_type!r} is not auto, {', '.join(ANSWER_TYPES)}")
    questions: dict[str, dict] = {}
    for file in codepmp_shard_files(path):
        for line_no, obj in iter_jsonl(file):
            if "id" not in obj:
                raise bad_field(file, line_no, "id", "missing field")
            qid = str(obj["id"])
            prompt = require_field(file, line_no, obj, "input", str)
            gold = obj.get("gold_answer", obj.get("answer"))
            if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
                raise bad_field(file, line_no, "gold_answer", "missing, or not a string or number")
            gold = str(gold)
            output = require_field(file, line_no, obj, "output", object)
            outputs = _texts(file, line_no, output, "output") if isinstance(output, list) else \
                [require_field(file, line_no, obj, "output", str)]
            q = questions.get(qid)
            if q is None:
                if limit is not None and len(questions) >= limit:
                    continue
                q = questions[qid] = {"prompt": prompt, "gold": gold, "responses": [], "where": f"{file}:{line_no}"}
            elif q["gold"] != gold:
                raise DataError(f"{file}:{line_no}: id {qid!r} has gold_answer {gold[:60]!r}, but "
                                f"{q['where']} gave {q['gold'][:60]!r}")
            elif q["prompt"] != prompt:
                raise DataError(f"{file}:{line_no}: id {qid!r} has a different input than at {q['where']}")
            q["responses"] += outputs
    sets = []
    for qid, q in questions.items():
        kind = detect_answer_type(q["gold"]) if answer_type == "auto" else answer_type
        correct = [is_correct(r, q["gold"], kind) for r in q["responses"]]
        sets.append(CandidateSet(qid, q["prompt"], q["responses"], correct, {"gold": q["gold"], "answer_type": kind}))
    return sets


def _choice_set(path, line_no, qid, passage, question, options, answer, names=("options", "answer")) -> CandidateSet:
    if len(options) < 2:
        raise bad_field(path, line_no, names[0], f"expected a list of at least 2 options, got {len(options)}")
    options = _texts(path, line_no, options, names[0])
    if not 0 <= answer < len(options):
        raise bad_field(path, line_no, names[1], f"answer index {answer} outside the {len(options)} options")
    prompt = PASSAGE_TEMPLATE.replace("{passage}", passage).replace("{question}", question)
    return CandidateSet(qid, prompt, list(options), [i == answer for i in range(len(options))], {"answer": answer})


def load_logiqa2(path, limit: int | None = None) -> list[CandidateSet]:
    sets = []
    for line_no, obj in iter_jsonl(path):
        sets.append(_choice_set(path, line_no, str(obj.get("id", f"line{line_no}")),
                                require_field(path, line_no, obj, "text", str), require_field(path, line_no, obj, "question", str),
                                require_field(path, line_no, obj, "options", list), require_field(path, line_no, obj, "answer", int)))
        if limit is not None and len(sets) >= limit:
            break
    return sets


def load_reclor(path, limit: int | None = None) -> list[CandidateSet]:
    sets = []
    for line_no, obj in iter_records(path):
        if "label" not in obj:
            raise bad_field(path, line_no, "label", "missing field (the ReClor test split is unlabelled: use val)")
        sets.append(_choice_set(path, line_no, str(obj.get("id_string", obj.get("id", f"record{line_no}"))),
                                require_field(path, line_no, obj, "context", str), require_field(path, line_no, obj, "question", str),
                                require_field(path, line_no, obj, "answers", list), require_field(path, line_no, obj, "label", int),
                                names=("answers", "label")))
        if limit is not None and len(sets) >= limit:
            break
    return sets


# ------------------------------------------------------------------------------------------------
# pairs


def aspect_of(path) -> str:
    """CodePrefBench aspect of a file: its name without .jsonl(.gz) / .json(.gz)."""
    return re.sub(r"\.jsonl?(\.gz)?$", "", Path(path).name)


def codeprefbench_files(paths: Sequence) -> list[Path]:
    """Files as given; a directory -> its *.jsonl(.gz) files, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if re.search(r"\.jsonl(\.gz)?$", q.name))
            if not found:
                raise DataError(f"{p}: no .jsonl / .jsonl.gz files in the directory")
            out += found
        else:
            out.append(_check_file(p))
    return out


def load_codeprefbench(paths, limit: int | None = None) -> list[TextPair]:
    """Pairs of every file (``limit`` applies per file, i.e. per aspect)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    pairs = []
    for path in codeprefbench_files(paths):
        aspect, count = aspect_of(path), 0
        for line_no, obj in iter_jsonl(path):
            instruction = require_field(path, line_no, obj, "instruction", str)
            choices = require_field(path, line_no, obj, "choices", list)
            gt = require_field(path, line_no, obj, "gt_choice", int)
            if len(choices) != 2:
                raise bad_field(path, line_no, "choices", f"expected a list of 2 texts, got {len(choices)}")
            choices = _texts(path, line_no, choices, "choices")
            if gt not in (0, 1):
                raise bad_field(path, line_no, "gt_choice", f"expected 0 or 1, got {gt}")
            pairs.append(TextPair(str(obj.get("task_id", f"line{line_no}")), instruction, choices[gt],
                                  choices[1 - gt], aspect))
            count += 1
            if limit is not None and count >= limit:
                break
    return pairs


PAIR_KEYS = (("prompt", "chosen", "rejected"), ("query", "better", "worse"))


def load_pairs(path, limit: int | None = None) -> list[TextPair]:
    pairs = []
    for line_no, obj in iter_jsonl(path):
        keys = next((k for k in PAIR_KEYS if k[0] in obj), PAIR_KEYS[0])
        prompt, chosen, rejected = (require_field(path, line_no, obj, k, str) for k in keys)
        pairs.append(TextPair(str(obj.get("id", f"line{line_no}")), prompt, chosen, rejected, str(obj.get("group", ""))))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


# ------------------------------------------------------------------------------------------------
# dispatch


def detect_format(path) -> str:
    """Guess the format from the first record's keys (a directory: codepmp-bon or codeprefbench)."""
    path = Path(path)
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if any(n.endswith(".jsonl.gz") for n in names):
            return "codeprefbench"
        return "codepmp-bon"
    first = next(iter_records(path), None)
    if first is None:
        raise DataError(f"{path}: empty file")
    keys = set(first[1])
    rules = (
        ("gsm8k-solutions", {"question", *GSM8K_SOLUTION_KEYS}),
        ("candidates", {"prompt", "candidates"}),
        ("codepmp-bon", {"id", "input", "output"}),
        ("logiqa2", {"text", "question", "options", "answer"}),
        ("reclor", {"context", "question", "answers"}),
        ("codeprefbench", {"instruction", "choices", "gt_choice"}),
        ("pairs", {"prompt", "chosen", "rejected"}),
        ("pairs", {"query", "better", "worse"}),
    )
    for name, needed in rules:
        if needed <= keys:
            return name
    raise DataError(f"{path}: cannot tell the format from the first record's keys {sorted(keys)}: pass --format "
                    f"({', '.join(FORMATS)})")


CANDIDATE_LOADERS = {
    "gsm8k-solutions": load_gsm8k_solutions,
    "candidates": load_candidates,
    "codepmp-bon": load_codepmp_bon,
    "logiqa2": load_logiqa2,
    "reclor": load_reclor,
}


def load_candidate_sets(path, fmt: str | None = None, limit: int | None = None, **options) -> tuple[str, list]:
    """(format, candidate sets) of a file in any candidate format (``fmt=None``: detected)."""
    fmt = fmt or detect_format(path)
    if fmt not in CANDIDATE_LOADERS:
        raise DataError(f"{path}: format {fmt!r} holds no candidate sets; expected one of "
                        f"{', '.join(CANDIDATE_LOADERS)}")
    loader = CANDIDATE_LOADERS[fmt]
    sets = loader(path, limit, **options) if fmt == "codepmp-bon" else loader(path, limit)
    if not sets:
        raise DataError(f"{path}: no questions")
    return fmt, sets
