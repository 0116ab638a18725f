"""NECTAR's serving controller: one price for new experts, moved once per window of decode steps.

The routers (`BatchPriceRouter` / `BatchPriceFamilyRouter`) keep a slot on an expert the batch does
not read yet only when its weight ≥ λ · c_e / m_e. The controller measures the quality this costs
with ride-along checks and moves λ so that the *run's* quality stays within a budget:

- every `check_every`-th decode step also runs a *shadow* forward of the same rows (or of the
  batch's first `check_rows`) with static routing, inside the same telemetry window (its energy and
  time are NECTAR's: the step's workload carries it as `before`, a forward of its own), on the KV
  cache in read-only mode (it attends as the step does and writes nothing). The two NLLs of the
  next reference tokens give the step's quality gap (nats, summed over the checked rows). A decode
  step is weight-bound, so a check of a few rows costs the weights of the experts *they* read
  rather than of the whole batch's;
- after `window_steps` decode steps the window's gaps are read (one host read a window) and:

  1. **Budget.** The bound is on the whole run, so the controller keeps the account of the run:
     spent S = Σ gap over the T tokens checked so far, allowed a·T with a = log1p(`target_share` ·
     bound) nats per token. The slack a·T − S (negative: a debt) is spread over a horizon
     H = max(`horizon_tokens`, T) tokens still to come ("about as many again as so far, at least
     `horizon_tokens`"): the allowance per token for now is a_now = clip(a + slack / H,
     `floor_share` · a, 2a). The floor is the anti-windup rule: a debt is paid back at most at
     (1 − `floor_share`) · a per token, at a price that still saves, instead of at the price floor
     (from where climbing back would take the rest of the run).
  With `quality_signal` "proxy" (the default) steps 1 and 2 read the routers' dropped mass
  instead (`nectar.serving.dropped_mass`): spent = β̂ · the run's dropped mass, the cost of the
  current price = β̂ · the window's mass per token, where β̂ (an upper bound of the slope, nats per
  unit of dropped mass) is all the checks estimate; every window moves λ, checked or not. With
  "checks":

  2. **Cost of the current price.** A *forgetting* estimate of the gap per token, weighted by
     tokens: every window multiplies the past by exp(−n / `memory_tokens` − |Δ log λ| /
     `price_memory`) (n: the window's checked tokens, Δ log λ: the last move), so it follows the
     price in force instead of the run's history (a cumulative estimate remembers an early
     overshoot for the rest of the run and holds the price at its floor: wind-up), and forgets
     faster the further the price moved (costs measured at another price are stale).
  3. **Step.** e = clip((a_now − ĝ) / a, −1, 1); log λ += `raise_step` · e when e > 0 (cost under
     the allowance), `cut_step` · e when e < 0 (cut faster than raise: quality is the constraint).
  λ stays in [`min_price`, `max_price`]; the clipped price is the controller's only integrating
  state, so a saturated price does not wind up: the first window whose error has the other sign
  moves it off the limit.

Defaults (window 8 steps, check every 16th, steps 0.3 / 0.7, memory 32 tokens and 0.5 in log price)
were chosen on simulated serving runs at OLMoE-1B-7B width (docs/serving.md) and on
tests/serving/test_controller.py's plants. A check costs a whole decode step's weight reads (more
than the ≈ 5 % a price within a 1 % bound saves there), so checks are sparse: every 4th step cost
NECTAR 20 points in the simulator once checks were charged, every 16th about none; checks of the
batch's first rows only (`check_rows`) were dearer per token of information (docs/serving.md).
With "proxy", checks thin out once they agree on the slope (`check_backoff`: the interval doubles
each window while se(β̂) ≤ `settled_rse` · β̂, up to `check_every` · `check_backoff`, and falls back
to `check_every` when they stop agreeing). With "checks", a window without a check moves nothing. A slower raise above the last cut's price
(a probe step) helped on a heavy-tailed synthetic plant but cost 2–6 points of saving on the
serving runs, so it is not used.

The gaps are device tensors until the window ends: one host read per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from nectar.experiment.forward import install
from nectar.serving.dropped_mass import DroppedMassAccount, router_totals, step_mass_per_token
from nectar.serving.engine import ServingEngine


QUALITY_SIGNALS = ("checks", "proxy")
CHECK_GAPS = ("nll", "kl")


@dataclass
class ServingControllerConfig:
    quality_bound: float = 0.01          # the run's perplexity increase bound (relative)
    target_share: float = 0.7            # share of the bound the budget allows per checked token
    window_steps: int = 8                # decode steps per price move
    check_every: int = 16                # a shadow check every this many decode steps
    check_rows: int | None = None        # rows the check re-runs (the batch's first ones); None = all
    quality_signal: str = "proxy"        # "proxy": β̂ · dropped mass (dropped_mass.py); "checks": the checked gaps
    check_gap: str = "nll"               # a checked row's gap: "nll" of its next reference token, or "kl" (check_gap_R)
    check_backoff: int = 8               # proxy: a settled slope spaces checks out to check_every × up to this
    settled_rse: float = 0.25            # ... settled: se(β̂) ≤ this × β̂ over ≥ 3 checked windows
    raise_step: float = 0.3              # largest log-price raise per window
    cut_step: float = 0.7                # largest log-price cut per window
    memory_tokens: float = 32.0          # the cost estimate forgets with this many checked tokens
    horizon_tokens: float = 256.0        # slack or debt spread over at least this many checked tokens
    price_memory: float = 0.5            # ... and with this much |Δ log λ| of price moves
    floor_share: float = 0.25            # in debt, still allow floor_share · the budget per token
    start_price: float = 0.05
    min_price: float = 1e-4
    max_price: float = 10.0

    def validate(self) -> None:
        if not self.quality_bound > 0:
            raise ValueError(f"quality_bound must be > 0, got {self.quality_bound}")
        if not 0 < self.target_share <= 1:
            raise ValueError(f"target_share must be in (0, 1], got {self.target_share}")
        if self.window_steps < 1 or self.check_every < 1:
            raise ValueError(f"window_steps and check_every must be >= 1, got {self.window_steps}, {self.check_every}")
        if isinstance(self.check_backoff, bool) or self.check_backoff < 1 or not self.settled_rse > 0:
            raise ValueError(f"check_backoff must be >= 1 and settled_rse > 0, got {self.check_backoff}, {self.settled_rse}")
        if self.check_gap not in CHECK_GAPS:
            raise ValueError(f"check_gap must be one of {CHECK_GAPS}, got {self.check_gap!r}")
        if self.quality_signal not in QUALITY_SIGNALS:
            raise ValueError(f"quality_signal must be one of {QUALITY_SIGNALS}, got {self.quality_signal!r}")
        if self.check_rows is not None and (isinstance(self.check_rows, bool) or self.check_rows < 1):
            raise ValueError(f"check_rows must be None (every row) or >= 1, got {self.check_rows!r}")
        if not (self.raise_step > 0 and self.cut_step > 0):
            raise ValueError(f"raise_step and cut_step must be > 0, got {self.raise_step}, {self.cut_step}")
        if not (self.memory_tokens > 0 and self.horizon_tokens > 0):
            raise ValueError(f"memory_tokens and horizon_tokens must be > 0, got {self.memory_tokens}, {self.horizon_tokens}")
        if not self.price_memory > 0:
            raise ValueError(f"price_memory must be > 0, got {self.price_memory}")
        if not 0 <= self.floor_share < 1:
            raise ValueError(f"floor_share must be in [0, 1), got {self.floor_share}")
        if not 0 < self.min_price <= self.start_price <= self.max_price:
            raise ValueError(f"need 0 < min_price <= start_price <= max_price, got "
                             f"{self.min_price}, {self.start_price}, {self.max_price}")

    @property
    def budget_nats_per_token(self) -> float:
        """a: the NLL gap per checked token the budget allows, log1p(target_share · bound)."""
        return math.log1p(self.target_share * self.quality_bound)


def check_gap_R(kind: str, routed, static, rows: int) -> torch.Tensor:
    """[rows] the quality gap of each checked row (nats; device), from the routed step's result and
    the static shadow's (StepResult, rows 0..rows−1):
    - "nll": NLL of the row's next reference token under the routing minus under static routing — an
      unbiased paired sample of the reference's NLL increase, one token's worth of it;
    - "kl": KL(p_static ‖ p_routed) over the vocabulary — the expected increase if the next token
      followed the static model's own distribution. No sampling noise from the token drawn, so the
      slope it gives settles after a few checks; it measures divergence from static routing, not the
      reference's NLL, so the run's own Δppl (the frontier's) stays the judge of the bound."""
    if kind == "nll":
        return routed.nll_R[:rows] - static.nll_R
    if routed.logp_RV is None or static.logp_RV is None:
        raise RuntimeError("check_gap 'kl' needs the steps' log-probs (ServingEngine.keep_logp)")
    return vocab_kl_R(static.logp_RV, routed.logp_RV[:rows])


def vocab_kl_R(logp_static_RV: torch.Tensor, logp_policy_RV: torch.Tensor) -> torch.Tensor:
    """[R] KL(p_static ‖ p_policy) of each row's next-token distribution, from log-probs [R, V]."""
    return (logp_static_RV.exp() * (logp_static_RV - logp_policy_RV)).sum(-1)


@dataclass
class PriceStep:
    """One window's decision, from the run's account and the forgetting cost estimate (nats/token)."""

    allowance_nats: float      # a_now: what a checked token may cost from now on
    cost_nats: float           # ĝ: the current price's estimated cost per checked token
    log_step: float            # the move of log λ


def price_step(cfg: ServingControllerConfig, spent_nats: float, checked_tokens: float, cost_nats: float) -> PriceStep:
    """The controller's law (module docstring, steps 1 and 3), free of state and of torch."""
    a = cfg.budget_nats_per_token
    slack_nats = a * checked_tokens - spent_nats
    horizon = max(cfg.horizon_tokens, checked_tokens)
    allowance = min(max(a + slack_nats / horizon, cfg.floor_share * a), 2 * a)
    error = min(max((allowance - cost_nats) / a, -1.0), 1.0)
    step = cfg.raise_step * error if error > 0 else cfg.cut_step * error
    return PriceStep(allowance, cost_nats, step)


@dataclass
class ServingController:
    """Moves the price of the routers in `routers` (one per MoE layer); `static` are the check's."""

    routers: list
    static: list
    config: ServingControllerConfig = field(default_factory=ServingControllerConfig)
    price: float = 0.0
    _steps: int = 0
    _gaps: list = field(default_factory=list)
    _gap_sum: float = 0.0            # nats, every check so far (the run's account)
    _gap_tokens: float = 0.0
    _recent_gap: float = 0.0         # nats, forgetting (token-weighted) sums
    _recent_tokens: float = 0.0
    _last_log_step: float = 0.0
    _account: DroppedMassAccount | None = None   # the proxy's run account (quality_signal "proxy")
    _totals_at: torch.Tensor | None = None      # [2] device router totals at the last window's end
    _interval: int = 0                          # decode steps from one check to the next
    _next_check: int = 0                        # the decode step of the next check
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.config.validate()
        self.price = self.config.start_price
        self._interval = self.config.check_every
        self._set(self.price)
        if self.config.quality_signal == "proxy":
            self._account = DroppedMassAccount(layers=len(self.routers))

    def _set(self, price: float) -> None:
        for router in self.routers:
            router.price = price

    def wrap_decode(self, engine: ServingEngine, run, feed, positions, targets):
        """The step's compute, with a shadow static forward first on check steps."""
        self.start_metering()
        if not self.check_due():
            return run

        rows = len(feed) if self.config.check_rows is None else min(self.config.check_rows, len(feed))

        def checked():
            engine.keep_logp = self.config.check_gap == "kl"   # this step's log-probs, for a KL gap
            install(engine.model, self.static)
            engine.cache.read_only = True
            try:                                                # rows 0..rows-1 of the batch (cache slots)
                static = engine.decode(feed[:rows], positions[:rows], targets[:rows])
            finally:
                engine.cache.read_only = False
                install(engine.model, self.routers)
            before = self.totals_now()
            try:
                result = run()
            finally:
                engine.keep_logp = False
            self.add_gap(check_gap_R(self.config.check_gap, result, static, rows).sum(), rows, self.mass_since(before, rows))
            return replace(result, workload=replace(result.workload, before=static.workload))  # both forwards are NECTAR's
        return checked

    def check_due(self) -> bool:
        """Whether the decode step about to run carries a check (then the next one is scheduled)."""
        if self._steps < self._next_check:
            return False
        self._next_check = self._steps + self._interval
        return True

    def _space_checks(self) -> None:
        """Proxy: while the slope is settled (se ≤ settled_rse · β̂ over ≥ 3 checked windows) each
        window doubles the check interval, up to check_every · check_backoff; otherwise it goes back
        to check_every and the next check is brought forward. The slope is all the checks estimate;
        once the checks agree on it, more of them buy little and cost a whole step each."""
        c, acc = self.config, self._account
        beta = acc.slope_estimate() if acc.checked_mass > 0 else 0.0
        settled = len(acc.checked_windows) >= 3 and beta > 0 and acc.slope_error() <= c.settled_rse * beta
        self._interval = min(2 * self._interval, c.check_every * c.check_backoff) if settled else c.check_every
        self._next_check = min(self._next_check, self._steps + self._interval)

    def start_metering(self) -> None:
        """Before the first decode step (after any capture's warm-ups): the proxy's starting totals."""
        if self._account is not None and self._totals_at is None:
            self._totals_at = router_totals(self.routers).clone()

    def totals_now(self) -> torch.Tensor | None:
        """[2] device totals before a checked step's own forward (None without the proxy)."""
        return None if self._account is None else router_totals(self.routers)

    def mass_since(self, before: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """The dropped mass of `rows` checked rows of the forward since `before` (device, 0-d)."""
        if before is None:
            return None
        return step_mass_per_token(before, router_totals(self.routers), len(self.routers)) * rows

    def add_gap(self, gap: torch.Tensor, tokens: int, mass: torch.Tensor | None = None) -> None:
        """A checked step's summed NLL gap (a 0-d device tensor) over `tokens` rows, and the dropped
        mass of those rows (proxy; 0-d device tensor); read at the window's end."""
        mass = gap.new_zeros((), dtype=torch.float64) if mass is None else mass
        self._gaps.append(torch.stack([gap.double(), gap.new_tensor(float(tokens), dtype=torch.float64),
                                       mass.double()]))                                      # [3]

    def after_decode(self, engine: ServingEngine | None = None) -> None:
        self._steps += 1
        if self._steps % self.config.window_steps:
            return
        if self._account is not None:
            return self._observe_proxy()
        if not self._gaps:
            return
        gap_sum, tokens, _ = torch.stack(self._gaps).sum(0).tolist()    # one host read a window
        self._gaps.clear()
        self.observe_window(gap_sum, tokens)

    def _observe_proxy(self) -> None:
        """Every window (checked or not): the checks' sums and the routers' totals in one host read,
        then the law on the proxy's account (the checks' own law until there is a slope)."""
        now = router_totals(self.routers)
        checks = torch.stack(self._gaps).sum(0) if self._gaps else now.new_zeros(3)
        gap, tokens, mass, window_mass, window_routed = torch.cat([checks, now - self._totals_at]).tolist()
        self._totals_at, self._gaps = now, []
        estimate = self._account.observe(gap, mass, window_mass, window_routed)
        if estimate is None:
            if tokens > 0:
                self.observe_window(gap, tokens)
            return
        self._gap_sum, self._gap_tokens = self._gap_sum + gap, self._gap_tokens + tokens
        self._space_checks()
        self._move(price_step(self.config, estimate.spent_nats, estimate.tokens, estimate.cost_nats), tokens,
                   slope=estimate.slope)

    def observe_window(self, gap_nats: float, tokens: float) -> None:
        """A window's summed gap over its checked tokens (host floats): update the account and move λ."""
        self._gap_sum, self._gap_tokens = self._gap_sum + gap_nats, self._gap_tokens + tokens
        keep = math.exp(-tokens / self.config.memory_tokens - abs(self._last_log_step) / self.config.price_memory)
        self._recent_gap = keep * self._recent_gap + gap_nats
        self._recent_tokens = keep * self._recent_tokens + tokens
        cost = self._recent_gap / max(self._recent_tokens, 1e-12)
        self._move(price_step(self.config, self._gap_sum, self._gap_tokens, cost), tokens)

    def _move(self, step: PriceStep, tokens: float, slope: float | None = None) -> None:
        """Apply a window's step to λ (clipped) and record the window."""
        c = self.config
        before = self.price
        self.price = min(max(before * math.exp(step.log_step), c.min_price), c.max_price)
        self._last_log_step = math.log(self.price / before)
        self._set(self.price)
        record = {"step": self._steps, "price": self.price,
                  "dppl_checked": math.expm1(self._gap_sum / max(self._gap_tokens, 1.0)),
                  "dppl_recent": math.expm1(step.cost_nats), "dppl_allowed_now": math.expm1(step.allowance_nats),
                  "window_tokens": tokens}
        if slope is not None:
            record["proxy_slope"], record["check_interval"] = slope, self._interval
        self.history.append(record)

    def summary(self) -> dict:
        return {"final_price": self.price, "windows": self.history, "config": self.config.__dict__}
