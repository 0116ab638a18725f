"""Named, nestable GPU energy windows from NVML's total-energy counter (Zeus-style begin/end → Measurement).

Each window edge synchronises the device, then reads the counter exactly once (a query costs
~3 ms) and the fast sensors once. The instant-power samples inside the window (edge readings plus
the background sampler's, when one is attached) give mean/peak power and an integrated energy
that cross-checks the counter. When the counter cannot be trusted (reset, NaN, negative, missing,
stale) the integrated power becomes the estimate and the window says so in `flags`
("energy_from_power"); a window shorter than one counter update is flagged "short_window" and
keeps both numbers, the counter's and the integrated one (`power_energy_J`).

Inside `light_edges()` (windows of a few milliseconds: serving steps) an edge reads instant power
alone — no counter (~3 ms a query), no slow sensors: such a window's energy is its integrated
power, and whoever opened the block reads the counter around it (`counter_span`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from hw.sample import SensorSample, read_sample
from hw.sample_summary import SampleSummary, summarise
from hw.sampler import SensorSampler
from hw.sync import default_sync
from nectar.telemetry.energy import counter_delta, counter_or_power_energy, is_stale


@dataclass
class Measurement:
    """One closed energy window."""

    name: str
    t_start_s: float
    t_end_s: float
    energy_mJ_start: float | None  # raw counter readings at the edges
    energy_mJ_end: float | None
    energy_J: float  # best estimate: counter, else integrated power ("energy_from_power"), else NaN
    counter_energy_J: float | None  # counter difference, None when it cannot be trusted
    power_energy_J: float | None  # trapezoid over instant-power samples (cross-check)
    sensors: SampleSummary
    flags: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

    def disagreement(self) -> float | None:
        """(counter − integrated power) / integrated power, or None if either is missing."""
        if self.counter_energy_J is None or not self.power_energy_J:
            return None
        return (self.counter_energy_J - self.power_energy_J) / self.power_energy_J


@dataclass
class WindowHandle:
    """What `EnergyMeter.window(...)` yields; `measurement` is filled when the block exits."""

    name: str
    measurement: Measurement | None = None


@dataclass
class _OpenWindow:
    t_start_s: float
    energy_mJ_start: float | None
    edge_sample: SensorSample
    sampler_errors: int


class EnergyMeter:
    """Energy windows on one GPU through an NVML adapter (`hw.nvml_api.NvmlApi` or a fake)."""

    def __init__(
        self,
        nvml: Any,
        *,
        sync: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sampler: SensorSampler | None = None,
        counter_period_s: float = 0.1,
        stale_periods: float = 3.0,
        stale_min_power_W: float = 1.0,
        max_power_W: float = 3000.0,
        counter_bits: int = 64,
    ):
        if not counter_period_s > 0:
            raise ValueError(f"counter_period_s must be > 0, got {counter_period_s}")
        self.nvml = nvml
        self.sync = sync if sync is not None else default_sync()
        self.clock = clock
        self.sampler = sampler
        self.counter_period_s = counter_period_s
        self.stale_periods = stale_periods
        self.stale_min_power_W = stale_min_power_W
        self.max_power_W = max_power_W
        self.counter_bits = counter_bits
        self._open: dict[str, _OpenWindow] = {}
        self._light = False

    # ------------------------------------------------------------------ API
    @contextmanager
    def light_edges(self) -> Iterator[None]:
        """Window edges inside the block read instant power only (see the module docstring)."""
        before, self._light = self._light, True
        try:
            yield
        finally:
            self._light = before

    def read_counter(self) -> tuple[float, float | None]:
        """(time, energy counter mJ) after synchronising the device: one end of a counter span."""
        self.sync()
        return self.clock(), self.nvml.total_energy_mJ()

    def _edge(self) -> tuple[float, float | None, SensorSample]:
        """(time, counter or None, sample) of a window edge, in the edge mode in force."""
        t_s = self.clock()
        energy_mJ = None if self._light else self.nvml.total_energy_mJ()
        return t_s, energy_mJ, read_sample(self.nvml, self.clock, slow_fields=not self._light)

    def begin_window(self, name: str) -> None:
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open; end it first or pick another name")
        self.sync()
        t_start_s, energy_mJ, edge = self._edge()
        self._open[name] = _OpenWindow(t_start_s, energy_mJ, edge, self._sampler_errors())

    def end_window(self, name: str) -> Measurement:
        opened = self._pop(name)
        self.sync()
        if self._light:
            t_end_s, energy_mJ, edge = self._edge()
        else:                                   # the sample first, the counter last (as it always was)
            edge = read_sample(self.nvml, self.clock)
            t_end_s, energy_mJ = self.clock(), self.nvml.total_energy_mJ()
        samples = [opened.edge_sample, edge]
        if self.sampler is not None:
            samples += self.sampler.samples_between(opened.t_start_s, t_end_s)
        flags = ["sampler_error"] if self._sampler_errors() > opened.sampler_errors else []
        return self._measure(name, opened, t_end_s, energy_mJ, samples, flags)

    def cancel_window(self, name: str) -> None:
        """Forget an open window without measuring it (e.g. the work inside raised)."""
        self._pop(name)

    @contextmanager
    def window(self, name: str) -> Iterator[WindowHandle]:
        handle = WindowHandle(name)
        self.begin_window(name)
        try:
            yield handle
        except BaseException:
            self.cancel_window(name)
            raise
        handle.measurement = self.end_window(name)

    @property
    def open_windows(self) -> list[str]:
        return list(self._open)

    # ------------------------------------------------------------------ internals
    def _pop(self, name: str) -> _OpenWindow:
        if name not in self._open:
            raise ValueError(f"no open energy window named {name!r}; open ones: {sorted(self._open)}")
        return self._open.pop(name)

    def _sampler_errors(self) -> int:
        return 0 if self.sampler is None else self.sampler.errors

    def _measure(
        self, name: str, opened: _OpenWindow, t_end_s: float, energy_mJ_end: float | None,
        samples: list[SensorSample], flags: list[str],
    ) -> Measurement:
        duration_s = t_end_s - opened.t_start_s
        delta = counter_delta(
            opened.energy_mJ_start, energy_mJ_end, duration_s,
            max_power_W=self.max_power_W, modulus_mJ=2**self.counter_bits,
        )
        sensors = summarise(samples, opened.t_start_s, t_end_s)
        flags = [*delta.flags, *sensors.flags, *flags, *self._device_flags()]
        if duration_s < self.counter_period_s:
            flags.append("short_window")
        stale = is_stale(
            delta.energy_mJ, duration_s, sensors.mean_power_W, update_period_s=self.counter_period_s,
            periods=self.stale_periods, min_power_W=self.stale_min_power_W,
        )
        if stale:
            flags.append("stale")
        counter_J = None if delta.energy_mJ is None or stale else delta.energy_mJ / 1000.0
        energy_J, fallback = counter_or_power_energy(counter_J, sensors.energy_J)
        if fallback:
            flags.append(fallback)
        return Measurement(
            name=name, t_start_s=opened.t_start_s, t_end_s=t_end_s,
            energy_mJ_start=opened.energy_mJ_start, energy_mJ_end=energy_mJ_end,
            energy_J=energy_J, counter_energy_J=counter_J, power_energy_J=sensors.energy_J,
            sensors=sensors, flags=flags,
        )


    def _device_flags(self) -> list[str]:
        flags = [f"unsupported:{key}" for key in sorted(getattr(self.nvml, "unsupported", ()))]
        if getattr(self.nvml, "power_is_average", False):
            flags.append("power_is_average")
        return flags
