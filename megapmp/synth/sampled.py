"""LogiQA2.0-pair's recipe (CodePMP appendix D.2.2): sample answers to multiple-choice questions from several
models, judge each answer, and pair the correct answers of a question with its incorrect ones.

The paper samples four models (Qwen2-7B/72B-Instruct, DeepSeek-V2-Chat, DeepSeek-Coder-V2-Instruct) several
times per question "with sampling top-p = 1 and top-k in {0, 0.01, 0.1, 0.2, ..., 0.9, 1.0}", and has the
answers judged by a model (DeepSeek-7B-Math-Compare-Answer). A top-k is a count of tokens; values below 1
cannot be one, so the grid is taken as the sampling temperature here (0 = greedy), with top-p 1 as printed.

    sample_and_judge(questions, models, settings, output, judge)     -> samples JSONL, resumable
    sample_groups(samples, questions, no_answer)                     -> question groups (megapmp.synth.rm_pairs)

Every request is one (question, model, grid value, repeat k): its id is ``QUESTION|MODEL|VALUE|k`` and it is
sent with seed ``seed + k``, so a server that honours seeds (vLLM, tools/serve_models.py) answers a resumed
run as it answered the uninterrupted one. Samples are written to ``OUTPUT.partial`` batch by batch (flushed and
fsynced); a rerun with the same options skips the ids already there (megapmp.synth.generate.StageOutput).

Judging: by rule (default), the answer is the option letter after the last "answer is" / "Answer:" (also
"(B)", "B." at the very start), else the one option whose full text the response quotes; or by a judge model
(``ModelJudge``) asked whether the response's final answer is the reference option. A response with no
answer the rule can find, or a judge reply that is neither yes nor no, has ``correct`` None.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from megapmp.io import iter_jsonl, write_text_atomic
from megapmp.synth.generate import RunStats, StageOutput, run_batches, text_digest
from megapmp.synth.filters import StageStats
from megapmp.synth.llm import Backend, SamplingParams
from megapmp.synth.rm_pairs import Drops, QuestionGroup, add_response
from megapmp.synth.stages import ids_digest

# CodePMP appendix D.2.2: top-p 1 and this grid (printed as top-k; used as the temperature, see above).
PAPER_GRID = (0.0, 0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PAPER_TOP_P = 1.0
LETTERS = "ABCDEFGHIJ"
NO_ANSWER_POLICIES = ("incorrect", "drop")

SAMPLE_PROMPT = ("{question}\n\nOptions:\n{options}\n\nThink the question through step by step, then end with "
                 "\"The answer is X\", where X is the letter of the correct option.")
JUDGE_PROMPT = ("Below are a multiple-choice question, its correct answer and a response to it. Decide whether "
                "the response's final answer is the correct answer.\n\n{question}\n\nOptions:\n{options}\n\n"
                "Correct answer: {letter}. {answer}\n\nResponse:\n{response}\n\nIs the response's final answer "
                "the correct answer? Reply with yes or no.\nReply:")


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question: ``question`` is its passage and question as the evaluation prompts it
    (megapmp.eval.formats.PASSAGE_TEMPLATE without the trailing "Response:")."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int

    def options_text(self) -> str:
        return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options))

    def prompt(self) -> str:
        """What the models are asked, and the prompt of the pairs made from their answers."""
        return SAMPLE_PROMPT.format(question=self.question, options=self.options_text())


@dataclass(frozen=True)
class SamplingSettings:
    grid: tuple[float, ...] = PAPER_GRID
    samples_per_setting: int = 1
    top_p: float = PAPER_TOP_P
    max_tokens: int = 1024
    stop: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if not self.grid or any(g < 0 for g in self.grid):
            raise ValueError(f"the sampling grid must be temperatures >= 0, got {list(self.grid)}")
        if self.samples_per_setting < 1 or self.batch_size < 1:
            raise ValueError("samples per setting and batch size must be >= 1")

    def params(self, value: float, k: int) -> SamplingParams:
        return SamplingParams(temperature=value, top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed + k,
                              stop=self.stop)

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "grid_as": "temperature", "samples_per_setting": self.samples_per_setting,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "stop": list(self.stop) if self.stop else None,
                "seed": self.seed}


# ---------------------------------------------------------------------------------------------------
# judging


# "answer is" in any case; the letter a capital, or a small one only where a sentence or the text ends
# ("the answer is: d."), so that English words ("the answer is a direct consequence") are not read as options.
_ANSWER_IS = re.compile(r"(?i:answer\s*(?:is|:)\s*:?\s*(?:option\s*)?)\(?\s*(?:([A-J])\b|([a-j])(?=\s*(?:[.)\]]|$)))")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-J])(?:\)|\.|:|\s*$)")


def extract_choice(response: str, options: Sequence[str]) -> int | None:
    """The option index a response answers, by rule; None when it names none (see the module docstring)."""
    n = len(options)
    # Letters past the options ("Answer: I hope this helps") are words, not answers: the last one in range counts.
    found = [i for m in _ANSWER_IS.finditer(response) if (i := LETTERS.index((m.group(1) or m.group(2)).upper())) < n]
    if found:
        return found[-1]
    lead = _LEADING_LETTER.match(response)
    if lead and LETTERS.index(lead.group(1).upper()) < n:
        return LETTERS.index(lead.group(1).upper())
    quoted = [i for i, o in enumerate(options) if o.strip() and o.strip() in response]
    return quoted[0] if len(quoted) == 1 else None


class RuleJudge:
    name = "rule"

    def describe(self) -> dict:
        return {"judge": "rule"}

    def judge(self, questions: list[ChoiceQuestion], responses: list[str]) -> list[tuple[bool | None, dict]]:
        out = []
        for q, r in zip(questions, responses):
            choice = extract_choice(r, q.options)
            out.append((None if choice is None else choice == q.answer,
                        {"answer": None if choice is None else LETTERS[choice]}))
        return out


class ModelJudge:
    """A judge model answering JUDGE_PROMPT greedily; 'yes' -> correct, 'no' -> incorrect, else None."""

    def __init__(self, backend: Backend, max_tokens: int = 8):
        self.backend, self.max_tokens = backend, max_tokens
        self.name = f"model:{backend.model}"

    def describe(self) -> dict:
        return {"judge": "model", **self.backend.describe(), "prompt_sha": text_digest(JUDGE_PROMPT)}

    def judge(self, questions: list[ChoiceQuestion], responses: list[str]) -> list[tuple[bool | None, dict]]:
        prompts = [JUDGE_PROMPT.format(question=q.question, options=q.options_text(), letter=LETTERS[q.answer],
                                       answer=q.options[q.answer], response=r) for q, r in zip(questions, responses)]
        replies = self.backend.run(prompts, SamplingParams(temperature=0.0, top_p=1.0, max_tokens=self.max_tokens,
                                                           seed=0))
        out = []
        for reply in replies:
            word = re.match(r"\W*(yes|no)\b", reply.text, re.IGNORECASE)
            out.append((None if word is None else word.group(1).lower() == "yes", {"judge_reply": reply.text[:200]}))
        return out


# ---------------------------------------------------------------------------------------------------
# sampling


def sample_id(question_id: str, model: str, value: float, k: int) -> str:
    return f"{question_id}|{model}|{value:g}|{k}"


@dataclass(frozen=True)
class ModelSpec:
    """A model to sample: its name, what identifies its outputs in the run's fingerprint (no URL, no secret),
    and how to open its backend. Backends are opened one at a time, so in-process engines (vLLM) that each
    fill a GPU take turns, and a model whose samples are all done is not opened at all."""

    name: str
    identity: dict
    open: Callable[[], Backend]


def fingerprint(questions: list[ChoiceQuestion], models: list[ModelSpec], settings: SamplingSettings, judge) -> dict:
    """What identifies a sampling run's output: a resume with anything else different is refused."""
    return {"command": "sampled", "models": [m.identity for m in models], "settings": settings.to_dict(),
            "judge": judge.describe(), "prompt_sha": text_digest(SAMPLE_PROMPT),
            "questions_sha256": ids_digest(q.id for q in questions),
            "questions_content_sha": text_digest(*(q.prompt() + "\x01" + str(q.answer) for q in questions))}


