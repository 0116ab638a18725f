"""An NVML-like sensor on the simulated GPU, with the real one's habits.

- `total_energy_mJ()`: an integer mJ counter (since "driver load", so it starts at a large
  value) that only moves at update ticks every `energy_counter_period_s` (~100 ms), at a phase
  the seed picks; between ticks it repeats the last value. Faults can freeze, reset or wrap it.
- `power_usage_W()`: like nvmlDeviceGetPowerUsage on Hopper, the average over the last
  `power_average_window_s` (1 s), refreshed at each counter tick.
- `instant_power_W()`: like NVML_FI_DEV_POWER_INSTANT, the current power in mW resolution plus
  the preset's sensor noise.
- `temperature_C()` / `memory_temperature_C()`: integers (truncated), refreshed every
  `temperature_period_s`.
- `sm_clock_MHz()`, `clocks_event_reasons()`: the current clock and throttle-reason bit mask.

Readings go through the `FaultInjector` (drop raises `SensorReadError`, NaN, stale, spikes,
noise). Ticks are simpy processes, so they interleave exactly with the GPU's phases.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import simpy

from sim.faults import FaultInjector
from sim.gpu import SimGPU
from sim.presets import GPUPreset


class NvmlLikeSensor:
    def __init__(self, env: simpy.Environment, gpu: SimGPU, preset: GPUPreset,
                 injector: FaultInjector, rng: np.random.Generator):
        self.env, self.gpu, self.preset, self.injector, self.rng = env, gpu, preset, injector, rng
        self.counter_updates = 0
        self._counter_origin_mJ = int(rng.integers(10**6, 10**9))   # counter value at t = 0
        self._counter_base_J = 0.0                                   # true energy at the last reset
        self._counter_mJ = self._counter_value(0.0)
        self._history: deque[tuple[float, float]] = deque(
            maxlen=int(round(preset.power_average_window_s / preset.energy_counter_period_s)) + 1)
        self._power_average_W = gpu.power_W()
        self._temps = self._latched_temps()
        self._last_instant_W: float | None = None
        self._last_average_W: float | None = None
        self._last_temp: float | None = None
        self._last_mem_temp: float | None = None
        env.process(self._ticks(preset.energy_counter_period_s, self._update_counter))
        env.process(self._ticks(preset.temperature_period_s, self._update_temperatures))

    # ------------------------------------------------------------ queries
    def total_energy_mJ(self) -> float:
        return self.injector.read(float(self._counter_mJ), None)

    def power_usage_W(self) -> float:
        value = self.injector.power(round(self._power_average_W, 3), self._last_average_W, instant=False)
        self._last_average_W = value
        return value

    def instant_power_W(self) -> float:
        true_W = self.gpu.power_W()
        if self.preset.sensor_noise_W > 0:
            true_W += self.preset.sensor_noise_W * float(self.rng.standard_normal())
        value = self.injector.power(round(true_W, 3), self._last_instant_W, instant=True)
        self._last_instant_W = value
        return value

    def temperature_C(self) -> float:
        value = self.injector.read(self._temps[0], self._last_temp)
        self._last_temp = value
        return value

    def memory_temperature_C(self) -> float:
        value = self.injector.read(self._temps[1], self._last_mem_temp)
        self._last_mem_temp = value
        return value

    def sm_clock_MHz(self) -> float:
        return float(round(self.gpu.clock_MHz))

    def clocks_event_reasons(self) -> int:
        return self.gpu.throttle_reasons

    # ------------------------------------------------------------ ticks
    def _ticks(self, period_s: float, update):
        """simpy process: `update()` every `period_s`, starting at a seeded phase in [0, period)."""
        yield self.env.timeout(float(self.rng.uniform(0.0, period_s)))
        while True:
            update()
            yield self.env.timeout(period_s)

    def _counter_value(self, energy_J: float) -> int:
        value = self._counter_origin_mJ + math.floor((energy_J - self._counter_base_J) * 1000.0)
        wrap = self.injector.config.wrap
        return value % wrap if wrap else value

    def _update_counter(self) -> None:
        energy_J = self.gpu.energy_J()
        self._history.append((self.env.now, energy_J))
        (t0, e0), (t1, e1) = self._history[0], self._history[-1]
        self._power_average_W = (e1 - e0) / (t1 - t0) if t1 > t0 else self.gpu.power_W()
        event = self.injector.counter_update()
        if event == "reset":
            self._counter_origin_mJ, self._counter_base_J = 0, energy_J
        if event != "stale":
            self._counter_mJ = self._counter_value(energy_J)
            self.counter_updates += 1

    def _latched_temps(self) -> tuple[float, float]:
        temp = self.gpu.temperature_C()
        return float(math.floor(temp)), float(math.floor(temp + self.preset.mem_temp_offset_C))

    def _update_temperatures(self) -> None:
        self._temps = self._latched_temps()
