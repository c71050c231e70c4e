"""Reward-model finetuning pairs, the recipes of CodePMP's appendix D, from one intermediate.

Every recipe reads its source into question groups: one :class:`QuestionGroup` per source question, its
prompt and candidate responses with a correctness label each. Then, the same for all recipes:

  split_groups(groups, test_fraction, seed) -> (train, test)   by question: a question's responses, and any
                                                                other question with the same prompt text,
                                                                are on one side only (check_no_leakage)
  pairs_of_group(group, style, seed, max_pairs) -> [(i, j)]    chosen = responses[i] (correct),
                                                                rejected = responses[j] (incorrect)
  pair_records(groups, ...)                                    pairs JSONL records: prompt, chosen, rejected,
                                                                group (= the source question's id), id

  group_records(groups, ...)                                   the group form instead (megapmp.data.groups):
                                                                prompt, responses, labels, group, id; one record
                                                                per question, every labelled pair in it

Recipes (each one a function from files to groups, bad records raising ``InputError`` naming FILE:LINE):

mathshepherd  Math-Shepherd records ``{"input", "label", "task"}`` (peiyi9979/Math-Shepherd): ``input`` is the
              question and a step-by-step solution with the step tag (``ки``) after every step, ``label`` the
              same text with ``+`` (a good step) or ``-`` (a bad one) in each tag's place, ``task`` GSM8K or
              MATH. The question ends where "Step 1:" begins; a response is correct when every step is ``+``
              (rule "all"; rule "final": when its last step is). Questions are grouped by their text (the
              dataset has no ids: the group id is a digest of it).
options       Multiple-choice records (LogiQA 2.0 lines, ReClor JSON; the readers of megapmp.eval.formats):
              the passage and question as the prompt (formats.PASSAGE_TEMPLATE), the options as responses,
              the right one correct.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from megapmp.io import InputError

PAIR_STYLES = ("one", "all")
CORRECTNESS_RULES = ("all", "final")
MATHSHEPHERD_STEP_TAG = "ки"
_STEP_ONE = re.compile(r"step\s*1\s*:", re.IGNORECASE)


@dataclass
class QuestionGroup:
    """One source question: its prompt and candidate responses, each labelled correct or not."""

    id: str  # the source question's id: every pair made from it carries it as `group`
    prompt: str
    responses: list[str] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)

    @property
    def split_key(self) -> str:
        """What must not be on both sides of a split: the prompt's text, whitespace normalised."""
        return " ".join(self.prompt.split())


@dataclass
class Drops:
    """Records, responses and pairs left out, by reason; and what was read (``seen``), for the report."""

    counts: Counter = field(default_factory=Counter)
    seen: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += n

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))


