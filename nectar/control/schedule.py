"""A piecewise-constant schedule over time: a datacentre power budget that changes, an ambient
temperature step. `Schedule.parse("0:600,30:450,60:600")` holds 600 from t = 0 s, 450 from 30 s,
600 again from 60 s."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    times_s: tuple[float, ...]
    levels: tuple[float, ...]

    def __post_init__(self):
        if not self.times_s or len(self.times_s) != len(self.levels):
            raise ValueError("a schedule needs one level per start time, and at least one")
        if any(b <= a for a, b in zip(self.times_s, self.times_s[1:])) or self.times_s[0] != 0:
            raise ValueError(f"schedule times must start at 0 and increase, got {list(self.times_s)}")
        if not all(math.isfinite(v) for v in self.levels):
            raise ValueError(f"schedule levels must be finite, got {list(self.levels)}")

    @staticmethod
    def constant(level: float) -> "Schedule":
        return Schedule((0.0,), (float(level),))

    @staticmethod
    def parse(text: str) -> "Schedule":
        """From "t0:v0,t1:v1,…" (seconds:level) or a single number (constant)."""
        try:
            if ":" not in text:
                return Schedule.constant(float(text))
            pairs = [item.split(":") for item in text.split(",") if item.strip()]
            return Schedule(tuple(float(t) for t, _ in pairs), tuple(float(v) for _, v in pairs))
        except ValueError as exc:
            raise ValueError(f"bad schedule {text!r} (want 'seconds:level,…' starting at 0): {exc}") from None

    def at(self, t_s: float) -> float:
        return self.levels[max(0, bisect.bisect_right(self.times_s, t_s) - 1)]

    def values(self) -> tuple[float, ...]:
        return self.levels

    def describe(self) -> str:
        return ",".join(f"{t:g}:{v:g}" for t, v in zip(self.times_s, self.levels))
