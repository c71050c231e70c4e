"""The reward server's HTTP side (aiohttp): routes, request checking, start and bounded stop.

Routes::

    POST /score        {"prompts": [str], "responses": [str]}  -> {"rewards": [float], "truncated": [int]}
    POST /get_reward   {"query": [str]}                        -> {"rewards": [float], "truncated": [int]}
                       OpenRLHF's remote reward model (openrlhf/cli/serve_rm.py): each query is the prompt
                       (template applied) and the response already joined; extra fields are ignored
    GET  /health       {"status": "ok"}  (never needs the token)
    GET  /info         model, scoring recipe, device, dtype, backends, batching and limits, counters

``truncated`` lists the indices of inputs longer than the model's context, cut with the recipe's
truncation policy before scoring (with ``overlong="error"`` such a request is refused with 413 instead).

Every client is treated as hostile (what `ServeSettings` bounds, and how):

- a refused request gets a 4xx and ``{"error": "<one line>"}``: malformed JSON, JSON nested too deeply,
  a duplicated key or a lone surrogate (as the pipeline's reader refuses them: megapmp.io), a missing field,
  wrong types, lists of different lengths, an empty list or string (400); a missing or wrong bearer token
  (401); a body that does not arrive within ``body_timeout_s`` (408); a body over ``max_body_bytes``, more
  than ``max_texts`` texts or ``max_request_tokens`` tokens in one request (413, naming the limit);
- a connection must deliver a complete request head within ``header_timeout_s`` of connecting (or of its
  previous answer), else it is closed; at most ``max_connections`` are open: a new one closes the oldest idle
  one (waiting for a request head), or, when all are busy, is answered 503 and closed; none of it is logged
  per connection;
- at most ``max_pending_bytes`` are held for requests at once (503 past it), charged as body bytes arrive
  (a declared body that does not come holds nothing); an answer must be taken within ``body_timeout_s`` (a
  client that does not read it is disconnected);
- malformed HTTP framing is answered by aiohttp itself (text/plain 400) and logged one line per 10 s at most;
- a large request is scored a chunk at a time beside the others (`megapmp.serve.batcher`);
- a reward that is not finite is never sent: checked at start on a probe input (`check_rewards_are_finite`)
  and on every batch (500 naming the cause); JSON answers are written with ``allow_nan=False``;
- a stop (SIGTERM) answers what it can within ``shutdown_timeout_s`` and then exits.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from megapmp.eval.batch_invariant import invariant_attention_backend
from megapmp.io import get_logger
from megapmp.serve.batcher import Batcher, DaemonExecutor, NonFiniteRewards, ShuttingDown
from megapmp.serve.compare import compare_route, is_judge
from megapmp.serve.scoring import (BATCHER_KEY, TOKENIZERS_KEY, BadRequest, PendingBytes, ScoringRoute, dumps,
                                   scoring_handler, string_list)

log = get_logger("serve_rm")
OVERLONG_POLICIES = ("truncate", "error")
SETTINGS_KEY = web.AppKey("settings", object)
# What serve() sets once the app runs (the app is frozen by then): the connection guard, the stop deadline.
RUNTIME_KEY = web.AppKey("runtime", dict)
PUBLIC_PATHS = ("/health",)


@dataclass
class ServeSettings:
    batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    overlong: str = "truncate"
    max_body_bytes: int = 16 * 1024 * 1024
    max_texts: int = 16384  # per request
    max_request_tokens: int = 4 * 1024 * 1024  # per request, after tokenization
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0  # for a request body to arrive, and for an answer to be taken
    max_connections: int = 512
    max_pending_bytes: int = 512 * 1024 * 1024  # held for requests at once: bodies as they arrive, then token ids
    shutdown_timeout: float = 30.0
    api_key: str | None = None

    def validate(self) -> None:
        """ValueError naming every bad value (the one check: build_app and tools/serve_rm.py's flags use it)."""
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong {self.overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        bad = [f"{name}={getattr(self, name)}" for name in ("batch_tokens", "max_body_bytes", "max_texts",
                                                              "max_request_tokens", "max_connections",
                                                              "max_pending_bytes")
               if getattr(self, name) < 1]
        bad += [f"{name}={getattr(self, name)}" for name in ("header_timeout_s", "body_timeout_s")
                if not getattr(self, name) > 0]
        bad += [f"{name}={getattr(self, name)}" for name in ("max_wait_ms", "shutdown_timeout")
                if not getattr(self, name) >= 0]
        if self.api_key is not None and not self.api_key.strip():
            bad.append("api_key is empty")
        if bad:
            raise ValueError("ServeSettings: " + ", ".join(bad) + " (sizes and timeouts must be positive, "
                             "max_wait_ms and shutdown_timeout at least 0)")


# ---------------------------------------------------------------------------------------------------
# the scoring routes (the path they share: megapmp.serve.scoring)


def native_inputs(body: dict, max_texts: int = ServeSettings.max_texts) -> tuple[list[str], list[str]]:
    prompts, responses = string_list(body, "prompts", max_texts), string_list(body, "responses", max_texts)
    if len(prompts) != len(responses):
        raise BadRequest(f"{len(prompts)} prompts for {len(responses)} responses: the lists must be as long")
    return prompts, responses


def openrlhf_inputs(body: dict, max_texts: int = ServeSettings.max_texts) -> tuple[list[str]]:
    return (string_list(body, "query", max_texts),)


def reward_routes(scorer, settings: ServeSettings) -> dict[str, ScoringRoute]:
    """POST /score (prompts and responses) and POST /get_reward (OpenRLHF's joined queries) of a reward model."""
    def answer(rewards):
        return {"rewards": [float(r) for r in rewards]}
    return {"/score": ScoringRoute(lambda body: native_inputs(body, settings.max_texts), scorer.sequences, answer),
            "/get_reward": ScoringRoute(lambda body: openrlhf_inputs(body, settings.max_texts),
                                        scorer.joined_sequences, answer)}


# ---------------------------------------------------------------------------------------------------
# the application


def check_rewards_are_finite(scorer) -> None:
    """Score a probe input once: a model whose reward head gives NaN or infinity (a damaged or diverged
    checkpoint) is refused before the server listens. ValueError naming the value."""
    sequences, _ = scorer.sequences(["Sort the list xs."], ["return sorted(xs)"])
    rewards = np.asarray(scorer.score_sequences(sequences), dtype=np.float64)
    if not np.isfinite(rewards).all():
        raise ValueError(f"the model's reward on a probe input is {rewards[0]}, not a finite number: the checkpoint "
                         "is damaged or diverged; refusing to serve it")


def build_app(scorer, settings: ServeSettings) -> web.Application:
    """The aiohttp application over a batch-invariant :class:`RewardScorer` (its model runs on the
    batcher's one worker thread; tokenization runs on a small pool of daemon threads). Raises ValueError
    for bad settings, a scorer that is not batch-invariant, or a model whose rewards are not finite."""
    settings.validate()
    if not scorer.batch_invariant:
        raise ValueError("the server needs a batch-invariant scorer (RewardScorer(batch_invariant=True))")
    check_rewards_are_finite(scorer)
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[_answer_in_time, _errors_as_json, _bearer_token])
    app[SETTINGS_KEY] = settings
    app[RUNTIME_KEY] = {"guard": None, "deadline": None}
    started = time.time()

    async def batcher_context(app: web.Application):
        # cleanup_ctx: the batcher stops at on_cleanup, after the runner has waited for in-flight handlers.
        batcher = Batcher(scorer.score_sequences, batch_tokens=settings.batch_tokens,
                          max_wait_ms=settings.max_wait_ms)
        batcher.start()
        app[BATCHER_KEY] = batcher
        app[TOKENIZERS_KEY] = DaemonExecutor(4, "rm-tokenize")
        yield
        await batcher.close(app[RUNTIME_KEY]["deadline"])
        app[TOKENIZERS_KEY].shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(batcher_context)
    pending = PendingBytes(settings.max_pending_bytes)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def info(request: web.Request) -> web.Response:
        batcher = request.app[BATCHER_KEY]
        guard = request.app[RUNTIME_KEY]["guard"]
        return web.json_response(server_info(scorer, settings) | {
            "uptime_s": round(time.time() - started, 3),
            "stats": asdict(batcher.stats) | {"in_flight_jobs": batcher.in_flight, "pending_bytes": pending.held},
            "connections": guard.stats() if guard is not None else {}}, dumps=dumps)

    # A pairwise judge answers POST /compare instead of /score (megapmp/serve/compare.py).
    routes = {"/compare": compare_route(scorer, settings)} if is_judge(scorer) else reward_routes(scorer, settings)
    for path, route in routes.items():
        app.router.add_post(path, scoring_handler(route, scorer, settings, pending))
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    return app


def server_info(scorer, settings: ServeSettings) -> dict:
    """What /info reports: the model and its recipe, where and how it computes, batching and limits."""
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
        "limits": {"max_body_bytes": settings.max_body_bytes, "max_texts": settings.max_texts,
                   "max_request_tokens": settings.max_request_tokens, "header_timeout_s": settings.header_timeout_s,
                   "body_timeout_s": settings.body_timeout_s, "max_connections": settings.max_connections,
                   "max_pending_bytes": settings.max_pending_bytes,
                   "shutdown_timeout_s": settings.shutdown_timeout},
        "auth": "bearer token" if settings.api_key else "none",
        "overlong": settings.overlong,
        "routes": {"native": "POST /score", "openrlhf": "POST /get_reward", "health": "GET /health",
                   "info": "GET /info"},
    } | ({"routes": {"compare": "POST /compare", "health": "GET /health", "info": "GET /info"},
          "judge": model["judge"] | {"max_code_chars": scorer.max_code_chars}} if "judge" in model else {})


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    guard = request.app[RUNTIME_KEY]["guard"]
    if guard is not None:
        guard.busy.add(request.protocol)  # a connection with a request in progress is never evicted
    try:
        return await handler(request)
    except BadRequest as e:
        response = web.json_response({"error": str(e)}, status=e.status)
        if e.status == 408:
            response.force_close()
        return response
    except web.HTTPException as e:  # aiohttp's own 404, 405, ...
        if e.status < 400:
            raise
        return web.json_response({"error": e.reason if e.text is None else e.text}, status=e.status)
    except asyncio.CancelledError:  # the client went away: nothing to answer
        raise
    except ShuttingDown as e:
        return web.json_response({"error": str(e)}, status=503)
    except NonFiniteRewards as e:
        log(f"refused to answer: {e}")
        return web.json_response({"error": f"internal error: {e}"}, status=500)
    except Exception as e:  # a failure of the server itself (the model, the tokenizer): JSON too, and logged
        log(f"scoring failed: {traceback.format_exc()}")
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)
    finally:
        if guard is not None:
            guard.busy.discard(request.protocol)


