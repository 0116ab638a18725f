"""Operating limits: a temperature cap, a power budget (possibly changing over time) and memory
pressure, turned into pressure on the routing first and into idle pauses last.

Each limit keeps a dual variable ν ≥ 0 that rises while its reading is over (or, for temperature,
near) the limit and decays when there is headroom; the controller divides its quality price by
1 + Σν, so routing gets cheaper exactly while a limit binds. The temperature term also looks ahead
one chunk from the last two readings, so that routing starts to act before the sensor crosses the
cap. When the pressure is saturated and a reading is still over its limit, `pause_s` asks for idle
time before the next chunk (duty cycling: it costs throughput, not quality). The same governor,
with routing pressure switched off, holds the limits for non-adaptive policies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nectar.control.schedule import Schedule
from nectar.telemetry.window import TelemetryWindow


@dataclass
class LimitConfig:
    temp_cap_C: float | None = None      # hold the GPU below this temperature
    slowdown_C: float = 89.0             # always keep away from the slowdown threshold
    temp_margin_C: float = 2.0           # start pushing this far below the cap
    power_budget: Schedule | None = None  # W over the policy's own time (its chunks, checks and pauses)
    power_margin: float = 0.02           # aim this share below the budget
    mem_target: float | None = 0.90      # memory pressure above this pushes routing cheaper
    dual_lr: float = 0.5
    max_pressure: float = 50.0
    allow_pause: bool = True
    routing: bool = True                 # False: only pauses hold the limits (a non-adaptive policy)

    def __post_init__(self):
        if self.temp_cap_C is not None and not 20.0 <= self.temp_cap_C <= 100.0:
            raise ValueError(f"temp cap must be in [20, 100] °C, got {self.temp_cap_C}")
        if self.temp_margin_C <= 0 or self.dual_lr <= 0:
            raise ValueError("temp_margin_C and dual_lr must be > 0")
        if self.power_budget is not None and not all(10.0 <= w <= 2000.0 for w in self.power_budget.values()):
            raise ValueError(f"power budget must be in [10, 2000] W, got {self.power_budget.values()}")
        if self.mem_target is not None and not 0.0 < self.mem_target < 1.0:
            raise ValueError(f"mem_target must be in (0, 1), got {self.mem_target}")

    @property
    def temp_limit_C(self) -> float:
        cap = self.slowdown_C - self.temp_margin_C
        return cap if self.temp_cap_C is None else min(cap, self.temp_cap_C)


class LimitGovernor:
    """Pressure (ν_T, ν_P, ν_M) from telemetry windows, and the idle pause that backs it up."""

    def __init__(self, config: LimitConfig | None = None):
        self.config = config or LimitConfig()
        self.nu_temp = self.nu_power = self.nu_mem = 0.0
        self.elapsed_s = 0.0                 # the policy's own time: its busy and idle windows so far
        self._last_temp: tuple[float, float] | None = None   # (time, temperature) of the last window
        self.idle_W: float | None = None                       # learned from pause windows

    @property
    def pressure(self) -> float:
        """Σν: the controller divides its quality price by 1 + pressure (0 without routing pressure)."""
        if not self.config.routing:
            return 0.0
        return self.nu_temp + self.nu_power + self.nu_mem

    def budget_W(self) -> float | None:
        """The power budget in force now, at the end of the policy's last window (None: no budget).
        The schedule runs on the policy's own time, so that policies interleaved on one GPU each
        see the whole schedule."""
        if self.config.power_budget is None:
            return None
        return self.config.power_budget.at(self.elapsed_s)

    def observe_busy(self, window: TelemetryWindow) -> None:
        """Count a window of the policy's that is not a chunk (a quality check) in its own time."""
        self._advance(window)

    def _advance(self, window: TelemetryWindow) -> None:
        """The policy's own clock moves by the window's duration (a non-finite one counts 0)."""
        if math.isfinite(window.duration_s):
            self.elapsed_s += max(0.0, window.duration_s)

    def update(self, window: TelemetryWindow, work_window: TelemetryWindow | None = None) -> None:
        """One dual step from the chunk's window (and the time the GPU was busy with it)."""
        cfg = self.config
        self._advance(window)
        if not window.is_valid():
            return
        self.nu_temp = self._step(self.nu_temp, self._temp_signal(window))
        budget = self.budget_W()
        if budget is not None:
            self.nu_power = self._step(self.nu_power, (window.mean_power_W - budget * (1 - cfg.power_margin))
                                       / (0.05 * budget))
        else:
            self.nu_power = 0.0
        pressure = window.memory_pressure
        if cfg.mem_target is not None and pressure is not None:
            self.nu_mem = self._step(self.nu_mem, (pressure - cfg.mem_target) / (1 - cfg.mem_target))

    def _temp_signal(self, window: TelemetryWindow) -> float:
        """How far the predicted next-chunk temperature is above (limit − margin), in margins."""
        cfg = self.config
        temp, now = window.gpu_temp_C, window.t_end_s
        predicted = temp
        if self._last_temp is not None and now > self._last_temp[0]:
            slope = (temp - self._last_temp[1]) / (now - self._last_temp[0])
            predicted = temp + max(0.0, slope) * window.duration_s
        self._last_temp = (now, temp)
        return (predicted - (cfg.temp_limit_C - cfg.temp_margin_C)) / cfg.temp_margin_C

    def _step(self, nu: float, signal: float) -> float:
        return min(self.config.max_pressure, max(0.0, nu + self.config.dual_lr * signal))

    def observe_idle(self, window: TelemetryWindow) -> None:
        """Learn the idle power from a pause's window (it prices the next pauses)."""
        self._advance(window)
        if window.is_valid() and window.duration_s > 0:
            self.idle_W = window.mean_power_W if self.idle_W is None else 0.5 * (self.idle_W + window.mean_power_W)

    def pause_s(self, window: TelemetryWindow, busy_s: float) -> float:
        """Idle time to insert before the next chunk; `busy_s` is how long the chunk kept the GPU busy.

        Power budget (a hard limit): pause p so that (P·busy + P_idle·p)/(busy + p) ≤ budget·(1 − margin).
        Temperature (routing first): pause only while the reading is over the cap's half-margin line
        and the routing pressure is already strong (or routing is not allowed to act)."""
        cfg = self.config
        if not cfg.allow_pause or not window.is_valid():
            return 0.0
        power_share = 0.0
        budget = self.budget_W()
        if budget is not None:
            target = budget * (1 - cfg.power_margin)
            idle_W = self.idle_W if self.idle_W is not None else 0.2 * window.mean_power_W
            if window.mean_power_W > target:
                power_share = (window.mean_power_W - target) / max(target - idle_W, 1e-6)
        over_temp = (window.gpu_temp_C - (cfg.temp_limit_C - 0.5 * cfg.temp_margin_C)) / cfg.temp_margin_C
        routing_spent = not cfg.routing or self.nu_temp >= 0.25 * cfg.max_pressure
        temp_share = min(1.0, over_temp) if over_temp > 0 and routing_spent else 0.0
        return busy_s * min(3.0, max(power_share, temp_share))
