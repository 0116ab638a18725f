"""The one place that calls NVML: a small read-only adapter around `pynvml` (nvidia-ml-py).

Everything else in `hw/` talks to an object with this adapter's methods, so tests substitute a
scripted fake. The adapter converts units (mW → W, bytes stay bytes), turns a field the GPU does
not support (NotSupported, NoPermission, FunctionNotFound) into `None` and remembers it in
`unsupported`, and turns "no nvidia-ml-py / no driver / no GPU" into `NvmlUnavailable`.

Read-only by construction: only nvmlInit/nvmlShutdown and nvmlDeviceGet*/nvmlSystemGet* are called.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from nectar.telemetry.window import TelemetryError

# NVML field ids (nvml.h); kept here so that the numbers do not depend on the pynvml version.
FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, milliwatts
FIELD_MEMORY_TEMP = 82  # NVML_FI_DEV_MEMORY_TEMP, °C
TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
THRESHOLD_SLOWDOWN = 1  # NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
CLOCK_SM = 1  # NVML_CLOCK_SM
NVML_SUCCESS = 0
# Return codes meaning "this GPU / driver / user cannot give this reading": None plus a flag.
UNAVAILABLE_CODES = {3: "not supported", 4: "no permission", 13: "function not found"}
# nvmlValueType_t → member of the c_nvmlValue_t union.
VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here: nvidia-ml-py missing, no driver, or no GPU."""


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable(
            "cannot import pynvml: install nvidia-ml-py (pip install nvidia-ml-py) to read GPU "
            f"energy, or use the simulated backend (--backend sim). ({exc})"
        ) from exc


