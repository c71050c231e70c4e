"""The prompts of the model-backed stages: CodePMP's two (verbatim), Commit-Instruct's three, Critic-Evol's.

CodePMP (arXiv 2410.02229, appendix): a strong code LLM turns a snippet into a description with
`DESCRIPTION_PROMPT`; both the strong and the weak LLM then answer `CODE_PROMPT` (the same text as
`megapmp.data.preprocess.CODEPMP_TEMPLATE`, which preprocessing applies to the pairs' `prompt`, so the
reward model sees exactly what the generators saw).

Commit-Instruct (CodeFavor, arXiv 2410.03837): a commit's before/after code goes through three prompts:
explain the change, judge whether it improves the code (keep only "yes"), and rewrite it into a
self-contained instruction with a naive and an improved solution. The paper's exact wording is not
reproduced; these prompts follow its three stages and ask for a format `parse_rewrite` can check.
"""

from __future__ import annotations

import re

from megapmp.data.preprocess import CODEPMP_TEMPLATE

DESCRIPTION_PROMPT = (
    "Please generate a corresponding instruction based on this code snippet. In the instruction you need to "
    "analyze the intent and function of this code snippet (describe the operation the code performs and how "
    "it achieves its function).\n\n#### Code snippet:\n```{code}```\n\n#### Instructions:\n"
)
CODE_PROMPT = CODEPMP_TEMPLATE  # "{prompt}" is the description


def description_prompt(code: str) -> str:
    # str.replace, not str.format: code is full of braces.
    return DESCRIPTION_PROMPT.replace("{code}", code)


def code_prompt(description: str) -> str:
    return CODE_PROMPT.replace("{prompt}", description)


# ---------------------------------------------------------------------------------------------------
# Commit-Instruct

_COMMIT_CONTEXT = (
    "Below is a commit to a Python project: its message, and the code it changed before and after the commit."
    "\n\n### Commit message:\n{message}\n\n### Code before the commit:\n```python\n{before}\n```\n\n"
    "### Code after the commit:\n```python\n{after}\n```\n\n"
)

EXPLAIN_PROMPT = _COMMIT_CONTEXT + (
    "### Task:\nExplain what the commit changes in the code and why. Be specific about the behaviour "
    "before and after the change.\n\n### Explanation:\n"
)

JUDGE_PROMPT = _COMMIT_CONTEXT + (
    "### Explanation of the change:\n{explanation}\n\n"
    "### Task:\nDoes the commit improve the code, for example by fixing a bug, handling an edge case, "
    "making it faster or safer, or making it more correct? Answer with a single word, Yes or No.\n\n"
    "### Answer:\n"
)

REWRITE_PROMPT = _COMMIT_CONTEXT + (
    "### Explanation of the change:\n{explanation}\n\n"
    "### Task:\nRewrite this commit into a self-contained coding exercise. Write an instruction that asks "
    "for the code without mentioning the commit, a naive solution that has the problem the commit fixes, and "
    "an improved solution that does not. Use exactly this format:\n\n"
    "[Instruction]\n<the instruction>\n\n[Naive Code]\n```python\n<the naive solution>\n```\n\n"
    "[Improved Code]\n```python\n<the improved solution>\n```\n\n"
)


def _fill(template: str, **fields: str) -> str:
    for key, value in fields.items():
        template = template.replace("{" + key + "}", value)
    return template


def explain_prompt(message: str, before: str, after: str) -> str:
    return _fill(EXPLAIN_PROMPT, message=message, before=before, after=after)


def judge_prompt(message: str, before: str, after: str, explanation: str) -> str:
    return _fill(JUDGE_PROMPT, message=message, before=before, after=after, explanation=explanation)


def rewrite_prompt(message: str, before: str, after: str, explanation: str) -> str:
    return _fill(REWRITE_PROMPT, message=message, before=before, after=after, explanation=explanation)


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_judgement(text: str) -> bool | None:
    """True for "yes", False for "no" (the first such word in the first 200 characters), None otherwise."""
    m = _YES_NO.search(text[:200])
    return None if m is None else m.group(1).lower() == "yes"


