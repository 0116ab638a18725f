"""The simulated GPU: a simpy process that executes priced chunks phase by phase.

At each phase start the GPU decides its clock (a locked clock caps it; then thermal slowdown with
hysteresis above the slowdown temperature, a forced slowdown fault, then the power limiter may
lower it further) and the phase's power;
it then holds that workload for the phase's duration (one simpy timeout). Temperature and energy
are not stepped numerically: each phase is a `thermal.Segment` with an exact solution, so the
sensor processes can read the true energy, power and temperature at any simulated instant.
Between pieces of work the last segment simply continues (no simulated time passes between two
`run_chunk` calls unless the backend idles the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import simpy

from sim import thermal
from sim.pricing import PricedChunk
from sim.power import PhasePlan, PowerModel
from sim.presets import GPUPreset

# NVML clocks-event (throttle) reason bits
REASON_GPU_IDLE = 0x1
REASON_APPLICATIONS_CLOCKS_SETTING = 0x2   # the locked clock holds the SM clock below the max
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_HW_THERMAL_SLOWDOWN = 0x40
REASON_HW_POWER_BRAKE = 0x80


@dataclass(frozen=True)
class GPUState:
    """True (noise-free) state of the simulated GPU at one instant."""

    time_s: float
    temperature_C: float
    clock_MHz: float
    power_W: float
    energy_J: float              # true cumulative energy since the simulation started
    throttle_reasons: int
    throttled_s: float           # cumulative time run below the allowed clock (the max, or the locked one)


@dataclass(frozen=True)
class TraceSegment:
    """One closed constant-workload interval (recorded when the backend asks for a trace)."""

    name: str
    t_start_s: float
    t_end_s: float
    clock_MHz: float
    power_ref_W: float           # power at the leakage reference temperature
    temp_start_C: float
    temp_end_C: float
    energy_J: float              # true energy of the interval
    throttle_reasons: int


class SimGPU:
    def __init__(self, env: simpy.Environment, preset: GPUPreset, power: PowerModel,
                 model: thermal.ThermalModel, forced_throttle: Callable[[float], bool],
                 initial_temp_C: float, record_trace: bool = False,
                 heat: Callable[[float], float] | None = None):
        self.env, self.preset, self.power, self.base_model = env, preset, power, model
        self.heat = heat                 # extra ambient °C over time (a co-tenant, a datacentre step)
        self.forced_throttle = forced_throttle
        self.throttled_fraction = preset.throttled_clock_MHz / preset.max_clock_MHz
        self.trace: list[TraceSegment] | None = [] if record_trace else None
        self.throttled_s = 0.0
        self.lock_fraction = 1.0         # the locked clock ÷ the max clock (1: not locked)
        self._throttled = False          # the segment in progress runs below the allowed clock
        self.peak_power_W = 0.0          # highest true power since the last reset_peak()
        self._hot = False                # thermal slowdown latch (hysteresis)
        self._closed_at = (-1.0, 0.0, 0.0)  # (time, temperature, energy) of the last accounting
        self._start_segment("idle", power.idle_plan(0.0, 1.0), REASON_GPU_IDLE, initial_temp_C, 0.0)

    # ------------------------------------------------------------ exact readings
    def temperature_C(self) -> float:
        return thermal.temperature_at(self._segment, self.env.now)

    def energy_J(self) -> float:
        return thermal.energy_at(self._segment, self.env.now)

    def power_W(self) -> float:
        return self._segment.power_at_temp(self.temperature_C())

    @property
    def clock_MHz(self) -> float:
        return self._clock_fraction * self.preset.max_clock_MHz

    @property
    def throttle_reasons(self) -> int:
        return self._reasons

    @property
    def state(self) -> GPUState:
        throttled = self.throttled_s + (self.env.now - self._segment.t_start_s if self._throttled else 0.0)
        return GPUState(self.env.now, self.temperature_C(), self.clock_MHz, self.power_W(), self.energy_J(),
                        self._reasons, throttled)

    def lock_clock(self, clock_MHz: float | None) -> None:
        """Cap the SM clock at `clock_MHz` from the next phase on (None: the max clock again)."""
        if clock_MHz is None:
            self.lock_fraction = 1.0
            return
        lo, hi = self.preset.min_clock_MHz, self.preset.max_clock_MHz
        if not lo <= clock_MHz <= hi:
            raise ValueError(f"clock {clock_MHz:g} MHz is outside the simulated {self.preset.name}'s "
                             f"[{lo:g}, {hi:g}] MHz")
        self.lock_fraction = clock_MHz / hi

    def reset_peak(self) -> None:
        """Start a new peak: segments that run from now on raise it."""
        self.peak_power_W = 0.0

    # ------------------------------------------------------------ processes
    def run_chunk(self, priced: PricedChunk):
        """simpy process: run every phase of a priced chunk back to back."""
        for p, name in enumerate(priced.phase_names):
            temp_C, energy_J = self._close_segment()
            fraction, reasons = self._allowed_clock(temp_C)
            plan = self.power.plan(lambda s: self._phase_duration(priced, p, s), float(priced.compute_busy_s[p]),
                                   float(priced.memory_busy_s[p]), fraction, temp_C)
            if plan.duration_s <= 0:
                continue
            self._start_segment(name, plan, reasons | (REASON_SW_POWER_CAP if plan.power_capped else 0), temp_C, energy_J)
            yield self.env.timeout(plan.duration_s)
        self._rebase()

    def run_idle(self, seconds: float):
        """simpy process: no kernels for `seconds`."""
        temp_C, energy_J = self._close_segment()
        fraction, reasons = self._allowed_clock(temp_C)
        self._start_segment("idle", self.power.idle_plan(seconds, fraction), reasons | REASON_GPU_IDLE, temp_C, energy_J)
        yield self.env.timeout(seconds)
        self._rebase()

    # ------------------------------------------------------------ internals
    def _phase_duration(self, priced: PricedChunk, phase: int, fraction: float) -> float:
        """Memoised for the allowed clocks (max, locked, slowdown); computed afresh inside the limiter's search."""
        if fraction in (1.0, self.lock_fraction, self.throttled_fraction):
            return float(priced.durations_s(fraction)[phase])
        return priced.phase_duration_s(phase, fraction)

    def _allowed_clock(self, temp_C: float) -> tuple[float, int]:
        """Highest clock fraction allowed now, and the reasons behind it: the locked clock, then the
        slowdowns (which never raise a clock locked below the slowdown clock)."""
        if temp_C >= self.preset.slowdown_C:
            self._hot = True
        elif temp_C < self.preset.slowdown_C - self.preset.slowdown_hysteresis_C:
            self._hot = False
        fraction, reasons = self.lock_fraction, (REASON_APPLICATIONS_CLOCKS_SETTING if self.lock_fraction < 1 else 0)
        slow = min(fraction, self.throttled_fraction)
        if self._hot:
            fraction, reasons = slow, reasons | REASON_HW_SLOWDOWN | REASON_HW_THERMAL_SLOWDOWN
        if self.forced_throttle(self.env.now):
            fraction, reasons = slow, reasons | REASON_HW_SLOWDOWN | REASON_HW_POWER_BRAKE
        return fraction, reasons

    @property
    def model(self) -> thermal.ThermalModel:
        """The thermal model in force now: the base ambient plus the heat schedule's rise."""
        if self.heat is None:
            return self.base_model
        return replace(self.base_model, ambient_C=self.base_model.ambient_C + self.heat(self.env.now))

    def _start_segment(self, name: str, plan: PhasePlan, reasons: int, temp_C: float, energy_J: float) -> None:
        self._segment = thermal.segment(self.model, self.env.now, temp_C, energy_J, plan.power_ref_W,
                                        self.preset.leakage_W_per_C, self.preset.leakage_ref_C)
        self.peak_power_W = max(self.peak_power_W, self._segment.power_at_temp(temp_C))
        self._name, self._clock_fraction, self._reasons = name, plan.clock_fraction, reasons
        self._throttled = plan.clock_fraction < self.lock_fraction

    def _close_segment(self) -> tuple[float, float]:
        """Account the segment in progress up to now (trace, throttled time, peak power);
        return the temperature and cumulative energy now."""
        seg, now = self._segment, self.env.now
        if now <= seg.t_start_s:
            return seg.temp_start_C, seg.energy_start_J
        if self._closed_at[0] == now:  # already accounted (a zero-length phase was skipped)
            return self._closed_at[1], self._closed_at[2]
        temp_end, energy_end = thermal.temperature_at(seg, now), thermal.energy_at(seg, now)
        self._closed_at = (now, temp_end, energy_end)
        self.peak_power_W = max(self.peak_power_W, seg.power_at_temp(temp_end))
        if self._throttled:
            self.throttled_s += now - seg.t_start_s
        if self.trace is not None:
            self.trace.append(TraceSegment(self._name, seg.t_start_s, now, self.clock_MHz, seg.power_ref_W,
                                           seg.temp_start_C, temp_end, energy_end - seg.energy_start_J, self._reasons))
        return temp_end, energy_end

    def _rebase(self) -> None:
        """Close the segment in progress and let the same workload continue from now."""
        temp_C, energy_J = self._close_segment()
        seg = self._segment
        self._segment = thermal.segment(self.model, self.env.now, temp_C, energy_J, seg.power_ref_W,
                                        seg.leakage_W_per_C, seg.leakage_ref_C)
