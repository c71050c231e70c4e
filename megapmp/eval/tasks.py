"""Evaluation tasks behind ``tools/evaluate.py``: a registry, the shared runner, and the built-in tasks.

A task is a :class:`Task`: a name (the subcommand), the data formats it accepts, optional extra
command-line arguments, ``run(ctx) -> results`` and optional ``markdown(report)`` / ``plot(report, path)``.
:func:`run_evaluation` does everything tasks share: loading the model once (lazily, ``ctx.scorer()``),
timing, the report envelope, and writing JSON / Markdown / PNG atomically.

Adding a task (e.g. ``code-bon``): define ``TASK = Task(...)`` in a module and either call
:func:`register_task` from it or list the module in :data:`EXTRA_TASK_MODULES` — ``megapmp.eval.code_bon``
is already listed and is imported when it exists, so creating that module with a module-level
``register_task(Task(name="code-bon", ...))`` is all it takes.

Report envelope (JSON): ``{"task", "created", "elapsed_s", "limit", "data": {"paths", "format",
"files": [{path, bytes, sha256}]}, "model": RewardScorer.describe(), "args": {...}, "results": {...}}``.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from megapmp.eval import metrics
from megapmp.eval.formats import (CANDIDATE_LOADERS, DataError, detect_format, load_candidate_sets,
                                   load_codeprefbench, load_pairs)
from megapmp.eval.report import (file_fingerprint, fmt, jsonable, markdown_header, markdown_table, new_figure,
                                 save_figure, write_json)
from megapmp.io import get_logger, write_jsonl_atomic, write_text_atomic

EXTRA_TASK_MODULES = ("megapmp.eval.code_bon",)


@dataclass
class TaskContext:
    """What a task's ``run`` gets: its options, the data paths, and the model on demand. ``args`` holds the
    options as attributes named like tools/evaluate.py's flags (``n_values``, ``mc_draws``, ...)."""

    args: object
    data: list[str]
    format: str | None
    limit: int | None
    get_scorer: Callable[[], object]
    save_scores: str | None = None
    _scorer: object = None

    def scorer(self):
        """The RewardScorer of --model, loaded on first use."""
        if self._scorer is None:
            self._scorer = self.get_scorer()
        return self._scorer

    def single_data(self, task: str) -> str:
        if len(self.data) != 1:
            raise DataError(f"{task} takes one --data path, got {len(self.data)}")
        return self.data[0]

    def write_scores(self, records: list[dict]) -> None:
        """Per-item scores as JSONL, when --save-scores was given."""
        if self.save_scores:
            write_jsonl_atomic(self.save_scores, (jsonable(r) for r in records))


@dataclass(frozen=True)
class Task:
    name: str
    help: str
    formats: tuple
    run: Callable[[TaskContext], dict]
    description: str = ""
    markdown: Callable[[dict], str] | None = None
    plot: Callable[[dict, str], None] | None = None
    multiple_data: bool = False
    plot_help: str = ""


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"an evaluation task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def load_tasks() -> dict[str, Task]:
    """The registry, with the optional task modules imported (a module that does not exist is skipped;
    one that fails to import raises)."""
    for module in EXTRA_TASK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return TASKS


log = get_logger("evaluate")


def run_evaluation(task: Task, args, get_scorer: Callable[[], object]) -> dict:
    """Run one task and write its outputs (--output JSON, --markdown, --plot); returns the report."""
    data = list(args.data)
    ctx = TaskContext(args=args, data=data, format=getattr(args, "format", None), limit=args.limit,
                      get_scorer=get_scorer, save_scores=getattr(args, "save_scores", None))
    for path in data:
        if not Path(path).exists() and not Path(f"{path}.idx").exists():
            raise DataError(f"{path}: no such file or directory")
    start = time.perf_counter()
    results = task.run(ctx)
    elapsed = time.perf_counter() - start
    fmt_used = results.pop("format", ctx.format)
    report = {
        "task": task.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": elapsed,
        "limit": args.limit,
        "data": {"paths": data, "format": fmt_used,
                 "files": [file_fingerprint(p) for p in data if Path(p).exists()]},
        "model": ctx._scorer.describe() if ctx._scorer is not None else None,
        "args": {k: v for k, v in vars(args).items() if k not in ("command", "func") and not callable(v)},
        "results": results,
    }
    write_json(args.output, report)
    if getattr(args, "markdown", None):
        body = task.markdown(report) if task.markdown else "```json\n" + json.dumps(results, indent=2) + "\n```\n"
        write_text_atomic(args.markdown, markdown_header(report) + "\n" + body)
    if getattr(args, "plot", None):
        if task.plot is None:
            raise ValueError(f"{task.name} has no plot")
        task.plot(report, args.plot)
    return report


