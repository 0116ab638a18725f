"""`SimBackend`: the simulator behind `nectar.telemetry.window.TelemetryBackend`.

`run_chunk(compute)` calls `compute()` (the core's real forward pass of the chunk, which returns
its workload), prices that workload (roofline per kernel; with `price_as`, rescaled to a larger
model's shape first, see `sim.price_as`; with `cost_table`, by a run's measured per-expert costs
instead, see `sim.cost_pricing`), runs it on the simpy GPU (power, leakage, RC thermal
model, slowdown, power limit) and returns the telemetry window an NVML reader would have
measured: counter differences at the edges, instant-power samples, integer temperatures. The controller sees only those sensor values; the noise-free truth
of the same window is kept beside it in `last_truth` (and, with `record_trace=True`, every
constant-power segment in `trace`) for tests and calibration.

Deterministic: every random draw comes from numpy Generators spawned from `seed`; the simulated
clock is simpy's, and no wall-clock value enters any result.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import simpy

from nectar.control.schedule import Schedule
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload, chained
from sim.faults import FaultConfig, FaultInjector
from sim.gpu import GPUState, SimGPU, TraceSegment
from sim.pricing import ChunkPricer, memory_footprint_B
from sim.power import PowerModel
from sim.presets import GPUPreset, load_preset
from sim.price_as import PriceAs
from sim.reader import WindowReader
from sim.sensor import NvmlLikeSensor
from sim.thermal import ThermalModel, steady_temperature

if TYPE_CHECKING:  # pragma: no cover
    from nectar.control.cost_table import CostTable


@dataclass(frozen=True)
class WindowTruth:
    """What really happened during a window (never shown to the controller)."""

    t_start_s: float
    t_end_s: float
    energy_J: float
    mean_power_W: float
    peak_power_W: float
    temp_end_C: float
    clock_end_MHz: float
    throttled_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _faults(faults: FaultConfig | str | None) -> FaultConfig:
    if faults is None or isinstance(faults, str):
        return FaultConfig.parse(faults)
    if isinstance(faults, FaultConfig):
        return faults
    raise ValueError("faults must be a FaultConfig, a spec string like 'stale:0.1,nan:0.05' or None, "
                     f"got {type(faults).__name__}")


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


COTENANT_HEAT_C = 15.0   # extra ambient °C of a co-tenant at full duty (the simulator's heat source)


class SimBackend:
    """Simulated GPU telemetry. `preset`: a shipped name, a JSON path or a GPUPreset.

    `ambient`: a schedule of extra ambient temperature (°C over the base, by simulated time), the
    simulator's heat source for thermal workloads (a co-tenant, a datacentre step);
    `isolated`: every policy may get its own simulated GPU in the same initial state;
    `torch_device`: the model's forward runs on the CPU (only the telemetry is simulated);
    `cost_table`: price chunks by a run's measured per-expert cost table (a CostTable or its JSON
    path; `sim.cost_pricing`), measured at `cost_table_temp_C` (default: the preset's leakage
    reference), instead of the roofline."""

    name = "sim"
    isolated = True
    torch_device = "cpu"

    def __init__(self, preset: str | Path | GPUPreset = "h100_sxm", seed: int = 0,
                 faults: FaultConfig | str | None = None, ambient_C: float | None = None,
                 power_limit_W: float | None = None, record_trace: bool = False,
                 price_as: str | None = None, price_batch: int = 128, price_chunk_rows: int | None = None,
                 ambient: Schedule | None = None, cost_table: CostTable | str | Path | None = None,
                 cost_table_temp_C: float | None = None):
        self.preset = load_preset(preset)
        self.pricing = PriceAs.make(price_as, price_batch, price_chunk_rows)
        if power_limit_W is not None:
            self.preset = self.preset.replace(power_limit_W=float(power_limit_W))
        if cost_table is not None and self.pricing.target is not None:
            raise ValueError("a cost table prices the model as it ran: use price_as none (--price-as none) with it")
        self.faults = _faults(faults)
        base_ambient = self._ambient(ambient_C)
        sensor_seq, fault_seq = np.random.SeedSequence(_seed(seed)).spawn(2)
        self.env = simpy.Environment()
        self.power = PowerModel(self.preset)
        self.thermal = ThermalModel(self.preset.thermal_resistance_C_per_W, self.preset.thermal_capacitance_J_per_C,
                                    base_ambient)
        injector = FaultInjector(self.faults, np.random.default_rng(fault_seq))
        self.gpu = SimGPU(self.env, self.preset, self.power, self.thermal, injector.forced_throttle,
                          self._initial_temp(), record_trace, heat=None if ambient is None else ambient.at)
        self.sensor = NvmlLikeSensor(self.env, self.gpu, self.preset, injector, np.random.default_rng(sensor_seq))
        self.reader = WindowReader(self.env, self.sensor, self.preset,
                                   counter_modulus_mJ=float(self.faults.wrap or 2**64))
        self.cost_table, self.pricer = None, ChunkPricer(self.preset)
        if cost_table is not None:
            from sim.cost_pricing import CostTablePricer, load_table  # torch (the table's predict): only when asked

            self.cost_table = load_table(cost_table)
            self.pricer = CostTablePricer(self.cost_table, self.preset, cost_table_temp_C)
        self.last_truth: WindowTruth | None = None
        self._mem_used_B = self.preset.memory_baseline_B
        self._closed = False

    def _ambient(self, ambient_C: float | None) -> float:
        """Ambient °C: the fault hot_ambient wins over the argument, which wins over the preset."""
        if ambient_C is not None and not (isinstance(ambient_C, (int, float)) and math.isfinite(ambient_C)):
            raise ValueError(f"ambient_C must be a finite temperature in °C, got {ambient_C!r}")
        value = self.preset.ambient_C if ambient_C is None else float(ambient_C)
        if self.faults.hot_ambient is not None:
            value = float(self.faults.hot_ambient)
        if not value < self.preset.slowdown_C:
            raise ValueError(f"ambient {value} °C is at or above the slowdown threshold {self.preset.slowdown_C} °C")
        return value

    def _initial_temp(self) -> float:
        if self.preset.initial_temp_C is not None:
            return self.preset.initial_temp_C
        p = self.preset
        return steady_temperature(p.idle_power_W, p.leakage_W_per_C, p.leakage_ref_C, self.thermal)

    # ------------------------------------------------------------ TelemetryBackend
    def gpu_name(self) -> str:
        return self.preset.gpu_name

    def info(self) -> dict:
        """What a run's summary says about this backend: the GPU and how workloads are priced."""
        info = {"gpu": self.gpu_name(), **self.pricing.info()}
        if self.cost_table is not None:  # the roofline's runs keep their summary as it was
            info["priced_by"] = "cost-table"
        return info

    def run_chunk(self, compute: Callable[[], ChunkWorkload]) -> TelemetryWindow:
        """Run `compute()` (the chunk's forward pass), then price the workload it returns and run
        it on the simulated GPU (each of its `forwards()` in turn: a serving step's ride-along check
        is a forward of its own). Simulated time starts after the real computation."""
        self._check_open()
        if not callable(compute):
            raise ValueError("run_chunk needs compute: a zero-argument callable returning the chunk's ChunkWorkload")
        workload = compute()
        if not isinstance(workload, ChunkWorkload):
            raise ValueError(f"compute() must return a ChunkWorkload, got {type(workload).__name__}")
        forwards = [self.pricing.apply(part) for part in workload.forwards()]   # a ride-along check first
        priced = [self.pricer.price(part) for part in forwards]  # validates the workloads first
        self._mem_used_B = max(memory_footprint_B(part, self.preset) for part in forwards)
        window = self._measure(self._back_to_back(priced))
        window.workload = chained(forwards)
        return window

    def _back_to_back(self, priced: list):
        """simpy process: the window's forwards one after the other."""
        for chunk in priced:
            yield from self.gpu.run_chunk(chunk)

    def idle(self, seconds: float) -> TelemetryWindow:
        """Let the GPU idle for `seconds` of simulated time and return that window."""
        self._check_open()
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"idle seconds must be a finite number >= 0, got {seconds!r}")
        return self._measure(self.gpu.run_idle(float(seconds)))

    def lock_clock(self, clock_MHz: float | None) -> None:
        """Lock the simulated SM clock at `clock_MHz` (None: release): the optional capability behind
        the clock-locked policies (`nectar.telemetry.window.lock_clock`). The thermal slowdown and
        the power limit can still lower it; power follows the preset's voltage–frequency curve
        (`sim.power`). A simulated figure: no real GPU's clock is touched."""
        self._check_open()
        if clock_MHz is not None and (isinstance(clock_MHz, bool) or not isinstance(clock_MHz, (int, float))
                                      or not math.isfinite(clock_MHz)):
            raise ValueError(f"clock_MHz must be a finite number of MHz or None, got {clock_MHz!r}")
        self.gpu.lock_clock(None if clock_MHz is None else float(clock_MHz))

    @contextmanager
    def cotenant(self, duty: float):
        """The simulator's stand-in for a co-tenant process (`hw.cotenant` on a GPU): while the block
        runs, the GPU's ambient rises by duty × COTENANT_HEAT_C (its heat only: a real co-tenant's
        power is not simulated)."""
        if not 0.0 < duty <= 1.0:
            raise ValueError(f"co-tenant duty must be in (0, 1], got {duty!r}")
        before = self.gpu.heat
        self.gpu.heat = lambda t: (0.0 if before is None else before(t)) + duty * COTENANT_HEAT_C
        try:
            yield self
        finally:
            self.gpu.heat = before

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "SimBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ inspection
    @property
    def state(self) -> GPUState:
        """True GPU state now (temperature, clock, power, energy, simulated time)."""
        return self.gpu.state

    @property
    def trace(self) -> list[TraceSegment]:
        if self.gpu.trace is None:
            raise ValueError("no trace was recorded; create the backend with record_trace=True")
        return self.gpu.trace

    # ------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SimBackend is closed; create a new one")

    def _measure(self, process) -> TelemetryWindow:
        before = self.gpu.state
        self.gpu.reset_peak()
        self.reader.begin()
        self.env.run(until=self.env.process(process))
        window = self.reader.end(self._mem_used_B)
        after = self.gpu.state
        duration = after.time_s - before.time_s
        energy = after.energy_J - before.energy_J
        self.last_truth = WindowTruth(
            before.time_s, after.time_s, energy, energy / duration if duration > 0 else math.nan,
            self.gpu.peak_power_W, after.temperature_C, after.clock_MHz, after.throttled_s - before.throttled_s)
        return window


def create(*, seed: int = 0, preset: str | Path | GPUPreset | None = None, faults: str | None = None,
           price_as: str | None = "auto", price_batch: int = 128, chunk_rows: int | None = None,
           heat: Schedule | None = None, **options: Any) -> SimBackend:
    """The simulator from the options every backend factory takes (`nectar.plugins.make_backend`),
    plus SimBackend's own keyword `options`. price_as "auto" prices at DistilGPT2's shape, "none"
    or None as the workload ran; with a `cost_table` option "auto" means as it ran (the table
    measured the model that runs)."""
    if options.get("cost_table") is not None and price_as == "auto":
        price_as = "none"
    target = {"auto": "distilgpt2", "none": None}.get(price_as, price_as) if price_as is not None else None
    return SimBackend(preset=preset or "h100_sxm", seed=seed, faults=faults, price_as=target,
                      price_batch=price_batch, price_chunk_rows=chunk_rows, ambient=heat, **options)
