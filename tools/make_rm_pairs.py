#!/usr/bin/env python
"""Reward-model finetuning pairs by CodePMP's own recipes (appendix D), one subcommand per recipe.

  mathshepherd  MathShepherd-pair (D.1): Math-Shepherd records -> correct vs incorrect solutions of a question
  options       ReClor-pair (D.2.1): multiple-choice questions -> the right option vs each wrong one
  sampled       LogiQA2.0-pair (D.2.2): several models answer each question, the answers are judged, correct x
                incorrect answers of a question make the pairs

Each writes OUTPUT_DIR/train.jsonl and OUTPUT_DIR/test.jsonl (pairs JSONL: prompt, chosen, rejected, group = the
source question's id, id; with --groups train.jsonl holds one group per question instead: prompt, responses,
labels, group, id) and OUTPUT_DIR/stats.json, all atomically. The split is made by question, never by
pair: a question, and any other with the same prompt text, is on one side only; the no-leakage check runs on
the result and is printed. Everything is deterministic under --seed. Counts of questions, responses, pairs and
of everything dropped (by reason) are printed and kept in stats.json. A bad record stops the tool with
FILE:LINE field 'X': reason and exit 2 (mathshepherd: --on-error skip --rejects R.jsonl sets bad records aside
and counts them instead). Existing outputs are not replaced without --overwrite.

Examples:
  python tools/make_rm_pairs.py mathshepherd --input math-shepherd.jsonl --style 40k --output-dir data/ms40k
  python tools/make_rm_pairs.py options --input reclor/train.json --test-input reclor/val.json --output-dir data/reclor
  python tools/make_rm_pairs.py options --input ../shared/data/logiqa2/dev.txt --output-dir data/logiqa2_options
  python tools/make_rm_pairs.py sampled --input logiqa2/train.txt --backend openai --base-url http://h:8000 \\
      --model Qwen2-7B-Instruct --model Qwen2-72B-Instruct --output-dir data/logiqa2_pairs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/_backend_args.py, also when loaded by path

from _backend_args import add_backend_arguments, backend_from_args  # noqa: E402
from megapmp.io import InputError, open_lines, parse_json_line, write_jsonl_atomic, write_text_atomic  # noqa: E402
from megapmp.synth import rm_pairs  # noqa: E402

MATHSHEPHERD_STYLES = {"40k": "one", "800k": "all"}  # appendix D.1's two training sets
# --test-input's question ids start with this: each file numbers its own questions (LogiQA 2.0's dev and test
# files reuse ids for other questions), so a test id may not name the training question of the same number.
TEST_ID_PREFIX = "test:"


def log(message: str) -> None:
    print(f"[make_rm_pairs] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# arguments


def add_output_arguments(p: argparse.ArgumentParser, test_fraction: float) -> None:
    g = p.add_argument_group("output and split")
    g.add_argument("--output-dir", required=True, metavar="DIR",
                   help="writes DIR/train.jsonl, DIR/test.jsonl and DIR/stats.json")
    g.add_argument("--test-fraction", type=float, default=test_fraction, metavar="F",
                   help=f"share of the questions (not of the pairs) held out for test (default {test_fraction})")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the split and of every random choice of pairs; the output is a function of the "
                        "inputs, the options and this seed (default 0)")
    g.add_argument("--max-pairs-per-question", type=int, default=None, metavar="N",
                   help="at most N pairs per question, drawn at random from all correct x incorrect "
                        "combinations (default: all of them)")
    g.add_argument("--groups", action="store_true",
                   help="write train.jsonl in the group form, one record per question: {prompt, responses, labels, "
                        "group, id}, every response with its correct/incorrect label, so every correct x incorrect "
                        "pair of the question is in it (read by tools/preprocess_pairs.py --groups, trained with "
                        "--data.layout group: the prompt packed once); test.jsonl stays pairs. With the 40k style a "
                        "group holds the one drawn pair; not with --max-pairs-per-question")
    g.add_argument("--overwrite", action="store_true", help="replace existing train.jsonl / test.jsonl")


def add_choice_input_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multiple-choice input")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="LogiQA 2.0 lines ({id, answer, text, question, options}) or ReClor JSON / JSONL ({context, "
                        "question, answers, label, id_string}), read by megapmp.eval.formats' readers")
    g.add_argument("--test-input", nargs="+", default=None, metavar="FILE",
                   help="a held-out split given as files (e.g. ReClor's val.json, as the paper's 1.5k test pairs): "
                        "then --input is all training data and --test-fraction is not used; a test question that "
                        "is also in --input (the same prompt) is removed and counted; its ids start with 'test:', as "
                        "each file numbers its own questions")
    g.add_argument("--exclude", nargs="+", default=None, metavar="FILE",
                   help="questions to keep out of both sides, e.g. the evaluation's test file: a question of "
                        "--input or --test-input whose passage and question (whitespace normalised) is in these "
                        "files is left out before anything is sampled, and counted (LogiQA 2.0 repeats questions "
                        "across its splits)")
    g.add_argument("--format", default="auto", choices=("auto", "logiqa2", "reclor"),
                   help="input format (default: detected from each file's first record)")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N questions of each input file (for quick runs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_rm_pairs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    ms = sub.add_parser("mathshepherd", help="MathShepherd-pair (appendix D.1)", description=(
        "Math-Shepherd records {input, label, task} (peiyi9979/Math-Shepherd): 'input' is the question and a "
        "step-by-step solution with the step tag after every step, 'label' the same text with '+' (good step) or "
        "'-' (bad step) in each tag's place, 'task' GSM8K or MATH. The question ends where 'Step 1:' begins. "
        "A solution is correct when EVERY step is '+' (--rule all, the default), or, with --rule final, when its "
        "last step is. Records of the same question text form one question. Pairs: a correct solution (chosen) "
        "against an incorrect one (rejected) of the same question. --style 40k: one random pair per question "
        "(MathShepherd-preference-40k); --style 800k: every correct x incorrect combination, up to "
        "--max-pairs-per-question (MathShepherd-preference-800k). The test split has one correct + one "
        "incorrect solution per question, as the paper's 4.3k test set."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ms.add_argument("--input", nargs="+", required=True, metavar="FILE", help="Math-Shepherd JSONL(.gz) files")
    ms.add_argument("--style", choices=sorted(MATHSHEPHERD_STYLES), default="40k",
                    help="training pairs: 40k = one random correct/incorrect pair per question; 800k = every "
                         "combination (up to --max-pairs-per-question)")
    ms.add_argument("--rule", choices=rm_pairs.CORRECTNESS_RULES, default="all",
                    help="a solution is correct when all its steps are '+' (all) or when its last step is (final)")
    ms.add_argument("--step-tag", default=rm_pairs.MATHSHEPHERD_STEP_TAG, help="the tag after each step in 'input'")
    ms.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                    help="fail: stop at the first bad record (FILE:LINE field 'X': reason, exit 2); skip: set bad "
                         "records aside in --rejects and count them")
    ms.add_argument("--rejects", default=None, metavar="FILE.jsonl", help="bad records with their reason (skip mode)")
    add_output_arguments(ms, test_fraction=0.1)  # 44k of Math-Shepherd's 444k samples are the paper's test part

    op = sub.add_parser("options", help="ReClor-pair (appendix D.2.1): right option vs each wrong option",
                        description="Multiple-choice questions -> pairs: the prompt is the passage and the question "
                                    "(the evaluation's template, megapmp.eval.formats.PASSAGE_TEMPLATE), the chosen "
                                    "response the right option, the rejected one each wrong option (3 pairs per "
                                    "4-option question, on both sides of the split).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_choice_input_arguments(op)
    add_output_arguments(op, test_fraction=0.1)

    sa = sub.add_parser("sampled", help="LogiQA2.0-pair (appendix D.2.2): sampled answers, judged, correct x incorrect",
                        description=SAMPLED_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_choice_input_arguments(sa)
    add_output_arguments(sa, test_fraction=0.04)  # appendix D.2.2: 42k of the 1,019k pairs for testing
    from megapmp.synth.sampled import NO_ANSWER_POLICIES, PAPER_GRID

    g = sa.add_argument_group("models and sampling (paper: four models, top-p 1, the grid below)")
    g.add_argument("--model", action="append", required=True, metavar="M",
                   help="a model to sample (served name, or path for vllm); repeat for several models")
    g.add_argument("--grid", default=",".join(f"{v:g}" for v in PAPER_GRID), metavar="V,V,...",
                   help="one sample per model and value (x --samples-per-setting), the value sent as the temperature "
                        "(default: the paper's 'top-k' grid, see above)")
    g.add_argument("--samples-per-setting", type=int, default=1, metavar="K", help="samples per model and grid value")
    g.add_argument("--top-p", type=float, default=1.0, help="the paper's top-p 1 (default)")
    g.add_argument("--max-tokens", type=int, default=1024, help="new tokens per answer (default 1024)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop sequence, repeatable")
    g.add_argument("--judge-url", default=None, metavar="URL",
                   help="judge answers with a model at this OpenAI-compatible server (--judge-model) instead of by "
                        "rule (the paper: DeepSeek-7B-Math-Compare-Answer)")
    g.add_argument("--judge-model", default=None, metavar="M", help="the judge's served name")
    g.add_argument("--judge-mode", choices=("chat", "completions"), default="completions",
                   help="how the judge prompt is sent (default completions)")
    g.add_argument("--no-answer", choices=NO_ANSWER_POLICIES, default="incorrect",
                   help="an answer the judge cannot decide (no option found, or neither yes nor no): incorrect "
                        "(default: it does not give the right answer) or drop")
    add_backend_arguments(sa, batch_unit="requests", mode="chat", base_url_per_model=True,
                          backend_note="with vllm the models are loaded one after another",
                          mode_help="chat: the question as one user message through the model's chat template (the "
                                    "paper's models are instruct/chat models; default); completions: raw text")
    sa.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


SAMPLED_HELP = """\
LogiQA2.0-pair (CodePMP appendix D.2.2): each question is answered by every --model once per value of the
sampling grid (times --samples-per-setting), with top-p 1. The paper prints its grid as
"top-k in {0, 0.01, 0.1, ..., 1.0}"; a top-k is a number of tokens and cannot be 0.01, so the grid is sent as
the sampling temperature (0: greedy). The models see the passage, the question and the options lettered A, B,
... and are asked to end with "The answer is X". An answer is judged by rule (the letter after the last "answer
is" / "Answer:", or a leading "(B)" / "B.", else the one option the answer quotes in full) or by a judge model
(--judge-url: asked whether the answer's final choice is the reference one). Correct x incorrect answers of a
question make its pairs, on both sides of the split; the pairs' prompt is the question as the models saw it.

Samples go to OUTPUT_DIR/samples.jsonl (one record per request: id QUESTION|MODEL|VALUE|k, response, correct,
judge), written batch by batch: an interrupted run resumes when rerun with the same options (request k is sent
with seed --seed + k, so a server that honours seeds answers as before); a finished samples.jsonl is reused."""


# ---------------------------------------------------------------------------------------------------
# inputs


def read_mathshepherd(paths: list[str], on_error: str, rejects_path: str | None):
    """(file, line, record) of every Math-Shepherd line; malformed lines go to `on_error`'s handling."""
    rejects = []

    def handle(e: InputError, raw: bytes | None = None) -> None:
        if on_error == "fail":
            raise e
        rejects.append({"file": e.file, "line": e.line, "field": e.field, "reason": e.reason,
                        **({"raw": raw[:10000].decode("utf-8", errors="replace")} if raw is not None else {})})

    def records():
        for path in paths:
            for line, raw in open_lines(path):
                try:
                    yield str(path), line, parse_json_line(str(path), line, raw)
                except InputError as e:
                    handle(e, raw)

    return records, handle, rejects


def read_choice_sets(paths: list[str], fmt: str, limit: int | None = None) -> list[tuple[str, int, object]]:
    """(file, line, CandidateSet) of every multiple-choice record, by megapmp.eval.formats' readers (which
    check each record and name FILE:LINE for a bad one)."""
    from megapmp.eval import formats

    out = []
    for path in paths:
        kind = formats.detect_format(path) if fmt == "auto" else fmt
        if kind not in ("logiqa2", "reclor"):
            raise ValueError(f"{path}: format {kind!r} is not multiple choice (logiqa2 or reclor); pass --format")
        sets = (formats.load_logiqa2 if kind == "logiqa2" else formats.load_reclor)(path, limit)
        lines = [line for line, _ in formats.iter_records(path)][: len(sets)]  # one record per set, in order
        out += [(str(path), line, s) for line, s in zip(lines, sets)]
    return out


def read_choice_input(args, paths: list[str], drops: rm_pairs.Drops) -> list[tuple[str, int, object]]:
    """read_choice_sets of ``paths`` without the questions of --exclude (counted in ``drops``)."""
    sets = read_choice_sets(paths, args.format, args.limit)
    if not args.exclude:
        return sets
    excluded = {" ".join(cs.prompt.split()) for _, _, cs in read_choice_sets(args.exclude, args.format)}
    kept = [item for item in sets if " ".join(item[2].prompt.split()) not in excluded]
    drops.seen["questions_excluded_as_in_exclude_files"] += len(sets) - len(kept)
    return kept


def check_outputs(args) -> Path:
    out = Path(args.output_dir)
    existing = [n for n in ("train.jsonl", "test.jsonl") if (out / n).exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{out}: {', '.join(existing)} exist; pass --overwrite to replace them")
    if args.max_pairs_per_question is not None and args.max_pairs_per_question < 1:
        raise ValueError("--max-pairs-per-question must be at least 1")
    if args.groups and args.max_pairs_per_question is not None:
        raise ValueError("--max-pairs-per-question draws pairs: --groups keeps every labelled pair of a question")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    return out


def split(args, groups, test_groups=None):
    """(train, test, test questions removed as also in train) by --test-input or --test-fraction."""
    if test_groups is not None:
        test, removed = rm_pairs.remove_leaked(groups, test_groups)
        return groups, test, removed
    train, test = rm_pairs.split_groups(groups, args.test_fraction, args.seed)
    return train, test, 0


def finish(args, out: Path, result: rm_pairs.SplitPairs, drops: rm_pairs.Drops, extra: dict) -> int:
    write_jsonl_atomic(out / "train.jsonl", result.train)
    write_jsonl_atomic(out / "test.jsonl", result.test)
    stats = {"command": args.command, **extra, **result.stats, "read": dict(sorted(drops.seen.items())),
             "dropped": drops.as_dict()}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=1) + "\n")
    s, tr, te = result.stats["split"], result.stats["train"], result.stats["test"]
    log(f"split by question: {s['train_questions']} train / {s['test_questions']} test questions, none on both sides "
        f"(checked: {s['checked']})" + (f"; {s['test_questions_removed_as_in_train']} test questions also in the "
                                        "training input removed" if s["test_questions_removed_as_in_train"] else ""))
    for name, side in (("train", tr), ("test", te)):
        form = " (in one group each)" if name == "train" and result.stats["train_form"] == "groups" else ""
        log(f"{name}: {side['pairs']} pairs from {side['questions_with_pairs']} of {side['questions']} questions{form} "
            f"({side['responses']} responses: {side['correct']} correct, {side['incorrect']} incorrect)")
    log(f"read: {json.dumps(stats['read'])}; dropped: {json.dumps(stats['dropped'])}")
    log(f"wrote {out / 'train.jsonl'}, {out / 'test.jsonl'}, {out / 'stats.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------
# subcommands


def run_mathshepherd(args) -> int:
    if args.on_error == "skip" and not args.rejects:
        raise ValueError("--on-error skip needs --rejects FILE, so that no bad record is lost silently")
    out = check_outputs(args)
    drops = rm_pairs.Drops()
    records, handle, rejects = read_mathshepherd(args.input, args.on_error, args.rejects)
    groups = rm_pairs.mathshepherd_groups(records(), rule=args.rule, step_tag=args.step_tag, on_error=handle,
                                          drops=drops)
    if not groups:
        raise ValueError(f"{', '.join(args.input)}: no usable Math-Shepherd record")
    train, test, removed = split(args, groups)
    result = rm_pairs.build_split_pairs(train, test, train_style=MATHSHEPHERD_STYLES[args.style], test_style="one",
                                        seed=args.seed, max_pairs=args.max_pairs_per_question, drops=drops,
                                        leaked_removed=removed, train_form="groups" if args.groups else "pairs")
    drops.add("bad_record", len(rejects))
    if args.rejects:
        write_jsonl_atomic(args.rejects, rejects)
    return finish(args, out, result, drops, {"inputs": args.input, "style": args.style, "rule": args.rule,
                                             "bad_records": len(rejects)})


def run_options(args) -> int:
    out = check_outputs(args)
    drops = rm_pairs.Drops()
    groups = rm_pairs.option_groups(read_choice_input(args, args.input, drops), drops)
    test_groups = (rm_pairs.option_groups(read_choice_input(args, args.test_input, drops), drops,
                                          id_prefix=TEST_ID_PREFIX) if args.test_input else None)
    train, test, removed = split(args, groups, test_groups)
    result = rm_pairs.build_split_pairs(train, test, train_style="all", test_style="all", seed=args.seed,
                                        max_pairs=args.max_pairs_per_question, drops=drops, leaked_removed=removed,
                                        train_form="groups" if args.groups else "pairs")
    return finish(args, out, result, drops, {"inputs": args.input, "test_inputs": args.test_input,
                                               "excluded_from": args.exclude})


def choice_questions(sets_with_lines, id_prefix: str = "") -> list:
    from megapmp.synth.sampled import ChoiceQuestion

    questions, seen = [], set()
    for _file, _line, cs in sets_with_lines:
        qid = rm_pairs.unique_id(id_prefix + str(cs.id), seen)  # two records under one id: sample ids would collide
        seen.add(qid)
        # The evaluation template ends in "Response:"; the models are asked the passage and question before it.
        question = cs.prompt.removesuffix("Response:").rstrip()
        questions.append(ChoiceQuestion(qid, question, tuple(cs.responses), cs.answer))
    return questions


def run_sampled(args) -> int:
    from megapmp.synth.sampled import (ModelJudge, ModelSpec, RuleJudge, SamplingSettings, read_samples,
                                       sample_and_judge, sample_groups)

    out = check_outputs(args)
    urls = args.base_url or []
    if args.backend == "openai" and len(urls) not in (1, len(args.model)):
        raise ValueError(f"--backend openai needs one --base-url, or one per --model ({len(args.model)}), got {len(urls)}")
    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together")
    settings = SamplingSettings(grid=tuple(float(v) for v in args.grid.split(",") if v.strip()),
                                samples_per_setting=args.samples_per_setting, top_p=args.top_p,
                                max_tokens=args.max_tokens, stop=tuple(args.stop) if args.stop else None,
                                seed=args.seed, batch_size=args.batch_size)
    drops = rm_pairs.Drops()
    train_q = choice_questions(read_choice_input(args, args.input, drops))
    test_q = choice_questions(read_choice_input(args, args.test_input, drops), TEST_ID_PREFIX) if args.test_input else []
    questions = train_q + test_q
    if len({q.id for q in questions}) != len(questions):  # only an --input id itself starting with the prefix
        raise ValueError(f"--input has question ids starting with {TEST_ID_PREFIX!r}, as --test-input's are "
                         "renamed: the samples of one would overwrite the other's")

    def opener(model: str, url: str | None):
        return lambda: backend_from_args(args, model, base_url=url)

    models = [ModelSpec(m, {"backend": args.backend, "model": m, "mode": args.mode},
                        opener(m, (urls[i] if len(urls) > 1 else urls[0]) if urls else None))
              for i, m in enumerate(args.model)]
    if len({m.name for m in models}) != len(models):
        raise ValueError("a --model is given twice")
    judge = (ModelJudge(backend_from_args(args, args.judge_model, kind="openai", base_url=args.judge_url,
                                          mode=args.judge_mode)) if args.judge_url else RuleJudge())
    samples_path = out / "samples.jsonl"
    try:
        run_stats = sample_and_judge(questions, models, settings, samples_path, judge, progress=not args.no_progress)
        if run_stats is None:
            log(f"reusing the finished {samples_path}, sampled with these options (delete it to sample again)")
    finally:
        if isinstance(judge, ModelJudge):
            judge.backend.close()
    samples = read_samples(samples_path)
    groups = sample_groups(samples, train_q, args.no_answer, drops)
    test_groups = sample_groups(samples, test_q, args.no_answer, drops) if args.test_input else None
    train, test, removed = split(args, groups, test_groups)
    result = rm_pairs.build_split_pairs(train, test, train_style="all", test_style="all", seed=args.seed,
                                        max_pairs=args.max_pairs_per_question, drops=drops, leaked_removed=removed,
                                        train_form="groups" if args.groups else "pairs")
    extra = {"inputs": args.input, "test_inputs": args.test_input, "excluded_from": args.exclude, "models": args.model,
             "settings": settings.to_dict(), "judge": judge.describe(), "samples": str(samples_path),
             "sampling_run": run_stats.as_dict() if run_stats else "reused"}
    return finish(args, out, result, drops, extra)


COMMANDS = {"mathshepherd": run_mathshepherd, "options": run_options, "sampled": run_sampled}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (InputError, ValueError, FileExistsError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
