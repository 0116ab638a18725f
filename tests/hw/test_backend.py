"""hw.backend.NvmlBackend (the TelemetryBackend over NVML) driven by the scripted fake NVML."""

from __future__ import annotations

import math
import time

import pytest

from tests.hw.fake_nvml import FakeClock, FakeNvml
from hw.backend import NvmlBackend
from nectar.plugins import make_backend
from nectar.telemetry.energy import step_windows
from nectar.telemetry.window import TelemetryBackend
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import approx


def workload(counts=((5, 3), (2, 6))) -> ChunkWorkload:
    cost = ExpertCost(flops=2.0e6, bytes=4.0e3, weight_bytes=1.0e6)
    layers = [LayerWorkload(tokens_per_expert=list(c), expert_costs=[cost] * len(c)) for c in counts]
    return ChunkWorkload(tokens=8, batch=2, seq_len=4, d_model=16, n_layers=2, n_heads=2, vocab_size=50,
                         layers=layers, policy="static")


def fake_backend(power_W=300.0, **kw):
    clock = FakeClock()
    fake = FakeNvml(clock, power_W)
    syncs = []
    backend = NvmlBackend(sample_period_s=None, sync=lambda: syncs.append(clock()), nvml=fake,
                          clock=clock, sleep=clock.advance, **kw)
    return clock, fake, backend, syncs


def test_is_a_telemetry_backend_and_reachable_by_name():
    clock, fake, backend, _ = fake_backend()
    assert isinstance(backend, TelemetryBackend) and backend.name == "nvml"
    assert backend.gpu_name() == "Fake H100"
    via_plugin = make_backend("nvml", sample_period_s=None, sync=lambda: None, nvml=FakeNvml(FakeClock()))
    assert isinstance(via_plugin, NvmlBackend)
    via_plugin.close()

# Tolerances (tests/tolerance.py): a window's numbers are differences and ratios of a few float
# clock readings and counter values (mJ ÷ 1e3), and trapezoids over its samples (up to ~40 from
# the real sampler thread): n = 64 roundings in float64.
WINDOW_N = 64


def test_run_chunk_measures_compute_between_two_syncs():
    clock, fake, backend, syncs = fake_backend(power_W=300.0)
    clock.t = 1.0
    ran = []

    def compute():
        ran.append(clock())
        fake.set_power(520.0)
        clock.advance(2.0)
        return workload()

    window = backend.run_chunk(compute)
    assert ran == [1.0] and syncs == [1.0, 3.0]  # sync before the first and after the last kernel
    assert window.workload == workload()  # the window carries the workload compute() returned
    truth = fake.true_energy_J(1.0, 3.0)
    assert window.energy_J == approx(truth, n=WINDOW_N) == approx(1040.0, n=WINDOW_N)
    assert window.duration_s == approx(2.0, n=WINDOW_N)
    assert window.energy_mJ_end - window.energy_mJ_start == approx(1_040_000, n=WINDOW_N)
    assert window.samples == 2 and window.peak_power_W == 520.0
    assert window.gpu_temp_C == 40.0 and window.mem_temp_C == 45.0
    assert window.mem_total_B == 80 * 2**30 and window.memory_pressure == approx(10 / 80, n=WINDOW_N)
    assert window.sm_clock_MHz == 1980.0 and window.is_valid()
    assert window.energy_power_J is not None and window.flags == []
    assert backend.last_measurement.energy_J == window.energy_J


def test_idle_window_and_short_window_flag():
    clock, fake, backend, _ = fake_backend(power_W=80.0)
    idle = backend.idle(1.0)
    assert idle.energy_J == approx(80.0, n=WINDOW_N) and idle.mean_power_W == approx(80.0, n=WINDOW_N)
    clock.t = 1.23
    short = backend.run_chunk(lambda: clock.advance(0.03))
    assert "short_window" in short.flags
    assert short.energy_power_J == approx(80.0 * 0.03, n=WINDOW_N)
    with pytest.raises(ValueError, match="idle seconds"):
        backend.idle(-1)
    with pytest.raises(ValueError, match="idle seconds"):
        backend.idle(math.nan)


def test_bad_input_and_failing_compute():
    clock, fake, backend, _ = fake_backend()
    with pytest.raises(ValueError, match="ChunkWorkload"):
        backend.run_chunk(lambda: {"tokens": 3})
    with pytest.raises(ValueError, match="callable"):
        backend.run_chunk(42)
    with pytest.raises(ZeroDivisionError):
        backend.run_chunk(lambda: 1 / 0)
    assert backend.meter.open_windows == []
    assert backend.run_chunk(lambda: clock.advance(1.0)).energy_J == approx(300.0, n=WINDOW_N)
    with pytest.raises(ValueError, match="sample_period_s"):
        NvmlBackend(sample_period_s=0, nvml=fake)