def sample_and_judge(questions: list[ChoiceQuestion], models: list[ModelSpec], settings: SamplingSettings,
                     output, judge, *, progress: bool = True) -> RunStats | None:
    """Sample every (question, model, grid value, k), judge each answer, and write one record per sample to
    ``output`` (resumable): {id, question, model, grid_value, k, response, finish_reason, correct, judge, ...}.
    Models are sampled one after the other. A finished output made with the same options is reused (None is
    returned); one made otherwise is refused."""
    output = Path(output)
    stamp = output.with_name(output.name + ".fingerprint.json")
    expected = fingerprint(questions, models, settings, judge)
    if output.exists() and not output.with_name(output.name + ".partial").exists():
        # A finished run: reused as it is when it was made with these options (nothing is sampled again).
        if not stamp.exists() or json.loads(stamp.read_text()) != json.loads(json.dumps(expected)):
            raise ValueError(f"{output} was sampled with other options or questions (see {stamp}); delete it, or "
                             "use another output directory")
        return None
    start = time.perf_counter()
    stage = StageStats("sample", "requests")
    stats = RunStats("sampled", [stage])
    plan = {m.name: [{"id": sample_id(q.id, m.name, value, k), "request": (q, value, k)}
                     for value in settings.grid for k in range(settings.samples_per_setting) for q in questions]
            for m in models}
    stats.records_in = sum(len(items) for items in plan.values())
    with StageOutput(output, expected) as out:
        todo = {name: [item for item in items if item["id"] not in out.done] for name, items in plan.items()}
        stats.skipped_done = stats.records_in - sum(len(items) for items in todo.values())
        stats.resumed_kept = out.resumed_kept
        for spec in models:
            if not todo[spec.name]:
                continue
            backend = spec.open()
            try:
                run_batches(todo[spec.name], out, stats, _batch_processor(backend, spec.name, settings, judge, stage,
                                                                          stats),
                            settings.batch_size, progress, f"sample {spec.name}", len(plan[spec.name]))
            finally:
                backend.close()
        stats.written = out.writer.written
        # The stamp first: killed between the two, the run resumes from its .partial (which holds the same
        # fingerprint); stamped after the rename, a kill there would leave a finished output that is refused.
        write_text_atomic(stamp, json.dumps(expected, indent=1, sort_keys=True) + "\n")
        out.finish()
    stats.seconds = time.perf_counter() - start
    return stats


