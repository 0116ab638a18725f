"""Reconciliation held out by segment: calibrate on `main`, predict the other segments, and each
policy's saving versus static-top2. Checked against a synthetic GPU folder whose truth is known (a
perturbed preset played the real GPU), and on the committed H100 traces."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from analysis.reconcile.calibrate import CalibrationConfig
from analysis.reconcile.cli import main as reconcile_main
from analysis.reconcile.replay import ReplayRow, replay_trace
from analysis.reconcile.score import load_trace_dir, metrics, pick_preset
from analysis.reconcile.segments import (is_segment_folder, load_segments, policy_savings, reconcile_by_segment)
from analysis.reconcile.synthetic_trace import Schedule, perturbed_preset, synthetic_measured_rows
from nectar.telemetry.trace import write_meta, write_trace
from sim.presets import load_preset
from tests.tolerance import approx

REPO = Path(__file__).resolve().parents[2]
BASE = "h100_sxm_datasheet"
RENAME = {"top1-swiglu": "static-top1", "top2-swiglu": "static-top2", "top3-swiglu": "static-top3"}
SCHEDULES = {"main": (Schedule(chunks=24, burst_every=8, burst_len=4), 1),
             "thermal": (Schedule(chunks=18, burst_every=4, burst_len=4, gap_s=(0.05, 0.3), pause_s=4.0), 2)}


def _segment_rows(true_gpu, name):
    schedule, seed = SCHEDULES[name]
    rows = synthetic_measured_rows(true_gpu, schedule, seed=seed)
    return [dataclasses.replace(r, policy=RENAME.get(r.policy, r.policy)) for r in rows]


@pytest.fixture(scope="module")
def true_gpu():
    return perturbed_preset(load_preset(BASE))


@pytest.fixture(scope="module")
def gpu_folder(tmp_path_factory, true_gpu):
    root = tmp_path_factory.mktemp("traces") / "h100"
    for name in SCHEDULES:
        write_trace(root / name / "trace.csv.gz", _segment_rows(true_gpu, name))
        write_meta(root / name, backend="nvml", gpu_name=true_gpu.gpu_name)
    return root


@pytest.fixture(scope="module")
def by_segment(gpu_folder):
    config = CalibrationConfig(max_evaluations=80, energy_source="auto")   # synthetic sensor: see test_reconcile
    return reconcile_by_segment(load_segments(gpu_folder), load_preset(BASE), config, source=str(gpu_folder))


def test_gpu_folders_are_recognised(gpu_folder):
    assert is_segment_folder(gpu_folder) and not is_segment_folder(gpu_folder / "main")
    assert list(load_segments(gpu_folder)) == ["main", "thermal"]          # the calibration segment first


def test_held_out_segment_is_predicted_after_calibrating_on_main(by_segment):
    main, thermal = by_segment.segments
    assert (main.name, main.held_out, thermal.name, thermal.held_out) == ("main", False, "thermal", True)
    assert by_segment.calibration.train_chunks == sum(1 for r in main.replay if r.is_chunk)   # every window of main
    assert thermal.base.energy_mape > 0.05 and thermal.base.temp_rmse_C > 2.0     # the base preset is really off
    assert thermal.calibrated.energy_mape < 0.015 and thermal.calibrated.temp_rmse_C < 1.0
    assert "every window of segment" in by_segment.calibration.preset.source


def test_savings_are_those_of_the_replayed_windows(by_segment, gpu_folder):
    """Against a direct computation from the replay rows and the trace's tokens."""
    trace = load_trace_dir(gpu_folder / "thermal")
    score = by_segment.segments[1]
    per_token = {}
    for r in score.replay:
        if r.is_chunk and r.valid:
            tokens = trace.rows[r.index].workload.tokens
            m, s, n = per_token.get(r.policy, (0.0, 0.0, 0))
            per_token[r.policy] = (m + r.measured_energy_J, s + r.sim_energy_J, n + tokens)
    top2 = per_token["static-top2"]
    rounding = len(score.replay) + 4  # sums over the replayed windows (in another order), ÷, ×
    for p in score.savings:
        m, s, n = per_token[p.policy]
        assert p.measured_mJ_per_token == approx(1e3 * m / n, n=rounding)
        if p.policy == "static-top2":
            assert p.measured_saving is None and p.gap_points is None
        else:  # 1 − ratio: cancels terms of size ~1
            ratio_scale = 1 + (m / n) / (top2[0] / top2[2])
            assert p.measured_saving == approx(1 - (m / n) / (top2[0] / top2[2]), n=rounding, scale=ratio_scale)
            ratio_scale = 1 + (s / n) / (top2[1] / top2[2])
            assert p.simulated_saving == approx(1 - (s / n) / (top2[1] / top2[2]), n=rounding, scale=ratio_scale)
            assert abs(p.gap_points) < 1.0          # the calibrated simulator predicts the true GPU's saving


