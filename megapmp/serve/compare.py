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
different lengths; 413 for an oversized body.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from megapmp.eval.judge_scorer import probability_first_better
from megapmp.serve.app import BATCHER_KEY, TOKENIZERS_KEY, BadRequest, PendingBytes, _dumps, _json_body, _string_list


def is_judge(scorer) -> bool:
    """A JudgeScorer (it compares two codes) rather than a RewardScorer."""
    return callable(getattr(scorer, "compare", None))


def compare_inputs(body: dict, max_texts: int) -> tuple[list[str], list[str], list[str], list[str] | None]:
    instructions, codes_a, codes_b = (_string_list(body, k, max_texts) for k in ("instructions", "codes_a", "codes_b"))
    criteria = _string_list(body, "criteria", max_texts) if "criteria" in body else None
    lengths = {len(instructions), len(codes_a), len(codes_b), *([len(criteria)] if criteria is not None else [])}
    if len(lengths) != 1:
        raise BadRequest(f"instructions, codes_a, codes_b{', criteria' if criteria is not None else ''} must be lists "
                         f"of one length, got {len(instructions)}, {len(codes_a)}, {len(codes_b)}"
                         + (f", {len(criteria)}" if criteria is not None else ""))
    return instructions, codes_a, codes_b, criteria


def add_compare_route(app: web.Application, scorer, settings, pending: PendingBytes) -> None:
    """Register POST /compare on ``app`` (whose cleanup context holds the batcher under BATCHER_KEY), under
    the same limits as /score: pending bytes, body timeout, texts and tokens per request."""

    def build(instructions, codes_a, codes_b, criteria):
        first, second = scorer.render(instructions, codes_a, codes_b, criteria)
        return scorer.judge_sequences(first + second)

    async def compare(request: web.Request) -> web.Response:
        async with pending.reserve(request, settings.max_body_bytes):
            body = await _json_body(request, settings)
            # Each comparison is judged in both orders: two inputs per comparison count against --max-texts.
            instructions, codes_a, codes_b, criteria = compare_inputs(body, max(1, settings.max_texts // 2))
            loop = asyncio.get_running_loop()
            try:
                sequences, cut = await loop.run_in_executor(request.app[TOKENIZERS_KEY], build, instructions,
                                                            codes_a, codes_b, criteria)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            tokens = sum(len(s) for s in sequences)
            if tokens > settings.max_request_tokens:
                raise BadRequest(f"the request holds {tokens} tokens (both orders), over the limit of "
                                 f"{settings.max_request_tokens} per request (--max-request-tokens): split the request",
                                 status=413)
            n = len(instructions)
            truncated = [i for i in range(n) if cut[i] or cut[n + i]]
            if truncated and settings.overlong == "error":
                raise BadRequest(f"comparison {truncated[0]} is longer than the model's context of {scorer.max_length} "
                                 f"tokens ({len(truncated)} such; the server refuses them: --overlong error)", status=413)
            x = await request.app[BATCHER_KEY].score(sequences)
            x_first, x_second = x[:n], x[n:]
            return web.json_response({"probabilities": [float(p) for p in probability_first_better(x_first, x_second)],
                                      "log_odds": [[float(a), float(b)] for a, b in zip(x_first, x_second)],
                                      "truncated": truncated}, dumps=_dumps)

    app.router.add_post("/compare", compare)