@web.middleware
async def _answer_in_time(request: web.Request, handler):
    """Send the answer here, within ``body_timeout_s``: a client that does not read it (a slow reader) would
    otherwise hold its handler, and its place under the connection cap, for as long as it likes."""
    response = await handler(request)
    if isinstance(response, web.Response) and not response.prepared:
        try:
            await asyncio.wait_for(_send(response, request), request.app[SETTINGS_KEY].body_timeout_s)
        except asyncio.TimeoutError:
            request.protocol.force_close()
        except ConnectionError:  # the client is gone: nobody to answer
            pass
    return response


async def _send(response: web.Response, request: web.Request) -> None:
    await response.prepare(request)
    await response.write_eof()


@web.middleware
async def _bearer_token(request: web.Request, handler):
    """With an API key, every route but /health needs ``Authorization: Bearer <key>``; checked before the
    body is read, compared in constant time."""
    key = request.app[SETTINGS_KEY].api_key
    if key and request.path not in PUBLIC_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            response = web.json_response({"error": "missing or wrong bearer token (send 'Authorization: Bearer "
                                                   "<key>')"}, status=401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
    return await handler(request)


# ---------------------------------------------------------------------------------------------------
# connections


_REFUSED_BODY = b'{"error": "too many connections: every one is busy, try again"}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


class ConnectionGuard:
    """At most `cap` open connections, enforced as each one registers with aiohttp's server (in order, so
    the count is exact however many the event loop accepts at once). Over the cap, the oldest idle
    connection (no request in progress: a half-open or slow client, or a keep-alive one) is closed to make
    room; if every one is busy, the newcomer is answered 503 and closed. Nothing is logged per connection."""

    def __init__(self, server: web.Server, cap: int):
        self.server, self.cap = server, cap
        self.busy: set = set()
        self.evicted = self.refused = 0
        self._register = server.connection_made
        server.connection_made = self._connection_made  # aiohttp's handlers call their manager's hook

    def _connection_made(self, handler, transport) -> None:
        self._register(handler, transport)
        open_ = [h for h in self.server.connections if h.transport is not None]
        if len(open_) <= self.cap:
            return
        idle = next((h for h in open_ if h is not handler and h not in self.busy), None)
        if idle is not None:
            idle.force_close()
            self.evicted += 1
        else:
            transport.write(_REFUSED)
            handler.force_close()
            self.refused += 1

    def stats(self) -> dict:
        return {"open": sum(h.transport is not None for h in self.server.connections), "busy": len(self.busy),
                "cap": self.cap, "evicted_idle": self.evicted, "refused_busy": self.refused}


ACCEPT_BURST = 128  # the listen backlog, and how many connections asyncio accepts in one go before any is closed


def _open_files_for(connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE so `connections` sockets fit (accept() failing with EMFILE is what made
    asyncio log a traceback per connection); returns how many connections fit now."""
    margin = ACCEPT_BURST + 64  # one accept burst over the cap, the listening socket, model files, pipes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + margin
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return connections if soft == resource.RLIM_INFINITY else max(1, min(connections, soft - margin))


# ---------------------------------------------------------------------------------------------------
# running


async def serve(app: web.Application, host: str, port: int, *, shutdown_timeout: float | None = None,
                on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None,
                handle_signals: bool = True) -> None:
    """Serve until SIGTERM or SIGINT (``handle_signals``) or until ``stop`` is set, then stop within
    ``shutdown_timeout`` seconds (default: the app's settings): stop listening, let queued and in-flight
    requests be scored and answered until then, answer the rest 503, close every connection, return.
    ``on_ready(port)`` is called once the socket listens."""
    settings: ServeSettings = app.get(SETTINGS_KEY) or ServeSettings()  # an app not from build_app: the defaults
    runtime = app.get(RUNTIME_KEY, {})
    shutdown_timeout = settings.shutdown_timeout if shutdown_timeout is None else shutdown_timeout
    cap = _open_files_for(settings.max_connections)
    if cap < settings.max_connections:
        log(f"only {cap} connections fit under this process's open-file limit (RLIMIT_NOFILE); "
            f"--max-connections {settings.max_connections} lowered to {cap}")
    # keepalive_timeout is aiohttp's one read timeout for a request head: it runs from the connection (or
    # the previous answer) until a complete head arrived, and closes a connection still waiting then.
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout, handler_cancellation=True,
                           keepalive_timeout=settings.header_timeout_s, lingering_time=1.0, access_log=None,
                           logger=HTTP_LOG)
    await runner.setup()
    guard = ConnectionGuard(runner.server, cap)
    runtime["guard"] = guard
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(_one_line_accept_errors)
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    listener = None
    try:
        listener = await loop.create_server(runner.server, host, port, backlog=ACCEPT_BURST, reuse_address=True)
        if on_ready is not None:
            on_ready(listener.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        deadline = loop.time() + shutdown_timeout
        runtime["deadline"] = deadline
        if listener is not None:
            listener.close()
        batcher = app.get(BATCHER_KEY)
        if batcher is not None:
            await batcher.close(deadline)  # scores until the deadline, answers the rest 503
        try:
            await asyncio.wait_for(runner.cleanup(), max(0.0, deadline - loop.time()) + 1.0)
        except asyncio.TimeoutError:
            log(f"stopped after the {shutdown_timeout:g} s shutdown timeout with connections still open")
        loop.set_exception_handler(previous_handler)


_last_accept_error = [0.0]


class _OneLineFramingErrors(logging.Filter):
    """aiohttp answers a request it cannot parse (a bad request line, header, Content-Length or chunk size)
    with a text/plain 400 itself and logs a traceback for each: any client could fill the log. Such a record
    becomes one line, at most one every ``every_s`` seconds; every other record passes unchanged."""

    def __init__(self, every_s: float = 10.0):
        super().__init__()
        self.every_s, self.last, self.unlogged = every_s, -float("inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.unlogged += 1
            return False
        reason = str(error.message).strip().split("\n")[0].rstrip(":") or type(error).__name__
        record.msg = (f"malformed HTTP from %s, answered {error.code} by aiohttp: {reason}"
                      + (f" ({self.unlogged} more since the last such line)" if self.unlogged else ""))
        record.exc_info = record.exc_text = None
        self.last, self.unlogged = now, 0
        return True


# The connections' logger (aiohttp's RequestHandler logs through the one it is given).
HTTP_LOG = logging.getLogger("megapmp.serve.http")
HTTP_LOG.addFilter(_OneLineFramingErrors())


def _one_line_accept_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio logs a traceback for every accept() that fails (out of descriptors: it retries a second later);
    one line every 10 s says the same."""
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        now = time.monotonic()
        if now - _last_accept_error[0] > 10.0:
            _last_accept_error[0] = now
            log(f"accept() failed: {context.get('exception')!r}; new connections wait (RLIMIT_NOFILE, "
                "--max-connections)")
        return
    loop.default_exception_handler(context)


class BackgroundServer:
    """An app served by a thread of its own (tests and benchmarks in one process).

    ``start()`` returns the port once it listens; ``stop()`` drains like SIGTERM and joins the thread.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float | None = None):
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
