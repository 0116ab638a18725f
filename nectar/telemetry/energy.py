"""The one place where a window's energy is decided, shared by the simulator's reader, the NVML
meter, the experiment's accounting and the reconciliation.

- `counter_delta`: energy between two readings of a (wrapping) mJ counter, with the checks that
  make it trustworthy: missing, NaN or negative readings, a wrap (repaired when the wrapped
  difference is physically possible), a reset (anything else that runs backwards);
- `is_stale`: the counter did not move over several update periods while the GPU drew power;
- `integrate_power_J`: ∫P dt of instant-power samples, the counter's cross-check;
- `counter_or_power_energy`: a window's measured energy as a reader reports it (the counter when
  it can be trusted, else integrated power);
- `window_energy_J`: the energy a consumer of a finished window uses (accounting, cost model,
  reconciliation), by one rule with named preferences;
- `step_windows` / `CounterSpan`: a block of windows of milliseconds whose edges skip the counter,
  with the counter read once at each end of the block.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from nectar.telemetry.window import TelemetryWindow

SHORT_WINDOW_S = 0.5   # below this the counter (±1 update of ~100 ms) is worse than integrated power
PREFERENCES = ("auto", "power", "counter")


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


def counter_delta(start_mJ: float | None, end_mJ: float | None, duration_s: float, *,
                  max_power_W: float = 3000.0, modulus_mJ: int | float = 2**64) -> CounterDelta:
    """Energy between two readings of a counter that wraps at `modulus_mJ`, over `duration_s`.

    A backwards step is a wrap only if the wrapped difference is physically possible (≤ max power
    over the window plus one second of counter lag), else a reset. Pass NVML's raw integers: a
    float cannot hold a value near 2^64 to the millijoule."""
    if not duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    if not max_power_W > 0:
        raise ValueError(f"max_power_W must be > 0, got {max_power_W}")
    for value in (start_mJ, end_mJ):
        problem = _reading_problem(value)
        if problem:
            return CounterDelta(None, (problem,))
    if end_mJ >= start_mJ:
        return CounterDelta(end_mJ - start_mJ)
    wrapped_mJ = (modulus_mJ - start_mJ) + end_mJ
    if wrapped_mJ <= max_power_W * (duration_s + 1.0) * 1000.0:
        return CounterDelta(wrapped_mJ, ("counter_wrap",))
    return CounterDelta(None, ("counter_reset",))


def is_stale(delta_mJ: float | None, duration_s: float, mean_power_W: float | None, *,
             update_period_s: float = 0.1, periods: float = 3.0, min_power_W: float = 1.0) -> bool:
    """True when the counter did not move over > `periods` update periods while power > `min_power_W`."""
    if delta_mJ is None or mean_power_W is None:
        return False
    return delta_mJ == 0 and duration_s > periods * update_period_s and mean_power_W > min_power_W


def integrate_power_J(times_s: Sequence[float], power_W: Sequence[float], t_start_s: float, t_end_s: float) -> float:
    """∫P dt over [t_start_s, t_end_s] by trapezoids, holding the end samples flat to the edges.

    Plain Python: windows hold a handful of samples, where numpy's call overhead dominates."""
    if len(times_s) == 0:
        raise ValueError("integrate_power_J needs at least one sample")
    times = [min(max(t, t_start_s), t_end_s) for t in times_s]
    energy = power_W[0] * (times[0] - t_start_s) + power_W[-1] * (t_end_s - times[-1])
    for i in range(1, len(times)):
        energy += 0.5 * (power_W[i] + power_W[i - 1]) * (times[i] - times[i - 1])
    return energy


def counter_or_power_energy(counter_J: float | None, power_J: float | None) -> tuple[float, str | None]:
    """A window's energy as both readers report it: the counter difference when it can be
    trusted, else integrated instant power, else NaN; with the flag that says which fallback."""
    if counter_J is not None:
        return counter_J, None
    if power_J is not None:
        return power_J, "energy_from_power"
    return math.nan, "no_energy"


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def window_energy_J(window: "TelemetryWindow", prefer: str = "auto") -> float:
    """The energy of a finished window, J (NaN when nothing usable was measured).

    "auto" (accounting, cost model): integrated instant power for windows shorter than half a
    second (or flagged "short_window": the counter may not have moved), else the reader's energy
    (the counter); "power" (reconciliation): integrated power whenever ≥ 2 samples back it, else
    the reader's energy; "counter": the reader's energy. Each falls back to mean power × duration.
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"energy preference must be one of {PREFERENCES}, got {prefer!r}")
    power = window.energy_power_J
    if prefer == "power":
        first = power if window.samples >= 2 else None
    elif prefer == "auto":
        first = power if window.duration_s < SHORT_WINDOW_S or "short_window" in window.flags else None
    else:
        first = None
    for value in (first, window.energy_J, window.mean_power_W * window.duration_s):
        if _usable(value):
            return float(value)
    return math.nan


@dataclass
class CounterSpan:
    """The energy counter read around a block of short windows (`step_windows`): device synchronised
    at both ends; None where the block has not ended or the backend has no counter."""

    t_start_s: float | None = None
    energy_mJ_start: float | None = None
    t_end_s: float | None = None
    energy_mJ_end: float | None = None

    def energy_J(self) -> float | None:
        """The counter's energy over the span (None when a reading is missing, reset or wrapped oddly)."""
        if self.t_start_s is None or self.t_end_s is None:
            return None
        delta = counter_delta(self.energy_mJ_start, self.energy_mJ_end, max(self.t_end_s - self.t_start_s, 0.0))
        return None if delta.energy_mJ is None else delta.energy_mJ / 1000.0


def step_windows(backend) -> ContextManager[CounterSpan | None]:
    """A block of windows of a few milliseconds each (serving steps), through the backend's optional
    `step_windows`: the NVML backend's window edges then read instant power alone (the energy
    counter costs ~3 ms a read) and it reads the counter once at each end of the block, into the
    yielded CounterSpan; a backend without the capability (the simulator: its windows cost nothing)
    yields None and measures as always."""
    method = getattr(backend, "step_windows", None)
    return nullcontext(None) if method is None else method()
