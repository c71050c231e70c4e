#!/usr/bin/env python
"""Execution-verified preference pairs (megapmp.synth.verified): a correct solution against mutants that fail.

    python tools/verified_pairs.py humaneval --out pairs.jsonl [--k 3] [--workers 2] [--limit N]
    python tools/verified_pairs.py doctest --snippets snippets.jsonl --out pairs.jsonl [--field code]

Generated code runs only in the sandbox (megapmp.sandbox); see megapmp/synth/verified.py for the pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megapmp.io import write_jsonl_atomic  # noqa: E402
from megapmp.sandbox import SandboxUnavailable, require_sandbox  # noqa: E402
from megapmp.synth.verified import (VerifyConfig, doctest_pairs, humaneval_pairs, load_humaneval,  # noqa: E402
                                    read_snippet_sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/verified_pairs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=("humaneval", "doctest"))
    parser.add_argument("--out", required=True, help="pairs JSONL (written atomically)")
    parser.add_argument("--snippets", help="doctest: JSONL of snippets")
    parser.add_argument("--field", default="code", help="doctest: the snippet's source field (default: code)")
    parser.add_argument("--limit", type=int, default=None, help="humaneval: first N problems only")
    parser.add_argument("--k", type=int, default=VerifyConfig.k)
    parser.add_argument("--max-tries", type=int, default=VerifyConfig.max_tries)
    parser.add_argument("--seed", type=int, default=VerifyConfig.seed)
    parser.add_argument("--timeout", type=float, default=VerifyConfig.timeout_s)
    parser.add_argument("--workers", type=int, default=VerifyConfig.workers)
    parser.add_argument("--stats", help="also write the stats as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="where no OS isolation (bubblewrap or unshare namespaces) works, run the code anyway with "
                             "in-process guards only; without it such a machine refuses to run it")
    args = parser.parse_args(argv)
    try:
        config = VerifyConfig(k=args.k, max_tries=args.max_tries, seed=args.seed, timeout_s=args.timeout,
                              workers=args.workers, unsafe_no_sandbox=args.unsafe_no_sandbox)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        isolation = require_sandbox(config.unsafe_no_sandbox)["backend"]
    except SandboxUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sandbox: {isolation or 'none (--unsafe-no-sandbox)'} isolation", file=sys.stderr)
    if args.source == "humaneval":
        pairs, stats = humaneval_pairs(load_humaneval(args.limit), config, progress=not args.no_progress)
    else:
        if not args.snippets:
            parser.error("doctest needs --snippets")
        snippets = read_snippet_sources(args.snippets, args.field)
        pairs, stats = doctest_pairs(snippets, config, progress=not args.no_progress)
    write_jsonl_atomic(args.out, pairs)
    summary = stats.as_dict()
    print(json.dumps(summary, indent=2))
    if args.stats:
        write_jsonl_atomic(args.stats, [summary])
    return 0


if __name__ == "__main__":
    sys.exit(main())
