"""Evaluation metrics over reward scores: pure numpy (and exact integer combinatorics), no model.

Conventions shared by every metric here:

- Scores are compared exactly (no tolerance): two candidates tie only when their rewards are equal.
- Pairwise RM accuracy counts a tie as wrong (the paper's convention); CodePrefBench counts it as half
  right (the benchmark's convention: a tied pair is a coin flip).
- Best-of-N picks the highest-scored candidate of a uniformly random N-subset of the question's M
  candidates (without replacement); ties at the top of the subset are broken uniformly at random.
  :func:`best_of_n_exact` computes the *expected* accuracy of that procedure exactly; the Monte-Carlo
  and the paper's single-draw estimators sample it.
- Multiple choice counts a question as right only if the correct option's score is the unique maximum;
  a tie at the top is wrong (the pessimistic convention; ``first_max`` in the report is the paper's
  script, which keeps the first option among tied maxima, for comparison).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PAPER_SEED = 123


# ------------------------------------------------------------------------------------------------
# Pairs


def rm_accuracy(r_chosen, r_rejected) -> float:
    """Fraction of pairs with r_chosen > r_rejected; ties count as wrong (as in the paper). NaN if empty."""
    r_chosen, r_rejected = _paired(r_chosen, r_rejected)
    return float((r_chosen > r_rejected).mean()) if len(r_chosen) else float("nan")


def pairwise_tie_half_accuracy(r_chosen, r_rejected) -> float:
    """Fraction of pairs with r_chosen > r_rejected, a tie counting 0.5 (CodePrefBench). NaN if empty."""
    r_chosen, r_rejected = _paired(r_chosen, r_rejected)
    if not len(r_chosen):
        return float("nan")
    return float(((r_chosen > r_rejected) + 0.5 * (r_chosen == r_rejected)).mean())


def pair_summary(r_chosen, r_rejected) -> dict:
    """Counts and margin statistics of scored pairs (for reports)."""
    r_chosen, r_rejected = _paired(r_chosen, r_rejected)
    margin = r_chosen - r_rejected
    n = len(margin)
    return {
        "pairs": n,
        "correct": int((margin > 0).sum()),
        "ties": int((margin == 0).sum()),
        "wrong": int((margin < 0).sum()),
        "accuracy": rm_accuracy(r_chosen, r_rejected),
        "accuracy_stderr": _binomial_stderr((margin > 0).astype(float)),
        "mean_margin": float(margin.mean()) if n else float("nan"),
        "median_margin": float(np.median(margin)) if n else float("nan"),
    }


def codeprefbench_accuracy(r_chosen, r_rejected, aspects: Sequence[str]) -> dict:
    """Per-aspect accuracy (ties 0.5) plus the pair-weighted overall and the unweighted aspect mean.

    Returns ``{"aspects": {aspect: {"pairs", "accuracy", "ties"}}, "overall": ..., "macro": ...}``.
    """
    r_chosen, r_rejected = _paired(r_chosen, r_rejected)
    aspects = np.asarray(list(aspects), dtype=object)
    if len(aspects) != len(r_chosen):
        raise ValueError(f"{len(aspects)} aspect labels for {len(r_chosen)} pairs")
    per = {}
    for aspect in dict.fromkeys(aspects.tolist()):  # first-seen order
        sel = aspects == aspect
        per[aspect] = {"pairs": int(sel.sum()),
                       "accuracy": pairwise_tie_half_accuracy(r_chosen[sel], r_rejected[sel]),
                       "ties": int((r_chosen[sel] == r_rejected[sel]).sum())}
    macro = float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan")
    return {"aspects": per, "overall": pairwise_tie_half_accuracy(r_chosen, r_rejected), "macro": macro}


def judge_accuracy(outcomes, aspects: Sequence[str], task_scores=None, undecided=None) -> dict:
    """CodePrefBench accuracy of a pairwise judge that saw every task in both orders.

    ``outcomes[i] = (with the chosen code shown first, with it shown second)``, each 1 (the judge picked the
    chosen code), 0 (the rejected one) or 0.5 (a tie, or an answer that names neither: CodeFavor counts those
    as half right). ``task_scores[i]`` is task i's score when the judge's orders are combined otherwise (a
    model judge averages its two probabilities); by default the mean of its two outcomes. ``undecided[i]``
    counts task i's unparseable answers (0-2). Per aspect: accuracy, per-order accuracy (a judge that
    always names the first position scores 1 and 0), tasks at exactly 0.5 (``ties``), unparseable answers;
    plus the pair-weighted ``overall`` and the mean over aspects ``macro``.
    """
    outcomes = np.asarray(outcomes, dtype=np.float64).reshape(-1, 2)
    scores = outcomes.mean(axis=1) if task_scores is None else np.asarray(task_scores, dtype=np.float64)
    undecided = np.zeros(len(outcomes), np.int64) if undecided is None else np.asarray(undecided, np.int64)
    aspects = np.asarray(list(aspects), dtype=object)
    if not len(aspects) == len(scores) == len(outcomes) == len(undecided):
        raise ValueError(f"{len(outcomes)} outcome pairs, {len(scores)} scores, {len(aspects)} aspects, "
                         f"{len(undecided)} undecided counts")
    per = {}
    for aspect in dict.fromkeys(aspects.tolist()):
        sel = aspects == aspect
        per[aspect] = {"pairs": int(sel.sum()), "accuracy": _mean(scores[sel]), "ties": int((scores[sel] == 0.5).sum()),
                       "undecided": int(undecided[sel].sum()), "accuracy_chosen_first": _mean(outcomes[sel, 0]),
                       "accuracy_chosen_second": _mean(outcomes[sel, 1])}
    macro = float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan")
    return {"aspects": per, "overall": _mean(scores), "macro": macro}


# ------------------------------------------------------------------------------------------------
# Multiple choice


def multiple_choice_accuracy(scores: Sequence, answers: Sequence[int]) -> dict:
    """Accuracy of picking the highest-scored option.

    ``scores[q]`` holds one score per option of question q, ``answers[q]`` the index of the correct one.
    ``accuracy``: right only if the correct option is the *unique* maximum (a tie at the top is wrong).
    ``first_max``: the paper's script (stable sort, first option among tied maxima wins).
    ``expected_random_tiebreak``: ties at the top broken uniformly at random, in expectation.
    """
    if len(scores) != len(answers):
        raise ValueError(f"{len(scores)} score lists for {len(answers)} answers")
    unique = first = expected = ties = 0
    for q, (s, answer) in enumerate(zip(scores, answers)):
        s = np.asarray(s, dtype=np.float64)
        if not 0 <= answer < len(s):
            raise ValueError(f"question {q}: answer index {answer} outside its {len(s)} options")
        top = s == s.max()
        k = int(top.sum())
        ties += k > 1
        unique += k == 1 and top[answer]
        first += int(np.argmax(s)) == answer
        expected += top[answer] / k
    n = len(answers)
    nan = float("nan")
    return {"questions": n, "accuracy": unique / n if n else nan, "first_max": first / n if n else nan,
            "expected_random_tiebreak": expected / n if n else nan, "top_ties": int(ties)}


# ------------------------------------------------------------------------------------------------
# Best-of-N


def default_n_values(m: int, limit: int = 256) -> list[int]:
    """1, 2, 4, ... up to min(m, limit), and min(m, limit) itself when it is not a power of two."""
    top = min(int(m), limit)
    if top < 1:
        return []
    values = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
    if values[-1] != top:
        values.append(top)
    return values


def best_of_n_question(scores, correct, n: int) -> float:
    """Expected correctness of the best-scored candidate of a uniformly random n-subset, exactly.

    Group the M candidates by equal score; a group g of size k_g with L_g candidates scored strictly
    below it is the top group of the subset with probability [C(L_g + k_g, n) - C(L_g, n)] / C(M, n),
    and then the pick is uniform over its members in the subset, hence over the group by symmetry; so

        E = sum_g  [C(L_g + k_g, n) - C(L_g, n)] / C(M, n)  *  correct_g / k_g.

    Without ties this is sum_j c_j C(L_j, n - 1) / C(M, n). Exact integer binomials; one float division
    per group.
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    m = len(scores)
    if len(correct) != m:
        raise ValueError(f"{m} scores for {len(correct)} correctness labels")
    if not 1 <= n <= m:
        raise ValueError(f"n={n} must be between 1 and the number of candidates {m}")
    if np.isnan(scores).any():
        raise ValueError("NaN score: cannot rank candidates")
    values, inverse, sizes = np.unique(scores, return_inverse=True, return_counts=True)
    correct_per_group = np.bincount(inverse, weights=correct, minlength=len(values))
    total = math.comb(m, n)
    expected = 0.0
    lower = 0
    for k, c in zip(sizes.tolist(), correct_per_group.tolist()):
        if c:
            top = math.comb(lower + k, n) - math.comb(lower, n)
            expected += top * int(c) / (total * k)
        lower += k
    return float(expected)


