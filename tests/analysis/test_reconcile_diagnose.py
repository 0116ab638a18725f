"""The per-segment diagnosis of the energy error (analysis/reconcile/diagnose.py), checked against
synthetic segments whose answer is known: measured energy = simulated × (1 + a·(T − 50)) must be
put on the temperature and corrected to MAPE ≈ 0 by a correction fitted on another segment; a
pure level offset must come out as bias with no feature named; the sensor-noise floor, the idle
time and the same-policy runs follow from hand-made windows; and the CLI writes the diagnosis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.reconcile.cli import main as reconcile_main
from analysis.reconcile.diagnose import (FEATURES, ChunkTable, _idle_before_s, _same_policy_run, chunk_table,
                                         diagnose, diagnose_segments, fit_ratio, ffn_slots_per_token)
from analysis.reconcile.replay import ReplayRow
from nectar.telemetry.trace import TraceRow, write_meta, write_trace
from nectar.telemetry.window import TelemetryWindow
from sim.presets import load_preset
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx

A_PER_C = 0.004        # measured/simulated − 1 per °C above 50 °C


def _window(t0: float, t1: float, energy: float, temp: float, delta: float = 0.0, clock: float = 1980.0,
            throttle: int = 0) -> TelemetryWindow:
    """A window whose counter reads energy·(1 + δ) and integrated power energy·(1 − δ)."""
    return TelemetryWindow(t0, t1, energy * (1 + delta), energy / (t1 - t0), energy / (t1 - t0) * 1.2, temp,
                           sm_clock_MHz=clock, throttle_reasons=throttle, samples=50,
                           energy_power_J=energy * (1 - delta))


def synthetic_segment(seed: int, law, n: int = 120, temps: tuple[float, float] = (35.0, 75.0), delta: float = 0.0,
                      policies: tuple[str, ...] = ("static-top2", "static-top1")):
    """(trace rows, replay rows) of n chunks with random simulated energy, temperature, clock, throttle,
    gaps and routing, whose measured energy is `law(sim_J, temp_C, rng)`; the counter and the integrated
    power differ by ±δ alternately."""
    rng = np.random.default_rng(seed)
    rows, replay, t = [], [], 0.0
    for i in range(n):
        t += float(rng.uniform(0.01, 0.5))                                       # host gap
        duration, temp, sim = float(rng.uniform(0.5, 0.9)), float(rng.uniform(*temps)), float(rng.uniform(300, 500))
        measured = law(sim, temp, rng)
        policy = policies[int(rng.integers(len(policies)))]
        workload = distilgpt2_moe_workload(2 if policy == "static-top2" else 1, batch=int(rng.choice([256, 512])))
        window = _window(t, t + duration, measured, temp, delta * (-1) ** i, float(rng.uniform(1900, 1980)),
                         int(rng.integers(2)) * 4)
        rows.append(TraceRow(window, workload, kind="chunk", policy=policy, chunk_index=i))
        replay.append(ReplayRow(i, "chunk", policy, i, True, False, True, measured, duration, temp, sim, duration * 0.9,
                                temp, t + duration))
        t += duration
    return rows, replay


def temperature_law(sim: float, temp: float, rng) -> float:
    return sim * (1 + A_PER_C * (temp - 50.0))


def table(seed: int, law, **kwargs) -> ChunkTable:
    rows, replay = synthetic_segment(seed, law, **kwargs)
    return chunk_table(replay, rows)


def test_temperature_law_is_named_and_corrected_to_zero_held_out():
    train = table(1, temperature_law)
    held = table(2, temperature_law, temps=(40.0, 70.0))                  # inside the range fitted on: no clipping
    d = diagnose("thermal", held, train, "main")
    assert d.named == "temp_C" and d.features[0].feature == "temp_C" and d.features[0].r2_alone > 0.99
    best = d.best
    assert best.feature == "temp_C" and best.clipped_share == 0.0
    design = np.column_stack([np.ones(len(train)), train.features["temp_C"]])
    kappa = float(np.linalg.cond(design))      # lstsq's error grows with the design's condition number
    assert best.slope == approx(A_PER_C, n=len(train), scale=1.0, safety=kappa)
    assert best.intercept == approx(1 - 50 * A_PER_C, n=len(train), scale=1.0, safety=kappa)
    assert best.mape_after == approx(0.0, n=len(train), scale=1.0, safety=kappa)
    assert d.energy_mape > 0.03 and "GPU temperature" in d.reason and "reaches 3.0 %" in d.reason
    assert "main:" in d.reason and "not seen there" not in d.reason              # the law holds on main too


def test_bias_only_is_reported_as_bias_with_no_feature_named():
    def law(sim, temp, rng):
        return sim * 1.05 * (1 + 0.01 * rng.standard_normal())          # a level offset and noise nothing records

    train, held = table(3, law), table(4, law)
    d = diagnose("long", held, train, "main")
    error = held.simulated_J / held.measured_J - 1
    assert d.bias == approx(float(error.mean()), n=len(held)) and d.bias == pytest.approx(1 / 1.05 - 1, abs=0.003)
    assert d.scatter == approx(float(error.std()), n=len(held))
    assert d.named is None and d.bias_share_of_mse > 0.9
    assert "mostly a level offset" in d.reason and "no recorded quantity explains the scatter" in d.reason
    bias_fix = next(c for c in d.corrections if c.feature is None)
    ratio = train.measured_J / train.simulated_J
    assert bias_fix.intercept == approx(float(ratio.mean()), n=len(train)) and bias_fix.slope == 0.0
    assert bias_fix.mape_after == approx(float(np.mean(np.abs(held.simulated_J * ratio.mean() / held.measured_J - 1))),
                                         n=len(held))
    assert bias_fix.mape_after < 0.012 < d.energy_mape


def test_exact_offset_has_no_scatter_to_explain():
    d = diagnose("s", table(5, lambda s, t, r: 1.1 * s), table(6, lambda s, t, r: 1.1 * s), "main")
    assert d.features == [] and d.named is None and d.scatter == approx(0.0, n=1, scale=1.0)
    assert d.best.mape_after == approx(0.0, n=120, scale=1.0)


def test_noise_floor_from_counter_versus_integrated_power():
    """Counter = E(1 + δ), power = E(1 − δ), δ = ±σ alternately: the relative difference is ±2σ/(1) exactly,
    its std 2σ·√(n/(n−1)), the floor √(2/π)·std/2."""
    sigma, n = 0.02, 40
    d = diagnose("s", table(7, temperature_law, n=n, delta=sigma), table(8, temperature_law), "main")
    std = 2 * sigma * math.sqrt(n / (n - 1))
    assert d.counter_vs_power_std == approx(std, n=4 * n, scale=1.0)
    assert d.noise_floor_mape == approx(math.sqrt(2 / math.pi) * std / 2, n=4 * n, scale=1.0)


def test_idle_before_and_same_policy_runs_on_hand_made_windows():
    load = distilgpt2_moe_workload(2, batch=2)
    rows = [TraceRow(_window(0.0, 1.0, 100, 50), load, policy="a"),
            TraceRow(_window(1.0, 3.0, 50, 45), None, kind="idle", policy="a"),
            TraceRow(_window(3.5, 4.5, 100, 50), load, policy="a"),
            TraceRow(_window(4.6, 5.6, 100, 50), load, policy="b"),
            TraceRow(_window(5.6, 5.7, 10, 50), load, policy="b:guard"),
            TraceRow(_window(6.0, 7.0, 100, 50), load, policy="b")]
    idle = _idle_before_s(rows, frozenset())
    assert math.isnan(idle[0]) and idle[1:] == approx([0.0, 2.5, 0.1, 0.0, 0.3], n=2, scale=7.0)
    assert _same_policy_run(rows, frozenset()) == [0, 1, 1, 0, 1, 2]
    assert _idle_before_s(rows, frozenset({2}))[2] != _idle_before_s(rows, frozenset({2}))[2]   # a new file: NaN
    assert ffn_slots_per_token(load) == 2.0 and ffn_slots_per_token(distilgpt2_moe_workload(1, batch=2)) == 1.0


def test_every_feature_is_in_the_table_and_the_circular_one_is_never_named():
    """Measured energy = simulated × a random factor that only the measured energy itself records: the
    measured mean power (that energy over the window) carries it into the joint fit, but it is reported
    and never named or used for a correction."""
    train = table(9, temperature_law)
    assert set(train.features) == {f.name for f in FEATURES}
    rows, replay = synthetic_segment(10, lambda s, t, r: s * float(r.uniform(0.9, 1.1)))
    held = chunk_table(replay, rows)
    d = diagnose("s", held, train, "main")
    power = next(s for s in d.features if s.feature == "power_W")
    assert power.circular and power.r2_drop_one > 0.5 and d.named != "power_W"
    assert all(c.feature != "power_W" for c in d.corrections)


def test_diagnose_segments_needs_the_calibration_segment():
    with pytest.raises(ValueError, match="no segment 'main'"):
        diagnose_segments({"x": table(11, temperature_law)}, "main")
    with pytest.raises(ValueError, match="at least 4 scored chunks"):
        diagnose("x", table(12, temperature_law, n=3), table(13, temperature_law), "main")


def test_fit_ratio_is_least_squares():
    t = table(14, temperature_law)
    c0, c1 = fit_ratio(t, "temp_C")
    ref = np.polyfit(t.features["temp_C"], t.measured_J / t.simulated_J, 1)   # an independent solver
    assert [c1, c0] == approx(list(ref), n=len(t), scale=1.0, safety=100.0)  # safety: both solvers' conditioning


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def gpu_folder(tmp_path_factory):
    from tests.analysis.test_reconcile_segments import SCHEDULES, _segment_rows
    from analysis.reconcile.synthetic_trace import perturbed_preset

    true_gpu = perturbed_preset(load_preset("h100_sxm_datasheet"))
    root = tmp_path_factory.mktemp("traces") / "h100"
    for name in SCHEDULES:
        write_trace(root / name / "trace.csv.gz", _segment_rows(true_gpu, name))
        write_meta(root / name, backend="nvml", gpu_name=true_gpu.gpu_name)
    return root


def test_cli_diagnose_writes_the_json(gpu_folder, tmp_path, capsys):
    out = tmp_path / "energy-by-segment.json"
    args = [str(gpu_folder), "--diagnose", "--out", str(out), "--no-progress", "--max-evaluations", "6",
            "--preset", "h100_sxm_datasheet", "--energy-source", "auto"]
    assert reconcile_main(args) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert report["command"].startswith("nectar reconcile ") and "--diagnose" in report["command"]
    for segment in report["segments"]:
        d = segment["diagnosis"]
        assert d["segment"] == segment["segment"] and d["held_out"] == segment["held_out"]
        assert d["chunks"] == segment["calibrated"]["chunks"]
        assert d["energy_mape"] == approx(segment["calibrated"]["energy_mape"], n=d["chunks"])
        assert d["reason"].startswith(f"{segment['segment']}: MAPE") and d["reason"] in text
        assert d["best_correction"]["fitted_on"] == "main"
    assert f"written: {out}" in text
    assert reconcile_main(args) == 2                                     # exists, no --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_cli_diagnose_needs_a_gpu_folder(gpu_folder, capsys):
    assert reconcile_main([str(gpu_folder / "main"), "--diagnose", "--no-progress"]) == 2
    assert "--diagnose go with --frontier or a GPU folder" in capsys.readouterr().err
