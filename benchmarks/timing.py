"""Shared helpers of the benchmarks: synchronised wall-clock timing, device names, JSON output.

`seconds_per_call(fn, device)` times back-to-back calls between two device synchronisations
(so that launch overheads pipeline as they do in a real forward), with the number of calls per
measurement chosen so that one measurement lasts at least `min_s`; it returns one value per
repeat (seconds per call) after warm-up calls.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device | str, warmup: int = 2, repeats: int = 5,
                     min_s: float = 0.02) -> list[float]:
    """Seconds per call of fn(), one value per repeat (each over >= min_s of back-to-back calls)."""
    for _ in range(max(warmup, 1)):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, math.ceil(min_s / once))
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device | str) -> dict:
    """What every JSON row carries about where it was measured."""
    return {"device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if torch.device(device).type == "cuda" else None}


def write_json(path: str | os.PathLike | None, payload: Any) -> None:
    """Write payload as JSON (atomically: a partial run leaves the last complete file)."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    tmp.replace(path)


def _plain(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def check_device_and_sizes(parser, args, sizes: tuple[str, ...]) -> None:
    """parser.error (a clear one-line exit) when --device asks for CUDA that is absent, or one of
    the integer options `sizes` (attribute names) is below 1."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    for name in sizes:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
