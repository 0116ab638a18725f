"""Energy from two readings of NVML's total-energy counter, and the checks that make it trustworthy.

The counter (mJ, unsigned 64-bit) only moves about every 100 ms. Between two readings it can
- move forward normally                          → delta
- go backwards because it wrapped (start near 2^bits, end small, and the wrapped delta is
  physically possible at `max_power_W`)          → wrapped delta, flag "counter_wrap"
- go backwards for any other reason (driver reload, GPU reset)       → None, flag "counter_reset"
- be missing (NotSupported), NaN or negative      → None, flag "counter_unsupported" / "nan" / "negative"
and it is "stale" when it did not move over a window longer than a few update periods while the
GPU drew power (every watt should show up within one period).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CounterDelta:
    """Energy between two counter readings, mJ (None when it cannot be trusted), and why."""

    energy_mJ: float | None
    flags: tuple[str, ...] = ()


def _reading_problem(value: float | None) -> str | None:
    if value is None:
        return "counter_unsupported"
    if math.isnan(value) or math.isinf(value):
        return "nan"
    if value < 0:
        return "negative"
    return None


def counter_delta(
    start_mJ: float | None,
    end_mJ: float | None,
    duration_s: float,
    *,
    max_power_W: float = 3000.0,
    counter_bits: int = 64,
) -> CounterDelta:
    """Energy between two readings of a `counter_bits`-bit mJ counter over `duration_s` seconds.

    Pass NVML's raw integers: a float cannot hold a value near 2^64 to the millijoule."""
    if not duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    if not max_power_W > 0:
        raise ValueError(f"max_power_W must be > 0, got {max_power_W}")
    for value in (start_mJ, end_mJ):
        problem = _reading_problem(value)
        if problem:
            return CounterDelta(None, (problem,))
    if end_mJ >= start_mJ:
        return CounterDelta(float(end_mJ - start_mJ))
    wrapped_mJ = (2**counter_bits - start_mJ) + end_mJ  # exact when NVML's raw ints are passed
    # Allow one extra second of energy at max power for the counter's update lag.
    if wrapped_mJ <= max_power_W * (duration_s + 1.0) * 1000.0:
        return CounterDelta(float(wrapped_mJ), ("counter_wrap",))
    return CounterDelta(None, ("counter_reset",))


def is_stale(
    delta_mJ: float | None,
    duration_s: float,
    mean_power_W: float | None,
    *,
    update_period_s: float = 0.1,
    periods: float = 3.0,
    min_power_W: float = 1.0,
) -> bool:
    """True when the counter did not move over > `periods` update periods while power > `min_power_W`."""
    if delta_mJ is None or mean_power_W is None:
        return False
    return delta_mJ == 0 and duration_s > periods * update_period_s and mean_power_W > min_power_W
