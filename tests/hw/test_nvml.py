"""Energy windows of hw.energy_meter against a scripted fake NVML with a controllable clock.

References: the fake's closed-form energy of piecewise-constant power, and P·t for constant power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.hw.fake_nvml import FakeClock, FakeNvml
from hw.energy_meter import EnergyMeter
from hw.sampler import SensorSampler
from tests.tolerance import approx, tol


def make_meter(power_W=250.0, start_s=0.0, sampler_period_s=None, **fake_kw):
    clock = FakeClock(start_s)
    fake = FakeNvml(clock, power_W, **fake_kw)
    sampler = SensorSampler(fake, sampler_period_s, clock=clock) if sampler_period_s else None
    meter = EnergyMeter(fake, sync=lambda: fake.log.append("sync"), clock=clock, sampler=sampler)
    return clock, fake, meter, sampler


# Tolerances (tests/tolerance.py): a window's energy is a difference of float clock readings and
# counter values (the fake clock advances in up to 200 steps of 0.01 s; each reading rounds) and the
# sampler's trapezoid sums up to 200 samples: n = 2 · 200 roundings, in float64.
NVML_N = 400


def run_for(clock, seconds, sampler=None, step_s=0.01):
    """Advance the fake clock, letting the (manual) sampler read every `step_s`."""
    end = clock() + seconds
    while clock() + step_s <= end + 1e-12:  # not an assertion: slack for the clock's float steps
        clock.advance(step_s)
        if sampler is not None:
            sampler.sample_once()
    clock.t = end


# ---------------------------------------------------------------------- constant power, closed form
def test_constant_power_aligned_window_is_exact():
    clock, fake, meter, _ = make_meter(power_W=250.0)
    meter.begin_window("w")
    clock.advance(2.0)
    m = meter.end_window("w")
    assert m.duration_s == approx(2.0, n=NVML_N)
    assert m.energy_J == approx(250.0 * 2.0, n=NVML_N)  # counter ticks align with the window
    assert m.power_energy_J == approx(250.0 * 2.0, n=NVML_N)
    assert m.energy_mJ_end - m.energy_mJ_start == approx(500_000, n=NVML_N)
    assert m.flags == []
    assert m.disagreement() == approx(0.0, n=NVML_N, scale=1.0)  # a relative difference of two energies


@pytest.mark.parametrize("start_s, seconds", [(0.037, 1.0), (0.151, 2.33), (1.9, 5.0)])
def test_counter_error_is_bounded_by_one_update_period(start_s, seconds):
    power = 310.0
    clock, fake, meter, _ = make_meter(power_W=power, start_s=0.0)
    clock.t = start_s
    meter.begin_window("w")
    clock.advance(seconds)
    m = meter.end_window("w")
    truth = fake.true_energy_J(start_s, start_s + seconds)
    assert truth == approx(power * seconds, n=NVML_N)
    assert abs(m.counter_energy_J - truth) <= power * fake.counter_period_s + 1e-3  # + the counter's 1 mJ step
    assert m.power_energy_J == approx(truth, n=NVML_N)
    # one update period late or early, plus the counter's 1 mJ step, relative to the truth
    assert abs(m.disagreement()) <= (power * fake.counter_period_s + 1e-3) / truth + tol(float, NVML_N)


def test_stepped_power_integrates_within_sampling_error():
    clock, fake, meter, sampler = make_meter(power_W=100.0, sampler_period_s=0.01)
    meter.begin_window("w")
    run_for(clock, 0.5, sampler)
    fake.set_power(500.0)
    run_for(clock, 0.7, sampler)
    fake.set_power(200.0)
    run_for(clock, 0.8, sampler)
    m = meter.end_window("w")
    truth = fake.true_energy_J(0.0, 2.0)
    assert truth == approx(100 * 0.5 + 500 * 0.7 + 200 * 0.8, n=NVML_N)
    # Each step is seen one sample late or early by the trapezoid: error <= ΔP·dt/2 per step.
    assert abs(m.power_energy_J - truth) <= (400 + 300) * 0.01 / 2 + tol(float, NVML_N, scale=truth)
    assert m.sensors.peak_power_W == 500.0
    assert m.sensors.count == len(sampler.samples_between(0.0, 2.0)) + 2
    assert abs(m.energy_J - truth) <= 500 * 0.1


# ---------------------------------------------------------------------- protocol: sync, nesting, errors
def test_each_edge_synchronises_then_reads_the_counter_once():
    clock, fake, meter, _ = make_meter()
    meter.begin_window("w")
    clock.advance(1.0)
    meter.end_window("w")
    assert fake.log.count("counter") == 2
    assert fake.log.count("sync") == 2
    first_counter = fake.log.index("counter")
    assert fake.log[:first_counter] == ["sync"]
    last_sync = len(fake.log) - 1 - fake.log[::-1].index("sync")
    assert "counter" in fake.log[last_sync:]


def test_nested_windows_add_up():
    clock, fake, meter, _ = make_meter(power_W=200.0)
    meter.begin_window("outer")
    clock.advance(0.5)
    meter.begin_window("a")
    clock.advance(1.0)
    a = meter.end_window("a")
    fake.set_power(400.0)
    meter.begin_window("b")
    clock.advance(1.0)
    b = meter.end_window("b")
    clock.advance(0.5)
    assert meter.open_windows == ["outer"]
    outer = meter.end_window("outer")
    assert a.energy_J == approx(200.0, n=NVML_N)
    assert b.energy_J == approx(400.0, n=NVML_N)
    assert outer.energy_J == approx(fake.true_energy_J(0.0, 3.0), n=NVML_N)
    assert outer.energy_J == approx(a.energy_J + b.energy_J + 200 * 0.5 + 400 * 0.5, n=NVML_N)


def test_window_misuse_gives_clear_errors():
    clock, fake, meter, _ = make_meter()
    meter.begin_window("w")
    with pytest.raises(ValueError, match="already open"):
        meter.begin_window("w")
    with pytest.raises(ValueError, match="no open energy window named 'x'"):
        meter.end_window("x")
    with pytest.raises(ValueError, match="counter_period_s"):
        EnergyMeter(fake, sync=lambda: None, counter_period_s=0)


def test_context_manager_measures_and_cancels_on_error():
    clock, fake, meter, _ = make_meter(power_W=150.0)
    with meter.window("ok") as handle:
        clock.advance(1.0)
    assert handle.measurement.energy_J == approx(150.0, n=NVML_N)
    with pytest.raises(RuntimeError, match="boom"):
        with meter.window("bad"):
            raise RuntimeError("boom")
    assert meter.open_windows == []


# ---------------------------------------------------------------------- counter faults
def test_counter_wrap_is_unwrapped():
    bits = 32
    clock, fake, meter, _ = make_meter(power_W=250.0, counter_offset_mJ=2**bits - 100_000)
    fake.counter_fault = lambda t, v: v % 2**bits
    meter.counter_bits = bits
    meter.begin_window("w")
    clock.advance(2.0)
    m = meter.end_window("w")
    assert m.energy_mJ_end < m.energy_mJ_start
    assert "counter_wrap" in m.flags
    assert m.energy_J == approx(500.0, n=NVML_N)


def test_counter_reset_falls_back_to_integrated_power():
    clock, fake, meter, _ = make_meter(power_W=250.0, counter_offset_mJ=5e9)
    fake.counter_fault = lambda t, v: v if t < 1.0 else v - 5e9 - 250_000  # driver reload at t=1
    meter.begin_window("w")
    clock.advance(2.0)
    m = meter.end_window("w")
    assert {"counter_reset", "energy_from_power"} <= set(m.flags)
    assert m.counter_energy_J is None
    assert m.energy_J == approx(500.0, n=NVML_N)


def test_stale_counter_is_flagged_only_when_it_should_have_moved():
    clock, fake, meter, _ = make_meter(power_W=300.0)
    fake.counter_fault = lambda t, v: 42_000.0  # frozen
    meter.begin_window("long")
    clock.advance(1.0)
    long = meter.end_window("long")
    assert {"stale", "energy_from_power"} <= set(long.flags)
    assert long.energy_J == approx(300.0, n=NVML_N)
    meter.begin_window("short")
    clock.advance(0.25)  # under 3 update periods: a frozen counter is not yet suspicious
    assert "stale" not in meter.end_window("short").flags
    fake.set_power(0.0)
    meter.begin_window("dark")
    clock.advance(1.0)
    dark = meter.end_window("dark")
    assert "stale" not in dark.flags and dark.energy_J == 0.0


@pytest.mark.parametrize("bad, flag", [(math.nan, "nan"), (-5.0, "negative")])
def test_nan_or_negative_counter_is_flagged(bad, flag):
    clock, fake, meter, _ = make_meter(power_W=120.0)
    fake.counter_fault = lambda t, v: bad if t > 0.5 else v
    meter.begin_window("w")
    clock.advance(1.0)
    m = meter.end_window("w")
    assert {flag, "energy_from_power"} <= set(m.flags)
    assert m.energy_J == approx(120.0, n=NVML_N)


def test_unsupported_counter_and_no_power_gives_nan_not_a_crash():
    clock, fake, meter, _ = make_meter(power_W=120.0, unsupported=("energy_counter",))
    fake.power_fault = lambda t, v: None
    meter.begin_window("w")
    clock.advance(1.0)
    m = meter.end_window("w")
    assert {"counter_unsupported", "unsupported:energy_counter", "no_power_samples", "no_energy"} <= set(m.flags)
    assert math.isnan(m.energy_J)


def test_nan_power_samples_are_dropped_and_flagged():
    clock, fake, meter, sampler = make_meter(power_W=200.0, sampler_period_s=0.01)
    fake.power_fault = lambda t, v: math.nan if 0.3 < t < 0.5 else v
    meter.begin_window("w")
    run_for(clock, 1.0, sampler)
    m = meter.end_window("w")
    assert "nan_power" in m.flags
    assert m.sensors.mean_power_W == approx(200.0, n=NVML_N)
    assert m.power_energy_J == approx(200.0, n=NVML_N)


def test_short_window_keeps_counter_and_gives_power_estimate():
    clock, fake, meter, _ = make_meter(power_W=400.0)
    clock.t = 0.02
    meter.begin_window("w")
    clock.advance(0.05)
    m = meter.end_window("w")
    assert "short_window" in m.flags
    assert m.counter_energy_J == 0.0  # the counter did not tick: the Zeus "reads 0" case
    assert m.power_energy_J == approx(400.0 * 0.05, n=NVML_N)


def test_unsupported_fields_become_none_and_flags():
    clock, fake, meter, _ = make_meter(unsupported=("mem_temp", "power_instant"))
    meter.begin_window("w")
    clock.advance(1.0)
    m = meter.end_window("w")
    assert m.sensors.mem_temp_C is None
    assert m.sensors.gpu_temp_C == 40.0
    assert {"unsupported:mem_temp", "power_is_average"} <= set(m.flags)


def test_throttle_reasons_are_or_ed_over_the_window():
    clock, fake, meter, sampler = make_meter(sampler_period_s=0.01)
    meter.begin_window("w")
    fake.reasons = 0x4
    run_for(clock, 0.2, sampler)
    fake.reasons = 0x20
    run_for(clock, 0.2, sampler)
    fake.reasons = 0
    m = meter.end_window("w")
    assert m.sensors.throttle_reasons == 0x24
