"""The static hull: the best energy saving any non-adaptive policy, or a time-sharing mixture of
such policies, reaches at a given perplexity increase.

Each non-adaptive policy is a point (d, s): relative perplexity increase d and relative J/token
saving s, both against static top-2 on the same stream. Running policy i for a share w_i of the
tokens gives the point Σ w_i (d_i, s_i) (time-sharing is static too), so the best saving within a
perplexity increase d is the linear program

    max Σ w_i s_i   subject to   Σ w_i d_i ≤ d,  Σ w_i = 1,  w ≥ 0,

whose optimum uses at most two policies: `saved_at` takes the best single point or pair. The
result is the upper concave envelope of the points, made non-decreasing in d (one may always
spend less of the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HullPoint:
    name: str
    dppl: float      # relative perplexity increase vs static-top2 (0.01 = +1 %)
    saved: float     # relative J/token saving vs static-top2 (0.30 = 30 % less)


@dataclass
class StaticHull:
    points: list[HullPoint]

    def __post_init__(self):
        self.points = [p for p in self.points if math.isfinite(p.dppl) and math.isfinite(p.saved)]

    def saved_at(self, dppl: float) -> float:
        """Best saving of a mixture of the points with perplexity increase ≤ dppl (−inf if none)."""
        best = -math.inf
        for i, a in enumerate(self.points):
            if a.dppl <= dppl:
                best = max(best, a.saved)
            for b in self.points[i + 1:]:
                lo, hi = (a, b) if a.dppl <= b.dppl else (b, a)
                if lo.dppl <= dppl < hi.dppl:
                    w = (dppl - lo.dppl) / (hi.dppl - lo.dppl)       # share of the costlier-quality policy
                    best = max(best, lo.saved + w * (hi.saved - lo.saved))
        return best

    def mixture_at(self, dppl: float) -> list[tuple[str, float]]:
        """The (policy, share) mixture that attains `saved_at(dppl)` (one or two policies)."""
        target, best = self.saved_at(dppl), []
        for i, a in enumerate(self.points):
            if a.dppl <= dppl and a.saved == target:
                return [(a.name, 1.0)]
            for b in self.points[i + 1:]:
                lo, hi = (a, b) if a.dppl <= b.dppl else (b, a)
                if lo.dppl <= dppl < hi.dppl:
                    w = (dppl - lo.dppl) / (hi.dppl - lo.dppl)
                    if math.isclose(lo.saved + w * (hi.saved - lo.saved), target, rel_tol=0, abs_tol=1e-12):
                        best = [(lo.name, 1 - w), (hi.name, w)]
        return best

    def envelope(self, steps: int = 200) -> list[tuple[float, float]]:
        """(d, saved_at(d)) on a grid over the points' range, for plots."""
        if not self.points:
            return []
        lo, hi = min(p.dppl for p in self.points), max(p.dppl for p in self.points)
        grid = [lo + (hi - lo) * k / steps for k in range(steps + 1)]
        return [(d, self.saved_at(d)) for d in grid]
