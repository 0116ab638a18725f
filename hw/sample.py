"""One reading of the GPU's fast sensors (instant power, temperatures, memory, SM clock, throttle).

Used by the background sampler and at window edges. A full reading takes five NVML queries
(power and memory temperature share one field-values query); `slow_fields=False` reads instant
power alone (one query), which is what the sampler does on most ticks. The energy counter is read
only on request (`with_counter=True`): one query costs ~3 ms, so it stays off the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SensorSample:
    """Fast-sensor readings at time t_s (seconds on the meter's clock); None = not available."""

    t_s: float
    power_W: float | None
    gpu_temp_C: float | None = None
    mem_temp_C: float | None = None
    mem_used_B: int | None = None
    mem_total_B: int | None = None
    sm_clock_MHz: float | None = None
    throttle_reasons: int | None = None
    energy_mJ: float | None = None  # counter, only when the reader was asked for it


def read_sample(nvml: Any, clock: Callable[[], float], *, with_counter: bool = False,
                slow_fields: bool = True) -> SensorSample:
    """Read the fast sensors once (only instant power unless `slow_fields`); timestamp taken just
    before the power reading."""
    t_s = clock()
    if not slow_fields:
        energy_mJ = nvml.total_energy_mJ() if with_counter else None
        return SensorSample(t_s=t_s, power_W=nvml.power_instant_W(), energy_mJ=energy_mJ)
    power_W, mem_temp_C = nvml.power_and_mem_temp()
    memory = nvml.memory_B()
    return SensorSample(
        t_s=t_s,
        power_W=power_W,
        gpu_temp_C=nvml.gpu_temp_C(),
        mem_temp_C=mem_temp_C,
        mem_used_B=None if memory is None else memory[0],
        mem_total_B=None if memory is None else memory[1],
        sm_clock_MHz=nvml.sm_clock_MHz(),
        throttle_reasons=nvml.clock_event_reasons(),
        energy_mJ=nvml.total_energy_mJ() if with_counter else None,
    )
