#!/usr/bin/env python
"""Serve a trained reward model over HTTP: batched, batch-invariant scoring of (prompt, response) texts.

    python tools/serve_rm.py --model runs/my_rm --port 8000
    curl -s localhost:8000/score -d '{"prompts": ["Sort xs."], "responses": ["sorted(xs)"]}'
    curl -s localhost:8000/get_reward -d '{"query": ["Sort xs.sorted(xs)"]}'     # OpenRLHF's shape

--model is any model source (a run directory, a checkpoint, an HF export; megapmp.convert.source) and
texts are turned into ids with its own recipe (template, EOS policy, tokenizer). A pairwise judge (trained
on tools/make_judge_data.py samples) is served for POST /compare instead (megapmp/serve/compare.py). Requests from all
clients are gathered into batches of up to --batch-tokens tokens, waiting at most --max-wait-ms for
company; a large request is scored a chunk at a time beside the others. Routes, limits and error answers:
megapmp/serve/app.py. With --port 0 the OS picks a free port; the line "serving on http://HOST:PORT" on
stdout says which. SIGTERM (or Ctrl-C) stops accepting connections, answers the requests it can within
--shutdown-timeout seconds (the rest get 503), and exits 0.

Clients are treated as hostile: slow or half-open connections time out (--header-timeout, --body-timeout),
open connections are capped (--max-connections), requests are bounded (--max-body-mb, --max-texts,
--max-request-tokens). With an API key (--api-key, or MEGAPMP_RM_API_KEY, which keeps it out of the process
list) every route but /health needs "Authorization: Bearer KEY"; listening beyond loopback without a key
is refused unless --insecure.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/_scorer_args.py, also when loaded by path

from _scorer_args import add_scorer_arguments, scorer_kwargs  # noqa: E402

from megapmp.convert.source import ConvertError  # noqa: E402
from megapmp.eval.batch_invariant import DEFAULT_TILE_TOKENS, PACKINGS  # noqa: E402
from megapmp.serve.app import OVERLONG_POLICIES, ServeSettings, build_app, serve  # noqa: E402

API_KEY_ENV = "MEGAPMP_RM_API_KEY"
_DEFAULTS = ServeSettings()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model source: a run directory, a checkpoints/ or step_XXXXXXXX/ directory, or an HF export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 lets the OS pick a free one")
    add_scorer_arguments(p)
    p.add_argument("--overlong", default=_DEFAULTS.overlong, choices=OVERLONG_POLICIES,
                   help="an input over --max-length: truncate it with the recipe's policy (the prompt from the "
                        "left, then the response from the right, EOS kept) and list it in the answer's "
                        "'truncated', or refuse the request with HTTP 413")
    p.add_argument("--batch-tokens", type=int, default=_DEFAULTS.batch_tokens,
                   help="close a batch once the next request would take it past this many tokens")
    p.add_argument("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--tile-tokens", type=int, default=DEFAULT_TILE_TOKENS,
                   help="rows per GEMM of the batch-invariant forward (every linear layer runs on tiles of "
                        "this many tokens, so no GEMM's shape depends on the batch)")
    p.add_argument("--packing", default="flat", choices=PACKINGS,
                   help="how a batch's sequences are laid out: one row back to back (flat) or first-fit "
                        "rows (rows); the scores are the same bits either way")
    p.add_argument("--max-body-mb", type=float, default=_DEFAULTS.max_body_bytes / 2 ** 20,
                   help="refuse request bodies larger than this many MiB with HTTP 413")
    p.add_argument("--max-texts", type=int, default=_DEFAULTS.max_texts,
                   help="refuse a request with more texts than this with HTTP 413 (clients split larger ones)")
    p.add_argument("--max-request-tokens", type=int, default=_DEFAULTS.max_request_tokens,
                   help="refuse a request holding more tokens than this (after tokenization) with HTTP 413")
    p.add_argument("--header-timeout", type=float, default=_DEFAULTS.header_timeout_s,
                   help="close a connection that has not sent a complete request head this many seconds after "
                        "connecting or after its previous answer (slow or half-open clients)")
    p.add_argument("--body-timeout", type=float, default=_DEFAULTS.body_timeout_s,
                   help="answer HTTP 408 and close when a request body has not arrived within this many seconds; "
                        "also how long a client may take to read its answer before it is disconnected")
    p.add_argument("--max-pending-mb", type=float, default=_DEFAULTS.max_pending_bytes / 2 ** 20,
                   help="bytes held for requests at once (bodies as they arrive, then their token ids while they "
                        "wait and are scored), in MiB; a request past it gets HTTP 503")
    p.add_argument("--max-connections", type=int, default=_DEFAULTS.max_connections,
                   help="open connections at most: a new one closes the oldest idle one, or gets HTTP 503 when "
                        "every one is busy")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: the "
                        f"{API_KEY_ENV} environment variable, which keeps the key out of the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback (--host 0.0.0.0, ...) without an API key")
    p.add_argument("--shutdown-timeout", type=float, default=_DEFAULTS.shutdown_timeout,
                   help="on SIGTERM, answer what can be answered within this many seconds (the rest get HTTP "
                        "503), then exit")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.tile_tokens < 1:
        p.error("--tile-tokens must be >= 1")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    args.settings = serve_settings(args)
    try:
        args.settings.validate()
    except ValueError as e:
        p.error(str(e))
    if not args.api_key and not args.insecure and not is_loopback(args.host):
        p.error(f"refusing to listen on {args.host} without an API key: pass --api-key (or set {API_KEY_ENV}), "
                "or --insecure to serve unauthenticated clients beyond loopback")
    return args


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings from the flags (whose defaults are ServeSettings' own)."""
    return ServeSettings(batch_tokens=args.batch_tokens, max_wait_ms=args.max_wait_ms, overlong=args.overlong,
                         max_body_bytes=int(args.max_body_mb * 2 ** 20), max_texts=args.max_texts,
                         max_request_tokens=args.max_request_tokens, header_timeout_s=args.header_timeout,
                         body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                         max_pending_bytes=int(args.max_pending_mb * 2 ** 20),
                         shutdown_timeout=args.shutdown_timeout, api_key=args.api_key)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (a name other than localhost is not
    resolved: it counts as beyond loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        app = build_app(scorer, args.settings)  # refuses a model whose rewards are not finite on a probe input
    except (ConvertError, ValueError) as e:
        print(f"serve_rm: {e}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        print(f"serving on http://{args.host}:{port}", flush=True)

    asyncio.run(serve(app, args.host, args.port, on_ready=ready))
    print("serve_rm: drained and stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Past --shutdown-timeout a model call or a tokenization may still run on a daemon thread, inside torch's
    # C++: interpreter finalization would end that thread mid-call and abort the process. Nothing is left to
    # write, so leave without finalizing.
    os._exit(status)
