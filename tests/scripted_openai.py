"""A scripted OpenAI-compatible server on loopback: answers come from a Python function, not a model.

For what tiny random models cannot produce on demand: well-formed, malformed and partial structured answers
(a critic's review, a judge's verdict), and server failures. Every request crosses a real socket through the
openai SDK, as with a real server; ``requests`` records what was asked.

    with ScriptedServer(lambda model, prompt: "answer") as s:   # or return an int: an HTTP error status
        OpenAIBackend(s.url, "m").complete(["hi"], params)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Reply = Callable[[str, str], "str | int"]


class ScriptedServer:
    def __init__(self, reply: Reply, models: tuple[str, ...] = ("scripted",)):
        self.reply, self.models = reply, models
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]})
                self._send(404, {"error": {"message": "no route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                chat = self.path.rstrip("/").endswith("chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                with outer.lock:
                    outer.requests.append({"path": self.path, "model": body.get("model"), "prompt": prompt,
                                           "temperature": body.get("temperature"), "seed": body.get("seed"),
                                           "max_tokens": body.get("max_tokens")})
                answer = outer.reply(body.get("model"), prompt)
                if isinstance(answer, int):
                    return self._send(answer, {"error": {"message": f"scripted failure {answer}", "code": answer}})
                choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": answer}
                else:
                    choice["text"] = answer
                self._send(200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "chat.completion" if chat else
                                 "text_completion", "created": int(time.time()), "model": body.get("model"),
                                 "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
