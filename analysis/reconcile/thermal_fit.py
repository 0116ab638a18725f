"""Temperature on a machine never seen: the RC thermal model fitted online on a run's first seconds.

The shipped presets carry one machine's cooling: the H200 preset predicts another H200 machine's
temperature with 8–10.5 °C RMSE, because ambient and cooling differ per machine. This module fits
the thermal model of sim/thermal.py to the run's *own* first `fit_s` seconds of telemetry and
predicts the rest of the run from the measured power alone.

Model (sim/thermal.py, one node): C·dT/dt = P − (T − T_amb)/R. The measured mean power of each
telemetry window drives the model as a constant over the window, integrated exactly
(`sim.thermal.segment` / `temperature_at`, τ = R·C): T ← T_inf + (T − T_inf)·exp(−Δt/τ) with
T_inf = T_amb + R·P.

- Leakage: the measured power already *is* P(T), leakage included, at the temperature the GPU
  ran at; it is not modelled separately (leakage_W_per_C = 0 in the segments). Temperature-
  dependent power only matters for predicting power, which this module does not do.
- Gaps: the host time between two windows (Python, data loading; 0.5–13 % of a segment) has no
  measurement. `gap_power="idle"` (default) drives it with the lowest mean power of any window in
  the fit span (the GPU runs no kernel there; the lowest fitted-span power is the run's own best
  estimate of its idle draw, and never uses later data); "hold" repeats the preceding window's
  power instead.
- Sensor: NVML reports whole degrees (truncated), so the expected reading is T − 0.5 °C
  (`TEMP_READING_OFFSET_C`, as the replay uses it). The reading at the end of each window is
  compared with the model's expected reading at that instant.
- Start: the model starts at the end of the first window at that window's reading + 0.5 °C (no
  fitted initial state); the first window anchors, the fit scores windows 1.. of the fit span.

Estimator (documented, deterministic): nonlinear least squares (scipy.optimize.least_squares,
trust-region reflective, bounded) of the readings' residuals over the windows that end within
`fit_s` seconds of the first window's start, in the parameters

    ambient_C ∈ [AMBIENT_BOUNDS_C], log(resistance_C_per_W), log(time_constant_s),

started from several time constants (TAU_STARTS_S), the lowest cost kept. The capacitance follows
as C = τ/R. The time constant is fitted too, not only ambient and R: the preset's τ (2.3 s on the
H200, 6 s on the H100) is far slower than the measured die (a 40 ms idle window after a busy one
reads 4–6 °C cooler), and fitting only ambient and R with the preset's τ roughly doubles the
held-out error (docs/thermal-online.md). The ambient bounds keep a fit span without power
variation (one constant workload) from trading ambient against R to unphysical values.

Prediction: from the model state at the end of the fit span (the last fitted window's end, the
model's own temperature, not a reading), the fitted model driven by the measured power predicts
every later window; no later temperature is read. Per segment the report has the held-out RMSE,
max and mean error (prediction − reading, °C), the fitted parameters, the windows fitted and held
out, the same errors for the unfitted preset model (its R, C, ambient, from the same start), and,
as a diagnostic of the model class only, the in-sample RMSE of the same model fitted to the whole
segment (`whole_segment_fit_rmse_C`: what no online fit of this model can beat).

Two-node option (`model="two-node"`, `--model two-node`): a Foster die + sink model,
T = T_amb + θ_die + θ_sink, each node dθ/dt = (R·P − θ)/τ integrated exactly per constant-power
interval (`integrate_two_node`). The die starts settled at window 0's power, the sink holds the
rest of the anchor reading. Online, ambient, R_die and τ_die are fitted on the fit span; the sink
pole (τ_sink, R_sink) cannot be identified from 30 s and is held at a prior (`SinkPrior`) taken
only from *other* segments: by default leave-one-segment-out within the same GPU folder (each
other segment fitted whole on a (τ_sink, R_sink) grid, the grid point of lowest mean MSE kept;
`sink_prior`), or from another folder (`sink_prior_from`). The segment predicted never enters its
own prior. By default the report fits both models (`compare`) and carries the other model's
held-out errors per segment under "comparison". One-node stays the default model: on the
committed segments the two-node model is worse held out on 8 of 10 (docs/thermal-online.md).

CLI: `python -m analysis.reconcile.thermal_fit TRACE_DIR_OR_GPU_DIR [--fit-s 30] [--model one-node|two-node]
[--no-compare] [--sink-prior-from GPU_DIR] [--json-out FILE] [--plot FILE]`. Exit status 0 done,
2 unusable input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.reconcile.thermal_model import (Params, ThermalFitError, TwoNodeParams, Windows, predict_readings,
                                              windows_from_rows)

FIT_S = 30.0
MIN_FIT_WINDOWS = 3
AMBIENT_BOUNDS_C = (0.0, 60.0)
RESISTANCE_BOUNDS_C_PER_W = (1e-4, 1.0)
TAU_BOUNDS_S = (0.005, 3600.0)
TAU_STARTS_S = (0.1, 1.0, 10.0)
GAP_POWERS = ("idle", "hold")
GOAL_RMSE_C = 1.5
MODELS = ("one-node", "two-node")
DIE_TAU_BOUNDS_S = (0.005, 10.0)         # two-node: the die pole below, the sink pole above 10 s
SINK_TAU_BOUNDS_S = (10.0, 3600.0)
DIE_TAU_STARTS_S = (0.1, 1.0)
SINK_TAU_STARTS_S = (30.0, 300.0)
SINK_TAU_GRID_S = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
SINK_R_GRID_C_PER_W = (0.0025, 0.005, 0.01, 0.02, 0.04)


@dataclass(frozen=True)
class SinkPrior:
    """The sink pole the online two-node fit holds, taken from *other* segments only: the
    (τ_sink, R_sink) of the grid (SINK_TAU_GRID_S × SINK_R_GRID_C_PER_W) with the lowest mean
    in-sample MSE over `sources` (each fitted whole, ambient / R_die / τ_die free per segment)."""

    sink_time_constant_s: float
    sink_resistance_C_per_W: float
    mean_mse_C2: float           # of the sources at this grid point
    sources: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "sources": list(self.sources)}


@dataclass(frozen=True)
class Errors:
    windows: int
    rmse_C: float
    max_abs_C: float
    mean_C: float              # prediction − reading: > 0 predicts too hot

    @classmethod
    def of(cls, predicted_C: np.ndarray, measured_C: np.ndarray) -> "Errors":
        e = np.asarray(predicted_C, float) - np.asarray(measured_C, float)
        if e.size == 0:
            return cls(0, math.nan, math.nan, math.nan)
        return cls(int(e.size), float(np.sqrt(np.mean(e ** 2))), float(np.max(np.abs(e))), float(np.mean(e)))


@dataclass(frozen=True)
class Comparison:
    """The other model's online fit on the same segment (same fit span, gap power, start)."""

    model: str
    params: "Params | TwoNodeParams"
    held_out: Errors
    whole_segment_fit_rmse_C: float | None
    sink_prior: SinkPrior | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "fitted": self.params.to_dict(), "held_out": asdict(self.held_out),
                "whole_segment_fit_rmse_C": self.whole_segment_fit_rmse_C,
                "sink_prior": None if self.sink_prior is None else self.sink_prior.to_dict(),
                "goal_rmse_le_1.5C": bool(self.held_out.windows > 0 and self.held_out.rmse_C <= GOAL_RMSE_C)}


