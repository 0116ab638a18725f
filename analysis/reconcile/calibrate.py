"""Calibrate the simulator's free parameters on the chronological training part of a trace.

The free parameters are preset fields that a data sheet does not pin down: kernel efficiencies
and launch overhead (they set chunk durations), idle/compute/memory power and leakage (energy),
thermal resistance, capacitance and ambient (temperature). Each is moved in optimiser units z:
multiplicatively (value = initial·exp(z)) or, for additive fields, value = initial + z, within
bounds that keep the preset physical (efficiencies ≤ 1, no thermal runaway).

`scipy.optimize.least_squares` minimises, over the training rows of one replay
(`analysis.reconcile.replay.replay_trace` up to the first held-out chunk):
  energy:      (E_sim/E_meas − 1) / energy_sigma          every usable chunk and idle window
  duration:    log(t_sim/t_meas) / duration_sigma         every chunk window
  temperature: (T_sim − T_meas) / temp_sigma_C            every usable chunk and idle window
  prior:       z / prior_sigma                            every free parameter (weak; it only holds
                                                          directions the data cannot see near the
                                                          data-sheet value)
The default sigmas are half the project's goals (5 % energy MAPE, 2 °C temperature RMSE), so
the fit trades one against the other at the same exchange rate as the goals do. The number of
simulator replays is capped (`max_evaluations`, Jacobian columns included); the best point seen
is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import least_squares
from tqdm.auto import tqdm

from analysis.reconcile.replay import (ENERGY_SOURCES, TIMINGS, ReplayRow, is_scored_chunk, measured_energy_J,
                                      replay_trace, usable_window)
from nectar.telemetry.trace import TraceRow
from sim.presets import GPUPreset, save_preset

INVALID_RESIDUAL = 1e3   # residual given to every entry when a trial preset is not physical


@dataclass(frozen=True)
class FreeParameter:
    """One preset field the calibration may move, in optimiser units z."""

    name: str
    lower: float                 # bounds on the field's value
    upper: float
    log: bool = True             # value = initial·exp(z); else value = initial + z
    prior_sigma: float = 0.5     # in z units

    def bounds_z(self, initial: float) -> tuple[float, float]:
        if self.log:
            return math.log(self.lower / initial), math.log(self.upper / initial)
        return self.lower - initial, self.upper - initial

    def value(self, initial: float, z: float) -> float:
        return initial * math.exp(z) if self.log else initial + z


@dataclass
class CalibrationConfig:
    train_fraction: float = 0.6          # first part of the chunks, in trace order
    max_evaluations: int = 300           # simulator replays, Jacobian columns included
    energy_sigma: float = 0.025          # relative
    duration_sigma: float = 0.025        # relative (log ratio)
    temp_sigma_C: float = 1.0
    energy_source: str = "mean"          # see analysis.reconcile.replay.measured_energy_J
    timing: str = "measured"             # see analysis.reconcile.replay (windows last as long as measured)
    parameters: list[FreeParameter] | None = None  # None: default_free_parameters(base)

    def __post_init__(self) -> None:
        if not (isinstance(self.train_fraction, (int, float)) and 0 < self.train_fraction < 1):
            raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {self.train_fraction!r}")
        if isinstance(self.max_evaluations, bool) or not isinstance(self.max_evaluations, int) or self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be a positive integer, got {self.max_evaluations!r}")
        for name in ("energy_sigma", "duration_sigma", "temp_sigma_C"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.energy_source not in ENERGY_SOURCES:
            raise ValueError(f"energy_source must be one of {ENERGY_SOURCES}, got {self.energy_source!r}")
        if self.timing not in TIMINGS:
            raise ValueError(f"timing must be one of {TIMINGS}, got {self.timing!r}")

    def replay_options(self) -> dict:
        """Keyword arguments of `replay_trace` that this configuration fixes."""
        return {"energy_source": self.energy_source, "timing": self.timing}


@dataclass(frozen=True)
class FittedParameter:
    name: str
    initial: float
    fitted: float
    lower: float
    upper: float

    @property
    def at_bound(self) -> bool:
        span = self.upper - self.lower
        return min(self.fitted - self.lower, self.upper - self.fitted) <= 1e-3 * span


@dataclass
class CalibrationResult:
    preset: GPUPreset                    # the calibrated preset
    base: GPUPreset
    parameters: list[FittedParameter]
    split_row: int                       # first held-out row; training = rows[:split_row]
    train_chunks: int
    evaluations: int
    cost_initial: float                  # ½·Σ residual² at the base preset
    cost_final: float
    message: str
    train_replay: list[ReplayRow] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {
            "preset": self.preset.name, "base": self.base.name, "split_row": self.split_row,
            "train_chunks": self.train_chunks, "evaluations": self.evaluations,
            "cost_initial": self.cost_initial, "cost_final": self.cost_final, "message": self.message,
            "parameters": {p.name: {"initial": p.initial, "fitted": p.fitted, "at_bound": p.at_bound}
                           for p in self.parameters},
        }


def default_free_parameters(base: GPUPreset) -> list[FreeParameter]:
    """The fields calibrated by default, with bounds around the base preset's values."""
    def ratio(name: str, low: float, high: float, cap: float = math.inf) -> FreeParameter:
        value = getattr(base, name)
        return FreeParameter(name, value * low, min(value * high, cap))

    r_high = base.thermal_resistance_C_per_W * 2.0
    params = [
        ratio("gemm_efficiency", 0.25, 4.0, cap=1.0),
        ratio("attention_efficiency", 0.25, 4.0, cap=1.0),
        ratio("bandwidth_efficiency", 0.25, 4.0, cap=1.0),
        ratio("idle_power_W", 0.5, 2.0, cap=0.9 * base.power_limit_W),
        ratio("compute_power_W", 0.5, 2.0),
        ratio("memory_power_W", 0.5, 2.0),
        FreeParameter("thermal_resistance_C_per_W", base.thermal_resistance_C_per_W * 0.5, r_high),
        ratio("thermal_capacitance_J_per_C", 0.25, 4.0),
        FreeParameter("leakage_W_per_C", 0.0, max(min(3.0 * base.leakage_W_per_C, 0.5 / r_high), base.leakage_W_per_C),
                      log=False, prior_sigma=1.0),
        FreeParameter("ambient_C", base.ambient_C - 15.0, base.ambient_C + 15.0, log=False, prior_sigma=5.0),
    ]
    if base.launch_overhead_s > 0:
        params.insert(3, ratio("launch_overhead_s", 0.25, 4.0))
    return [p for p in params if p.upper > p.lower]


