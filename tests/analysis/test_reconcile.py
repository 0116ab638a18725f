"""Reconciliation: replay, calibration and metrics against synthetic "measured" traces whose truth
is known (a perturbed preset played the real GPU), and on committed real traces when present."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from analysis.reconcile.calibrate import CalibrationConfig, calibrate, split_row
from analysis.reconcile.score import load_trace_dir, metrics, pick_preset, reconcile
from analysis.reconcile.cli import main as reconcile_main
from analysis.reconcile.replay import ReplayRow, measured_energy_J, replay_trace, segment_starts
from analysis.reconcile.synthetic_trace import Schedule, perturbed_preset, synthetic_measured_rows, write_synthetic_trace
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.trace import write_meta, write_trace
from sim.presets import list_presets, load_preset
from tests.tolerance import approx

REPO = Path(__file__).resolve().parents[2]
SMALL = Schedule(chunks=40, burst_every=10, burst_len=5)
# The simulated sensor's energy counter undercounts sub-second windows after idle (analysis.reconcile.
# replay.measured_energy_J), so calibration on synthetic traces reads the integrated power ("auto");
# the default "mean" is for real traces, whose counter shows no such bias.
SYNTHETIC = dict(energy_source="auto")
# The mechanics are tested from the data-sheet H100 preset, which stays put when the shipped h100_sxm
# is refitted to new traces.
BASE = "h100_sxm_datasheet"


# A replayed window sums its thermal segments (one per kernel phase and clock change: a few dozen)
# the way the recorded run did; n bounds the roundings on that path (tests/tolerance.py).
REPLAY_N = 64

@pytest.fixture(scope="module")
def base():
    return load_preset(BASE)


@pytest.fixture(scope="module")
def true_gpu(base):
    return perturbed_preset(base)


@pytest.fixture(scope="module")
def measured(true_gpu):
    return synthetic_measured_rows(true_gpu, SMALL, seed=3)


# ------------------------------------------------------------------------------------ replay
def test_replay_with_the_true_preset_reproduces_the_recorded_truth(measured, true_gpu):
    """Same workloads, same gaps, same GPU: the replay must land on the original run's noise-free truth."""
    replayed = replay_trace(measured, true_gpu, initial_temp="preset")
    # the same simulation again: a window's energy and duration are differences of running totals
    # (clock and energy counters of size t_end · power: the scale) over its segments (REPLAY_N)
    for row, sim in zip(measured, replayed):
        t_end = row.window.t_end_s
        assert sim.sim_energy_J == approx(row.extra["true_energy_J"], n=REPLAY_N, scale=t_end * true_gpu.power_limit_W)
        assert sim.sim_duration_s == approx(row.extra["true_duration_s"], n=REPLAY_N, scale=t_end)
        assert sim.sim_temp_C + 0.5 == approx(row.extra["true_temp_C"], n=REPLAY_N)


def test_measured_side_matches_the_sensor_within_its_resolution(measured, true_gpu):
    replayed = replay_trace(measured, true_gpu, initial_temp="preset", energy_source="auto")
    for row, sim in zip(measured, replayed):
        # integrated 10 ms instant power (2 W noise) against the truth: well under 1 %
        assert sim.measured_energy_J == pytest.approx(row.extra["true_energy_J"], rel=0.01)
        # whole-degree readings latched every 100 ms, against the expected reading (truth − 0.5)
        assert abs(sim.measured_temp_C - sim.sim_temp_C) < 0.5 + 0.3


def test_slow_sensor_replay_is_identical(measured, base):
    assert replay_trace(measured, base) == replay_trace(measured, base, fast_sensor=True)


def test_a_time_reset_starts_a_fresh_gpu(measured, true_gpu):
    """Two recordings back to back (the second clock restarts at 0) replay like two separate replays."""
    first, second = measured[:12], measured[12:30]
    shift = second[0].window.t_start_s
    moved = [dataclasses.replace(r, window=dataclasses.replace(r.window, t_start_s=r.window.t_start_s - shift,
                                                                t_end_s=r.window.t_end_s - shift)) for r in second]
    joined = first + moved
    assert segment_starts(joined) == [0, len(first)]
    together = replay_trace(joined, true_gpu)
    apart = replay_trace(first, true_gpu) + replay_trace(moved, true_gpu)
    assert [dataclasses.replace(r, index=0) for r in together] == [dataclasses.replace(r, index=0) for r in apart]
    assert segment_starts(measured) == [0]