def _rng(seed: int, purpose: str, key: str) -> random.Random:
    """A generator for one (purpose, group): results do not depend on the order groups are processed in."""
    digest = hashlib.sha256(f"{seed}\x00{purpose}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def text_id(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# groups -> split -> pairs


def add_response(group: QuestionGroup, response: str, label: bool, drops: Drops,
                 conflicts: dict[str, set[str]]) -> None:
    """Append one labelled response; a repeated text is kept once, and a text labelled both ways is removed
    from the group (it is evidence for neither side)."""
    if not response.strip():
        drops.add("empty_response")
        return
    if response in group.responses:
        i = group.responses.index(response)
        if group.labels[i] == label:
            drops.add("duplicate_response")
            return
        del group.responses[i], group.labels[i]
        conflicts.setdefault(group.id, set()).add(response)
        drops.add("conflicting_labels", 2)
        return
    if response in conflicts.get(group.id, ()):
        drops.add("conflicting_labels")
        return
    group.responses.append(response)
    group.labels.append(label)


def split_groups(groups: list[QuestionGroup], test_fraction: float, seed: int
                 ) -> tuple[list[QuestionGroup], list[QuestionGroup]]:
    """(train, test) by question: round(test_fraction x the number of distinct prompts) prompts, drawn with
    ``seed``, go to test with every group that has that prompt. Each side keeps the input order."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test fraction {test_fraction} must be in [0, 1)")
    keys = sorted({g.split_key for g in groups})
    random.Random(seed).shuffle(keys)
    test_keys = set(keys[: round(test_fraction * len(keys))])
    return [g for g in groups if g.split_key not in test_keys], [g for g in groups if g.split_key in test_keys]


def remove_leaked(train: list[QuestionGroup], test: list[QuestionGroup]) -> tuple[list[QuestionGroup], int]:
    """``test`` without the questions whose prompt ``train`` has too, and how many were removed: for splits given
    as files, which may share questions. By prompt, not by id: each file numbers its own questions (LogiQA 2.0's
    dev and test files reuse ids for other questions), so the held-out side's ids carry a prefix."""
    keys = {g.split_key for g in train}
    kept = [g for g in test if g.split_key not in keys]
    return kept, len(test) - len(kept)


def check_no_leakage(train: list[QuestionGroup], test: list[QuestionGroup]) -> dict:
    """The split's no-leakage check, independent of how it was made: no question id and no prompt text on both
    sides. Raises ValueError naming an example otherwise; returns what was checked."""
    shared_ids = {g.id for g in train} & {g.id for g in test}
    shared_prompts = {g.split_key for g in train} & {g.split_key for g in test}
    if shared_ids or shared_prompts:
        example = next(iter(shared_ids or shared_prompts))
        raise ValueError(f"the split leaks: {len(shared_ids)} question ids and {len(shared_prompts)} prompts are "
                         f"on both sides (e.g. {example[:80]!r})")
    return {"train_questions": len(train), "test_questions": len(test), "questions_on_both_sides": 0,
            "checked": "question ids and prompt texts"}


def pairs_of_group(group: QuestionGroup, style: str, seed: int, max_pairs: int | None = None
                   ) -> list[tuple[int, int]]:
    """(chosen index, rejected index) pairs of correct x incorrect responses. ``one``: one random pair;
    ``all``: every combination, or ``max_pairs`` of them drawn at random (kept in combination order)."""
    if style not in PAIR_STYLES:
        raise ValueError(f"pair style {style!r} is not one of {', '.join(PAIR_STYLES)}")
    correct = [i for i, ok in enumerate(group.labels) if ok]
    wrong = [i for i, ok in enumerate(group.labels) if not ok]
    combos = [(c, w) for c in correct for w in wrong]
    if not combos:
        return []
    rng = _rng(seed, f"pairs-{style}", group.id)
    if style == "one":
        return [rng.choice(combos)]
    if max_pairs is not None and len(combos) > max_pairs:
        combos = sorted(rng.sample(combos, max_pairs))
    return combos


def pair_records(groups: Iterable[QuestionGroup], style: str, seed: int, max_pairs: int | None,
                 drops: Drops) -> list[dict]:
    """Pairs JSONL records of ``groups`` (questions without a correct and an incorrect response are counted)."""
    records = []
    for g in groups:
        chosen_rejected = pairs_of_group(g, style, seed, max_pairs)
        if not chosen_rejected:
            drops.add("question_without_correct_and_incorrect")
        for c, w in chosen_rejected:
            records.append({"prompt": g.prompt, "chosen": g.responses[c], "rejected": g.responses[w], "group": g.id,
                            "id": f"{g.id}:{c}-{w}"})
    return records


def group_records(groups: Iterable[QuestionGroup], style: str, seed: int, drops: Drops) -> list[dict]:
    """Group-form records (``tools/preprocess_pairs.py --groups``) of ``groups``: style ``all`` keeps every
    response of a question with its label, so the records hold exactly the pairs ``pair_records`` would write
    with ``all``; style ``one`` the two responses of the one pair it would draw. Questions without a correct
    and an incorrect response are counted and left out."""
    records = []
    for g in groups:
        chosen_rejected = pairs_of_group(g, style, seed)
        if not chosen_rejected:
            drops.add("question_without_correct_and_incorrect")
            continue
        if style == "one":
            (c, w), = chosen_rejected
            responses, labels = [g.responses[c], g.responses[w]], [True, False]
        else:
            responses, labels = list(g.responses), list(g.labels)
        records.append({"prompt": g.prompt, "responses": responses, "labels": labels, "group": g.id, "id": g.id})
    return records


def _record_pairs(record: dict) -> int:
    if "labels" in record:
        good = sum(record["labels"])
        return good * (len(record["labels"]) - good)
    return 1


@dataclass
class SplitPairs:
    train: list[dict]
    test: list[dict]
    stats: dict


def build_split_pairs(train_groups: list[QuestionGroup], test_groups: list[QuestionGroup], *, train_style: str,
                      test_style: str, seed: int, max_pairs: int | None, drops: Drops,
                      leaked_removed: int = 0, train_form: str = "pairs") -> SplitPairs:
    """Pairs of both sides, after the no-leakage check; stats count questions, responses and pairs.
    ``train_form="groups"`` writes the training side in the group form (``group_records``; the test side stays
    pairs, what rm-accuracy reads); it takes no ``max_pairs``, every labelled pair of a question being in it."""
    if train_form not in ("pairs", "groups"):
        raise ValueError(f"train form {train_form!r} is not pairs or groups")
    if train_form == "groups" and max_pairs is not None:
        raise ValueError("--max-pairs-per-question draws pairs: the group form keeps every labelled pair of a question")
    split = check_no_leakage(train_groups, test_groups)
    split["test_questions_removed_as_in_train"] = leaked_removed
    train = (group_records(train_groups, train_style, seed, drops) if train_form == "groups" else
             pair_records(train_groups, train_style, seed, max_pairs, drops))
    test = pair_records(test_groups, test_style, seed, max_pairs, drops)

    def side(groups, records):
        labels = [ok for g in groups for ok in g.labels]
        return {"questions": len(groups), "responses": len(labels), "correct": sum(labels),
                "incorrect": len(labels) - sum(labels), "pairs": sum(_record_pairs(r) for r in records),
                "questions_with_pairs": len({r["group"] for r in records})}

    stats = {"split": split, "train": side(train_groups, train), "test": side(test_groups, test),
             "styles": {"train": train_style, "test": test_style}, "max_pairs_per_question": max_pairs,
             "train_form": train_form, "seed": seed}
    return SplitPairs(train, test, stats)


# ---------------------------------------------------------------------------------------------------
# mathshepherd


def parse_mathshepherd(record: dict, file: str, line: int, step_tag: str = MATHSHEPHERD_STEP_TAG
                       ) -> tuple[str, str, list[bool], str]:
    """(question, solution without step tags, one label per step, task) of one Math-Shepherd record."""
    if not isinstance(record, dict):
        raise InputError(file, line, None, f"expected a JSON object, got {type(record).__name__}")
    for key in ("input", "label"):
        if not isinstance(record.get(key), str):
            raise InputError(file, line, key, "missing or not a string")
    task = record.get("task", "")
    if not isinstance(task, str):
        raise InputError(file, line, "task", f"expected a string (GSM8K or MATH), got {type(task).__name__}")
    text, label = record["input"], record["label"]
    segments = text.split(step_tag)
    if len(segments) < 2:
        raise InputError(file, line, "input", f"no step tag {step_tag!r}: not a Math-Shepherd record "
                                              "(--step-tag sets another tag)")
    # The label is the input with one '+' or '-' in each tag's place; anything else differs is an error.
    steps, pos = [], 0
    for k, segment in enumerate(segments[:-1], 1):
        if label[pos: pos + len(segment)] != segment:
            raise InputError(file, line, "label", f"differs from 'input' before step tag {k}")
        mark = label[pos + len(segment): pos + len(segment) + 1]
        if mark not in ("+", "-"):
            raise InputError(file, line, "label", f"has {mark!r} where 'input' has step tag {k} (expected + or -)")
        steps.append(mark == "+")
        pos += len(segment) + 1
    if label[pos:] != segments[-1]:
        raise InputError(file, line, "label", "differs from 'input' after the last step tag")
    start = _STEP_ONE.search(text)
    if start is None:
        raise InputError(file, line, "input", "no 'Step 1:' marks where the question ends and the solution begins")
    if start.start() > len(segments[0]):
        raise InputError(file, line, "input", "a step tag stands inside the question (before 'Step 1:')")
    question = text[: start.start()].strip()
    if not question:
        raise InputError(file, line, "input", "the question before 'Step 1:' is empty")
    solution = text[start.start():].replace(step_tag, "")
    solution = re.sub(r"[ \t]+(?=\n)", "", solution).strip()  # the space each removed tag leaves behind
    return question, solution, steps, task


def is_correct_solution(step_labels: list[bool], rule: str) -> bool:
    """all: every step is '+' (the solution is right throughout); final: its last step is '+' (its final
    answer leads to the right result)."""
    if rule == "all":
        return all(step_labels)
    if rule == "final":
        return step_labels[-1]
    raise ValueError(f"correctness rule {rule!r} is not one of {', '.join(CORRECTNESS_RULES)}")


def mathshepherd_groups(records: Iterable[tuple[str, int, dict]], *, rule: str = "all",
                        step_tag: str = MATHSHEPHERD_STEP_TAG, on_error: Callable[[InputError], None],
                        drops: Drops) -> list[QuestionGroup]:
    """Question groups of Math-Shepherd records, given as (file, line, record); ``on_error`` gets every bad
    record's InputError (raise it to stop, or set it aside)."""
    groups: dict[str, QuestionGroup] = {}
    conflicts: dict[str, set[str]] = {}
    for file, line, record in records:
        try:
            question, solution, steps, task = parse_mathshepherd(record, file, line, step_tag)
        except InputError as e:
            on_error(e)
            continue
        drops.seen[f"records_{task or 'without_task'}"] += 1
        gid = f"mathshepherd-{text_id(question)}"
        group = groups.get(gid)
        if group is None:
            group = groups[gid] = QuestionGroup(gid, question)
        add_response(group, solution, is_correct_solution(steps, rule), drops, conflicts)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------
# options (multiple choice)


def unique_id(qid: str, taken) -> str:
    """``qid``, or the first of qid~2, qid~3, ... not in ``taken``: one id per question where a source reuses
    an id for another question."""
    if qid not in taken:
        return qid
    k = 2
    while f"{qid}~{k}" in taken:
        k += 1
    return f"{qid}~{k}"


def option_groups(sets_with_lines: Iterable[tuple[str, int, object]], drops: Drops, id_prefix: str = ""
                  ) -> list[QuestionGroup]:
    """Question groups of multiple-choice candidate sets (megapmp.eval.formats.CandidateSet), given as
    (file, line, set). A repeated record is dropped; an id reused by another question gets a suffix, so that
    ``group`` names one question. ``id_prefix`` starts every id (a held-out split's files number their
    questions on their own)."""
    groups: list[QuestionGroup] = []
    seen: dict[str, tuple] = {}  # id -> the record as read (prompt, options, labels)
    conflicts: dict[str, set[str]] = {}
    for _file, _line, cs in sets_with_lines:
        drops.seen["records"] += 1
        gid, record = id_prefix + str(cs.id), (cs.prompt, tuple(cs.responses), tuple(cs.correct))
        if gid in seen:
            if seen[gid] == record:
                drops.add("duplicate_record")
                continue
            gid = unique_id(gid, seen)
            drops.seen["ids_reused_by_another_question_renamed"] += 1
        group = QuestionGroup(gid, cs.prompt)
        for response, ok in zip(cs.responses, cs.correct):
            add_response(group, response, ok, drops, conflicts)
        seen[gid] = record
        groups.append(group)
    return groups
