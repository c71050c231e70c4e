#!/usr/bin/env python
"""Serve a trained reward model over HTTP: batched, batch-invariant scoring of (prompt, response) texts.

    python tools/serve_rm.py --model runs/my_rm --port 8000
    curl -s localhost:8000/score -d '{"prompts": ["Sort xs."], "responses": ["sorted(xs)"]}'
    curl -s localhost:8000/get_reward -d '{"query": ["Sort xs.sorted(xs)"]}'     # OpenRLHF's shape

--model is any model source (a run directory, a checkpoint, an HF export; megapmp.convert.source) and
texts are turned into ids with its own recipe (template, EOS policy, tokenizer). A pairwise judge (trained
on tools/make_judge_data.py samples) is served for POST /compare instead (megapmp/serve/compare.py). Requests from all
clients are gathered into batches of up to --batch-tokens tokens, waiting at most --max-wait-ms for
company. Routes and error answers: megapmp/serve/app.py. With --port 0 the OS picks a free port; the
line "serving on http://HOST:PORT" on stdout says which. SIGTERM (or Ctrl-C) stops accepting
connections, answers the requests in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/_scorer_args.py, also when loaded by path

from _scorer_args import add_scorer_arguments, scorer_kwargs  # noqa: E402

from megapmp.convert.source import ConvertError  # noqa: E402
from megapmp.eval.batch_invariant import DEFAULT_TILE_TOKENS, PACKINGS  # noqa: E402
from megapmp.serve.app import OVERLONG_POLICIES, ServeSettings, build_app, serve  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model source: a run directory, a checkpoints/ or step_XXXXXXXX/ directory, or an HF export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 lets the OS pick a free one")
    add_scorer_arguments(p)
    p.add_argument("--overlong", default="truncate", choices=OVERLONG_POLICIES,
                   help="an input over --max-length: truncate it with the recipe's policy (the prompt from the "
                        "left, then the response from the right, EOS kept) and list it in the answer's "
                        "'truncated', or refuse the request with HTTP 413")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="close a batch once the next request would take it past this many tokens")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--tile-tokens", type=int, default=DEFAULT_TILE_TOKENS,
                   help="rows per GEMM of the batch-invariant forward (every linear layer runs on tiles of "
                        "this many tokens, so no GEMM's shape depends on the batch)")
    p.add_argument("--packing", default="flat", choices=PACKINGS,
                   help="how a batch's sequences are laid out: one row back to back (flat) or first-fit "
                        "rows (rows); the scores are the same bits either way")
    p.add_argument("--max-body-mb", type=float, default=16.0,
                   help="refuse request bodies larger than this many MiB with HTTP 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to wait for in-flight requests before closing them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    for name in ("batch_tokens", "tile_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        p.error("--max-wait-ms must be >= 0 and --max-body-mb > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from megapmp.eval.judge_scorer import load_scorer  # a pairwise judge, served for POST /compare, or an RM

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scorer = load_scorer(args.model, **scorer_kwargs(args), batch_tokens=args.batch_tokens, progress=False, batch_invariant=True,
                                   tile_tokens=args.tile_tokens, packing=args.packing)
    except (ConvertError, ValueError) as e:
        print(f"serve_rm: {e}", file=sys.stderr)
        return 2
    settings = ServeSettings(batch_tokens=args.batch_tokens, max_wait_ms=args.max_wait_ms, overlong=args.overlong,
                             max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                             shutdown_timeout=args.shutdown_timeout)
    app = build_app(scorer, settings)

    def ready(port: int) -> None:
        print(f"serving on http://{args.host}:{port}", flush=True)

    asyncio.run(serve(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout, on_ready=ready))
    print("serve_rm: drained and stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
