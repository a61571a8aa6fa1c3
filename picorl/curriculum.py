"""Curriculum: which difficulty the next update trains on.

The rule (after Atropos): keep a rolling window of the last `window` tasks' fraction
correct; promote one difficulty when its mean reaches `promote_at`, demote one when it
falls below `demote_below`, and start a fresh window after every change so that the new
difficulty is judged on its own tasks. A stage with neither threshold is a fixed schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Curriculum:
    difficulty: int
    promote_at: float | None = None
    demote_below: float | None = None
    window: int = 32
    min_difficulty: int = 1
    max_difficulty: int = 10
    recent: list = field(default_factory=list)  # per-task fraction correct, newest last

    @classmethod
    def for_stage(cls, stage) -> "Curriculum":
        return cls(difficulty=stage.difficulty, promote_at=stage.promote_at, demote_below=stage.demote_below,
                   window=stage.window, max_difficulty=stage.max_difficulty)

    def reachable(self) -> list[int]:
        """Every difficulty this curriculum can train on (data is built for each)."""
        lo = self.min_difficulty if self.demote_below is not None else self.difficulty
        hi = self.max_difficulty if self.promote_at is not None else self.difficulty
        return list(range(lo, hi + 1))

    def observe(self, task_correct: list[float]) -> int | None:
        """Record tasks' fraction correct; return the new difficulty if it changed."""
        self.recent = (self.recent + list(task_correct))[-self.window:]
        if len(self.recent) < self.window:
            return None
        rate = sum(self.recent) / len(self.recent)
        new = self.difficulty
        if self.promote_at is not None and rate >= self.promote_at and self.difficulty < self.max_difficulty:
            new = self.difficulty + 1
        elif self.demote_below is not None and rate < self.demote_below and self.difficulty > self.min_difficulty:
            new = self.difficulty - 1
        if new == self.difficulty:
            return None
        self.difficulty, self.recent = new, []
        return new

    def state_dict(self) -> dict:
        return {"difficulty": self.difficulty, "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.difficulty, self.recent = int(state["difficulty"]), list(state["recent"])
