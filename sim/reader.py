"""Builds TelemetryWindows from sensor readings the way an NVML reader does (cf. hw/energy_meter.py).

A window reads the energy counter at its two edges; a background sampler (a simpy process every
`instant_sample_period_s`) reads instant power, clock and throttle reasons inside the window, and
the end edge adds one more sample plus temperatures. Energy is the counter difference; the
integrated instant power (trapezoids, end values held flat to the edges) is its cross-check in
`energy_power_J` and the fallback when the counter cannot be trusted. Flags follow the hardware
reader: "short_window" (shorter than one counter update: the counter difference is quantised),
"counter_wrap" (repaired), "counter_reset", "nan", "dropped" (with "counter_unsupported" for a counter
read), "stale", "energy_from_power",
"no_energy", "nan_power", "power_from_energy", "temp_from_previous".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from nectar.telemetry.energy import counter_delta, counter_or_power_energy, integrate_power_J, is_stale
from nectar.telemetry.window import TelemetryWindow
from sim.faults import SensorReadError
from sim.presets import GPUPreset
from sim.sensor import NvmlLikeSensor

@dataclass
class _OpenWindow:
    t_start_s: float
    counter_start_mJ: float | None
    times_s: list[float] = field(default_factory=list)
    power_W: list[float] = field(default_factory=list)
    clocks_MHz: list[float] = field(default_factory=list)
    reasons: int = 0
    flags: set[str] = field(default_factory=set)


class WindowReader:
    def __init__(self, env: simpy.Environment, sensor: NvmlLikeSensor, preset: GPUPreset,
                 counter_modulus_mJ: float = 2.0**64, stale_periods: float = 3.0):
        self.env, self.sensor, self.preset = env, sensor, preset
        self.counter_modulus_mJ = counter_modulus_mJ
        self.stale_periods = stale_periods
        self.max_power_W = 3.0 * preset.power_limit_W
        self._open: _OpenWindow | None = None
        self._last_temps: tuple[float, float] = (math.nan, math.nan)
        env.process(self._sampler())

    def begin(self) -> None:
        if self._open is not None:
            raise RuntimeError("a telemetry window is already open")
        self._open = _OpenWindow(self.env.now, None)
        self._open.counter_start_mJ = self._read_counter(self._open.flags)

    def end(self, mem_used_B: int | None) -> TelemetryWindow:
        w, self._open = self._open, None
        if w is None:
            raise RuntimeError("no telemetry window is open")
        self._sample(w)
        t_end = self.env.now
        counter_end = self._read_counter(w.flags)
        return self._build(w, t_end, counter_end, mem_used_B)

    # ------------------------------------------------------------ readings
    def _sampler(self):
        while True:
            yield self.env.timeout(self.preset.instant_sample_period_s)
            if self._open is not None and self.env.now > self._open.t_start_s:
                self._sample(self._open)

    def _sample(self, w: _OpenWindow) -> None:
        w.reasons |= self.sensor.clocks_event_reasons()
        w.clocks_MHz.append(self.sensor.sm_clock_MHz())
        try:
            power = self.sensor.instant_power_W()
        except SensorReadError:
            w.flags.add("dropped")
            return
        if not (math.isfinite(power) and power >= 0):
            w.flags.add("nan_power")
            return
        w.times_s.append(self.env.now)
        w.power_W.append(power)

    def _read_counter(self, flags: set[str] | None = None) -> float | None:
        try:
            return self.sensor.total_energy_mJ()
        except SensorReadError:
            if flags is not None:
                flags.add("dropped")
            return None

    def _read_temps(self, flags: set[str]) -> tuple[float, float]:
        """GPU and memory temperature at the window end; a failed or NaN read reuses the last good one."""
        temps = []
        for i, read in enumerate((self.sensor.temperature_C, self.sensor.memory_temperature_C)):
            try:
                value = read()
                problem = "nan" if math.isnan(value) else None
            except SensorReadError:
                value, problem = math.nan, "dropped"
            if problem:
                flags.update((problem, "temp_from_previous"))
                value = self._last_temps[i]
            temps.append(value)
        self._last_temps = (temps[0], temps[1])
        return self._last_temps

    # ------------------------------------------------------------ window
    def _build(self, w: _OpenWindow, t_end: float, counter_end: float | None, mem_used_B: int | None) -> TelemetryWindow:
        duration = t_end - w.t_start_s
        flags = w.flags
        delta = counter_delta(w.counter_start_mJ, counter_end, duration, modulus_mJ=self.counter_modulus_mJ,
                              max_power_W=self.max_power_W)
        flags.update(delta.flags)
        power_J = integrate_power_J(w.times_s, w.power_W, w.t_start_s, t_end) if w.power_W else None
        mean_W = sum(w.power_W) / len(w.power_W) if w.power_W else None
        counter_J = None if delta.energy_mJ is None else delta.energy_mJ / 1000.0
        if duration < self.preset.energy_counter_period_s:
            flags.add("short_window")
        elif is_stale(delta.energy_mJ, duration, mean_W, update_period_s=self.preset.energy_counter_period_s,
                      periods=self.stale_periods):
            flags.add("stale")
            counter_J = None
        energy_J, fallback = counter_or_power_energy(counter_J, power_J)
        if fallback:
            flags.add(fallback)
        peak_W = max(w.power_W) if w.power_W else None
        if mean_W is None:
            flags.add("power_from_energy")
            mean_W = peak_W = energy_J / duration if duration > 0 else math.nan
        gpu_temp, mem_temp = self._read_temps(flags)
        return TelemetryWindow(
            t_start_s=w.t_start_s, t_end_s=t_end, energy_J=energy_J, mean_power_W=mean_W, peak_power_W=peak_W,
            gpu_temp_C=gpu_temp, mem_temp_C=mem_temp, mem_used_B=mem_used_B, mem_total_B=self.preset.memory_total_B,
            sm_clock_MHz=sum(w.clocks_MHz) / len(w.clocks_MHz), throttle_reasons=w.reasons, samples=len(w.power_W),
            energy_mJ_start=w.counter_start_mJ, energy_mJ_end=counter_end, flags=sorted(flags),
            energy_power_J=power_J,
        )

