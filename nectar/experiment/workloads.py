"""The frontier's workloads: streams and operating conditions where adaptation may or may not matter.

- `stationary`: the held-out stream, cut into chunks in order (a controller can at best find the
  best fixed policy; margin ≈ 0 is the goal);
- `domain-shift`: chunks that switch between corpus domains of different difficulty on a schedule
  (blocks of `block_chunks` chunks per domain, cycling through the domains);
- `thermal`: the stationary stream under a temperature cap while a heat source (a co-tenant, an
  ambient step) warms the GPU for part of the run, so that the cap binds only some of the time;
- `power-schedule`: the stationary stream under a power budget that changes over time, as a
  datacentre cap would.
A workload carries its chunks (with each chunk's domain) and its conditions; the frontier runs
every policy on the same chunks under the same conditions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nectar.control.schedule import Schedule

WORKLOADS = ("stationary", "domain-shift", "thermal", "power-schedule")


@dataclass
class Workload:
    name: str
    chunks: list[torch.Tensor]                       # [rows, seq_len] each, in stream order
    domains: list[str] = field(default_factory=list)  # one label per chunk
    heat: Schedule | None = None                     # heat source: extra ambient °C (simulator) or a co-tenant duty (hw-run)
    temp_cap_C: float | None = None
    power_budget: Schedule | None = None

    def describe(self) -> dict:
        return {"name": self.name, "chunks": len(self.chunks), "domains": sorted(set(self.domains)),
                "heat": None if self.heat is None else self.heat.describe(), "temp_cap_C": self.temp_cap_C,
                "power_budget_W": None if self.power_budget is None else self.power_budget.describe()}


def cut(stream: torch.Tensor, n_chunks: int, rows: int, seq_len: int, offset: int = 0) -> list[torch.Tensor]:
    """`n_chunks` chunks [rows, seq_len] from a 1-D stream starting at `offset` (cycled if short)."""
    need = n_chunks * rows * seq_len
    if stream.numel() < seq_len:
        raise ValueError(f"a stream of {stream.numel()} tokens is shorter than one sequence ({seq_len})")
    start = offset % stream.numel()
    usable = stream.roll(-start).repeat(math.ceil(need / stream.numel()))[:need]
    return list(usable.view(n_chunks, rows, seq_len))


def stationary(stream: torch.Tensor, n_chunks: int, rows: int, seq_len: int) -> Workload:
    return Workload("stationary", cut(stream, n_chunks, rows, seq_len), ["mixed"] * n_chunks)


def domain_shift(domains: dict[str, torch.Tensor], n_chunks: int, rows: int, seq_len: int,
                 block_chunks: int = 4, order: list[str] | None = None) -> Workload:
    """Blocks of `block_chunks` chunks per domain, cycling through `order` (default: sorted names);
    each domain's own stream is consumed in order across its blocks."""
    order = order or sorted(domains)
    missing = [d for d in order if d not in domains]
    if missing or len(order) < 2:
        raise ValueError(f"domain-shift needs at least two domains with streams; missing {missing}, have {sorted(domains)}")
    used = {d: 0 for d in order}
    chunks, labels = [], []
    for i in range(n_chunks):
        name = order[(i // block_chunks) % len(order)]
        chunks += cut(domains[name], 1, rows, seq_len, offset=used[name])
        used[name] += rows * seq_len
        labels.append(name)
    return Workload("domain-shift", chunks, labels)


def thermal(stream: torch.Tensor, n_chunks: int, rows: int, seq_len: int, temp_cap_C: float,
            heat: Schedule) -> Workload:
    base = stationary(stream, n_chunks, rows, seq_len)
    return Workload("thermal", base.chunks, base.domains, heat=heat, temp_cap_C=temp_cap_C)


def power_schedule(stream: torch.Tensor, n_chunks: int, rows: int, seq_len: int, budget: Schedule) -> Workload:
    base = stationary(stream, n_chunks, rows, seq_len)
    return Workload("power-schedule", base.chunks, base.domains, power_budget=budget)
