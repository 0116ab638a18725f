"""The quality side of the controller: a paired estimate of what adaptation costs on the stream
itself, the price of quality that spends the budget, and the per-chunk sensitivity.

Quality signal. In prefill the tokens of a chunk are known, so the NLL of every sequence under the
adapted routing comes free with the chunk's forward. A small random share of the chunk's sequences
is re-run under static routing (the *shadow*); the difference of the two NLLs on the same tokens is
a paired, low-variance estimate of the perplexity cost of adaptation on the current domain. The
shadow's energy and time are charged to NECTAR.

Price of quality. The controller minimises energy + μ·(NLL increase) over the stream; μ is a dual
variable moved in log space after every check so that the measured increase sits at
`budget_use` × the bound (projected dual ascent on the quality constraint: it spends the budget,
and no more).

Sensitivity. How much NLL a unit of routing deviation costs differs between domains. The guard
keeps two ratio estimates ΔNLL / deviation, a fast one (the current domain) and a slow one (the
stream); their quotient κ multiplies the price for the next chunk, so that the budget is spent
where it is cheap.

Feed-forward price (default). Once the fast ratio s is known, the deviation that spends the budget
is D* = target / s (at most `trust` × the latest checked deviation: the linear model is not
extrapolated far); before anything is measured, a probe at a unit sensitivity (D* = target); the
controller then sets λ so that the chunk problem's solution on the chunk's own gate logits has
deviation D* (`target_deviation`, `set_price`). Dual ascent alone (the
`feedforward=False` ablation) needs many checks to reach the budget; the feed-forward price
reaches it after one check and follows a new domain after one.

A gross violation, or a check that returns nothing finite, falls back to static routing for the
next chunk (one chunk: the raised price takes over after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import TelemetryWindow


DEFAULT_START_PRICE = 0.3   # NECTAR's router (a router class may declare its own START_PRICE)


@dataclass
class QualityCheck:
    """One paired check: mean NLL per token of the same tokens under adapted and static routing,
    the number of tokens, and what it cost: its own telemetry window, or — when it rode along in
    its chunk's window — the share of that window's energy and time attributed to it (both None
    when it cost nothing)."""

    adapted_nll: float
    static_nll: float
    tokens: int
    window: TelemetryWindow | None = None
    energy_J: float | None = None     # attributed share of the chunk window (ride-along checks)
    seconds: float | None = None

    def cost(self) -> tuple[float, float]:
        """(energy J, seconds) the check cost: its own window's, else its attributed share, else 0."""
        if self.window is not None:
            return window_energy_J(self.window), self.window.duration_s
        return self.energy_J or 0.0, self.seconds or 0.0

    @property
    def delta_nll(self) -> float:
        """Paired NLL increase per token (nats); positive = adaptation costs quality."""
        return self.adapted_nll - self.static_nll


@dataclass
class GuardConfig:
    max_ppl_increase: float = 0.01   # the quality bound: relative perplexity increase vs static routing
    budget_use: float = 0.9          # aim the measured increase at this share of the bound
    price_init: float | None = None  # initial quality price μ (normalised expert cost per nat of KL);
                                     # None: the router family's START_PRICE (set by the controller)
    price_lr: float = 0.25           # step of log μ per check, per unit of relative error
    price_range: tuple[float, float] = (0.005, 50.0)
    sensitivity: bool = True         # scale the price by the current chunk's relative sensitivity
    fast_memory: float = 0.3         # weight of the newest check in the fast (domain) estimate
    slow_memory: float = 0.05        # ... in the slow (stream) estimate
    kappa_range: tuple[float, float] = (0.5, 2.0)
    gross: float = 4.0               # one check above gross × target falls back to static at once and
                                     # multiplies μ by (measured / target)
    feedforward: bool = True         # set λ from the measured sensitivity (False: dual ascent only)
    trust: float = 3.0               # D* at most this multiple of the latest checked deviation
    prior_sensitivity: float = 1.0   # before any measurement: the probe assumes this ΔNLL per unit deviation

    def __post_init__(self):
        if not 0 < self.max_ppl_increase < 1:
            raise ValueError(f"max_ppl_increase must be in (0, 1), got {self.max_ppl_increase}")
        if not 0 < self.budget_use <= 1:
            raise ValueError(f"budget_use must be in (0, 1], got {self.budget_use}")
        if self.price_init is not None and not (self.price_init > 0 and math.isfinite(self.price_init)):
            raise ValueError(f"price_init must be a finite number > 0, got {self.price_init}")
        if not (0 < self.fast_memory <= 1 and 0 < self.slow_memory <= 1):
            raise ValueError("fast_memory and slow_memory must be in (0, 1]")
        if self.gross <= 1:
            raise ValueError(f"gross must be > 1, got {self.gross}")
        if not self.trust > 1:
            raise ValueError(f"trust must be > 1, got {self.trust}")
        if not (self.prior_sensitivity > 0 and math.isfinite(self.prior_sensitivity)):
            raise ValueError(f"prior_sensitivity must be a finite number > 0, got {self.prior_sensitivity}")

    @property
    def target_delta_nll(self) -> float:
        """The per-token NLL increase the price aims at (nats)."""
        return math.log1p(self.budget_use * self.max_ppl_increase)