def test_warmup_window_keeps_its_measured_length(measured, true_gpu):
    chunk = next(r for r in measured if r.workload is not None)
    long = dataclasses.replace(chunk.window, t_end_s=chunk.window.t_start_s + chunk.window.duration_s + 2.0)
    warm = dataclasses.replace(chunk, window=long, kind="warmup")
    (sim_warm,) = replay_trace([warm], true_gpu, timing="simulated")
    (sim_chunk,) = replay_trace([dataclasses.replace(chunk, window=long)], true_gpu, timing="simulated")
    assert sim_warm.sim_duration_s == approx(long.duration_s, n=REPLAY_N, scale=long.t_end_s)
    assert not sim_warm.is_chunk and sim_chunk.is_chunk
    # the extra 2 s at (at least) idle power are on top of the chunk's own energy
    assert sim_warm.sim_energy_J - sim_chunk.sim_energy_J > 2.0 * 0.9 * true_gpu.idle_power_W
    # timing="measured" (the default) pads a chunk window the same way, but its duration stays the kernels'
    (padded,) = replay_trace([dataclasses.replace(chunk, window=long)], true_gpu)
    assert padded.sim_energy_J == approx(sim_warm.sim_energy_J, n=REPLAY_N, scale=long.t_end_s * true_gpu.power_limit_W)
    assert padded.sim_duration_s == approx(sim_chunk.sim_duration_s, n=REPLAY_N, scale=long.t_end_s)


def test_energy_source_choice():
    w = TelemetryWindow(0.0, 0.05, energy_J=20.0, mean_power_W=400, peak_power_W=420, gpu_temp_C=40,
                        samples=5, energy_power_J=21.0, flags=["short_window"])
    assert measured_energy_J(w, "auto") == 21.0
    assert measured_energy_J(w, "counter") == 20.0
    assert measured_energy_J(dataclasses.replace(w, samples=1), "auto") == 20.0
    assert math.isnan(measured_energy_J(dataclasses.replace(w, energy_power_J=None), "power"))
    with pytest.raises(ValueError, match="energy source"):
        measured_energy_J(w, "joules")


# ------------------------------------------------------------------------------------ metrics, split
def _row(i, e_meas, e_sim, t_meas, t_sim, d_meas=1.0, d_sim=1.0, chunk=True, valid=True):
    return ReplayRow(i, "chunk" if chunk else "idle", "p", i, chunk, not chunk, valid, e_meas, d_meas, t_meas,
                     e_sim, d_sim, t_sim, float(i))


def test_metrics_closed_form():
    rows = [_row(0, 100.0, 110.0, 50.0, 51.0, d_sim=1.2), _row(1, 200.0, 180.0, 60.0, 57.0, d_sim=0.9),
            _row(2, 50.0, 500.0, 40.0, 90.0, chunk=False),        # idle window: not a chunk
            _row(3, math.nan, 10.0, 40.0, 90.0, valid=False)]     # unusable measurement
    m = metrics(rows)
    assert m.chunks == 2
    # means over the 2 chunks of |a − b| / b, a √ of a mean of squares (n = 8 roundings); the total
    # error 290/300 − 1 cancels terms of size 1
    assert m.energy_mape == approx(0.1, n=8)
    assert m.total_energy_error == approx(290.0 / 300.0 - 1.0, n=8, scale=1.0)
    assert m.temp_rmse_C == approx(math.sqrt((1.0 + 9.0) / 2), n=8)
    assert m.duration_mape == approx((0.2 + 0.1) / 2, n=8)
    assert metrics(rows[2:]).chunks == 0 and math.isnan(metrics(rows[2:]).energy_mape)


