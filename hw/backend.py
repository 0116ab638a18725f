"""The hardware telemetry backend: runs a chunk's compute inside a measured NVML energy window.

`NvmlBackend` implements `nectar.telemetry.window.TelemetryBackend`. It owns an NVML adapter, a
background `SensorSampler` (instant power, temperatures, memory, SM clock, throttle reasons) and
an `EnergyMeter`; `run_chunk(compute)` synchronises, reads the counter, runs `compute()` (the
chunk's real forward pass, which returns its workload), synchronises, reads the counter again and
returns a `TelemetryWindow` that carries the workload. Read-only: GPU settings are never changed.

`device_index` is NVML's index; the default sync waits on torch's *current* CUDA device, so on a
multi-GPU host set CUDA_DEVICE_ORDER=PCI_BUS_ID (same order as NVML) or pass your own `sync`.
Without the sampler (`sample_period_s=None`) mean/peak power come from the two edge readings only.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hw.cotenant import CoTenant
from hw.energy_meter import EnergyMeter, Measurement
from hw.info import device_info
from hw.nvml_api import NvmlApi
from hw.sampler import SensorSampler
from nectar.telemetry.energy import CounterSpan
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload


CLOCK_REFUSAL = ("the lent GPUs' clocks must not be changed; clock:MHZ and POLICY@clock:MHZ policies run on "
                 "the simulator only (--backend sim)")


def measurement_to_window(m: Measurement) -> TelemetryWindow:
    """TelemetryWindow of a closed Measurement; mean power falls back to energy / duration."""
    s = m.sensors
    flags = list(m.flags)
    mean_power_W, peak_power_W = s.mean_power_W, s.peak_power_W
    if mean_power_W is None:
        mean_power_W = m.energy_J / m.duration_s if m.duration_s > 0 else math.nan
        peak_power_W = mean_power_W
        flags.append("power_from_energy")
    return TelemetryWindow(
        t_start_s=m.t_start_s,
        t_end_s=m.t_end_s,
        energy_J=m.energy_J,
        mean_power_W=mean_power_W,
        peak_power_W=peak_power_W,
        gpu_temp_C=math.nan if s.gpu_temp_C is None else s.gpu_temp_C,
        mem_temp_C=s.mem_temp_C,
        mem_used_B=s.mem_used_B,
        mem_total_B=s.mem_total_B,
        sm_clock_MHz=s.sm_clock_MHz,
        throttle_reasons=s.throttle_reasons,
        samples=s.count,
        energy_mJ_start=m.energy_mJ_start,
        energy_mJ_end=m.energy_mJ_end,
        flags=flags,
        energy_power_J=m.power_energy_J,
    )


class NvmlBackend:
    """Measured telemetry from one GPU. `sample_period_s=None` runs without the sampler thread."""

    name = "nvml"
    isolated = False   # one real GPU: policies share it (and are interleaved in time)
    torch_device = "cuda"

    def __init__(
        self,
        device_index: int = 0,
        sample_period_s: float | None = 0.01,
        sync: Callable[[], Any] | None = None,
        nvml: Any = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Any] = time.sleep,
        counter_period_s: float = 0.1,
    ):
        if sample_period_s is not None and not sample_period_s > 0:
            raise ValueError(f"sample_period_s must be > 0 seconds or None (no sampler), got {sample_period_s}")
        self.device_index = device_index
        self.nvml = nvml if nvml is not None else NvmlApi(device_index)
        self.sleep = sleep
        self.sampler = None
        if sample_period_s is not None:
            self.sampler = SensorSampler(self.nvml, sample_period_s, clock=clock)
        self.meter = EnergyMeter(
            self.nvml, sync=sync, clock=clock, sampler=self.sampler, counter_period_s=counter_period_s,
        )
        if self.sampler is not None:
            self.sampler.start()
        self.last_measurement: Measurement | None = None
        self._windows = 0
        self._closed = False

    def gpu_name(self) -> str:
        return self.nvml.name()

    def info(self) -> dict:
        """What a run's summary says about this backend: the GPU and its static facts (driver,
        power limit, slowdown threshold); nothing is priced."""
        return {"gpu": self.gpu_name(), "priced_as": None, "price_batch": None,
                "device": device_info(nvml=self.nvml)}

    def run_chunk(self, compute: Callable[[], ChunkWorkload | None]) -> TelemetryWindow:
        """Measure `compute()` (the chunk's real forward pass) and carry the workload it returns."""
        if not callable(compute):
            raise ValueError("run_chunk needs compute: a zero-argument callable (the chunk's forward pass)")
        result: dict = {}
        window = self._measure("chunk", lambda: result.setdefault("workload", compute()))
        workload = result.get("workload")
        if workload is not None and not isinstance(workload, ChunkWorkload):
            raise ValueError(f"compute() must return a ChunkWorkload or None, got {type(workload).__name__}")
        window.workload = workload
        return window

    def idle(self, seconds: float) -> TelemetryWindow:
        """Measure `seconds` of idle GPU (the host sleeps; the device is synchronised first)."""
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"idle seconds must be a finite number >= 0, got {seconds!r}")
        return self._measure("idle", lambda: self.sleep(seconds))

    def _measure(self, kind: str, compute: Callable[[], Any] | None) -> TelemetryWindow:
        if self._closed:
            raise RuntimeError("NvmlBackend is closed; create a new one")
        self._windows += 1
        with self.meter.window(f"{kind}#{self._windows}") as handle:
            if compute is not None:
                compute()
        self.last_measurement = handle.measurement
        return measurement_to_window(handle.measurement)

    @contextmanager
    def step_windows(self) -> Iterator[CounterSpan]:
        """Windows of a few milliseconds (serving steps): inside the block their edges read instant
        power alone (the counter costs ~3 ms a read); the counter is read once at each end, into the
        yielded span (`nectar.telemetry.energy.step_windows`)."""
        span = CounterSpan()
        span.t_start_s, span.energy_mJ_start = self.meter.read_counter()
        with self.meter.light_edges():
            yield span
        span.t_end_s, span.energy_mJ_end = self.meter.read_counter()

    def lock_clock(self, clock_MHz: float | None) -> None:
        """Refused, always: the lent GPUs' clocks must not be changed (no NVML set function is
        called, now or ever); clock-locked policies run on the simulator only."""
        raise ValueError(CLOCK_REFUSAL)

    @contextmanager
    def cotenant(self, duty: float):
        """A co-tenant process heating this GPU while the block runs (`hw.cotenant.CoTenant`: bf16
        matmuls for `duty` of every 100 ms); always stopped on the way out."""
        with CoTenant(duty, device=f"cuda:{self.device_index}") as tenant:
            yield tenant

    def close(self) -> None:
        """Stop the sampler and shut NVML down; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.sampler is not None:
            self.sampler.stop()
        self.nvml.shutdown()

    def __enter__(self) -> "NvmlBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create(*, seed: int = 0, preset: str | None = None, faults: str | None = None,
           price_as: str | None = "auto", price_batch: int = 128, chunk_rows: int | None = None,
           heat: Any = None, **options: Any) -> NvmlBackend:
    """The NVML backend from the options every backend factory takes (`nectar.plugins.make_backend`),
    plus NvmlBackend's own keyword `options`. Measurements are not seeded; simulator-only options
    are refused with a clear error."""
    if faults:
        raise ValueError("--faults is a simulator option; it cannot be used with the NVML backend")
    if preset not in (None, "auto"):
        raise ValueError(f"a GPU preset ({preset!r}) is a simulator option; the NVML backend measures the real GPU")
    if price_as not in (None, "auto", "none"):
        raise ValueError(f"--price-as {price_as!r} is a simulator option; the NVML backend measures what runs")
    if heat is not None:
        raise ValueError("a heat schedule on the NVML backend needs a co-tenant process; use the campaign's "
                         "co-tenant option (nectar hw-run), not a backend option")
    return NvmlBackend(**options)
