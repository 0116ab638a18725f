"""The RC thermal model against scipy's ODE integrator, and steady temperatures T = T_amb + P·R."""

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from sim import thermal
from sim.backend import SimBackend
from sim.presets import load_preset
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx

MODEL = thermal.ThermalModel(resistance_C_per_W=0.083, capacitance_J_per_C=143.0, ambient_C=26.2)


def _ode_reference(temp0, power_ref, leak, leak_ref, model, seconds):
    """Integrate C dT/dt = P(T) − (T − T_amb)/R and dE/dt = P(T) numerically."""

    def rhs(_, y):
        power = power_ref + leak * (y[0] - leak_ref)
        return [(power - (y[0] - model.ambient_C) / model.resistance_C_per_W) / model.capacitance_J_per_C, power]

    sol = solve_ivp(rhs, (0.0, seconds), [temp0, 0.0], rtol=1e-11, atol=1e-9, method="DOP853")  # solver settings
    return sol.y[0, -1], sol.y[1, -1]


@pytest.mark.parametrize("temp0,power,leak,seconds", [(33.0, 530.0, 0.6, 6.0), (70.0, 80.0, 0.6, 40.0),
                                                      (30.0, 300.0, 0.0, 100.0), (50.0, 450.0, 2.0, 0.003)])
def test_exact_step_matches_numerical_integration(temp0, power, leak, seconds):
    seg = thermal.segment(MODEL, 5.0, temp0, 100.0, power, leak, 30.0)
    ref_temp, ref_energy = _ode_reference(temp0, power, leak, 30.0, MODEL, seconds)
    # not rounding: the reference is the ODE solver's answer, accurate to its global error (local
    # rtol 1e-11 and atol 1e-9 per step, accumulated over the steps): 1e-8 / 1e-7 relative, 1 nJ
    assert thermal.temperature_at(seg, 5.0 + seconds) == pytest.approx(ref_temp, rel=1e-8)
    assert thermal.energy_at(seg, 5.0 + seconds) - 100.0 == pytest.approx(ref_energy, rel=1e-7, abs=1e-9)


def test_steady_temperature_is_fixed_point_of_heating_and_cooling():
    t_ss = thermal.steady_temperature(500.0, 0.6, 30.0, MODEL)
    power_at_ss = 500.0 + 0.6 * (t_ss - 30.0)
    assert t_ss == approx(MODEL.ambient_C + power_at_ss * MODEL.resistance_C_per_W, n=8)  # a few +, ×, ÷
    seg = thermal.segment(MODEL, 0.0, t_ss, 0.0, 500.0, 0.6, 30.0)
    assert thermal.temperature_at(seg, 1e3) == approx(t_ss, n=8)  # it stays there (exp, a few +, ×)


def test_thermal_runaway_is_refused():
    with pytest.raises(ValueError, match="runaway"):
        thermal.segment(MODEL, 0.0, 30.0, 0.0, 100.0, 1.0 / MODEL.resistance_C_per_W, 30.0)
    with pytest.raises(ValueError):
        thermal.ThermalModel(-1.0, 10.0, 25.0)


def test_backend_idle_settles_at_ambient_plus_power_times_R():
    backend = SimBackend(ambient_C=31.0, seed=3)
    p = backend.preset
    backend.idle(20 * p.thermal_capacitance_J_per_C * p.thermal_resistance_C_per_W)  # ≫ τ
    state = backend.state
    # not rounding: after 20 τ the transient is e^-20 ≈ 2e-9 of the initial gap (≤ 100 °C) away
    assert state.temperature_C == pytest.approx(31.0 + state.power_W * p.thermal_resistance_C_per_W, abs=1e-6)
    assert state.power_W == approx(p.idle_power_W + p.leakage_W_per_C * (state.temperature_C - p.leakage_ref_C), n=4)


def test_backend_under_load_settles_at_ambient_plus_mean_power_times_R():
    """Over one period of a periodic steady state, C·ΔT = 0, so mean T = T_amb + R·mean P."""
    preset = load_preset("h100_sxm").replace(thermal_capacitance_J_per_C=4.0)  # τ ≈ 0.35 s: fast to settle
    backend = SimBackend(preset, seed=0, record_trace=True)
    workload = distilgpt2_moe_workload(2)
    while backend.state.time_s < 30 * 4.0 * preset.thermal_resistance_C_per_W:
        backend.run_chunk(lambda: workload)
    n_before = len(backend.trace)
    backend.run_chunk(lambda: workload)
    last_chunk = backend.trace[n_before:]
    truth = backend.last_truth
    # time-average temperature of the last chunk, trapezoid over its (short) segments
    area = sum(0.5 * (s.temp_start_C + s.temp_end_C) * (s.t_end_s - s.t_start_s) for s in last_chunk)
    mean_temp = area / (truth.t_end_s - truth.t_start_s)
    # not rounding: the trapezoid over the chunk's exponential segments and the chunk-to-chunk
    # drift left after 30 τ of warm-up; 0.2 °C and 0.05 °C are under 0.5 % of the ~40 °C rise
    assert mean_temp == pytest.approx(preset.ambient_C + truth.mean_power_W * preset.thermal_resistance_C_per_W, abs=0.2)
    assert last_chunk[-1].temp_end_C == pytest.approx(last_chunk[0].temp_start_C, abs=0.05)  # periodic


def test_h100_preset_reproduces_the_measured_warm_up():
    """docs/design.md §5 (the data-sheet preset's targets): idle ≈ 33 °C, ~70 °C after a minute of
    DistilGPT2-MoE inference at ~540 W."""
    backend = SimBackend("h100_sxm_datasheet", seed=0)
    assert backend.state.temperature_C == pytest.approx(33.0, abs=1.0)  # the preset's target: a measured idle ≈ 33 °C
    workload = distilgpt2_moe_workload(2)
    while backend.state.time_s < 60.0:
        window = backend.run_chunk(lambda: workload)
    assert 64.0 <= backend.state.temperature_C <= 76.0
    assert 480.0 <= backend.last_truth.mean_power_W <= 600.0
    assert window.gpu_temp_C == math.floor(window.gpu_temp_C)
    assert np.isfinite(window.gpu_temp_C)
