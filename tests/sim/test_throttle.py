"""Thermal slowdown above the threshold, the power limit, and the forced-slowdown fault."""

import pytest

from sim.backend import SimBackend
from sim.gpu import (REASON_HW_POWER_BRAKE, REASON_HW_SLOWDOWN, REASON_HW_THERMAL_SLOWDOWN,
                     REASON_SW_POWER_CAP)
from sim.kernels import chunk_kernels
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx, tol

WORKLOAD = distilgpt2_moe_workload(2)


# A chunk's duration vs Σ of its kernels' roofline times: a sum over the kernels (a few hundred at
# most) on one side, a difference of two clock times (of size t_end: the scale) on the other.
CHUNK_N = 512


def _reference_chunk_seconds(preset, clock_fraction):
    """Σ over every kernel of its roofline time (the readable kernel list, not the vectorised pricer)."""
    return sum(k.time_s(preset, clock_fraction) for phase in chunk_kernels(WORKLOAD, preset) for k in phase)


@pytest.fixture(scope="module")
def hot_run():
    # the data-sheet preset runs hot enough at 55 °C ambient to reach the slowdown threshold
    backend = SimBackend("h100_sxm_datasheet", faults="hot_ambient:55", seed=1, record_trace=True)
    rows = []
    while backend.state.time_s < 40.0:
        temp_before = backend.state.temperature_C
        window = backend.run_chunk(lambda: WORKLOAD)
        rows.append((temp_before, window, backend.last_truth))
    return backend, rows


def test_no_slowdown_below_threshold_and_slowdown_above(hot_run):
    backend, rows = hot_run
    p = backend.preset
    cool = [(w, t) for temp, w, t in rows if temp < p.slowdown_C - p.slowdown_hysteresis_C - 1.0 and t.throttled_s == 0]
    hot = [(w, t) for temp, w, t in rows if w.throttle_reasons & REASON_HW_THERMAL_SLOWDOWN]
    assert cool and hot
    assert all(w.sm_clock_MHz == p.max_clock_MHz and w.throttle_reasons == 0 for w, _ in cool)
    assert all(w.throttle_reasons & REASON_HW_SLOWDOWN for w, _ in hot)
    assert max(t.temp_end_C for _, _, t in rows) < p.slowdown_C + 1.0  # slowdown holds the temperature near the threshold
    first_hot = next(i for i, (_, w, _) in enumerate(rows) if w.throttle_reasons & REASON_HW_THERMAL_SLOWDOWN)
    assert rows[first_hot][2].temp_end_C >= p.slowdown_C - 0.5


def test_throttled_kernels_run_at_the_roofline_of_the_slow_clock(hot_run):
    backend, rows = hot_run
    p = backend.preset
    full = [t for _, _, t in rows if t.throttled_s == 0]
    slow = [t for _, w, t in rows if t.throttled_s == approx(t.t_end_s - t.t_start_s, n=4, scale=t.t_end_s)]
    assert full and slow
    fraction = p.throttled_clock_MHz / p.max_clock_MHz
    for t in full[:3]:
        assert t.t_end_s - t.t_start_s == approx(_reference_chunk_seconds(p, 1.0), n=CHUNK_N, scale=t.t_end_s)
    for t in slow[:3]:
        assert t.t_end_s - t.t_start_s == approx(_reference_chunk_seconds(p, fraction), n=CHUNK_N, scale=t.t_end_s)
    assert _reference_chunk_seconds(p, fraction) > 1.3 * _reference_chunk_seconds(p, 1.0)


def test_slowdown_engages_at_threshold_and_releases_below_the_hysteresis_band(hot_run):
    backend, _ = hot_run
    p = backend.preset
    engaged = released = 0
    for before, after in zip(backend.trace, backend.trace[1:]):
        was_hot = bool(before.throttle_reasons & REASON_HW_THERMAL_SLOWDOWN)
        is_hot = bool(after.throttle_reasons & REASON_HW_THERMAL_SLOWDOWN)
        if is_hot and not was_hot:
            engaged += 1
            assert after.temp_start_C >= p.slowdown_C
            assert after.clock_MHz == p.throttled_clock_MHz
        if was_hot and not is_hot:
            released += 1
            assert after.temp_start_C < p.slowdown_C - p.slowdown_hysteresis_C
            assert after.clock_MHz == p.max_clock_MHz
        if was_hot and is_hot:
            assert after.temp_start_C >= p.slowdown_C - p.slowdown_hysteresis_C
    assert engaged >= 2 and released >= 1


def test_power_limit_caps_phase_power_by_lowering_the_clock():
    backend = SimBackend(power_limit_W=300.0, seed=0, record_trace=True)
    uncapped = SimBackend(seed=0)
    window = backend.run_chunk(lambda: WORKLOAD)
    uncapped.run_chunk(lambda: WORKLOAD)
    p = backend.preset
    assert window.throttle_reasons & REASON_SW_POWER_CAP
    assert backend.last_truth.t_end_s > uncapped.last_truth.t_end_s  # slower
    capped = [s for s in backend.trace if s.throttle_reasons & REASON_SW_POWER_CAP]
    assert capped
    for seg in backend.trace:
        power_at_start = seg.power_ref_W + p.leakage_W_per_C * (seg.temp_start_C - p.leakage_ref_C)
        if seg in capped and seg.clock_MHz > p.min_clock_MHz + 1e-6:  # (not pinned at the floor)
            # not rounding: the limiter's brentq stops within xtol 1e-9 of the clock fraction
            # (sim/power.py); 1e-6 of the limit allows a slope of 3e5 W per unit of clock fraction
            assert power_at_start == pytest.approx(300.0, rel=1e-6)  # the limiter found the clock that meets the limit
            assert seg.clock_MHz < p.max_clock_MHz
        elif seg not in capped:
            assert power_at_start <= 300.0 + tol(float, n=4, scale=300.0)  # recomputed above: a few roundings
    assert backend.last_truth.mean_power_W < uncapped.last_truth.mean_power_W


def test_forced_throttle_fault_slows_exactly_its_interval():
    backend = SimBackend(faults="throttle:1-2", seed=3)
    p = backend.preset
    while backend.state.time_s < 3.0:
        window = backend.run_chunk(lambda: WORKLOAD)
        inside = 1.0 <= window.t_start_s and window.t_end_s <= 2.0
        outside = window.t_end_s <= 1.0 or window.t_start_s >= 2.0
        if inside:
            assert window.throttle_reasons & REASON_HW_POWER_BRAKE
            assert window.sm_clock_MHz == p.throttled_clock_MHz
        if outside:
            assert not window.throttle_reasons & REASON_HW_POWER_BRAKE
            assert window.sm_clock_MHz == p.max_clock_MHz
