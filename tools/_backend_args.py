"""The flags that choose and configure an LLM backend (megapmp.synth.llm), shared by the tools that sample or
judge with a model: synthesize_pairs.py (summarize, generate, commits, critic-evol), generate_candidates.py
(code, math), make_rm_pairs.py sampled, and evaluate.py codeprefbench --judge openai (the client flags only).
One set of names, defaults and help texts, mapped to make_backend in one place (backend_from_args).

What differs between the tools on purpose is a parameter: whether --backend is required (commits is
model-free without it), the --batch-size and what it counts (a batch of generate_candidates is N samples of
each problem), the --mode default (chat for instruct models: make_rm_pairs' samplers, evaluate's judge;
completions for CodePMP's raw prompts, HumanEval and MetaMath) and its help, and one --base-url or one per
--model (make_rm_pairs samples several models)."""

from __future__ import annotations

import argparse
import os

from megapmp.synth.llm import BACKENDS, MODES, Backend

BACKEND_HELP = {
    "openai": "openai: any OpenAI-compatible server (vLLM `vllm serve`, TGI, SGLang, `python tools/serve_models.py`) "
              "at --base-url",
    "vllm": "vllm: vLLM's offline engine in this process (GPU; pip install 'megapmp[synth]')",
}


def add_openai_arguments(group, *, mode: str = "completions", mode_help: str | None = None,
                         base_url_per_model: bool = False) -> None:
    """--base-url, --mode, --api-key-env, --concurrency, --timeout, --max-retries on ``group`` (a parser or an
    argument group): the client of an OpenAI-compatible server."""
    url_help = "openai: the server, e.g. http://127.0.0.1:8000 (/v1 optional)"
    if base_url_per_model:
        group.add_argument("--base-url", action="append", default=None, metavar="URL",
                           help=url_help + "; one URL for all models, or one per --model in the same order")
    else:
        group.add_argument("--base-url", default=None, metavar="URL", help=url_help)
    group.add_argument("--mode", choices=MODES, default=mode,
                       help=mode_help or "completions: send the prompt as raw text, as CodePMP's prompts are written; "
                                         f"chat: one user message through the model's chat template (default {mode})")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="openai: environment variable holding the API key (default OPENAI_API_KEY; 'EMPTY' if "
                            "unset)")
    group.add_argument("--concurrency", type=int, default=8,
                       help="openai: requests in flight per model (default 8; CodeFavor's judging used 80)")
    group.add_argument("--timeout", type=float, default=300.0, metavar="S",
                       help="openai: seconds per request attempt (default 300)")
    group.add_argument("--max-retries", type=int, default=5,
                       help="openai: retries of a failed request (connection errors, timeouts, 408/409/429 and 5xx), "
                            "after the openai SDK's exponential backoff or the server's Retry-After, before it counts "
                            "as failed (default 5)")


def add_vllm_arguments(group) -> None:
    """--tensor-parallel-size, --dtype, --gpu-memory-utilization, --max-model-len: vLLM's offline engine."""
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model (default 1)")
    group.add_argument("--dtype", default="auto", help="vllm: model dtype (default auto)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="vllm: fraction of GPU memory per engine (default 0.9; ~0.45 for two models on one GPU)")
    group.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (default: the model's)")


def add_backend_arguments(parser: argparse.ArgumentParser, *, backends: tuple[str, ...] = BACKENDS,
                          backend_note: str = "", required: bool = True, batch_size_default: int = 64,
                          batch_unit: str = "records", mode: str = "completions", mode_help: str | None = None,
                          base_url_per_model: bool = False):
    """A "backend" group: --backend (one of ``backends``; ``backend_note`` ends its help, e.g. describing a tool's
    own choice beside the LLM ones), the client and engine flags, and --batch-size."""
    g = parser.add_argument_group("backend")
    descriptions = [BACKEND_HELP[b] for b in backends if b in BACKEND_HELP] + ([backend_note] if backend_note else [])
    g.add_argument("--backend", choices=backends, required=required, default=None, help="; ".join(descriptions))
    add_openai_arguments(g, mode=mode, mode_help=mode_help, base_url_per_model=base_url_per_model)
    g.add_argument("--batch-size", type=int, default=batch_size_default,
                   help=f"{batch_unit} per batch: the unit of progress and of the output's flushes "
                        f"(default {batch_size_default})")
    add_vllm_arguments(g)
    return g


def backend_from_args(args: argparse.Namespace, model: str, *, base_url: str | None = None,
                      kind: str | None = None, mode: str | None = None) -> Backend:
    """The backend of those flags serving ``model``; ``base_url``, ``kind`` and ``mode`` replace --base-url,
    --backend and --mode (a second server, a judge). vLLM's engine seed is --seed, 0 without one."""
    from megapmp.synth import llm  # looked up when called: tests replace llm.make_backend

    seed = getattr(args, "seed", None)
    return llm.make_backend(kind or args.backend, model, base_url=base_url or args.base_url, mode=mode or args.mode,
                            api_key=os.environ.get(args.api_key_env, "EMPTY"), concurrency=args.concurrency,
                            timeout_s=args.timeout, max_retries=args.max_retries,
                            tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                            seed=seed if seed is not None else 0)
