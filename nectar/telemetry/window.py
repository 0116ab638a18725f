"""Telemetry records and the one interface both backends (simulator, NVML) implement.

A backend turns "this chunk ran this workload" into a `TelemetryWindow`. The simulator prices
the workload; the hardware backend runs the supplied compute inside a measured NVML window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from nectar.telemetry.workload import ChunkWorkload


class TelemetryError(RuntimeError):
    """A reading could not be trusted (NaN, stale, counter reset) and was not repaired."""


def counter_or_power_energy(counter_J: float | None, power_J: float | None) -> tuple[float, str | None]:
    """A window's energy as both backends choose it: the counter difference when it can be
    trusted, else integrated instant power, else NaN; with the flag that says which fallback."""
    if counter_J is not None:
        return counter_J, None
    if power_J is not None:
        return power_J, "energy_from_power"
    return math.nan, "no_energy"


@dataclass
class TelemetryWindow:
    """Measurements over one window [t_start_s, t_end_s] (seconds on the backend's clock)."""

    t_start_s: float
    t_end_s: float
    energy_J: float
    mean_power_W: float
    peak_power_W: float
    gpu_temp_C: float
    mem_temp_C: float | None = None
    mem_used_B: int | None = None
    mem_total_B: int | None = None
    sm_clock_MHz: float | None = None
    throttle_reasons: int = 0           # NVML clocks-event-reasons bit mask
    samples: int = 0                    # number of instant-power samples behind mean/peak
    energy_mJ_start: float | None = None  # raw counter readings at the window edges
    energy_mJ_end: float | None = None
    flags: list[str] = field(default_factory=list)  # e.g. "stale", "counter_reset", "nan_repaired"
    # Energy from integrating instant-power samples over the window (J): the counter's cross-check,
    # and the estimate to use when the window is flagged "short_window" (shorter than one update).
    energy_power_J: float | None = None

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

    @property
    def energy_estimate_J(self) -> float:
        """Best per-window energy: the counter difference for windows of half a second or more
        (unbiased; ±1 update of ~100 ms), the integrated instant power for shorter ones (the counter
        may not move at all), falling back to the counter when there are no samples. On the H100
        here, integrated instant power read up to 2× low on 50 ms windows (it lags), so hardware
        runs use chunk windows of ~1 s."""
        short = self.duration_s < 0.5 or "short_window" in self.flags
        if short and self.energy_power_J is not None and math.isfinite(self.energy_power_J):
            return self.energy_power_J
        return self.energy_J

    @property
    def memory_pressure(self) -> float | None:
        if not self.mem_used_B or not self.mem_total_B:
            return None
        return self.mem_used_B / self.mem_total_B

    def is_valid(self) -> bool:
        """True when energy, duration and temperature are finite and physically possible."""
        values = (self.energy_J, self.duration_s, self.gpu_temp_C, self.mean_power_W)
        return all(math.isfinite(v) for v in values) and self.energy_J >= 0 and self.duration_s > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["duration_s"] = self.duration_s
        return d


@runtime_checkable
class TelemetryBackend(Protocol):
    """One interface, two backends.

    `run_chunk(workload, compute)`: the simulator prices `workload` (and may ignore `compute`);
    the NVML backend calls `compute()` (the real forward pass) inside a synchronised energy window.
    Either way the return value is the chunk's telemetry window.
    """

    name: str

    def gpu_name(self) -> str: ...

    def run_chunk(self, workload: ChunkWorkload, compute: Callable[[], Any] | None = None) -> TelemetryWindow: ...

    def idle(self, seconds: float) -> TelemetryWindow: ...

    def close(self) -> None: ...