def _batch_processor(backend: Backend, model: str, settings: SamplingSettings, judge, stage: StageStats,
                     stats: RunStats):
    def process(batch: list[dict]) -> list:
        # A batch is cut from the model's request list and may span two settings: one call per setting.
        by_setting: dict[tuple, list[int]] = {}
        for i, item in enumerate(batch):
            _, value, k = item["request"]
            by_setting.setdefault((value, k), []).append(i)
        completions = [None] * len(batch)
        with stage.timed():
            for (value, k), members in by_setting.items():
                answers = backend.run([batch[i]["request"][0].prompt() for i in members], settings.params(value, k))
                for i, c in zip(members, answers):
                    completions[i] = c
        stats.requests += len(batch)
        verdicts = judge.judge([item["request"][0] for item in batch], [c.text for c in completions])
        results = []
        for item, c, (correct, extra) in zip(batch, completions, verdicts):
            q, value, k = item["request"]
            stats.finish_reasons[c.finish_reason] += 1
            stats.response_chars += len(c.text)
            stage.keep()
            results.append(({"id": item["id"], "question": q.id, "model": model, "grid_value": value, "k": k,
                             "response": c.text.strip(), "finish_reason": c.finish_reason, "correct": correct,
                             "judge": judge.name, **extra}, None))
        return results

    return process


def sample_groups(samples: list[dict], questions: list[ChoiceQuestion], no_answer: str, drops: Drops
                  ) -> list[QuestionGroup]:
    """Question groups of judged samples, in question order, each question's samples in id order (model,
    grid value, k); a sample without a judged answer counts as incorrect, or is dropped (``no_answer``)."""
    if no_answer not in NO_ANSWER_POLICIES:
        raise ValueError(f"no-answer policy {no_answer!r} is not one of {', '.join(NO_ANSWER_POLICIES)}")
    by_question: dict[str, list[dict]] = {}
    for s in samples:
        by_question.setdefault(s["question"], []).append(s)
    groups, conflicts = [], {}
    for q in questions:
        group = QuestionGroup(q.id, q.prompt())
        for s in by_question.get(q.id, []):
            drops.seen["samples"] += 1
            if s["correct"] is None:
                drops.seen["samples_without_answer"] += 1
                if no_answer == "drop":
                    drops.add("sample_without_answer")
                    continue
            add_response(group, s["response"], bool(s["correct"]), drops, conflicts)
        groups.append(group)
    return groups


def read_samples(path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]
