"""The learning-rate schedule of a training stage: linear warm-up, then cosine decay to a floor.

Progress through the stage is measured by steps (a fixed step count: deterministic, the CPU
recipes) or by wall-clock time (a time budget: the GPU recipe), or by whichever of the two is
further along when both are given, so that a stage always ends with a decayed learning rate
whether its step count or its deadline comes first:

    progress p = max(step / steps, elapsed / budget)        (terms without a limit are left out)
    lr(step, p) = peak · min(1, (step + 1) / warmup) · (floor + (1 − floor) · ½ (1 + cos π p))

With a `warmup_share` s the warm-up also ends by progress: min(1, max((step + 1) / warmup, p / s)),
so that at equal time a slower model (fewer steps) is not held in a warm-up counted in steps.

The stage ends when p ≥ 1. Reading the clock is a host call only (no device synchronisation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class StageClock:
    """Where a stage is: its step limit and/or its deadline (a `time.monotonic()` value)."""

    steps: int | None = None
    deadline: float | None = None
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.steps is None and self.deadline is None:
            raise ValueError("a training stage needs a step count or a time budget")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def progress(self, step: int, now: float | None = None) -> float:
        """Fraction of the stage done before `step` (0-based), in [0, ∞)."""
        parts = []
        if self.steps is not None:
            parts.append(step / self.steps)
        if self.deadline is not None:
            now = time.monotonic() if now is None else now
            span = self.deadline - self.start
            parts.append((now - self.start) / span if span > 0 else math.inf)
        return max(parts)

    def time_limited(self, step: int, now: float | None = None) -> bool:
        """True when the deadline (not the step count) ended the stage."""
        if self.deadline is None:
            return False
        now = time.monotonic() if now is None else now
        return now >= self.deadline and (self.steps is None or step < self.steps)


@dataclass(frozen=True)
class CosineSchedule:
    warmup_steps: int = 0
    floor: float = 0.1          # final lr / peak lr
    warmup_share: float | None = None   # the warm-up also ends at this share of the stage's progress

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and floor in [0, 1], got {self.warmup_steps}, {self.floor}")
        if self.warmup_share is not None and not 0.0 < self.warmup_share <= 1.0:
            raise ValueError(f"warmup_share must lie in (0, 1], got {self.warmup_share}")

    def factor(self, step: int, progress: float) -> float:
        """lr / peak lr at `step` (0-based) and stage progress `progress`."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        p = min(max(progress, 0.0), 1.0)
        if self.warmup_share is not None:
            warm = min(1.0, max(warm, p / self.warmup_share))
        return warm * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * p)))
