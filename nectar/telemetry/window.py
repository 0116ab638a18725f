"""Telemetry records and the one interface both backends (simulator, NVML) implement.

A backend has one head, `run_chunk(compute) -> TelemetryWindow`: `compute()` runs the chunk and
returns its workload; the simulator prices that workload, the NVML backend measures the GPU
while `compute()` runs. The window says which workload it covers (the simulator's as priced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Protocol, runtime_checkable

from nectar.telemetry.workload import ChunkWorkload


class TelemetryError(RuntimeError):
    """A reading could not be trusted (NaN, stale, counter reset) and was not repaired."""


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
    workload: ChunkWorkload | None = None  # the workload the window covers, as the backend accounted it

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

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
        """The readings as a dict (without the workload), plus duration_s."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "workload"}
        d["flags"] = list(self.flags)
        d["duration_s"] = self.duration_s
        return d


@runtime_checkable
class TelemetryBackend(Protocol):
    """One interface, two backends (simulator, NVML).

    `run_chunk(compute)`: `compute()` runs the chunk and returns its ChunkWorkload; the backend
    returns the chunk's telemetry window. `idle(seconds)`: a window of idle GPU. `info()`: what a
    run's summary should say about the backend (GPU name, pricing). `isolated`: each policy may
    have a backend of its own in the same initial state (else policies share one and interleave);
    `torch_device`: where the model's forward must run for the telemetry to mean anything.

    Optional capabilities, outside the protocol: `cotenant(duty)` (a context manager that heats
    the GPU), `lock_clock(clock_MHz)` (cap the SM clock; None releases it) and `step_windows()`
    (light edges for windows of milliseconds), reached through `lock_clock` below and
    `nectar.telemetry.energy.step_windows`. The simulator locks its clock; the NVML backend refuses (the lent GPUs'
    clocks are never changed).
    """

    name: str
    isolated: bool
    torch_device: str

    def gpu_name(self) -> str: ...

    def info(self) -> dict: ...

    def run_chunk(self, compute: Callable[[], ChunkWorkload]) -> TelemetryWindow: ...

    def idle(self, seconds: float) -> TelemetryWindow: ...

    def close(self) -> None: ...


def lock_clock(backend, clock_MHz: float | None) -> None:
    """Cap `backend`'s SM clock at `clock_MHz` (None: release the lock), through its optional
    `lock_clock`; ValueError when the backend has none or refuses (the NVML backend always does)."""
    method = getattr(backend, "lock_clock", None)
    if method is None:
        raise ValueError(f"the {backend.name} backend cannot lock its SM clock; clock-locked policies "
                         "(clock:MHZ, POLICY@clock:MHZ) run on the simulator only")
    method(clock_MHz)