@dataclass
class SegmentFit:
    name: str
    fit_s: float
    gap_power: str
    gap_power_W: float | None
    fitted_tau: bool           # False: τ held at the preset's R·C
    windows_fitted: int
    windows_held_out: int
    duration_s: float
    params: "Params | TwoNodeParams"
    fit: Errors                # in-sample, fit span (windows 1..)
    held_out: Errors           # online model, windows ending after fit_s
    preset_name: str
    preset_params: Params
    preset_held_out: Errors    # unfitted preset model, same windows
    whole_segment_fit_rmse_C: float | None = None
    cost: float = math.nan
    model: str = "one-node"
    sink_prior: SinkPrior | None = None
    comparison: Comparison | None = None
    t_end_s: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    measured_C: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    predicted_C: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    preset_predicted_C: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    comparison_predicted_C: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def goal_met(self) -> bool:
        return self.held_out.windows > 0 and self.held_out.rmse_C <= GOAL_RMSE_C

    def fitted_parameters(self) -> list[str]:
        if self.model == "two-node":
            return ["ambient_C", "die_resistance_C_per_W", "die_time_constant_s"]
        return ["ambient_C", "resistance_C_per_W"] + (["time_constant_s"] if self.fitted_tau else [])

    def to_dict(self) -> dict:
        out = {"segment": self.name, "model": self.model, "fit_s": self.fit_s, "duration_s": self.duration_s,
               "gap_power": self.gap_power, "gap_power_W": self.gap_power_W,
               "fitted_parameters": self.fitted_parameters(),
               "windows_fitted": self.windows_fitted, "windows_held_out": self.windows_held_out,
               "fitted": self.params.to_dict(), "fit_span": asdict(self.fit),
               "held_out": asdict(self.held_out), "preset": self.preset_name,
               "preset_params": self.preset_params.to_dict(), "preset_held_out": asdict(self.preset_held_out),
               "whole_segment_fit_rmse_C": self.whole_segment_fit_rmse_C,
               "goal_rmse_le_1.5C": self.goal_met}
        if self.sink_prior is not None:
            out["sink_prior"] = self.sink_prior.to_dict()
        if self.comparison is not None:
            out["comparison"] = self.comparison.to_dict()
        return out


