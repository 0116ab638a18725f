"""Hardware telemetry backend: read-only NVML energy windows, a background sensor sampler and traces.

`import hw` works without nvidia-ml-py or a GPU: `pynvml` is imported lazily by `hw.nvml_api`
when an `NvmlApi` is created, and its absence raises `NvmlUnavailable` with a helpful message.
NVML is used read-only: nothing here sets clocks, power limits or persistence, or resets a GPU.
"""

from hw.nvml_api import NvmlUnavailable

__all__ = ["NvmlUnavailable"]
