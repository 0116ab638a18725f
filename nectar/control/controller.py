"""The NECTAR controller: the "meta" part that decides, per chunk, whether and how strongly the
energy-aware routers adapt, from telemetry and the quality guard.

Per chunk (after the chunk ran):
1. the online cost model takes the chunk's workload and measured energy window;
2. temperature and power pressure are dual variables: ν_T grows while the GPU temperature is
   within `temp_margin_C` of the cap (or the slowdown threshold), ν_P while mean power exceeds
   the budget; the effective quality weight is λ_eff = λ_q / (1 + ν_T + ν_P), so adaptation gets
   stronger as headroom shrinks, and relaxes when it comes back. λ_q starts at λ and, with a
   `quality_target`, follows the guard: log λ_q moves down while the guard's perplexity excess is
   below target × bound and up while above (dual ascent on the quality constraint), so NECTAR
   spends the quality budget it is given on energy, and no more;
3. memory pressure above a threshold, or an untrustworthy telemetry window, skips the update;
4. each layer's bias takes one optimizer step (`BiasOptimizer`) on the convex chunk problem with
   the cost model's per-expert costs (normalised by the layer's most expensive expert);
   A router with a fast-weight network (LaCT machinery) also takes one step on it: the gradient of
   the same chunk objective with respect to the network's parameters, heavy-ball momentum, Muon on
   the matrices, row norms restored. (At the bias's optimum of the unconstrained problem this
   gradient vanishes: the network can only add token-dependent corrections the bias cannot.)
5. the quality guard scores the new candidate routing on held-out tokens and sets fallback/α;
6. if the temperature is still above the cap with the routing already at its cheapest, the
   controller asks for an idle pause (duty cycling), the last resort that costs throughput, not
   quality.
One `ControlRecord` per chunk is returned for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.quality_guard import GuardCheck, GuardVerdict, QualityGuard
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import TelemetryWindow


@dataclass
class ControllerConfig:
    lam: float = 0.3                   # quality weight λ (per unit of normalised expert cost per nat)
    lr: float = 0.5
    momentum: float = 0.5
    optimizer_mode: str = "dual"       # "dual" (KKT primal + dual ascent) or "gradient"
    temp_cap_C: float | None = None    # hold the GPU below this temperature
    slowdown_C: float = 89.0           # always keep away from the slowdown threshold
    temp_margin_C: float = 2.0
    power_budget_W: float | None = None
    dual_lr: float = 0.5
    max_pressure: float = 50.0
    mem_pressure_skip: float = 0.95
    allow_pause: bool = True
    fast_lr: float = 0.05              # fast-weight router network: step size, momentum, Muon
    fast_momentum: float = 0.9
    fast_muon: bool = True
    quality_target: float | None = 0.7  # aim the guard's excess at this share of its bound (None: fixed λ)
    quality_lr: float = 0.5            # step of log λ_q per chunk, per unit of relative excess error
    lam_range: tuple[float, float] = (0.02, 20.0)

    def __post_init__(self):
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lambda must be a finite number > 0, got {self.lam}")
        if self.temp_cap_C is not None and not 20.0 <= self.temp_cap_C <= 100.0:
            raise ValueError(f"temp cap must be in [20, 100] °C, got {self.temp_cap_C}")
        if self.power_budget_W is not None and not 10.0 <= self.power_budget_W <= 2000.0:
            raise ValueError(f"power budget must be in [10, 2000] W, got {self.power_budget_W}")
        if self.temp_margin_C <= 0 or self.dual_lr <= 0:
            raise ValueError("temp_margin_C and dual_lr must be > 0")
        if self.quality_target is not None and not 0 < self.quality_target < 1:
            raise ValueError(f"quality_target must be in (0, 1) or None, got {self.quality_target}")


@dataclass
class ControlRecord:
    """What the controller saw and decided after one chunk."""

    lam_eff: float
    nu_temp: float
    nu_power: float
    alpha: float
    fallback: bool
    guard_excess: float | None
    cost_residual: float | None
    pause_s: float = 0.0
    skipped: str = ""                  # why the update was skipped ("" = updated)
    biases: list[list[float]] = field(default_factory=list)  # [L][E] after the update
    guard_energy_J: float = 0.0        # the quality check's own window
    guard_s: float = 0.0


class NectarController:
    """Drives one EnergyAwareRouter per MoE layer from telemetry, costs and the guard."""

    def __init__(
        self,
        routers: list[EnergyAwareRouter],
        cost_model: OnlineCostModel,
        guard: QualityGuard,
        config: ControllerConfig | None = None,
        cost_layers: list[int] | None = None,
    ):
        self.config = config or ControllerConfig()
        self.routers = routers
        self.cost_model = cost_model
        self.guard = guard
        # which cost-model layer each router belongs to (dense blocks are in the cost model too)
        self.cost_layers = cost_layers if cost_layers is not None else list(range(len(routers)))
        self.optimizers = [
            BiasOptimizer(r.num_experts, BiasOptimizerConfig(
                lam=self.config.lam, lr=self.config.lr, momentum=self.config.momentum,
                mode=self.config.optimizer_mode))
            for r in routers
        ]
        self.nu_temp = 0.0
        self.nu_power = 0.0
        self.lam_quality = self.config.lam
        self.last_instance: dict | None = None  # first layer's last chunk problem, for analysis

    def _temperature_limit(self) -> float:
        cap = self.config.slowdown_C - self.config.temp_margin_C
        return cap if self.config.temp_cap_C is None else min(cap, self.config.temp_cap_C)

    def _update_pressure(self, window: TelemetryWindow) -> None:
        cfg = self.config
        limit = self._temperature_limit()
        temp_signal = (window.gpu_temp_C - (limit - cfg.temp_margin_C)) / cfg.temp_margin_C
        self.nu_temp = min(cfg.max_pressure, max(0.0, self.nu_temp + cfg.dual_lr * temp_signal))
        if cfg.power_budget_W is not None:
            power_signal = (window.mean_power_W - cfg.power_budget_W) / (0.1 * cfg.power_budget_W)
            self.nu_power = min(cfg.max_pressure, max(0.0, self.nu_power + cfg.dual_lr * power_signal))

    @property
    def lam_eff(self) -> float:
        return self.lam_quality / (1.0 + self.nu_temp + self.nu_power)

    def _update_quality_weight(self, excess: float) -> None:
        """Dual ascent on the quality constraint, in log λ (λ is a scale parameter)."""
        cfg = self.config
        if cfg.quality_target is None or not math.isfinite(excess):
            if not math.isfinite(excess):
                self.lam_quality = min(cfg.lam_range[1], self.lam_quality * 2)
            return
        bound = self.guard.config.max_ppl_increase
        error = (excess - cfg.quality_target * bound) / bound
        step = math.exp(cfg.quality_lr * max(-1.0, min(2.0, error)))
        self.lam_quality = min(cfg.lam_range[1], max(cfg.lam_range[0], self.lam_quality * step))

    def _normalised_costs(self) -> list[torch.Tensor]:
        costs = self.cost_model.expert_costs()
        out = []
        for layer in self.cost_layers:
            c = costs[layer].double()                                          # [E]
            out.append(c / c.max().clamp_min(1e-12))
        return out

    def _skip_reason(self, window: TelemetryWindow) -> str:
        if not window.is_valid():
            return "invalid_telemetry"
        pressure = window.memory_pressure
        if pressure is not None and pressure > self.config.mem_pressure_skip:
            return "memory_pressure"
        return ""

    def after_chunk(self, observation: ChunkObservation, window: TelemetryWindow,
                    guard_check: Callable[[], GuardCheck]) -> ControlRecord:
        """One control step after a chunk: its observation (workload, per-layer gate logits and
        inputs) and telemetry window; `guard_check()` scores a quality check under the routers'
        adapted candidate and returns it with the check's own window."""
        skipped = self._skip_reason(window)
        residual = None
        if not skipped:
            accounted = window.workload if window.workload is not None else observation.workload
            update = self.cost_model.update(accounted, window)
            residual = None if update is None else update.rel_error
            self._update_pressure(window)
            for layer, (opt, router, seen, c) in enumerate(
                    zip(self.optimizers, self.routers, observation.layers, self._normalised_costs())):
                self._step_layer(layer, opt, router, seen, c)
        check, verdict = self._judge(guard_check)
        if not skipped:
            self._update_quality_weight(verdict.excess)
        guard_window = check.window
        return ControlRecord(
            lam_eff=self.lam_eff, nu_temp=self.nu_temp, nu_power=self.nu_power,
            alpha=self.guard.alpha, fallback=self.guard.fallback, guard_excess=verdict.excess,
            cost_residual=residual, pause_s=self._pause(window), skipped=skipped,
            biases=[r.bias.tolist() for r in self.routers],
            guard_energy_J=0.0 if guard_window is None else window_energy_J(guard_window),
            guard_s=0.0 if guard_window is None else guard_window.duration_s,
        )

    def _step_layer(self, layer: int, opt: BiasOptimizer, router: EnergyAwareRouter, seen: LayerObservation,
                    c: torch.Tensor) -> None:
        """The layer's bias step on the chunk problem, then its fast-weight step (if any)."""
        opt.config.lam = self.lam_eff
        q = torch.softmax(seen.logits.double() / router.temperature, dim=-1).cpu()  # [N, E]
        opt.step(q, c)
        router.adapt(bias=opt.bias)
        self._step_fast_net(router, seen, c)
        if layer == 0:
            self.last_instance = {"q": q.numpy(), "c": c.numpy(), "lam": self.lam_eff,
                                  "bias_online": opt.bias.numpy(),
                                  "p_online": opt.routing_distribution(q).numpy()}

    def _step_fast_net(self, router: EnergyAwareRouter, seen: LayerObservation, c: torch.Tensor) -> None:
        """One fast-weight step on the chunk objective for the observed tokens of the chunk."""
        if router.fast_net is None or seen.inputs.numel() == 0:
            return
        logits = seen.logits.float()                                                 # [N, E]
        log_q = torch.log_softmax(logits / router.temperature, dim=-1)               # [N, E]
        cost = c.to(device=logits.device, dtype=torch.float32)                       # [E]
        bias = router.bias.to(logits.device)
        lam, alpha = self.lam_eff, router.alpha

        def chunk_loss(scores: torch.Tensor) -> torch.Tensor:
            log_p = torch.log_softmax(log_q + alpha * (bias + scores), dim=-1)  # [N, E]
            p = log_p.exp()
            return (p @ cost + lam * (p * (log_p - log_q)).sum(-1)).mean()

        router.fast_net.step(chunk_loss, lr=self.config.fast_lr, momentum=self.config.fast_momentum,
                             use_muon=self.config.fast_muon, inputs=seen.inputs.float())

    def _judge(self, guard_check: Callable[[], GuardCheck]) -> tuple[GuardCheck, GuardVerdict]:
        for router in self.routers:          # score the adapted candidate, not the fallback
            router.adapt(alpha=self.guard.alpha, fallback=False)
        check = guard_check()
        verdict = self.guard.judge(check.candidate_nll, check.static_nll)
        for router in self.routers:
            router.adapt(alpha=verdict.alpha, fallback=verdict.fallback)
        return check, verdict

    def _pause(self, window: TelemetryWindow) -> float:
        """Idle time to insert before the next chunk when routing alone cannot hold the cap."""
        cfg = self.config
        if not cfg.allow_pause or not window.is_valid():
            return 0.0
        # act half a margin below the limit, so that integer sensor readings settle under it
        over_temp = window.gpu_temp_C - (self._temperature_limit() - 0.5 * cfg.temp_margin_C)
        over_power = 0.0 if cfg.power_budget_W is None else window.mean_power_W / cfg.power_budget_W - 1.0
        saturated = self.nu_temp + self.nu_power >= 0.5 * cfg.max_pressure
        if not saturated or (over_temp <= 0 and over_power <= 0):
            return 0.0
        fraction = max(over_temp / cfg.temp_margin_C, over_power * 10.0, 0.0)
        return window.duration_s * min(1.0, fraction)
