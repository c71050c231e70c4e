"""The reward server's HTTP side (aiohttp): routes, request checking, start and graceful stop.

Routes::

    POST /score        {"prompts": [str], "responses": [str]}  -> {"rewards": [float], "truncated": [int]}
    POST /get_reward   {"query": [str]}                        -> {"rewards": [float], "truncated": [int]}
                       OpenRLHF's remote reward model (openrlhf/cli/serve_rm.py): each query is the prompt
                       (template applied) and the response already joined; extra fields are ignored
    GET  /health       {"status": "ok"}
    GET  /info         model, scoring recipe, device, dtype, backends, batching settings, counters

``truncated`` lists the indices of inputs longer than the model's context, cut with the recipe's
truncation policy before scoring (with ``overlong="error"`` such a request is refused with 413 instead).
Every refused request gets a 4xx and ``{"error": "<one line>"}``: malformed JSON, a missing field,
wrong types, lists of different lengths, an empty list or an empty string (400); a body over
``max_body_bytes`` (413). Rewards are float64 values of the fp32 reward head, as JSON numbers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from aiohttp import web

from megapmp.eval.batch_invariant import invariant_attention_backend
from megapmp.io import get_logger
from megapmp.serve.batcher import Batcher

log = get_logger("serve_rm")
OVERLONG_POLICIES = ("truncate", "error")
BATCHER_KEY = web.AppKey("batcher", Batcher)


class BadRequest(Exception):
    """A request refused with ``status`` and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServeSettings:
    batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    overlong: str = "truncate"
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_timeout: float = 30.0

    def validate(self) -> None:
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong {self.overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")


# ---------------------------------------------------------------------------------------------------
# request bodies


def _string_list(body: dict, key: str) -> list[str]:
    if key not in body:
        raise BadRequest(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(f"field {key!r} must be a list of strings, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"field {key!r} is empty: nothing to score")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f"{key}[{i}] must be a string, got {type(item).__name__}")
        if not item:
            raise BadRequest(f"{key}[{i}] is an empty string")
    return value


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()  # over client_max_size: aiohttp raises HTTPRequestEntityTooLarge (413)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def native_inputs(body: dict) -> tuple[list[str], list[str]]:
    prompts, responses = _string_list(body, "prompts"), _string_list(body, "responses")
    if len(prompts) != len(responses):
        raise BadRequest(f"{len(prompts)} prompts for {len(responses)} responses: the lists must be as long")
    return prompts, responses


def openrlhf_inputs(body: dict) -> list[str]:
    return _string_list(body, "query")


# ---------------------------------------------------------------------------------------------------
# the application


def build_app(scorer, settings: ServeSettings) -> web.Application:
    """The aiohttp application over a batch-invariant :class:`RewardScorer` (its model runs on the
    batcher's one worker thread; tokenization runs on the default executor)."""
    settings.validate()
    if not scorer.batch_invariant:
        raise ValueError("the server needs a batch-invariant scorer (RewardScorer(batch_invariant=True))")
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_errors_as_json])
    started = time.time()

    async def batcher_context(app: web.Application):
        # cleanup_ctx: the batcher stops at on_cleanup, after the runner has waited for in-flight handlers.
        batcher = Batcher(scorer.score_sequences, batch_tokens=settings.batch_tokens,
                          max_wait_ms=settings.max_wait_ms)
        batcher.start()
        app[BATCHER_KEY] = batcher
        yield
        await batcher.close()

    app.cleanup_ctx.append(batcher_context)

    async def score(request: web.Request, build: Callable[[], tuple[list, list]]) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            sequences, cut = await loop.run_in_executor(None, build)
        except ValueError as e:  # the scorer's own input checks (e.g. a response with no token)
            raise BadRequest(str(e)) from None
        truncated = [i for i, c in enumerate(cut) if c]
        if truncated and settings.overlong == "error":
            raise BadRequest(f"input {truncated[0]} is longer than the model's context of {scorer.max_length} "
                             f"tokens ({len(truncated)} such inputs; the server refuses them: --overlong error)",
                             status=413)
        rewards = await request.app[BATCHER_KEY].score(sequences)
        return web.json_response({"rewards": [float(r) for r in rewards], "truncated": truncated})

    async def native(request: web.Request) -> web.Response:
        prompts, responses = native_inputs(await _json_body(request))
        return await score(request, lambda: scorer.sequences(prompts, responses))

    async def openrlhf(request: web.Request) -> web.Response:
        queries = openrlhf_inputs(await _json_body(request))
        return await score(request, lambda: scorer.joined_sequences(queries))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def info(request: web.Request) -> web.Response:
        batcher = request.app[BATCHER_KEY]
        return web.json_response(server_info(scorer, settings) | {
            "uptime_s": round(time.time() - started, 3),
            "stats": asdict(batcher.stats) | {"in_flight_jobs": batcher.in_flight}})

    from megapmp.serve.compare import add_compare_route, is_judge  # compare.py imports this module's helpers

    if is_judge(scorer):  # a pairwise judge answers POST /compare instead (megapmp/serve/compare.py)
        add_compare_route(app, scorer, settings)
    else:
        app.router.add_post("/score", native)
        app.router.add_post("/get_reward", openrlhf)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    return app


def server_info(scorer, settings: ServeSettings) -> dict:
    """What /info reports: the model and its recipe, where and how it computes, and the batching settings."""
    model = scorer.describe()
    dtype = next(scorer.model.parameters()).dtype
    compute = scorer.autocast_dtype or dtype
    return {
        "model": {k: model[k] for k in ("path", "kind", "step", "dtype", "parameters") if k in model},
        "recipe": {k: model[k] for k in ("template", "eos_policy", "eos_id", "pad_id", "recipe_from", "tokenizer",
                                         "max_length", "notes")},
        "device": str(scorer.device),
        "dtype": {"weights": str(dtype).removeprefix("torch."), "compute": str(compute).removeprefix("torch.")},
        "backends": {"attention": invariant_attention_backend(scorer.device, compute),
                     "linear": f"tiles of {scorer.tile_tokens} tokens", "packing": scorer.packing,
                     "batch_invariant": True, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "batching": {"batch_tokens": settings.batch_tokens, "max_wait_ms": settings.max_wait_ms},
        "overlong": settings.overlong,
        "max_body_bytes": settings.max_body_bytes,
        "routes": {"native": "POST /score", "openrlhf": "POST /get_reward", "health": "GET /health",
                   "info": "GET /info"},
    } | ({"routes": {"compare": "POST /compare", "health": "GET /health", "info": "GET /info"},
          "judge": model["judge"]} if "judge" in model else {})


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as e:
        return web.json_response({"error": str(e)}, status=e.status)
    except web.HTTPException as e:  # aiohttp's own 404, 405, 413 (body over client_max_size), ...
        if e.status < 400:
            raise
        return web.json_response({"error": e.reason if e.text is None else e.text}, status=e.status)
    except asyncio.CancelledError:  # the client went away: nothing to answer
        raise
    except Exception as e:  # a failure of the server itself (the model, the tokenizer): JSON too, and logged
        log(f"scoring failed: {traceback.format_exc()}")
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)


# ---------------------------------------------------------------------------------------------------
# running


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float,
                on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None,
                handle_signals: bool = True) -> None:
    """Serve until SIGTERM or SIGINT (``handle_signals``) or until ``stop`` is set, then drain: stop
    accepting connections, let in-flight requests be scored and answered (up to ``shutdown_timeout``
    seconds), stop the batcher, return. ``on_ready(port)`` is called once the socket listens."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           handler_cancellation=True)  # a client that leaves cancels its handler: job dropped
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_ready is not None:
            on_ready(runner.addresses[0][1])
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


class BackgroundServer:
    """An app served by a thread of its own (tests and benchmarks in one process).

    ``start()`` returns the port once it listens; ``stop()`` drains like SIGTERM and joins the thread.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 30.0):
        self.app, self.host, self.port, self.shutdown_timeout = app, host, port, shutdown_timeout
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rm-server", daemon=True)

    def _run(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve(self.app, self.host, self.port, shutdown_timeout=self.shutdown_timeout, stop=self._stop,
                        handle_signals=False, on_ready=self._on_ready)
        try:
            asyncio.run(main())
        except BaseException as e:  # reported by start() or stop()
            self._error = e
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    def start(self, timeout: float = 60.0) -> int:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self.port

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError(f"the server failed: {self._error!r}")
