"""A co-tenant that heats the GPU: a second process doing bf16 matrix multiplications on the same
device with a duty cycle (the thermal workload's heat source on real hardware).

`CoTenant(duty)` starts `python -m hw.cotenant` as a child process; every `period_s` the child
multiplies square matrices for `duty` × `period_s` seconds and sleeps for the rest. It shares the
GPU with the experiment (its power and its heat are the GPU's, as a neighbour's job would be), so
the NVML windows of whatever runs beside it include its share of the energy. The child exits when
stopped, when its parent disappears, or after `max_s` seconds (a guard against orphans). Nothing
of the GPU's settings is touched.

    python -m hw.cotenant --duty 0.3 --device cuda:0      # the child, run by CoTenant
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]   # the repository root: the child imports hw from here


def check_duty(duty: float) -> float:
    if not (isinstance(duty, (int, float)) and 0.0 < duty <= 1.0):
        raise ValueError(f"co-tenant duty must be in (0, 1] (share of each period spent multiplying), got {duty!r}")
    return float(duty)


class CoTenant:
    """The co-tenant process; a context manager that starts it and always stops it."""

    def __init__(self, duty: float, device: str = "cuda:0", period_s: float = 0.1, size: int = 8192,
                 max_s: float = 1800.0):
        self.duty = check_duty(duty)
        if not period_s > 0 or size < 1 or not max_s > 0:
            raise ValueError("period_s and max_s must be > 0 and size >= 1")
        self.args = ["--duty", str(self.duty), "--device", device, "--period-s", str(period_s),
                     "--size", str(size), "--max-s", str(max_s), "--parent", str(os.getpid())]
        self.process: subprocess.Popen | None = None

    def start(self) -> "CoTenant":
        if self.process is not None:
            raise RuntimeError("the co-tenant is already running")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "hw.cotenant", *self.args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop the child (SIGTERM, then SIGKILL); returns its exit code (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code, self.process = self.process.returncode, None
        return code

    def __enter__(self) -> "CoTenant":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------- child

def run_child(duty: float, device: str, period_s: float, size: int, max_s: float, parent: int | None) -> int:
    """Multiply for duty × period, sleep for the rest, until stopped, orphaned or out of time."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))    # before the slow import
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)          # [size, size]
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    started = time.monotonic()
    while not stop["now"] and time.monotonic() - started < max_s and (parent is None or os.getppid() == parent):
        period_start = time.monotonic()
        while time.monotonic() - period_start < duty * period_s and not stop["now"]:
            a = (a @ b).clamp_(-1, 1)
            sync()
        time.sleep(max(0.0, period_s - (time.monotonic() - period_start)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hw.cotenant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duty", type=float, required=True, help="share of each period spent multiplying, (0, 1]")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--period-s", type=float, default=0.1)
    p.add_argument("--size", type=int, default=8192, help="side of the square matrices")
    p.add_argument("--max-s", type=float, default=1800.0, help="exit after this many seconds in any case")
    p.add_argument("--parent", type=int, default=None, help="exit when this process is no longer the parent")
    args = p.parse_args(argv)
    try:
        check_duty(args.duty)
    except ValueError as exc:
        print(f"hw.cotenant: error: {exc}", file=sys.stderr)
        return 2
    return run_child(args.duty, args.device, args.period_s, args.size, args.max_s, args.parent)


if __name__ == "__main__":
    raise SystemExit(main())
