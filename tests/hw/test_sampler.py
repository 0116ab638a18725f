"""The background sensor sampler: thread lifecycle, sampling period, counter reads, failures."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from tests.hw.fake_nvml import FakeClock, FakeNvml
from hw.sample import SensorSample
from hw.sampler import SensorSampler


def test_thread_starts_samples_at_roughly_the_period_and_stops_cleanly():
    fake = FakeNvml(FakeClock(), 220.0)
    period = 0.01
    sampler = SensorSampler(fake, period)
    before = threading.active_count()
    with sampler:
        assert sampler.running
        time.sleep(0.5)
    assert not sampler.running and threading.active_count() == before
    count = len(sampler)
    times = [s.t_s for s in sampler.samples_between(-1e9, 1e9)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 2 shared CPU cores: allow scheduling jitter, but the rate must follow the period.
    assert 0.5 / period * 0.4 <= count <= 0.5 / period + 3
    assert period * 0.5 <= statistics.median(gaps) <= period * 2.0
    assert all(s.power_W == 220.0 and s.energy_mJ is None for s in sampler.samples_between(-1e9, 1e9))
    time.sleep(0.05)
    assert len(sampler) == count  # nothing sampled after stop()
    sampler.stop()  # stopping twice is fine
    sampler.start()  # and the sampler can be restarted
    time.sleep(0.05)
    sampler.stop()
    assert len(sampler) > count


def test_counter_is_read_only_every_nth_sample():
    fake = FakeNvml(FakeClock(), 100.0)
    sampler = SensorSampler(fake, 0.01, clock=fake.clock, counter_every=5)
    for _ in range(20):
        fake.clock.advance(0.01)
        sampler.sample_once()
    with_counter = [s for s in sampler.samples_between(0, 1) if s.energy_mJ is not None]
    assert len(with_counter) == 4
    assert fake.log.count("counter") == 4


def test_failing_reads_are_counted_and_the_thread_survives():
    fake = FakeNvml(FakeClock(), 100.0)
    calls = {"n": 0}

    def flaky(t, value):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("GPU is lost")
        return value

    fake.power_fault = flaky
    with SensorSampler(fake, 0.005) as sampler:
        time.sleep(0.2)
    assert sampler.errors > 0 and len(sampler) > 0
    assert "GPU is lost" in str(sampler.last_error)


def test_samples_are_kept_in_time_order_and_pruned():
    fake = FakeNvml(FakeClock(), 100.0)
    sampler = SensorSampler(fake, 0.01, max_samples=10)
    for t in [0.3, 0.1, 0.2, 0.5, 0.4]:
        sampler._append(SensorSample(t_s=t, power_W=1.0))
    assert [s.t_s for s in sampler.samples_between(0.15, 0.45)] == [0.2, 0.3, 0.4]
    for i in range(20):
        sampler._append(SensorSample(t_s=1.0 + i, power_W=1.0))
    assert len(sampler) <= 10
    assert sampler.samples_between(-1, 1e9)[-1].t_s == 20.0  # newest kept, oldest dropped


@pytest.mark.parametrize("kwargs, match", [
    ({"period_s": 0}, "period_s"), ({"period_s": 0.01, "counter_every": -1}, "counter_every"),
    ({"period_s": 0.01, "max_samples": 1}, "max_samples"),
])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SensorSampler(FakeNvml(FakeClock()), **kwargs)


def test_slow_fields_are_read_only_every_nth_tick_and_windows_still_get_them():
    from hw.sample_summary import summarise

    fake = FakeNvml(FakeClock(), 150.0)
    sampler = SensorSampler(fake, 0.01, clock=fake.clock, slow_every=4)
    for _ in range(12):
        fake.clock.advance(0.01)
        sampler.sample_once()
    samples = sampler.samples_between(0, 1)
    assert all(s.power_W == 150.0 for s in samples)
    assert [s.gpu_temp_C is not None for s in samples] == [True, False, False, False] * 3
    assert fake.log.count("power") == 12 and fake.log.count("fields") == 3 and fake.log.count("gpu_temp") == 3
    assert fake.log.count("memory") == 3 and fake.log.count("sm_clock") == 3 and fake.log.count("clock_events") == 3
    summary = summarise(samples, 0.0, 1.0)
    assert (summary.count, summary.gpu_temp_C, summary.mem_temp_C, summary.sm_clock_MHz) == (12, 40.0, 45.0, 1980.0)
    every = SensorSampler(fake, 0.01, clock=fake.clock, slow_every=1)
    every.sample_once()
    assert every.samples_between(0, 1e9)[-1].gpu_temp_C == 40.0
    with pytest.raises(ValueError, match="slow_every"):
        SensorSampler(fake, 0.01, slow_every=0)