@dataclass
class GuardVerdict:
    delta_nll: float          # this check's paired NLL increase per token (nan: no check)
    excess: float             # this check's relative perplexity increase, exp(Δnll) − 1
    price: float              # μ after the update
    kappa: float              # relative sensitivity applied to the next chunk
    fallback: bool            # the next chunk runs static


class QualityGuard:
    """Keeps the price μ, the sensitivity estimates and the fallback flag across chunks."""

    def __init__(self, config: GuardConfig | None = None):
        self.config = config or GuardConfig()
        self.price = DEFAULT_START_PRICE if self.config.price_init is None else self.config.price_init
        self.fallback = False
        self.violations = 0
        self.checks = 0                  # checks judged so far
        self._fast: tuple[float, float] | None = None   # (ΔNLL, deviation) averages
        self._slow: tuple[float, float] | None = None
        self._checked_deviation = 0.0    # the deviation of the latest check that measured anything

    @property
    def kappa(self) -> float:
        """Current relative sensitivity: fast ratio / slow ratio, clipped (1 until measured)."""
        if not self.config.sensitivity or self._fast is None or self._slow is None:
            return 1.0
        fast, slow = _ratio(self._fast), _ratio(self._slow)
        if not (fast > 0 and slow > 0):
            return 1.0
        lo, hi = self.config.kappa_range
        return min(hi, max(lo, fast / slow))

    def predicted_delta(self, deviation: float) -> float:
        """The NLL increase per token the sensitivity model expects for a routing `deviation`
        (the fast ratio ΔNLL / deviation; nan before the first check)."""
        if self._fast is None or not math.isfinite(deviation):
            return math.nan
        return _ratio(self._fast) * deviation

    @property
    def measured(self) -> bool:
        """Whether any check has measured the sensitivity (a check at a non-zero deviation)."""
        return self._fast is not None

    def target_deviation(self) -> float | None:
        """The routing deviation that spends the budget (feed-forward price); None when switched
        off or in fallback, and before the first check. Checked but nothing measured yet (every
        check at zero deviation): a probe at `prior_sensitivity` (nats of NLL per nat of
        deviation). Measured: target / s, at most `trust` × the latest checked deviation (so a
        check that finds no cost grows the deviation by that factor)."""
        cfg = self.config
        if not cfg.feedforward or self.fallback:
            return None
        if self._fast is None:           # checked, but never at a deviation: probe (unchecked: no basis)
            return cfg.target_delta_nll / cfg.prior_sensitivity if self.checks else None
        ratio, cap = _ratio(self._fast), cfg.trust * self._checked_deviation
        if not math.isfinite(ratio):
            return None
        return cap if ratio <= 0 else min(cfg.target_delta_nll / ratio, cap)

    def set_price(self, price: float) -> None:
        """Set μ (clipped to the price range): the feed-forward price chosen by the controller."""
        low, high = self.config.price_range
        if math.isfinite(price):
            self.price = min(high, max(low, price))

    def judge(self, check: QualityCheck | None, deviation: float) -> GuardVerdict:
        """Update the price, the sensitivity and the fallback from one check (None: no check this
        chunk). `deviation` is the routing deviation of the checked chunk (mean KL to static)."""
        cfg = self.config
        if check is None:
            self.fallback = False        # a fallback lasts one chunk; the raised price takes over
            return GuardVerdict(math.nan, math.nan, self.price, self.kappa, False)
        self.checks += 1
        delta = check.delta_nll
        target = cfg.target_delta_nll
        if not math.isfinite(delta):
            self._fall_back()
            return GuardVerdict(delta, math.nan, self.price, self.kappa, True)
        self._update_sensitivity(delta, deviation)
        error = max(-1.0, min(2.0, (delta - target) / target))
        low, high = cfg.price_range
        self.price = min(high, max(low, self.price * math.exp(cfg.price_lr * error)))
        self.fallback = delta > cfg.gross * target
        if self.fallback:
            self._fall_back(delta / target)
        return GuardVerdict(delta, math.expm1(delta), self.price, self.kappa, self.fallback)

    def _fall_back(self, overshoot: float = 2.0) -> None:
        """Static routing for the next chunk, and a price raised in proportion to the violation
        (`overshoot` = measured / target NLL increase, at least ×2)."""
        low, high = self.config.price_range
        self.violations += 1
        self.fallback = True
        self.price = min(high, max(low, max(2.0, overshoot) * self.price))

    def _update_sensitivity(self, delta: float, deviation: float) -> None:
        if not (math.isfinite(deviation) and deviation > 0):
            return
        point = (max(delta, 0.0), deviation)
        self._checked_deviation = deviation
        self._fast = _ema(self._fast, point, self.config.fast_memory)
        self._slow = _ema(self._slow, point, self.config.slow_memory)


def _ema(old: tuple[float, float] | None, new: tuple[float, float], weight: float) -> tuple[float, float]:
    if old is None:
        return new
    return tuple(weight * n + (1 - weight) * o for n, o in zip(new, old))


def _ratio(pair: tuple[float, float]) -> float:
    return pair[0] / pair[1] if pair[1] > 0 else math.nan