_SECTION = re.compile(r"^\s*\[(Instruction|Naive Code|Improved Code)\]\s*$", re.IGNORECASE | re.MULTILINE)
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)\n?```", re.DOTALL | re.IGNORECASE)


def parse_rewrite(text: str) -> tuple[dict | None, str | None]:
    """-> ({"instruction", "naive", "improved"}, None) or (None, why it is unparseable)."""
    parts = _SECTION.split(text)
    # split with one group -> [before, name1, body1, name2, body2, ...]
    sections: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        key = name.lower()
        if key in sections:
            return None, "duplicate_section"
        sections[key] = body
    missing = [k for k in ("instruction", "naive code", "improved code") if k not in sections]
    if missing:
        return None, "missing_section"
    instruction = sections["instruction"].strip()
    codes = []
    for key in ("naive code", "improved code"):
        m = _FENCE.search(sections[key])
        if m is None:
            return None, "missing_code_block"
        codes.append(m.group(1).strip("\n"))
    if not instruction:
        return None, "empty_instruction"
    return {"instruction": instruction, "naive": codes[0], "improved": codes[1]}, None


# ---------------------------------------------------------------------------------------------------
# Critic-Evol (CodeFavor): a critic reviews a weak model's code and, where it finds a significant fault,
# revises it. The structure follows CodeFavor's: a few worked reviews (some accepting the code as it is),
# then the instruction and the weak attempt; the answer is a [REFLECTION] section, and only when the critic
# sees room for a real improvement, [CRITERIA], [ATTEMPT_2] and [FEEDBACK]. Every section is delimited by
# "-- BEGIN [NAME] --" / "-- END [NAME] --" lines, which is what `parse_critique` reads. The examples and
# the wording are ours.

CRITIC_SECTIONS = ("REFLECTION", "CRITERIA", "ATTEMPT_2", "FEEDBACK")
REVISION_SECTIONS = CRITIC_SECTIONS[1:]


def _section(name: str, body: str) -> str:
    return f"-- BEGIN [{name}] --\n{body.strip()}\n-- END [{name}] --\n"


def _fenced(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def critic_query(instruction: str, attempt: str) -> str:
    """The part of the critic's prompt that shows one instruction and the code written for it."""
    return ("The following instruction asks for Python code:\n" + _section("INSTRUCTION", instruction)
            + "\nA first attempt at it:\n" + _section("ATTEMPT_1", _fenced(attempt)))


CRITIC_EXAMPLES = (
    {"instruction": "Return the larger of two numbers.",
     "attempt": "def larger(a, b):\n    return a if a >= b else b",
     "reflection": "[ATTEMPT_1] returns a when it is at least b and b otherwise, which is exactly the larger "
                   "number. It is short and clear; there is nothing significant to improve."},
    {"instruction": "Write `mean(values)` returning the arithmetic mean of a non-empty list of numbers.",
     "attempt": "def mean(values):\n    return sum(values) // len(values)",
     "reflection": "[ATTEMPT_1] uses floor division, so `mean([1, 2])` gives 1 instead of 1.5: the result is "
                   "wrong whenever the mean is not a whole number.",
     "criteria": "The code must compute the requested value correctly for every valid input.",
     "revision": "def mean(values):\n    return sum(values) / len(values)",
     "feedback": "[ATTEMPT_1] truncates the mean with `//`; [ATTEMPT_2] uses true division and returns the exact "
                 "mean."},
    {"instruction": "Write `common(xs, ys)` returning the items of xs that also occur in ys, in the order of xs.",
     "attempt": "def common(xs, ys):\n    return [x for x in xs if x in ys]",
     "reflection": "[ATTEMPT_1] is correct, but `x in ys` scans the list ys for every x, which takes "
                   "len(xs) * len(ys) steps; a set makes each look-up constant time.",
     "criteria": "Among correct solutions, the one that runs faster on large inputs is better.",
     "revision": "def common(xs, ys):\n    seen = set(ys)\n    return [x for x in xs if x in seen]",
     "feedback": "Both keep the order of xs. [ATTEMPT_2] builds a set of ys once, so it runs in linear time "
                 "where [ATTEMPT_1] takes quadratic time."},
    {"instruction": "Write `count_lines(path)` that returns the output of running `wc -l` on the given file.",
     "attempt": "import subprocess\n\ndef count_lines(path):\n    return subprocess.check_output('wc -l ' + path, "
                "shell=True).decode()",
     "reflection": "[ATTEMPT_1] builds a shell command from the path, so a path such as `x; rm -rf ~` runs "
                   "arbitrary commands: a command injection.",
     "criteria": "The code must not let its input execute arbitrary commands.",
     "revision": "import subprocess\n\ndef count_lines(path):\n    return subprocess.check_output(['wc', '-l', "
                 "path]).decode()",
     "feedback": "[ATTEMPT_1] passes the path through a shell; [ATTEMPT_2] passes it as one argument of a command "
                 "list, so no shell interprets it."},
)