# ---------------------------------------------------------------------------- fits


def _unpack(x: np.ndarray, tau_s: float | None = None) -> Params:
    return Params(float(x[0]), float(math.exp(x[1])), float(math.exp(x[2])) if tau_s is None else float(tau_s))


def fit_params(w: Windows, n_fit: int, gap_power_W: float | None, *,
               tau_s: float | None = None) -> tuple[Params, float]:
    """Least-squares (ambient, R, τ) on windows 1..n_fit−1; (params, cost = ½Σr²). With `tau_s`
    the time constant is held there and only ambient and R are fitted."""
    from scipy.optimize import least_squares

    measured = w.temp_C[1:n_fit]
    n_free = 3 if tau_s is None else 2

    def residuals(x: np.ndarray) -> np.ndarray:
        return predict_readings(_unpack(x, tau_s), w, gap_power_W, stop=n_fit)[1:] - measured

    lower = [AMBIENT_BOUNDS_C[0], math.log(RESISTANCE_BOUNDS_C_PER_W[0]), math.log(TAU_BOUNDS_S[0])]
    upper = [AMBIENT_BOUNDS_C[1], math.log(RESISTANCE_BOUNDS_C_PER_W[1]), math.log(TAU_BOUNDS_S[1])]
    # start: ambient and R of a straight line through (mean power, mean reading) and (0 W, 30 °C)
    p_mean, t_mean = float(np.mean(w.power_W[:n_fit])), float(np.mean(w.temp_C[:n_fit]))
    r0 = min(max((t_mean - 30.0) / max(p_mean, 1.0), 2e-3), 0.5)
    amb0 = min(max(t_mean - r0 * p_mean, lower[0] + 1), upper[0] - 1)
    best = None
    for tau in (TAU_STARTS_S if tau_s is None else (tau_s,)):
        res = least_squares(residuals, [amb0, math.log(r0), math.log(tau)][:n_free],
                            bounds=(lower[:n_free], upper[:n_free]), x_scale=[10.0, 1.0, 1.0][:n_free], method="trf")
        if best is None or res.cost < best.cost:
            best = res
    return _unpack(best.x, tau_s), float(best.cost)


