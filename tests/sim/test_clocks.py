"""A locked SM clock in the simulator: kernel time as 1/clock for compute and not for memory, power
on the documented voltage–frequency curve (sim/power.py), the throttles still acting below the lock,
and the presets' new fields validated."""

import pytest

from sim.backend import SimBackend
from sim.gpu import (REASON_APPLICATIONS_CLOCKS_SETTING, REASON_HW_POWER_BRAKE, REASON_SW_POWER_CAP)
from sim.kernels import chunk_kernels
from sim.power import PowerModel, voltage_fraction
from sim.presets import load_preset
from sim.pricing import ChunkPricer
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx

WORKLOAD = distilgpt2_moe_workload(2, batch=4, seq_len=256)
H100 = load_preset("h100_sxm")
CHUNK_N = 512   # a chunk's duration: a sum over its kernels (a few hundred) and phases


def chunk_seconds(preset, clock_MHz):
    """Simulated duration of one chunk on a fresh GPU with the clock locked at clock_MHz."""
    backend = SimBackend(preset, seed=0)
    backend.lock_clock(clock_MHz)
    backend.run_chunk(lambda: WORKLOAD)
    truth = backend.last_truth
    return truth.t_end_s - truth.t_start_s


def kernels(preset):
    return [k for phase in chunk_kernels(WORKLOAD, preset) for k in phase]


@pytest.mark.parametrize("clock_MHz", [1700.0, 1300.0, 990.0, 600.0])
def test_compute_bound_time_scales_as_one_over_the_clock(clock_MHz):
    # HBM a billion times faster than the data sheet and no launch overhead: every kernel with FLOPs
    # is compute-bound, so T(f) = C · f_max / f + R with C the compute time at the max clock and R
    # the FLOP-free kernels' (norms, residuals) memory time, which no clock changes
    preset = H100.replace(mem_bandwidth_GBps=1e12, launch_overhead_s=0.0)
    ks = kernels(preset)
    compute = sum(k.compute_s(preset) for k in ks)
    rest = sum(k.memory_s(preset) for k in ks if k.flops == 0)
    expected = compute * preset.max_clock_MHz / clock_MHz + rest
    assert chunk_seconds(preset, clock_MHz) == approx(expected, n=CHUNK_N)
    assert rest < 1e-6 * expected   # the clock-scaled part is all of it


@pytest.mark.parametrize("clock_MHz", [1700.0, 990.0, 400.0])
def test_memory_bound_time_does_not_depend_on_the_clock(clock_MHz):
    # tensor cores a billion times faster, no launch overhead: every kernel waits on HBM at any
    # clock above the floor, so T(f) = M, the memory time
    preset = H100.replace(peak_tflops=1e12, launch_overhead_s=0.0)
    expected = sum(k.memory_s(preset) for k in kernels(preset))
    assert chunk_seconds(preset, clock_MHz) == approx(expected, n=CHUNK_N)
    assert chunk_seconds(preset, preset.max_clock_MHz) == approx(expected, n=CHUNK_N)


def test_voltage_curve_is_the_floor_then_a_line_to_the_max_clock():
    # h100_sxm: floor 0.65 up to the 990 MHz knee, 1 at 1980 MHz; 1485 MHz is half-way along the line
    assert H100.voltage_floor_fraction == 0.65 and H100.voltage_knee_MHz == 990.0
    for clock_MHz, v in [(1980.0, 1.0), (1485.0, 0.825), (990.0, 0.65), (700.0, 0.65), (345.0, 0.65)]:
        assert voltage_fraction(clock_MHz / 1980.0, H100) == approx(v, n=4)


@pytest.mark.parametrize("clock_MHz, v", [(1485.0, 0.825), (1200.0, 0.65 + 0.35 * 210.0 / 990.0), (800.0, 0.65)])
def test_locked_phase_power_follows_the_voltage_frequency_model(clock_MHz, v):
    """Every phase's power at the leakage reference: P_idle + (P_c·v²·C + P_m·(1 − q + q·s·v²)·M) / t,
    with v the hand-computed voltage fraction (not sim.power's function)."""
    backend = SimBackend(H100, seed=0, record_trace=True)
    backend.lock_clock(clock_MHz)
    backend.run_chunk(lambda: WORKLOAD)
    priced = ChunkPricer(H100).price(WORKLOAD)
    s = clock_MHz / H100.max_clock_MHz
    durations = priced.durations_s(s)
    p, q = H100, H100.memory_power_sm_fraction
    segments = {seg.name: seg for seg in backend.trace}
    for phase, name in enumerate(priced.phase_names):
        seg = segments[name]
        assert seg.clock_MHz == approx(clock_MHz, n=1)
        dynamic_J = (p.compute_power_W * v * v * priced.compute_busy_s[phase]
                     + p.memory_power_W * (1 - q + q * s * v * v) * priced.memory_busy_s[phase])
        expected = p.idle_power_W + dynamic_J / durations[phase]
        assert seg.power_ref_W == approx(expected, n=8)
        assert seg.t_end_s - seg.t_start_s == approx(float(durations[phase]), n=4, scale=seg.t_end_s)


