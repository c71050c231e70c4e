"""LLM backends for pair synthesis: any OpenAI-compatible HTTP server, or vLLM's offline engine.

    backend = make_backend("openai", model="deepseek-coder-6.7b-instruct", base_url="http://127.0.0.1:8000")
    texts = backend.complete(prompts, SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024, seed=0))
    texts = backend.chat([[{"role": "user", "content": "..."}], ...], params)

`complete` returns one text per prompt, in prompt order; `generate` / `generate_chat` return
`Completion(text, finish_reason)` objects. With `mode="chat"`, `complete` sends each prompt as one user
message to the chat endpoint (an instruct model served with its chat template); `mode="completions"`
(default) sends the raw prompt, as CodePMP's prompts are written for.

OpenAIBackend: the `openai` SDK's client (`pip install 'megapmp[synth]'`), `concurrency` requests in flight
on threads; timeouts, retries (connection errors, timeouts, HTTP 408/409/429 and 5xx), exponential backoff
and `Retry-After` are the SDK's. When a request fails for good a one-line `BackendError` names the URL, the
model, the last status and the server's message; other 4xx fail at once.

VLLMBackend: `vllm.LLM` (imported only when constructed), `LLM.generate(prompts, SamplingParams)` ->
`RequestOutput.outputs[0].text`, `LLM.chat(conversations, SamplingParams)` for chat.
"""

from __future__ import annotations

import abc
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

BACKENDS = ("openai", "vllm")
MODES = ("completions", "chat")
# The statuses the openai SDK retries (besides every 5xx); used only to word the final error.
RETRY_STATUSES = frozenset({408, 409, 429})


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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


OPENAI_INSTALL_HINT = ("the openai backend needs the `openai` package: pip install 'megapmp[synth]' "
                       "(or pip install openai)")


def _openai():
    """The `openai` SDK, imported on first use: importing megapmp must not require it."""
    try:
        import openai
    except ImportError as e:
        raise ImportError(f"{OPENAI_INSTALL_HINT} ({e})") from e
    return openai


class OpenAIBackend(Backend):
    """Any OpenAI-compatible server through the `openai` SDK's client.

    Retries, backoff and timeouts are the SDK's: each request is retried up to `max_retries` times on
    connection errors, timeouts, `RETRY_STATUSES` and 5xx, after an exponential backoff with
    jitter (0.5 s doubling to 8 s) or the server's `Retry-After` when it gives one (within the SDK's cap);
    `timeout_s` bounds each attempt's connect, read and write. `concurrency` requests are in flight at
    once on threads sharing one client (and its connection pool)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, mode: str = "completions",
                 concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout_s > 0")
        base_url = base_url.rstrip("/")
        if base_url.endswith("/v1"):  # accept both http://host:port and http://host:port/v1, as clients do
            base_url = base_url[: -len("/v1")]
        self.base_url, self.model, self.mode = base_url, model, mode
        self.concurrency, self.timeout_s, self.max_retries = concurrency, timeout_s, max_retries
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.client = _openai().OpenAI(base_url=base_url + "/v1", api_key=api_key or "EMPTY", timeout=timeout_s,
                                       max_retries=max_retries)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        def one(prompt: str) -> Completion:
            choice = self._call("completions", self.client.completions.create, prompt=prompt,
                                **self._sampling(params))
            return Completion(choice.text or "", choice.finish_reason)

        return self._map(one, prompts)

    def generate_chat(self, conversations: list[Messages], params: SamplingParams) -> list[Completion]:
        def one(messages: Messages) -> Completion:
            choice = self._call("chat/completions", self.client.chat.completions.create, messages=messages,
                                **self._sampling(params))
            return Completion(choice.message.content or "", choice.finish_reason)

        return self._map(one, conversations)

    def models(self) -> list[str]:
        """The model names the server offers."""
        return [m.id for m in self._call("models", self.client.models.list)]

    def close(self) -> None:
        self.client.close()

    def _sampling(self, params: SamplingParams) -> dict:
        kwargs = {"model": self.model, "temperature": params.temperature, "top_p": params.top_p,
                  "max_tokens": params.max_tokens, "n": 1, "stream": False}
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        return kwargs

    def _map(self, one, items: list) -> list[Completion]:
        if self.concurrency == 1 or len(items) <= 1:
            return [one(x) for x in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items)), thread_name_prefix="openai") as pool:
            return list(pool.map(one, items))  # map keeps input order; the first failure is raised

    def _call(self, endpoint: str, create, **kwargs):
        """`create(**kwargs)` (the SDK retries inside it); its first choice, or the listing for `models`.
        Every failure becomes a one-line `BackendError` naming the URL and the model."""
        openai = _openai()
        where = f"{'GET' if endpoint == 'models' else 'POST'} {self.base_url}/v1/{endpoint} (model {self.model!r})"
        attempts = f"failed after {self.max_retries + 1} attempts ({self.max_retries} retries)"
        try:
            response = create(**kwargs)
        except openai.APITimeoutError:
            raise BackendError(f"{where} {attempts}; last error: timed out after {self.timeout_s:g}s") from None
        except openai.APIConnectionError as e:
            raise BackendError(f"{where} {attempts}; last error: connection error: {_one_line(e.__cause__ or e)}") \
                from None
        except openai.APIStatusError as e:
            status, message = e.status_code, _one_line(_server_message(e))
            if status in RETRY_STATUSES or status >= 500:
                raise BackendError(f"{where} {attempts}; last error: HTTP {status}: {message}") from None
            raise BackendError(f"{where} failed with HTTP {status} (not retried): {message}") from None
        except openai.APIError as e:  # a response the SDK could not read
            raise BackendError(f"{where}: bad response: {_one_line(e)}") from None
        except json.JSONDecodeError as e:  # the SDK parses a JSON content type itself and lets this through
            raise BackendError(f"{where}: response is not JSON: {_one_line(e)}") from None
        # A body that is not JSON at all comes back from the SDK as a plain string.
        field = "data" if endpoint == "models" else "choices"
        items = getattr(response, field, None)
        if not isinstance(items, list) or (field == "choices" and not items):
            raise BackendError(f"{where}: response has no {field}: {_one_line(response)[:200]}")
        return items if endpoint == "models" else items[0]


def _server_message(e) -> str:
    """The server's own words: `error.message` of an OpenAI-style error body, else the SDK's message."""
    body = e.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(body) if body else e.message


def _one_line(x, limit: int = 300) -> str:
    return " ".join(str(x).split())[:limit]


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
    """`kind` "openai" needs `base_url` (kwargs: concurrency, timeout_s, max_retries, api_key);
    "vllm" runs `model` in process (kwargs: tensor_parallel_size, dtype, gpu_memory_utilization, ...)."""
    if kind == "openai":
        if not base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000)")
        allowed = {"api_key", "concurrency", "timeout_s", "max_retries"}
        return OpenAIBackend(base_url, model, mode=mode, **{k: v for k, v in kwargs.items() if k in allowed})
    if kind == "vllm":
        allowed = {"tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "seed",
                   "trust_remote_code"}
        return VLLMBackend(model, mode=mode, **{k: v for k, v in kwargs.items() if k in allowed and v is not None})
    raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
