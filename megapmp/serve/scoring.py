"""One path from a scoring request to its answer, shared by every route that scores (/score, /get_reward,
/compare)::

    the body, read under the pending-bytes budget and the body timeout -> JSON (megapmp.io's rules)
      -> the route's inputs, checked (4xx) -> ids of the model inputs, tokenized on the tokenizer pool a
      slice at a time into int32 arrays (the texts then dropped) -> tokens per request and the overlong
      policy (413) -> the batcher -> the route's answer + "truncated"

A route says only what differs (`ScoringRoute`): how its inputs are read from the body, how they become
model inputs, and how the model's outputs become its answer. The limits themselves are the server's
settings (`megapmp.serve.app.ServeSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from aiohttp import web

from megapmp.io import InputError, parse_json_line
from megapmp.serve.batcher import Batcher, DaemonExecutor, PackedIds

if TYPE_CHECKING:
    from megapmp.serve.app import ServeSettings

BATCHER_KEY = web.AppKey("batcher", Batcher)
TOKENIZERS_KEY = web.AppKey("tokenizers", DaemonExecutor)
dumps = functools.partial(json.dumps, allow_nan=False)  # a NaN reaching an answer is an error, not JSON


class BadRequest(Exception):
    """A request refused with ``status`` and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------
# the body


def string_list(body: dict, key: str, max_texts: int) -> list[str]:
    """``body[key]``: a non-empty list of at most ``max_texts`` non-empty strings, or BadRequest naming it."""
    if key not in body:
        raise BadRequest(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(f"field {key!r} must be a list of strings, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"field {key!r} is empty: nothing to score")
    if len(value) > max_texts:
        raise BadRequest(f"field {key!r} has {len(value)} texts, over the limit of {max_texts} per request "
                         "(--max-texts): split the request", status=413)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f"{key}[{i}] must be a string, got {type(item).__name__}")
        if not item:
            raise BadRequest(f"{key}[{i}] is an empty string")
    return value


def parse_body(raw: bytes) -> dict:
    """A request body as the pipeline's JSONL reader parses a line (megapmp.io.parse_json_line: duplicated
    keys and lone surrogates refused), plus: nesting too deep for the parser is a 400, not a 500."""
    try:
        body = parse_json_line("request body", None, raw)
    except InputError as e:
        raise BadRequest(str(e).replace("request body: malformed JSON", "the body is not valid JSON")) from None
    except RecursionError:
        raise BadRequest("the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


class PendingBytes:
    """The bytes the server holds for requests at once, bounded: past ``limit`` a request is answered 503, so
    many clients uploading at once cannot exhaust the server's memory. A request is charged as its body
    arrives, chunk by chunk: a client that declares a large body and sends nothing holds nothing (aiohttp
    buffers at most ~128 KiB of a connection's unread body, outside the count)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def share(self):
        """One request's part of the budget, given back when the request is done."""
        share = Share(self)
        try:
            yield share
        finally:
            self.held -= share.size

    def full(self) -> BadRequest:
        return BadRequest(f"the server holds {self.held >> 20} MiB of pending requests, its limit is "
                          f"{self.limit >> 20} MiB (--max-pending-mb): try again shortly", status=503)


class Share:
    """What one request holds of a `PendingBytes` budget."""

    def __init__(self, budget: PendingBytes):
        self.budget, self.size = budget, 0

    def fits(self, more: int) -> None:
        """503 now if ``more`` bytes would not fit (nothing is charged)."""
        if self.budget.held + more > self.budget.limit:
            raise self.budget.full()

    def add(self, more: int) -> None:
        self.fits(more)
        self.budget.held += more
        self.size += more

    def grow_to(self, size: int) -> None:
        """Hold at least ``size`` bytes in all (503 if they do not fit)."""
        if size > self.size:
            self.add(size - self.size)


async def read_body(request: web.Request, settings: ServeSettings, share: Share) -> bytearray:
    """The request body, each chunk charged to ``share`` as it arrives: 408 if it is not all there within
    ``body_timeout_s``, 413 past ``max_body_bytes``, 503 past the pending budget. A declared length over
    either limit is refused before any byte is read."""
    limit = settings.max_body_bytes
    declared = request.content_length or 0
    if declared > limit:
        raise _too_large(limit)
    share.fits(declared)
    body = bytearray()

    async def receive() -> None:
        async for chunk in request.content.iter_any():
            if len(body) + len(chunk) > limit:
                raise _too_large(limit)
            share.add(len(chunk))
            body.extend(chunk)

    try:
        await asyncio.wait_for(receive(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {settings.body_timeout_s:g} s "
                         "(--body-timeout)", status=408) from None
    return body


def _too_large(limit: int) -> BadRequest:
    return BadRequest(f"the request body size is over the limit of {limit} bytes (--max-body-mb): split the "
                      "request", status=413)


# ---------------------------------------------------------------------------------------------------
# the path


@dataclass(frozen=True)
class ScoringRoute:
    """What one scoring route adds to the shared path.

    read: the JSON body -> the route's inputs (a tuple of lists), BadRequest for bad ones.
    tokenize: (*inputs) -> (ids of each model input, whether each was cut to the context); runs on the
        tokenizer pool; a ValueError is the client's (400). Item i of the request owns the model inputs
        ``i * per_item`` to ``(i + 1) * per_item - 1``.
    answer: the model's outputs for all model inputs -> the answer's fields ("truncated" is added).
    item: what the request's items are called in messages ("input", "comparison").
    """

    read: Callable[[dict], tuple]
    tokenize: Callable[..., tuple[list, list[bool]]]
    answer: Callable[[np.ndarray], dict]
    per_item: int = 1
    item: str = "input"


# Texts (in characters) tokenized at a time: the tokenizer's Python lists, ~8 bytes a token and more, exist for
# one slice at a time beside the request's packed int32 ids (a single longer item is a slice of its own).
TOKENIZE_SLICE_CHARS = 1 << 20


def body_to_ids(route: ScoringRoute, raw: bytearray, max_tokens: int) -> tuple[PackedIds, list[bool]]:
    """On a tokenizer thread: the body's JSON, the route's inputs, their packed ids. Parsing runs here too: it
    is CPU work the event loop should not wait for, and the pool's size bounds how many requests hold their
    texts as Python strings at once (the others wait as bytes, charged as such)."""
    return tokenize(route, route.read(parse_body(raw)), max_tokens)


def tokenize(route: ScoringRoute, inputs: tuple, max_tokens: int) -> tuple[PackedIds, list[bool]]:
    """On a tokenizer thread: the ids of the request's model inputs, packed (`PackedIds`), and whether each
    was cut; 413 as soon as they pass ``max_tokens``; 400 for what the scorer refuses (a text with no token)."""
    n = len(inputs[0])
    chars = np.zeros(n, np.int64)
    for texts in inputs:
        if texts is not None:
            chars += np.fromiter(map(len, texts), np.int64, n)
    ends = np.cumsum(chars)  # [n]: characters of items 0..i
    parts, cut, tokens, start = [], [], 0, 0
    while start < n:
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + TOKENIZE_SLICE_CHARS, side="right")))
        try:
            ids, part_cut = route.tokenize(*(t if t is None else t[start:stop] for t in inputs))
        except ValueError as e:  # the scorer's own checks, its indices counted within the slice
            where = f" (counting from {route.item} {start} of the request)" if start else ""
            raise BadRequest(str(e) + where) from None
        parts.append(PackedIds.pack(ids))
        del ids
        cut += part_cut
        tokens += parts[-1].num_tokens
        if tokens > max_tokens:
            raise BadRequest(f"the request holds at least {tokens} tokens, over the limit of {max_tokens} per request "
                             "(--max-request-tokens): split the request", status=413)
        start = stop
    return PackedIds.concat(parts), cut