def oracle_question(correct, n: int) -> float:
    """P(a uniformly random n-subset holds at least one correct candidate) = 1 - C(M - c, n) / C(M, n)."""
    correct = np.asarray(correct, dtype=bool)
    m, c = len(correct), int(correct.sum())
    return 1.0 - math.comb(m - c, n) / math.comb(m, n)


@dataclass
class Estimate:
    """A mean over questions with its standard error; ``questions`` is how many entered it."""

    value: float
    stderr: float
    questions: int

    def as_dict(self) -> dict:
        return {"accuracy": self.value, "stderr": self.stderr, "questions": self.questions}


def _eligible(question_scores, question_correct, n):
    if len(question_scores) != len(question_correct):
        raise ValueError(f"{len(question_scores)} score lists for {len(question_correct)} correctness lists")
    return [q for q in range(len(question_scores)) if len(question_scores[q]) >= n]


def best_of_n_exact(question_scores: Sequence, question_correct: Sequence, n: int) -> Estimate:
    """Mean over questions of :func:`best_of_n_question`, with the standard error across questions
    (sample std / sqrt(Q)): the uncertainty from the finite question set, as the sampling over subsets
    is integrated out. Questions with fewer than n candidates are left out (``questions`` says how many
    entered)."""
    used = _eligible(question_scores, question_correct, n)
    values = np.array([best_of_n_question(question_scores[q], question_correct[q], n) for q in used])
    return Estimate(_mean(values), _stderr(values), len(used))


