"""LLM backends for pair synthesis: any OpenAI-compatible HTTP server, or vLLM's offline engine.

    backend = make_backend("openai", model="deepseek-coder-6.7b-instruct", base_url="http://127.0.0.1:8000")
    texts = backend.complete(prompts, SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024, seed=0))
    texts = backend.chat([[{"role": "user", "content": "..."}], ...], params)

`complete` returns one text per prompt, in prompt order; `generate` / `generate_chat` return
`Completion(text, finish_reason)` objects. With `mode="chat"`, `complete` sends each prompt as one user
message to the chat endpoint (an instruct model served with its chat template); `mode="completions"`
(default) sends the raw prompt, as CodePMP's prompts are written for.

OpenAIBackend: plain `urllib` (no `openai` package needed), `concurrency` requests in flight on threads,
per-request `timeout_s`, retries on connection errors, timeouts, HTTP 408/409/429 and 5xx with exponential
backoff and jitter (a `Retry-After` header wins, capped at `backoff_max_s`); after `max_retries` retries a
`BackendError` names the URL, the last status and the server's message. Other 4xx fail at once.

VLLMBackend: `vllm.LLM` (imported only when constructed), `LLM.generate(prompts, SamplingParams)` ->
`RequestOutput.outputs[0].text`, `LLM.chat(conversations, SamplingParams)` for chat.
"""

from __future__ import annotations

import abc
import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

BACKENDS = ("openai", "vllm")
MODES = ("completions", "chat")
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class BackendError(RuntimeError):
    """A request failed for good (after retries, or with a status that retrying cannot fix)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. Defaults are the paper's (CodePMP: temperature 0.7, top_p 1, 1024 new tokens).

    `seed` is sent with every request, so with a seed each prompt's output does not depend on batching,
    concurrency or request order (on servers that honour `seed`: vLLM, this package's serve.py)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop) if self.stop else None
        return d


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None = None  # "stop" | "length" | None when the server does not say


Messages = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


class Backend(abc.ABC):
    """One model behind some engine. Subclasses implement `generate` and `generate_chat`."""

    model: str
    mode: str = "completions"

    @abc.abstractmethod
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """Raw-text completions, one per prompt, in order."""

    @abc.abstractmethod
    def generate_chat(self, conversations: list[Messages], params: SamplingParams) -> list[Completion]:
        """Chat completions (the server applies the model's chat template), one per conversation, in order."""

    def run(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """`prompts` through this backend's mode: raw completions, or one user message each."""
        if self.mode == "chat":
            return self.generate_chat([[{"role": "user", "content": p}] for p in prompts], params)
        return self.generate(prompts, params)

    def complete(self, prompts: list[str], params: SamplingParams) -> list[str]:
        return [c.text for c in self.run(prompts, params)]

    def chat(self, conversations: list[Messages], params: SamplingParams) -> list[str]:
        return [c.text for c in self.generate_chat(conversations, params)]

    def describe(self) -> dict:
        """What identifies this backend's outputs in a run's fingerprint: not the URL (a resumed run may reach
        the same model at another address), not secrets, not concurrency."""
        return {"backend": type(self).__name__, "model": self.model, "mode": self.mode}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


class OpenAIBackend(Backend):
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, mode: str = "completions",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, backoff_jitter: float = 0.25):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0")
        base_url = base_url.rstrip("/")
        if base_url.endswith("/v1"):  # accept both http://host:port and http://host:port/v1, as clients do
            base_url = base_url[: -len("/v1")]
        self.base_url, self.model, self.mode = base_url, model, mode
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s, self.backoff_jitter = backoff_base_s, backoff_max_s, backoff_jitter
        self._lock = threading.Lock()
        self.requests = 0  # HTTP attempts made, retries included
        self.retries = 0

    # -- public
    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        return self._map("/v1/completions", [self._body(params, prompt=p) for p in prompts])

    def generate_chat(self, conversations: list[Messages], params: SamplingParams) -> list[Completion]:
        return self._map("/v1/chat/completions", [self._body(params, messages=m) for m in conversations])

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models", None)["data"]]

    # -- internals
    def _body(self, params: SamplingParams, **payload) -> dict:
        body = {"model": self.model, **payload, "temperature": params.temperature, "top_p": params.top_p,
                "max_tokens": params.max_tokens, "n": 1, "stream": False}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _map(self, path: str, bodies: list[dict]) -> list[Completion]:
        if not bodies:
            return []
        parse = _parse_chat if path.endswith("chat/completions") else _parse_completion
        one = lambda body: parse(self._request("POST", path, body), self.base_url + path)  # noqa: E731
        if self.concurrency == 1 or len(bodies) == 1:
            return [one(b) for b in bodies]
        with ThreadPoolExecutor(min(self.concurrency, len(bodies)), thread_name_prefix="openai") as pool:
            return list(pool.map(one, bodies))  # map keeps input order; the first failure is raised

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
                if attempt:
                    self.retries += 1
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise BackendError(f"{method} {url}: response is not JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                last = f"HTTP {e.code}: {message}"
                if e.code not in RETRY_STATUSES:
                    raise BackendError(f"{method} {url} failed with HTTP {e.code} (not retried): {message}") from None
                retry_after = _retry_after_s(e.headers.get("Retry-After"))
            except (TimeoutError, socket.timeout) as e:
                last = f"timed out after {self.timeout_s:g}s ({e})"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.timeout_s:g}s"
                else:
                    last = f"connection error: {reason}"
            if attempt == self.max_retries:
                break
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt)
            delay *= 1 + self.backoff_jitter * random.random()
            if retry_after is not None:
                delay = min(self.backoff_max_s, retry_after)
            time.sleep(delay)
        raise BackendError(f"{method} {url} failed after {self.max_retries + 1} attempts "
                           f"({self.max_retries} retries); last error: {last}")


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
        payload = json.loads(raw)
        err = payload.get("error", payload)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except Exception:
        return str(e.reason)[:500]