def fit_two_node(w: Windows, n_fit: int, gap_power_W: float | None, *,
                 sink: tuple[float, float] | None = None,
                 start: Params | None = None) -> tuple[TwoNodeParams, float]:
    """Least-squares two-node fit on windows 1..n_fit−1; (params, cost = ½Σr²).

    With `sink` = (τ_sink_s, R_sink_C_per_W) held (online, and the prior grid): ambient, R_die and
    τ_die fitted, as many free parameters as the one-node fit. Without it (the whole-segment
    diagnostic): all five fitted. `start`: a one-node fit to start from (computed if None)."""
    from scipy.optimize import least_squares

    measured = w.temp_C[1:n_fit]
    n_free = 5 if sink is None else 3

    def unpack(x: np.ndarray) -> TwoNodeParams:
        if sink is None:
            return TwoNodeParams(float(x[0]), math.exp(x[1]), math.exp(x[2]), math.exp(x[3]), math.exp(x[4]))
        return TwoNodeParams(float(x[0]), math.exp(x[1]), math.exp(x[2]), sink[1], sink[0])

    def residuals(x: np.ndarray) -> np.ndarray:
        return predict_readings(unpack(x), w, gap_power_W, stop=n_fit)[1:] - measured

    lower = np.array([AMBIENT_BOUNDS_C[0], math.log(RESISTANCE_BOUNDS_C_PER_W[0]), math.log(DIE_TAU_BOUNDS_S[0]),
                      math.log(RESISTANCE_BOUNDS_C_PER_W[0]), math.log(SINK_TAU_BOUNDS_S[0])][:n_free])
    upper = np.array([AMBIENT_BOUNDS_C[1], math.log(RESISTANCE_BOUNDS_C_PER_W[1]), math.log(DIE_TAU_BOUNDS_S[1]),
                      math.log(RESISTANCE_BOUNDS_C_PER_W[1]), math.log(SINK_TAU_BOUNDS_S[1])][:n_free])
    one = start if start is not None else fit_params(w, n_fit, gap_power_W)[0]
    r_sink0 = 0.5 * one.resistance_C_per_W if sink is None else sink[1]
    r_die0 = max(one.resistance_C_per_W - r_sink0, 2e-3)
    # ambient start: the one-node ambient less what the sink adds at the fit span's mean power
    amb0 = one.ambient_C + one.resistance_C_per_W * float(np.mean(w.power_W[:n_fit])) \
        - (r_die0 + r_sink0) * float(np.mean(w.power_W[:n_fit]))
    best = None
    for tau_die in DIE_TAU_STARTS_S:
        for tau_sink in (SINK_TAU_STARTS_S if sink is None else (sink[0],)):
            x0 = np.clip([amb0, math.log(r_die0), math.log(tau_die), math.log(r_sink0), math.log(tau_sink)][:n_free],
                         lower + 1e-9, upper - 1e-9)
            res = least_squares(residuals, x0, bounds=(lower, upper), x_scale=[10.0, 1.0, 1.0, 1.0, 1.0][:n_free],
                                method="trf")
            if best is None or res.cost < best.cost:
                best = res
    return unpack(best.x), float(best.cost)


def sink_grid_mse(w: Windows, gap_power_W: float | None) -> np.ndarray:
    """In-sample MSE (°C²) of the whole segment for every (τ_sink, R_sink) of the grid
    [len(SINK_TAU_GRID_S), len(SINK_R_GRID_C_PER_W)], ambient / R_die / τ_die fitted per point.
    This reads every temperature of `w`: use it only for segments other than the one predicted."""
    one, _ = fit_params(w, len(w), gap_power_W)
    out = np.empty((len(SINK_TAU_GRID_S), len(SINK_R_GRID_C_PER_W)))
    for a, tau in enumerate(SINK_TAU_GRID_S):
        for b, r in enumerate(SINK_R_GRID_C_PER_W):
            _, cost = fit_two_node(w, len(w), gap_power_W, sink=(tau, r), start=one)
            out[a, b] = 2.0 * cost / (len(w) - 1)
    return out


def sink_prior(grid_mse: dict[str, np.ndarray], exclude: str | None = None) -> SinkPrior:
    """The grid point with the lowest mean MSE over the segments in `grid_mse` other than `exclude`
    (each segment weighs the same)."""
    names = tuple(n for n in grid_mse if n != exclude)
    if not names:
        raise ThermalFitError("the two-node model needs at least one other segment for its sink prior")
    mean = np.mean([grid_mse[n] for n in names], axis=0)
    a, b = np.unravel_index(int(np.argmin(mean)), mean.shape)
    return SinkPrior(SINK_TAU_GRID_S[a], SINK_R_GRID_C_PER_W[b], float(mean[a, b]), names)