def oracle_curve(question_correct: Sequence, n: int) -> float:
    """Mean over questions with at least n candidates of :func:`oracle_question` (pass@n without replacement)."""
    values = [oracle_question(c, n) for c in question_correct if len(c) >= n]
    return _mean(np.asarray(values, dtype=float))


def random_pick(question_correct: Sequence) -> float:
    """Accuracy of picking one candidate uniformly at random: the mean fraction of correct candidates."""
    return _mean(np.array([np.mean(np.asarray(c, dtype=float)) for c in question_correct if len(c)]))


def best_of_n_monte_carlo(question_scores: Sequence, question_correct: Sequence, n: int, *, draws: int = 1000,
                          seed: int = 0) -> Estimate:
    """Estimate of the same expectation by sampling ``draws`` random n-subsets per question (ties at the
    top broken uniformly at random). ``stderr`` is the Monte-Carlo error of this estimate around the
    exact value: sqrt(sum_q var_q / draws) / Q with var_q the per-question sample variance of the draws."""
    return best_of_n_monte_carlo_curve(question_scores, question_correct, [n], draws=draws, seed=seed)[n]


def best_of_n_monte_carlo_curve(question_scores: Sequence, question_correct: Sequence, n_values: Sequence[int], *,
                                draws: int = 1000, seed: int = 0) -> dict[int, Estimate]:
    """:func:`best_of_n_monte_carlo` for several n at once. Each draw is a random permutation of the
    question's candidates and its first n form the n-subset (so one permutation serves every n); a second
    uniform key per candidate breaks score ties at random."""
    if draws < 2:
        raise ValueError(f"draws={draws} must be at least 2 (the standard error needs two)")
    if len(question_scores) != len(question_correct):
        raise ValueError(f"{len(question_scores)} score lists for {len(question_correct)} correctness lists")
    rng = np.random.default_rng(seed)
    means = {n: [] for n in n_values}
    variances = {n: [] for n in n_values}
    for scores, correct in zip(question_scores, question_correct):
        scores = np.asarray(scores, dtype=np.float64)
        correct = np.asarray(correct, dtype=bool)
        m = len(scores)
        wanted = [n for n in n_values if n <= m]
        if not wanted:
            continue
        order = np.argsort(rng.random((draws, m)), axis=1)  # [draws, m] random permutations
        # Dense score rank + a uniform key in [0, 1): the max of a prefix is a top-scored candidate, uniformly
        # among the tied ones.
        rank = np.unique(scores, return_inverse=True)[1].astype(np.float64)
        key = rank[order] + rng.random((draws, m))
        hit = correct[order]
        for n in wanted:
            best = np.argmax(key[:, :n], axis=1)
            outcome = hit[np.arange(draws), best].astype(float)
            means[n].append(outcome.mean())
            variances[n].append(outcome.var(ddof=1))
    out = {}
    for n in n_values:
        q = len(means[n])
        out[n] = (Estimate(float(np.mean(means[n])), float(math.sqrt(sum(variances[n]) / draws) / q), q) if q
                  else Estimate(float("nan"), float("nan"), 0))
    return out


