"""Summarise the sensor samples of one window: mean/peak power, integrated energy, last temperatures.

The integrated energy is the trapezoid rule over the valid instant-power samples, with the first
and last value held flat out to the window edges, so a constant power P over [t0, t1] integrates
to exactly P·(t1 − t0). It is the cross-check of the counter and the energy estimate for windows
shorter than the counter's update period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hw.sample import SensorSample
from nectar.telemetry.energy import integrate_power_J



@dataclass
class SampleSummary:
    """What the fast sensors said over one window (None where no valid reading exists)."""

    count: int = 0  # valid instant-power samples
    mean_power_W: float | None = None
    peak_power_W: float | None = None
    energy_J: float | None = None  # integrated instant power over the whole window
    gpu_temp_C: float | None = None  # last reading in the window
    mem_temp_C: float | None = None  # last reading
    mem_used_B: int | None = None  # largest reading (peak memory pressure)
    mem_total_B: int | None = None
    sm_clock_MHz: float | None = None  # mean
    throttle_reasons: int = 0  # OR of every mask in the window
    flags: list[str] = field(default_factory=list)


def _is_good(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def _power_flags(samples: Sequence[SensorSample]) -> list[str]:
    flags = []
    if any(s.power_W is not None and math.isnan(s.power_W) for s in samples):
        flags.append("nan_power")
    if any(s.power_W is not None and s.power_W < 0 for s in samples):
        flags.append("negative_power")
    return flags


def _last(values: list) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return kept[-1] if kept else None


def summarise(samples: Sequence[SensorSample], t_start_s: float, t_end_s: float) -> SampleSummary:
    """Summary of the samples (any order) that fall inside [t_start_s, t_end_s]."""
    if not t_end_s >= t_start_s:
        raise ValueError(f"window end {t_end_s} is before its start {t_start_s}")
    inside = sorted((s for s in samples if t_start_s <= s.t_s <= t_end_s), key=lambda s: s.t_s)
    summary = SampleSummary(flags=_power_flags(inside))
    powered = [s for s in inside if _is_good(s.power_W)]
    if powered:
        power = [s.power_W for s in powered]
        summary.count = len(powered)
        summary.mean_power_W = float(np.mean(power))
        summary.peak_power_W = float(np.max(power))
        summary.energy_J = integrate_power_J([s.t_s for s in powered], power, t_start_s, t_end_s)
    else:
        summary.flags.append("no_power_samples")
    summary.gpu_temp_C = _last([s.gpu_temp_C for s in inside])
    summary.mem_temp_C = _last([s.mem_temp_C for s in inside])
    used = [s.mem_used_B for s in inside if s.mem_used_B is not None]
    summary.mem_used_B = max(used) if used else None
    summary.mem_total_B = _last([s.mem_total_B for s in inside])
    clocks = [s.sm_clock_MHz for s in inside if _is_good(s.sm_clock_MHz)]
    summary.sm_clock_MHz = float(np.mean(clocks)) if clocks else None
    for s in inside:
        summary.throttle_reasons |= s.throttle_reasons or 0
    return summary
