"""Each fault does what sim/faults.py says it does; bad specs fail with clear errors."""

import math

import numpy as np
import pytest

from sim.backend import SimBackend
from sim.faults import FaultConfig, SensorReadError
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx

WORKLOAD = distilgpt2_moe_workload(2)


def _run(faults, n_chunks=60, seed=11, idle_every=0):
    backend = SimBackend(faults=faults, seed=seed)
    windows, truths = [], []
    for i in range(n_chunks):
        windows.append(backend.idle(0.5) if idle_every and i % idle_every == 0 else backend.run_chunk(lambda: WORKLOAD))
        truths.append(backend.last_truth)
    return backend, windows, truths


# ---------------------------------------------------------------- parsing
def test_parse_and_round_trip():
    config = FaultConfig.parse("stale:0.1,nan:0.05,hot_ambient:45,throttle:5-15,wrap:1e6,spike:0.01,spike_scale:4")
    assert config.stale == 0.1 and config.nan == 0.05 and config.hot_ambient == 45.0
    assert config.throttle == (5.0, 15.0) and config.wrap == 1_000_000 and config.spike_scale == 4.0
    assert FaultConfig.parse(config.to_spec()) == config
    assert FaultConfig.parse("") == FaultConfig.parse(None) == FaultConfig.parse("none") == FaultConfig()
    assert not FaultConfig().active and config.active


@pytest.mark.parametrize("spec,match", [
    ("bogus:0.1", "unknown fault 'bogus'"),
    ("nan:1.5", "probability"),
    ("drop:-0.1", "probability"),
    ("nan", "needs a value"),
    ("nan:abc", "bad value"),
    ("hot_ambient:200", "hot_ambient"),
    ("throttle:5-3", "throttle"),
    ("throttle:5", "bad value"),
    ("wrap:10", "wrap"),
    ("spike_scale:0.5", "spike_scale"),
    ("noise:-1", "noise"),
    ("nan:0.1,nan:0.2", "given twice"),
])
def test_bad_specs_are_rejected_clearly(spec, match):
    with pytest.raises(ValueError, match=match):
        FaultConfig.parse(spec)


# ---------------------------------------------------------------- reading faults
def test_drop_makes_queries_fail_and_windows_say_so():
    backend, windows, _ = _run("drop:0.3")
    _, clean, _ = _run(None)
    with pytest.raises(SensorReadError):
        for _ in range(200):
            backend.sensor.instant_power_W()
    assert any("dropped" in w.flags for w in windows)
    assert sum(w.samples for w in windows) < 0.85 * sum(w.samples for w in clean)
    lost_edge = [w for w in windows if w.energy_mJ_start is None or w.energy_mJ_end is None]
    assert lost_edge and all("energy_from_power" in w.flags and math.isfinite(w.energy_J) for w in lost_edge)


def test_nan_readings_are_flagged_and_never_reach_the_energy():
    backend, windows, truths = _run("nan:0.2")
    assert any("nan_power" in w.flags for w in windows)
    nan_edge = [(w, t) for w, t in zip(windows, truths) if "nan" in w.flags and "energy_from_power" in w.flags]
    assert nan_edge
    for w, t in nan_edge:
        assert w.energy_J == pytest.approx(t.energy_J, rel=0.1)  # integrated instant power stands in (noisy samples)
    assert all(math.isfinite(w.mean_power_W) and math.isfinite(w.energy_J) for w in windows)
    assert any("temp_from_previous" in w.flags for w in windows)
    assert all(math.isfinite(w.gpu_temp_C) for w in windows[1:])


def test_stale_freezes_counter_updates_and_repeats_readings():
    backend, windows, _ = _run("stale:0.9", n_chunks=24, idle_every=3)
    ticks = backend.state.time_s / backend.preset.energy_counter_period_s
    assert backend.sensor.counter_updates < 0.2 * ticks
    assert any("stale" in w.flags and "energy_from_power" in w.flags for w in windows)
    readings = [backend.sensor.instant_power_W() for _ in range(200)]
    repeats = sum(a == b for a, b in zip(readings, readings[1:]))
    assert repeats > 150  # with sensor noise, fresh readings essentially never repeat


def test_spikes_raise_peak_power_but_not_the_counter_energy():
    _, spiky, truths = _run("spike:0.2,spike_scale:3")
    _, clean, _ = _run(None)
    assert [w.energy_J for w in spiky] == [w.energy_J for w in clean]  # the counter never spikes
    assert max(w.peak_power_W / t.peak_power_W for w, t in zip(spiky, truths)) > 2.5
    assert max(w.peak_power_W / t.peak_power_W for w, t in zip(clean, truths)) < 1.1


def test_noise_widens_instant_power_readings():
    backend = SimBackend(faults="noise:20", seed=1)
    backend.idle(1.0)
    readings = np.array([backend.sensor.instant_power_W() for _ in range(3000)])
    expected_std = math.hypot(20.0, backend.preset.sensor_noise_W)
    # statistics of the samples: standard errors of the std and the mean well inside these
    assert readings.std() == pytest.approx(expected_std, rel=0.1)
    assert readings.mean() == pytest.approx(backend.state.power_W, abs=1.5)


# ---------------------------------------------------------------- counter faults
def test_reset_drops_the_counter_and_the_reader_falls_back_to_power():
    backend, windows, truths = _run("reset:0.05", n_chunks=80)
    reset = [(w, t) for w, t in zip(windows, truths) if "counter_reset" in w.flags]
    assert reset
    for w, t in reset:
        assert w.energy_mJ_end < w.energy_mJ_start
        assert "energy_from_power" in w.flags
        assert w.energy_J == pytest.approx(t.energy_J, rel=0.1)  # integrated instant power (noisy samples)


def test_wrap_keeps_the_counter_below_its_modulus_and_is_repaired_exactly():
    modulus = 200_000  # mJ: wraps every ~0.4 s at full load (more than one window's energy, so no aliasing)
    _, wrapped, _ = _run(f"wrap:{modulus}")
    _, clean, _ = _run(None)
    assert all(w.energy_mJ_start < modulus and w.energy_mJ_end < modulus for w in wrapped)
    repaired = [w for w in wrapped if "counter_wrap" in w.flags]
    assert repaired
    # whole mJ on both sides (+ the modulus on one), one ÷ 1e3 each
    assert [w.energy_J for w in wrapped] == approx([w.energy_J for w in clean], n=2)


# ---------------------------------------------------------------- physical faults
def test_hot_ambient_raises_the_idle_temperature_by_the_ambient_difference():
    cool = SimBackend(seed=0)
    hot = SimBackend(faults="hot_ambient:45", seed=0)
    p = cool.preset
    conductance = 1 / p.thermal_resistance_C_per_W - p.leakage_W_per_C
    # steady state shifts by ΔT_amb / (R · conductance) once leakage feedback is included
    expected = (45.0 - p.ambient_C) / (p.thermal_resistance_C_per_W * conductance)
    # a difference of two steady states (~40 °C each: the scale) and the closed form's few ÷, ×, −
    assert hot.state.temperature_C - cool.state.temperature_C == approx(expected, n=8, scale=hot.state.temperature_C)
    assert hot.thermal.ambient_C == 45.0
    assert hot.idle(1.0).gpu_temp_C > cool.idle(1.0).gpu_temp_C