class NvmlApi:
    """Read-only access to one GPU through NVML. Methods return None for unsupported fields."""

    def __init__(self, device_index: int = 0, module: Any = None):
        if not isinstance(device_index, int) or device_index < 0:
            raise ValueError(f"device_index must be a non-negative int, got {device_index!r}")
        self._nvml = module if module is not None else _import_pynvml()
        self.device_index = device_index
        self.unsupported: set[str] = set()
        self.power_is_average = False  # True once the instant field fell back to the 1 s average
        self._closed = False
        self._init_nvml()
        self._handle = self._open_device(device_index)

    # ------------------------------------------------------------------ lifecycle
    def _init_nvml(self) -> None:
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML could not start ({exc}). Is an NVIDIA driver installed and a GPU visible "
                "(try `nvidia-smi`)? On a machine without a GPU use the simulated backend (--backend sim)."
            ) from exc

    def _open_device(self, device_index: int) -> Any:
        count = int(self._nvml.nvmlDeviceGetCount())
        if count == 0:
            self._nvml.nvmlShutdown()
            raise NvmlUnavailable("NVML started but reports no GPU on this machine; use --backend sim.")
        if device_index >= count:
            self._nvml.nvmlShutdown()
            raise ValueError(f"device_index {device_index} out of range: NVML sees {count} GPU(s) (0..{count - 1})")
        return self._nvml.nvmlDeviceGetHandleByIndex(device_index)

    def shutdown(self) -> None:
        """Release NVML (reference counted by the library); safe to call twice."""
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()

    # ------------------------------------------------------------------ guarded calls
    def _read(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn(handle, *args); None (and `key` in `unsupported`) if the GPU cannot give it."""
        if key in self.unsupported:
            return None
        if self._closed:
            raise TelemetryError("NVML reading after shutdown(); create a new NvmlApi")
        try:
            return fn(self._handle, *args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) in UNAVAILABLE_CODES:
                self.unsupported.add(key)
                return None
            raise TelemetryError(f"NVML read of {key} failed: {exc}") from exc

    def _field(self, key: str, field_id: int) -> float | None:
        """One value of nvmlDeviceGetFieldValues, decoded by its value type."""
        return self._fields({key: field_id})[key]

    def _fields(self, ids: dict[str, int]) -> dict[str, float | None]:
        """Several fields from ONE nvmlDeviceGetFieldValues call (fields already known to be
        unsupported are not asked for); each decoded by its value type, None if unsupported."""
        wanted = {key: fid for key, fid in ids.items() if key not in self.unsupported}
        out: dict[str, float | None] = dict.fromkeys(ids)
        if not wanted:
            return out
        values = self._read("+".join(wanted), self._nvml.nvmlDeviceGetFieldValues, list(wanted.values()))
        if values is None:  # the whole query is unsupported: so is each of its fields
            self.unsupported.update(wanted)
            return out
        for (key, field_id), value in zip(wanted.items(), values):
            out[key] = self._decode(key, field_id, value)
        return out

    def _decode(self, key: str, field_id: int, value: Any) -> float | None:
        status = int(value.nvmlReturn)
        if status in UNAVAILABLE_CODES:
            self.unsupported.add(key)
            return None
        if status != NVML_SUCCESS:
            raise TelemetryError(f"NVML field {field_id} ({key}) returned error code {status}")
        member = VALUE_MEMBERS.get(int(value.valueType))
        if member is None:
            raise TelemetryError(f"NVML field {field_id} ({key}) has unknown value type {value.valueType}")
        return float(getattr(value.value, member))

    # ------------------------------------------------------------------ readings
    def total_energy_mJ(self) -> int | None:
        """Total energy since the driver loaded, mJ, as NVML's exact uint64 (updates ~every 100 ms;
        a query costs ~3 ms)."""
        value = self._read("energy_counter", self._nvml.nvmlDeviceGetTotalEnergyConsumption)
        return None if value is None else int(value)

    def power_instant_W(self) -> float | None:
        """Instantaneous power, W; falls back to the ~1 s average (`power_is_average` set)."""
        milliwatts = self._field("power_instant", FIELD_POWER_INSTANT)
        if milliwatts is not None:
            return milliwatts / 1000.0
        self.power_is_average = True
        return self.power_average_W()

    def power_and_mem_temp(self) -> tuple[float | None, float | None]:
        """(instant power W, memory temperature °C) from one field-values query; power falls back
        to the ~1 s average like `power_instant_W`."""
        values = self._fields({"power_instant": FIELD_POWER_INSTANT, "mem_temp": FIELD_MEMORY_TEMP})
        milliwatts = values["power_instant"]
        if milliwatts is None:
            self.power_is_average = True
            return self.power_average_W(), values["mem_temp"]
        return milliwatts / 1000.0, values["mem_temp"]

    def power_average_W(self) -> float | None:
        """nvmlDeviceGetPowerUsage: on Hopper a ~1 s average, W."""
        milliwatts = self._read("power_average", self._nvml.nvmlDeviceGetPowerUsage)
        return None if milliwatts is None else milliwatts / 1000.0

    def gpu_temp_C(self) -> float | None:
        value = self._read("gpu_temp", self._nvml.nvmlDeviceGetTemperature, TEMPERATURE_GPU)
        return None if value is None else float(value)

    def mem_temp_C(self) -> float | None:
        return self._field("mem_temp", FIELD_MEMORY_TEMP)

    def memory_B(self) -> tuple[int, int] | None:
        """(used, total) device memory in bytes."""
        info = self._read("memory", self._nvml.nvmlDeviceGetMemoryInfo)
        return None if info is None else (int(info.used), int(info.total))

    def sm_clock_MHz(self) -> float | None:
        value = self._read("sm_clock", self._nvml.nvmlDeviceGetClockInfo, CLOCK_SM)
        return None if value is None else float(value)

    def clock_event_reasons(self) -> int | None:
        """Clocks-event (throttle) reason bit mask; uses the older ThrottleReasons name if needed."""
        newer = getattr(self._nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if newer is not None and "clock_events" not in self.unsupported:
            value = self._read("clock_events", newer)
            if value is not None:
                return int(value)
        value = self._read("throttle_reasons", self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        return None if value is None else int(value)

    # ------------------------------------------------------------------ static facts (for meta.json)
    def name(self) -> str:
        return _text(self._read("name", self._nvml.nvmlDeviceGetName)) or "unknown NVIDIA GPU"

    def driver_version(self) -> str | None:
        return _text(self._call_system("driver_version", self._nvml.nvmlSystemGetDriverVersion))

    def nvml_version(self) -> str | None:
        return _text(self._call_system("nvml_version", self._nvml.nvmlSystemGetNVMLVersion))

    def power_limit_W(self) -> float | None:
        """Enforced power limit, W (read only; this project never sets it)."""
        value = self._read("power_limit", self._nvml.nvmlDeviceGetEnforcedPowerLimit)
        return None if value is None else value / 1000.0

    def slowdown_temp_C(self) -> float | None:
        value = self._read("slowdown_temp", self._nvml.nvmlDeviceGetTemperatureThreshold, THRESHOLD_SLOWDOWN)
        return None if value is None else float(value)

    def _call_system(self, key: str, fn: Callable[[], Any]) -> Any:
        """Like `_read`, for nvmlSystemGet* calls that take no device handle."""
        return self._read(key, lambda _handle: fn())


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
