"""The prompts of the model-backed stages: CodePMP's two (verbatim) and Commit-Instruct's three.

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
