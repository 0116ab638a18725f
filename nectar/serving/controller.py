"""NECTAR's serving controller: one price for new experts, moved once per window of decode steps.

The routers (`BatchPriceRouter` / `BatchPriceFamilyRouter`) keep a slot on an expert the batch does
not read yet only when its weight ≥ λ · c_e / m_e. The controller measures the quality this costs
with ride-along checks and moves λ by dual ascent on the quality bound:

- every `check_every`-th decode step also runs a *shadow* forward of the same rows with static
  routing, inside the same telemetry window (its energy and time are NECTAR's), on the KV cache in
  read-only mode (it attends as the step does and writes nothing). The two NLLs of the next
  reference tokens give the step's quality gap;
- after `window_steps` decode steps: d̂ = exp(mean NLL gap per checked token) − 1 over *every*
  check so far (the bound is on the whole run, and a window's few checked tokens are noisy),
  log λ ← log λ + η · clip((target − d̂) / bound, −1, 1) with target = `target_share` · bound, λ
  clipped to [λ_min, λ_max]. Under the bound the price rises (more new experts skipped, less
  energy); over it, it falls.
The gaps are device tensors until the window ends: one host read per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nectar.experiment.forward import install
from nectar.serving.engine import ServingEngine


@dataclass
class ServingControllerConfig:
    quality_bound: float = 0.01
    target_share: float = 0.7
    window_steps: int = 16
    check_every: int = 4
    step_size: float = 1.0
    start_price: float = 0.05
    min_price: float = 1e-4
    max_price: float = 10.0

    def validate(self) -> None:
        if not self.quality_bound > 0 or not 0 < self.target_share <= 1:
            raise ValueError("quality_bound must be > 0 and target_share in (0, 1]")
        if self.window_steps < 1 or self.check_every < 1:
            raise ValueError("window_steps and check_every must be >= 1")
        if not 0 < self.min_price <= self.start_price <= self.max_price:
            raise ValueError("need 0 < min_price <= start_price <= max_price")


@dataclass
class ServingController:
    """Moves the price of the routers in `routers` (one per MoE layer); `static` are the check's."""

    routers: list
    static: list
    config: ServingControllerConfig = field(default_factory=ServingControllerConfig)
    price: float = 0.0
    _steps: int = 0
    _gaps: list = field(default_factory=list)
    _gap_sum: float = 0.0
    _gap_tokens: float = 0.0
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.config.validate()
        self.price = self.config.start_price
        self._set(self.price)

    def _set(self, price: float) -> None:
        for router in self.routers:
            router.price = price

    def wrap_decode(self, engine: ServingEngine, run, feed, positions, targets):
        """The step's compute, with a shadow static forward first on check steps."""
        if self._steps % self.config.check_every:
            return run

        def checked():
            install(engine.model, self.static)
            engine.cache.read_only = True
            try:
                static = engine.decode(feed, positions, targets)
            finally:
                engine.cache.read_only = False
                install(engine.model, self.routers)
            result = run()
            self.add_gap((result.nll_R - static.nll_R).sum(), len(feed))
            return result
        return checked

    def add_gap(self, gap: torch.Tensor, tokens: int) -> None:
        """A checked step's summed NLL gap (a 0-d device tensor) over `tokens` rows; read at the window's end."""
        self._gaps.append(torch.stack([gap.float(), gap.new_tensor(float(tokens), dtype=torch.float32)]))  # [2]

    def after_decode(self, engine: ServingEngine | None = None) -> None:
        self._steps += 1
        if self._steps % self.config.window_steps or not self._gaps:
            return
        gap_sum, tokens = torch.stack(self._gaps).sum(0).tolist()    # one host read a window
        self._gaps.clear()
        self._gap_sum, self._gap_tokens = self._gap_sum + gap_sum, self._gap_tokens + tokens
        c = self.config
        dppl = math.expm1(self._gap_sum / max(self._gap_tokens, 1.0))
        error = (c.target_share * c.quality_bound - dppl) / c.quality_bound
        log_price = math.log(self.price) + c.step_size * min(max(error, -1.0), 1.0)
        self.price = min(max(math.exp(log_price), c.min_price), c.max_price)
        self._set(self.price)
        self.history.append({"step": self._steps, "dppl_checked": dppl, "price": self.price})

    def summary(self) -> dict:
        return {"final_price": self.price, "windows": self.history, "config": self.config.__dict__}
