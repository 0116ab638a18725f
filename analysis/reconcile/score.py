"""Simulated vs measured: load a trace directory, calibrate on its first part, score the rest.

`reconcile(trace, base)` calibrates the simulator (analysis.reconcile.calibrate) on the chronological
training split, replays the whole trace with the calibrated preset (the held-out chunks need the
thermal history before them) and with the uncalibrated one, and reports per-chunk metrics on
both splits: energy MAPE, total-energy error, temperature RMSE and duration MAPE. Errors are
fractions (0.031 = 3.1 %); `ReconcileResult.to_dict()` adds percentages for people.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.reconcile.calibrate import CalibrationConfig, CalibrationResult, calibrate
from analysis.reconcile.replay import (MIN_SCORED_WINDOW_S, ReplayRow, chronological, replay_trace, segment_starts,
                                      unsimulated_load)
from nectar.telemetry.trace import TraceRow, read_meta, read_trace
from sim.presets import GPUPreset, list_presets, load_preset

TRACE_NAMES = ("trace.csv.gz", "trace.csv")
GOALS = {"energy_mape": 0.03, "temp_rmse_C": 1.5, "saving_points": 3.0}   # held-out goals on measured traces


@dataclass
class MeasuredTrace:
    """The rows of one or more trace files; `breaks` marks rows that start another file."""

    rows: list[TraceRow]
    breaks: frozenset[int]
    meta: dict
    paths: list[Path]

    @property
    def backend(self) -> str:
        return str(self.meta.get("backend", "unknown"))

    @property
    def gpu_name(self) -> str | None:
        return self.meta.get("gpu_name") or self.meta.get("gpu")


@dataclass(frozen=True)
class Metrics:
    """Per-chunk agreement over one set of chunk windows."""

    chunks: int
    energy_mape: float           # mean |E_sim − E_meas| / E_meas
    total_energy_error: float    # (ΣE_sim − ΣE_meas) / ΣE_meas, signed
    temp_rmse_C: float
    duration_mape: float
    measured_energy_J: float
    simulated_energy_J: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReconcileResult:
    source: str
    gpu_name: str | None
    base_preset: str
    chunks: int                  # chunk windows with a usable measurement
    train: Metrics
    heldout: Metrics
    heldout_uncalibrated: Metrics
    calibration: CalibrationResult
    replay: list[ReplayRow] = field(repr=False)                # whole trace, calibrated preset
    replay_uncalibrated: list[ReplayRow] = field(repr=False)
    preset_path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def split_row(self) -> int:
        return self.calibration.split_row

    def goals_met(self) -> dict[str, bool]:
        return {"energy_mape_le_3pct": self.heldout.energy_mape <= GOALS["energy_mape"],
                "temp_rmse_le_1.5C": self.heldout.temp_rmse_C <= GOALS["temp_rmse_C"]}

    def to_dict(self) -> dict:
        h = self.heldout
        return {
            "source": self.source, "gpu": self.gpu_name, "base_preset": self.base_preset,
            "chunks": self.chunks, "train_chunks": self.train.chunks, "heldout_chunks": h.chunks,
            "heldout_energy_mape": h.energy_mape, "total_energy_error": h.total_energy_error,
            "temp_rmse_C": h.temp_rmse_C, "duration_mape": h.duration_mape,
            "heldout_energy_mape_pct": 100 * h.energy_mape, "total_energy_error_pct": 100 * h.total_energy_error,
            "train": self.train.to_dict(), "heldout": h.to_dict(),
            "heldout_uncalibrated": self.heldout_uncalibrated.to_dict(),
            "goals": self.goals_met(), "calibration": self.calibration.to_dict(),
            "preset_path": None if self.preset_path is None else str(self.preset_path),
            "warnings": list(self.warnings),
        }


def find_traces(path: str | Path) -> list[Path]:
    """The trace files of a trace directory (trace.csv.gz / trace.csv, else every *.csv.gz), or a file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"trace directory {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    for name in TRACE_NAMES:
        if (path / name).is_file():
            return [path / name]
    found = sorted(p for p in path.glob("*.csv.gz") if p.is_file())
    if not found:
        raise ValueError(f"{str(path)!r} holds no trace: expected {' or '.join(TRACE_NAMES)} (or *.csv.gz files) "
                         "written by `nectar run` / `nectar hw-run`")
    return found


REPAIRED_COUNTER_FLAGS = ("counter_reset", "counter_wrap")


def check_counter(rows: Sequence[TraceRow], file: Path) -> None:
    """ValueError when the energy counter runs backwards, inside a window or from one window to the
    next of the same recording, where the reader did not flag a reset or a wrap: such a trace is
    corrupted, and its energies would be silently wrong."""
    starts = set(segment_starts(rows))
    previous_end = None
    for i, row in enumerate(rows):
        w = row.window
        flagged = any(flag in w.flags for flag in REPAIRED_COUNTER_FLAGS)
        start, end = w.energy_mJ_start, w.energy_mJ_end
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (start, end))
        if i in starts:
            previous_end = None
        if finite and not flagged:
            if end < start:
                raise ValueError(f"trace {file} row {i + 2} ({row.kind}, {row.policy!r}): the energy counter runs "
                                 f"backwards ({start} -> {end} mJ) with no counter_reset/counter_wrap flag; "
                                 "the trace is corrupted")
            if previous_end is not None and start < previous_end:
                raise ValueError(f"trace {file} row {i + 2} ({row.kind}, {row.policy!r}): the energy counter starts "
                                 f"at {start} mJ, below the previous window's end ({previous_end} mJ), with no "
                                 "counter_reset/counter_wrap flag; the trace is corrupted")
        previous_end = end if finite else previous_end
        if flagged:
            previous_end = None


