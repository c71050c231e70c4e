"""Final-answer extraction and equivalence for GSM8K-style and MATH-style solutions.

GSM8K: the answer is the number after the last ``####`` (the dataset's convention); failing that, the
number after the last "the answer is"; failing that, the last number in the text. Numbers may carry
thousands separators, a currency sign, a trailing period or a percent sign; they are compared exactly
as fractions when both are finite decimals, else with a relative tolerance of 1e-6.

MATH: the answer is the content of the last ``\\boxed{...}`` (nested braces allowed; also ``\\fbox{}`` and
``\\boxed x``); failing that, the GSM8K rules. Both sides are normalised (:func:`normalize_math_answer`)
and compared as strings, then as numbers if both parse as numbers (``\\frac{a}{b}``, ``a/b``, decimals).
The normalisation follows the spirit of the MATH benchmark's ``is_equiv``: it is deliberately simple
and does not do symbolic algebra (``x+1`` and ``1+x`` differ).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)


def _clean_number(token: str) -> str | None:
    token = token.replace(",", "").strip()
    if not token or token in "-.":
        return None
    return token


def parse_number(text: str | None) -> Fraction | float | None:
    """A number from text like ``$1,234.50``, ``-3``, ``12.``, ``45%``, ``3/4`` or ``\\frac{3}{4}``; else None."""
    if text is None:
        return None
    s = text.strip().replace("$", "").replace("\\$", "").replace(",", "").replace("\\%", "").rstrip("%").strip()
    s = s.rstrip(".").strip()
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac:
        sign, a, b = frac.groups()
        return None if int(b) == 0 else (-1 if sign else 1) * Fraction(int(a), int(b))
    ratio = re.fullmatch(r"(-?\d+)\s*/\s*(-?\d+)", s)
    if ratio:
        a, b = ratio.groups()
        return None if int(b) == 0 else Fraction(int(a), int(b))
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return Fraction(s)
    try:  # scientific notation and other floats
        value = float(s)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def numbers_equal(a, b, rel_tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    a, b = float(a), float(b)
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, as a plain number string (no commas); None if none."""
    if text is None:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.search(tail)
        if found:
            return _clean_number(found.group())
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        found = _NUMBER.search(text[matches[-1].end():])
        if found:
            return _clean_number(found.group())
    numbers = _NUMBER.findall(text)
    for token in reversed(numbers):
        cleaned = _clean_number(token)
        if cleaned is not None:
            return cleaned
    return None


def gsm8k_equivalent(predicted: str | None, gold: str | None) -> bool:
    return numbers_equal(parse_number(predicted), parse_number(gold))


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), or of ``\\boxed x``; None if none."""
    if text is None:
        return None
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for match in reversed(starts):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            continue  # unbalanced: try an earlier one
        if i > match.end() or (i < len(text) and text[i] != "{"):
            # "\boxed 5" form: up to the next space or "$"
            rest = re.match(r"[^\s$]+", text[i:])
            if rest:
                return rest.group()
    return None


def _unwrap(s: str, command: str) -> str:
    """Replace ``\\command{X}`` by ``X`` (nested braces inside X allowed)."""
    out, i, token = [], 0, "\\" + command + "{"
    while True:
        k = s.find(token, i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:k])
        j, depth = k + len(token), 1
        start = j
        while j < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            j += 1
        out.append(s[start : j - 1] if depth == 0 else s[start:])
        i = j


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    def arg(rest: str) -> tuple[str, str] | None:
        if not rest:
            return None
        if rest[0] == "{":
            depth = 0
            for j, ch in enumerate(rest):
                depth += {"{": 1, "}": -1}.get(ch, 0)
                if depth == 0:
                    return rest[: j + 1], rest[j + 1 :]
            return None
        return "{" + rest[0] + "}", rest[1:]

    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        first = arg(part)
        second = arg(first[1]) if first else None
        if first is None or second is None:
            out += "\\frac" + part
        else:
            out += "\\frac" + first[0] + second[0] + second[1]
    return out


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math_answer(answer: str | None) -> str | None:
    """Canonical string form of a MATH-style answer (see the module docstring); None stays None."""
    if answer is None:
        return None
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    for command in ("boxed", "text", "textbf", "mbox", "mathrm"):
        s = _unwrap(s, command)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" / "k=5": keep the value when the left side is a short variable name
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = s.rstrip(".")
    if s == "0.5":
        s = "\\frac{1}{2}"
    ratio = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if ratio:
        s = f"\\frac{{{ratio.group(1)}}}{{{ratio.group(2)}}}"
    # thousands separators in a plain number: 1,000 -> 1000 (a tuple like "1,2" stays)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def extract_math_answer(text: str) -> str | None:
    """A MATH-style solution's final answer, not normalised: the last boxed expression; else what follows
    the last "the answer is" (to the end of its line) or the last ``####``; else a short bare answer
    (the whole text when it is one line of at most 40 characters, e.g. a gold ``\\frac{1}{2}``);
    else the last number."""
    if text is None:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for marker in (_ANSWER_IS, re.compile(r"####\s*")):
        matches = list(marker.finditer(text))
        if matches:
            tail = text[matches[-1].end():].strip().split("\n")[0].strip().rstrip(".").strip()
            if tail:
                return tail
    stripped = text.strip()
    if stripped and "\n" not in stripped and len(stripped) <= 40:
        return stripped
    return extract_gsm8k_answer(text)


def math_equivalent(predicted: str | None, gold: str | None) -> bool:
    a, b = normalize_math_answer(predicted), normalize_math_answer(gold)
    if a is None or b is None:
        return False
    if a == b:
        return True
    return numbers_equal(parse_number(a), parse_number(b))


ANSWER_TYPES = ("gsm8k", "math")


def detect_answer_type(gold_solution: str) -> str:
    """``math`` when the gold solution has a boxed answer or any LaTeX command, else ``gsm8k``."""
    return "math" if last_boxed(gold_solution) is not None or "\\" in gold_solution else "gsm8k"


def is_correct(response: str, gold_solution: str, answer_type: str = "auto") -> bool:
    """Does the response's final answer match the gold solution's (both extracted by ``answer_type``)?"""
    if answer_type == "auto":
        answer_type = detect_answer_type(gold_solution)
    if answer_type == "gsm8k":
        return gsm8k_equivalent(extract_gsm8k_answer(response), extract_gsm8k_answer(gold_solution))
    if answer_type == "math":
        return math_equivalent(extract_math_answer(response), extract_math_answer(gold_solution))
    raise ValueError(f"unknown answer type {answer_type!r}: expected auto, {', '.join(ANSWER_TYPES)}")
