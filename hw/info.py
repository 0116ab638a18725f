"""Static facts about the GPU and software stack, read once for a trace's meta.json (read-only)."""

from __future__ import annotations

from typing import Any

from hw.nvml_api import NvmlApi


def _torch_versions() -> dict[str, str | None]:
    try:
        import torch
    except ImportError:
        return {"torch_version": None, "cuda_torch_version": None}
    return {"torch_version": torch.__version__, "cuda_torch_version": torch.version.cuda}


def device_info(device_index: int = 0, nvml: Any = None) -> dict[str, Any]:
    """GPU name, driver/NVML/CUDA-torch versions, memory total, power limit and slowdown threshold.

    Pass an open adapter as `nvml` to reuse it; otherwise one is opened and shut down here
    (raises `hw.nvml_api.NvmlUnavailable` without a GPU or driver). Unsupported values are None.
    """
    api = nvml if nvml is not None else NvmlApi(device_index)
    try:
        memory = api.memory_B()
        info = {
            "device_index": getattr(api, "device_index", device_index),
            "gpu_name": api.name(),
            "driver_version": api.driver_version(),
            "nvml_version": api.nvml_version(),
            **_torch_versions(),
            "memory_total_B": None if memory is None else memory[1],
            "power_limit_W": api.power_limit_W(),
            "slowdown_temp_C": api.slowdown_temp_C(),
        }
    finally:
        if nvml is None:
            api.shutdown()
    return info