# ---------------------------------------------------------------------------------------------------
# rm-accuracy


def _shard_prefix(path: str) -> str | None:
    """The shard prefix named by PREFIX, PREFIX.idx, PREFIX.bin or PREFIX.json; None if it is no shard."""
    candidates = [path] + [path[: -len(s)] for s in (".idx", ".bin", ".json") if path.endswith(s)]
    for prefix in candidates:
        if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file():
            return prefix
    return None


def _check_shard_matches(prefix: str, scorer) -> None:
    from megapmp.data.shards import ShardMeta

    meta = ShardMeta.load(prefix)
    recipe = scorer.recipe
    differ = []
    identity = recipe.tokenizer.identity() if hasattr(recipe.tokenizer, "identity") else None
    if identity is None or {k: v for k, v in identity.items() if k != "spec"} != \
            {k: v for k, v in meta.tokenizer.items() if k != "spec"}:
        differ.append("tokenizer")
    if meta.template.get("text") != recipe.template.get("text"):
        differ.append("template")
    for name, ours, theirs in (("eos_policy", recipe.eos_policy, meta.eos_policy), ("eos_id", recipe.eos_id, meta.eos_id),
                               ("pad_id", recipe.pad_id, meta.pad_id)):
        if ours != theirs:
            differ.append(name)
    if differ:
        raise DataError(f"shard {prefix} was not tokenized like the model's inputs: it differs in {', '.join(differ)}")


def run_rm_accuracy(ctx: TaskContext) -> dict:
    path = ctx.single_data("rm-accuracy")
    prefix = _shard_prefix(path)
    fmt_used = ctx.format or ("shard" if prefix else detect_format(path))
    if fmt_used == "shard":
        from megapmp.data.datasets import check_token_ids, open_preference_dataset, preference_pairs

        if prefix is None:
            raise DataError(f"{path}: not a shard prefix (expected {path}.idx and {path}.bin)")
        scorer = ctx.scorer()
        _check_shard_matches(prefix, scorer)
        dataset = open_preference_dataset(prefix)  # a group shard: every labelled pair of its groups
        token_pairs, items = preference_pairs(dataset, float("inf") if ctx.limit is None else ctx.limit)
        check_token_ids(dataset, items, dataset.meta.vocab_size)  # a named error, not an IndexError in the model
        n = len(token_pairs)
        r_c, r_r = scorer.score_token_pairs(token_pairs)
        ids, groups = [str(i) for i in range(n)], [""] * n
    elif fmt_used == "pairs":
        pairs = load_pairs(path, ctx.limit)
        if not pairs:
            raise DataError(f"{path}: no pairs")
        r_c, r_r = ctx.scorer().score_pairs([p.prompt for p in pairs], [p.chosen for p in pairs],
                                            [p.rejected for p in pairs])
        ids, groups = [p.id for p in pairs], [p.group for p in pairs]
    else:
        raise DataError(f"rm-accuracy reads pairs JSONL or a shard prefix, not {fmt_used!r}")
    results = {"format": fmt_used, **metrics.pair_summary(r_c, r_r)}
    if any(groups):
        results["groups"] = {g: metrics.pair_summary(r_c[np.array(groups) == g], r_r[np.array(groups) == g])
                             for g in dict.fromkeys(groups)}
    results["margins"] = _histogram(r_c - r_r)
    ctx.write_scores([{"id": i, "r_chosen": a, "r_rejected": b} for i, a, b in zip(ids, r_c, r_r)])
    return results