def best_of_n_single_draw(question_scores: Sequence, question_correct: Sequence, n: int,
                          seed: int = PAPER_SEED) -> Estimate:
    """The paper's protocol (CodePMP ``BoN_eval/PRM_rank_eval_by_model.py``): ``random.seed(123)`` once, then
    for each question in order ``random.sample(candidates, n)`` and the first of the sample among the
    highest scores (a stable descending sort). One draw per question, so the standard error is the
    binomial one across questions. Questions with fewer than n candidates are skipped without drawing."""
    rng = random.Random(seed)
    outcomes = []
    for scores, correct in zip(question_scores, question_correct):
        if len(scores) < n:
            continue
        picked = rng.sample(range(len(scores)), n)
        best = max(picked, key=lambda i: scores[i])  # max() keeps the first of equal maxima, as the sort did
        outcomes.append(float(bool(correct[best])))
    values = np.asarray(outcomes)
    return Estimate(_mean(values), _stderr(values), len(values))


def best_of_n_curve(question_scores: Sequence, question_correct: Sequence, n_values: Sequence[int] | None = None,
                    *, mc_draws: int = 1000, mc_seed: int = 0, paper_seed: int = PAPER_SEED) -> dict:
    """Everything a Best-of-N report needs: one row per n with the exact expectation and its standard
    error, the Monte-Carlo estimate, the paper's single draw, and the oracle (pass@n); plus the
    random-pick accuracy. ``mc_draws = 0`` skips the Monte-Carlo column. Default n values:
    :func:`default_n_values` of the smallest candidate count."""
    sizes = [len(s) for s in question_scores]
    if not sizes:
        raise ValueError("no questions to evaluate")
    if n_values is None:
        n_values = default_n_values(min(sizes))
    rows = []
    mc_all = (best_of_n_monte_carlo_curve(question_scores, question_correct, n_values, draws=mc_draws, seed=mc_seed)
              if mc_draws else {})
    for n in n_values:
        exact = best_of_n_exact(question_scores, question_correct, n)
        row = {"n": int(n), "questions": exact.questions, "accuracy": exact.value, "stderr": exact.stderr}
        if mc_draws:
            row.update(monte_carlo=mc_all[n].value, monte_carlo_stderr=mc_all[n].stderr)
        single = best_of_n_single_draw(question_scores, question_correct, n, seed=paper_seed)
        row.update(single_draw=single.value, single_draw_stderr=single.stderr,
                   oracle=oracle_curve(question_correct, n))
        rows.append(row)
    return {"rows": rows, "random_pick": random_pick(question_correct), "questions": len(sizes),
            "candidates_min": min(sizes), "candidates_max": max(sizes),
            "mixed_questions": int(sum(0 < np.sum(c) < len(c) for c in question_correct)),
            "monte_carlo": {"draws": mc_draws, "seed": mc_seed}, "single_draw_seed": paper_seed}


# ------------------------------------------------------------------------------------------------
# helpers


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{len(a)} chosen scores for {len(b)} rejected scores")
    return a, b


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _binomial_stderr(outcomes: np.ndarray) -> float:
    return _stderr(outcomes)
