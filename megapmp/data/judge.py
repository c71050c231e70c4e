"""Pairwise judges (CodeFavor, arXiv 2410.03837): the judge's input text, its label tokens, its samples.

A pairwise judge reads an instruction and two candidate codes and answers with one of two label tokens
("A": the first code is better, "B": the second is). CodeFavor trains such classification judges on
preference pairs shown in both orders, so that the position of a code carries no signal.

In megapmp a judge sample is an ordinary preference pair whose two responses are the label tokens::

    prompt   = the judge template filled with (instruction, code A, code B, criteria)
    chosen   = the label of the better code ("A" when the chosen code is shown first, else "B")
    rejected = the other label

tokenized with the EOS policy "none", so each response is exactly one token. The trainer's LM term
(``loss.lm_coef``) covers chosen-response tokens only: here that is the label, predicted from the prompt's
last token, i.e. a one-token LM target with cross-entropy over the whole vocabulary; ``loss.rm_coef = 0``
(the scalar reward head is not a judge's). Shards, packing and the trainer need nothing new; the shard's
sidecar records this format (:meth:`JudgeFormat.to_meta`, with the label token ids), a checkpoint inherits
it from its training shard, and evaluation and the server read it back to call the model as a judge: the
probability of each label is the softmax over the two label logits at the prompt's last token.

Templates are plain text with the placeholders ``{instruction}``, ``{code_a}``, ``{code_b}`` and optionally
``{criteria}``; they are filled in one pass, so braces inside code are never taken for placeholders.
Imports nothing heavy: the data tools use it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

JUDGE_KIND = "pairwise-classification"
LABELS = ("A", "B")
PLACEHOLDERS = ("instruction", "code_a", "code_b", "criteria")
_PLACEHOLDER = re.compile(r"\{(instruction|code_a|code_b|criteria)\}")

# CodeFavor's classification prompt has this structure (bracketed section names, the codes in Python
# fences, the criteria last); the closing question is ours, so that a model without a chat template
# (the from-scratch models here) sees where its one-token answer goes.
CLASSIFICATION_TEMPLATE = (
    "[INSTRUCTION]\n{instruction}\n\n"
    "[CODE_A]\n```python\n{code_a}\n```\n\n"
    "[CODE_B]\n```python\n{code_b}\n```\n\n"
    "[CRITERIA]\n{criteria}\n\n"
    "Which code better meets [CRITERIA] while following [INSTRUCTION]? Answer A or B.\n[ANSWER] "
)
JUDGE_TEMPLATES = {"codefavor": CLASSIFICATION_TEMPLATE}

# The criterion a judge is asked about. CodePrefBench has one per aspect (CodeFavor's evaluation states
# them; these are our words for the same requirements); training pairs without a criterion of their own
# (Commit-Instruct, rules) get DEFAULT_CRITERION.
DEFAULT_CRITERION = "The better code follows the instruction correctly, efficiently and securely."
ASPECT_CRITERIA = {
    "correctness": "The better code runs as it is and does what the instruction asks, without bugs.",
    "efficiency": "The better code runs faster (first of all) and uses less memory (second).",
    "security": "The better code withstands security attacks and keeps the usual security properties.",
    "human-preference": "The better code is the one a human developer would prefer for this instruction.",
}


def aspect_criterion(aspect: str) -> str:
    """The criterion for a CodePrefBench aspect named like its file (``correctness-alignment``,
    ``human-preference-alignment``); an unknown aspect gets DEFAULT_CRITERION."""
    name = aspect.removesuffix("-alignment")
    return ASPECT_CRITERIA.get(name, DEFAULT_CRITERION)


def strips_comments_for(aspect: str) -> bool:
    """CodeFavor's evaluation judges code without comments and docstrings, except for human preference,
    where comments are part of what a developer prefers."""
    return aspect.removesuffix("-alignment") != "human-preference"


def strip_comments(code: str) -> str:
    """``code`` without comments and docstring-like string statements (re-printed from its AST, so the
    layout is normalised too); code that does not parse is returned unchanged."""
    try:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
                kept = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                                and isinstance(n.value.value, str))]
                node.body = kept or [ast.Pass()]
        return ast.unparse(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code


def resolve_judge_template(spec: str) -> tuple[str, str]:
    """A built-in template name (``codefavor``) or a file holding one; returns (name, text). The text must
    hold each of {instruction}, {code_a} and {code_b} exactly once, and {criteria} at most once."""
    if spec in JUDGE_TEMPLATES:
        return spec, JUDGE_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--template {spec!r}: expected {' or '.join(JUDGE_TEMPLATES)} or an existing file")
    text = path.read_text(encoding="utf-8")
    check_judge_template(text, str(path))
    return str(path.resolve()), text


def check_judge_template(text: str, where: str = "template") -> None:
    counts = {name: len(re.findall(r"\{" + name + r"\}", text)) for name in PLACEHOLDERS}
    wrong = [f"{{{n}}} {counts[n]} times" for n in ("instruction", "code_a", "code_b") if counts[n] != 1]
    if counts["criteria"] > 1:
        wrong.append(f"{{criteria}} {counts['criteria']} times")
    if wrong:
        raise ValueError(f"{where}: a judge template holds {{instruction}}, {{code_a}} and {{code_b}} exactly once "
                         f"and {{criteria}} at most once; found {', '.join(wrong)}")


@dataclass(frozen=True)
class JudgeFormat:
    """How a judge sees a comparison: the template, the two labels (first code better, second better),
    whether comments are stripped from the codes, and the criterion used when a sample names none."""

    template: str = CLASSIFICATION_TEMPLATE
    template_name: str = "codefavor"
    labels: tuple[str, str] = LABELS
    strip_comments: bool = True
    default_criterion: str = DEFAULT_CRITERION

    def __post_init__(self):
        check_judge_template(self.template, f"judge template {self.template_name!r}")
        if len(self.labels) != 2 or not all(isinstance(x, str) and x for x in self.labels) \
                or self.labels[0] == self.labels[1]:
            raise ValueError(f"labels must be two different non-empty strings, got {self.labels!r}")

    def code(self, text: str) -> str:
        text = text.strip("\n")
        return strip_comments(text) if self.strip_comments else text

    def render(self, instruction: str, code_a: str, code_b: str, criteria: str | None = None) -> str:
        """The judge's input text for showing ``code_a`` first and ``code_b`` second (codes are stripped of
        comments here when the format says so)."""
        values = {"instruction": instruction.strip(), "code_a": self.code(code_a), "code_b": self.code(code_b),
                  "criteria": (criteria or self.default_criterion).strip()}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def to_meta(self, label_ids: tuple[int, int] | list[int]) -> dict:
        """The record a shard sidecar (and so every checkpoint trained on it) keeps of this format."""
        return {"kind": JUDGE_KIND, "template": {"name": self.template_name, "text": self.template},
                "labels": list(self.labels), "label_ids": [int(i) for i in label_ids],
                "strip_comments": self.strip_comments, "default_criterion": self.default_criterion}

    @classmethod
    def from_meta(cls, meta: dict) -> "JudgeFormat":
        if not isinstance(meta, dict) or meta.get("kind") != JUDGE_KIND:
            raise ValueError(f"not a {JUDGE_KIND} judge record: {meta!r:.200}")
        return cls(template=meta["template"]["text"], template_name=meta["template"].get("name", "recorded"),
                   labels=tuple(meta["labels"]), strip_comments=bool(meta["strip_comments"]),
                   default_criterion=meta["default_criterion"])


def judge_samples(prompt: str, chosen: str, rejected: str, fmt: JudgeFormat, *, criteria: str | None = None,
                  orders: tuple[bool, ...] = (True, False)) -> list[dict]:
    """The judge samples of one preference pair: for each entry of ``orders``, True shows the chosen code
    first (label ``fmt.labels[0]``), False second (label ``fmt.labels[1]``). Records hold prompt, chosen
    and rejected (the labels) and ``chosen_position`` (0 or 1)."""
    out = []
    for chosen_first in orders:
        a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
        right, wrong = fmt.labels if chosen_first else fmt.labels[::-1]
        out.append({"prompt": fmt.render(prompt, a, b, criteria), "chosen": right, "rejected": wrong,
                    "chosen_position": 0 if chosen_first else 1})
    return out