def scoring_handler(route: ScoringRoute, scorer, settings: ServeSettings, pending: PendingBytes):
    """The aiohttp handler of ``route``: every limit of ``settings`` applies (body size and timeout, pending
    bytes, texts and tokens per request, the overlong policy). What a request holds is charged to ``pending``:
    its body as it arrives, then the larger of that and its packed ids (the texts are dropped once tokenized)."""

    async def handle(request: web.Request) -> web.Response:
        with pending.share() as share:
            raw = await read_body(request, settings, share)
            sequences, cut = await asyncio.get_running_loop().run_in_executor(
                request.app[TOKENIZERS_KEY], body_to_ids, route, raw, settings.max_request_tokens)
            del raw
            share.grow_to(sequences.nbytes)
            k = route.per_item
            truncated = [i for i in range(len(cut) // k) if any(cut[i * k:(i + 1) * k])]
            if truncated and settings.overlong == "error":
                raise BadRequest(f"{route.item} {truncated[0]} is longer than the model's context of "
                                 f"{scorer.max_length} tokens ({len(truncated)} such {route.item}s; the server "
                                 "refuses them: --overlong error)", status=413)
            outputs = await request.app[BATCHER_KEY].score(sequences)
            return web.json_response(route.answer(outputs) | {"truncated": truncated}, dumps=dumps)

    return handle
