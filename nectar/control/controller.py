"""The NECTAR controller: after every chunk, from what the chunk did and what it cost, set each
adaptive router's routing for the next chunk.

The controller talks to a router only through the priced interface (`nectar.control.priced`):
a price table per layer and chunk, the deviation of the routing in force, a step at a price and a
start at a price. It never asks which router family it drives.

Per chunk (apply-then-update, LaCT order):
1. quality: a paired shadow check on a random share of the chunk's sequences (static routing vs
   the routing that ran) moves the price of quality μ (dual ascent on the budget) and the relative
   sensitivity κ of the current domain (`quality_guard`); once the sensitivity is known, the price
   is set feed-forward instead: the λ at which the layers' price tables, built once on this
   chunk's gate logits, show the deviation that spends the budget (`price_for_deviation`);
2. energy: the online cost model (RLS on the chunk's workload and telemetry window) updates the
   per-expert costs c (`cost_model`; `cost_learning` = "telemetry", "prior" to keep the FLOP prior,
   or "frozen" to stop learning after `frozen_after` chunks);
3. limits: temperature, power and memory pressure ν rise while a limit binds (`limits`);
4. each layer's router takes its step at λ = μ·κ / (1 + Σν) on the chunk's observed gate logits:
   NECTAR's router solves the convex chunk problem min Σ c·p + λ Σ KL(p ‖ q) over its second-slot
   candidates (one `BiasOptimizer` step, drop scale c/λ, optionally a step of its fast-weight
   network and α: `energy_pricing`); the adaptive-k router takes the threshold minimising
   cost + λ·KL on its table;
5. a pause is asked for only when a limit is still exceeded with the routing pressure spent.
One `ControlRecord` per chunk is returned for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from nectar.control.cost_model import OnlineCostModel
from nectar.control.limits import LimitConfig, LimitGovernor
from nectar.control.observation import ChunkObservation
from nectar.control.priced import PricedRouter, PriceStep, StepConfig, price_for_deviation, price_grid
from nectar.control.quality_guard import DEFAULT_START_PRICE, GuardConfig, GuardVerdict, QualityCheck, QualityGuard
from nectar.telemetry.window import TelemetryWindow

COST_LEARNING = ("telemetry", "prior", "frozen")
ShadowCheck = Callable[[torch.Tensor], QualityCheck]   # rows of the chunk [r] -> paired check


@dataclass
class ControllerConfig:
    lr: float = 1.0
    momentum: float = 0.5
    optimizer_mode: str = "dual"       # "dual" (KKT primal + dual ascent) or "gradient"
    cost_learning: str = "telemetry"
    frozen_after: int = 8
    shadow_share: float = 1 / 64       # share of the stream's sequences re-run under static routing
    shadow_backoff: int = 8            # checks thin out up to this factor while they keep confirming the model
    shadow_agree: float = 1 / 3        # a check confirms it when |measured − predicted| < this × the target ΔNLL
    fast_lr: float = 0.5               # fast-weight router network: step size (relative), momentum, Muon
    fast_momentum: float = 0.5
    fast_muon: bool = True
    alpha_lr: float = 0.5
    alpha_min: float = 0.05
    seed: int = 0
    limits: LimitConfig = field(default_factory=LimitConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        if self.cost_learning not in COST_LEARNING:
            raise ValueError(f"cost_learning must be one of {COST_LEARNING}, got {self.cost_learning!r}")
        if not 0.0 < self.shadow_share <= 1.0:
            raise ValueError(f"shadow_share must be in (0, 1], got {self.shadow_share}")
        if self.shadow_backoff < 1:
            raise ValueError(f"shadow_backoff must be >= 1, got {self.shadow_backoff}")
        if not (self.shadow_agree > 0 and math.isfinite(self.shadow_agree)):
            raise ValueError(f"shadow_agree must be a finite number > 0, got {self.shadow_agree}")

    def step_config(self) -> StepConfig:
        """The settings a router's step at a price uses."""
        return StepConfig(lr=self.lr, momentum=self.momentum, mode=self.optimizer_mode, fast_lr=self.fast_lr,
                          fast_momentum=self.fast_momentum, fast_muon=self.fast_muon, alpha_lr=self.alpha_lr,
                          alpha_min=self.alpha_min)


