#!/usr/bin/env python
"""Benchmark the reward server against the naive alternative, on loopback; prints ONE JSON line.

    python tools/bench_serve.py                   # a tiny random model, CPU: a minute or two on 2 cores
    python tools/bench_serve.py --model RUN_DIR   # a trained one (its HF export is written to a temp dir)

Two servers, each in a subprocess on 127.0.0.1 (an OS-chosen port), get the same CodePMP-shaped
(prompt, response) requests, one text per request, from 1, 8 and 64 concurrent clients:

* ``serve_rm``: tools/serve_rm.py (requests gathered into batch-invariant packed batches);
* ``naive``: transformers' AutoModelForSequenceClassification on the model's HF export, each request
  scored on its own as one padded batch (what a plain HTTP wrapper around an HF model does), one at a
  time on one worker thread.

Per concurrency: requests/s and p50/p99 latency. On a CPU only the ratios serve_rm / naive are printed
(absolute CPU figures of a tiny model say nothing about a real deployment); on a GPU absolute figures too.
The two servers' rewards for the same texts are compared as well (max |difference|).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONCURRENCY = (1, 8, 64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a megapmp run/checkpoint directory (default: a tiny random model made in a temp dir)")
    p.add_argument("--device", default=None, help="device for both servers (default: the GPU if there is one)")
    p.add_argument("--requests", type=int, default=96,
                   help="requests per concurrency level and server (at least the concurrency)")
    p.add_argument("--phase-seconds", type=float, default=15.0,
                   help="stop issuing requests of one (server, concurrency) phase after this many seconds")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="serve_rm's --max-wait-ms")
    p.add_argument("--batch-tokens", type=int, default=16384, help="serve_rm's --batch-tokens")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--seed", type=int, default=0, help="seed of the texts")
    p.add_argument("--naive-server", metavar="HF_DIR", default=None, help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# the model and the texts


def tiny_checkpoint(root: Path) -> Path:
    """A random tiny reward model saved as the trainer saves it (byte tokenizer, EOS policy response)."""
    import torch

    from megapmp.checkpoint import save_checkpoint
    from megapmp.config import TrainConfig, model_preset
    from megapmp.data.shards import ShardMeta
    from megapmp.data.tokenizers import ByteTokenizer
    from megapmp.model import Qwen2RewardModel

    cfg = TrainConfig()
    cfg.model = model_preset("tiny")
    cfg.data.train = [str(root / "data" / "train")]
    tok = ByteTokenizer()
    meta = ShardMeta(kind="pairs", tokenizer=tok.identity(), vocab_size=tok.vocab_size, padded_vocab_size=384,
                     vocab_multiple=128, eos_id=tok.eos_id, pad_id=tok.pad_id, dtype="uint16",
                     template={"name": "none", "text": "{prompt}"}, eos_policy="response")
    torch.manual_seed(0)
    model = Qwen2RewardModel(cfg.model)
    model.init_weights()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    trainer_state = {"step": 1, "skipped_steps": 0, "consecutive_nonfinite": 0, "optimizer": {}, "loader": {},
                     "rng": {}, "config": asdict(cfg), "shard_meta": asdict(meta)}
    save_checkpoint(root / "checkpoints", 1, model_state=state, optimizer_tensors={}, trainer_state=trainer_state)
    return root


def codepmp_requests(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) like CodePMP's pairs: a programming task and a code answer, 0.3-2k characters."""
    rng = random.Random(seed)
    verbs = ["Write", "Implement", "Fix", "Refactor"]
    out = []
    for i in range(n):
        prompt = (f"{rng.choice(verbs)} a Python function `task_{i}(data)` that parses the records, "
                  + "skips malformed lines, " * rng.randint(0, 4) + "and returns a summary dictionary.")
        lines = [f"    total_{j} = sum(int(x) for x in data[{j}].split(',') if x.strip().isdigit())"
                 for j in range(rng.randint(2, 24))]
        response = f"def task_{i}(data):\n" + "\n".join(lines) + "\n    return {'ok': True}\n"
        out.append((prompt, response))
    return out


# ---------------------------------------------------------------------------------------------------
# the naive server: one padded transformers batch per request


def run_naive_server(hf_dir: str, device: str | None) -> None:
    from aiohttp import web

    from megapmp.convert.hf_scorer import TransformersRewardScorer
    from megapmp.serve.app import serve

    scorer = TransformersRewardScorer(hf_dir, batch_size=1 << 30, device=device, progress=False)
    worker = ThreadPoolExecutor(max_workers=1)  # one request at a time, like the model's one worker

    async def score(request: web.Request) -> web.Response:
        body = await request.json()
        rewards = await asyncio.get_running_loop().run_in_executor(
            worker, scorer.score, body["prompts"], body["responses"])
        return web.json_response({"rewards": [float(r) for r in rewards]})

    app = web.Application()
    app.router.add_post("/score", score)
    asyncio.run(serve(app, "127.0.0.1", 0, shutdown_timeout=10,
                      on_ready=lambda port: print(f"serving on http://127.0.0.1:{port}", flush=True)))


