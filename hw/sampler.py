"""Background thread that reads the fast sensors at a fixed period and keeps the samples by time.

Instant power is read on every tick (one NVML query); temperatures, memory, SM clock and throttle
reasons only on every `slow_every`-th tick (default 10: 10 Hz at the 10 ms period), so most ticks
cost one query instead of five; windows take the last / largest / mean of the readings they hold
and every window edge reads all fields. The NVML energy counter costs ~3 ms per query, so the
sampler leaves it alone unless asked (`counter_every=N` reads it on every N-th sample). Samples are kept in time order; a window asks
for its slice with `samples_between(t0, t1)` (binary search, so the hot path stays cheap), and the
oldest samples are dropped past `max_samples`. A failing read is counted and kept in `last_error`,
never raised inside the thread.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any, Callable

from hw.sample import SensorSample, read_sample


class SensorSampler:
    """Samples `nvml` every `period_s` seconds in a daemon thread (start/stop, or a context manager)."""

    def __init__(
        self,
        nvml: Any,
        period_s: float = 0.01,
        *,
        clock: Callable[[], float] = time.perf_counter,
        counter_every: int = 0,
        slow_every: int = 10,
        max_samples: int = 200_000,
    ):
        if not period_s > 0:
            raise ValueError(f"sampler period_s must be > 0 seconds, got {period_s}")
        if counter_every < 0:
            raise ValueError(f"counter_every must be >= 0 (0 = never read the counter), got {counter_every}")
        if isinstance(slow_every, bool) or not isinstance(slow_every, int) or slow_every < 1:
            raise ValueError(f"slow_every must be an int >= 1 (1 = every field on every tick), got {slow_every!r}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.nvml = nvml
        self.period_s = float(period_s)
        self.clock = clock
        self.counter_every = counter_every
        self.slow_every = slow_every
        self.max_samples = max_samples
        self.errors = 0
        self.last_error: BaseException | None = None
        self._samples: list[SensorSample] = []
        self._times: list[float] = []
        self._taken = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ sampling
    def sample_once(self) -> SensorSample | None:
        """Take one sample now (also usable without the thread, e.g. in tests)."""
        with_counter = self.counter_every > 0 and self._taken % self.counter_every == 0
        slow_fields = self._taken % self.slow_every == 0
        self._taken += 1
        try:
            sample = read_sample(self.nvml, self.clock, with_counter=with_counter, slow_fields=slow_fields)
        except Exception as exc:  # noqa: BLE001 - a sensor failure must not kill the thread
            self.errors += 1
            self.last_error = exc
            return None
        self._append(sample)
        return sample

    def _append(self, sample: SensorSample) -> None:
        with self._lock:
            if not self._times or sample.t_s >= self._times[-1]:  # the usual case: newest last
                self._times.append(sample.t_s)
                self._samples.append(sample)
                self._prune()
                return
            position = bisect.bisect_right(self._times, sample.t_s)
            self._times.insert(position, sample.t_s)
            self._samples.insert(position, sample)
            self._prune()

    def _prune(self) -> None:
        if len(self._samples) > self.max_samples:
            drop = len(self._samples) - self.max_samples // 2
            del self._times[:drop], self._samples[:drop]

    def samples_between(self, t_start_s: float, t_end_s: float) -> list[SensorSample]:
        """Samples with t_start_s <= t <= t_end_s, in time order."""
        with self._lock:
            lo = bisect.bisect_left(self._times, t_start_s)
            hi = bisect.bisect_right(self._times, t_end_s)
            return self._samples[lo:hi]

    def __len__(self) -> int:
        return len(self._samples)

    # ------------------------------------------------------------------ thread
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "SensorSampler":
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait for it; safe when not running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"sampler thread did not stop within {timeout_s} s")
            self._thread = None

    def _loop(self) -> None:
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            self.sample_once()
            next_tick += self.period_s
            delay = next_tick - time.perf_counter()
            if delay < 0:  # fell behind (slow reads): skip the missed ticks
                next_tick = time.perf_counter()
                delay = 0.0
            self._stop.wait(delay)

    def __enter__(self) -> "SensorSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