def test_split_is_chronological_over_chunks(measured):
    chunk_rows = [i for i, r in enumerate(measured) if r.workload is not None]
    stop, n_train = split_row(measured, 0.6)
    assert n_train == int(0.6 * len(chunk_rows)) and stop == chunk_rows[n_train]
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_row(measured, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_row(measured[:2], 0.5)


# ------------------------------------------------------------------------------------ calibration
@pytest.fixture(scope="module")
def reconciled(measured, base):
    trace = load_trace_dir_from_rows(measured)
    return reconcile(trace, base, CalibrationConfig(max_evaluations=90, **SYNTHETIC))


def load_trace_dir_from_rows(rows):
    from analysis.reconcile.score import MeasuredTrace

    return MeasuredTrace(list(rows), frozenset(), {"backend": "synthetic"}, [Path("synthetic")])


def test_calibration_recovers_a_different_gpu(reconciled, true_gpu, base):
    before, after = reconciled.heldout_uncalibrated, reconciled.heldout
    assert before.energy_mape > 0.05 and before.temp_rmse_C > 3.0   # the shipped preset is really off
    # the calibration's targets (not rounding): 1 % energy, 1 °C, 1 % duration on held-out chunks
    assert after.energy_mape < 0.01 and abs(after.total_energy_error) < 0.01
    assert after.temp_rmse_C < 1.0 and after.duration_mape < 0.01
    assert reconciled.calibration.evaluations <= 90
    fitted = {p.name: p.fitted for p in reconciled.calibration.parameters}
    # well-identified physics: idle power (idle windows), thermal time constant and resistance
    for name in ("idle_power_W", "thermal_resistance_C_per_W", "thermal_capacitance_J_per_C"):
        # not rounding: a fit to noisy synthetic measurements (≤ 90 evaluations): within 10 %
        assert fitted[name] == pytest.approx(getattr(true_gpu, name), rel=0.1), name
        assert abs(fitted[name] - getattr(true_gpu, name)) < abs(getattr(base, name) - getattr(true_gpu, name))


def test_calibrated_preset_keeps_sensor_fields_and_validates(reconciled, base):
    cal = reconciled.calibration.preset
    assert cal.name == f"{BASE}_calibrated" and "least_squares" in cal.source
    for field in ("energy_counter_period_s", "instant_sample_period_s", "sensor_noise_W", "initial_temp_C"):
        assert getattr(cal, field) == getattr(base, field)


def test_calibration_on_its_own_truth_stays_put(true_gpu):
    """Calibrating the true GPU's own preset against its trace must not wander off."""
    rows = synthetic_measured_rows(true_gpu, Schedule(chunks=20, burst_every=8, burst_len=4), seed=5)
    result = calibrate(rows, true_gpu, CalibrationConfig(max_evaluations=30, **SYNTHETIC))
    assert result.cost_final <= result.cost_initial
    for p in result.parameters:
        scale = abs(p.initial) if p.initial else 1.0
        # not rounding: a fit to noisy data may move 5 % (the ambient 0.3 °C more: whole-degree readings)
        assert abs(p.fitted - p.initial) <= 0.05 * scale + (0.3 if p.name == "ambient_C" else 0.0), p.name


def test_undescribed_busy_windows_are_replayed_idle_unscored_and_reported(measured, base):
    """A 'calibration' burst without a workload cannot be simulated: not fitted, not scored, warned about."""
    chunk = next(r for r in measured if r.workload is not None)
    burst = dataclasses.replace(chunk, workload=None, kind="calibration")
    rows = [burst if r is chunk else r for r in measured]
    result = reconcile(load_trace_dir_from_rows(rows), base, CalibrationConfig(max_evaluations=4))
    replayed = result.replay[measured.index(chunk)]
    assert not replayed.is_chunk and not replayed.is_idle
    assert replayed.sim_energy_J < 0.5 * replayed.measured_energy_J       # simulated as idle
    assert result.chunks == sum(r.workload is not None for r in rows)
    assert any("replayed as idle" in w for w in result.warnings)
    assert not any("replayed as idle" in w for w in reconcile(
        load_trace_dir_from_rows(measured), base, CalibrationConfig(max_evaluations=2)).warnings)


def test_training_split_without_usable_chunks_is_an_error(measured, base):
    stop, _ = split_row(measured, 0.6)
    broken = [dataclasses.replace(r, window=dataclasses.replace(r.window, energy_J=math.nan, energy_power_J=None))
              if i < stop else r for i, r in enumerate(measured)]
    with pytest.raises(ValueError, match="no chunk window with a usable measurement"):
        calibrate(broken, base, CalibrationConfig(max_evaluations=2))


# ------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory, true_gpu):
    return write_synthetic_trace(tmp_path_factory.mktemp("trace"), true_gpu,
                                 Schedule(chunks=24, burst_every=8, burst_len=4), seed=1)


def test_cli_json_matches_library_and_saves_preset(trace_dir, tmp_path, capsys, base):
    saved = tmp_path / "cal.json"
    code = reconcile_main([str(trace_dir), "--json", "--no-progress", "--max-evaluations", "25", "--preset", BASE,
                           "--save-preset", str(saved)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    direct = reconcile(load_trace_dir(trace_dir), base, CalibrationConfig(max_evaluations=25))
    assert out["chunks"] == direct.chunks == 24
    # the same computation, through JSON (repr keeps every bit)
    assert out["heldout_energy_mape"] == approx(direct.heldout.energy_mape, n=1)
    assert out["total_energy_error"] == approx(direct.heldout.total_energy_error, n=1)
    assert out["temp_rmse_C"] == approx(direct.heldout.temp_rmse_C, n=1)
    assert out["heldout_energy_mape"] < out["heldout_uncalibrated"]["energy_mape"]
    assert load_preset(saved) == direct.calibration.preset.replace(name="cal")   # named after its file
    assert out["preset_path"] == str(saved)
    assert reconcile_main([str(trace_dir), "--no-progress", "--max-evaluations", "2", "--save", str(saved)]) == 2
    assert "--overwrite" in capsys.readouterr().err                           # an existing file is kept


def test_cli_text_output_and_no_default_save_for_non_measured(trace_dir, capsys):
    assert reconcile_main([str(trace_dir), "--no-progress", "--max-evaluations", "3"]) == 0
    text = capsys.readouterr().out
    assert "held-out (calibrated)" in text and "saved" not in text


def _bad_dirs(tmp_path: Path, measured) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    with gzip.open(garbage / "trace.csv.gz", "wt") as f:
        f.write("a,b\n1,2\n")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "trace.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    one_chunk = tmp_path / "one"
    write_trace(one_chunk / "trace.csv.gz", measured[:2])
    write_meta(one_chunk, gpu_name="NVIDIA H100 80GB HBM3")
    unknown_gpu = tmp_path / "unknown"
    write_trace(unknown_gpu / "trace.csv.gz", measured[:10])
    write_meta(unknown_gpu, gpu_name="Imaginary GPU 9000")
    return {"missing": (tmp_path / "nope", "does not exist"), "empty": (empty, "holds no trace"),
            "garbage": (garbage, "not a NECTAR trace"), "truncated": (truncated, "cannot read trace"),
            "one chunk": (one_chunk, "at least 2"), "unknown gpu": (unknown_gpu, "no shipped preset")}


def test_cli_clear_errors(tmp_path, measured, capsys):
    for name, (path, message) in _bad_dirs(tmp_path, measured).items():
        assert reconcile_main([str(path), "--no-progress", "--max-evaluations", "2"]) == 2, name
        assert message in capsys.readouterr().err, name
    ok = tmp_path / "unknown"
    with pytest.raises(SystemExit) as exc:
        reconcile_main([str(ok), "--train-fraction", "1.5", "--no-progress"])
    assert exc.value.code == 2 and "between 0 and 1" in capsys.readouterr().err
    assert reconcile_main([str(ok), "--preset", "h100_sxm", "--no-progress", "--max-evaluations", "2"]) == 0


def test_pick_preset_by_gpu_name(trace_dir):
    assert pick_preset(load_trace_dir(trace_dir)) == load_preset("h100_sxm")   # the shipped preset of that GPU


# ------------------------------------------------------------------------------------ committed traces
COMMITTED = sorted(p for p in (REPO / "data" / "traces").glob("*/*") if p.is_dir() and any(p.glob("*.csv*")))


@pytest.mark.parametrize("trace_dir", COMMITTED or [None], ids=[f"{p.parent.name}-{p.name}" for p in COMMITTED] or ["none"])
def test_reconciliation_on_committed_traces(trace_dir):
    """The reconciliation runs on every measured trace committed under data/traces/<gpu>/<run>/, and
    calibrating on the first 60 % beats the GPU's data-sheet preset (`<preset>_datasheet`, when the
    shipped preset was refitted to these very traces) on the held-out 40 %. The figures are reported
    in docs/results.md, not asserted here; tests/analysis/test_reconcile_segments.py holds the
    shipped preset to them."""
    if trace_dir is None:
        pytest.skip("no measured traces committed under data/traces/ yet")
    trace = load_trace_dir(trace_dir)
    shipped = pick_preset(trace)
    base = load_preset(f"{shipped.name}_datasheet") if f"{shipped.name}_datasheet" in list_presets() else shipped
    result = reconcile(trace, base, CalibrationConfig(max_evaluations=150))
    assert result.heldout.chunks > 0
    assert np.isfinite([result.heldout.energy_mape, result.heldout.temp_rmse_C]).all()
    assert result.heldout.energy_mape < result.heldout_uncalibrated.energy_mape
    assert result.heldout.temp_rmse_C < result.heldout_uncalibrated.temp_rmse_C
    print(f"{trace_dir}: held-out energy MAPE {100 * result.heldout.energy_mape:.2f} %, "
          f"temperature RMSE {result.heldout.temp_rmse_C:.2f} °C")