def _histogram(values: np.ndarray, bins: int = 30) -> dict:
    if not len(values):
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def markdown_rm_accuracy(report: dict) -> str:
    r = report["results"]
    rows = [["all", r["pairs"], r["accuracy"], r["accuracy_stderr"], r["ties"], r["mean_margin"]]]
    rows += [[g, v["pairs"], v["accuracy"], v["accuracy_stderr"], v["ties"], v["mean_margin"]]
             for g, v in (r.get("groups") or {}).items()]
    return ("Pairwise RM accuracy (r_chosen > r_rejected; a tie counts as wrong).\n\n"
            + markdown_table(["pairs", "n", "accuracy", "± s.e.", "ties", "mean margin"], rows) + "\n")


def plot_rm_accuracy(report: dict, path: str) -> None:
    r = report["results"]
    plt, fig, ax = new_figure()
    edges, counts = r["margins"]["edges"], r["margins"]["counts"]
    if counts:
        ax.stairs(counts, edges, fill=True, alpha=0.6)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("r_chosen - r_rejected")
    ax.set_ylabel("pairs")
    ax.set_title(f"RM accuracy {fmt(r['accuracy'], 3)} on {r['pairs']} pairs")
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------------
# best-of-n


def score_sets(scorer, sets) -> list[np.ndarray]:
    """The rewards of candidate sets (objects with .prompt and .responses: Best-of-N, multiple choice), one
    float64 array per set, scored together by any scorer with .score(prompts, responses) (ours, or
    megapmp.convert.hf_scorer's transformers-only one)."""
    flat = scorer.score([s.prompt for s in sets for _ in s.responses], [r for s in sets for r in s.responses])
    bounds = np.cumsum([0] + [len(s.responses) for s in sets])
    return [flat[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]


def within_question_pairs(scores, correct) -> dict:
    """Over every (correct, incorrect) candidate pair of the same question: how often the correct one
    scores higher (ties wrong), and the mean score of correct and incorrect candidates."""
    right = total = ties = 0
    for s, c in zip(scores, correct):
        c = np.asarray(c, bool)
        good, bad = s[c], s[~c]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            right += int((diff > 0).sum())
            ties += int((diff == 0).sum())
            total += diff.size
    all_scores = np.concatenate(scores) if scores else np.empty(0)
    all_correct = np.concatenate([np.asarray(c, bool) for c in correct]) if correct else np.empty(0, bool)
    return {"pairs": total, "accuracy": right / total if total else float("nan"), "ties": ties,
            "mean_score_correct": float(all_scores[all_correct].mean()) if all_correct.any() else float("nan"),
            "mean_score_incorrect": float(all_scores[~all_correct].mean()) if (~all_correct).any() else float("nan")}


def parse_n_values(text: str | None) -> list[int] | None:
    """``--n-values`` "1,2,4" -> [1, 2, 4] (sorted, distinct, positive); None when not given."""
    if not text:
        return None
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--n-values {text!r}: expected comma-separated positive integers") from None
    if not values or values[0] < 1:
        raise ValueError(f"--n-values {text!r}: expected comma-separated positive integers")
    return values


def run_best_of_n(ctx: TaskContext) -> dict:
    path = ctx.single_data("best-of-n")
    options = {"answer_type": ctx.args.answer_type} if (ctx.format or detect_format(path)) == "codepmp-bon" else {}
    fmt_used, sets = load_candidate_sets(path, ctx.format, ctx.limit, **options)
    n_values = parse_n_values(ctx.args.n_values)
    smallest = min(len(s.responses) for s in sets)
    if n_values is None:
        n_values = metrics.default_n_values(smallest, limit=ctx.args.max_n)
    if n_values[-1] > max(len(s.responses) for s in sets):
        raise ValueError(f"--n-values up to {n_values[-1]}, but no question has that many candidates "
                         f"(most: {max(len(s.responses) for s in sets)})")
    scores = score_sets(ctx.scorer(), sets)
    correct = [s.correct for s in sets]
    curve = metrics.best_of_n_curve(scores, correct, n_values, mc_draws=ctx.args.mc_draws, mc_seed=ctx.args.mc_seed,
                                    paper_seed=ctx.args.paper_seed)
    ctx.write_scores([{"id": s.id, "scores": sc, "correct": s.correct} for s, sc in zip(sets, scores)])
    return {"format": fmt_used, **curve, "candidates": int(sum(len(s.responses) for s in sets)),
            "within_question": within_question_pairs(scores, correct)}


def markdown_best_of_n(report: dict) -> str:
    r = report["results"]
    mc = "monte_carlo" in r["rows"][0] if r["rows"] else False
    header = ["N", "questions", "expected acc.", "± s.e."]
    header += ["Monte-Carlo", "± MC s.e."] if mc else []
    header += [f"single draw (seed {r['single_draw_seed']})", "oracle"]
    rows = []
    for row in r["rows"]:
        cells = [row["n"], row["questions"], row["accuracy"], row["stderr"]]
        cells += [row["monte_carlo"], row["monte_carlo_stderr"]] if mc else []
        cells += [row["single_draw"], row["oracle"]]
        rows.append(cells)
    w = r["within_question"]
    return (f"Best-of-N over {r['questions']} questions ({r['candidates']} candidates, {r['candidates_min']}–"
            f"{r['candidates_max']} per question; {r['mixed_questions']} with both correct and incorrect ones).\n\n"
            "*expected acc.*: exact expectation over uniformly random N-subsets, ties at the top broken uniformly "
            "at random; s.e. across questions. *single draw*: the paper's protocol (one random N-subset per "
            "question). *oracle*: P(the subset holds a correct candidate).\n\n"
            + markdown_table(header, rows)
            + f"\n\nRandom pick: {fmt(r['random_pick'])}. Within-question ranking accuracy over {w['pairs']} "
              f"(correct, incorrect) pairs: {fmt(w['accuracy'])} (ties {w['ties']}); mean score correct "
              f"{fmt(w['mean_score_correct'])}, incorrect {fmt(w['mean_score_incorrect'])}.\n")


def plot_best_of_n(report: dict, path: str) -> None:
    r = report["results"]
    rows = r["rows"]
    ns = np.array([row["n"] for row in rows], dtype=float)
    acc = np.array([row["accuracy"] for row in rows], dtype=float)
    se = np.array([row["stderr"] if row["stderr"] is not None else np.nan for row in rows], dtype=float)
    plt, fig, ax = new_figure()
    ax.plot(ns, acc, marker="o", label="reward model (expected)")
    ax.fill_between(ns, acc - np.nan_to_num(se), acc + np.nan_to_num(se), alpha=0.2)
    ax.plot(ns, [row["single_draw"] for row in rows], marker="x", ls=":", label="single draw (seed 123)")
    ax.plot(ns, [row["oracle"] for row in rows], ls="--", color="green", label="oracle")
    ax.axhline(r["random_pick"], ls="--", color="gray", label="random pick")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(int(n)) for n in ns])
    ax.set_xlabel("N (candidates per question, log2 scale)")
    ax.set_ylabel("accuracy")
    model = (report.get("model") or {}).get("path", "")
    ax.set_title(f"Best-of-N: {Path(report['data']['paths'][0]).name}\n{'/'.join(Path(model).parts[-3:])}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------------
# multiple-choice


def run_multiple_choice(ctx: TaskContext) -> dict:
    path = ctx.single_data("multiple-choice")
    fmt_used, sets = load_candidate_sets(path, ctx.format, ctx.limit)
    for s in sets:
        if s.answer is None:
            raise DataError(f"{path}: question {s.id!r} has {sum(s.correct)} correct options; multiple choice "
                            "needs exactly one")
    scores = score_sets(ctx.scorer(), sets)
    answers = [s.answer for s in sets]
    results = {"format": fmt_used, **metrics.multiple_choice_accuracy(scores, answers),
               "options_min": min(len(s.responses) for s in sets), "options_max": max(len(s.responses) for s in sets)}
    chance = float(np.mean([1 / len(s.responses) for s in sets]))
    results["chance"] = chance
    ctx.write_scores([{"id": s.id, "scores": sc, "answer": s.answer} for s, sc in zip(sets, scores)])
    return results


def markdown_multiple_choice(report: dict) -> str:
    r = report["results"]
    rows = [["unique max is correct (ties wrong)", r["accuracy"]], ["first max wins (paper's script)", r["first_max"]],
            ["ties broken at random (expected)", r["expected_random_tiebreak"]], ["chance", r["chance"]]]
    return (f"Multiple-choice accuracy over {r['questions']} questions ({r['options_min']}–{r['options_max']} options; "
            f"{r['top_ties']} with a tie at the top).\n\n" + markdown_table(["rule", "accuracy"], rows) + "\n")


def plot_multiple_choice(report: dict, path: str) -> None:
    r = report["results"]
    plt, fig, ax = new_figure(5, 3.5)
    names = ["accuracy", "first max", "random tie-break", "chance"]
    values = [r["accuracy"], r["first_max"], r["expected_random_tiebreak"], r["chance"]]
    ax.bar(names, [v or 0 for v in values], color=["C0", "C1", "C2", "gray"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Multiple choice: {Path(report['data']['paths'][0]).name}", fontsize=9)
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------------
# codeprefbench


JUDGES = ("reward", "pairwise", "openai")


def run_codeprefbench(ctx: TaskContext) -> dict:
    if ctx.format not in (None, "codeprefbench"):
        raise DataError(f"codeprefbench reads CodePrefBench files, not format {ctx.format!r}")
    pairs = load_codeprefbench(ctx.data, ctx.limit)
    if not pairs:
        raise DataError(f"{', '.join(ctx.data)}: no pairs")
    judge = getattr(ctx.args, "judge", None) or "reward"
    if judge == "pairwise":
        return codeprefbench_pairwise(ctx, pairs)
    if judge == "openai":
        return codeprefbench_llm(ctx, pairs)
    if judge != "reward":
        raise ValueError(f"--judge {judge!r} is not one of {', '.join(JUDGES)}")
    r_c, r_r = ctx.scorer().score_pairs([p.prompt for p in pairs], [p.chosen for p in pairs],
                                        [p.rejected for p in pairs])
    ctx.write_scores([{"id": p.id, "aspect": p.group, "r_chosen": a, "r_rejected": b}
                      for p, a, b in zip(pairs, r_c, r_r)])
    return {"format": "codeprefbench", "pairs": len(pairs),
            **metrics.codeprefbench_accuracy(r_c, r_r, [p.group for p in pairs])}


def codeprefbench_pairwise(ctx: TaskContext, pairs) -> dict:
    """A megapmp pairwise judge (ctx.scorer() is a JudgeScorer), every task in both orders: the chosen code
    wins when its first-position log-odds exceed the rejected code's (its probability, both orders
    averaged, is over 1/2); equal log-odds are a tie, counted 0.5 (megapmp.eval.judge_scorer)."""
    from megapmp.data.judge import aspect_criterion, strips_comments_for

    scorer = ctx.scorer()
    aspects = [p.group for p in pairs]
    keep = getattr(ctx.args, "keep_comments", False)
    comparison = scorer.compare([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                                [aspect_criterion(a) for a in aspects],
                                [strips_comments_for(a) and not keep for a in aspects])
    x_chosen_first, x_rejected_first = comparison.log_odds[:, 0], comparison.log_odds[:, 1]
    outcomes = np.stack([_outcome(x_chosen_first, 1), _outcome(x_rejected_first, -1)], axis=1)
    task_scores = _outcome(x_chosen_first - x_rejected_first, 1)
    ctx.write_scores([{"id": p.id, "aspect": p.group, "log_odds_chosen_first": a, "log_odds_rejected_first": b,
                       "p_chosen": q} for p, a, b, q in zip(pairs, x_chosen_first, x_rejected_first,
                                                            comparison.probability)])
    return {"format": "codeprefbench", "judge": "pairwise", "pairs": len(pairs), "truncated": len(comparison.truncated),
            **metrics.judge_accuracy(outcomes, aspects, task_scores)}


def _outcome(x: np.ndarray, sign: int) -> np.ndarray:
    """1 where sign * x > 0 (the judge picked the chosen code), 0.5 where x == 0, else 0."""
    return np.where(sign * x > 0, 1.0, np.where(x == 0, 0.5, 0.0))


def codeprefbench_llm(ctx: TaskContext, pairs) -> dict:
    """An LLM behind an OpenAI-compatible server judges every task in both orders with CodeFavor's protocol
    (megapmp.eval.llm_judge); an answer naming no winner counts 0.5."""
    from megapmp.data.judge import aspect_criterion, strip_comments, strips_comments_for
    from megapmp.eval.llm_judge import JUDGE_SAMPLING, JudgeRequest, LLMJudge, judge_prompt, parse_verdict
    from megapmp.synth.llm import SamplingParams, make_backend

    a = ctx.args
    if not getattr(a, "base_url", None):
        raise ValueError("--judge openai needs --base-url (the OpenAI-compatible server of --model)")
    backend = make_backend("openai", a.model, base_url=a.base_url, mode=a.mode,
                           api_key=os.environ.get(a.api_key_env, "EMPTY"), concurrency=1, timeout_s=a.timeout,
                           max_retries=a.max_retries)
    params = SamplingParams(temperature=JUDGE_SAMPLING.temperature, top_p=JUDGE_SAMPLING.top_p,
                            max_tokens=a.max_tokens)
    cache = a.judge_cache or str(Path(a.output).with_suffix("")) + ".judge.jsonl"
    judge = LLMJudge(backend, params, concurrency=a.concurrency, cache=cache, progress=not a.no_progress)
    requests = []
    for p in pairs:
        strip = strips_comments_for(p.group) and not getattr(a, "keep_comments", False)
        chosen, rejected = (strip_comments(c) if strip else c for c in (p.chosen, p.rejected))
        criteria = aspect_criterion(p.group)
        requests.append(JudgeRequest(p.id, 0, judge_prompt(p.prompt, chosen, rejected, criteria)))
        requests.append(JudgeRequest(p.id, 1, judge_prompt(p.prompt, rejected, chosen, criteria)))
    try:
        answers = judge.ask(requests)
    finally:
        backend.close()
    verdicts = np.array([-1 if v is None else v for v in map(parse_verdict, answers)]).reshape(-1, 2)
    # order 0 shows the chosen code as CODE_A (verdict 0 is right), order 1 as CODE_B (verdict 1 is right)
    outcomes = np.where(verdicts == -1, 0.5, (verdicts == np.array([0, 1])).astype(float))
    undecided = (verdicts == -1).sum(axis=1)
    ctx.write_scores([{"id": p.id, "aspect": p.group, "verdict_chosen_first": int(v[0]), "verdict_chosen_second":
                       int(v[1]), "answers": [answers[2 * i], answers[2 * i + 1]]}
                      for i, (p, v) in enumerate(zip(pairs, verdicts))])
    return {"format": "codeprefbench", "judge": "openai", "pairs": len(pairs), "llm": judge.describe(),
            **metrics.judge_accuracy(outcomes, [p.group for p in pairs], undecided=undecided)}


def markdown_codeprefbench(report: dict) -> str:
    r = report["results"]
    if r.get("judge") in ("pairwise", "openai"):
        return _markdown_judge(r)
    rows = [[aspect, v["pairs"], v["accuracy"], v["ties"]] for aspect, v in r["aspects"].items()]
    rows.append(["overall (pair-weighted)", r["pairs"], r["overall"], sum(v["ties"] for v in r["aspects"].values())])
    rows.append(["mean over aspects", len(r["aspects"]), r["macro"], None])
    return ("CodePrefBench pairwise accuracy (chosen = ground-truth choice; a tie counts 0.5).\n\n"
            + markdown_table(["aspect", "pairs", "accuracy", "ties"], rows) + "\n")


def _markdown_judge(r: dict) -> str:
    rows = [[aspect, v["pairs"], v["accuracy"], v["accuracy_chosen_first"], v["accuracy_chosen_second"], v["ties"],
             v["undecided"]] for aspect, v in r["aspects"].items()]
    rows.append(["overall (pair-weighted)", r["pairs"], r["overall"], None, None,
                 sum(v["ties"] for v in r["aspects"].values()), sum(v["undecided"] for v in r["aspects"].values())])
    rows.append(["mean over aspects", len(r["aspects"]), r["macro"], None, None, None, None])
    how = ("a megapmp pairwise judge: P(chosen better) from the two label tokens' probabilities, both orders "
           "averaged; equal in both orders is a tie (0.5)" if r["judge"] == "pairwise" else
           f"the LLM {r['llm']['model']!r} (OpenAI-compatible server), both orders; an answer naming no winner "
           "counts 0.5")
    return (f"CodePrefBench accuracy of {how}.\n\n"
            + markdown_table(["aspect", "pairs", "accuracy", "chosen shown first", "chosen shown second", "ties",
                              "undecided answers"], rows) + "\n")


def plot_codeprefbench(report: dict, path: str) -> None:
    r = report["results"]
    plt, fig, ax = new_figure(5.5, 3.5)
    names = list(r["aspects"]) + ["overall"]
    ax.bar(names, [r["aspects"][a]["accuracy"] for a in r["aspects"]] + [r["overall"]])
    ax.axhline(0.5, ls="--", color="gray", label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("CodePrefBench", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------------------
# registry of the built-in tasks

register_task(Task(
    name="rm-accuracy", help="pairwise accuracy on preference pairs (ties wrong)",
    description="Pairwise RM accuracy: the fraction of pairs whose chosen response scores strictly higher than the "
                "rejected one (a tie counts as wrong, as in the paper). --data is a pairs JSONL (prompt/chosen/"
                "rejected or query/better/worse, texts built with the model's template and EOS policy) or a "
                "megapmp shard prefix (tokens used as stored; must be tokenized like the model's inputs).",
    formats=("pairs", "shard"), run=run_rm_accuracy, markdown=markdown_rm_accuracy, plot=plot_rm_accuracy,
    plot_help="histogram of the reward margins r_chosen - r_rejected"))

register_task(Task(
    name="best-of-n", help="Best-of-N accuracy on candidate sets, N = 1, 2, 4, ...",
    description="Best-of-N accuracy: for each N, the expected correctness of the best-scored candidate of a "
                "uniformly random N-subset of each question's candidates, computed exactly (ties at the top broken "
                "uniformly at random), with its standard error across questions; a Monte-Carlo check; the "
                "paper's single-draw protocol (seed 123); the oracle (pass@N) and random-pick baselines.",
    formats=tuple(CANDIDATE_LOADERS), run=run_best_of_n,
    markdown=markdown_best_of_n, plot=plot_best_of_n,
    plot_help="accuracy vs N on a log2 axis with the single-draw, oracle and random-pick lines"))

register_task(Task(
    name="multiple-choice", help="multiple-choice accuracy (argmax over options; LogiQA2.0, ReClor)",
    description="Multiple-choice accuracy = Best-of-all over the options: a question is right only if the correct "
                "option's score is the unique maximum (a tie at the top counts as wrong); the paper's script "
                "(first option among tied maxima) and the random-tie-break expectation are reported beside it.",
    formats=("logiqa2", "reclor", "candidates"), run=run_multiple_choice, markdown=markdown_multiple_choice,
    plot=plot_multiple_choice, plot_help="bar chart of the accuracy under each tie rule and chance"))

register_task(Task(
    name="codeprefbench", help="CodePrefBench pairwise accuracy per aspect (ties 0.5)",
    description="CodePrefBench: for each pair, chosen = choices[gt_choice]; accuracy per aspect (the file name "
                "stem, e.g. correctness-alignment) with a tie counting 0.5, the pair-weighted overall and the mean "
                "over aspects. --data takes several files or a directory of *.jsonl.gz; --limit applies per file. "
                "--judge: a scalar reward model (reward), a megapmp pairwise judge (pairwise) or an LLM on an "
                "OpenAI-compatible server (openai); the two judges see every task in both orders.",
    formats=("codeprefbench",), run=run_codeprefbench, markdown=markdown_codeprefbench, plot=plot_codeprefbench,
    multiple_data=True, plot_help="bar chart of the accuracy per aspect"))
