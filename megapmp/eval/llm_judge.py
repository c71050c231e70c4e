"""Any LLM behind an OpenAI-compatible server as a pairwise code judge (CodeFavor's LLM-judge protocol).

The judge gets one user message: the instruction, the two codes as [CODE_A] and [CODE_B] (Python fences),
the criterion, and the request to give a short [FEEDBACK] and then a [RESULT] of the form
"[CODE_?] is better than [CODE_?] on the criteria" (CodeFavor's generation-judge prompt has this structure;
the wording here is ours). Sampling is greedy (temperature 0), as CodeFavor's evaluation samples judges.

:func:`parse_verdict` reads the answer: the text after the last [RESULT] / "Result:" heading (all of it when
there is none), cut into sentences and read from the last one back; a sentence that says "neither" or "not
better", or names no code, is passed over; "X is better than Y" (X, then "better", then Y) is a confident verdict for X; a sentence
with "better" naming one code, or both in another arrangement, is a weaker verdict for the code named last
before "better" (else the first after it); the latest sentence with the most confident verdict wins. Code names are CODE_A / CODE A /
Code-A (or CODE_1 / CODE_2); "the code and ..." is not a name. No verdict: the answer is *undecided*,
which CodeFavor's evaluation counts as half right.

:class:`LLMJudge` sends many such requests, ``concurrency`` at a time, each retried by the openai SDK
(connection errors, timeouts, 408/409/429, 5xx, with backoff). Every answer is appended to a JSONL cache
as it arrives (keyed by model, sampling and prompt), so an interrupted evaluation resumes where it stopped;
a request that fails for good does not stop the others, and the run then ends with one error naming how
many failed (rerun to retry them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from megapmp.synth.llm import Backend, BackendError, SamplingParams

REASONING_TEMPLATE = (
    "You are given an [INSTRUCTION] and two candidate responses, [CODE_A] and [CODE_B]. Judge which of the two "
    "better meets the [CRITERIA] while following the [INSTRUCTION].\n\n"
    "---\n[INSTRUCTION]\n{instruction}\n\n[CODE_A]\n```python\n{code_a}\n```\n\n[CODE_B]\n```python\n{code_b}\n```"
    "\n\n[CRITERIA]\n{criteria}\n---\n\n"
    "1. First write a brief [FEEDBACK] section on how well each code meets the [CRITERIA].\n"
    "2. Then end with a [RESULT] section that states your conclusion in the form "
    "\"[CODE_?] is better than [CODE_?] on the criteria\".\n"
)
JUDGE_SAMPLING = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=2048)

_FIELD = re.compile(r"\{(instruction|code_a|code_b|criteria)\}")
# The heading only ("[RESULT]", "Result:", "**Result**:"), not the word: "... since it returns correct results"
# after the heading must not cut the verdict away.
_RESULT = re.compile(r"\[\s*result\s*\]|\bresult\b\**\s*:", re.IGNORECASE)
_CODE = re.compile(r"code[\s_\-]*\[?\s*([ab12])(?![a-z0-9])", re.IGNORECASE)
_BETTER = re.compile(r"better", re.IGNORECASE)
_NEITHER = re.compile(r"neither|(?:\bnot|n't|\bno)\s+better", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.\n]")


def judge_prompt(instruction: str, code_a: str, code_b: str, criteria: str) -> str:
    values = {"instruction": instruction.strip(), "code_a": code_a.strip("\n"), "code_b": code_b.strip("\n"),
              "criteria": criteria.strip()}
    return _FIELD.sub(lambda m: values[m.group(1)], REASONING_TEMPLATE)  # one pass: braces in code stay


def parse_verdict(text) -> int | None:
    """0 when the answer prefers [CODE_A], 1 for [CODE_B], None when it names no winner (module docstring)."""
    if not isinstance(text, str):
        return None
    parts = _RESULT.split(text)
    tail = parts[-1] if len(parts) > 1 else text
    best, confidence = None, 0
    for sentence in reversed(_SENTENCE_END.split(tail)):
        if _NEITHER.search(sentence):
            continue
        names = [(m.start(), 0 if m.group(1).upper() in "A1" else 1) for m in _CODE.finditer(sentence)]
        better = [m.start() for m in _BETTER.finditer(sentence)]
        if not names or not better:
            continue
        at = better[-1]
        before = [code for pos, code in names if pos < at]
        after = [code for pos, code in names if pos > at]
        if before:  # the code named last before "better" is its subject
            verdict = before[-1]
            level = 2 if after and after[0] != verdict else 1  # 2: "X is better than Y"
        else:  # "better: Y"
            verdict, level = after[0], 1
        if level > confidence:
            best, confidence = verdict, level
    return best


@dataclass(frozen=True)
class JudgeRequest:
    """One question to the judge: ``task`` and ``order`` identify it in the report and the cache."""

    task: str
    order: int  # 0: the chosen code shown first; 1: shown second
    prompt: str


class LLMJudgeError(RuntimeError):
    """Some requests failed for good; the answers received are in the cache."""


class LLMJudge:
    """Asks ``backend`` (an OpenAIBackend of concurrency 1: the threads are here) every request once."""

    def __init__(self, backend: Backend, params: SamplingParams = JUDGE_SAMPLING, *, concurrency: int = 8,
                 cache: str | os.PathLike | None = None, progress: bool = True):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.backend, self.params, self.concurrency, self.progress = backend, params, concurrency, progress
        self.cache = Path(cache) if cache else None
        self._lock = threading.Lock()
        self.requests_sent = 0
        self.from_cache = 0

    def key(self, prompt: str) -> str:
        identity = {**self.backend.describe(), "sampling": self.params.to_dict(), "prompt": prompt}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        return {**self.backend.describe(), "sampling": self.params.to_dict(), "concurrency": self.concurrency,
                "cache": str(self.cache) if self.cache else None, "requests_sent": self.requests_sent,
                "answers_from_cache": self.from_cache}

    def _read_cache(self) -> dict[str, str]:
        """Answers already received: key -> text. A torn last line (a killed run) is cut off."""
        answers: dict[str, str] = {}
        if self.cache is None or not self.cache.exists():
            return answers
        good = 0
        with open(self.cache, "rb") as f:
            for line in f:
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("torn line")
                    record = json.loads(line)
                    answers[record["key"]] = record["response"]
                except (ValueError, KeyError, TypeError):
                    break
                good += len(line)
        with open(self.cache, "r+b") as f:
            f.truncate(good)
        return answers

    def ask(self, requests: list[JudgeRequest]) -> list[str]:
        """The judge's answer to each request, in order (from the cache where it has one)."""
        from tqdm import tqdm

        cached = self._read_cache()
        keys = [self.key(r.prompt) for r in requests]
        answers: list[str | None] = [cached.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        self.from_cache = len(requests) - len(todo)
        failures: list[str] = []
        out = None
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.cache, "a", encoding="utf-8")
        bar = tqdm(total=len(requests), initial=self.from_cache, unit="answer", desc="judging", file=sys.stderr,
                   dynamic_ncols=True, disable=not self.progress)

        def one(i: int) -> str:
            messages = [{"role": "user", "content": requests[i].prompt}]
            if self.backend.mode == "chat":
                return self.backend.generate_chat([messages], self.params)[0].text
            return self.backend.generate([requests[i].prompt], self.params)[0].text

        try:
            with ThreadPoolExecutor(min(self.concurrency, max(1, len(todo))), thread_name_prefix="judge") as pool:
                futures = {pool.submit(one, i): i for i in todo}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        text = future.result()
                    except BackendError as e:  # already retried by the SDK: this one failed for good
                        failures.append(str(e))
                        continue
                    answers[i] = text
                    with self._lock:
                        self.requests_sent += 1
                        if out is not None:
                            out.write(json.dumps({"key": keys[i], "task": requests[i].task, "order": requests[i].order,
                                                  "model": self.backend.model, "response": text,
                                                  "verdict": parse_verdict(text)}, ensure_ascii=False) + "\n")
                            out.flush()
                    bar.update(1)
        finally:
            bar.close()
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
                out.close()
        if failures:
            kept = f"; the {len(requests) - len(failures)} answered are kept in {self.cache}" if self.cache else ""
            raise LLMJudgeError(f"{len(failures)} of {len(requests)} judge requests failed for good{kept}: rerun to "
                                f"retry them. First failure: {failures[0]}")
        return answers