def test_a_fully_hbm_bound_phase_on_the_h200_saves_a_third_at_the_knee():
    """docs/design.md (clocks): q = 0.5 puts a phase that keeps HBM busy all the time at 33.5 % less
    energy at 990 MHz on h200_sxm, at the same speed (Ma et al.: up to 32 % of decode energy)."""
    h200 = load_preset("h200_sxm")
    model = PowerModel(h200)
    full = model.plan(lambda s: 1.0, 0.0, 1.0, 1.0, h200.leakage_ref_C)
    knee = model.plan(lambda s: 1.0, 0.0, 1.0, 990.0 / 1980.0, h200.leakage_ref_C)
    saved_W = h200.memory_power_W * 0.5 * (1 - 0.5 * 0.65 ** 2)          # q · P_m · (1 − s·v²)
    assert full.power_ref_W - knee.power_ref_W == approx(saved_W, n=8, scale=full.power_ref_W)
    saving = saved_W / (h200.idle_power_W + h200.memory_power_W)
    assert 0.32 <= saving <= 0.34 and knee.duration_s == full.duration_s


def test_compute_energy_per_flop_falls_with_v_squared_above_the_knee_only():
    """A compute-bound phase (C at the max clock, no memory time) at clock fraction s: its dynamic
    energy is P_c · v(s)² · C whatever the time it takes; below the knee only the time grows."""
    model = PowerModel(H100)
    for s, v in [(1.0, 1.0), (0.75, 0.825), (0.5, 0.65), (0.4, 0.65)]:
        plan = model.plan(lambda x: 1.0 / x, 1.0, 0.0, s, H100.leakage_ref_C)
        dynamic_J = (plan.power_ref_W - H100.idle_power_W) * plan.duration_s
        assert dynamic_J == approx(H100.compute_power_W * v * v, n=8)


def test_lock_reports_the_clock_and_the_reason_and_releases():
    backend = SimBackend(H100, seed=0)
    backend.lock_clock(1300)
    window = backend.run_chunk(lambda: WORKLOAD)
    assert window.sm_clock_MHz == 1300.0 and window.throttle_reasons == REASON_APPLICATIONS_CLOCKS_SETTING
    assert backend.last_truth.throttled_s == 0.0          # running at the locked clock is not throttling
    backend.lock_clock(None)
    window = backend.run_chunk(lambda: WORKLOAD)
    assert window.sm_clock_MHz == H100.max_clock_MHz and window.throttle_reasons == 0


@pytest.mark.parametrize("bad", [200.0, 2500.0, float("nan"), "1300", True])
def test_lock_outside_the_clock_range_or_not_a_number_is_refused(bad):
    backend = SimBackend(H100, seed=0)
    with pytest.raises(ValueError, match="clock"):
        backend.lock_clock(bad)


def test_the_power_limit_still_lowers_a_locked_clock():
    backend = SimBackend(H100, seed=0, power_limit_W=250.0)
    backend.lock_clock(1800)
    window = backend.run_chunk(lambda: WORKLOAD)
    assert window.throttle_reasons & REASON_SW_POWER_CAP and window.throttle_reasons & REASON_APPLICATIONS_CLOCKS_SETTING
    assert window.sm_clock_MHz < 1800 and backend.last_truth.throttled_s > 0


@pytest.mark.parametrize("lock_MHz, expected_MHz", [(1500.0, 990.0), (800.0, 800.0)])
def test_a_slowdown_takes_the_lower_of_the_lock_and_the_slowdown_clock(lock_MHz, expected_MHz):
    backend = SimBackend(H100, seed=0, faults="throttle:0-10")
    backend.lock_clock(lock_MHz)
    window = backend.run_chunk(lambda: WORKLOAD)
    assert window.throttle_reasons & REASON_HW_POWER_BRAKE and window.sm_clock_MHz == expected_MHz


@pytest.mark.parametrize("field, value, message", [
    ("voltage_floor_fraction", 0.0, "must be in"), ("voltage_floor_fraction", 1.2, "must be in"),
    ("voltage_knee_MHz", 1980.0, "must lie in"), ("voltage_knee_MHz", 100.0, "must lie in"),
    ("memory_power_sm_fraction", 1.5, "must be in"), ("memory_power_sm_fraction", -0.1, ">= 0")])
def test_preset_voltage_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=f"{field}.*{message}"):
        H100.replace(**{field: value})
