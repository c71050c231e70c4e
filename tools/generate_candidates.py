#!/usr/bin/env python
"""Sample N candidate solutions per problem, for Best-of-N evaluation (``tools/evaluate.py``).

  code   HumanEval problems -> completions for ``evaluate.py code-bon`` (correctness by sandboxed execution)
  math   GSM8K or MATH questions -> solutions, answers extracted and labelled, for ``evaluate.py best-of-n``
         (the paper's Best-of-N: MetaMath-Mistral-7B, N up to 256, on GSM8K and MATH; CodePMP section 4.1.3)

``code`` is the default subcommand: ``generate_candidates.py --backend ...`` is ``generate_candidates.py code
--backend ...``.

  # code, a model in this process (GPU, vLLM):
  python tools/generate_candidates.py code --backend vllm --model deepseek-ai/deepseek-coder-1.3b-base \\
      --n 16 --temperature 0.8 --top-p 0.95 --max-tokens 512 --output cands.jsonl
  # code, no model (CPU demo): the canonical solution plus AST mutants of it -- SYNTHETIC candidates
  python tools/generate_candidates.py code --backend mutants --n 8 --limit 20 --output cands.jsonl
  # math, the paper's generator on GSM8K's test split, N = 256, served by vLLM (or any OpenAI-compatible server):
  python tools/generate_candidates.py math --backend vllm --model meta-math/MetaMath-Mistral-7B \\
      --data ../shared/data/gsm8k/test.jsonl --n 256 --seed 0 --output gsm8k_cands.jsonl
  python tools/evaluate.py best-of-n --model RM --data gsm8k_cands.jsonl --output bon.json --plot bon.png

code output: one JSONL line per problem, ``{"id": task_id, "prompt", "entry_point", "source": "vllm" | "openai" |
"mutants", "synthetic": bool, "generator": {...settings...}, "candidates": [{"response", ...}]}``, without
``correct`` labels: ``code-bon`` decides correctness by running each candidate against the problem's tests.
Mutant candidates (``"source": "mutants"``, ``"synthetic": true``) are the canonical solution (``"origin":
"canonical"``) and up to N-1 distinct mutants of it (``"origin": "mutant"``, with the ``mutation``: kind,
detail, line), made by :mod:`megapmp.synth.rules` as :mod:`megapmp.synth.verified` does, *not* executed here
(a mutant may still pass the tests; code-bon finds out). Sampling: completions mode (default) sends the raw
HumanEval prompt and stops at the usual HumanEval stop sequences (``\\ndef ``, ``\\nclass ``, ``\\nif __name__``,
``\\nprint(``, ``\\n#``; ``--stop`` replaces them); ``--mode chat`` sends the prompt as one user message and keeps
the first fenced code block of the answer (the whole function, which redefines the prompt's).

math input: JSONL with the question in ``question`` (GSM8K), ``problem`` (MATH), ``query`` or ``instruction``
(MetaMath's eval files) and the reference solution in ``answer`` (GSM8K, "#### n"), ``solution`` (MATH,
``\\boxed{}``), ``response`` or ``output``. Each question is sent in MetaMath's own prompt (the Alpaca template
ending in "### Response: Let's think step by step.", MetaMath's eval_gsm8k.py / eval_math.py) with its stop
sequences; each solution's final answer is extracted and compared with the reference's by
:mod:`megapmp.eval.answers` (GSM8K: "#### n", else after "The answer is", else the last number; MATH: the last
``\\boxed{}``, else after "The answer is"; ``--answer-type`` or auto-detected from the reference). math output
is the ``candidates`` format: ``{"id", "prompt": the question, "candidates": [{"response", "correct",
"answer", "finish_reason"}], "meta": {"gold", "answer_type", "data"}, "generator": {...}}``.

Both: with ``--seed S`` sample k of every problem is requested with seed S + k, so the N samples differ and a
resumed run equals an uninterrupted one on servers that honour seeds; without it the server samples freely.
Resumable: problems already in --output (same generator settings) are skipped; records are appended and
flushed after every --batch-size problems; a line cut short by an interruption is dropped.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/_backend_args.py, also when loaded by path

from _backend_args import add_backend_arguments, backend_from_args  # noqa: E402

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.S)
# MetaMath's evaluation prompt and stop sequences (meta-math/MetaMath eval_gsm8k.py and eval_math.py; MetaMath-
# Mistral-7B is the paper's Best-of-N generator), and its new-token limits: 512 for GSM8K, 2048 for MATH.
METAMATH_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step.")
METAMATH_STOP = ("Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT", "Instruction:", "Instruction",
                 "Response:", "Response")
METAMATH_MAX_TOKENS = {"gsm8k": 512, "math": 2048}
QUESTION_KEYS = ("question", "problem", "query", "instruction")
GOLD_KEYS = ("answer", "solution", "response", "output")
SUBCOMMANDS = ("code", "math")


def add_common_arguments(p: argparse.ArgumentParser, backends: tuple[str, ...], mode_help: str) -> None:
    p.add_argument("--model", default=None, help="model name (openai) or path / HF id (vllm)")
    p.add_argument("--output", required=True, metavar="CANDIDATES.jsonl",
                   help="candidates JSONL (the formats above); problems already in it are skipped")
    p.add_argument("--limit", type=int, default=None, help="the first N problems only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # A batch is N samples of each of its problems: fewer problems than the other tools' records.
    add_backend_arguments(p, backends=backends, batch_size_default=16, batch_unit="problems", mode_help=mode_help,
                          backend_note=("mutants: no model, canonical solution + AST mutants (synthetic, CPU)"
                                        if "mutants" in backends else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_candidates.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    code = sub.add_parser("code", help="HumanEval completions for evaluate.py code-bon (the default subcommand)",
                          description="N completions per HumanEval problem (see the tool's --help)")
    add_common_arguments(code, ("vllm", "openai", "mutants"),
                         mode_help="completions: the raw prompt (default); chat: one user message, code block "
                                   "extracted")
    code.add_argument("--n", type=int, default=16, help="candidates per problem (default 16)")
    code.add_argument("--task-ids", default=None, metavar="ID,ID,...", help="only these task_ids (e.g. HumanEval/0)")
    g = code.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens per completion (default 512)")
    g.add_argument("--seed", type=int, default=None,
                   help="sample k of each problem uses seed SEED + k (mutants: the mutation seed; default 0)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop sequence, repeatable (default: HumanEval's in completions mode, none in chat mode)")

    math = sub.add_parser("math", help="GSM8K / MATH solutions, labelled, for evaluate.py best-of-n",
                          description="N solutions per GSM8K or MATH question in MetaMath's prompt, each labelled "
                                      "correct or not by megapmp.eval.answers (see the tool's --help)")
    add_common_arguments(math, ("vllm", "openai"),
                         mode_help="completions: MetaMath's prompt as raw text (default; MetaMath-Mistral-7B is not a "
                                   "chat model); chat: the same text as one user message")
    math.add_argument("--data", required=True, metavar="FILE.jsonl",
                      help="GSM8K {question, answer} or MATH {problem, solution} JSONL (also MetaMath's {query, "
                           "response} / {instruction, output})")
    math.add_argument("--n", type=int, default=256,
                      help="solutions per question (default 256, the paper's largest N; evaluate.py best-of-n then "
                           "reports N = 1, 2, 4, ..., 256)")
    math.add_argument("--answer-type", choices=("auto", "gsm8k", "math"), default="auto",
                      help="how answers are extracted and compared (default: per question, math when the reference "
                           "has \\boxed or LaTeX, else gsm8k)")
    g = math.add_argument_group("sampling (the paper does not state its Best-of-N sampling settings)")
    g.add_argument("--temperature", type=float, default=0.7, help="default 0.7")
    g.add_argument("--top-p", type=float, default=1.0, help="default 1.0")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per solution (default MetaMath's: 512 for GSM8K, 2048 for MATH, by the first "
                        "question's answer type)")
    g.add_argument("--seed", type=int, default=None, help="sample k of each question uses seed SEED + k")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop sequence, repeatable (default: MetaMath's)")
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


def sample(backend, prompts: list[str], args, stop) -> list[list]:
    """args.n completions (megapmp.synth.llm.Completion) for each prompt, in order."""
    from megapmp.synth.llm import SamplingParams

    def params(seed):
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=seed,
                              stop=stop)

    if args.seed is None:  # one request per (problem, sample), all in one call
        results = backend.run([q for q in prompts for _ in range(args.n)], params(None))
        per_sample = [results[k::args.n] for k in range(args.n)]
    else:  # sample k of every problem with seed + k
        per_sample = [backend.run(prompts, params(args.seed + k)) for k in range(args.n)]
    return [[per_sample[k][i] for k in range(args.n)] for i in range(len(prompts))]


def model_candidates(backend, problems: list[dict], args, stop) -> list[list[dict]]:
    """args.n sampled HumanEval completions for each problem, in order."""
    out = []
    for completions in sample(backend, [p["prompt"] for p in problems], args, stop):
        entries = []
        for c in completions:
            entry = {"response": extract_code(c.text) if args.mode == "chat" else c.text,
                     "finish_reason": c.finish_reason}
            if args.mode == "chat":
                entry["raw"] = c.text
            entries.append(entry)
        out.append(entries)
    return out


# ---------------------------------------------------------------------------------------------------
# math


def read_math_questions(path: str) -> list[dict]:
    """{id, question, gold} of every line; a line without a question or a reference solution is an
    InputError naming FILE:LINE."""
    from megapmp.io import InputError, iter_jsonl

    questions, seen = [], set()
    for line, record in iter_jsonl(path):
        question = next((record[k] for k in QUESTION_KEYS if isinstance(record.get(k), str)), None)
        gold = next((record[k] for k in GOLD_KEYS if isinstance(record.get(k), (str, int, float))
                     and not isinstance(record.get(k), bool)), None)
        if question is None or not question.strip():
            raise InputError(path, line, "question", f"no question (a non-empty string in one of {', '.join(QUESTION_KEYS)})")
        if gold is None or not str(gold).strip():
            raise InputError(path, line, "answer", f"no reference solution (one of {', '.join(GOLD_KEYS)})")
        qid = str(record.get("id", record.get("unique_id", f"line{line}")))
        if qid in seen:
            raise InputError(path, line, "id", f"duplicate id {qid!r}")
        seen.add(qid)
        questions.append({"id": qid, "question": question, "gold": str(gold)})
    if not questions:
        raise InputError(path, None, None, "no questions")
    return questions


def math_candidates(backend, questions: list[dict], args, stop, answer_types: list[str]) -> list[list[dict]]:
    """args.n solutions per question, each with its extracted answer and correctness."""
    from megapmp.eval.answers import extract_gsm8k_answer, extract_math_answer, is_correct

    prompts = [METAMATH_PROMPT.format(instruction=q["question"]) for q in questions]
    out = []
    for q, kind, completions in zip(questions, answer_types, sample(backend, prompts, args, stop)):
        extract = extract_gsm8k_answer if kind == "gsm8k" else extract_math_answer
        out.append([{"response": c.text.strip(), "correct": is_correct(c.text, q["gold"], kind),
                     "answer": extract(c.text), "finish_reason": c.finish_reason} for c in completions])
    return out


def run_math(args, parser) -> int:
    from megapmp.eval.answers import detect_answer_type, extract_gsm8k_answer, extract_math_answer
    from megapmp.io import InputError

    if not args.model:
        parser.error(f"--backend {args.backend} needs --model")
    try:
        questions = read_math_questions(args.data)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        questions = questions[: args.limit]
    kinds = [detect_answer_type(q["gold"]) if args.answer_type == "auto" else args.answer_type for q in questions]
    if args.max_tokens is None:
        args.max_tokens = METAMATH_MAX_TOKENS[kinds[0]]
    stop = tuple(args.stop) if args.stop else METAMATH_STOP
    generator = {"backend": args.backend, "model": args.model, "mode": args.mode, "n": args.n,
                 "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                 "seed": args.seed, "stop": list(stop), "prompt": "metamath", "answer_type": args.answer_type}

    def record(q, kind, cands):
        gold = (extract_gsm8k_answer if kind == "gsm8k" else extract_math_answer)(q["gold"])
        return {"id": q["id"], "prompt": q["question"], "candidates": cands,
                "meta": {"gold": gold, "answer_type": kind, "data": str(Path(args.data).resolve())},
                "generator": generator}

    items = list(zip(questions, kinds))
    return generate(args, items, lambda item: item[0]["id"], generator,
                    lambda backend, batch: [record(q, kind, cands) for (q, kind), cands in
                                            zip(batch, math_candidates(backend, [q for q, _ in batch], args, stop,
                                                                       [k for _, k in batch]))])


# ---------------------------------------------------------------------------------------------------
# code (HumanEval)


def run_code(args, parser) -> int:
    if args.backend != "mutants" and not args.model:
        parser.error(f"--backend {args.backend} needs --model")
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

    def records(backend, batch):
        if backend is None:
            candidates = [mutant_candidates(p, args.n, args.seed or 0) for p in batch]
        else:
            candidates = model_candidates(backend, batch, args, stop)
        return [{"id": p["task_id"], "prompt": p["prompt"], "entry_point": p["entry_point"], "source": args.backend,
                 "synthetic": args.backend == "mutants", "generator": generator, "candidates": cands}
                for p, cands in zip(batch, candidates)]

    return generate(args, problems, lambda p: p["task_id"], generator, records)


# ---------------------------------------------------------------------------------------------------
# the resumable loop both share


def generate(args, items: list, item_id, generator: dict, make_records) -> int:
    """Write make_records(backend, batch) for every batch of the items not yet in --output."""
    from tqdm import tqdm

    output = Path(args.output)
    done = read_done(output, generator)
    todo = [item for item in items if item_id(item) not in done]
    print(f"[generate] {len(items)} problems, {len(items) - len(todo)} already in {output}, "
          f"{len(todo)} to generate ({args.backend}, n={args.n})", file=sys.stderr)
    if not todo:
        return 0
    backend = None if args.backend == "mutants" else backend_from_args(args, args.model)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"generate ({args.backend})", unit="problem", disable=args.no_progress,
               file=sys.stderr)
    try:
        with open(output, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start: start + args.batch_size]
                for record in make_records(backend, batch):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        if backend is not None:
            backend.close()
    print(f"[generate] wrote {output}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["code"] + argv  # the tool's first form: HumanEval without a subcommand
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--n, --batch-size and --limit must be at least 1")
    if args.backend == "openai" and not args.base_url:
        parser.error("--backend openai needs --base-url")
    return (run_math if args.command == "math" else run_code)(args, parser)


if __name__ == "__main__":
    sys.exit(main())
