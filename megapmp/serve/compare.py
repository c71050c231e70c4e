"""POST /compare: a pairwise judge over HTTP (the route a judge model's server answers instead of /score).

    POST /compare  {"instructions": [str], "codes_a": [str], "codes_b": [str], "criteria": [str] (optional)}
                   -> {"probabilities": [P(a_i is better)], "log_odds": [[x_a_first, x_b_first]], "truncated": [i]}

Each comparison is judged in both orders (megapmp.eval.judge_scorer): ``x_a_first`` is the first label's
log-odds with a_i shown first, ``x_b_first`` with b_i shown first, and P(a_i better) = 1/2 + (sigmoid(x_a_first)
- sigmoid(x_b_first)) / 2 (exactly 1/2 for a judge that always names the first position). Both orders' inputs
go through the server's batcher like /score's texts, so a comparison's numbers are the same bits whatever else
is in the batch. ``criteria`` defaults to the judge's recorded default criterion; ``truncated`` lists the
comparisons with an input cut to the model's context (refused with 413 under ``overlong="error"``). Refusals
are /score's: 400 with {"error"} for malformed JSON, a missing or empty list, a non-string, lists of
different lengths; 413 for an oversized body; and 413 for a code of more than ``max_code_chars`` characters
(16 per token of the judge's context, whatever ``overlong``; reported by /info): the judge reads no more than
its context, and stripping comments parses a code whole. Codes within the limit are judged exactly as offline.
"""

from __future__ import annotations

import numpy as np

from megapmp.eval.judge_scorer import CODE_CHARS_PER_TOKEN, probability_first_better
from megapmp.serve.scoring import BadRequest, ScoringRoute, string_list


def is_judge(scorer) -> bool:
    """A JudgeScorer (it compares two codes) rather than a RewardScorer."""
    return callable(getattr(scorer, "compare", None))


def compare_inputs(body: dict, max_texts: int) -> tuple[list[str], list[str], list[str], list[str] | None]:
    instructions, codes_a, codes_b = (string_list(body, k, max_texts) for k in ("instructions", "codes_a", "codes_b"))
    criteria = string_list(body, "criteria", max_texts) if "criteria" in body else None
    lengths = {len(instructions), len(codes_a), len(codes_b), *([len(criteria)] if criteria is not None else [])}
    if len(lengths) != 1:
        raise BadRequest(f"instructions, codes_a, codes_b{', criteria' if criteria is not None else ''} must be lists "
                         f"of one length, got {len(instructions)}, {len(codes_a)}, {len(codes_b)}"
                         + (f", {len(criteria)}" if criteria is not None else ""))
    return instructions, codes_a, codes_b, criteria


def check_code_lengths(codes_a: list[str], codes_b: list[str], scorer) -> None:
    """413 for a code longer than the judge could read (``scorer.max_code_chars``), before any is rendered:
    rendering strips comments through ast.parse / ast.unparse of the whole code, ~500 bytes of memory per byte."""
    limit = scorer.max_code_chars
    for key, codes in (("codes_a", codes_a), ("codes_b", codes_b)):
        for i, code in enumerate(codes):
            if len(code) > limit:
                raise BadRequest(f"{key}[{i}] is {len(code)} characters, over the limit of {limit} "
                                 f"({CODE_CHARS_PER_TOKEN} per token of the judge's {scorer.max_length}-token context, "
                                 "more than it reads): shorten the code", status=413)


def compare_route(scorer, settings) -> ScoringRoute:
    """POST /compare on the shared scoring path (megapmp.serve.scoring), under /score's limits. Comparison i
    owns model inputs 2i (a shown first) and 2i + 1 (b shown first)."""

    def tokenize(instructions, codes_a, codes_b, criteria):
        first, second = scorer.render(instructions, codes_a, codes_b, criteria)
        return scorer.judge_sequences([text for pair in zip(first, second) for text in pair])

    def answer(x: np.ndarray) -> dict:
        x_first, x_second = x[0::2], x[1::2]
        return {"probabilities": [float(p) for p in probability_first_better(x_first, x_second)],
                "log_odds": [[float(a), float(b)] for a, b in zip(x_first, x_second)]}

    def read(body: dict) -> tuple:
        # Each comparison is judged in both orders: two inputs per comparison count against --max-texts.
        inputs = compare_inputs(body, max(1, settings.max_texts // 2))
        check_code_lengths(inputs[1], inputs[2], scorer)
        return inputs

    return ScoringRoute(read=read, tokenize=tokenize, answer=answer, per_item=2, item="comparison")
