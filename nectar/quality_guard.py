"""Chunk-level quality guard: held-out token likelihood decides when to fall back to static routing.

A fixed batch of held-out tokens is scored once under the static (trained) routing. After each
adapted chunk the same batch is scored under the current adapted routing; if its perplexity is
more than `max_ppl_increase` above the static one, the next chunk runs with static routing and
the mixing coefficient α is halved. While in fallback the guard keeps scoring the adapted
candidate and returns to it as soon as it is back within the bound; with a comfortable margin
α grows again. α is therefore learned online as the largest blend that keeps quality in bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class GuardConfig:
    max_ppl_increase: float = 0.01   # relative perplexity bound (0.01 = +1 %)
    alpha_step: float = 0.1          # additive α increase after a comfortable chunk
    alpha_min: float = 0.05
    comfort: float = 0.5             # "comfortable" = excess below comfort × bound
    every: int = 1                   # check every `every` chunks

    def __post_init__(self):
        if not 0 < self.max_ppl_increase < 1:
            raise ValueError(f"max_ppl_increase must be in (0, 1), got {self.max_ppl_increase}")
        if not 0 < self.alpha_min <= 1 or not 0 <= self.alpha_step <= 1:
            raise ValueError("alpha_min must be in (0, 1] and alpha_step in [0, 1]")
        if self.every < 1:
            raise ValueError(f"guard every must be >= 1, got {self.every}")


@dataclass
class GuardVerdict:
    candidate_nll: float      # mean NLL of the guard batch under the adapted routing
    static_nll: float         # mean NLL under static routing (reference)
    excess: float             # relative perplexity increase, exp(Δnll) − 1
    fallback: bool            # the next chunk runs static
    alpha: float              # mixing coefficient for the next adapted chunk


class QualityGuard:
    """Keeps state across chunks: fallback flag and α."""

    def __init__(self, static_nll: float, config: GuardConfig | None = None):
        if not math.isfinite(static_nll):
            raise ValueError(f"static guard NLL must be finite, got {static_nll}")
        self.config = config or GuardConfig()
        self.static_nll = static_nll
        self.alpha = 1.0
        self.fallback = False
        self.violations = 0

    def judge(self, candidate_nll: float) -> GuardVerdict:
        """Update fallback and α from the adapted candidate's guard NLL."""
        cfg = self.config
        if not math.isfinite(candidate_nll):
            excess = math.inf
        else:
            excess = math.exp(candidate_nll - self.static_nll) - 1.0
        if excess > cfg.max_ppl_increase:
            self.violations += 1
            self.fallback = True
            self.alpha = max(cfg.alpha_min, self.alpha / 2)
        else:
            self.fallback = False
            if excess < cfg.comfort * cfg.max_ppl_increase:
                self.alpha = min(1.0, self.alpha + cfg.alpha_step)
        return GuardVerdict(candidate_nll, self.static_nll, excess, self.fallback, self.alpha)