@dataclass
class ControlRecord:
    """What the controller saw and decided after one chunk."""

    lam: float                         # λ the next chunk's bias was solved with
    price: float                       # quality price μ
    kappa: float                       # relative sensitivity κ
    nu_temp: float
    nu_power: float
    nu_mem: float
    alpha: float
    fallback: bool
    delta_nll: float | None            # the paired check's NLL increase per token (None: no check)
    deviation: float                   # mean KL of the routing that ran to static (second slot)
    cost_residual: float | None
    budget_W: float | None = None
    pause_s: float = 0.0
    skipped: str = ""                  # why the energy update was skipped ("" = updated)
    biases: list[list[float]] = field(default_factory=list)  # [L][E] after the update
    guard_energy_J: float = 0.0        # the quality check's cost (its share of the chunk window)
    guard_s: float = 0.0


class NectarController:
    """Drives one adaptive router per MoE layer from telemetry, costs, limits and the quality guard,
    through the priced interface only (`nectar.control.priced`)."""

    def __init__(self, routers: list[PricedRouter], config: ControllerConfig | None = None,
                 cost_layers: list[int] | None = None, cost_model: OnlineCostModel | None = None,
                 start_costs: list[torch.Tensor] | None = None):
        """`start_costs` ([E] per router, e.g. the FLOP prior): the first chunk already runs where
        the chunk problem puts these costs at the start price (None: the first chunk runs static)."""
        self.config = start_priced(config or ControllerConfig(), routers)
        self.routers = routers
        self.cost_model = cost_model                  # built from the first chunk's workload if None
        self.guard = QualityGuard(self.config.guard)
        self.limits = LimitGovernor(self.config.limits)
        # which cost-model layer each router belongs to (dense blocks are in the cost model too)
        self.cost_layers = cost_layers if cost_layers is not None else list(range(len(routers)))
        step_config = self.config.step_config()
        for router in routers:
            router.configure_pricing(step_config)
        self.lams = price_grid(*self.config.guard.price_range)     # [G] the price tables' grid
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.chunks = 0
        self.backoff = 1                 # current thinning of the shadow checks
        self._next_check = 0             # chunk index of the next check
        self._planned: torch.Tensor | None = None   # rows planned for the next chunk's check
        self.last_instance: dict | None = None  # first layer's last chunk problem, for analysis
        if start_costs is not None:
            self._start(start_costs)

    def _start(self, costs: list[torch.Tensor]) -> None:
        """Route the first chunk at the start price with the given costs (routers that need the
        chunk's logits to choose, as adaptive k does, stay static)."""
        if len(costs) != len(self.routers):
            raise ValueError(f"start_costs has {len(costs)} entries for {len(self.routers)} routers")
        for router, c in zip(self.routers, costs):
            router.start_at_price(c.double() / c.max().clamp_min(1e-12), self.lam)

    # ------------------------------------------------------------------------------ one chunk

    def after_chunk(self, observation: ChunkObservation, window: TelemetryWindow,
                    shadow: ShadowCheck | None = None) -> ControlRecord:
        """One control step after a chunk: its observation and telemetry window; `shadow(rows)`
        re-runs those rows of the chunk under static routing and returns the paired check."""
        deviation = self._deviation(observation)
        predicted = self.guard.predicted_delta(deviation)
        check = self._check(observation, shadow)
        if check is not None and check.window is not None:
            self.limits.observe_busy(check.window)
        verdict = self.guard.judge(check, deviation)
        self._schedule_next(observation, check, predicted)
        skipped, residual = self._learn_costs(observation, window)
        self.limits.update(window)
        costs = self._normalised_costs()
        target = self.guard.target_deviation()
        tables = [None] * len(self.routers)               # a router without a table builds what its step needs
        if target is not None and self.routers:
            tables = [router.price_table(seen.logits, c, self.lams)            # one table per layer and chunk
                      for router, seen, c in zip(self.routers, observation.layers, costs)]
            self.guard.set_price(price_for_deviation(tables, target) / self.guard.kappa)
        lam = self.lam
        for layer, (router, seen, c, table) in enumerate(zip(self.routers, observation.layers, costs, tables)):
            instance = router.adapt_at_price(PriceStep(lam, c, verdict.fallback, seen.logits, seen.inputs, table))
            if layer == 0:
                self.last_instance = instance
        self.chunks += 1
        return self._record(verdict, deviation, residual, skipped, window, check)

    @property
    def lam(self) -> float:
        """λ of the chunk problem: the price of quality, scaled by sensitivity, relieved by pressure."""
        return self.guard.price * self.guard.kappa / (1.0 + self.limits.pressure)

    def planned_check(self, rows: int) -> torch.Tensor | None:
        """Before a chunk of `rows` sequences: [r] the rows its quality check will re-run under
        static routing (None: no check is due), so that the caller can run them inside the chunk's
        own telemetry window; `after_chunk` then asks `shadow` for exactly these rows."""
        self._planned = self._pick_rows(rows)
        return self._planned

    def _pick_rows(self, rows: int) -> torch.Tensor | None:
        """`shadow_share` of the sequences: that many rows of a chunk when a chunk has enough rows,
        else one row every ⌈1 / (rows · share)⌉ chunks; thinned by the current backoff."""
        if rows == 0 or self.chunks < self._next_check:
            return None
        per_chunk = self.config.shadow_share * rows
        return torch.randperm(rows, generator=self.generator)[:max(1, round(per_chunk))].sort().values   # [r]

    def _check(self, observation: ChunkObservation, shadow: ShadowCheck | None) -> QualityCheck | None:
        """The chunk's paired check: the planned rows (`planned_check`), else rows picked now."""
        planned, self._planned = self._planned, None
        if shadow is None:
            return None
        picked = planned if planned is not None else self._pick_rows(observation.nll_rows.numel())
        return None if picked is None else shadow(picked)

    def _schedule_next(self, observation: ChunkObservation, check: QualityCheck | None, predicted: float) -> None:
        """After a check: while the measured increase agrees with the sensitivity model's prediction
        (within `shadow_agree` × the target) and no fallback is needed, checks thin out (×2, at most
        `shadow_backoff`); a surprise — a domain shift, a new limit — brings them back at once."""
        if check is None:
            return
        target = self.config.guard.target_delta_nll
        agrees = (math.isfinite(predicted) and abs(check.delta_nll - predicted) < self.config.shadow_agree * target
                  and not self.guard.fallback)
        self.backoff = min(self.config.shadow_backoff, 2 * self.backoff) if agrees else 1
        per_chunk = self.config.shadow_share * max(observation.nll_rows.numel(), 1)
        every = 1 if per_chunk >= 1 or not self.guard.measured else math.ceil(1 / per_chunk)
        # after a fallback verdict the next chunk runs static: check the first adapted chunk after it
        self._next_check = self.chunks + (2 if self.guard.fallback else every * self.backoff)

    def _deviation(self, observation: ChunkObservation) -> float:
        """Mean over layers of the deviation from static of the routing that ran."""
        values = [router.deviation(seen.logits) for router, seen in zip(self.routers, observation.layers)]
        return sum(values) / max(len(values), 1)

    def _learn_costs(self, observation: ChunkObservation, window: TelemetryWindow) -> tuple[str, float | None]:
        accounted = window.workload if window.workload is not None else observation.workload
        if self.cost_model is None:
            self.cost_model = OnlineCostModel([[c.flops for c in layer.expert_costs] for layer in accounted.layers])
        if not window.is_valid():
            return "invalid_telemetry", None
        mode = self.config.cost_learning
        if mode == "prior" or (mode == "frozen" and self.chunks >= self.config.frozen_after):
            return "", None
        update = self.cost_model.update(accounted, window)
        return "", None if update is None else update.rel_error

    def _normalised_costs(self) -> list[torch.Tensor]:
        costs = self.cost_model.expert_costs()
        out = []
        for layer, router in zip(self.cost_layers, self.routers):
            c = costs[layer][: router.num_experts].double()                    # [E] routed experts (shared ones follow)
            out.append(c / c.max().clamp_min(1e-12))
        return out

    def _record(self, verdict: GuardVerdict, deviation: float, residual: float | None, skipped: str,
                window: TelemetryWindow, check: QualityCheck | None) -> ControlRecord:
        guard_J, guard_s = (0.0, 0.0) if check is None else check.cost()
        return ControlRecord(
            lam=self.lam, price=self.guard.price, kappa=self.guard.kappa, nu_temp=self.limits.nu_temp,
            nu_power=self.limits.nu_power, nu_mem=self.limits.nu_mem, alpha=self.routers[0].alpha if self.routers else 1.0,
            fallback=verdict.fallback, delta_nll=None if math.isnan(verdict.delta_nll) else verdict.delta_nll,
            deviation=deviation, cost_residual=residual, budget_W=self.limits.budget_W(),
            pause_s=self.limits.pause_s(window, window.duration_s), skipped=skipped,
            biases=[r.state_vector() for r in self.routers],
            guard_energy_J=guard_J, guard_s=guard_s,
        )


def start_priced(config: ControllerConfig, routers: list) -> ControllerConfig:
    """`config` with the start price resolved: the given one, else the routers' family's
    START_PRICE (the highest of them: the most careful), else the guard's default."""
    if config.guard.price_init is not None:
        return config
    price = max((r.START_PRICE for r in routers), default=DEFAULT_START_PRICE)
    return replace(config, guard=replace(config.guard, price_init=price))

