"""The reward server (megapmp/serve, tools/serve_rm.py) on loopback: request shapes, 4xx answers, many
concurrent clients, a client leaving mid-batch, SIGTERM drain. Every reward it returns is compared with
offline scoring of the same texts by a separately loaded RewardScorer (bit for bit: fp32, batch-invariant)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from megapmp.eval.reward_model import RewardScorer
from megapmp.serve.app import BackgroundServer, ServeSettings, build_app
from tests.test_eval_metrics import make_checkpoint
from tests.test_scoring_consistency import codepmp_texts

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 300  # small enough that the tests' long texts are over it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_run"))


def load_scorer(run_dir) -> RewardScorer:
    return RewardScorer.load(run_dir, progress=False, batch_invariant=True, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def offline(run_dir, one_thread):
    return load_scorer(run_dir)


def start_server(run_dir, **settings) -> tuple[BackgroundServer, str]:
    server = BackgroundServer(build_app(load_scorer(run_dir), ServeSettings(**settings)))
    return server, f"http://127.0.0.1:{server.start()}"


@pytest.fixture(scope="module")
def url(run_dir, one_thread):
    server, url = start_server(run_dir, max_wait_ms=20, batch_tokens=4096, max_body_bytes=64 * 1024)
    yield url
    server.stop()


def post(url: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------- shapes


def test_native_and_openrlhf_requests_score_like_offline(url, offline):
    texts = [(p, r) for p, r in zip(*codepmp_texts(40, seed=5)) if len(p) + len(r) < MAX_LENGTH][:6]
    prompts, responses = [p for p, _ in texts], [r for _, r in texts]
    status, answer = post(f"{url}/score", {"prompts": prompts, "responses": responses})
    assert status == 200 and answer["truncated"] == []
    assert np.array_equal(np.array(answer["rewards"]), offline.score(prompts, responses))
    # OpenRLHF: prompt and response joined. The byte tokenizer and the "{prompt}" template make the joined
    # text's ids those of the pair, so the rewards are the same bits as the native request's.
    status, joined = post(f"{url}/get_reward", {"query": [p + r for p, r in zip(prompts, responses)],
                                                "prompts": prompts})  # OpenRLHF may send more fields
    assert status == 200 and joined["rewards"] == answer["rewards"]


def test_health_and_info(url):
    assert get(f"{url}/health") == {"status": "ok"}
    info = get(f"{url}/info")
    assert info["model"]["kind"] == "megapmp-checkpoint" and info["model"]["step"] == 3
    assert info["recipe"]["eos_policy"] == "response" and info["recipe"]["max_length"] == MAX_LENGTH
    assert info["device"] == "cpu" and info["dtype"] == {"weights": "float32", "compute": "float32"}
    assert info["backends"]["attention"] == "segmented" and info["backends"]["batch_invariant"] is True
    assert info["batching"] == {"batch_tokens": 4096, "max_wait_ms": 20}
    assert info["routes"]["openrlhf"] == "POST /get_reward"


def test_overlong_inputs_are_truncated_by_the_recipe_and_flagged(url, offline):
    prompts = ["Sort xs.", "Sort xs. " * 30]
    responses = ["return sorted(xs)", "y = 1\n" * 100]  # the second is over MAX_LENGTH tokens
    status, answer = post(f"{url}/score", {"prompts": prompts, "responses": responses})
    assert status == 200 and answer["truncated"] == [1]
    assert np.array_equal(np.array(answer["rewards"]), offline.score(prompts, responses))
    ids, cut = offline.sequences(prompts, responses)
    assert cut == [False, True] and len(ids[1]) == MAX_LENGTH and ids[1][-1] == offline.recipe.eos_id


BAD_REQUESTS = [
    ("/score", b'{"prompts": ["a"', 400, "not valid JSON"),
    ("/score", b"[1, 2]", 400, "must be a JSON object"),
    ("/score", b'{"responses": ["b"]}', 400, "missing field 'prompts'"),
    ("/score", b'{"prompts": "a", "responses": ["b"]}', 400, "'prompts' must be a list of strings"),
    ("/score", b'{"prompts": ["a", 3], "responses": ["b", "c"]}', 400, "prompts[1] must be a string, got int"),
    ("/score", b'{"prompts": ["a"], "responses": ["b", "c"]}', 400, "1 prompts for 2 responses"),
    ("/score", b'{"prompts": ["a"], "responses": [""]}', 400, "responses[0] is an empty string"),
    ("/score", b'{"prompts": [], "responses": []}', 400, "'prompts' is empty"),
    ("/get_reward", b'{"query": [null]}', 400, "query[0] must be a string, got NoneType"),
    ("/get_reward", b'{"queries": ["x"]}', 400, "missing field 'query'"),
    ("/score", b'{"prompts": ["a"], "responses": ["' + b"x" * 70_000 + b'"]}', 413, "body size"),
    ("/nowhere", b"{}", 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_REQUESTS, ids=[c[3] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message(url, path, body, status, message):
    got, answer = post(f"{url}{path}", body, raw=True)
    assert got == status and message in answer["error"], answer


def test_bad_requests_leave_the_server_healthy(url):
    assert get(f"{url}/health") == {"status": "ok"}
    assert get(f"{url}/info")["stats"]["failed"] == 0


def test_overlong_error_policy_answers_413(run_dir, one_thread):
    server, url = start_server(run_dir, overlong="error")
    try:
        status, answer = post(f"{url}/score", {"prompts": ["p", "q"], "responses": ["fine", "z" * 400]})
        assert status == 413 and "input 1 is longer than the model's context of 300 tokens" in answer["error"]
        assert post(f"{url}/score", {"prompts": ["p"], "responses": ["fine"]})[0] == 200
    finally:
        server.stop()


def test_a_failing_model_answers_500_with_a_message_and_the_server_goes_on(run_dir, one_thread):
    scorer = load_scorer(run_dir)
    real, calls = scorer.score_sequences, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    scorer.score_sequences = fail_once
    server = BackgroundServer(build_app(scorer, ServeSettings()))
    url = f"http://127.0.0.1:{server.start()}"
    try:
        status, answer = post(f"{url}/score", {"prompts": ["p"], "responses": ["fine"]})
        assert status == 500 and "RuntimeError: out of memory (simulated)" in answer["error"]
        assert post(f"{url}/score", {"prompts": ["p"], "responses": ["fine"]})[0] == 200
    finally:
        server.stop()


# ---------------------------------------------------------------- load, disconnects, shutdown


def test_many_concurrent_clients_get_offline_scores(url, offline):
    """64 loopback clients at once, 1-4 texts each: no failure, every reward the offline one, in batches."""
    prompts, responses = codepmp_texts(64, seed=11)
    expected = np.array([offline.score([p], [r])[0] for p, r in zip(prompts, responses)])
    requests = [(i, list(range(i, min(i + 1 + i % 4, 64)))) for i in range(64)]
    batches_before = get(f"{url}/info")["stats"]["batches"]

    async def client(session, members):
        body = {"prompts": [prompts[j] for j in members], "responses": [responses[j] for j in members]}
        async with session.post(f"{url}/score", json=body) as response:
            return response.status, await response.json()

    async def load():
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(client(session, members) for _, members in requests))

    started = time.perf_counter()
    answers = asyncio.run(load())
    assert time.perf_counter() - started < 120
    assert [status for status, _ in answers] == [200] * 64
    for (_, members), (_, answer) in zip(requests, answers):
        assert np.array_equal(np.array(answer["rewards"]), expected[members])
    batches = get(f"{url}/info")["stats"]["batches"] - batches_before
    assert batches < 64  # requests were gathered into shared batches


def test_a_client_leaving_mid_batch_does_not_affect_the_others(run_dir, offline, one_thread):
    server, url = start_server(run_dir, max_wait_ms=600)  # a long gather: all three land in one batch
    port = int(url.rsplit(":", 1)[1])
    prompts, responses = codepmp_texts(3, seed=2)
    try:
        async def scenario():
            leaver = socket.create_connection(("127.0.0.1", port))
            body = json.dumps({"prompts": prompts[:1], "responses": responses[:1]}).encode()
            leaver.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
            async with aiohttp.ClientSession() as session:
                async def stay(i):
                    async with session.post(f"{url}/score", json={"prompts": [prompts[i]],
                                                                  "responses": [responses[i]]}) as r:
                        return r.status, await r.json()
                tasks = [asyncio.ensure_future(stay(1)), asyncio.ensure_future(stay(2))]
                await asyncio.sleep(0.2)
                leaver.close()  # gone while its job waits for the batch
                return await asyncio.gather(*tasks)

        answers = asyncio.run(scenario())
        for i, (status, answer) in zip((1, 2), answers):
            assert status == 200 and answer["rewards"] == [offline.score([prompts[i]], [responses[i]])[0]]
        stats = get(f"{url}/info")["stats"]
        assert stats["dropped"] == 1 and stats["jobs"] == 2 and stats["failed"] == 0
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_then_exits(run_dir, offline, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]))
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve_rm.py"), "--model", str(run_dir),
                             "--port", "0", "--threads", "1", "--max-wait-ms", "1500", "--max-length",
                             str(MAX_LENGTH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "serving on http://127.0.0.1:PORT" once it listens
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[-1]
        prompts, responses = codepmp_texts(2, seed=7)
        result = {}
        request = threading.Thread(target=lambda: result.update(answer=post(
            f"{url}/score", {"prompts": prompts, "responses": responses})))
        request.start()
        deadline = time.monotonic() + 30
        while get(f"{url}/info")["stats"]["in_flight_jobs"] == 0:  # queued, waiting out --max-wait-ms
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        request.join(60)
        assert proc.wait(60) == 0
        status, answer = result["answer"]
        assert status == 200 and np.array_equal(np.array(answer["rewards"]), offline.score(prompts, responses))
        assert "drained and stopped" in proc.stderr.read()
        with pytest.raises(urllib.error.URLError):  # no longer listening
            get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_help_explains_every_flag(capsys):
    spec = importlib.util.spec_from_file_location("serve_rm_tool", REPO / "tools" / "serve_rm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--device", "--precision", "--dtype", "--tokenizer", "--template",
                 "--eos-policy", "--max-length", "--overlong", "--batch-tokens", "--max-wait-ms", "--tile-tokens",
                 "--packing", "--max-body-mb", "--shutdown-timeout", "--threads"):
        assert flag in text
