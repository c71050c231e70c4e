"""CodePMP's model-backed stages: summarize (snippet -> description) and generate (description -> pair).

    summarize: snippets JSONL (from `collect`) -> descriptions JSONL
               strong model, `prompts.DESCRIPTION_PROMPT`; keeps {id, description, code, provenance}
    generate:  descriptions JSONL -> pairs JSONL
               `prompts.CODE_PROMPT` (= preprocess's CODEPMP_TEMPLATE); chosen = strong model's response,
               rejected = weak model's; {id, prompt (the description), chosen, rejected, chosen_model,
               rejected_model, finish reasons, provenance} -- `tools/preprocess_pairs.py --template codepmp`
               reads it as is and puts the description back into the same template.

Both stream their input in batches of `batch_size` records through the backend, write each batch to
`OUTPUT.partial` (flushed and fsynced per batch; dropped ids go to `OUTPUT.partial.dropped`) and rename
to OUTPUT at the end. A rerun with the same output and options skips every finished id, kept or dropped,
so the finished file equals an uninterrupted run's whenever the model's answers are reproducible
(a `seed`, or temperature 0). Responses are kept as the models wrote them (stripped of surrounding
whitespace), as in CodePMP.

Stats, per stage, with reasons: `empty_response` (a model answered nothing), `truncated` (finish_reason
"length", dropped only with drop_truncated), and the pair filter's `empty_response`, `short_prompt`,
`identical`, `length_ratio` (megapmp.synth.filters.PairFilter), plus finish reasons and throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from megapmp.io import iter_jsonl, jsonl_line
from megapmp.synth.filters import PairFilter, StageStats
from megapmp.synth.llm import Backend, Completion, OpenAIBackend, SamplingParams
from megapmp.synth.prompts import CODE_PROMPT, DESCRIPTION_PROMPT, code_prompt, description_prompt
from megapmp.synth.stages import ResumableJsonlWriter, ids_digest

# Keys never copied from an input record into an output record (they are the stage's own fields).
_OWN_KEYS = {"code", "description", "prompt", "query", "chosen", "rejected", "better", "worse"}


@dataclass(frozen=True)
class GenerationConfig:
    """Paper defaults (CodePMP sec. 3 / appendix): sampling temperature 0.7, top_p 1, 1024 new tokens."""

    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=1024)
    batch_size: int = 64
    drop_truncated: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


# ---------------------------------------------------------------------------------------------------
# Resumable output that also remembers dropped ids


class StageOutput:
    """ResumableJsonlWriter plus `OUTPUT.partial.dropped` ({"id", "reason"} lines), so a resumed run skips
    the ids an interrupted one dropped as well as those it kept (no second request for them)."""

    def __init__(self, output: str | os.PathLike, fingerprint: dict):
        self.writer = ResumableJsonlWriter(output, fingerprint, flush_every=1 << 62)
        self.dropped_path = self.writer.partial.with_name(self.writer.partial.name + ".dropped")
        self.resumed_dropped: Counter = Counter()
        self.done: set[str] = set()
        self._dropped_file = None

    def __enter__(self) -> "StageOutput":
        self.writer.__enter__()  # takes the output's lock: everything below is this run's alone
        try:
            self._open_dropped()
        except BaseException:
            self.writer.__exit__(None, None, None)  # lets the lock go with the error
            raise
        return self

    def _open_dropped(self) -> None:
        dropped_ids = set()
        if self.writer.resuming and self.dropped_path.exists():
            good = 0
            with open(self.dropped_path, "rb") as f:
                for line in f:
                    try:
                        if not line.endswith(b"\n"):
                            break
                        rec = json.loads(line)
                        record_id, reason = rec["id"], rec["reason"]
                    except (ValueError, KeyError, TypeError):  # torn or not ours: cut from here
                        break
                    if not (isinstance(record_id, str) and isinstance(reason, str)):
                        break
                    good += len(line)
                    if record_id not in dropped_ids:
                        dropped_ids.add(record_id)
                        self.resumed_dropped[reason] += 1
            with open(self.dropped_path, "r+b") as f:
                f.truncate(good)
        else:
            self.dropped_path.write_bytes(b"")
        self.done = self.writer.done | dropped_ids
        self._dropped_file = open(self.dropped_path, "a", encoding="utf-8")

    @property
    def resumed_kept(self) -> int:
        return self.writer.resumed

    def write(self, record: dict) -> None:
        self.writer.write(record)

    def drop(self, record_id: str, reason: str) -> None:
        self._dropped_file.write(jsonl_line({"id": record_id, "reason": reason}))

    def sync(self) -> None:
        """Make everything written so far survive a kill (called once per batch)."""
        self.writer._sync()
        self._dropped_file.flush()
        os.fsync(self._dropped_file.fileno())

    def finish(self) -> None:
        self._dropped_file.close()
        self.writer.finish(remove=(self.dropped_path,))

    def __exit__(self, *exc) -> bool:
        if self._dropped_file is not None and not self._dropped_file.closed:
            self._dropped_file.flush()
            self._dropped_file.close()
        return self.writer.__exit__(*exc)


def text_digest(*texts: str) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]


def batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class RunStats:
    """A run's stages plus resume and throughput bookkeeping; `as_dict` is what the CLI reports."""

    command: str
    stages: list[StageStats]
    records_in: int = 0
    skipped_done: int = 0
    resumed_kept: int = 0
    resumed_dropped: Counter = field(default_factory=Counter)
    written: int = 0
    requests: int = 0
    response_chars: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        new = self.written - self.resumed_kept
        rate = lambda n: round(n / self.seconds, 2) if self.seconds > 0 else None  # noqa: E731
        return {"command": self.command, "stages": [s.as_dict() for s in self.stages],
                "records_in": self.records_in, "skipped_done": self.skipped_done,
                "resumed_kept": self.resumed_kept, "resumed_dropped": dict(sorted(self.resumed_dropped.items())),
                "written": self.written, "new_written": new, "model_requests": self.requests,
                "finish_reasons": dict(sorted(self.finish_reasons.items(), key=lambda kv: str(kv[0]))),
                "seconds": round(self.seconds, 3), "records_per_s": rate(self.records_in - self.skipped_done),
                "new_written_per_s": rate(new), "response_chars_per_s": rate(self.response_chars)}


