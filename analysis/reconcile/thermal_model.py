"""The thermal models the online fit uses, and the telemetry windows they run on.

One node (sim/thermal.py's RC model, `Params`, `integrate`) and two nodes (a Foster die + heat sink,
`TwoNodeParams`, `integrate_two_node`), each integrated exactly over constant-power intervals built
from a recording's windows and the host gaps between them (`intervals`), and the expected NVML
readings at the windows' ends (`predict_readings`). Fitting, priors and the report are in
analysis/reconcile/thermal_fit.py (its module doc describes the estimator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from sim.thermal import ThermalModel, segment, temperature_at

TEMP_READING_OFFSET_C = 0.5          # E[T − floor(T)]; same as analysis.reconcile.replay


class ThermalFitError(ValueError):
    """Input the online fit cannot use (no temperatures, too few windows in the fit span, NaN)."""


@dataclass(frozen=True)
class Windows:
    """A recording's telemetry windows in time order (seconds on the trace's clock)."""

    t_start_s: np.ndarray      # [N]
    t_end_s: np.ndarray        # [N]
    power_W: np.ndarray        # [N] measured mean power over the window
    temp_C: np.ndarray         # [N] sensor reading at the window's end

    def __len__(self) -> int:
        return len(self.t_start_s)


@dataclass(frozen=True)
class Params:
    ambient_C: float
    resistance_C_per_W: float
    time_constant_s: float

    @property
    def capacitance_J_per_C(self) -> float:
        return self.time_constant_s / self.resistance_C_per_W

    def model(self) -> ThermalModel:
        return ThermalModel(self.resistance_C_per_W, self.capacitance_J_per_C, self.ambient_C)

    def to_dict(self) -> dict:
        return {**asdict(self), "capacitance_J_per_C": self.capacitance_J_per_C}


@dataclass(frozen=True)
class TwoNodeParams:
    """Two-node Foster model: T = ambient + θ_die + θ_sink, each node dθ/dt = (R·P − θ)/τ.

    The die node (R_die, τ_die ~ 0.1 s) follows power within tenths of a second; the sink node
    (R_sink, τ_sink ~ minutes: heat sink, board, coolant) creeps. The Foster form is the
    constant-power-exact equivalent of a die → sink Cauer ladder with the same two poles."""

    ambient_C: float
    die_resistance_C_per_W: float
    die_time_constant_s: float
    sink_resistance_C_per_W: float
    sink_time_constant_s: float

    @property
    def resistance_C_per_W(self) -> float:
        return self.die_resistance_C_per_W + self.sink_resistance_C_per_W

    def to_dict(self) -> dict:
        return {**asdict(self), "resistance_C_per_W": self.resistance_C_per_W,
                "die_capacitance_J_per_C": self.die_time_constant_s / self.die_resistance_C_per_W,
                "sink_capacitance_J_per_C": self.sink_time_constant_s / self.sink_resistance_C_per_W}


def windows_from_rows(rows: Sequence, name: str = "trace") -> Windows:
    """Windows of one recording (TraceRow or TelemetryWindow items), sorted by start time.

    ThermalFitError for NaN/inf time, power or temperature, or overlapping windows (several
    recordings: fit one at a time)."""
    ws = [getattr(r, "window", r) for r in rows]
    if not ws:
        raise ThermalFitError(f"{name}: no windows")
    ws = sorted(ws, key=lambda w: w.t_start_s)
    arr = {k: np.array([float(getattr(w, a)) for w in ws], dtype=float)
           for k, a in (("t_start_s", "t_start_s"), ("t_end_s", "t_end_s"), ("power_W", "mean_power_W"),
                        ("temp_C", "gpu_temp_C"))}
    if not np.isfinite(arr["temp_C"]).any():
        raise ThermalFitError(f"{name}: no window has a temperature reading")
    for key, values in arr.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ThermalFitError(f"{name}: window {int(bad[0])} has a non-finite {key} ({values[bad[0]]}); "
                                  f"{bad.size} window(s) unusable")
    if np.any(arr["t_end_s"] <= arr["t_start_s"]):
        i = int(np.flatnonzero(arr["t_end_s"] <= arr["t_start_s"])[0])
        raise ThermalFitError(f"{name}: window {i} does not end after it starts")
    if np.any(arr["t_start_s"][1:] < arr["t_end_s"][:-1] - 1e-3):
        raise ThermalFitError(f"{name}: windows overlap (several recordings); fit one recording at a time")
    if np.any(arr["power_W"] < 0):
        raise ThermalFitError(f"{name}: negative power in window {int(np.flatnonzero(arr['power_W'] < 0)[0])}")
    return Windows(**arr)


def intervals(w: Windows, gap_power_W: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Constant-power intervals after the first window's end: (duration_s [M], power_W [M],
    index of the interval ending at window i [N], −1 for window 0). A gap between windows is an
    interval at `gap_power_W` (None: the preceding window's power)."""
    dur, power, end_of = [], [], np.full(len(w), -1)
    for i in range(1, len(w)):
        gap = w.t_start_s[i] - w.t_end_s[i - 1]
        if gap > 0:
            dur.append(gap)
            power.append(w.power_W[i - 1] if gap_power_W is None else gap_power_W)
        dur.append(w.t_end_s[i] - max(w.t_start_s[i], w.t_end_s[i - 1]))
        power.append(w.power_W[i])
        end_of[i] = len(dur) - 1
    return np.array(dur), np.array(power), end_of


