"""Traces of hardware runs: the core's backend-neutral CSV format plus a meta.json with device facts.

The format itself lives in `nectar.telemetry.trace` (no backend imports) so simulated runs write the same
files; this module adds what only a GPU host knows (name, driver, NVML version, power limit,
slowdown threshold, CUDA version of torch) to meta.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hw.info import device_info
from nectar.telemetry.trace import TraceRow, TraceWriter, read_meta, read_trace, run_meta, write_meta, write_trace

__all__ = [
    "TraceRow", "TraceWriter", "read_trace", "write_trace", "read_meta", "run_meta", "write_meta",
    "write_hardware_meta",
]


def write_hardware_meta(path: str | Path, nvml: Any = None, device_index: int = 0, **fields: Any) -> Path:
    """meta.json for a measured run: `run_meta` + `device_info` + fields (e.g. model, policies)."""
    return write_meta(path, **{"backend": "nvml", **device_info(device_index, nvml), **fields})