def run_batches(todo: list[dict], out: StageOutput, stats: RunStats, process: Callable[[list[dict]], list],
                 batch_size: int, progress: bool, desc: str, total: int) -> None:
    """`process(batch)` -> one (record or None, drop reason or None) per input record, in order."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit=" rec", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for batch in batches(todo, batch_size):
            for item, (record, reason) in zip(batch, process(batch)):
                if record is None:
                    out.drop(item["id"], reason)
                else:
                    out.write(record)
            out.sync()
            bar.update(len(batch))
    finally:
        bar.close()


def _passthrough(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in _OWN_KEYS and k != "id"}


def _check_ids(records: list[dict], path: str) -> None:
    seen = set()
    for i, r in enumerate(records, 1):
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"{path}: record {i}: missing 'id' (a non-empty string)")
        if rid in seen:
            raise ValueError(f"{path}: record {i}: duplicate id {rid!r}")
        seen.add(rid)


# ---------------------------------------------------------------------------------------------------
# summarize


def summarize(snippets: list[dict], output: str | os.PathLike, backend: Backend,
              config: GenerationConfig = GenerationConfig(), *, fingerprint: dict | None = None,
              limit: int | None = None, progress: bool = True) -> RunStats:
    """Describe each snippet with `backend` (the strong model) using CodePMP's description prompt."""
    _check_ids(snippets, "snippets")
    for i, s in enumerate(snippets, 1):
        if not isinstance(s.get("code"), str) or not s["code"].strip():
            raise ValueError(f"snippets: record {i} ({s.get('id')}): missing 'code'")
    snippets = snippets[:limit] if limit is not None else snippets
    start = time.perf_counter()
    stage = StageStats("summarize", "snippets")
    stats = RunStats("summarize", [stage], records_in=len(snippets))
    fingerprint = {"command": "summarize", **(fingerprint or {}), "backend": backend.describe(),
                   "sampling": config.sampling.to_dict(), "drop_truncated": config.drop_truncated,
                   "prompt_sha": text_digest(DESCRIPTION_PROMPT),
                   "inputs_sha256": ids_digest(s["id"] for s in snippets),
                   "inputs_content_sha": text_digest(*(s["code"] for s in snippets))}

    def process(batch: list[dict]) -> list:
        with stage.timed():
            results = backend.run([description_prompt(s["code"]) for s in batch], config.sampling)
        stats.requests += len(batch)
        out = []
        for snippet, c in zip(batch, results):
            stats.finish_reasons[c.finish_reason] += 1
            stats.response_chars += len(c.text)
            description = c.text.strip()
            reason = None
            if not description:
                reason = "empty_response"
            elif config.drop_truncated and c.finish_reason == "length":
                reason = "truncated"
            if reason:
                stage.drop(reason)
                out.append((None, reason))
                continue
            stage.keep()
            out.append(({"id": snippet["id"], "description": description, "code": snippet["code"],
                         "description_model": backend.model, "description_finish_reason": c.finish_reason,
                         **_passthrough(snippet)}, None))
        return out

    return _run_stage(output, fingerprint, snippets, stats, process, config.batch_size, progress, "summarize", start)


# ---------------------------------------------------------------------------------------------------
# generate


