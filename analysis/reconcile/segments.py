"""Reconciliation held out by segment: calibrate on one segment of a GPU's traces, predict the others.

A GPU folder `data/traces/<gpu>/` holds one trace folder per segment of `nectar hw-run` (main,
thermal, power, long). `reconcile_by_segment` calibrates the simulator on every row of one
segment (default `main`: all policies, interleaved, plus the warm-up, idle and calibration
windows) and replays every segment with the calibrated preset and with the base preset. The
other segments are held out entirely: a different schedule (policies one after the other), other
limits (a temperature cap, a power budget), another session (`long`). For each segment it reports
the per-chunk metrics of `analysis.reconcile.score.metrics` and, per policy, the saving versus
static-top2 in that segment, measured and simulated over the same chunk windows — the number
the simulator exists to predict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from analysis.reconcile.calibrate import CalibrationConfig, CalibrationResult, calibrate
from analysis.reconcile.replay import ReplayRow, replay_trace
from analysis.reconcile.score import GOALS, MeasuredTrace, Metrics, find_traces, load_trace_dir, metrics
from sim.presets import GPUPreset

BASELINE = "static-top2"
CALIBRATION_SEGMENT = "main"


@dataclass(frozen=True)
class PolicySaving:
    """One policy's energy per token in one segment, measured and simulated, and its saving vs static-top2."""

    policy: str
    chunks: int
    measured_mJ_per_token: float
    simulated_mJ_per_token: float
    measured_saving: float | None      # 1 − J/J_static-top2 (None for the baseline or without one)
    simulated_saving: float | None

    @property
    def gap_points(self) -> float | None:
        """Simulated minus measured saving, in percentage points."""
        if self.measured_saving is None or self.simulated_saving is None:
            return None
        return 100.0 * (self.simulated_saving - self.measured_saving)

    def to_dict(self) -> dict:
        return {**asdict(self), "gap_points": self.gap_points}


@dataclass
class SegmentScore:
    name: str
    held_out: bool                     # False for the calibration segment (in-sample)
    calibrated: Metrics
    base: Metrics                      # the base (uncalibrated) preset on the same windows
    savings: list[PolicySaving]
    replay: list[ReplayRow] = field(repr=False, default_factory=list)
    diagnosis: object | None = None    # analysis.reconcile.diagnose.SegmentDiagnosis, when asked for

    def to_dict(self) -> dict:
        out = {"segment": self.name, "held_out": self.held_out, "calibrated": self.calibrated.to_dict(),
               "base_preset": self.base.to_dict(), "savings": [s.to_dict() for s in self.savings]}
        if self.diagnosis is not None:
            out["diagnosis"] = self.diagnosis.to_dict()
        return out


@dataclass
class SegmentReconciliation:
    source: str
    gpu_name: str | None
    base_preset: str
    calibrate_on: str
    calibration: CalibrationResult
    segments: list[SegmentScore]
    warnings: list[str] = field(default_factory=list)
    preset_path: Path | None = None

    def held_out(self) -> list[SegmentScore]:
        return [s for s in self.segments if s.held_out]

    def goals_met(self) -> dict[str, bool]:
        """The issue's goals on every held-out segment (False when there is none)."""
        held = self.held_out()
        gaps = [abs(p.gap_points) for s in held for p in s.savings if p.gap_points is not None]
        return {
            "energy_mape_le_3pct": bool(held) and all(s.calibrated.energy_mape <= GOALS["energy_mape"] for s in held),
            "temp_rmse_le_1.5C": bool(held) and all(s.calibrated.temp_rmse_C <= GOALS["temp_rmse_C"] for s in held),
            "saving_within_3_points": bool(gaps) and max(gaps) <= GOALS["saving_points"],
        }

    def to_dict(self) -> dict:
        return {"source": self.source, "gpu": self.gpu_name, "base_preset": self.base_preset, "mode": "by-segment",
                "calibrate_on": self.calibrate_on, "calibration": self.calibration.to_dict(),
                "segments": [s.to_dict() for s in self.segments], "goals": self.goals_met(),
                "preset_path": None if self.preset_path is None else str(self.preset_path),
                "warnings": list(self.warnings)}