# ---------------------------------------------------------------------------------------------------
# load generation


def start(command: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """Start a server that prints "serving on URL" once it listens; returns it and the URL."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("serving on "):
        proc.kill()
        raise RuntimeError(f"{Path(command[1]).name} did not start: {proc.stderr.read()[-2000:]}")
    return proc, line.split()[-1]


async def phase(url: str, texts: list[tuple[str, str]], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending its share of ``texts`` one request at a time."""
    import aiohttp

    latencies, failures, rewards = [], 0, {}
    stop_at = time.perf_counter() + seconds
    queue = list(enumerate(texts))

    async def client(session):
        nonlocal failures
        while queue and time.perf_counter() < stop_at:
            i, (prompt, response) = queue.pop()
            sent = time.perf_counter()
            try:
                async with session.post(f"{url}/score", json={"prompts": [prompt], "responses": [response]}) as r:
                    answer = await r.json()
                    if r.status != 200:
                        failures += 1
                        continue
            except aiohttp.ClientError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - sent)
            rewards[i] = answer["rewards"][0]

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    return {"requests": len(lat), "failed": failures, "rps": len(lat) / elapsed, "p50_ms": 1000 * pick(0.50),
            "p99_ms": 1000 * pick(0.99), "rewards": rewards}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.naive_server:
        import torch

        torch.set_num_threads(args.threads)
        run_naive_server(args.naive_server, args.device)
        return 0
    import torch

    from megapmp.convert.export import export_to_hf
    from megapmp.device import pick_device

    device = pick_device(args.device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]),
               TOKENIZERS_PARALLELISM="false")
    texts = codepmp_requests(max(args.requests, max(CONCURRENCY)), args.seed)
    results, procs = {}, []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_checkpoint(tmp / "run")
        export_to_hf(model, tmp / "hf")
        common = ["--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
        servers = {
            "serve_rm": [sys.executable, str(REPO / "tools" / "serve_rm.py"), "--model", str(model), "--port", "0",
                         "--max-wait-ms", str(args.max_wait_ms), "--batch-tokens", str(args.batch_tokens)] + common,
            "naive": [sys.executable, str(Path(__file__).resolve()), "--naive-server", str(tmp / "hf")] + common,
        }
        try:
            for name, command in servers.items():
                proc, url = start(command, env)
                procs.append(proc)
                asyncio.run(phase(url, texts[:8], 4, args.phase_seconds))  # warm-up: first-call costs
                results[name] = {c: asyncio.run(phase(url, texts[: max(args.requests, c)], c, args.phase_seconds))
                                 for c in CONCURRENCY}
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
    print(json.dumps(report(results, device, args, texts)), flush=True)
    return 0


def report(results: dict, device, args, texts) -> dict:
    ours, naive = results["serve_rm"], results["naive"]
    absolute = device.type == "cuda"
    table = {}
    diffs = []
    for c in CONCURRENCY:
        a, b = ours[c], naive[c]
        row = {"rps_ratio": round(a["rps"] / b["rps"], 3), "p50_ratio": round(a["p50_ms"] / b["p50_ms"], 3),
               "p99_ratio": round(a["p99_ms"] / b["p99_ms"], 3), "requests": [a["requests"], b["requests"]],
               "failed": [a["failed"], b["failed"]]}
        if absolute:
            row |= {"serve_rm": {k: round(a[k], 2) for k in ("rps", "p50_ms", "p99_ms")},
                    "naive": {k: round(b[k], 2) for k in ("rps", "p50_ms", "p99_ms")}}
        table[str(c)] = row
        diffs += [abs(a["rewards"][i] - b["rewards"][i]) for i in a["rewards"] if i in b["rewards"]]
    chars = [len(p) + len(r) for p, r in texts]
    return {"bench": "serve_rm", "device": str(device), "figures": "absolute and ratios" if absolute else
            "ratios serve_rm / naive (CPU)", "model": args.model or "tiny random (2 layers, hidden 64)",
            "threads": args.threads, "max_wait_ms": args.max_wait_ms, "text_chars": [min(chars), max(chars)],
            "concurrency": table, "max_abs_reward_diff": float(max(diffs)) if diffs else None}


if __name__ == "__main__":
    sys.exit(main())
