"""Faults on request: what can go wrong with NVML readings (and with the GPU's surroundings).

A `FaultConfig` is parsed from a CLI-style spec, e.g. `FaultConfig.parse("stale:0.1,nan:0.05,hot_ambient:45")`
(option `--faults`). Every fault, what it does, and its allowed values:

  drop:p          each sensor query fails with probability p (like NVML_ERROR_UNKNOWN): the read
                  raises `SensorReadError`; the window reader then goes without that value.
  stale:p         each energy-counter update is skipped with probability p (the counter keeps its
                  old value), and each power/temperature query returns the previous answer with
                  probability p.
  nan:p           each query (counter, power, temperature) returns NaN with probability p.
  spike:p         each instant-power query is multiplied by `spike_scale` with probability p.
  spike_scale:x   size of a spike (default 3, 1 < x ≤ 100).
  noise:sigma     Gaussian noise with std sigma W on every power reading (instant and 1 s average).
  reset:p         at each counter update the energy counter restarts from 0 with probability p
                  (driver reload, GPU reset).
  wrap:M          the energy counter is reported modulo M mJ (an integer ≥ 1000): it wraps. A
                  reader can repair a wrap only when a window's energy stays below M.
  hot_ambient:T   the GPU's ambient (inlet) temperature is T °C: a physical fault, the GPU runs hotter.
  throttle:a-b    a forced hardware slowdown (power brake) from a to b seconds of simulated time:
                  the clock drops to the preset's throttled clock and kernels slow down.

Probabilities lie in [0, 1). Randomness comes from a numpy Generator seeded by the backend, so a
run with faults is as reproducible as one without.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

def _probability(p: float) -> bool:
    return 0.0 <= p < 1.0


_RULES = {  # field: (check, what is allowed)
    **{name: (_probability, "is a probability and must lie in [0, 1)") for name in ("drop", "stale", "nan", "spike", "reset")},
    "spike_scale": (lambda x: 1.0 < x <= 100.0, "must lie in (1, 100]"),
    "noise": (lambda x: 0.0 <= x <= 1000.0, "is a std in W and must lie in [0, 1000]"),
    "wrap": (lambda m: isinstance(m, int) and (m == 0 or m >= 1000),
             "is a counter modulus in mJ: an integer >= 1000 (or 0 for none)"),
    "hot_ambient": (lambda t: -40.0 <= t <= 85.0, "must be an ambient temperature in [-40, 85] °C"),
}


class SensorReadError(RuntimeError):
    """A simulated sensor query failed (the fault `drop`)."""


@dataclass(frozen=True)
class FaultConfig:
    drop: float = 0.0
    stale: float = 0.0
    nan: float = 0.0
    spike: float = 0.0
    spike_scale: float = 3.0
    noise: float = 0.0
    reset: float = 0.0
    wrap: int = 0                               # 0: the counter never wraps
    hot_ambient: float | None = None
    throttle: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name, (ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if value is None and name == "hot_ambient":
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value)):
                raise ValueError(f"fault {name!r} {allowed}, got {value!r}")
        if self.throttle is not None:
            start, end = self.throttle
            if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start < end):
                raise ValueError(f"fault 'throttle' needs 0 <= start < end seconds, got {self.throttle!r}")

    @staticmethod
    def parse(spec: str | None) -> "FaultConfig":
        """Parse "name:value,name:value" (empty, None or "none" means no faults)."""
        if spec is None or spec.strip().lower() in ("", "none"):
            return FaultConfig()
        known = {f.name for f in fields(FaultConfig)}
        values: dict = {}
        for item in spec.split(","):
            name, sep, raw = item.strip().partition(":")
            if name not in known:
                raise ValueError(f"unknown fault {name!r} in {spec!r}; known faults: {sorted(known)}")
            if not sep or not raw.strip():
                raise ValueError(f"fault {name!r} needs a value, e.g. '{name}:{_EXAMPLES[name]}'")
            if name in values:
                raise ValueError(f"fault {name!r} is given twice in {spec!r}")
            values[name] = _parse_value(name, raw.strip())
        return FaultConfig(**values)

    def to_spec(self) -> str:
        """The inverse of `parse` (only the faults that are switched on)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            parts.append(f"{f.name}:{value[0]:g}-{value[1]:g}" if f.name == "throttle" else f"{f.name}:{value:g}")
        return ",".join(parts)

    @property
    def active(self) -> bool:
        return self != FaultConfig()


_EXAMPLES = {"drop": 0.05, "stale": 0.1, "nan": 0.05, "spike": 0.01, "spike_scale": 3, "noise": 5,
             "reset": 0.01, "wrap": 1000000, "hot_ambient": 45, "throttle": "5-15"}


def _parse_value(name: str, raw: str):
    try:
        if name == "throttle":
            start, sep, end = raw.partition("-")
            if not sep:
                raise ValueError
            return float(start), float(end)
        if name == "wrap":
            return int(float(raw)) if float(raw).is_integer() else float(raw)
        return float(raw)
    except ValueError:
        raise ValueError(f"fault {name!r} has a bad value {raw!r}; example: '{name}:{_EXAMPLES[name]}'") from None


class FaultInjector:
    """Applies a FaultConfig to individual readings, drawing from its own seeded Generator."""

    def __init__(self, config: FaultConfig, rng: np.random.Generator):
        self.config = config
        self.rng = rng

    def _hit(self, probability: float) -> bool:
        return probability > 0.0 and self.rng.random() < probability

    def _read(self, value: float, previous: float | None) -> tuple[float, bool]:
        """(answer, fresh): drop raises, NaN replaces, stale repeats the previous answer."""
        if self._hit(self.config.drop):
            raise SensorReadError("simulated NVML query failure (fault 'drop')")
        if self._hit(self.config.nan):
            return math.nan, True
        if previous is not None and self._hit(self.config.stale):
            return previous, False
        return value, True

    def read(self, value: float, previous: float | None) -> float:
        """A query's answer after drop / NaN / stale faults (raises SensorReadError when dropped)."""
        return self._read(value, previous)[0]

    def power(self, value_W: float, previous_W: float | None, instant: bool) -> float:
        """A power query's answer: read faults, then spikes (instant power only) and noise."""
        value_W, fresh = self._read(value_W, previous_W)
        if not fresh:
            return value_W
        if instant and self._hit(self.config.spike):
            value_W *= self.config.spike_scale
        if self.config.noise > 0.0:
            value_W += self.config.noise * float(self.rng.standard_normal())
        return value_W

    def counter_update(self) -> str:
        """What the energy counter does at one update tick: "reset", "stale" or "update"."""
        if self._hit(self.config.reset):
            return "reset"
        if self._hit(self.config.stale):
            return "stale"
        return "update"

    def forced_throttle(self, t_s: float) -> bool:
        """True while the fault 'throttle' holds the clock down."""
        window = self.config.throttle
        return window is not None and window[0] <= t_s < window[1]