def _retry_after_s(value: str | None) -> float | None:
    """`Retry-After` is delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _first_choice(payload: dict, url: str) -> dict:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices:
        raise BackendError(f"{url}: response has no choices: {str(payload)[:200]}")
    return choices[0]


def _parse_completion(payload: dict, url: str) -> Completion:
    choice = _first_choice(payload, url)
    return Completion(choice.get("text") or "", choice.get("finish_reason"))


def _parse_chat(payload: dict, url: str) -> Completion:
    choice = _first_choice(payload, url)
    message = choice.get("message") or {}
    return Completion(message.get("content") or "", choice.get("finish_reason"))


# ---------------------------------------------------------------------------------------------------
# vLLM offline engine


VLLM_INSTALL_HINT = ("the vllm backend needs the `vllm` package and a GPU: pip install 'megapmp[synth]' "
                     "(or pip install vllm); or serve the model with any OpenAI-compatible server and use "
                     "--backend openai --base-url URL")


class VLLMBackend(Backend):
    """In-process vLLM engine. One engine holds its GPUs; for two models on one GPU, lower
    `gpu_memory_utilization` (e.g. 0.45 each) or serve them and use OpenAIBackend."""

    def __init__(self, model: str, *, mode: str = "completions", tensor_parallel_size: int = 1,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, **engine_kwargs):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"{VLLM_INSTALL_HINT} ({e})") from e
        self.model, self.mode = model, mode
        kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                      trust_remote_code=trust_remote_code, **engine_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)

    @staticmethod
    def _params(params: SamplingParams):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                               max_tokens=params.max_tokens, seed=params.seed,
                               stop=list(params.stop) if params.stop else None)

    @staticmethod
    def _outputs(request_outputs) -> list[Completion]:
        return [Completion(r.outputs[0].text, r.outputs[0].finish_reason) for r in request_outputs]

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        return self._outputs(self.llm.generate(prompts, self._params(params), use_tqdm=False))

    def generate_chat(self, conversations: list[Messages], params: SamplingParams) -> list[Completion]:
        if not conversations:
            return []
        return self._outputs(self.llm.chat(conversations, self._params(params), use_tqdm=False))


def make_backend(kind: str, model: str, *, base_url: str | None = None, mode: str = "completions",
                 **kwargs) -> Backend:
    """`kind` "openai" needs `base_url` (kwargs: concurrency, timeout_s, max_retries, api_key, backoff_*);
    "vllm" runs `model` in process (kwargs: tensor_parallel_size, dtype, gpu_memory_utilization, ...)."""
    if kind == "openai":
        if not base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000)")
        allowed = {"api_key", "concurrency", "timeout_s", "max_retries", "backoff_base_s", "backoff_max_s",
                   "backoff_jitter"}
        return OpenAIBackend(base_url, model, mode=mode, **{k: v for k, v in kwargs.items() if k in allowed})
    if kind == "vllm":
        allowed = {"tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "seed",
                   "trust_remote_code"}
        return VLLMBackend(model, mode=mode, **{k: v for k, v in kwargs.items() if k in allowed and v is not None})
    raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------------
# Command-line flags shared by the model-backed subcommands


def add_sampling_arguments(p, defaults: SamplingParams = SamplingParams()) -> None:
    g = p.add_argument_group("sampling (paper: temperature 0.7, top_p 1, 1024 new tokens)")
    g.add_argument("--temperature", type=float, default=defaults.temperature,
                   help=f"0 = greedy (default {defaults.temperature})")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help=f"default {defaults.top_p}")
    g.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help=f"new tokens per response (default {defaults.max_tokens})")
    g.add_argument("--seed", type=int, default=None,
                   help="sent with every request: with it (or --temperature 0) a resumed run equals an "
                        "uninterrupted one on servers that honour it (vLLM does)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop sequence, repeatable")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                          seed=args.seed, stop=tuple(args.stop) if args.stop else None)


def add_backend_arguments(p, required: bool = True) -> None:
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, required=required, default=None,
                   help="openai: any OpenAI-compatible server (vLLM `vllm serve`, TGI, SGLang, "
                        "`python -m megapmp.synth.serve`) at --base-url; vllm: vLLM's offline engine in "
                        "this process (GPU; pip install 'megapmp[synth]')")
    g.add_argument("--base-url", default=None, metavar="URL", help="e.g. http://127.0.0.1:8000 (/v1 optional)")
    g.add_argument("--mode", choices=MODES, default="completions",
                   help="completions: send the prompt as raw text, as CodePMP's prompts are written (default); "
                        "chat: one user message through the model's chat template")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY; 'EMPTY' if unset)")
    g.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight per model (default 8)")
    g.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per request (default 300)")
    g.add_argument("--max-retries", type=int, default=5,
                   help="retries on connection errors, timeouts, 429 and 5xx, with exponential backoff (default 5)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="records per batch: the unit of progress and of the output's flushes (default 64)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    g.add_argument("--dtype", default="auto", help="vllm: model dtype (default auto)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="vllm: fraction of GPU memory per engine (default 0.9; ~0.45 for two models on one GPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="vllm: context length")


def backend_from_args(args, model: str, base_url: str | None = None) -> Backend:
    return make_backend(args.backend, model, base_url=base_url or args.base_url, mode=args.mode,
                        api_key=os.environ.get(args.api_key_env, "EMPTY"), concurrency=args.concurrency,
                        timeout_s=args.timeout, max_retries=args.max_retries,
                        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                        seed=args.seed if args.seed is not None else 0)