# ---------------------------------------------------------------------------- per segment
def preset_params(preset) -> Params:
    return Params(float(preset.ambient_C), float(preset.thermal_resistance_C_per_W),
                  float(preset.thermal_resistance_C_per_W * preset.thermal_capacitance_J_per_C))


def fit_span_size(w: Windows, fit_s: float, name: str) -> int:
    """Number of windows ending within fit_s of the first window's start (ThermalFitError if < 3)."""
    if not (math.isfinite(fit_s) and fit_s > 0):
        raise ThermalFitError(f"fit_s must be a positive number of seconds, got {fit_s}")
    in_fit = (w.t_end_s - w.t_start_s[0]) <= fit_s
    n_fit = int(np.count_nonzero(in_fit))
    if n_fit < MIN_FIT_WINDOWS or not in_fit[:n_fit].all():
        raise ThermalFitError(f"{name}: {n_fit} window(s) end within the first {fit_s:g} s; the fit needs at least "
                              f"{MIN_FIT_WINDOWS}")
    return n_fit


def gap_power_of(w: Windows, n_fit: int, gap_power: str) -> float | None:
    if gap_power not in GAP_POWERS:
        raise ThermalFitError(f"gap_power must be one of {GAP_POWERS}, got {gap_power!r}")
    return float(np.min(w.power_W[:n_fit])) if gap_power == "idle" else None


def _online_fit(w: Windows, n_fit: int, gap_W: float | None, model: str, tau_s: float | None,
                sink: SinkPrior | None) -> tuple["Params | TwoNodeParams", float]:
    if model == "two-node":
        if sink is None:
            raise ThermalFitError("the two-node model needs a sink prior (from other segments)")
        return fit_two_node(w, n_fit, gap_W, sink=(sink.sink_time_constant_s, sink.sink_resistance_C_per_W))
    return fit_params(w, n_fit, gap_W, tau_s=tau_s)


def _whole_fit_rmse(w: Windows, gap_W: float | None, model: str, tau_s: float | None) -> float:
    """In-sample RMSE of the model fitted to the whole segment (two-node: all five parameters free)."""
    if model == "two-node":
        params, _ = fit_two_node(w, len(w), gap_W)
    else:
        params, _ = fit_params(w, len(w), gap_W, tau_s=tau_s)
    return Errors.of(predict_readings(params, w, gap_W)[1:], w.temp_C[1:]).rmse_C


def fit_segment(w: Windows, preset, *, name: str = "trace", fit_s: float = FIT_S, gap_power: str = "idle",
                whole_segment: bool = True, preset_tau: bool = False, model: str = "one-node",
                sink: SinkPrior | None = None, compare: bool = False) -> SegmentFit:
    """Fit on the windows ending within fit_s of the first window's start, predict the rest.
    `preset_tau`: hold the one-node time constant at the preset's R·C and fit only ambient and R.
    `model="two-node"` needs `sink` (from other segments: `sink_prior`). `compare`: also fit the
    other model (needs `sink` too) and report its held-out errors."""
    if model not in MODELS:
        raise ThermalFitError(f"model must be one of {MODELS}, got {model!r}")
    n_fit = fit_span_size(w, fit_s, name)
    gap_W = gap_power_of(w, n_fit, gap_power)
    base = preset_params(preset)
    tau_s = base.time_constant_s if preset_tau else None
    params, cost = _online_fit(w, n_fit, gap_W, model, tau_s, sink)
    predicted = predict_readings(params, w, gap_W)      # continues from the fitted state: no reading after n_fit−1
    preset_predicted = predict_readings(base, w, gap_W)
    held = slice(n_fit, len(w))
    whole = _whole_fit_rmse(w, gap_W, model, tau_s) if whole_segment and len(w) > n_fit else None
    comparison, other_predicted = None, np.zeros(0)
    if compare:
        other = MODELS[1 - MODELS.index(model)]
        other_params, _ = _online_fit(w, n_fit, gap_W, other, tau_s, sink)
        other_predicted = predict_readings(other_params, w, gap_W)
        comparison = Comparison(other, other_params, Errors.of(other_predicted[held], w.temp_C[held]),
                                _whole_fit_rmse(w, gap_W, other, tau_s) if whole_segment and len(w) > n_fit else None,
                                sink if other == "two-node" else None)
    return SegmentFit(
        name=name, fit_s=float(fit_s), gap_power=gap_power, gap_power_W=gap_W, fitted_tau=tau_s is None,
        windows_fitted=n_fit, windows_held_out=len(w) - n_fit,
        duration_s=float(w.t_end_s[-1] - w.t_start_s[0]), params=params,
        fit=Errors.of(predicted[1:n_fit], w.temp_C[1:n_fit]),
        held_out=Errors.of(predicted[held], w.temp_C[held]),
        preset_name=str(getattr(preset, "name", "preset")), preset_params=base,
        preset_held_out=Errors.of(preset_predicted[held], w.temp_C[held]),
        whole_segment_fit_rmse_C=whole, cost=cost, model=model,
        sink_prior=sink if model == "two-node" else None, comparison=comparison,
        t_end_s=w.t_end_s - w.t_start_s[0], measured_C=w.temp_C.copy(), predicted_C=predicted,
        preset_predicted_C=preset_predicted, comparison_predicted_C=other_predicted)