def integrate(params: Params, duration_s: np.ndarray, power_W: np.ndarray, temp0_C: float) -> np.ndarray:
    """True temperature at the end of each interval, from temp0_C, with sim/thermal.py's exact
    constant-power solution (no leakage term: the measured power includes it)."""
    model = params.model()
    out = np.empty(len(duration_s))
    t, temp = 0.0, float(temp0_C)
    for k, (dt, p) in enumerate(zip(duration_s, power_W)):
        seg = segment(model, t, temp, 0.0, float(p), 0.0, 0.0)
        t += float(dt)
        temp = temperature_at(seg, t)
        out[k] = temp
    return out


def predict_readings(params: "Params | TwoNodeParams", w: Windows, gap_power_W: float | None, *,
                     stop: int | None = None, temp0_C: float | None = None) -> np.ndarray:
    """Expected readings at the end of windows 0..stop−1 (window 0: its own reading, the anchor).
    A TwoNodeParams model starts with its die node settled at window 0's power (`two_node_start`)."""
    stop = len(w) if stop is None else stop
    dur, power, end_of = intervals(w, gap_power_W)
    last = int(end_of[stop - 1]) + 1 if stop > 1 else 0
    start = w.temp_C[0] + TEMP_READING_OFFSET_C if temp0_C is None else temp0_C
    if isinstance(params, TwoNodeParams):
        die0_C, sink0_C = two_node_start(params, start, float(w.power_W[0]))
        true = integrate_two_node(params, dur[:last], power[:last], die0_C, sink0_C)
    else:
        true = integrate(params, dur[:last], power[:last], start)
    out = np.empty(stop)
    out[0] = w.temp_C[0]
    out[1:] = true[end_of[1:stop]] - TEMP_READING_OFFSET_C
    return out


def two_node_start(params: TwoNodeParams, temp0_C: float, power0_W: float) -> tuple[float, float]:
    """(die rise, sink rise) at the anchor: the die settled at window 0's power (τ_die ≪ a window),
    the sink holding the rest of temp0_C above ambient."""
    die0_C = params.die_resistance_C_per_W * power0_W
    return die0_C, temp0_C - params.ambient_C - die0_C


def integrate_two_node(params: TwoNodeParams, duration_s: np.ndarray, power_W: np.ndarray,
                       die0_C: float, sink0_C: float) -> np.ndarray:
    """True temperature at the end of each constant-power interval: each node exactly,
    θ ← R·P + (θ − R·P)·exp(−Δt/τ), from the rises (die0_C, sink0_C) above ambient."""
    duration_s, power_W = np.asarray(duration_s, float), np.asarray(power_W, float)
    decay_die = np.exp(-duration_s / params.die_time_constant_s)
    decay_sink = np.exp(-duration_s / params.sink_time_constant_s)
    steady_die = params.die_resistance_C_per_W * power_W
    steady_sink = params.sink_resistance_C_per_W * power_W
    out = np.empty(len(duration_s))
    die, sink = float(die0_C), float(sink0_C)
    for k in range(len(duration_s)):
        die = steady_die[k] + (die - steady_die[k]) * decay_die[k]
        sink = steady_sink[k] + (sink - steady_sink[k]) * decay_sink[k]
        out[k] = die + sink
    return params.ambient_C + out
