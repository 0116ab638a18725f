"""Clock-locked policies: how their names are spelled, and which clock of a sweep is best.

- `clock:MHZ` — the reference routing (static top-2; a transformers MoE model's own top-K) with the
  backend's SM clock locked at MHZ: the static clock family of the frontier;
- `POLICY@clock:MHZ` — any other policy (static or adaptive: `nectar@clock:1300`) with the clock
  locked at MHZ; a static one stays static.

The lock goes through the backend's `lock_clock` (`nectar.telemetry.window.lock_clock`): the
simulator caps its SM clock there (its thermal and power throttles may still lower it); the NVML
backend refuses, since the lent GPUs' clocks must not be changed. Every clock figure is therefore
the simulator's. Pure string and number code: nothing imported, so the command line can use it
without torch.
"""

from __future__ import annotations

import math

CLOCK_PREFIX = "clock:"
ON_CLOCK = "@clock:"
REFERENCE_ROUTING = "static-top2"   # what `clock:MHZ` routes with on MoE-DistilGPT2 (the frontier's reference)


def parse_clock_MHz(name: str, text: str) -> float:
    """The MHZ of a clock policy name: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"policy {name!r}: clock {text!r} is not a number of MHz") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"policy {name!r}: the clock must be a positive number of MHz, got {text!r}")
    return value


def split_clock(name: str) -> tuple[str, float | None]:
    """(routing name, locked clock MHz or None): ("static-top2", 1300.0) for "clock:1300",
    ("nectar", 1300.0) for "nectar@clock:1300", (name, None) for a name without a clock."""
    if name.startswith(CLOCK_PREFIX):
        return REFERENCE_ROUTING, parse_clock_MHz(name, name.removeprefix(CLOCK_PREFIX))
    routing, sep, text = name.partition(ON_CLOCK)
    if not sep:
        return name, None
    if not routing or "@" in routing or routing.startswith(CLOCK_PREFIX):
        raise ValueError(f"policy {name!r}: spell a clock-locked policy POLICY@clock:MHZ with one plain policy "
                         "before the @ (or clock:MHZ for the reference routing)")
    return routing, parse_clock_MHz(name, text)


def clock_policy(clock_MHz: float) -> str:
    """"clock:1300" for 1300.0 (no trailing ".0")."""
    return f"{CLOCK_PREFIX}{clock_MHz:g}"


def on_clock(policy: str, clock_MHz: float) -> str:
    """"nectar@clock:1300" for ("nectar", 1300.0)."""
    return f"{policy}{ON_CLOCK}{clock_MHz:g}"


def is_clock_sweep(name: str) -> bool:
    """True for the static clock family `clock:MHZ` (the reference routing at a locked clock)."""
    return name.startswith(CLOCK_PREFIX)


def parse_clock_sweep(text: str) -> list[float]:
    """`--clock-sweep 1980,1600,1300`: distinct positive clocks in MHz, in the order given."""
    clocks = [parse_clock_MHz(f"clock:{part}", part.strip()) for part in text.split(",") if part.strip()]
    if not clocks:
        raise ValueError("--clock-sweep needs at least one clock in MHz, e.g. 1980,1600,1300")
    if len(set(clocks)) != len(clocks):
        raise ValueError(f"--clock-sweep lists a clock twice: {text!r}")
    return clocks


def best_clock(policies: list[dict], bound: float) -> dict | None:
    """The `clock:MHZ` row (a frontier report's policy row: name, saved, dppl, limits) that saves
    the most within the perplexity bound and the run's limits; None when no clock policy qualifies."""
    rows = [p for p in policies if is_clock_sweep(p["name"]) and p["saved"] is not None and p["dppl"] is not None
            and p["dppl"] <= bound and p["limits"]["holds"]]
    return max(rows, key=lambda p: p["saved"], default=None)
