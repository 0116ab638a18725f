"""The NECTAR controller: after every chunk, from what the chunk did and what it cost, set each
energy-aware router's bias for the next chunk.

Per chunk (apply-then-update, LaCT order):
1. quality: a paired shadow check on a random share of the chunk's sequences (static routing vs
   the routing that ran) moves the price of quality μ (dual ascent on the budget) and the relative
   sensitivity κ of the current domain (`quality_guard`); once the sensitivity is known, the price
   is set feed-forward instead: the λ whose chunk-problem solution on this chunk's gate logits has
   the deviation that spends the budget (bisection in log λ; `_feedforward_lam`);
2. energy: the online cost model (RLS on the chunk's workload and telemetry window) updates the
   per-expert costs c (`cost_model`; `cost_learning` = "telemetry", "prior" to keep the FLOP prior,
   or "frozen" to stop learning after `frozen_after` chunks);
3. limits: temperature, power and memory pressure ν rise while a limit binds (`limits`);
4. each layer's bias solves the convex chunk problem min Σ c·p + λ Σ KL(p ‖ q) at
   λ = μ·κ / (1 + Σν) — one step of `BiasOptimizer` on the chunk's observed gate logits, restricted
   to the second-slot candidates the router can actually choose (the static top-1 is forced); a
   router that may drop its remaining slot gets the drop scale c/λ, the same trade-off per token;
5. optionally the fast-weight router network and the mixing coefficient α take one gradient step
   on the same chunk objective for the same observed tokens (a step that scales with the gradient,
   so a near-zero gradient moves nothing);
6. a pause is asked for only when a limit is still exceeded with the routing pressure spent.
One `ControlRecord` per chunk is returned for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig, kkt_bias
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.limits import LimitConfig, LimitGovernor
from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.quality_guard import DEFAULT_START_PRICE, GuardConfig, GuardVerdict, QualityCheck, QualityGuard
from nectar.control.routing_proxy import allowed_distribution, deviation_kl
from nectar.hf.adaptive_k import AdaptiveKRouter
from nectar.hf.threshold import ThresholdObjective
from nectar.telemetry.energy import window_energy_J
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
    guard_energy_J: float = 0.0        # the quality check's own window
    guard_s: float = 0.0


class NectarController:
    """Drives one EnergyAwareRouter per MoE layer from telemetry, costs, limits and the quality guard."""

    def __init__(self, routers: list[EnergyAwareRouter], config: ControllerConfig | None = None,
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
        self.optimizers = [
            BiasOptimizer(r.num_experts, BiasOptimizerConfig(
                lam=self.config.guard.price_init, lr=self.config.lr, momentum=self.config.momentum,
                mode=self.config.optimizer_mode))
            for r in routers
        ]
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.chunks = 0
        self.backoff = 1                 # current thinning of the shadow checks
        self._next_check = 0             # chunk index of the next check
        self.last_instance: dict | None = None  # first layer's last chunk problem, for analysis
        if start_costs is not None:
            self._start(start_costs)

    def _start(self, costs: list[torch.Tensor]) -> None:
        """Route the first chunk at the start price with the given costs (routers that need the
        chunk's logits to choose, as adaptive k does, start static)."""
        if len(costs) != len(self.routers):
            raise ValueError(f"start_costs has {len(costs)} entries for {len(self.routers)} routers")
        for router, c in zip(self.routers, costs):
            if not isinstance(router, AdaptiveKRouter):
                router.adapt(**priced_adaptation(router, c.double() / c.max().clamp_min(1e-12), self.lam))

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
        tables = [router.price_table(seen.logits, c) if isinstance(router, AdaptiveKRouter) else None
                  for router, seen, c in zip(self.routers, observation.layers, costs)]   # adaptive k: once a chunk
        target = self.guard.target_deviation()
        if target is not None:
            self.guard.set_price(self._feedforward_lam(observation, costs, tables, target) / self.guard.kappa)
        lam = self.lam
        for layer, (opt, router, seen, c, table) in enumerate(
                zip(self.optimizers, self.routers, observation.layers, costs, tables)):
            self._step_layer(layer, opt, router, seen, c, lam, verdict, table)
        self.chunks += 1
        return self._record(verdict, deviation, residual, skipped, window, check)

    @property
    def lam(self) -> float:
        """λ of the chunk problem: the price of quality, scaled by sensitivity, relieved by pressure."""
        return self.guard.price * self.guard.kappa / (1.0 + self.limits.pressure)

    def _check(self, observation: ChunkObservation, shadow: ShadowCheck | None) -> QualityCheck | None:
        """Re-run `shadow_share` of the sequences: that many rows of a chunk when a chunk has enough
        rows, else one row every ⌈1 / (rows · share)⌉ chunks; thinned by the current backoff."""
        rows = observation.nll_rows.numel()
        if shadow is None or rows == 0 or self.chunks < self._next_check:
            return None
        per_chunk = self.config.shadow_share * rows
        picked = torch.randperm(rows, generator=self.generator)[:max(1, round(per_chunk))].sort().values   # [r]
        return shadow(picked)

    def _schedule_next(self, observation: ChunkObservation, check: QualityCheck | None, predicted: float) -> None:
        """After a check: while the measured increase agrees with the sensitivity model's prediction
        (within a third of the target) and no fallback is needed, checks thin out (×2, at most
        `shadow_backoff`); a surprise — a domain shift, a new limit — brings them back at once."""
        if check is None:
            return
        target = self.config.guard.target_delta_nll
        agrees = math.isfinite(predicted) and abs(check.delta_nll - predicted) < target / 3 and not self.guard.fallback
        self.backoff = min(self.config.shadow_backoff, 2 * self.backoff) if agrees else 1
        per_chunk = self.config.shadow_share * max(observation.nll_rows.numel(), 1)
        every = 1 if per_chunk >= 1 or not self.guard.measured else math.ceil(1 / per_chunk)
        # after a fallback verdict the next chunk runs static: check the first adapted chunk after it
        self._next_check = self.chunks + (2 if self.guard.fallback else every * self.backoff)

    def _deviation(self, observation: ChunkObservation) -> float:
        """Mean over layers of the KL (second-slot candidates) of the routing that ran to static."""
        values = [_router_deviation(router, seen.logits) for router, seen in zip(self.routers, observation.layers)]
        return sum(values) / max(len(values), 1)

    def _feedforward_lam(self, observation: ChunkObservation, costs: list[torch.Tensor], tables: list,
                         target: float) -> float:
        """The quality λ whose routing would have had mean deviation `target` on this chunk's gate
        logits (deviation falls as λ rises; bisection in log λ over the price range)."""
        curves = [self._deviation_curve(router, opt, seen, c, table) for router, opt, seen, c, table
                  in zip(self.routers, self.optimizers, observation.layers, costs, tables)]
        low, high = (math.log(v) for v in self.config.guard.price_range)
        for _ in range(24):
            mid = 0.5 * (low + high)
            if sum(curve(math.exp(mid)) for curve in curves) / max(len(curves), 1) > target:
                low = mid
            else:
                high = mid
        return math.exp(high)

    @staticmethod
    def _deviation_curve(router, opt: BiasOptimizer, seen: LayerObservation, c: torch.Tensor,
                         table: ThresholdObjective | None = None) -> Callable[[float], float]:
        """λ ↦ the deviation this layer's routing would have on the chunk's logits had it taken its
        step at λ. Adaptive k: read off its table of (cost, KL) per grid threshold (`table`, else
        computed here); NECTAR's router: put it at λ, measure, restore."""
        if isinstance(router, AdaptiveKRouter):
            table = table or router.price_table(seen.logits, c)
            return lambda lam: float(table.mean_kl[table.index_at(lam)])

        def at(lam: float) -> float:
            saved = router.adaptation()
            _apply_lam(router, opt, c, lam, fallback=False)
            value = _router_deviation(router, seen.logits)
            router.adapt(**_restorable(router, saved))
            return value

        return at

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

    def _step_layer(self, layer: int, opt: BiasOptimizer, router: EnergyAwareRouter, seen: LayerObservation,
                    c: torch.Tensor, lam: float, verdict: GuardVerdict, table: ThresholdObjective | None) -> None:
        """The layer's bias step on the chunk problem, then the fast net and α (if any); a pretrained
        model's adaptive-k router instead takes the threshold of its chunk table that minimises
        cost + λ·KL."""
        if isinstance(router, AdaptiveKRouter):
            router.adapt(threshold=table.threshold_at(lam), fallback=verdict.fallback)
            return
        opt.config.lam = lam
        q = allowed_distribution(router, seen.logits).double().cpu()         # [N, E] second-slot candidates
        opt.step(q, c)
        router.adapt(bias=opt.bias, fallback=verdict.fallback,
                     drop_scale=(c / lam).float() if router.drop else None)
        if router.fast_net is not None and seen.inputs.numel():
            self._step_fast(router, seen, c, lam)
        if layer == 0:
            self.last_instance = {"q": q.numpy(), "c": c.numpy(), "lam": lam, "bias_online": opt.bias.numpy(),
                                  "p_online": opt.routing_distribution(q).numpy()}

    def _step_fast(self, router: EnergyAwareRouter, seen: LayerObservation, c: torch.Tensor, lam: float) -> None:
        """One step of the fast-weight network and of α on the chunk objective of the observed tokens."""
        log_q = torch.log(allowed_distribution(router, seen.logits).float().clamp_min(1e-30))   # [N, E]
        cost = c.to(device=log_q.device, dtype=torch.float32)                                    # [E]
        bias = router.bias.to(log_q.device)
        alpha = torch.tensor(router.alpha, requires_grad=True)

        def chunk_loss(scores: torch.Tensor) -> torch.Tensor:
            log_p = torch.log_softmax(log_q + bias + alpha * scores, dim=-1)                   # [N, E]
            p = log_p.exp()
            return (p @ cost + lam * (p * (log_p - log_q)).sum(-1)).mean()

        router.fast_net.step(chunk_loss, lr=self.config.fast_lr, momentum=self.config.fast_momentum,
                             use_muon=self.config.fast_muon, inputs=seen.inputs.float())
        with torch.enable_grad():
            scores = router.fast_net(seen.inputs.float()).detach()
            (grad,) = torch.autograd.grad(chunk_loss(scores), alpha)
        step = -self.config.alpha_lr * float(grad)
        router.adapt(alpha=min(1.0, max(self.config.alpha_min, router.alpha + step)))

    def _record(self, verdict: GuardVerdict, deviation: float, residual: float | None, skipped: str,
                window: TelemetryWindow, check: QualityCheck | None) -> ControlRecord:
        guard_window = None if check is None else check.window
        return ControlRecord(
            lam=self.lam, price=self.guard.price, kappa=self.guard.kappa, nu_temp=self.limits.nu_temp,
            nu_power=self.limits.nu_power, nu_mem=self.limits.nu_mem, alpha=self.routers[0].alpha if self.routers else 1.0,
            fallback=verdict.fallback, delta_nll=None if math.isnan(verdict.delta_nll) else verdict.delta_nll,
            deviation=deviation, cost_residual=residual, budget_W=self.limits.budget_W(),
            pause_s=self.limits.pause_s(window, window.duration_s), skipped=skipped,
            biases=[r.bias.tolist() if hasattr(r, "bias") else [r.threshold] for r in self.routers],
            guard_energy_J=0.0 if guard_window is None else window_energy_J(guard_window),
            guard_s=0.0 if guard_window is None else guard_window.duration_s,
        )


def start_priced(config: ControllerConfig, routers: list) -> ControllerConfig:
    """`config` with the start price resolved: the given one, else the routers' family's
    START_PRICE (the highest of them: the most careful), else the guard's default."""
    if config.guard.price_init is not None:
        return config
    price = max((getattr(r, "START_PRICE", DEFAULT_START_PRICE) for r in routers), default=DEFAULT_START_PRICE)
    return replace(config, guard=replace(config.guard, price_init=price))


def _router_deviation(router, logits: torch.Tensor) -> float:
    """KL deviation of the routing in force from static (0 while the router is in fallback)."""
    if router.fallback:
        return 0.0
    return router.deviation(logits) if isinstance(router, AdaptiveKRouter) else deviation_kl(router, logits)


def priced_adaptation(router: EnergyAwareRouter, c: torch.Tensor, lam: float, mu=None, nu: float = 0.0) -> dict:
    """adapt(...) keywords that put NECTAR's router where the chunk problem at price λ puts it:
    the KKT bias −(c + μ + νc)/λ and, for a router that may drop, the drop scale c/λ."""
    return {"bias": kkt_bias(c, lam, mu, nu).float(), "drop_scale": (c / lam).float() if router.drop else None}


def _apply_lam(router: EnergyAwareRouter, opt: BiasOptimizer, c: torch.Tensor, lam: float, fallback: bool) -> None:
    """Put NECTAR's router where the chunk problem at λ puts it: the KKT bias (with the optimizer's
    current constraint multipliers) and drop scale c/λ."""
    router.adapt(**priced_adaptation(router, c, lam, opt.mu, opt.nu), fallback=fallback)


def _restorable(router: EnergyAwareRouter, saved) -> dict:
    """adapt(...) keywords that put NECTAR's router back to a saved adaptation record."""
    return {"bias": saved.bias, "alpha": saved.alpha, "fallback": saved.fallback,
            "drop_scale": saved.drop_scale if router.drop else None}
