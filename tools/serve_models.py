#!/usr/bin/env python
"""Serve local Hugging Face causal LMs over an OpenAI-compatible HTTP API (megapmp.synth.serve).

    python tools/serve_models.py --model DIR [--model DIR2 ...] [--port 0]   # prints "port N"

For tests and local runs on a CPU; `--fail-first N` / `--retry-after S` / `--delay S` simulate an overloaded
server to exercise clients. For production serving use vLLM (`vllm serve MODEL`) or `transformers serve`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.synth.serve import build_server  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/serve_models.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a local HF causal-LM directory (model + tokenizer); repeatable")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="the name clients ask for, one per --model (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port; the bound port is printed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fail-first", type=int, default=0, metavar="N",
                   help="answer 503 to the first N generation requests (to exercise client retries)")
    p.add_argument("--retry-after", type=float, default=0.0, metavar="S", help="Retry-After sent with those 503s")
    p.add_argument("--delay", type=float, default=0.0, metavar="S",
                   help="wait S seconds before answering each generation request (to exercise client timeouts)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    server = build_server(args.model, args.served_model_name, args.host, args.port, fail_first=args.fail_first,
                          retry_after=args.retry_after, delay_s=args.delay, quiet=not args.verbose)
    print(f"port {server.server_address[1]}", flush=True)
    print(f"serving {sorted(server.models)} on http://{args.host}:{server.server_address[1]}/v1",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
