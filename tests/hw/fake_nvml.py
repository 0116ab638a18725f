"""A scripted stand-in for `hw.nvml_api.NvmlApi`, driven by a controllable clock.

Power is piecewise constant (`set_power` at the current time), so the true energy between any two
times has a closed form. The counter behaves like NVML's: it reports the true energy (mJ,
integer) as of the last ~100 ms update tick. Faults are injected with small callables:
`counter_fault(t, value) -> value` and `power_fault(t, value) -> value`.
"""

from __future__ import annotations

import math
from typing import Callable


class FakeClock:
    """Seconds that only move when told to."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class FakeNvml:
    """Same methods as NvmlApi; every call is appended to `log`."""

    def __init__(self, clock: FakeClock, power_W: float = 100.0, *, counter_period_s: float = 0.1,
                 counter_offset_mJ: float = 0.0, unsupported: tuple[str, ...] = (), counter_cost_s: float = 0.0):
        self.clock = clock
        self.segments: list[tuple[float, float]] = [(clock(), power_W)]  # (from time, watts)
        self.counter_period_s = counter_period_s
        self.counter_offset_mJ = counter_offset_mJ
        self.counter_cost_s = counter_cost_s
        self.unsupported: set[str] = set(unsupported)
        self.power_is_average = False
        self.counter_fault: Callable[[float, float], float] | None = None
        self.power_fault: Callable[[float, float], float] | None = None
        self.gpu_temp = 40.0
        self.mem_temp = 45.0
        self.memory = (10 * 2**30, 80 * 2**30)
        self.sm_clock = 1980.0
        self.reasons = 0
        self.device_index = 0
        self.log: list[str] = []
        self.closed = False

    # ------------------------------------------------------------------ ground truth
    def set_power(self, watts: float) -> None:
        self.segments.append((self.clock(), watts))

    def power_at(self, t: float) -> float:
        return [w for start, w in self.segments if start <= t][-1]

    def true_energy_J(self, t0: float, t1: float) -> float:
        """Closed-form ∫ P dt over [t0, t1] for the piecewise-constant power."""
        total = 0.0
        bounds = [start for start, _ in self.segments[1:]] + [math.inf]
        for (start, watts), end in zip(self.segments, bounds):
            lo, hi = max(start, t0), min(end, t1)
            total += watts * max(0.0, hi - lo)
        return total

    # ------------------------------------------------------------------ adapter methods
    def total_energy_mJ(self) -> float | None:
        self.log.append("counter")
        t = self.clock()
        self.clock.advance(self.counter_cost_s)
        if "energy_counter" in self.unsupported:
            return None
        # not an assertion: 1e-9 of a period keeps a time that is a whole number of periods up to
        # rounding (t ÷ period) on its own tick rather than the one before
        tick = math.floor(t / self.counter_period_s + 1e-9) * self.counter_period_s
        value = self.counter_offset_mJ + math.floor(1000.0 * self.true_energy_J(self.segments[0][0], tick))
        return self.counter_fault(t, value) if self.counter_fault else value

    def power_instant_W(self) -> float | None:
        self.log.append("power")
        if "power_instant" in self.unsupported:
            self.power_is_average = True
        value = self.power_at(self.clock())
        return self.power_fault(self.clock(), value) if self.power_fault else value

    def power_and_mem_temp(self):
        """The adapter's one-query read of instant power and memory temperature."""
        self.log.append("fields")
        power = self.power_instant_W()
        return power, self.mem_temp_C()

    def _maybe(self, key: str, value):
        self.log.append(key)
        return None if key in self.unsupported else value

    def gpu_temp_C(self):
        return self._maybe("gpu_temp", self.gpu_temp)

    def mem_temp_C(self):
        return self._maybe("mem_temp", self.mem_temp)

    def memory_B(self):
        return self._maybe("memory", self.memory)

    def sm_clock_MHz(self):
        return self._maybe("sm_clock", self.sm_clock)

    def clock_event_reasons(self):
        return self._maybe("clock_events", self.reasons)

    def name(self) -> str:
        return "Fake H100"

    def driver_version(self):
        return "580.00"

    def nvml_version(self):
        return "13.580"

    def power_limit_W(self):
        return self._maybe("power_limit", 700.0)

    def slowdown_temp_C(self):
        return self._maybe("slowdown_temp", 89.0)

    def shutdown(self) -> None:
        self.closed = True