def is_segment_folder(path: str | Path) -> bool:
    """A folder with no trace of its own whose sub-folders hold traces (data/traces/<gpu>/)."""
    path = Path(path)
    if not path.is_dir() or any((path / name).is_file() for name in ("trace.csv.gz", "trace.csv")):
        return False
    if any(p.is_file() for p in path.glob("*.csv.gz")):
        return False
    return any(_holds_trace(p) for p in path.iterdir())


def _holds_trace(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        find_traces(path)
    except ValueError:
        return False
    return True


def load_segments(path: str | Path) -> dict[str, MeasuredTrace]:
    """{segment name: trace} of a GPU folder, in name order with the calibration segment first."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"trace folder {str(path)!r} does not exist")
    folders = sorted((p for p in path.iterdir() if _holds_trace(p)), key=lambda p: (p.name != CALIBRATION_SEGMENT, p.name))
    if not folders:
        raise ValueError(f"{str(path)!r} holds no segment folders with traces (expected <segment>/trace.csv.gz, "
                         "as `nectar hw-run` writes them)")
    return {p.name: load_trace_dir(p) for p in folders}


def policy_savings(replayed: Sequence[ReplayRow], rows: Sequence) -> list[PolicySaving]:
    """Per policy (stream chunks only, not guard checks), J/token measured and simulated and the saving."""
    totals: dict[str, list[float]] = {}
    for r in replayed:
        if not (r.is_chunk and r.valid and r.kind == "chunk") or ":" in r.policy:
            continue
        tokens = rows[r.index].workload.tokens
        entry = totals.setdefault(r.policy, [0, 0.0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += tokens
        entry[2] += r.measured_energy_J
        entry[3] += r.sim_energy_J
    base = totals.get(BASELINE)

    def saving(policy: str, per_token: float, column: int) -> float | None:
        if base is None or policy == BASELINE:
            return None
        return 1.0 - per_token / (base[column] / base[1])

    return [PolicySaving(policy, int(chunks), 1e3 * measured / tokens, 1e3 * simulated / tokens,
                         saving(policy, measured / tokens, 2), saving(policy, simulated / tokens, 3))
            for policy, (chunks, tokens, measured, simulated) in totals.items()]


def score_segment(name: str, trace: MeasuredTrace, calibrated: GPUPreset, base: GPUPreset,
                  config: CalibrationConfig, held_out: bool) -> SegmentScore:
    options = config.replay_options()
    replayed = replay_trace(trace.rows, calibrated, breaks=trace.breaks, **options)
    uncalibrated = replay_trace(trace.rows, base, breaks=trace.breaks, **options)
    return SegmentScore(name, held_out, metrics(replayed), metrics(uncalibrated), policy_savings(replayed, trace.rows),
                        replayed)


def reconcile_by_segment(segments: dict[str, MeasuredTrace], base: GPUPreset, config: CalibrationConfig | None = None,
                         *, calibrate_on: str = CALIBRATION_SEGMENT, progress: bool = False,
                         source: str = "") -> SegmentReconciliation:
    """Calibrate on every row of `segments[calibrate_on]`, score every segment (the others held out)."""
    config = config or CalibrationConfig()
    if calibrate_on not in segments:
        raise ValueError(f"no segment {calibrate_on!r} to calibrate on; the folder has {sorted(segments)}")
    train = segments[calibrate_on]
    held = ", ".join(name for name in segments if name != calibrate_on) or "none"
    where = f"{source}/{calibrate_on}" if source else calibrate_on
    calibration = calibrate(train.rows, base, config, breaks=train.breaks, progress=progress, all_rows=True,
                            data_name=f"every window of segment {where} (held out: {held}),")
    scores = [score_segment(name, trace, calibration.preset, base, config, held_out=name != calibrate_on)
              for name, trace in segments.items()]
    result = SegmentReconciliation(source, train.gpu_name, base.name, calibrate_on, calibration, scores)
    result.warnings = _warnings(segments, scores)
    return result


def _warnings(segments: dict[str, MeasuredTrace], scores: list[SegmentScore]) -> list[str]:
    out = []
    gpus = {name: t.gpu_name for name, t in segments.items()}
    if len(set(gpus.values())) > 1:
        out.append(f"the segments name different GPUs: {gpus}")
    if not any(s.held_out for s in scores):
        out.append("only the calibration segment was found: nothing is held out")
    for s in scores:
        if s.calibrated.chunks == 0 or not math.isfinite(s.calibrated.energy_mape):
            out.append(f"segment {s.name} has no chunk window with a usable measurement")
    return out
