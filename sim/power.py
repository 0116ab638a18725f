"""Power model: idle + dynamic (utilisation, clock) + leakage rising with temperature, and the power
limit the GPU enforces by lowering its clock.

For a phase run at clock fraction s (of the max clock), with per-kernel compute times c_i (at max
clock) and memory times m_i:

    duration        t(s) = Σ_i max(c_i / s, m_i) + launch overhead
    dynamic energy  E(s) = P_compute · s^(α−1) · Σ c_i + P_memory · Σ m_i
    power           P(s, T) = P_idle + E(s)/t(s) + k_leak·(T − T_ref)

i.e. the SMs draw P_compute·s^α while busy (busy for c_i/s) and HBM draws P_memory while
streaming. Lower clocks cost less energy per FLOP (voltage follows frequency), which is why the
power limiter can trade speed for power: when P(s_max, T) exceeds the limit it picks the s with
P(s, T) = limit (scipy's brentq; P rises monotonically with s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scipy.optimize import brentq

from sim.presets import GPUPreset


@dataclass(frozen=True)
class PhasePlan:
    """How one phase runs: its duration, clock and power at the leakage reference temperature."""

    duration_s: float
    clock_fraction: float
    power_ref_W: float       # idle + dynamic; add leakage_W_per_C·(T − leakage_ref_C) for P(T)
    power_capped: bool


class PowerModel:
    def __init__(self, preset: GPUPreset, power_limit_W: float | None = None):
        self.preset = preset
        self.power_limit_W = preset.power_limit_W if power_limit_W is None else power_limit_W
        if not self.power_limit_W > preset.idle_power_W:
            raise ValueError(f"power limit {self.power_limit_W} W must exceed the idle power {preset.idle_power_W} W")
        self.min_fraction = preset.min_clock_MHz / preset.max_clock_MHz

    def leakage_W(self, temp_C: float) -> float:
        return self.preset.leakage_W_per_C * (temp_C - self.preset.leakage_ref_C)

    def idle_plan(self, seconds: float, clock_fraction: float) -> PhasePlan:
        return PhasePlan(seconds, clock_fraction, self.preset.idle_power_W, False)

    def _dynamic_J(self, compute_busy_s: float, memory_busy_s: float, s: float) -> float:
        p = self.preset
        return p.compute_power_W * s ** (p.clock_power_exponent - 1.0) * compute_busy_s + p.memory_power_W * memory_busy_s

    def _power_ref(self, duration_s: float, compute_busy_s: float, memory_busy_s: float, s: float) -> float:
        if duration_s <= 0:
            return self.preset.idle_power_W
        return self.preset.idle_power_W + self._dynamic_J(compute_busy_s, memory_busy_s, s) / duration_s

    def plan(self, duration_at: Callable[[float], float], compute_busy_s: float, memory_busy_s: float,
             max_fraction: float, temp_C: float) -> PhasePlan:
        """Plan a phase whose kernels keep the SMs busy `compute_busy_s` (at max clock) and HBM
        `memory_busy_s`, and which lasts `duration_at(s)` at clock fraction s.

        `max_fraction` is the highest clock fraction allowed now (1, or the slowdown clock); the
        power limiter lowers it further when the phase would draw more than the limit.
        """
        duration = duration_at(max_fraction)
        power_ref = self._power_ref(duration, compute_busy_s, memory_busy_s, max_fraction)
        leak = self.leakage_W(temp_C)
        if power_ref + leak <= self.power_limit_W:
            return PhasePlan(duration, max_fraction, power_ref, False)

        def excess_W(s: float) -> float:
            return self._power_ref(duration_at(s), compute_busy_s, memory_busy_s, s) + leak - self.power_limit_W

        low = min(self.min_fraction, max_fraction)
        s = low if excess_W(low) >= 0 else brentq(excess_W, low, max_fraction, xtol=1e-9, rtol=1e-12)
        duration = duration_at(s)
        return PhasePlan(duration, s, self._power_ref(duration, compute_busy_s, memory_busy_s, s), True)