def load_windows(trace_dir: str | Path) -> tuple[Windows, object]:
    """Windows of a trace folder and its MeasuredTrace (for meta/GPU)."""
    from analysis.reconcile.replay import segment_starts
    from analysis.reconcile.score import load_trace_dir

    trace = load_trace_dir(trace_dir)
    starts = segment_starts(trace.rows, trace.breaks)
    if len(starts) > 1:
        raise ThermalFitError(f"{trace_dir}: the trace holds {len(starts)} recordings (time resets); "
                              "the online fit needs one continuous recording")
    return windows_from_rows(trace.rows, name=str(trace_dir)), trace


def segment_dirs(path: str | Path) -> list[tuple[str, Path]]:
    """[(name, folder)]: one trace folder, or every segment folder of a GPU folder (name order)."""
    from analysis.reconcile.segments import is_segment_folder

    path = Path(path)
    if not path.exists():
        raise ThermalFitError(f"{path} does not exist")
    if is_segment_folder(path):
        from analysis.reconcile.segments import _holds_trace
        return [(p.name, p) for p in sorted(path.iterdir()) if _holds_trace(p)]
    return [(path.name, path)]


def segment_key(folder: Path) -> str:
    """'gpu/segment' of a segment folder: how a sink prior names its sources."""
    folder = Path(folder).resolve()
    return f"{folder.parent.name}/{folder.name}"


def sink_grids(path: str | Path, *, fit_s: float = FIT_S, gap_power: str = "idle") -> dict[str, np.ndarray]:
    """{segment_key: sink_grid_mse} for every segment of `path` (whole segments: prior material
    for the *other* segments only)."""
    grids = {}
    for _, folder in segment_dirs(path):
        w, _ = load_windows(folder)
        grids[segment_key(folder)] = sink_grid_mse(w, gap_power_of(w, fit_span_size(w, fit_s, str(folder)), gap_power))
    return grids


