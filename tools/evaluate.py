#!/usr/bin/env python
"""Evaluate a reward model: pairwise RM accuracy, Best-of-N, multiple choice, CodePrefBench.

  rm-accuracy      pairs JSONL (or a shard prefix) -> accuracy of r_chosen > r_rejected (ties wrong)
  best-of-n        candidate sets -> expected Best-of-N accuracy for N = 1, 2, 4, ... (exact), with
                   Monte-Carlo, the paper's single-draw protocol, oracle and random-pick baselines
  multiple-choice  LogiQA2.0 / ReClor -> accuracy of the argmax option (ties wrong)
  codeprefbench    CodePrefBench aspect files -> accuracy per aspect (ties 0.5), judged by a reward model, a
                   pairwise judge or an LLM (--judge)
  code-bon         HumanEval candidates -> Best-of-N by sandboxed execution (tools/generate_candidates.py)

The model is a megapmp checkpoint (a step_XXXXXXXX/ directory, or a run / checkpoints directory whose
newest complete checkpoint is taken) or an HF directory (e.g. written by tools/convert_checkpoint.py to-hf).
Texts are tokenized with the model's own recipe: its training tokenizer, prompt template and EOS policy
(from the checkpoint's record of its training shard, or megapmp_scoring.json), as in training.

Every run writes a JSON report (--output), optionally Markdown (--markdown) and a PNG plot (--plot).
Exit codes: 0 success; 2 bad input (missing/malformed file, unusable model: a one-line message) or bad usage.

Examples:
  python tools/evaluate.py best-of-n --model runs/rm --data ../shared/data/gsm8k/example_model_solutions.jsonl \\
      --output reports/gsm8k_bo4.json --markdown reports/gsm8k_bo4.md --plot reports/gsm8k_bo4.png
  python tools/evaluate.py multiple-choice --model exports/rm-hf --data ../shared/data/logiqa2/dev.txt \\
      --output reports/logiqa2_dev.json
  python tools/evaluate.py codeprefbench --model runs/pmp --data ../shared/data/codeprefbench --output reports/cpb.json
  python tools/evaluate.py codeprefbench --judge pairwise --model runs/judge --data ../shared/data/codeprefbench \
      --output reports/cpb_judge.json
  python tools/evaluate.py codeprefbench --judge openai --model gpt-4o --base-url https://api.openai.com \
      --concurrency 80 --data ../shared/data/codeprefbench --output reports/cpb_gpt4o.json
  python tools/evaluate.py rm-accuracy --model runs/rm --data pairs_valid.jsonl --output reports/valid.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/_scorer_args.py, also when loaded by path

from _backend_args import add_openai_arguments  # noqa: E402
from _scorer_args import add_scorer_arguments, scorer_kwargs  # noqa: E402

from megapmp.eval.metrics import PAPER_SEED  # noqa: E402


def add_common_arguments(parser: argparse.ArgumentParser, task) -> None:
    io = parser.add_argument_group("data and outputs")
    io.add_argument("--model", required=True, metavar="CKPT_OR_HF_DIR",
                    help="the reward model: a megapmp checkpoint step directory, a run or checkpoints directory (its "
                         "newest complete checkpoint), or an HF Qwen2ForSequenceClassification directory")
    io.add_argument("--data", required=True, nargs="+" if task.multiple_data else None, metavar="FILE",
                    help=("evaluation data: " + ("one or more files, or a directory of them" if task.multiple_data
                                                 else "one file (CodePMP BoN shards: a file or a directory)")
                          + " (read in place, .gz allowed)"))
    io.add_argument("--format", default=None, choices=task.formats,
                    help="data format (default: detected from the first record). "
                         + {"rm-accuracy": "pairs: JSONL prompt/chosen/rejected (or query/better/worse); shard: a "
                                           "megapmp pair shard prefix",
                            "codeprefbench": "codeprefbench: {task_id, instruction, choices[2], gt_choice}"}.get(
                             task.name, "gsm8k-solutions: GSM8K example_model_solutions.jsonl (4 labelled model "
                                        "solutions per question); candidates: {id, prompt, candidates: [{response, "
                                        "correct}]}; codepmp-bon: CodePMP BoN shards {id, input, output, gold_answer} "
                                        "grouped by id; logiqa2: LogiQA 2.0 lines; reclor: ReClor JSON/JSONL "
                                        "(see megapmp/eval/formats.py)"))
    io.add_argument("--output", required=True, metavar="REPORT.json",
                    help="JSON report to write (atomically): task, data fingerprints, model and input recipe, "
                         "arguments, results")
    io.add_argument("--markdown", default=None, metavar="REPORT.md", help="also write a Markdown summary")
    io.add_argument("--plot", default=None, metavar="PLOT.png", help=f"also write a PNG plot: {task.plot_help}")
    io.add_argument("--limit", type=int, default=None, metavar="N",
                    help="evaluate only the first N questions/pairs (per file for codeprefbench); for quick checks")
    io.add_argument("--save-scores", default=None, metavar="FILE.jsonl",
                    help="also write every item's rewards as JSONL (id, scores and labels), for later analysis")

    model = parser.add_argument_group("model and scoring")
    add_scorer_arguments(model)
    model.add_argument("--seq-len", type=int, default=0, metavar="TOKENS",
                       help="minimum packed row length (default 0: each batch's rows are as long as its longest "
                            "item, shorter items sharing rows; attention cost grows with the square of the row)")
    model.add_argument("--batch-tokens", type=int, default=16384, metavar="TOKENS",
                       help="tokens per forward pass (default 16384); lower it if memory runs out")
    model.add_argument("--layout", default="group", choices=("group", "shared-prefix", "duplicated"),
                       help="packing: all of a question's responses behind one prompt copy per row (group, default: "
                            "[P R1 ... RK], each response seeing the prompt and itself), two responses per prompt copy "
                            "(shared-prefix) or one prompt copy per response (duplicated, the per-candidate rows); "
                            "the scores are the same up to fp32 rounding")
    model.add_argument("--backend", default="megapmp", choices=("megapmp", "transformers"),
                       help="megapmp: our model and packed scoring (checkpoint or HF dir); transformers: an HF export "
                            "scored by transformers alone (AutoModelForSequenceClassification + the export's "
                            "megapmp_scoring.json recipe), the independent check of an export")
    model.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    model.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_best_of_n_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-values", default=None, metavar="N1,N2,...",
                        help="N values to evaluate (default: 1, 2, 4, ... up to the smallest candidate count, capped "
                             "by --max-n, plus that count itself). A question with fewer than N candidates is left "
                             "out of that N's row (the row's 'questions' says how many entered)")
    parser.add_argument("--max-n", type=int, default=256,
                        help="largest default N (default 256, the paper's largest)")
    parser.add_argument("--mc-draws", type=int, default=1000,
                        help="random N-subsets per question for the Monte-Carlo column, a check on the exact "
                             "expectation (default 1000; 0 skips it)")
    parser.add_argument("--mc-seed", type=int, default=0, help="seed of the Monte-Carlo draws (default 0)")
    parser.add_argument("--paper-seed", type=int, default=PAPER_SEED,
                        help="seed of the paper's single-draw protocol (default 123, as in CodePMP's BoN_eval)")
    parser.add_argument("--answer-type", default="auto", choices=("auto", "gsm8k", "math"),
                        help="codepmp-bon only: how final answers are extracted and compared: gsm8k ('#### n', else "
                             "the last number), math (last \\boxed{...}, normalised), or auto (math when the gold "
                             "answer has \\boxed or LaTeX; default)")


def add_code_bon_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-values", default=None, metavar="N1,N2,...",
                        help="N values to evaluate (default: 1, 2, 4, ... up to the smallest candidate count, capped "
                             "by --max-n, plus that count itself)")
    parser.add_argument("--max-n", type=int, default=256, help="largest default N (default 256)")
    parser.add_argument("--mc-draws", type=int, default=1000,
                        help="random N-subsets per question for the Monte-Carlo column (default 1000; 0 skips it)")
    parser.add_argument("--mc-seed", type=int, default=0, help="seed of the Monte-Carlo draws (default 0)")
    parser.add_argument("--paper-seed", type=int, default=PAPER_SEED,
                        help="seed of the paper's single-draw protocol (default 123)")
    parser.add_argument("--reexecute", action="store_true",
                        help="execute every candidate, ignoring its 'correct' label and the execution cache")
    parser.add_argument("--exec-cache", default=None, metavar="FILE.jsonl",
                        help="execution cache (default: REPORT.exec.jsonl beside --output)")
    parser.add_argument("--exec-workers", type=int, default=2, help="sandbox processes at a time (default 2)")
    parser.add_argument("--exec-timeout", type=float, default=10.0, metavar="S",
                        help="wall-clock limit per candidate's test run (default 10 s); a hang counts as wrong")
    parser.add_argument("--exec-memory-mb", type=int, default=1024, help="memory limit per test run (default 1024)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="where no OS isolation (bubblewrap or unshare namespaces) works, execute candidates "
                             "anyway with in-process guards only; without it such a machine refuses to execute")


def add_codeprefbench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", default=None, choices=("reward", "pairwise", "openai"),
                        help="who prefers: reward (a scalar reward model: the higher reward wins), pairwise (a megapmp "
                             "pairwise judge trained on tools/make_judge_data.py samples: the two label tokens' "
                             "probabilities, both orders averaged), openai (--model names an LLM served at --base-url, "
                             "asked with CodeFavor's judging prompt, both orders). Default: pairwise when the model "
                             "records a judge format, else reward")
    parser.add_argument("--keep-comments", action="store_true",
                        help="judges see the codes with comments and docstrings (default: stripped, except for the "
                             "human-preference aspect, as in CodeFavor's evaluation)")
    # Read by --judge openai only: the client of the server at --base-url serving --model, CodeFavor's chat prompt
    # by default (megapmp.eval.tasks.codeprefbench_llm builds the backend from them).
    add_openai_arguments(parser, mode="chat",
                         mode_help="chat: the prompt as one user message (default, as CodeFavor); completions: raw text")
    parser.add_argument("--max-tokens", type=int, default=2048, help="new tokens per answer (default 2048, greedy)")
    parser.add_argument("--judge-cache", default=None, metavar="FILE.jsonl",
                        help="answers received, appended as they arrive; a rerun asks only what is missing (default: "
                             "REPORT.judge.jsonl beside --output)")


# The options of the tasks that take more than the common ones, by task name.
TASK_ARGUMENTS = {"best-of-n": add_best_of_n_arguments, "code-bon": add_code_bon_arguments,
                  "codeprefbench": add_codeprefbench_arguments}


def build_parser() -> argparse.ArgumentParser:
    from megapmp.eval.tasks import load_tasks

    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = load_tasks()
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(tasks) + "}")
    for task in tasks.values():
        p = sub.add_parser(task.name, help=task.help, description=task.description or task.help)
        add_common_arguments(p, task)
        if task.name in TASK_ARGUMENTS:
            TASK_ARGUMENTS[task.name](p.add_argument_group(f"{task.name} options"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not isinstance(args.data, list):
        args.data = [args.data]
    for name in ("limit", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seq_len < 0 or args.batch_tokens < 8:
        parser.error("--seq-len must be >= 0 and --batch-tokens at least 8")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from megapmp.convert.source import ConvertError
    from megapmp.eval.formats import DataError
    from megapmp.eval.reward_model import RewardScorer
    from megapmp.eval.tasks import TASKS, log, run_evaluation

    if args.threads:
        torch.set_num_threads(args.threads)

    def get_scorer():
        log(f"loading {args.model}")
        if getattr(args, "judge", None) == "pairwise":
            from megapmp.eval.judge_scorer import JudgeScorer

            if args.backend == "transformers":
                raise ValueError("--judge pairwise scores with megapmp's model (--backend megapmp)")
            return JudgeScorer.load(args.model, **scorer_kwargs(args), batch_tokens=args.batch_tokens,
                                    progress=not args.no_progress)
        if args.backend == "transformers":
            from megapmp.convert.hf_scorer import TransformersRewardScorer

            return TransformersRewardScorer(args.model, device=args.device, progress=not args.no_progress)
        scorer = RewardScorer.load(args.model, **scorer_kwargs(args), seq_len=args.seq_len,
                                   batch_tokens=args.batch_tokens, layout=args.layout, progress=not args.no_progress)
        d = scorer.describe()
        log(f"{d['kind']} {d['path']} (step {d.get('step')}), {d['parameters'] / 1e6:.1f}M parameters, "
            f"{d['dtype']}, {d['device']}, template {d['template']['name']!r}, eos_policy {d['eos_policy']!r}, "
            f"recipe from {d['recipe_from']}")
        for note in d["notes"]:
            log(f"note: {note}")
        return scorer

    try:
        if args.command == "codeprefbench" and args.judge is None:
            from megapmp.eval.judge_scorer import recorded_judge

            args.judge = "pairwise" if recorded_judge(args.model) else "reward"
        report = run_evaluation(TASKS[args.command], args, get_scorer)
    except (DataError, ConvertError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    log(f"wrote {args.output}" + "".join(f", {p}" for p in (args.markdown, args.plot) if p))
    print(_summary(report))
    return 0


def _summary(report: dict) -> str:
    r = report["results"]
    task = report["task"]
    if task in ("best-of-n", "code-bon"):
        return "best-of-n: " + ", ".join(f"N={row['n']}: {row['accuracy']:.4f}" for row in r["rows"])
    if task == "codeprefbench":
        return "codeprefbench: " + ", ".join(f"{a}: {v['accuracy']:.4f}" for a, v in r["aspects"].items()) + \
            f", overall: {r['overall']:.4f}"
    if "accuracy" in r and isinstance(r["accuracy"], float):
        return f"{task}: accuracy {r['accuracy']:.4f}"
    return f"{task}: done"


if __name__ == "__main__":
    sys.exit(main())
