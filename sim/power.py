"""Power model: idle + dynamic (utilisation, clock) + leakage rising with temperature, and the power
limit the GPU enforces by lowering its clock.

For a phase run at clock fraction s = f / f_max, with per-kernel compute times c_i (at max clock)
and memory times m_i:

    duration        t(s) = Σ_i max(c_i / s, m_i) + launch overhead
    dynamic energy  E(s) = P_compute · v(s)² · Σ c_i + P_memory · (1 − q + q · s · v(s)²) · Σ m_i
    power           P(s, T) = P_idle + E(s)/t(s) + k_leak·(T − T_ref)

i.e. computing SMs draw P_compute · s · v(s)² (CMOS dynamic power, C·V²·f, normalised to the max
clock) for c_i/s: a fixed number of cycles, so energy per FLOP ∝ v². While data streams (m_i)
HBM and the memory path draw P_memory at the max clock, of which the share q
(memory_power_sm_fraction: L2, load/store units, the SM clock tree) is on the SM clock and scales
as s · v(s)² over a time the clock does not change; the rest (the HBM stacks) does not scale.
v(s) = V(f)/V(f_max) is the voltage–frequency curve: a floor voltage up to the knee clock, then
linear up to the max clock's voltage,

    v(s) = v_floor                                              for f ≤ f_knee
    v(s) = v_floor + (1 − v_floor) · (f − f_knee) / (f_max − f_knee)   for f > f_knee

(preset fields voltage_floor_fraction and voltage_knee_MHz). Above the knee a lower clock costs
less energy per FLOP (v² falls); below it only the time grows, so the idle floor and leakage make
the energy per token rise again: the energy-optimal clock lies near the knee for compute-bound
work, and memory-bound work saves down to where its compute stops hiding behind the memory time
(docs/design.md, clocks). Idle power and leakage do not
depend on the clock. The power limiter trades speed for power: when P(s_max, T) exceeds the limit
it picks the s with P(s, T) = limit (scipy's brentq; P rises monotonically with s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from scipy.optimize import brentq

from sim.presets import GPUPreset


def voltage_fraction(clock_fraction: float, preset: GPUPreset) -> float:
    """v(s) = V(f)/V(f_max) at clock fraction s = f/f_max (module docstring)."""
    knee = preset.voltage_knee_MHz / preset.max_clock_MHz
    floor = preset.voltage_floor_fraction
    if clock_fraction <= knee:
        return floor
    return floor + (1.0 - floor) * (clock_fraction - knee) / (1.0 - knee)


def sm_power_W(clock_fraction: float, preset: GPUPreset) -> float:
    """Dynamic power of fully busy SMs at clock fraction s: P_compute · s · v(s)²."""
    return preset.compute_power_W * clock_fraction * voltage_fraction(clock_fraction, preset) ** 2


def memory_power_W(clock_fraction: float, preset: GPUPreset) -> float:
    """Power of the memory path while data streams: P_memory · (1 − q + q · s · v(s)²)."""
    q = preset.memory_power_sm_fraction
    scaled = clock_fraction * voltage_fraction(clock_fraction, preset) ** 2
    return preset.memory_power_W * (1.0 - q + q * scaled)


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
        """SMs computing compute_busy_s / s at sm_power_W(s); the memory path busy memory_busy_s at
        memory_power_W(s)."""
        p = self.preset
        return p.compute_power_W * voltage_fraction(s, p) ** 2 * compute_busy_s + memory_power_W(s, p) * memory_busy_s

    def _power_ref(self, duration_s: float, compute_busy_s: float, memory_busy_s: float, s: float) -> float:
        if duration_s <= 0:
            return self.preset.idle_power_W
        return self.preset.idle_power_W + self._dynamic_J(compute_busy_s, memory_busy_s, s) / duration_s

    def plan(self, duration_at: Callable[[float], float], compute_busy_s: float, memory_busy_s: float,
             max_fraction: float, temp_C: float) -> PhasePlan:
        """Plan a phase whose kernels keep the SMs busy `compute_busy_s` (at max clock) and HBM
        `memory_busy_s`, and which lasts `duration_at(s)` at clock fraction s.

        `max_fraction` is the highest clock fraction allowed now (1, a locked clock, or the slowdown
        clock); the power limiter lowers it further when the phase would draw more than the limit.
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
