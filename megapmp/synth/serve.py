"""A small OpenAI-compatible HTTP server over local Hugging Face causal LMs (tests, local runs, CPU).

    python tools/serve_models.py --model DIR [--model DIR2 ...] [--port 0]   # prints "port N"

Serves GET /v1/models, POST /v1/completions and POST /v1/chat/completions (non-streaming, n=1) with
`temperature` (0 = greedy), `top_p`, `max_tokens`, `seed` (per-request generator, so a seeded request's
output does not depend on other requests) and `stop`. Several `--model` directories are served by one
process under their directory names (or `--served-model-name`, one per model). Chat uses the tokenizer's
chat template, or a plain "<|role|>\\ncontent\\n" template when it has none. Requests are answered on
threads; generation runs one request at a time (a lock), which is all a CPU needs.

Two flags simulate an overloaded server, for exercising clients: `--fail-first N` answers HTTP 503 (with
`Retry-After: --retry-after`) to the first N generation requests, `--delay S` waits S seconds before
answering each one. For production serving use vLLM (`vllm serve MODEL`) or `transformers serve`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

PLAIN_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"


def tokenizer_directory(path: str) -> str:
    """Where a model directory's tokenizer is: beside the weights, or, for a megapmp HF export
    (tools/convert_checkpoint.py to-hf), where its megapmp_scoring.json says (its tokenizer/ folder when
    AutoTokenizer would rebuild the top-level one with other ids)."""
    scoring = os.path.join(path, "megapmp_scoring.json")
    if os.path.isfile(scoring):
        with open(scoring, encoding="utf-8") as f:
            return os.path.join(path, json.load(f).get("tokenizer", {}).get("path", "."))
    return path


class LocalModel:
    def __init__(self, path: str, name: str | None = None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.name = path, name or os.path.basename(os.path.normpath(path))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_directory(path))
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device = device
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None) or 2048
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = "".join(PLAIN_CHAT_TEMPLATE.format(role=m.get("role", "user"), content=m.get("content") or "")
                       for m in messages)
        return text + "<|assistant|>\n"

    @torch.no_grad()
    def generate(self, prompt: str, temperature: float, top_p: float, max_tokens: int, seed: int | None,
                 stop: list[str]) -> tuple[str, str, int, int]:
        """-> (text, finish_reason, prompt_tokens, completion_tokens). Plain sampling loop with a KV cache."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [next(iter(self.eos_ids), 0)]
        max_tokens = max(1, min(max_tokens, self.max_positions - 1))
        ids = ids[-(self.max_positions - max_tokens):]  # keep the prompt's end when it would not fit
        generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        input_ids = torch.tensor([ids], device=self.device)
        past, out, finish = None, [], "length"
        text = ""
        for _ in range(max_tokens):
            result = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logits = result.logits[0, -1].float()
            token = _sample(logits, temperature, top_p, generator)
            if token in self.eos_ids:
                finish = "stop"
                break
            out.append(token)
            input_ids = torch.tensor([[token]], device=self.device)
            if stop:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    return text[:cut], "stop", len(ids), len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return text, finish, len(ids), len(out)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, 0) - sorted_probs < top_p  # smallest prefix reaching top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, models: dict[str, LocalModel], fail_first: int = 0, retry_after: float = 0.0,
                 delay_s: float = 0.0, quiet: bool = True):
        super().__init__(address, Handler)
        self.models, self.fail_first, self.retry_after, self.delay_s, self.quiet = \
            models, fail_first, retry_after, delay_s, quiet
        self.generate_lock = threading.Lock()
        self.counter_lock = threading.Lock()
        self.generation_requests = 0  # POSTs to the generation endpoints, failed ones included

    def handle_error(self, request, client_address):
        if not self.quiet or not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout); nothing to answer

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", headers=None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            created = int(time.time())
            self._send(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "megapmp"}
                for name in self.server.models]})
        elif self.path in ("/health", "/healthz"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        path = self.path.rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._error(404, f"no route {self.path}")
        srv = self.server
        with srv.counter_lock:
            srv.generation_requests += 1
            n = srv.generation_requests
        if n <= srv.fail_first:
            return self._error(503, f"overloaded (request {n} of the first {srv.fail_first} is refused)",
                               "server_error", {"Retry-After": f"{srv.retry_after:g}"})
        if srv.delay_s:
            time.sleep(srv.delay_s)
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (json.JSONDecodeError, AssertionError):
            return self._error(400, "request body must be a JSON object")
        model = srv.models.get(body.get("model"))
        if model is None:
            return self._error(404, f"model {body.get('model')!r} not found; serving {sorted(srv.models)}",
                               "not_found_error")
        if body.get("stream"):
            return self._error(400, "stream=true is not supported by this server")
        if int(body.get("n") or 1) != 1:
            return self._error(400, "only n=1 is supported")
        chat = path.endswith("chat/completions")
        try:
            if chat:
                messages = body["messages"]
                assert isinstance(messages, list) and messages
                prompt = model.chat_prompt(messages)
            else:
                prompt = body["prompt"]
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                assert isinstance(prompt, str)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            seed = body.get("seed")
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            assert temperature >= 0 and 0 < top_p <= 1 and max_tokens >= 1
        except (KeyError, AssertionError, TypeError, ValueError):
            field = "messages" if chat else "prompt"
            return self._error(400, f"bad request: need '{field}' and valid temperature/top_p/max_tokens")
        with srv.generate_lock:
            text, finish, n_prompt, n_out = model.generate(prompt, temperature, top_p, max_tokens,
                                                           None if seed is None else int(seed), stop)
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send(200, {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model.name, "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}})


def build_server(model_dirs: list[str], names: list[str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 **kwargs) -> Server:
    names = names or [None] * len(model_dirs)
    if len(names) != len(model_dirs):
        raise ValueError("give one --served-model-name per --model")
    models = {}
    for path, name in zip(model_dirs, names):
        m = LocalModel(path, name)
        if m.name in models:
            raise ValueError(f"two models named {m.name!r}; use --served-model-name")
        models[m.name] = m
    return Server((host, port), models, **kwargs)