CRITIC_INTRO = ("You are an experienced Python instructor who reviews code: you find real faults, explain "
                "them, and fix them. Review the last attempt below in the same format as these examples.\n")
CRITIC_TASK = (
    "Now review the attempt below. Write:\n"
    "1. a [REFLECTION] section on the noticeable weaknesses of [ATTEMPT_1] as an answer to [INSTRUCTION];\n"
    "2. if [ATTEMPT_1] is good enough, with no significant room for improvement, stop after [REFLECTION];\n"
    "3. otherwise go on with [CRITERIA] (the one significant weakness to fix, in correctness, efficiency, security "
    "or conciseness; not type hints, docstrings or input validation), [ATTEMPT_2] (the improved code) and "
    "[FEEDBACK] (how [ATTEMPT_2] improves on [ATTEMPT_1], naming the codes only as [ATTEMPT_1] and [ATTEMPT_2]).\n"
)
EXAMPLE_SPLITTER = "\n" + "=" * 8 + "\n"


def _example(e: dict) -> str:
    text = critic_query(e["instruction"], e["attempt"]) + "\n" + _section("REFLECTION", e["reflection"])
    if "revision" in e:
        text += (_section("CRITERIA", e["criteria"]) + _section("ATTEMPT_2", _fenced(e["revision"]))
                 + _section("FEEDBACK", e["feedback"]))
    return text


def critic_prompt(instruction: str, attempt: str, example_order: list[int] | None = None) -> str:
    """The critic's whole prompt; `example_order` permutes the worked examples (CodeFavor shuffles them per
    request, so that no fixed example order biases the critic)."""
    order = list(range(len(CRITIC_EXAMPLES))) if example_order is None else example_order
    examples = EXAMPLE_SPLITTER.join(_example(CRITIC_EXAMPLES[i]) for i in order)
    return (CRITIC_INTRO + EXAMPLE_SPLITTER + examples + EXAMPLE_SPLITTER + CRITIC_TASK + "\n"
            + critic_query(instruction, attempt))


_CRITIC_BLOCK = re.compile(r"--\s*BEGIN\s*\[\s*(" + "|".join(CRITIC_SECTIONS) + r")\s*\]\s*--(.*?)--\s*END\s*\[\s*\1"
                           r"\s*\]\s*--", re.IGNORECASE | re.DOTALL)
# A critic that goes on to invent a next example starts a new query: what follows is not its review.
_NEXT_QUERY = re.compile(r"--\s*BEGIN\s*\[\s*(INSTRUCTION|ATTEMPT_1)\s*\]", re.IGNORECASE)


def extract_code(text: str) -> str:
    """The code of an answer: its first fenced block (```python or bare ```) when it has one, else the whole
    text; surrounding blank lines removed."""
    m = _FENCE.search(text) or re.search(r"```[^\n]*\n(.*?)(?:\n?```|\Z)", text, re.DOTALL)
    return (m.group(1) if m else text).strip("\n").rstrip()


def parse_critique(text) -> tuple[dict | None, str]:
    """The critic's verdict -> (revision, "revised"), (None, "accepted") when it found nothing significant
    to improve, or (None, reason) for an answer that cannot be used: missing_reflection,
    incomplete_revision (some of [CRITERIA], [ATTEMPT_2], [FEEDBACK] but not all), empty_revision,
    feedback_without_reference (the feedback names neither [ATTEMPT_1] nor [ATTEMPT_2], as CodeFavor
    requires). The revision is {"reflection", "criteria", "code", "feedback"}; its code is not checked here."""
    if not isinstance(text, str):
        return None, "missing_reflection"
    cut = _NEXT_QUERY.search(text)
    text = text[:cut.start()] if cut else text
    sections: dict[str, str] = {}
    for m in _CRITIC_BLOCK.finditer(text):
        sections.setdefault(m.group(1).upper(), m.group(2).strip())
    if not sections.get("REFLECTION"):
        return None, "missing_reflection"
    present = [name for name in REVISION_SECTIONS if sections.get(name)]
    if not present:
        return None, "accepted"
    if len(present) < len(REVISION_SECTIONS):
        return None, "incomplete_revision"
    code = extract_code(sections["ATTEMPT_2"])
    if not code.strip():
        return None, "empty_revision"
    feedback = sections["FEEDBACK"]
    if "[ATTEMPT_1]" not in feedback.upper() and "[ATTEMPT_2]" not in feedback.upper():
        return None, "feedback_without_reference"
    return {"reflection": sections["REFLECTION"], "criteria": sections["CRITERIA"], "code": code,
            "feedback": feedback}, "revised"