def split_row(rows: Sequence[TraceRow], train_fraction: float) -> tuple[int, int]:
    """(first held-out row index, number of training chunks) for a chronological split of the chunks."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction!r}")
    chunks = [i for i, row in enumerate(rows) if is_scored_chunk(row)]
    if len(chunks) < 2:
        raise ValueError(f"the trace has {len(chunks)} chunk window(s) with a workload; "
                         "calibration and a held-out check need at least 2")
    n_train = min(max(1, int(train_fraction * len(chunks))), len(chunks) - 1)
    return chunks[n_train], n_train


def apply(base: GPUPreset, params: Sequence[FreeParameter], z: np.ndarray) -> GPUPreset:
    """`base` with each free parameter moved to its value at z (validated by GPUPreset)."""
    return base.replace(**{p.name: p.value(getattr(base, p.name), float(v)) for p, v in zip(params, z)})


def residuals(replayed: Sequence[ReplayRow], config: CalibrationConfig) -> np.ndarray:
    """Data residuals of one replay (energy, duration, temperature), in units of their sigmas."""
    out = []
    for r in replayed:
        if not r.valid or not (r.is_chunk or r.is_idle):
            continue
        out.append((r.sim_energy_J / r.measured_energy_J - 1.0) / config.energy_sigma)
        if r.is_chunk:
            out.append(math.log(r.sim_duration_s / r.measured_duration_s) / config.duration_sigma)
        out.append((r.sim_temp_C - r.measured_temp_C) / config.temp_sigma_C)
    return np.asarray(out, dtype=float)  # [R]


class _BudgetSpent(Exception):
    pass


class _Objective:
    """Residual function for least_squares: counts replays, keeps the best point, stops at the budget."""

    def __init__(self, rows, base, params, config, stop, breaks, bar):
        self.rows, self.base, self.params, self.config = rows, base, params, config
        self.stop, self.breaks, self.bar = stop, breaks, bar
        self.prior_sigma = np.array([p.prior_sigma for p in params])  # [P]
        self.calls, self.best_cost, self.best_z, self.size = 0, math.inf, None, None
        self.first_cost: float | None = None

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.calls >= self.config.max_evaluations:
            raise _BudgetSpent
        self.calls += 1
        self.bar.update(1)
        try:
            preset = apply(self.base, self.params, z)
        except ValueError:
            return np.full(self.size, INVALID_RESIDUAL)
        replayed = replay_trace(self.rows, preset, stop=self.stop, breaks=self.breaks, **self.config.replay_options())
        res = np.concatenate([residuals(replayed, self.config), z / self.prior_sigma])  # [R + P]
        self.size = res.size
        cost = 0.5 * float(res @ res)
        if self.first_cost is None:
            self.first_cost = cost
        if cost < self.best_cost:
            self.best_cost, self.best_z = cost, np.array(z, dtype=float)
            self.bar.set_postfix(cost=f"{cost:.4g}")
        return res


def calibrate(rows: Sequence[TraceRow], base: GPUPreset, config: CalibrationConfig | None = None, *,
              breaks: frozenset[int] = frozenset(), progress: bool = False, all_rows: bool = False,
              data_name: str = "trace") -> CalibrationResult:
    """Fit the free parameters of `base` on the training split of `rows` (every row with
    `all_rows`, when another segment is held out); the calibrated preset."""
    config = config or CalibrationConfig()
    params = config.parameters if config.parameters is not None else default_free_parameters(base)
    if not params:
        raise ValueError("no free parameters to calibrate")
    if all_rows:
        stop, n_train = len(rows), sum(is_scored_chunk(r) for r in rows)
        if n_train < 1:
            raise ValueError("the calibration segment has no chunk window with a workload")
    else:
        stop, n_train = split_row(rows, config.train_fraction)
    _check_training_data(rows[:stop], config.energy_source)
    initial = np.array([getattr(base, p.name) for p in params], dtype=float)  # [P]
    bounds = np.array([p.bounds_z(v) for p, v in zip(params, initial)])       # [P, 2]
    if not np.all(bounds[:, 0] <= 0) or not np.all(bounds[:, 1] >= 0):
        bad = [p.name for p, (lo, hi) in zip(params, bounds) if not lo <= 0 <= hi]
        raise ValueError(f"the base preset's values lie outside their calibration bounds: {bad}")
    with tqdm(total=config.max_evaluations, desc="calibrating", unit="replay", disable=not progress) as bar:
        objective = _Objective(rows, base, params, config, stop, breaks, bar)
        message = _solve(objective, bounds)
    z = objective.best_z
    calibrated = apply(base, params, z).replace(name=f"{base.name}_calibrated",
                                                source=_source(base, params, data_name, stop, n_train))
    fitted = [FittedParameter(p.name, float(v0), float(getattr(calibrated, p.name)), p.lower, p.upper)
              for p, v0 in zip(params, initial)]
    train_replay = replay_trace(rows, calibrated, stop=stop, breaks=breaks, **config.replay_options())
    return CalibrationResult(calibrated, base, fitted, stop, n_train, objective.calls,
                             float(objective.first_cost), float(objective.best_cost), message, train_replay)


def _check_training_data(rows: Sequence[TraceRow], energy_source: str) -> None:
    usable = [r for r in rows if is_scored_chunk(r) and usable_window(r.window, measured_energy_J(r.window, energy_source))]
    if not usable:
        raise ValueError(f"the training split ({len(rows)} windows) has no chunk window with a usable measurement "
                         f"(finite, positive energy from source {energy_source!r}, duration and temperature)")


def _solve(objective: _Objective, bounds: np.ndarray) -> str:
    z0 = np.zeros(len(bounds))
    try:
        result = least_squares(objective, z0, bounds=(bounds[:, 0], bounds[:, 1]), method="trf",
                               diff_step=1e-3, x_scale=1.0, xtol=1e-6, ftol=1e-6, gtol=1e-8,
                               max_nfev=objective.config.max_evaluations)
        return str(result.message)
    except _BudgetSpent:
        return f"stopped after {objective.calls} simulator replays (max_evaluations); best point kept"


BASE_SOURCE = "Base preset source: "


def _source(base: GPUPreset, params, data_name: str, stop: int, n_train: int) -> str:
    """Where the calibrated numbers come from; the base's own origin is kept once (never nested)."""
    names = ", ".join(p.name for p in params)
    origin = base.source.rsplit(BASE_SOURCE, 1)[-1]
    return (f"Calibrated by analysis/reconcile/calibrate.py (scipy least_squares) on {data_name} rows 0..{stop - 1} "
            f"({n_train} chunk windows, {stop} windows) from preset {base.name!r}; fitted: {names}. "
            f"{BASE_SOURCE}{origin}")


def save_calibrated(result: CalibrationResult, path: str | Path) -> Path:
    """Save the calibrated preset to `path` (callers choose where: nothing lands in the source tree by default)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_preset(result.preset, target)
