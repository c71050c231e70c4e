#!/usr/bin/env python
"""GSM8K-derived reward-model finetuning pairs: the reference solution vs the same solution with one
arithmetic step made wrong and the error carried forward.

    python tools/make_gsm8k_pairs.py --input ../shared/data/gsm8k/train.jsonl --output data/gsm8k_pairs.jsonl

Input: GSM8K ``train.jsonl`` (``{"question", "answer"}``; the answer's steps carry calculator annotations
``<<expr=value>>`` and its last line is ``#### n``). Build finetuning pairs from the train split only:
a file named like a test split is refused unless ``--allow-test-split`` (for an rm-accuracy evaluation set,
never for training).

Output JSONL, one pair per usable question: ``prompt`` (the question), ``chosen`` (the reference solution
with the annotations removed, ``#### n`` kept), ``rejected`` (the corrupted solution), and ``id``,
``corrupted_step`` (1-based index of the annotated equation made wrong), ``original_value``,
``corrupted_value``, ``changed_steps`` ([{step, old, new}], the corrupted one first), ``final_answer`` and
``corrupted_final_answer``. Written to a temporary file and renamed. Stats go to stderr (and ``--stats``).

Algorithm (per question, with a random generator seeded by ``--seed`` and the line number, so ``--limit``
never changes earlier pairs):

1. Parse every annotation ``<<expr=value>>``: ``expr`` is evaluated exactly (fractions) by a small parser of
   numbers, ``+ - * / **`` and parentheses; a step whose expression does not evaluate to its value (up to the
   value's printed decimals) is *opaque*.
2. A step is *eligible* for corruption if it is not opaque, its result is positive and printed right after the
   annotation, and its value is *unambiguous*: it does not occur among the question's numbers, no other
   step has the same result, and it is not printed anywhere before that step.
3. For an eligible step (tried in random order) and a wrong value (tried in random order: +-1, +-2, +-3, +-5,
   +-10, x2, /2, x10, /10; integer results stay integers, the wrong value must be positive and occur
   nowhere in the question or solution), carry the error forward: every later annotation whose
   expression contains a number equal to a changed result's old value gets that number replaced by the new
   value and is re-evaluated; if its result changes, it joins the changed results. A recomputed result must
   be positive with at most two decimals and its old value must be unambiguous (as in 2); otherwise the
   attempt is rejected.
4. The attempt is accepted only if the final answer (``#### n``) is the old value of a changed result, i.e.
   the final answer is now wrong.
5. The rejected text is the annotation-free solution in which every printed number equal to a changed
   result's old value is replaced by its new value (printed alike: thousands separators and two-decimal
   money amounts are kept). The operands printed in the corrupted step itself stay: only its result is wrong.

Limits: dependencies are found by numeric equality, so a later use of a value that was rounded, converted
(e.g. 0.5 written as 50%) or combined in prose without an annotation is not carried forward; the
unambiguity rules skip such questions rather than guess. Prose that restates a changed value is updated,
prose that derives new numbers without an annotation is not. Questions without annotations, or where no
attempt passes, are skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from megapmp.io import InputError, atomic_open, iter_jsonl, jsonl_line, write_text_atomic

ANNOTATION = re.compile(r"<<([^<>]*)>>")
# A printed number: 1,234.5 / 1234 / 12.50 / .5 — not part of a longer number, not after "3," in a list.
VISIBLE_NUMBER = re.compile(r"(?<![\d.])(?<!\d,)(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
EXPR_TOKEN = re.compile(r"\s*(?:(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)|(\*\*|[-+*/()]))")
FINAL = re.compile(r"####\s*(.+?)\s*$")
MAX_DECIMALS = 2
# Parentheses, unary signs and powers nest at most this deep in an expression we evaluate: the parser is
# recursive, and a deeper (hostile or garbled) annotation is opaque instead of a RecursionError.
MAX_NESTING = 64

SKIP_REASONS = ("no_equations", "no_final_answer", "no_eligible_step", "no_valid_corruption")


# A number as GSM8K prints one (no exponent: Fraction("1e999999999") would build a billion-digit integer),
# of at most MAX_NUMBER_CHARS characters (a value far beyond any real answer is treated as no number).
PLAIN_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")
MAX_NUMBER_CHARS = 40


def to_fraction(text: str) -> Fraction | None:
    text = text.replace(",", "").strip()
    if len(text) > MAX_NUMBER_CHARS or not PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


# ---------------------------------------------------------------------------------------------------
# exact arithmetic over annotation expressions


def tokenize_expr(expr: str) -> list[list] | None:
    """[[kind, text, value]]: kind "num" (value a Fraction) or "op"; None if anything else is in it."""
    tokens, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = EXPR_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            return None
        number, op = m.groups()
        if number and to_fraction(number) is None:
            return None  # a number too long to be a real one: the step is opaque
        tokens.append(["num", number, to_fraction(number)] if number else ["op", op, None])
        pos = m.end()
    return tokens or None


def evaluate(tokens: list[list]) -> Fraction | None:
    """Exact value of a tokenized expression (numbers, + - * / ** and parentheses); None if invalid or nested
    deeper than MAX_NESTING."""
    if not tokens:
        return None
    pos = 0
    depth = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom():
        t = peek()
        if t is None:
            raise ValueError
        if t[0] == "num":
            return take()[2]
        if t[1] == "(":
            take()
            value = expr()
            if peek() is None or peek()[1] != ")":
                raise ValueError
            take()
            return value
        raise ValueError

    def power():
        base = atom()
        if peek() is not None and peek()[1] == "**":
            take()
            exponent = factor()
            if exponent.denominator != 1 or abs(exponent) > 12:
                raise ValueError
            return base ** int(exponent)
        return base

    def factor():
        # Every recursion (parentheses, unary signs, exponents) passes through here: bound it.
        nonlocal depth
        depth += 1
        if depth > MAX_NESTING:
            raise ValueError
        try:
            t = peek()
            if t is not None and t[1] in "+-" and t[0] == "op":
                take()
                value = factor()
                return -value if t[1] == "-" else value
            return power()
        finally:
            depth -= 1

    def term():
        value = factor()
        while peek() is not None and peek()[1] in ("*", "/"):
            op = take()[1]
            right = factor()
            value = value * right if op == "*" else value / right
        return value

    def expr():
        value = term()
        while peek() is not None and peek()[0] == "op" and peek()[1] in "+-":
            op = take()[1]
            right = term()
            value = value + right if op == "+" else value - right
        return value

    try:
        value = expr()
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if pos == len(tokens) else None


def _decimals(text: str) -> int:
    text = text.replace(",", "")
    return len(text.split(".", 1)[1]) if "." in text else 0


def matches_printed(value: Fraction, printed: str) -> bool:
    """Does the exact value round to the printed value at the printed number of decimals?"""
    target = to_fraction(printed)
    if target is None:
        return False
    scale = 10 ** _decimals(printed)
    return abs(value - target) * scale <= Fraction(1, 2)


def format_like(value: Fraction, like: str) -> str:
    """Print a value the way ``like`` was printed (thousands separators, two-decimal amounts)."""
    if value.denominator == 1:
        if _decimals(like) == 2:
            text = f"{int(value)}.00"
        else:
            text = str(int(value))
    else:
        decimals = max(_decimals(like), 1)
        while decimals < MAX_DECIMALS and value * 10 ** decimals != int(value * 10 ** decimals):
            decimals += 1
        text = f"{float(value):.{decimals}f}"
        if like.startswith(".") and text.startswith("0."):
            text = text[1:]
    if "," in like:
        whole, dot, frac = text.partition(".")
        text = f"{int(whole):,}" + dot + frac
    return text


def nice(value: Fraction) -> bool:
    return value > 0 and (value * 10 ** MAX_DECIMALS).denominator == 1


# ---------------------------------------------------------------------------------------------------
# solutions


@dataclass
class Step:
    index: int  # 0-based among the annotations
    start: int  # span of "<<...>>" in the annotated solution
    end: int
    tokens: list | None  # tokenized expression, None if unparsable
    value_text: str
    value: Fraction | None  # the annotation's printed result
    valid: bool  # the expression evaluates to the printed result
    shown: bool  # the printed result follows the annotation in the visible text


@dataclass
class Corruption:
    step: int  # 0-based
    old: Fraction
    new: Fraction
    changed: list = field(default_factory=list)  # [(step index, old, new)]


def parse_steps(solution: str) -> list[Step]:
    steps = []
    for i, m in enumerate(ANNOTATION.finditer(solution)):
        body = m.group(1)
        expr, eq, value_text = body.rpartition("=")
        value = to_fraction(value_text) if eq else None
        tokens = tokenize_expr(expr) if eq else None
        computed = evaluate(tokens) if tokens else None
        valid = value is not None and computed is not None and matches_printed(computed, value_text)
        after = VISIBLE_NUMBER.match(solution, m.end())
        shown = bool(after) and value is not None and to_fraction(after.group()) == value
        steps.append(Step(i, m.start(), m.end(), tokens, value_text.strip(), value, valid, shown))
    return steps


def remove_annotations(solution: str) -> str:
    return ANNOTATION.sub("", solution)


def visible_numbers(solution: str) -> list[tuple[int, int, str, Fraction]]:
    """(start, end, text, value) of each printed number outside annotations, positions in ``solution``."""
    out, pos = [], 0
    for m in list(ANNOTATION.finditer(solution)) + [None]:
        stop = m.start() if m else len(solution)
        for n in VISIBLE_NUMBER.finditer(solution, pos, stop):
            value = to_fraction(n.group())
            if value is not None:
                out.append((n.start(), n.end(), n.group(), value))
        pos = m.end() if m else stop
    return out


def final_answer(solution: str) -> Fraction | None:
    for line in reversed(solution.strip().splitlines()):
        m = FINAL.search(line)
        if m:
            return to_fraction(m.group(1).replace("$", ""))
    return None


def question_numbers(question: str) -> set[Fraction]:
    return {v for v in (to_fraction(t) for t in VISIBLE_NUMBER.findall(question)) if v is not None}


def _unambiguous(step: Step, steps: list[Step], printed: list, question_values: set) -> bool:
    v = step.value
    if v in question_values:
        return False
    if any(s.index != step.index and s.value == v for s in steps):
        return False
    return not any(value == v and start < step.start for start, _, _, value in printed)


def propagate(steps: list[Step], k: int, new_value: Fraction, printed: list, question_values: set) -> Corruption | None:
    """Carry a wrong result of step k through the later annotations; None if a dependent step cannot be
    recomputed cleanly or a changed value is ambiguous."""
    changed = {steps[k].value: new_value}
    record = Corruption(k, steps[k].value, new_value, [(k, steps[k].value, new_value)])
    for step in steps[k + 1 :]:
        if step.tokens is None:
            if step.value in changed:
                return None  # an opaque step repeats a changed value: cannot follow it
            continue
        uses = [t for t in step.tokens if t[0] == "num" and t[2] in changed]
        if not uses:
            continue
        if not step.valid:
            return None
        tokens = [["num", t[1], changed[t[2]]] if t[0] == "num" and t[2] in changed else t for t in step.tokens]
        recomputed = evaluate(tokens)
        if recomputed is None or not nice(recomputed):
            return None
        if recomputed == step.value:
            continue
        if step.value in changed or not _unambiguous(step, steps, printed, question_values):
            return None
        changed[step.value] = recomputed
        record.changed.append((step.index, step.value, recomputed))
    return record


def wrong_values(value: Fraction, rng: random.Random) -> list[Fraction]:
    offsets = [1, -1, 2, -2, 3, -3, 5, -5, 10, -10]
    candidates = [value + d for d in offsets] + [value * 2, value / 2, value * 10, value / 10]
    if value.denominator == 1:
        candidates = [c for c in candidates if c.denominator == 1]
    else:
        candidates += [value + Fraction(1, 2), value - Fraction(1, 2)]
    candidates = [c for c in dict.fromkeys(candidates) if c != value and nice(c)]
    rng.shuffle(candidates)
    return candidates


def corrupt_solution(question: str, solution: str, rng: random.Random, *, step: int | None = None,
                     new_value=None) -> tuple[str | None, Corruption | str]:
    """(rejected text, Corruption) or (None, skip reason). ``step`` (0-based) and ``new_value`` force the
    choice (tests); otherwise eligible steps and wrong values are tried in random order."""
    steps = parse_steps(solution)
    if not steps:
        return None, "no_equations"
    final = final_answer(solution)
    if final is None:
        return None, "no_final_answer"
    printed = visible_numbers(solution)
    question_values = question_numbers(question)
    all_values = question_values | {p[3] for p in printed} | {s.value for s in steps if s.value is not None}
    eligible = [s for s in steps if s.valid and s.shown and s.value > 0
                and _unambiguous(s, steps, printed, question_values)]
    if step is not None:
        eligible = [s for s in eligible if s.index == step]
    if not eligible:
        return None, "no_eligible_step"
    order = list(eligible)
    if step is None:
        rng.shuffle(order)
    for s in order:
        values = [Fraction(new_value)] if new_value is not None else wrong_values(s.value, rng)
        for wrong in values:
            if wrong in all_values or not nice(wrong):
                continue
            result = propagate(steps, s.index, wrong, printed, question_values)
            if result is None:
                continue
            mapping = {old: new for _, old, new in result.changed}
            if final not in mapping:
                continue  # the final answer would stay right: not a wrong solution
            return render(solution, printed, mapping), result
    return None, "no_valid_corruption"


def render(solution: str, printed: list, mapping: dict) -> str:
    """The annotation-free solution with every printed old value replaced by its new value."""
    out, pos = [], 0
    replacements = [(start, end, format_like(mapping[value], text)) for start, end, text, value in printed
                    if value in mapping]
    for start, end, text in replacements:
        out.append(solution[pos:start])
        out.append(text)
        pos = end
    out.append(solution[pos:])
    return remove_annotations("".join(out))


def _num(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def make_pair(record: dict, line_no: int, seed: int, id_prefix: str) -> tuple[dict | None, str | None]:
    question, solution = record["question"], record["answer"]
    rng = random.Random(f"{seed}:{line_no}")
    rejected, result = corrupt_solution(question, solution, rng)
    if rejected is None:
        return None, result
    final = final_answer(solution)
    mapping = {old: new for _, old, new in result.changed}
    return {
        "id": f"{id_prefix}-{line_no}",
        "prompt": question,
        "chosen": remove_annotations(solution),
        "rejected": rejected,
        "corrupted_step": result.step + 1,
        "original_value": _num(result.old),
        "corrupted_value": _num(result.new),
        "changed_steps": [{"step": i + 1, "old": _num(old), "new": _num(new)} for i, old, new in result.changed],
        "final_answer": _num(final),
        "corrupted_final_answer": _num(mapping[final]),
    }, None


# ---------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_gsm8k_pairs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="train.jsonl",
                        help="GSM8K train.jsonl ({question, answer} per line, answers with <<expr=value>> annotations)")
    parser.add_argument("--output", required=True, metavar="PAIRS.jsonl",
                        help="pairs JSONL to write (prompt/chosen/rejected plus provenance fields), atomically")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N questions")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the step and wrong-value choices (default 0); each question's choice depends "
                             "only on the seed and its line number")
    parser.add_argument("--stats", default=None, metavar="STATS.json", help="also write the stats as JSON here")
    parser.add_argument("--id-prefix", default="gsm8k-train", help="pair ids are PREFIX-LINE (default gsm8k-train)")
    parser.add_argument("--allow-test-split", action="store_true",
                        help="accept an input whose name says 'test' (only to build an rm-accuracy evaluation set; "
                             "never train or tune on it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.input)
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit {args.limit} must be at least 1", file=sys.stderr)
        return 2
    if not source.is_file():
        print(f"error: {source}: no such file", file=sys.stderr)
        return 1
    if "test" in source.name.lower() and not args.allow_test_split:
        print(f"error: {source} looks like a test split; finetuning pairs come from train.jsonl only "
              "(--allow-test-split builds an evaluation set for rm-accuracy)", file=sys.stderr)
        return 1
    from tqdm import tqdm

    output = Path(args.output)
    stats = {"input": str(source), "seed": args.seed, "questions": 0, "pairs": 0,
             "skipped": {reason: 0 for reason in SKIP_REASONS}, "changed_steps_histogram": {}}
    try:
        with atomic_open(output) as out:
            bar = tqdm(iter_jsonl(source), unit="q", desc="gsm8k pairs", disable=args.no_progress, file=sys.stderr)
            for line_no, record in bar:
                if args.limit is not None and stats["questions"] >= args.limit:
                    break
                if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                    raise SystemExit(f"error: {source}:{line_no}: expected string fields 'question' and 'answer'")
                stats["questions"] += 1
                pair, reason = make_pair(record, line_no, args.seed, args.id_prefix)
                if pair is None:
                    stats["skipped"][reason] += 1
                    continue
                out.write(jsonl_line(pair))
                stats["pairs"] += 1
                key = str(len(pair["changed_steps"]))
                stats["changed_steps_histogram"][key] = stats["changed_steps_histogram"].get(key, 0) + 1
            bar.close()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    stats["skipped_total"] = sum(stats["skipped"].values())
    stats["output"] = str(output)
    text = json.dumps(stats, indent=2)
    if args.stats:
        write_text_atomic(args.stats, text + "\n")
    print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