def load_trace_dir(path: str | Path) -> MeasuredTrace:
    """Read every trace file of `path` and its meta.json (optional); clear errors when unusable."""
    files = find_traces(path)
    rows: list[TraceRow] = []
    breaks: set[int] = set()
    for file in files:
        try:
            part = chronological(read_trace(file))
        except (ValueError, OSError, EOFError) as exc:  # EOFError: truncated gzip
            raise ValueError(f"cannot read trace {str(file)!r}: {exc}") from exc
        check_counter(part, file)
        if rows and part:
            breaks.add(len(rows))
        rows.extend(part)
    if not rows:
        raise ValueError(f"the trace in {str(path)!r} has no rows")
    meta_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    meta = read_meta(meta_dir) if (meta_dir / "meta.json").is_file() else {}
    return MeasuredTrace(rows, frozenset(breaks), meta, files)


def pick_preset(trace: MeasuredTrace, preset: str | Path | GPUPreset | None = None) -> GPUPreset:
    """`preset` if given, else the shipped preset whose gpu_name matches the trace's GPU."""
    if preset is not None:
        return load_preset(preset)
    name = trace.gpu_name
    for candidate in list_presets():
        shipped = load_preset(candidate)
        if name and shipped.gpu_name == name:
            return shipped
    raise ValueError(f"no shipped preset matches the trace's GPU {name!r} (meta.json gpu_name/gpu); "
                     f"pass --preset with one of {list_presets()} or a preset JSON path")


def metrics(replayed: Sequence[ReplayRow]) -> Metrics:
    """Metrics over the chunk windows of `replayed` whose measurement is usable."""
    rows = [r for r in replayed if r.is_chunk and r.valid]
    if not rows:
        nan = math.nan
        return Metrics(0, nan, nan, nan, nan, 0.0, 0.0)
    measured = np.array([r.measured_energy_J for r in rows])  # [N]
    simulated = np.array([r.sim_energy_J for r in rows])       # [N]
    temp_error = np.array([r.sim_temp_C - r.measured_temp_C for r in rows])  # [N]
    duration_ratio = np.array([r.sim_duration_s / r.measured_duration_s for r in rows])  # [N]
    return Metrics(
        chunks=len(rows),
        energy_mape=float(np.mean(np.abs(simulated - measured) / measured)),
        total_energy_error=float(simulated.sum() / measured.sum() - 1.0),
        temp_rmse_C=float(np.sqrt(np.mean(temp_error ** 2))),
        duration_mape=float(np.mean(np.abs(duration_ratio - 1.0))),
        measured_energy_J=float(measured.sum()), simulated_energy_J=float(simulated.sum()),
    )


def reconcile(trace: MeasuredTrace, base: GPUPreset, config: CalibrationConfig | None = None, *,
              progress: bool = False) -> ReconcileResult:
    """Calibrate on the training split, then score both splits (and the base preset on held-out)."""
    config = config or CalibrationConfig()
    calibration = calibrate(trace.rows, base, config, breaks=trace.breaks, progress=progress)
    split = calibration.split_row
    replayed = replay_trace(trace.rows, calibration.preset, breaks=trace.breaks, **config.replay_options())
    uncalibrated = replay_trace(trace.rows, base, breaks=trace.breaks, **config.replay_options())
    train, heldout = metrics(replayed[:split]), metrics(replayed[split:])
    result = ReconcileResult(
        source=", ".join(str(p) for p in trace.paths), gpu_name=trace.gpu_name, base_preset=base.name,
        chunks=train.chunks + heldout.chunks, train=train, heldout=heldout,
        heldout_uncalibrated=metrics(uncalibrated[split:]), calibration=calibration,
        replay=replayed, replay_uncalibrated=uncalibrated,
    )
    result.warnings = _warnings(replayed, calibration.preset)
    return result


def _warnings(replayed: Sequence[ReplayRow], preset: GPUPreset) -> list[str]:
    out = []
    busy = unsimulated_load(replayed, preset.idle_power_W)
    if busy:
        energy = sum(r.measured_energy_J for r in busy)
        out.append(f"{len(busy)} window(s) without a workload measured well above idle power ({energy:.0f} J in "
                   f"total, rows {[r.index for r in busy][:10]}); they were replayed as idle, so the simulated "
                   "GPU runs cooler after them. Record their workload to replay them.")
    unscored = [r for r in replayed if r.is_chunk and not r.valid]
    short = sum(math.isfinite(r.measured_duration_s) and r.measured_duration_s < MIN_SCORED_WINDOW_S for r in unscored)
    if short:
        out.append(f"{short} chunk window(s) shorter than {MIN_SCORED_WINDOW_S} s (below the energy counter's period, "
                   "e.g. the quality guard's checks) were replayed but not scored.")
    if len(unscored) > short:
        out.append(f"{len(unscored) - short} chunk window(s) had no usable measurement (NaN or non-positive energy) "
                   "and were not scored.")
    return out
