"""Online thermal fit (analysis/reconcile/thermal_fit.py) against independent references:

(a) a synthetic run whose truth is sim/thermal.py's own model (known R, C, ambient, leakage
    inside the measured power, Gaussian sensor noise): the 30 s fit recovers the parameters and
    predicts the held-out part to within the noise;
(b) the closed-form RC response to a constant-power step (and two steps) vs the window-by-window
    integration, gaps included;
(c) unusable input: one-line errors, exit status 2, nothing written;
(d) the two-node (die + sink) model: its exact window-by-window integration against a fine-step
    ODE solution (scipy.integrate.solve_ivp), recovery of a known two-node truth with the sink
    held at the truth, and that neither its online fit nor its sink prior reads a held-out
    temperature of the segment predicted.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.reconcile import thermal_fit as tf
from analysis.reconcile import thermal_model as tm
from nectar.telemetry.trace import TraceRow, write_meta, write_trace
from nectar.telemetry.window import TelemetryWindow
from sim.presets import load_preset
from sim.thermal import ThermalModel, energy_at, segment, temperature_at

TRUE = ThermalModel(resistance_C_per_W=0.03, capacitance_J_per_C=50.0, ambient_C=38.0)   # τ = 1.5 s
LEAK_W_PER_C, LEAK_REF_C = 0.8, 30.0
NOISE_C = 0.2


def synthetic_windows(seed: int = 0, duration_s: float = 90.0, noise_C: float = NOISE_C) -> tm.Windows:
    """Chunks of 0.3–1.0 s at 250–650 W (dynamic power) with occasional 1.5 s idle windows at 80 W,
    no gaps; mean power per window = exact energy / duration (leakage included), reading at the
    end = true temperature − 0.5 + N(0, noise)."""
    rng = np.random.default_rng(seed)
    t, temp, energy = 0.0, 45.0, 0.0
    starts, ends, powers, temps = [], [], [], []
    while t < duration_s:
        idle = rng.random() < 0.12
        dt = 1.5 if idle else float(rng.uniform(0.3, 1.0))
        p_ref = 80.0 if idle else float(rng.uniform(250.0, 650.0))
        seg = segment(TRUE, t, temp, energy, p_ref, LEAK_W_PER_C, LEAK_REF_C)
        end_energy, end_temp = energy_at(seg, t + dt), temperature_at(seg, t + dt)
        starts.append(t)
        ends.append(t + dt)
        powers.append((end_energy - energy) / dt)
        temps.append(end_temp - tm.TEMP_READING_OFFSET_C + float(rng.normal(0.0, noise_C)))
        t, temp, energy = t + dt, end_temp, end_energy
    return tm.Windows(np.array(starts), np.array(ends), np.array(powers), np.array(temps))


# ---------------------------------------------------------------------------- (a) recovery
def test_fit_recovers_known_model_and_predicts_to_the_noise():
    w = synthetic_windows()
    fit = tf.fit_segment(w, load_preset("h200_sxm"), name="synthetic", fit_s=30.0, whole_segment=False)
    p = fit.params
    assert fit.windows_fitted >= 30 and fit.windows_held_out >= 60
    # Tolerances: Gaussian noise 0.2 °C on ~45 readings, and the leakage makes power vary inside a
    # window (the fit sees only its mean): a few % on R and τ, a few tenths of a degree on ambient.
    assert p.ambient_C == pytest.approx(TRUE.ambient_C, abs=1.0)
    assert p.resistance_C_per_W == pytest.approx(TRUE.resistance_C_per_W, rel=0.05)
    assert p.time_constant_s == pytest.approx(TRUE.resistance_C_per_W * TRUE.capacitance_J_per_C, rel=0.15)
    assert p.capacitance_J_per_C == pytest.approx(TRUE.capacitance_J_per_C, rel=0.15)
    # Held out: prediction vs noisy readings ≈ the noise itself; the unfitted preset is far off.
    assert fit.held_out.rmse_C <= 1.3 * NOISE_C
    assert abs(fit.held_out.mean_C) <= 0.15
    assert fit.preset_held_out.rmse_C > 3 * fit.held_out.rmse_C
    assert fit.goal_met


def test_fit_without_noise_is_nearly_exact_and_preset_tau_is_worse():
    w = synthetic_windows(seed=1, noise_C=0.0)
    free = tf.fit_segment(w, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False)
    held = tf.fit_segment(w, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False, preset_tau=True)
    assert free.held_out.rmse_C < 0.05            # only the in-window leakage variation is unmodelled
    assert held.params.time_constant_s == pytest.approx(held.preset_params.time_constant_s)
    assert held.held_out.rmse_C > free.held_out.rmse_C
    assert free.to_dict()["fitted_parameters"] == ["ambient_C", "resistance_C_per_W", "time_constant_s"]


def test_prediction_reads_no_held_out_temperature():
    w = synthetic_windows(seed=2)
    fit = tf.fit_segment(w, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False)
    scrambled = tm.Windows(w.t_start_s, w.t_end_s, w.power_W,
                           np.where(np.arange(len(w)) < fit.windows_fitted, w.temp_C, 99.0))
    again = tf.fit_segment(scrambled, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False)
    assert np.array_equal(again.predicted_C, fit.predicted_C)


# ---------------------------------------------------------------------------- (b) closed form
def _closed_form(t_s, temp0_C, power_W, p: tm.Params):
    steady = p.ambient_C + power_W * p.resistance_C_per_W
    return steady + (temp0_C - steady) * np.exp(-np.asarray(t_s) / p.time_constant_s)


def test_constant_power_step_matches_closed_form_with_gaps():
    p = tm.Params(ambient_C=30.0, resistance_C_per_W=0.05, time_constant_s=4.0)
    starts = np.array([0.0, 0.5, 1.3, 2.0, 3.7, 6.0])
    ends = np.array([0.5, 1.2, 2.0, 3.5, 5.9, 9.0])           # gaps of 0.1, 0.2, 0.1 s
    w = tm.Windows(starts, ends, np.full(6, 400.0), np.full(6, 45.0))
    got = tm.predict_readings(p, w, gap_power_W=400.0)
    t0 = 45.0 + tm.TEMP_READING_OFFSET_C                       # the anchor: window 0's reading + 0.5 at its end
    want = _closed_form(ends - ends[0], t0, 400.0, p) - tm.TEMP_READING_OFFSET_C
    assert got[0] == 45.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * 80)
    hold = tm.predict_readings(p, w, gap_power_W=None)          # same power held over the gaps
    np.testing.assert_allclose(hold, want, rtol=0, atol=1e-12 * 80)


def test_two_steps_and_idle_gap_match_closed_form():
    p = tm.Params(ambient_C=25.0, resistance_C_per_W=0.04, time_constant_s=2.0)
    w = tm.Windows(np.array([0.0, 1.0, 4.0]), np.array([1.0, 3.0, 5.0]), np.array([500.0, 500.0, 300.0]),
                   np.full(3, 40.0))
    got = tm.predict_readings(p, w, gap_power_W=100.0)         # 1 s gap at 100 W between windows 1 and 2
    t0 = 40.0 + tm.TEMP_READING_OFFSET_C
    at_3 = _closed_form(2.0, t0, 500.0, p)
    at_4 = _closed_form(1.0, at_3, 100.0, p)
    at_5 = _closed_form(1.0, at_4, 300.0, p)
    np.testing.assert_allclose(got[1:], np.array([at_3, at_5]) - tm.TEMP_READING_OFFSET_C, rtol=0, atol=1e-12 * 60)


# ---------------------------------------------------------------------------- (c) bad input
def _window(t0, t1, power, temp):
    return TelemetryWindow(t_start_s=t0, t_end_s=t1, energy_J=power * (t1 - t0), mean_power_W=power,
                           peak_power_W=power, gpu_temp_C=temp, samples=10)


def test_bad_input_errors():
    good = [_window(i, i + 0.9, 400.0, 55.0) for i in range(40)]
    with pytest.raises(tm.ThermalFitError, match="no window has a temperature"):
        tm.windows_from_rows([_window(i, i + 0.9, 400.0, math.nan) for i in range(5)])
    with pytest.raises(tm.ThermalFitError, match="non-finite temp_C"):
        tm.windows_from_rows(good[:3] + [_window(3, 3.9, 400.0, math.nan)] + good[4:])
    with pytest.raises(tm.ThermalFitError, match="non-finite power_W"):
        tm.windows_from_rows(good[:3] + [_window(3, 3.9, math.nan, 55.0)] + good[4:])
    with pytest.raises(tm.ThermalFitError, match="overlap"):
        tm.windows_from_rows(good + [_window(0.2, 0.5, 400.0, 55.0)])
    long_windows = tm.windows_from_rows([_window(20.0 * i, 20.0 * i + 19.0, 400.0, 55.0) for i in range(5)])
    with pytest.raises(tm.ThermalFitError, match="at least 3"):
        tf.fit_segment(long_windows, load_preset("h200_sxm"), fit_s=30.0)


def _trace_dir(tmp_path, windows):
    folder = tmp_path / "seg"
    folder.mkdir()
    write_trace(folder / "trace.csv.gz", [TraceRow(w, kind="chunk", policy="p", chunk_index=i)
                                          for i, w in enumerate(windows)])
    write_meta(folder, backend="test", gpu_name="NVIDIA H200")
    return folder


def test_cli_one_line_error_and_nothing_written(tmp_path, capsys):
    folder = _trace_dir(tmp_path, [_window(20.0 * i, 20.0 * i + 19.0, 400.0, 55.0) for i in range(5)])
    out = tmp_path / "r.json"
    assert tf.main([str(folder), "--json-out", str(out), "--no-whole-fit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thermal_fit: error:") and "at least 3" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))
    assert tf.main([str(tmp_path / "missing")]) == 2
    assert tf.main([str(folder), "--fit-s", "nan"]) == 2


def test_cli_writes_json_on_a_synthetic_trace(tmp_path):
    w = synthetic_windows(seed=3, duration_s=45.0)
    folder = _trace_dir(tmp_path, [_window(float(a), float(b), float(p), float(np.floor(t + 0.5)))
                                   for a, b, p, t in zip(w.t_start_s, w.t_end_s, w.power_W, w.temp_C)])
    out = tmp_path / "r.json"
    assert tf.main([str(folder), "--json-out", str(out), "--preset", "h200_sxm"]) == 0
    report = json.loads(out.read_text())
    (seg,) = report["segments"]
    assert seg["windows_fitted"] + seg["windows_held_out"] == len(w)
    assert seg["held_out"]["rmse_C"] < 1.0          # whole-degree readings: ≈ 0.3 °C of quantisation
    assert report["command"].startswith("python -m analysis.reconcile.thermal_fit")


# ---------------------------------------------------------------------------- (d) two-node
TWO = tm.TwoNodeParams(ambient_C=35.0, die_resistance_C_per_W=0.02, die_time_constant_s=0.15,
                       sink_resistance_C_per_W=0.015, sink_time_constant_s=60.0)


def test_two_node_integrator_matches_fine_step_ode():
    from scipy.integrate import solve_ivp

    dur = np.array([0.4, 0.05, 1.3, 0.7, 5.0, 0.2, 20.0])
    power = np.array([600.0, 120.0, 450.0, 80.0, 520.0, 300.0, 150.0])
    die0, sink0 = 9.0, 4.0
    got = tm.integrate_two_node(TWO, dur, power, die0, sink0)
    edges = np.concatenate([[0.0], np.cumsum(dur)])

    def rhs(t, y):
        p = power[min(np.searchsorted(edges, t, side="right") - 1, len(power) - 1)]
        return [(TWO.die_resistance_C_per_W * p - y[0]) / TWO.die_time_constant_s,
                (TWO.sink_resistance_C_per_W * p - y[1]) / TWO.sink_time_constant_s]

    y, want = [die0, sink0], []
    for k in range(len(dur)):        # one solve per constant-power interval: no step straddles a jump
        sol = solve_ivp(rhs, (edges[k], edges[k + 1]), y, method="LSODA", rtol=1e-10, atol=1e-10,
                        max_step=0.01)
        y = sol.y[:, -1]
        want.append(TWO.ambient_C + y.sum())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_two_node_closed_form_step_and_start():
    w = tm.Windows(np.array([0.0, 1.0]), np.array([1.0, 31.0]), np.array([500.0, 200.0]), np.array([50.0, 0.0]))
    got = tm.predict_readings(TWO, w, gap_power_W=None)
    t0 = 50.0 + tm.TEMP_READING_OFFSET_C
    die0, sink0 = tm.two_node_start(TWO, t0, 500.0)
    assert die0 == pytest.approx(0.02 * 500.0) and sink0 == pytest.approx(t0 - 35.0 - 10.0)
    die = 0.02 * 200 + (die0 - 0.02 * 200) * math.exp(-30.0 / 0.15)
    sink = 0.015 * 200 + (sink0 - 0.015 * 200) * math.exp(-30.0 / 60.0)
    assert got[1] == pytest.approx(35.0 + die + sink - tm.TEMP_READING_OFFSET_C, abs=1e-12)


def two_node_windows(seed: int = 4, duration_s: float = 120.0, noise_C: float = 0.2) -> tm.Windows:
    """Chunks as in synthetic_windows, the truth a two-node model (no leakage), the sink
    starting 3 °C below its steady state at the mean power (a slow creep up)."""
    rng = np.random.default_rng(seed)
    t, die, sink = 0.0, TWO.die_resistance_C_per_W * 400.0, TWO.sink_resistance_C_per_W * 400.0 - 3.0
    starts, ends, powers, temps = [], [], [], []
    while t < duration_s:
        idle = rng.random() < 0.12
        dt = 1.5 if idle else float(rng.uniform(0.3, 1.0))
        p = 80.0 if idle else float(rng.uniform(250.0, 650.0))
        (temp,) = tm.integrate_two_node(TWO, np.array([dt]), np.array([p]), die, sink)
        die = TWO.die_resistance_C_per_W * p + (die - TWO.die_resistance_C_per_W * p) * math.exp(-dt / TWO.die_time_constant_s)
        sink = temp - TWO.ambient_C - die
        starts.append(t)
        ends.append(t + dt)
        powers.append(p)
        temps.append(temp - tm.TEMP_READING_OFFSET_C + float(rng.normal(0.0, noise_C)))
        t += dt
    return tm.Windows(np.array(starts), np.array(ends), np.array(powers), np.array(temps))


def _true_sink_prior() -> tf.SinkPrior:
    return tf.SinkPrior(TWO.sink_time_constant_s, TWO.sink_resistance_C_per_W, 0.0, ("truth",))


def test_two_node_fit_with_true_sink_predicts_to_the_noise():
    w = two_node_windows()
    fit = tf.fit_segment(w, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False, model="two-node",
                         sink=_true_sink_prior(), compare=True)
    assert fit.params.ambient_C == pytest.approx(TWO.ambient_C, abs=1.0)
    assert fit.params.die_resistance_C_per_W == pytest.approx(TWO.die_resistance_C_per_W, rel=0.1)
    assert fit.held_out.rmse_C <= 1.3 * 0.2
    assert fit.comparison.model == "one-node" and fit.comparison.held_out.rmse_C > fit.held_out.rmse_C
    d = fit.to_dict()
    assert d["model"] == "two-node" and d["sink_prior"]["sources"] == ["truth"]
    assert d["fitted_parameters"] == ["ambient_C", "die_resistance_C_per_W", "die_time_constant_s"]


def test_two_node_prediction_reads_no_held_out_temperature():
    w = two_node_windows(seed=5)
    fit = tf.fit_segment(w, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False, model="two-node",
                         sink=_true_sink_prior())
    scrambled = tm.Windows(w.t_start_s, w.t_end_s, w.power_W,
                           np.where(np.arange(len(w)) < fit.windows_fitted, w.temp_C, 99.0))
    again = tf.fit_segment(scrambled, load_preset("h200_sxm"), fit_s=30.0, whole_segment=False, model="two-node",
                           sink=_true_sink_prior())
    assert np.array_equal(again.predicted_C, fit.predicted_C)


def test_sink_prior_leaves_the_predicted_segment_out():
    shape = (len(tf.SINK_TAU_GRID_S), len(tf.SINK_R_GRID_C_PER_W))
    other = np.ones(shape)
    other[2, 3] = 0.5
    own = np.ones(shape)
    own[0, 0] = 0.0                      # the segment's own (held-out) data would pick another point
    prior = tf.sink_prior({"gpu/a": own, "gpu/b": other}, exclude="gpu/a")
    assert (prior.sink_time_constant_s, prior.sink_resistance_C_per_W) == (tf.SINK_TAU_GRID_S[2],
                                                                             tf.SINK_R_GRID_C_PER_W[3])
    assert prior.sources == ("gpu/b",)
    with pytest.raises(tm.ThermalFitError, match="other segment"):
        tf.sink_prior({"gpu/a": own}, exclude="gpu/a")


def _write_segment(folder, w: tm.Windows) -> None:
    folder.mkdir(parents=True)
    rows = [TraceRow(_window(float(a), float(b), float(p), float(np.floor(t + 0.5))), kind="chunk", policy="p",
                     chunk_index=i) for i, (a, b, p, t) in enumerate(zip(w.t_start_s, w.t_end_s, w.power_W, w.temp_C))]
    write_trace(folder / "trace.csv.gz", rows)
    write_meta(folder, backend="test", gpu_name="NVIDIA H200")


def test_run_two_node_reads_no_held_out_temperature_of_the_segment_predicted(tmp_path):
    """Whole pipeline (sink prior from the other segments + online fit): scrambling segment a's
    held-out readings changes nothing of a's prediction."""
    a, b = two_node_windows(seed=6, duration_s=50.0), two_node_windows(seed=7, duration_s=50.0)
    _write_segment(tmp_path / "gpu" / "a", a)
    _write_segment(tmp_path / "gpu" / "b", b)
    first = tf.run(tmp_path / "gpu", preset="h200_sxm", model="two-node", whole_segment=False, compare=False)
    fit_a = first["_fits"][0]
    scrambled = tm.Windows(a.t_start_s, a.t_end_s, a.power_W,
                           np.where(np.arange(len(a)) < fit_a.windows_fitted, a.temp_C, 99.0))
    _write_segment(tmp_path / "gpu2" / "a", scrambled)
    _write_segment(tmp_path / "gpu2" / "b", b)
    second = tf.run(tmp_path / "gpu2", preset="h200_sxm", model="two-node", whole_segment=False, compare=False)
    assert fit_a.sink_prior.sources == ("gpu/b",)
    assert np.array_equal(second["_fits"][0].predicted_C, fit_a.predicted_C)