def description_of(record: dict) -> str | None:
    for key in ("description", "prompt", "query"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def _run_two(strong: Backend, weak: Backend, prompts: list[str], params: SamplingParams):
    # Two HTTP backends answer at the same time; in-process engines (vLLM) take turns.
    if isinstance(strong, OpenAIBackend) and isinstance(weak, OpenAIBackend):
        with ThreadPoolExecutor(2, thread_name_prefix="generate") as pool:
            fs, fw = pool.submit(strong.run, prompts, params), pool.submit(weak.run, prompts, params)
            return fs.result(), fw.result()
    return strong.run(prompts, params), weak.run(prompts, params)


def generate_pairs(descriptions: list[dict], output: str | os.PathLike, strong: Backend, weak: Backend,
                   config: GenerationConfig = GenerationConfig(), pair_filter: PairFilter = PairFilter(), *,
                   fingerprint: dict | None = None, limit: int | None = None, progress: bool = True) -> RunStats:
    """chosen = `strong`'s answer to CODE_PROMPT(description), rejected = `weak`'s."""
    _check_ids(descriptions, "descriptions")
    for i, r in enumerate(descriptions, 1):
        if description_of(r) is None:
            raise ValueError(f"descriptions: record {i} ({r['id']}): needs 'description' (or 'prompt'/'query')")
    descriptions = descriptions[:limit] if limit is not None else descriptions
    start = time.perf_counter()
    s_stage, w_stage = StageStats("generate_strong", "descriptions"), StageStats("generate_weak", "descriptions")
    f_stage = StageStats("filter", "pairs")
    stats = RunStats("generate", [s_stage, w_stage, f_stage], records_in=len(descriptions))
    fingerprint = {"command": "generate", **(fingerprint or {}), "strong": strong.describe(),
                   "weak": weak.describe(), "sampling": config.sampling.to_dict(),
                   "drop_truncated": config.drop_truncated, "prompt_sha": text_digest(CODE_PROMPT),
                   "filter": [pair_filter.min_length_ratio, pair_filter.max_length_ratio, pair_filter.min_prompt_chars],
                   "inputs_sha256": ids_digest(r["id"] for r in descriptions),
                   "inputs_content_sha": text_digest(*(description_of(r) for r in descriptions))}

    def check(c: Completion, stage: StageStats) -> str | None:
        stats.finish_reasons[c.finish_reason] += 1
        stats.response_chars += len(c.text)
        if not c.text.strip():
            return "empty_response"
        if config.drop_truncated and c.finish_reason == "length":
            return "truncated"
        return None

    def process(batch: list[dict]) -> list:
        prompts = [code_prompt(description_of(r)) for r in batch]
        t0 = time.perf_counter()
        strong_out, weak_out = _run_two(strong, weak, prompts, config.sampling)
        elapsed = time.perf_counter() - t0  # the two run together: each stage is charged the wall time
        s_stage.seconds += elapsed
        w_stage.seconds += elapsed
        stats.requests += 2 * len(batch)
        out = []
        for record, cs, cw in zip(batch, strong_out, weak_out):
            rs, rw = check(cs, s_stage), check(cw, w_stage)
            s_stage.drop(rs) if rs else s_stage.keep()
            w_stage.drop(rw) if rw else w_stage.keep()
            if rs or rw:
                out.append((None, f"{'strong' if rs else 'weak'}_{rs or rw}"))
                continue
            prompt, chosen, rejected = description_of(record).strip(), cs.text.strip(), cw.text.strip()
            with f_stage.timed():
                reason = pair_filter.reason_to_drop(prompt, chosen, rejected)
            if reason:
                f_stage.drop(reason)
                out.append((None, reason))
                continue
            f_stage.keep()
            out.append(({"id": record["id"], "prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "chosen_model": strong.model, "rejected_model": weak.model,
                         "chosen_finish_reason": cs.finish_reason, "rejected_finish_reason": cw.finish_reason,
                         **{k: v for k, v in _passthrough(record).items()
                            if not k.startswith("description_")}}, None))
        return out

    return _run_stage(output, fingerprint, descriptions, stats, process, config.batch_size, progress, "generate", start)


def _run_stage(output, fingerprint, records, stats, process, batch_size, progress, name, start):
    """The resumable shell both stages share: skip ids already written, process the rest in batches,
    then rename the finished output into place."""
    with StageOutput(output, fingerprint) as out:
        todo = [r for r in records if r["id"] not in out.done]
        stats.skipped_done, stats.resumed_kept = len(records) - len(todo), out.resumed_kept
        stats.resumed_dropped = out.resumed_dropped
        run_batches(todo, out, stats, process, batch_size, progress, name, len(records))
        stats.written = out.writer.written
        out.finish()
    stats.seconds = time.perf_counter() - start
    return stats


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a stage's JSONL input (snippets or descriptions)."""
    return [record for _, record in iter_jsonl(path)]