def test_policy_savings_closed_form():
    def row(i, policy, measured, simulated, kind="chunk"):
        return ReplayRow(i, kind, policy, i, True, False, True, measured, 1.0, 50.0, simulated, 1.0, 50.0, float(i))

    class Load:
        def __init__(self, tokens):
            self.workload = type("W", (), {"tokens": tokens})()

    replayed = [row(0, "static-top2", 100.0, 110.0), row(1, "static-top1", 60.0, 77.0), row(2, "nectar:guard", 5.0, 1.0)]
    savings = {p.policy: p for p in policy_savings(replayed, [Load(1000), Load(1000), Load(10)])}
    assert set(savings) == {"static-top2", "static-top1"}                     # guard checks are not a policy
    # 1 − (60/1000) / (100/1000) and 1 − (77/1000) / (110/1000): a few ÷ and a − of terms of size 1;
    # the gap: 100 × the difference of the two
    assert savings["static-top1"].measured_saving == approx(0.4, n=4, scale=1.0)
    assert savings["static-top1"].simulated_saving == approx(0.3, n=4, scale=1.0)
    assert savings["static-top1"].gap_points == approx(-10.0, n=6, scale=100.0)


def test_cli_by_segment_json_and_save(gpu_folder, tmp_path, capsys):
    saved = tmp_path / "h100_test.json"
    code = reconcile_main([str(gpu_folder), "--json", "--no-progress", "--max-evaluations", "6", "--preset", BASE,
                           "--energy-source", "auto", "--save", str(saved)])
    text = capsys.readouterr().out
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert code == 0 and report["mode"] == "by-segment" and report["calibrate_on"] == "main"
    assert [s["segment"] for s in report["segments"]] == ["main", "thermal"]
    assert load_preset(saved).name == "h100_test"
    assert report["preset_path"] == str(saved)


# ---------------------------------------------------------------------------- committed traces
GPU_FOLDERS = sorted(p for p in (REPO / "data" / "traces").glob("*") if is_segment_folder(p))


SAVING_GAP_CEILING = {"h200": 11.5}     # points; what the shipped preset reaches today (default 3)
# h200/stationary-long ran a second model of the recipe (275 s budget): the preset, fitted on the
# first model's `main`, over-predicts its energy by 8 % (docs/results.md); default ceiling 6 %
MAPE_CEILING = {("h200", "stationary-long"): 0.11}
# h200/session2-*: a later session (another model, the current controller) whose GPU read 61–65 °C
# where `main` read 57–60 °C at similar power: energy holds (5.2–5.9 %), temperature does not
# (8.0–10.5 °C RMSE; docs/results.md); default ceiling 2.5 °C within a session
TEMP_CEILING = {("h200", f"session2-{w}"): 11.0 for w in ("stationary", "domain-shift", "power-schedule")}


@pytest.mark.parametrize("folder", GPU_FOLDERS or [None], ids=[p.name for p in GPU_FOLDERS] or ["none"])
def test_shipped_preset_on_the_committed_segments(folder):
    """The shipped preset of each committed GPU (refitted on `main`) against every segment, with the
    ceilings it reaches today (held out by segment, docs/results.md): energy MAPE ≤ 6 % per chunk,
    temperature RMSE ≤ 2.5 °C on the segments of the same session (≤ 6.5 °C on `long`, another
    session), and each static policy's saving within 3 points on `main` for the H100 — 11.5 for the
    H200, where the simulator prices a dropped slot by its FLOPs while the eager dispatch makes it
    save 11 points more (docs/results.md; the goal of 3 points is not met there). The data-sheet
    preset misses all of them (20–39 % and 9–20 °C)."""
    if folder is None:
        pytest.skip("no GPU folder of segment traces under data/traces/")
    segments = load_segments(folder)
    shipped = pick_preset(next(iter(segments.values())))          # the shipped preset named by the traces' GPU
    for name, trace in segments.items():
        replayed = replay_trace(trace.rows, shipped, breaks=trace.breaks)
        m = metrics(replayed)
        assert m.chunks > 0 and math.isfinite(m.energy_mape)
        assert m.energy_mape <= MAPE_CEILING.get((folder.name, name), 0.06), (name, m)
        assert m.temp_rmse_C <= TEMP_CEILING.get((folder.name, name), 6.5 if name == "long" else 2.5), (name, m)
        print(f"{folder.name}/{name}: energy MAPE {100 * m.energy_mape:.2f} %, temperature RMSE {m.temp_rmse_C:.2f} °C")
        if name == "main":
            gaps = [p.gap_points for p in policy_savings(replayed, trace.rows) if p.gap_points is not None]
            assert gaps and max(abs(g) for g in gaps) <= SAVING_GAP_CEILING.get(folder.name, 3.0), gaps


def test_report_accepts_a_gpu_folder_as_its_hint_says(gpu_folder, tmp_path):
    """`nectar report RUN --trace-dir data/traces/<gpu>` (the report's own hint) reconciles by segment."""
    from analysis.report.page import main as report_main
    from tests.analysis.test_report import make_run_dir

    run = make_run_dir(tmp_path / "run")
    assert report_main([str(run), "--trace-dir", str(gpu_folder), "--no-progress", "--max-evaluations", "4",
                        "--preset", BASE]) == 0
    text = (run / "report.md").read_text()
    assert "| thermal (held out) |" in text and "measured saving vs static-top2" in text
    assert (run / "report_figures" / "reconcile_segments.png").stat().st_size > 1000