def test_counter_fault_reaches_the_window_flags():
    clock, fake, backend, _ = fake_backend(power_W=250.0)
    fake.counter_fault = lambda t, v: 7.0  # frozen
    window = backend.run_chunk(lambda: clock.advance(1.0))
    assert {"stale", "energy_from_power"} <= set(window.flags)
    assert window.energy_J == approx(250.0, n=WINDOW_N)


def test_close_stops_sampler_and_shuts_nvml_down():
    fake = FakeNvml(FakeClock(), 200.0)
    backend = NvmlBackend(sample_period_s=0.005, sync=lambda: None, nvml=fake)  # real clock, real thread
    assert backend.sampler.running
    window = backend.run_chunk(lambda: time.sleep(0.2))
    assert window.samples >= 10  # the thread's samples land in the window
    assert window.mean_power_W == approx(200.0, n=WINDOW_N)
    backend.close()
    backend.close()
    assert fake.closed and not backend.sampler.running
    with pytest.raises(RuntimeError, match="closed"):
        backend.idle(0.1)


def test_lock_clock_is_refused_without_touching_nvml():
    """The lent GPUs' clocks must not be changed: `lock_clock` raises before any NVML call (the fake
    logs every call), through the backend and through the core's helper alike."""
    from nectar.telemetry.window import lock_clock

    clock, fake, backend, _ = fake_backend()
    calls = list(fake.log)
    for MHz in (1300.0, None):
        with pytest.raises(ValueError, match="clocks must not be changed.*simulator only"):
            backend.lock_clock(MHz)
        with pytest.raises(ValueError, match="clocks must not be changed"):
            lock_clock(backend, MHz)
    assert fake.log == calls
    backend.close()


def test_no_hw_module_calls_an_nvml_set_function():
    """Read-only NVML: no source file of the NVML backend names a setter (clocks, power limits,
    persistence, application clocks)."""
    from pathlib import Path

    sources = {path.name: path.read_text() for path in (Path(__file__).parents[2] / "hw").glob("*.py")}
    assert sources
    for name, text in sources.items():
        for setter in ("nvmlDeviceSet", "nvmlDeviceReset", "SetGpuLockedClocks", "SetApplicationsClocks",
                       "SetPowerManagementLimit", "SetPersistenceMode"):
            assert setter not in text, f"hw/{name} names {setter}"


def test_hw_run_refuses_clock_policies_before_any_work_on_nvml():
    from nectar.cli.hw_run import refuse_unlockable_clocks

    clock, fake, backend, _ = fake_backend()
    calls = list(fake.log)
    refuse_unlockable_clocks(backend, ["static-top2", "nectar"])          # no clock: nothing asked
    with pytest.raises(ValueError, match="clocks must not be changed"):
        refuse_unlockable_clocks(backend, ["static-top2", "nectar@clock:1300"])
    assert fake.log == calls
    backend.close()


def test_step_windows_read_the_counter_only_at_the_ends_of_the_block():
    """Inside `step_windows` a window's edges read instant power alone; the counter is read once at
    each end of the block, and the span's energy is the counter's over it."""
    clock, fake, backend, _ = fake_backend(power_W=200.0)
    with step_windows(backend) as span:
        fake.log.clear()
        windows = [backend.run_chunk(lambda: clock.advance(0.002)) for _ in range(50)]   # 2 ms steps
        inside = list(fake.log)
        fake.set_power(400.0)
        windows.append(backend.idle(0.2))                          # the block ends on a counter tick
    assert "counter" not in inside and set(inside) == {"power"} and len(inside) == 2 * 50
    assert all(w.energy_mJ_start is None and "short_window" in w.flags for w in windows[:50])
    assert [w.energy_J for w in windows[:50]] == [approx(0.4, n=WINDOW_N)] * 50   # integrated power
    assert span.energy_J() == pytest.approx(fake.true_energy_J(0.0, 0.3), abs=2e-3) == pytest.approx(100.0, abs=2e-3)
    assert span.t_start_s == 0.0 and span.t_end_s == approx(0.3, n=WINDOW_N)
    full = backend.run_chunk(lambda: clock.advance(1.0))             # after the block: full edges again
    assert full.energy_mJ_start is not None and full.gpu_temp_C == 40.0


def test_a_backend_without_step_windows_yields_no_span():
    class Plain:
        pass
    with step_windows(Plain()) as span:
        assert span is None
