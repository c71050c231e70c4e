"""Per-stage bookkeeping (kept / dropped-by-reason / throughput) and the pair-level filters.

Every stage of pair synthesis (collect, describe, mutate, filter) counts what it keeps and why it drops
the rest, so a run's stats explain exactly where the input went.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StageStats:
    """Counts for one stage. `seconds` is the wall time spent inside the stage."""

    name: str
    unit: str = "items"
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    @property
    def seen(self) -> int:
        return self.kept + sum(self.dropped.values())

    def timed(self) -> "_Timer":
        return _Timer(self)

    def as_dict(self) -> dict:
        rate = self.seen / self.seconds if self.seconds > 0 else None
        return {"stage": self.name, "unit": self.unit, "in": self.seen, "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items())), "seconds": round(self.seconds, 3),
                f"{self.unit}_per_s": round(rate, 1) if rate is not None else None}


class _Timer:
    """`with stats.timed(): ...` adds the block's wall time to the stage."""

    def __init__(self, stats: StageStats):
        self.stats = stats

    def __enter__(self):
        self.start = time.perf_counter()
        return self.stats

    def __exit__(self, *exc):
        self.stats.seconds += time.perf_counter() - self.start
        return False


@dataclass(frozen=True)
class PairFilter:
    """Drops pairs a reward model could tell apart without reading the code's meaning.

    The length ratio is on characters of chosen / rejected: CodePMP keeps the two responses of similar
    length, and a much shorter rejected response (a large dropped block) would make length a shortcut.
    """

    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    min_prompt_chars: int = 20

    def __post_init__(self):
        if not 0 < self.min_length_ratio <= 1 <= self.max_length_ratio:
            raise ValueError(f"length ratio bounds must satisfy 0 < min <= 1 <= max, got "
                             f"[{self.min_length_ratio}, {self.max_length_ratio}]")

    def reason_to_drop(self, prompt: str, chosen: str, rejected: str) -> str | None:
        """None if the pair is kept, otherwise the reason it is dropped."""
        if not chosen.strip() or not rejected.strip():
            return "empty_response"
        if len(prompt.strip()) < self.min_prompt_chars:
            return "short_prompt"
        if chosen == rejected:
            return "identical"
        ratio = len(chosen) / len(rejected)
        if not self.min_length_ratio <= ratio <= self.max_length_ratio:
            return "length_ratio"
        return None
