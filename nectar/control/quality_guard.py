"""Chunk-level quality guard: held-out token likelihood decides when to fall back to static routing.

Held-out guard batches are scored once under the static (trained) routing. After each adapted
chunk one of them (in rotation) is scored under the current adapted routing; if its perplexity is
more than `max_ppl_increase` above the static one, the next chunk runs with static routing and
the mixing coefficient α is halved. One check scores only ~1K tokens, whose perplexity excess is
noisy (±0.7 % on the CPU demo): the decision uses an exponential average of the checks
(`smoothing` = weight of the newest), and a single check above `gross` × bound falls back at once.
While in fallback the guard keeps scoring the adapted
candidate and returns to it as soon as it is back within the bound; with a comfortable margin
α grows again. α is therefore learned online as the largest blend that keeps quality in bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nectar.telemetry.window import TelemetryWindow


@dataclass
class GuardCheck:
    """One quality check, as its scorer returns it: the checked batch's mean NLL under the adapted
    candidate routing, the same batch's NLL under static routing (None: the guard's reference),
    and the check's own telemetry window (None when it cost nothing measurable)."""

    candidate_nll: float
    static_nll: float | None = None
    window: TelemetryWindow | None = None


@dataclass
class GuardConfig:
    max_ppl_increase: float = 0.01   # relative perplexity bound (0.01 = +1 %)
    alpha_step: float = 0.1          # additive α increase after a comfortable chunk
    alpha_min: float = 0.05
    comfort: float = 0.5             # "comfortable" = excess below comfort × bound
    every: int = 1                   # check every `every` chunks
    smoothing: float = 0.5           # weight of the newest check in the averaged excess
    gross: float = 2.0               # one check above gross × bound falls back at once

    def __post_init__(self):
        if not 0 < self.max_ppl_increase < 1:
            raise ValueError(f"max_ppl_increase must be in (0, 1), got {self.max_ppl_increase}")
        if not 0 < self.alpha_min <= 1 or not 0 <= self.alpha_step <= 1:
            raise ValueError("alpha_min must be in (0, 1] and alpha_step in [0, 1]")
        if not 0 < self.smoothing <= 1 or self.gross < 1:
            raise ValueError("smoothing must be in (0, 1] and gross >= 1")
        if self.every < 1:
            raise ValueError(f"guard every must be >= 1, got {self.every}")


@dataclass
class GuardVerdict:
    candidate_nll: float      # mean NLL of the guard batch under the adapted routing
    static_nll: float         # mean NLL under static routing (reference)
    excess: float             # relative perplexity increase of this check, exp(Δnll) − 1
    fallback: bool            # the next chunk runs static
    alpha: float              # mixing coefficient for the next adapted chunk


class QualityGuard:
    """Keeps state across chunks: fallback flag and α."""

    def __init__(self, static_nll: float, config: GuardConfig | None = None):
        """`static_nll`: the reference NLL used when `judge` is given none of its own."""
        if not math.isfinite(static_nll):
            raise ValueError(f"static guard NLL must be finite, got {static_nll}")
        self.config = config or GuardConfig()
        self.static_nll = static_nll
        self.alpha = 1.0
        self.fallback = False
        self.violations = 0
        self.smoothed_excess: float | None = None

    def judge(self, candidate_nll: float, static_nll: float | None = None) -> GuardVerdict:
        """Update fallback and α from the adapted candidate's guard NLL (against `static_nll`, the
        same batch's NLL under static routing, or the guard's own reference)."""
        cfg = self.config
        reference = self.static_nll if static_nll is None else static_nll
        if not math.isfinite(candidate_nll):
            excess = math.inf
        else:
            excess = math.exp(candidate_nll - reference) - 1.0
        if math.isfinite(excess):
            prev = excess if self.smoothed_excess is None else self.smoothed_excess
            self.smoothed_excess = cfg.smoothing * excess + (1 - cfg.smoothing) * prev
        gross = not math.isfinite(excess) or excess > cfg.gross * cfg.max_ppl_increase
        if gross or self.smoothed_excess > cfg.max_ppl_increase:
            self.violations += 1
            self.fallback = True
            self.alpha = max(cfg.alpha_min, self.alpha / 2)
            self.smoothed_excess = None  # the halved-α candidate starts a fresh average
        else:
            self.fallback = False
            if self.smoothed_excess < cfg.comfort * cfg.max_ppl_increase:
                self.alpha = min(1.0, self.alpha + cfg.alpha_step)
        return GuardVerdict(candidate_nll, reference, excess, self.fallback, self.alpha)