def run(path: str | Path, *, fit_s: float = FIT_S, preset: str | None = None, gap_power: str = "idle",
        whole_segment: bool = True, preset_tau: bool = False, model: str = "one-node", compare: bool = True,
        sink_prior_from: str | Path | None = None) -> dict:
    """Fit every segment of `path`; the report as a dict (plus the SegmentFits under '_fits').

    The two-node sink prior of a segment comes from the segments of `sink_prior_from` (default:
    `path`, i.e. leave-one-segment-out on the same GPU), never from the segment itself."""
    from analysis.reconcile.score import pick_preset

    if model not in MODELS:
        raise ThermalFitError(f"model must be one of {MODELS}, got {model!r}")
    need_sink = model == "two-node" or compare
    grids = sink_grids(path if sink_prior_from is None else sink_prior_from, fit_s=fit_s,
                       gap_power=gap_power) if need_sink else {}
    fits, gpus, base = [], set(), None
    for name, folder in segment_dirs(path):
        w, trace = load_windows(folder)
        base = pick_preset(trace, preset)
        gpus.add(trace.gpu_name)
        others = any(k != segment_key(folder) for k in grids)
        sink = sink_prior(grids, exclude=segment_key(folder)) if need_sink and (others or model == "two-node") else None
        fits.append(fit_segment(w, base, name=name, fit_s=fit_s, gap_power=gap_power, whole_segment=whole_segment,
                                preset_tau=preset_tau, model=model, sink=sink, compare=compare and sink is not None))
    held = [f for f in fits if f.windows_held_out > 0]
    return {
        "source": str(path), "gpu": sorted(g for g in gpus if g), "fit_s": fit_s, "gap_power": gap_power,
        "model": model, "compare": compare,
        "sink_prior_from": None if not need_sink or not any(f.sink_prior or f.comparison for f in fits) else str(path if sink_prior_from is None else sink_prior_from)
        + (" (leave-one-segment-out)" if sink_prior_from is None else ""),
        "estimator": _estimator_text(model, gap_power, preset_tau),
        "command": None,
        "goal_rmse_C": GOAL_RMSE_C,
        "goal_met_every_segment": bool(held) and all(f.goal_met for f in held),
        "segments": [f.to_dict() for f in fits], "_fits": fits,
    }


def _estimator_text(model: str, gap_power: str, preset_tau: bool) -> str:
    if model == "two-node":
        fitted = ("two-node Foster model (die + sink); fitted: ambient_C, die_resistance_C_per_W, die_time_constant_s; "
                  "sink time constant and resistance held at the grid point that best fits the OTHER segments "
                  "of the prior source whole (sink_prior); die starts settled at window 0's power")
    else:
        fitted = ("one-node model; fitted: ambient_C, resistance_C_per_W"
                  + (" (time constant held at the preset's R*C)" if preset_tau else
                     ", time_constant_s (capacitance = tau/R)"))
    return ("scipy.optimize.least_squares (trf, bounded) of reading residuals over the fit span; " + fitted
            + "; measured window power drives the exact constant-power RC solution (leakage inside the "
              "measured power); host gaps at the " + ("lowest fit-span window power" if gap_power == "idle"
                                                      else "previous window's power")
            + "; reading = T - 0.5 C; prediction continues from the fitted state at the fit span's end")


