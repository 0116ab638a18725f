"""An adaptive baseline that is not NECTAR: a PI controller that holds a target share of cheap
second slots by moving one cheap-expert bias (as DTop-p holds a sparsity target with top-p).

It adapts to keep a *compute* target, blind to measured energy and to quality; the frontier
reports it beside NECTAR. Under operating limits it is held by the pause governor, like the
non-adaptive policies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.limits import LimitConfig, LimitGovernor
from nectar.control.observation import ChunkObservation
from nectar.telemetry.window import TelemetryWindow


@dataclass
class ShareRecord:
    share: float          # measured share of tokens whose second slot went to a cheap expert
    bias: float           # cheap-expert bias for the next chunk
    pause_s: float = 0.0


class ShareController:
    """bias ← kp·e + ki·Σe with e = target − measured cheap share (per chunk, all layers)."""

    def __init__(self, routers: list[EnergyAwareRouter], target_share: float, kp: float = 4.0, ki: float = 2.0,
                 limits: LimitConfig | None = None):
        if not 0.0 <= target_share <= 1.0:
            raise ValueError(f"target_share must be in [0, 1], got {target_share}")
        self.routers, self.target, self.kp, self.ki = routers, target_share, kp, ki
        self.integral = 0.0
        self.limits = LimitGovernor(replace(limits or LimitConfig(), routing=False))

    def measured_share(self, observation: ChunkObservation) -> float:
        """Mean over MoE layers of (pairs computed by cheap experts) / tokens."""
        shares = []
        layers = [layer for layer in observation.workload.layers if len(layer.tokens_per_expert) > 1]
        for router, layer in zip(self.routers, layers):
            cheap = sum(layer.tokens_per_expert[i] for i in router.cheap_experts)
            shares.append(cheap / max(observation.workload.tokens, 1))
        return sum(shares) / max(len(shares), 1)

    def after_chunk(self, observation: ChunkObservation, window: TelemetryWindow) -> ShareRecord:
        share = self.measured_share(observation)
        error = self.target - share
        self.integral += error
        bias = self.kp * error + self.ki * self.integral
        for router in self.routers:
            values = router.bias.clone().zero_()
            values[router.cheap_experts] = bias
            router.adapt(bias=values)
        self.limits.update(window)
        return ShareRecord(share, bias, self.limits.pause_s(window, window.duration_s))
