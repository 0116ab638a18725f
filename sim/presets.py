"""GPU presets: every free parameter of the simulator, stored as data in `sim/presets/<name>.json`.

A preset is a flat dataclass so that calibration (analysis/) can change any field with
`preset.replace(field=value)` and re-run the simulator from the new object. Loading and saving
validate every field and fail with a ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class GPUPreset:
    """Parameters of one GPU model. Units are in the names; clocks are SM clocks."""

    name: str
    gpu_name: str                      # what nvmlDeviceGetName would return
    # Roofline: kernel time = max(flops / (peak·eff·clock), bytes / (BW·eff)) + launches·overhead
    peak_tflops: float                 # dense bf16 tensor-core peak at max_clock_MHz
    mem_bandwidth_GBps: float          # HBM bandwidth, GB/s (1e9 bytes)
    gemm_efficiency: float             # fraction of peak reached by matrix multiplications
    attention_efficiency: float        # fraction of peak reached by fused attention
    bandwidth_efficiency: float        # fraction of HBM bandwidth reached by any kernel
    launch_overhead_s: float           # per kernel launch (host + scheduling), not clock-scaled
    launches_per_expert: int           # kernels per computing expert in a naive per-expert loop
    launches_per_light_expert: int     # kernels per copy/constant expert (no matmul)
    # Clocks
    max_clock_MHz: float
    min_clock_MHz: float               # lowest clock the power limiter may choose
    throttled_clock_MHz: float         # clock while above the slowdown temperature
    # Voltage–frequency curve (sim/power.py): V/V_max = the floor up to the knee, then linear to 1
    voltage_floor_fraction: float      # SM voltage at and below the knee ÷ the voltage at max_clock_MHz
    voltage_knee_MHz: float            # highest clock that still runs at the floor voltage
    # Power: idle + dynamic(utilisation, clock) + leakage(T)
    idle_power_W: float                # at leakage_ref_C, GPU awake, no kernel running
    compute_power_W: float             # extra power with the SMs fully busy at max clock
    memory_power_W: float              # extra power with HBM fully busy (at max_clock_MHz)
    memory_power_sm_fraction: float    # share of memory_power_W drawn on the SM clock (L2, load/store, clock tree)
    leakage_W_per_C: float             # static power rise per °C above leakage_ref_C
    leakage_ref_C: float
    power_limit_W: float
    # Lumped RC thermal model: C·dT/dt = P − (T − T_amb)/R
    thermal_resistance_C_per_W: float
    thermal_capacitance_J_per_C: float
    ambient_C: float
    initial_temp_C: float | None       # None: start at the idle steady state
    slowdown_C: float                  # hardware slowdown threshold
    slowdown_hysteresis_C: float       # clocks recover below slowdown_C − hysteresis
    mem_temp_offset_C: float           # HBM temperature = GPU temperature + offset
    # Memory
    memory_total_B: int
    memory_baseline_B: int             # CUDA context and allocator reserve
    # Sensor (NVML habits)
    energy_counter_period_s: float     # total-energy counter update period
    power_average_window_s: float      # nvmlDeviceGetPowerUsage averaging window
    instant_sample_period_s: float     # the reader's background instant-power sampler period
    temperature_period_s: float        # temperature sensor update period
    sensor_noise_W: float              # std of the instant power reading's own noise
    source: str = ""                   # where the numbers come from (data sheet, measurements)
    # A captured decode step (phase "decode": one CUDA graph, grouped experts; all three or none —
    # None prices a decode step like any chunk, every kernel launched from the host). In it every
    # kernel reads at decode_bandwidth_efficiency, launches cost nothing, and each block adds
    # decode_block_latency_s + rows · decode_row_latency_s (not clock-scaled): the time of its many
    # small kernels that bytes do not explain (analysis/reconcile/decode_steps.py fits them).
    decode_bandwidth_efficiency: float | None = None  # fraction of HBM bandwidth a decode step's kernels reach
    decode_block_latency_s: float | None = None       # fixed time per block of a captured decode step
    decode_row_latency_s: float | None = None         # extra time per decode row (request) per block

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes) -> "GPUPreset":
        """A validated copy with some fields changed (calibration, CLI overrides)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; known: {sorted(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def captured_decode(self) -> bool:
        """Whether a decode step is priced as a captured one (the decode_* fields are set)."""
        return self.decode_block_latency_s is not None

    @staticmethod
    def from_dict(data: dict) -> "GPUPreset":
        if not isinstance(data, dict):
            raise ValueError(f"a preset must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(GPUPreset)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preset field(s) {unknown}; known: {sorted(known)}")
        required = {f.name for f in fields(GPUPreset) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"preset is missing field(s) {missing}")
        return GPUPreset(**data)


_POSITIVE = (
    "peak_tflops", "mem_bandwidth_GBps", "max_clock_MHz", "min_clock_MHz", "throttled_clock_MHz",
    "voltage_knee_MHz", "idle_power_W", "power_limit_W", "thermal_resistance_C_per_W",
    "thermal_capacitance_J_per_C", "energy_counter_period_s", "power_average_window_s",
    "instant_sample_period_s", "temperature_period_s", "memory_total_B",
)
_NON_NEGATIVE = (
    "launch_overhead_s", "launches_per_expert", "launches_per_light_expert", "compute_power_W",
    "memory_power_W", "memory_power_sm_fraction", "leakage_W_per_C", "slowdown_hysteresis_C", "memory_baseline_B",
    "sensor_noise_W",
)
_FRACTIONS = ("gemm_efficiency", "attention_efficiency", "bandwidth_efficiency", "voltage_floor_fraction")
_INTEGERS = ("launches_per_expert", "launches_per_light_expert", "memory_total_B", "memory_baseline_B")
_DECODE = ("decode_bandwidth_efficiency", "decode_block_latency_s", "decode_row_latency_s")  # all or none
_OPTIONAL = ("initial_temp_C", *_DECODE)


def _fail(preset: GPUPreset, field_name: str, why: str) -> None:
    raise ValueError(f"preset {preset.name!r}: {field_name}={getattr(preset, field_name)!r} {why}")


def _check_numbers(p: GPUPreset) -> None:
    for f in fields(p):
        value = getattr(p, f.name)
        if f.name in ("name", "gpu_name", "source"):
            if not isinstance(value, str):
                _fail(p, f.name, "must be a string")
            continue
        if value is None and f.name in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(p, f.name, "must be a finite number")
    for name in _INTEGERS:
        if not isinstance(getattr(p, name), int):
            _fail(p, name, "must be an integer")
    for name in _POSITIVE:
        if not getattr(p, name) > 0:
            _fail(p, name, "must be > 0")
    for name in _NON_NEGATIVE:
        if not getattr(p, name) >= 0:
            _fail(p, name, "must be >= 0")
    for name in _FRACTIONS:
        if not 0 < getattr(p, name) <= 1:
            _fail(p, name, "must be in (0, 1]")
    _check_decode(p)


def _check_decode(p: GPUPreset) -> None:
    """The captured decode step's three fields: all None, or a fraction and two times >= 0."""
    given = [name for name in _DECODE if getattr(p, name) is not None]
    if given and len(given) < len(_DECODE):
        _fail(p, given[0], f"comes with {[n for n in _DECODE if n not in given]} (all three or none)")
    if given and not 0 < p.decode_bandwidth_efficiency <= 1:
        _fail(p, "decode_bandwidth_efficiency", "must be in (0, 1]")
    for name in ("decode_block_latency_s", "decode_row_latency_s") if given else ():
        if not getattr(p, name) >= 0:
            _fail(p, name, "must be >= 0")


def _check_relations(p: GPUPreset) -> None:
    if not p.min_clock_MHz <= p.throttled_clock_MHz <= p.max_clock_MHz:
        _fail(p, "throttled_clock_MHz", f"must lie in [min_clock_MHz={p.min_clock_MHz}, max_clock_MHz={p.max_clock_MHz}]")
    if not p.memory_power_sm_fraction <= 1:
        _fail(p, "memory_power_sm_fraction", "must be in [0, 1]")
    if not p.min_clock_MHz <= p.voltage_knee_MHz < p.max_clock_MHz:
        _fail(p, "voltage_knee_MHz", f"must lie in [min_clock_MHz={p.min_clock_MHz}, max_clock_MHz={p.max_clock_MHz})")
    if not p.idle_power_W < p.power_limit_W:
        _fail(p, "power_limit_W", f"must exceed idle_power_W={p.idle_power_W}")
    if not p.leakage_W_per_C * p.thermal_resistance_C_per_W < 1:
        _fail(p, "leakage_W_per_C", f"times thermal_resistance_C_per_W={p.thermal_resistance_C_per_W} must be < 1 "
              "(otherwise leakage heats faster than the cooler removes heat: thermal runaway)")
    if not p.idle_power_W - p.leakage_W_per_C * (p.leakage_ref_C - p.ambient_C) > 0:
        _fail(p, "leakage_W_per_C", "makes idle power negative at the ambient temperature")
    if not p.slowdown_C > p.ambient_C:
        _fail(p, "slowdown_C", f"must exceed ambient_C={p.ambient_C}")
    if not p.memory_baseline_B < p.memory_total_B:
        _fail(p, "memory_baseline_B", f"must be below memory_total_B={p.memory_total_B}")
    if not p.power_average_window_s >= p.energy_counter_period_s:
        _fail(p, "power_average_window_s", f"must be >= energy_counter_period_s={p.energy_counter_period_s}")


def validate(preset: GPUPreset) -> None:
    """Raise ValueError on the first field that is missing, mistyped, out of range or inconsistent."""
    _check_numbers(preset)
    _check_relations(preset)


def list_presets() -> list[str]:
    """Names of the presets shipped in sim/presets/."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def _resolve_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.exists():
        if not candidate.is_file():
            raise ValueError(f"preset file {str(candidate)!r} does not exist")
        return candidate
    shipped = PRESET_DIR / f"{name_or_path}.json"
    if not shipped.is_file():
        raise ValueError(f"unknown GPU preset {str(name_or_path)!r}; shipped presets: {list_presets()} "
                         "(or pass a path to a .json preset file)")
    return shipped


def load_preset(name_or_path: str | Path | GPUPreset) -> GPUPreset:
    """A shipped preset by name ("h100_sxm"), a preset JSON file by path, or a GPUPreset as is."""
    if isinstance(name_or_path, GPUPreset):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise ValueError(f"preset must be a name, a path or a GPUPreset, got {type(name_or_path).__name__}")
    path = _resolve_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"preset file {str(path)!r} is not valid JSON: {exc}") from exc
    return GPUPreset.from_dict(data)


def save_preset(preset: GPUPreset, path: str | Path) -> Path:
    """Write `preset` as JSON (sorted keys, one field a line); returns the path written."""
    if not isinstance(preset, GPUPreset):
        raise ValueError(f"save_preset needs a GPUPreset, got {type(preset).__name__}")
    validate(preset)
    path = Path(path)
    path.write_text(json.dumps(preset.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