# ---------------------------------------------------------------------------- output
def table(report: dict) -> str:
    head = (f"{'segment':<26}{'fit/held':>10}{'ambient_C':>10}{'R_C/W':>9}{'tau_s':>8}"
            f"{'online RMSE':>12}{'max':>6}{'preset RMSE':>12}{'whole-fit':>10}{'other model':>14}")
    lines = [f"model: {report.get('model', 'one-node')}", head]
    for s in report["segments"]:
        f, h, p = s["fitted"], s["held_out"], s["preset_held_out"]
        whole = s["whole_segment_fit_rmse_C"]
        tau = f.get("time_constant_s", f.get("die_time_constant_s"))
        other = s.get("comparison")
        lines.append(f"{s['segment']:<26}{s['windows_fitted']:>4}/{s['windows_held_out']:<5}{f['ambient_C']:>10.1f}"
                     f"{f['resistance_C_per_W']:>9.4f}{tau:>8.2f}{h['rmse_C']:>12.2f}"
                     f"{h['max_abs_C']:>6.1f}{p['rmse_C']:>12.2f}{'' if whole is None else f'{whole:.2f}':>10}"
                     f"{'' if other is None else other['model'] + ' ' + format(other['held_out']['rmse_C'], '.2f'):>14}")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nectar.experiment.outputs import atomic_write

    fits: list[SegmentFit] = report["_fits"]
    fig, axes = plt.subplots(len(fits), 1, figsize=(9, 2.1 * len(fits)), squeeze=False)
    for ax, f in zip(axes[:, 0], fits):
        ax.step(f.t_end_s, f.measured_C, where="post", color="0.3", lw=0.8, label="measured (whole °C)")
        ax.plot(f.t_end_s, f.preset_predicted_C, color="tab:orange", lw=0.8, alpha=0.8,
                label=f"preset ({f.preset_held_out.rmse_C:.2f} °C)")
        ax.plot(f.t_end_s, f.predicted_C, color="tab:blue", lw=0.9,
                label=f"{f.model} online fit ({f.held_out.rmse_C:.2f} °C held out)")
        if f.comparison is not None:
            ax.plot(f.t_end_s, f.comparison_predicted_C, color="tab:green", lw=0.8, alpha=0.8,
                    label=f"{f.comparison.model} online fit ({f.comparison.held_out.rmse_C:.2f} °C held out)")
        ax.axvline(f.fit_s, color="k", ls="--", lw=0.8)
        ax.set_title(f"{f.name}: fitted on the first {f.fit_s:g} s ({f.windows_fitted} windows), "
                     f"{f.windows_held_out} held out", fontsize=8)
        ax.set_ylabel("°C", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left", ncol=4)
    axes[-1, 0].set_xlabel("time since the segment's first window (s)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=55, format="png"))
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.reconcile.thermal_fit",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("trace_dir", type=Path, metavar="TRACE_DIR_OR_GPU_DIR",
                   help="a trace folder, or a GPU folder of segment folders (data/traces/h200)")
    p.add_argument("--fit-s", type=float, default=FIT_S, help="seconds of telemetry the online fit may use")
    p.add_argument("--preset", default=None, help="preset to compare with (default: by the trace's GPU)")
    p.add_argument("--gap-power", choices=GAP_POWERS, default="idle",
                   help="power between windows: lowest fit-span window power (idle) or the previous window's (hold)")
    p.add_argument("--preset-tau", action="store_true",
                   help="hold the time constant at the preset's R*C; fit only ambient and R (comparison)")
    p.add_argument("--model", choices=MODELS, default="one-node",
                   help="thermal model fitted online: one RC node, or die + sink (sink pole from other segments)")
    p.add_argument("--no-compare", action="store_true",
                   help="do not also fit the other model (skips the sink-prior grid unless --model two-node)")
    p.add_argument("--sink-prior-from", type=Path, default=None, metavar="GPU_DIR",
                   help="segments whose whole-segment fits give the two-node sink prior "
                        "(default: TRACE_DIR_OR_GPU_DIR itself, leaving out the segment predicted)")
    p.add_argument("--no-whole-fit", action="store_true", help="skip the whole-segment in-sample fit (diagnostic)")
    p.add_argument("--json-out", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of measured vs predicted temperature")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "thermal_fit"
    try:
        if not (math.isfinite(args.fit_s) and args.fit_s > 0):
            raise ThermalFitError(f"--fit-s must be a positive number of seconds, got {args.fit_s}")
        for out in (args.json_out, args.plot):
            if out is not None and not out.absolute().parent.is_dir():
                raise ThermalFitError(f"{out}: the folder {out.absolute().parent} does not exist")
        report = run(args.trace_dir, fit_s=args.fit_s, preset=args.preset, gap_power=args.gap_power,
                     whole_segment=not args.no_whole_fit, preset_tau=args.preset_tau, model=args.model,
                     compare=not args.no_compare, sink_prior_from=args.sink_prior_from)
        report["command"] = "python -m analysis.reconcile.thermal_fit " + " ".join(
            str(a) for a in (sys.argv[1:] if argv is None else argv))
        print(table(report))
        print(f"goal (held-out RMSE <= {GOAL_RMSE_C} C on every segment): "
              f"{'met' if report['goal_met_every_segment'] else 'NOT met'}")
        if args.json_out is not None:
            from nectar.cli.common import strict_json
            from nectar.experiment.outputs import atomic_write_text

            public = {k: v for k, v in report.items() if not k.startswith("_")}
            atomic_write_text(args.json_out, strict_json(public, indent=2) + "\n")
        if args.plot is not None:
            write_plot(report, args.plot)
    except (ValueError, OSError, EOFError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        print(f"{prog}: error: {first}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
