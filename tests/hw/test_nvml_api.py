"""hw.nvml_api.NvmlApi against the real pynvml module with its C calls replaced by scripted ones.

The real module supplies the error classes and the ctypes field-value structs, so decoding and
error mapping are checked on what nvidia-ml-py actually hands back.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pynvml = pytest.importorskip("pynvml")

from hw.info import device_info  # noqa: E402
from hw.nvml_api import NvmlApi, NvmlUnavailable  # noqa: E402
from nectar.telemetry.window import TelemetryError  # noqa: E402

HW_DIR = Path(__file__).resolve().parents[2] / "hw"


def nvml_error(code):
    return pynvml.NVMLError(code)


def field_values(field_ids, table):
    """What nvmlDeviceGetFieldValues returns: a ctypes array of c_nvmlFieldValue_t."""
    values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
    for i, field_id in enumerate(field_ids):
        status, value_type, member, value = table[field_id]
        values[i].fieldId = field_id
        values[i].nvmlReturn = status
        values[i].valueType = value_type
        setattr(values[i].value, member, value)
    return values


@pytest.fixture
def scripted(monkeypatch):
    """Patch pynvml's entry points; returns the dict of call counts and the field table."""
    calls: dict[str, int] = {}
    fields = {
        pynvml.NVML_FI_DEV_POWER_INSTANT: (pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 250_500),
        pynvml.NVML_FI_DEV_MEMORY_TEMP: (pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 52),
    }
    script = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
        "nvmlDeviceGetTotalEnergyConsumption": lambda h: 2**63 + 7,
        "nvmlDeviceGetFieldValues": lambda h, ids: field_values(ids, fields),
        "nvmlDeviceGetPowerUsage": lambda h: 240_000,
        "nvmlDeviceGetTemperature": lambda h, sensor: 41,
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30),
        "nvmlDeviceGetClockInfo": lambda h, kind: 1980,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x4,
        "nvmlDeviceGetCurrentClocksThrottleReasons": lambda h: 0x8,
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlSystemGetDriverVersion": lambda: "580.159.04",
        "nvmlSystemGetNVMLVersion": lambda: "13.580.159.04",
        "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
        "nvmlDeviceGetTemperatureThreshold": lambda h, kind: 89,
    }

    def counted(name, fn):
        def call(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)
        return call

    for name, fn in script.items():
        monkeypatch.setattr(pynvml, name, counted(name, fn))
    return SimpleNamespace(calls=calls, fields=fields, monkeypatch=monkeypatch)


def test_readings_and_units(scripted):
    api = NvmlApi(0, module=pynvml)
    assert api.total_energy_mJ() == 2**63 + 7  # exact integer, no float rounding
    assert api.power_instant_W() == 250.5 and not api.power_is_average
    assert api.power_average_W() == 240.0
    assert api.gpu_temp_C() == 41.0 and api.mem_temp_C() == 52.0
    assert api.memory_B() == (3 * 2**30, 80 * 2**30)
    assert api.sm_clock_MHz() == 1980.0 and api.clock_event_reasons() == 0x4
    assert api.name() == "NVIDIA H100 80GB HBM3"
    assert api.power_limit_W() == 700.0 and api.slowdown_temp_C() == 89.0
    assert api.unsupported == set()
    api.shutdown()
    api.shutdown()
    assert scripted.calls["nvmlShutdown"] == 1
    with pytest.raises(TelemetryError, match="after shutdown"):
        api.gpu_temp_C()


def test_unsupported_fields_become_none_and_are_not_asked_again(scripted):
    not_supported = (pynvml.NVML_ERROR_NOT_SUPPORTED, 0, "uiVal", 0)
    scripted.fields[pynvml.NVML_FI_DEV_MEMORY_TEMP] = not_supported
    scripted.fields[pynvml.NVML_FI_DEV_POWER_INSTANT] = not_supported

    def no_clock(h, kind):
        raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    scripted.monkeypatch.setattr(pynvml, "nvmlDeviceGetClockInfo", no_clock)
    api = NvmlApi(0, module=pynvml)
    assert api.mem_temp_C() is None
    assert api.power_instant_W() == 240.0 and api.power_is_average  # fell back to the 1 s average
    assert api.sm_clock_MHz() is None and api.sm_clock_MHz() is None
    assert api.unsupported == {"mem_temp", "power_instant", "sm_clock"}
    before = scripted.calls["nvmlDeviceGetFieldValues"]
    api.mem_temp_C()
    assert scripted.calls["nvmlDeviceGetFieldValues"] == before


