"""Replay a recorded trace through the simulator with the same workloads and the same timing.

Each trace row is one telemetry window. A row with a workload is run on a `SimBackend` built
from the given preset (`run_chunk`); with `timing="measured"` (the default) a window whose
kernels the simulator finishes early is padded with idle time up to the window's measured length
(the real GPU spent that time too: host work inside the window, launch gaps), so simulated and
measured energy cover the same wall time; `sim_duration_s` stays the kernels' own duration, for
the duration metric. A row without one (a controller pause, an idle
measurement) idles the simulated GPU for the measured duration (a non-idle window without a
workload, e.g. an undescribed calibration burst, cannot be simulated: it is replayed as idle too,
never scored, and `unsimulated_load` lists it). The unmeasured time *between*
two windows (host work, Python, data loading) is replayed as idle of the measured length, so the
simulated GPU cools between chunks exactly as long as the real one did. A window that starts
before the previous one ended begins a new recording (e.g. the next policy of a simulated run, a
second trace file): the replay then starts a fresh simulated GPU.

The simulator's side of each row is its noise-free truth (`SimBackend.last_truth`): energy,
duration and the expected temperature reading (true temperature minus `TEMP_READING_OFFSET_C`,
the mean loss of NVML's truncation to whole °C). The measured side is the row's own window;
`measured_energy_J` picks the counter or the integrated instant power (ENERGY_SOURCES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.trace import TraceRow
from sim.backend import SimBackend
from sim.presets import GPUPreset

TEMP_READING_OFFSET_C = 0.5     # E[T − floor(T)]: NVML reports whole degrees
OVERLAP_TOLERANCE_S = 1e-3      # a window starting earlier than this before the last one ended: new recording
ENERGY_SOURCES = ("auto", "mean", "counter", "power")
TIMINGS = ("measured", "simulated")
SCORED_KINDS = ("chunk", "calibration")  # warmup windows are replayed (heat) but never scored
SENSOR_PERIOD_REPLAY_S = 1.0


@dataclass(frozen=True)
class ReplayRow:
    """One trace row, measured and simulated side by side."""

    index: int                   # position in the trace
    kind: str
    policy: str
    chunk_index: int | None
    is_chunk: bool               # has a workload and a scored kind: counts in per-chunk metrics
    is_idle: bool                # an "idle" window without a workload: the GPU really idled (fits idle power)
    valid: bool                  # the measured window is usable (finite, positive energy and duration)
    measured_energy_J: float
    measured_duration_s: float
    measured_temp_C: float
    sim_energy_J: float
    sim_duration_s: float
    sim_temp_C: float            # expected sensor reading at the window's end
    t_measured_s: float          # window end on the measured clock


def measured_energy_J(window: TelemetryWindow, source: str = "auto") -> float:
    """The measured energy of a window.

    "counter": the window's best estimate (`energy_J`: the counter difference, or integrated power
    where the reader flagged the counter untrustworthy). "power": the integrated instant power.
    "auto": the integrated power when the window has at least two instant-power samples, else the
    counter. Why: the counter only moves every ~100 ms, so a window's counter difference covers an
    interval shifted back by up to one update; for sub-second windows that follow idle time this
    undercounts systematically (≈6 % for 0.5 s chunks on the simulated H100, whose integrated power
    is within 0.1 % of the truth). "mean" (the reconciliation's default): the mean of the two when
    both exist, else whichever does. On the committed H100 traces the two disagree by ~5 % per
    sub-second chunk but not on average (−0.6 … +1.6 % over a trace): their errors (counter
    quantisation, power sampling) are largely independent, so their mean is the less noisy reading.
    """
    if source not in ENERGY_SOURCES:
        raise ValueError(f"energy source must be one of {ENERGY_SOURCES}, got {source!r}")
    power = window.energy_power_J
    has_power = power is not None and math.isfinite(power) and window.samples >= 2
    if source == "power":
        return float(power) if has_power else math.nan
    if source == "auto" and has_power:
        return float(power)
    counter = float(window.energy_J)
    if source == "mean" and has_power:
        return 0.5 * (counter + float(power)) if math.isfinite(counter) and counter > 0 else float(power)
    return counter


def is_scored_chunk(row: TraceRow) -> bool:
    """A row that counts in per-chunk metrics: it carries a workload and is a chunk/calibration window."""
    return row.workload is not None and row.kind in SCORED_KINDS


def unsimulated_load(replayed: Sequence[ReplayRow], idle_power_W: float, factor: float = 1.5) -> list[ReplayRow]:
    """Windows replayed as idle (no workload) that measured well above idle power: the replay
    underheats after them, so a report should say so."""
    return [r for r in replayed if not r.is_chunk and not r.is_idle and r.valid
            and r.measured_energy_J / r.measured_duration_s > factor * idle_power_W]


MIN_SCORED_WINDOW_S = 0.1  # shorter windows (e.g. the quality guard's) are below the counter's period


def usable_window(window: TelemetryWindow, energy_J: float) -> bool:
    """Finite, positive energy, a finite temperature and a duration of at least one NVML counter
    period (docs/design.md §5: shorter windows measure nothing reliable): the window can be compared."""
    values = (energy_J, window.duration_s, window.gpu_temp_C)
    return (all(math.isfinite(v) for v in values) and energy_J > 0
            and window.duration_s >= MIN_SCORED_WINDOW_S)


def chronological(rows: Sequence[TraceRow]) -> list[TraceRow]:
    """The rows in time order when they come from one clock (one device), else as they are.

    A run writes its trace policy by policy; with interleaved policies on one GPU the windows of
    different policies alternate in time, and replaying them in file order would put the other
    policies' busy time between two chunks as idle gaps. When the windows sorted by start time
    never overlap they are one recording on one clock and are replayed in that order; overlapping
    windows mean separate recordings (e.g. each policy on its own simulated GPU from t = 0), which
    keep their order and start a fresh simulated GPU each (`segment_starts`)."""
    ordered = sorted(rows, key=lambda r: r.window.t_start_s)
    overlap = any(b.window.t_start_s < a.window.t_end_s - OVERLAP_TOLERANCE_S for a, b in zip(ordered, ordered[1:]))
    return list(rows) if overlap else ordered


def segment_starts(rows: Sequence[TraceRow], breaks: frozenset[int] = frozenset()) -> list[int]:
    """Row indices where a new recording starts: row 0, every forced break, every time reset."""
    starts = [0] if rows else []
    for i in range(1, len(rows)):
        jumped_back = rows[i].window.t_start_s < rows[i - 1].window.t_end_s - OVERLAP_TOLERANCE_S
        if i in breaks or jumped_back:
            starts.append(i)
    return starts


def truth_only(preset: GPUPreset) -> GPUPreset:
    """`preset` with its simulated sensor ticking once every SENSOR_PERIOD_REPLAY_S.

    The replay reads only the GPU's noise-free truth, which the sensor never influences (it only
    reads); slower sensor processes just mean fewer simpy events (the 10 ms power sampler is most of
    a replay's cost). tests/test_reconcile.py checks that the truth is unchanged.
    """
    period = max(SENSOR_PERIOD_REPLAY_S, preset.instant_sample_period_s)
    return preset.replace(instant_sample_period_s=period, temperature_period_s=max(period, preset.temperature_period_s),
                          energy_counter_period_s=max(period, preset.energy_counter_period_s),
                          power_average_window_s=max(period, preset.power_average_window_s))


def _fresh_backend(preset: GPUPreset, rows: Sequence[TraceRow], start: int, initial_temp: str,
                   options: dict | None = None) -> SimBackend:
    """A simulated GPU for the recording starting at `start`, at the measured starting temperature;
    `options`: more SimBackend keywords (e.g. a cost table to price by)."""
    if initial_temp == "measured":
        temp = rows[start].window.gpu_temp_C
        if math.isfinite(temp):
            preset = preset.replace(initial_temp_C=float(temp) + TEMP_READING_OFFSET_C)
    return SimBackend(preset=preset, seed=0, **(options or {}))


def _simulate(backend: SimBackend, row: TraceRow, timing: str = "measured") -> tuple[float, float, float]:
    """Run one row on `backend`; (energy J, kernel duration s, true end temperature °C)."""
    measured_s = row.window.duration_s if math.isfinite(row.window.duration_s) else 0.0
    if row.workload is None:
        backend.idle(max(measured_s, 0.0))
        truth = backend.last_truth
        return truth.energy_J, truth.t_end_s - truth.t_start_s, truth.temp_end_C
    backend.run_chunk(lambda: row.workload)
    truth = backend.last_truth
    energy, kernels_s = truth.energy_J, truth.t_end_s - truth.t_start_s
    remaining = measured_s - kernels_s
    if remaining > 0 and (row.kind == "warmup" or timing == "measured"):  # the real window lasted longer
        backend.idle(remaining)
        energy += backend.last_truth.energy_J
    if row.kind == "warmup":  # first-call overheads belong to the warm-up window's duration
        kernels_s = backend.last_truth.t_end_s - truth.t_start_s
    return energy, kernels_s, backend.last_truth.temp_end_C


def replay_trace(rows: Sequence[TraceRow], preset: GPUPreset, *, stop: int | None = None,
                 breaks: frozenset[int] = frozenset(), energy_source: str = "mean",
                 initial_temp: str = "measured", fast_sensor: bool = False, timing: str = "measured",
                 backend_options: dict | None = None) -> list[ReplayRow]:
    """Replay rows[:stop] on simulated GPUs built from `preset` (and `backend_options`, more
    SimBackend keywords such as `cost_table`); one ReplayRow per row.

    `initial_temp`: "measured" starts each recording at its first measured temperature,
    "preset" at the preset's own initial (or idle steady-state) temperature. The simulated sensor
    runs at its preset rates only with `fast_sensor=True` (same results, slower; see `truth_only`).
    """
    if not isinstance(preset, GPUPreset):
        raise ValueError(f"replay needs a GPUPreset, got {type(preset).__name__}")
    if initial_temp not in ("measured", "preset"):
        raise ValueError(f"initial_temp must be 'measured' or 'preset', got {initial_temp!r}")
    if energy_source not in ENERGY_SOURCES:
        raise ValueError(f"energy source must be one of {ENERGY_SOURCES}, got {energy_source!r}")
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    stop = len(rows) if stop is None else max(0, min(stop, len(rows)))
    preset = preset if fast_sensor else truth_only(preset)
    starts = set(segment_starts(rows[:stop], breaks))
    out: list[ReplayRow] = []
    backend: SimBackend | None = None
    for i in range(stop):
        row, window = rows[i], rows[i].window
        try:
            if i in starts:
                backend = _fresh_backend(preset, rows, i, initial_temp, backend_options)
            elif window.t_start_s - rows[i - 1].window.t_end_s > 0:
                backend.idle(window.t_start_s - rows[i - 1].window.t_end_s)   # unmeasured host time
            energy, duration, temp = _simulate(backend, row, timing)
        except ValueError as exc:
            raise ValueError(f"trace row {i} ({row.kind}, policy {row.policy!r}) cannot be replayed: {exc}") from exc
        measured = measured_energy_J(window, energy_source)
        out.append(ReplayRow(
            index=i, kind=row.kind, policy=row.policy, chunk_index=row.chunk_index,
            is_chunk=is_scored_chunk(row), is_idle=row.workload is None and row.kind == "idle",
            valid=usable_window(window, measured),
            measured_energy_J=measured, measured_duration_s=window.duration_s, measured_temp_C=window.gpu_temp_C,
            sim_energy_J=energy, sim_duration_s=duration, sim_temp_C=temp - TEMP_READING_OFFSET_C,
            t_measured_s=window.t_end_s,
        ))
    return out
