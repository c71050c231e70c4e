#!/usr/bin/env python
"""Sample N candidate completions per HumanEval problem, for ``tools/evaluate.py code-bon``.

  # a model in this process (GPU, vLLM):
  python tools/generate_candidates.py --backend vllm --model deepseek-ai/deepseek-coder-1.3b-base \\
      --n 16 --temperature 0.8 --top-p 0.95 --max-tokens 512 --output cands.jsonl
  # any OpenAI-compatible server (vllm serve, TGI, SGLang, python tools/serve_models.py):
  python tools/generate_candidates.py --backend openai --base-url http://127.0.0.1:8000 --model NAME \\
      --n 16 --output cands.jsonl
  # no model (CPU demo): the canonical solution plus AST mutants of it -- SYNTHETIC candidates
  python tools/generate_candidates.py --backend mutants --n 8 --limit 20 --output cands.jsonl

Output: one JSONL line per problem, ``{"id": task_id, "prompt", "entry_point", "source": "vllm" | "openai" |
"mutants", "synthetic": bool, "generator": {...settings...}, "candidates": [{"response", ...}]}``, without
``correct`` labels: ``code-bon`` decides correctness by running each candidate against the problem's tests.
Mutant candidates (``"source": "mutants"``, ``"synthetic": true``) are the canonical solution (``"origin":
"canonical"``) and up to N-1 distinct mutants of it (``"origin": "mutant"``, with the ``mutation``: kind,
detail, line), made by :mod:`megapmp.synth.rules` as :mod:`megapmp.synth.verified` does, *not* executed here
(a mutant may still pass the tests; code-bon finds out).

Sampling: completions mode (default) sends the raw HumanEval prompt and stops at the usual HumanEval stop
sequences (``\\ndef ``, ``\\nclass ``, ``\\nif __name__``, ``\\nprint(``, ``\\n#``; ``--stop`` replaces them);
``--mode chat`` sends the prompt as one user message and keeps the first fenced code block of the answer
(the whole function, which redefines the prompt's). With ``--seed S`` sample k of every problem is requested
with seed S + k, so the N samples differ and a resumed run equals an uninterrupted one on servers that honour
seeds; without it the server samples freely.

Resumable: problems already in --output (same generator settings) are skipped; records are appended and
flushed after every --batch-size problems; a line cut short by an interruption is dropped.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_candidates.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=("vllm", "openai", "mutants"),
                   help="vllm: offline engine in this process (GPU); openai: an OpenAI-compatible server at "
                        "--base-url; mutants: no model, canonical solution + AST mutants (synthetic, CPU)")
    p.add_argument("--model", default=None, help="model name (openai) or path / HF id (vllm)")
    p.add_argument("--base-url", default=None, metavar="URL", help="openai: e.g. http://127.0.0.1:8000 (/v1 optional)")
    p.add_argument("--output", required=True, metavar="CANDIDATES.jsonl")
    p.add_argument("--n", type=int, default=16, help="candidates per problem (default 16)")
    p.add_argument("--limit", type=int, default=None, help="first N HumanEval problems only")
    p.add_argument("--task-ids", default=None, metavar="ID,ID,...", help="only these task_ids (e.g. HumanEval/0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens per completion (default 512)")
    g.add_argument("--seed", type=int, default=None,
                   help="sample k of each problem uses seed SEED + k (mutants: the mutation seed; default 0)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop sequence, repeatable (default: HumanEval's in completions mode, none in chat mode)")
    g.add_argument("--mode", choices=("completions", "chat"), default="completions",
                   help="completions: the raw prompt (default); chat: one user message, code block extracted")
    b = p.add_argument_group("backend")
    b.add_argument("--batch-size", type=int, default=16, help="problems per batch / output flush (default 16)")
    b.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight (default 8)")
    b.add_argument("--timeout", type=float, default=300.0, metavar="S", help="openai: per request (default 300)")
    b.add_argument("--max-retries", type=int, default=5, help="openai: retries with backoff (default 5)")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR", help="openai: API key variable")
    b.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs")
    b.add_argument("--dtype", default="auto", help="vllm: model dtype (default auto)")
    b.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm (default 0.9)")
    b.add_argument("--max-model-len", type=int, default=None, help="vllm: context length")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------------------------------
# resume


def read_done(path: Path, generator: dict) -> set[str]:
    """Ids already written with these generator settings; drops a last line cut short by an interruption."""
    done: set[str] = set()
    if not path.exists():
        return done
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        print(f"[generate] {path}: dropping an incomplete last line ({len(raw) - cut} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    for line_no, line in enumerate(raw.decode("utf-8").split("\n"), 1):  # not splitlines(): U+2028 in JSON
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("generator") != generator:
            raise SystemExit(f"error: {path}:{line_no} was generated with other settings "
                             f"({record.get('generator')}); use another --output or the same settings")
        done.add(record["id"])
    return done


# ---------------------------------------------------------------------------------------------------
# candidates


def mutant_candidates(problem: dict, n: int, seed: int) -> list[dict]:
    """The canonical solution and up to n-1 distinct AST mutants of it (not executed)."""
    from megapmp.synth.verified import VerifyConfig, VerifyStats, enclosing_definition, mutants

    prompt, canonical = problem["prompt"], problem["canonical_solution"]
    out = [{"response": canonical, "origin": "canonical"}]
    if n < 2:
        return out
    full = prompt + canonical
    try:
        node = enclosing_definition(ast.parse(full), full, len(prompt))
    except SyntaxError:
        node = None
    if node is None:
        return out
    config = VerifyConfig(k=n - 1, max_tries=max(15, 3 * n), seed=seed)
    for response, mutation in mutants(full, len(prompt), node, problem["task_id"], config, VerifyStats()):
        out.append({"response": response, "origin": "mutant", "mutation": mutation})
        if len(out) >= n:
            break
    return out


def extract_code(text: str) -> str:
    """The first fenced code block of a chat answer (the whole answer when there is none)."""
    m = _FENCE.search(text)
    return "\n" + (m.group(1) if m else text)


def model_candidates(backend, problems: list[dict], args, stop) -> list[list[dict]]:
    """args.n sampled completions for each problem, in order."""
    from megapmp.synth.llm import SamplingParams

    prompts = [p["prompt"] for p in problems]
    out: list[list[dict]] = [[] for _ in problems]
    if args.seed is None:  # one request per (problem, sample), all in one call
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, stop=stop)
        results = backend.run([q for q in prompts for _ in range(args.n)], params)
        per_sample = [results[k::args.n] for k in range(args.n)]
    else:  # sample k of every problem with seed + k
        per_sample = [backend.run(prompts, SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                                          max_tokens=args.max_tokens, seed=args.seed + k, stop=stop))
                      for k in range(args.n)]
    for k in range(args.n):
        for i, c in enumerate(per_sample[k]):
            entry = {"response": extract_code(c.text) if args.mode == "chat" else c.text,
                     "finish_reason": c.finish_reason}
            if args.mode == "chat":
                entry["raw"] = c.text
            out[i].append(entry)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--n, --batch-size and --limit must be at least 1")
    if args.backend != "mutants" and not args.model:
        parser.error(f"--backend {args.backend} needs --model")
    if args.backend == "openai" and not args.base_url:
        parser.error("--backend openai needs --base-url")

    from tqdm import tqdm

    from megapmp.synth.verified import load_humaneval

    problems = load_humaneval()
    if args.task_ids:
        wanted = [t.strip() for t in args.task_ids.split(",") if t.strip()]
        unknown = sorted(set(wanted) - {p["task_id"] for p in problems})
        if unknown:
            parser.error(f"--task-ids: not HumanEval task_ids: {', '.join(unknown)}")
        problems = [p for p in problems if p["task_id"] in set(wanted)]
    if args.limit is not None:
        problems = problems[: args.limit]

    stop = tuple(args.stop) if args.stop else (HUMANEVAL_STOP if args.mode == "completions" else None)
    if args.backend == "mutants":
        generator = {"backend": "mutants", "n": args.n, "seed": args.seed or 0}
    else:
        generator = {"backend": args.backend, "model": args.model, "mode": args.mode, "n": args.n,
                     "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                     "seed": args.seed, "stop": list(stop) if stop else None}
    output = Path(args.output)
    done = read_done(output, generator)
    todo = [p for p in problems if p["task_id"] not in done]
    print(f"[generate] {len(problems)} problems, {len(problems) - len(todo)} already in {output}, "
          f"{len(todo)} to generate ({args.backend}, n={args.n})", file=sys.stderr)
    if not todo:
        return 0

    backend = None
    if args.backend != "mutants":
        from megapmp.synth.llm import make_backend

        backend = make_backend(args.backend, args.model, base_url=args.base_url, mode=args.mode,
                               api_key=os.environ.get(args.api_key_env, "EMPTY"), concurrency=args.concurrency,
                               timeout_s=args.timeout, max_retries=args.max_retries,
                               tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                               gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                               seed=args.seed if args.seed is not None else 0)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"generate ({args.backend})", unit="problem", disable=args.no_progress,
               file=sys.stderr)
    try:
        with open(output, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start: start + args.batch_size]
                if backend is None:
                    candidates = [mutant_candidates(p, args.n, args.seed or 0) for p in batch]
                else:
                    candidates = model_candidates(backend, batch, args, stop)
                for p, cands in zip(batch, candidates):
                    record = {"id": p["task_id"], "prompt": p["prompt"], "entry_point": p["entry_point"],
                              "source": args.backend, "synthetic": args.backend == "mutants",
                              "generator": generator, "candidates": cands}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if backend is not None:
            backend.close()
    print(f"[generate] wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