def test_old_driver_falls_back_to_throttle_reasons(scripted):
    def missing(h):
        raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    scripted.monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", missing)
    api = NvmlApi(0, module=pynvml)
    assert api.clock_event_reasons() == 0x8
    assert "clock_events" in api.unsupported


def test_real_failures_raise_telemetry_error(scripted):
    def lost(h):
        raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)

    scripted.monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", lost)
    with pytest.raises(TelemetryError, match="energy_counter failed: GPU is lost"):
        NvmlApi(0, module=pynvml).total_energy_mJ()


@pytest.mark.parametrize("code", ["NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_LIBRARY_NOT_FOUND"])
def test_no_driver_is_a_clear_error(scripted, code):
    def fail():
        raise nvml_error(getattr(pynvml, code))

    scripted.monkeypatch.setattr(pynvml, "nvmlInit", fail)
    with pytest.raises(NvmlUnavailable, match="NVIDIA driver installed.*--backend sim"):
        NvmlApi(0, module=pynvml)


def test_no_gpu_and_bad_index(scripted):
    with pytest.raises(ValueError, match="device_index 3 out of range: NVML sees 1 GPU"):
        NvmlApi(3, module=pynvml)
    with pytest.raises(ValueError, match="non-negative"):
        NvmlApi(-1, module=pynvml)
    scripted.monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    with pytest.raises(NvmlUnavailable, match="no GPU"):
        NvmlApi(0, module=pynvml)


def test_missing_nvidia_ml_py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlUnavailable, match="install nvidia-ml-py"):
        NvmlApi()


def test_this_machine_without_driver_gives_nvml_unavailable():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        with pytest.raises(NvmlUnavailable):
            NvmlApi()
        return
    pynvml.nvmlShutdown()
    pytest.skip("an NVIDIA driver is present here")


def test_import_hw_works_without_pynvml():
    code = "import sys; sys.modules['pynvml'] = None; import hw, hw.backend, hw.meta, hw.info; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HW_DIR.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_device_info(scripted):
    info = device_info(0, NvmlApi(0, module=pynvml))
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert info["driver_version"] == "580.159.04" and info["nvml_version"] == "13.580.159.04"
    assert info["memory_total_B"] == 80 * 2**30
    assert info["power_limit_W"] == 700.0 and info["slowdown_temp_C"] == 89.0
    assert "torch_version" in info and "cuda_torch_version" in info


class RecordingModule:
    """Proxy of pynvml that records every nvml* attribute the adapter touches."""

    def __init__(self, module):
        self._module = module
        self.touched: set[str] = set()

    def __getattr__(self, name):
        if name.startswith("nvml"):
            self.touched.add(name)
        return getattr(self._module, name)


def test_adapter_only_ever_reads(scripted):
    recorder = RecordingModule(pynvml)
    api = NvmlApi(0, module=recorder)
    for method in ("total_energy_mJ", "power_instant_W", "power_average_W", "gpu_temp_C", "mem_temp_C",
                   "memory_B", "sm_clock_MHz", "clock_event_reasons", "name", "driver_version",
                   "nvml_version", "power_limit_W", "slowdown_temp_C", "shutdown"):
        getattr(api, method)()
    allowed = re.compile(r"^nvml(Init|Shutdown|DeviceGet\w+|SystemGet\w+)$")
    assert recorder.touched and all(allowed.match(name) for name in recorder.touched), recorder.touched


def test_no_nvml_setter_anywhere_in_hw():
    setter = re.compile(r"nvml\w*(Set|Reset|Clear)\w*")
    offenders = [p.name for p in HW_DIR.glob("*.py") if setter.search(p.read_text())]
    assert offenders == []


def test_power_and_memory_temperature_come_from_one_query(scripted):
    api = NvmlApi(0, module=pynvml)
    before = scripted.calls.get("nvmlDeviceGetFieldValues", 0)
    assert api.power_and_mem_temp() == (250.5, 52.0)
    assert scripted.calls["nvmlDeviceGetFieldValues"] == before + 1
    scripted.fields[pynvml.NVML_FI_DEV_POWER_INSTANT] = (pynvml.NVML_ERROR_NOT_SUPPORTED, 0, "uiVal", 0)
    assert api.power_and_mem_temp() == (240.0, 52.0) and api.power_is_average  # the 1 s average
    assert api.unsupported == {"power_instant"}
    before = scripted.calls["nvmlDeviceGetFieldValues"]
    assert api.power_and_mem_temp() == (240.0, 52.0)
    assert scripted.calls["nvmlDeviceGetFieldValues"] == before + 1  # memory temperature alone now
