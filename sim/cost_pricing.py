"""Prices a chunk by a measured per-expert cost table instead of the roofline.

A run's cost calibration (`nectar.experiment.calibration`) writes `cost_table.json`: what the
device measured for the run's own model and dispatch — the forward with every slot dropped
(`base`), what one more slot per token costs even dropped (`slot`), each expert's marginal cost
per computed slot, and the fixed cost of one more active expert per layer and forward
(`nectar.control.cost_table.CostTable`). `CostTablePricer` turns a chunk's routing into that
table's prediction (`CostTable.predict`):

    slots [L][E]     the chunk's kept slots per layer and expert (its workload's counts)
    tokens           the chunk's tokens
    forwards         ceil(batch / the table's micro_rows): micro-batch forwards the chunk ran
    K                slots per token of the decisions: static-topK says K, the calibration's
                     ":1-slot" points 1, every other router decides 2 (NECTAR's routers, the
                     static families over top-2) unless its counts keep more per token

scaled so that the table's held-out check point (static-top2, measured in the same calibration)
lands on its measurement: time × measured_s / predicted_s, energy × measured_J / predicted_J
(1 where the table has no check). Dropped and cheap slots are thereby priced as the device
priced them (a dropped slot still costs its share of the permutation and combine), not by FLOPs.

The prediction becomes one phase the simulated GPU runs like any other, so the power limit,
thermal slowdown and leakage still act: at the max clock the phase lasts `time_s`, and its
dynamic energy is what the table's energy leaves above idle and the leakage at `table_temp_C`
(the temperature the calibration ran at). The dynamic part keeps SMs and HBM busy for the same
share `a` of the phase, a = dynamic energy / ((compute_power_W + memory_power_W) · time_s)
(capped at 1: a table above the preset's full dynamic power is priced at full power); the rest of
the phase is clock-independent time. So at clock fraction s it lasts a·t/s + (1 − a)·t.

Only teacher-forced chunks are priced this way (the calibration measures teacher-forced forwards);
a serving step (`ChunkWorkload.phase`) is refused with a ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nectar.control.cost_table import CostTable
from nectar.telemetry.workload import ChunkWorkload
from sim.pricing import KernelTable, PricedChunk
from sim.presets import GPUPreset
from sim.workload_arrays import workload_arrays

BASE_SLOTS = 2                  # slots per token of the decisions the table's base was measured with
CHECK_POINT = "static-top2"     # the table's held-out check the prediction is scaled to


@dataclass(frozen=True)
class TablePrice:
    """A chunk's cost by the table: time and energy at the max clock, and the inputs used."""

    time_s: float
    energy_J: float
    tokens: int
    forwards: int
    slots_per_token: int


def load_table(table: CostTable | str | Path) -> CostTable:
    return table if isinstance(table, CostTable) else CostTable.load(table)


def check_scales(table: CostTable) -> tuple[float, float]:
    """(time, energy) factors that put the table's prediction of its check point on the measurement."""
    check = table.checks.get(CHECK_POINT)
    if not check:
        return 1.0, 1.0
    if not (check["predicted_s"] > 0 and check["predicted_J"] > 0):
        raise ValueError(f"cost table: the {CHECK_POINT} check predicts {check['predicted_s']} s, "
                         f"{check['predicted_J']} J; both must be > 0")
    return check["measured_s"] / check["predicted_s"], check["measured_J"] / check["predicted_J"]


def decision_slots(w: ChunkWorkload) -> int:
    """K, the slots per token of the chunk's routing decisions (module docstring)."""
    name = w.policy
    if name.startswith("static-top") and name.removeprefix("static-top").isdigit():
        return int(name.removeprefix("static-top"))
    if name.endswith(":1-slot"):
        return 1
    most = max((sum(layer.tokens_per_expert) + layer.dropped_tokens for layer in w.layers), default=0)
    return max(BASE_SLOTS, math.ceil(most / w.tokens))


class CostTablePricer:
    """ChunkWorkload → PricedChunk of one phase, by a measured cost table (module docstring)."""

    def __init__(self, table: CostTable | str | Path, preset: GPUPreset, table_temp_C: float | None = None):
        self.table, self.preset = load_table(table), preset
        self.scale_s, self.scale_J = check_scales(self.table)
        temp = preset.leakage_ref_C if table_temp_C is None else float(table_temp_C)
        if not math.isfinite(temp):
            raise ValueError(f"table_temp_C must be a finite temperature, got {table_temp_C!r}")
        self.floor_W = preset.idle_power_W + preset.leakage_W_per_C * (temp - preset.leakage_ref_C)

    def _slots(self, w: ChunkWorkload) -> np.ndarray:
        """[L, E] kept slots of the chunk's MoE layers, checked against the table's shape."""
        counts = workload_arrays(w).counts  # [L, E] validates the workload
        experts = [len(layer.tokens_per_expert) for layer in w.layers]
        if set(experts) != {self.table.num_experts} or len(experts) != self.table.layers:
            raise ValueError(f"the cost table prices {self.table.layers} MoE layers of {self.table.num_experts} experts; "
                             f"the workload has {len(experts)} layers of {sorted(set(experts))} experts")
        return counts

    def predict(self, w: ChunkWorkload) -> TablePrice:
        """The table's time and energy for the chunk's routing, scaled to the check point."""
        if w.phase:
            raise ValueError(f"a cost table prices teacher-forced chunks (what the calibration measures), "
                             f"not a {w.phase} step; price serving steps by the roofline")
        slots = self._slots(w)
        forwards = max(1, math.ceil(w.batch / self.table.micro_rows)) if self.table.micro_rows else 1
        k = decision_slots(w)
        seconds, joules = self.table.predict(slots.tolist(), w.tokens, forwards, k)
        if not (seconds > 0 and math.isfinite(joules)):
            raise ValueError(f"the cost table predicts {seconds} s and {joules} J for this chunk; need a time > 0")
        return TablePrice(seconds * self.scale_s, joules * self.scale_J, w.tokens, forwards, k)

    def busy_share(self, price: TablePrice) -> float:
        """a: the share of the phase that SMs and HBM are busy (module docstring)."""
        dynamic_J = price.energy_J - self.floor_W * price.time_s
        full_W = self.preset.compute_power_W + self.preset.memory_power_W
        if dynamic_J <= 0 or full_W <= 0:
            return 0.0
        return min(1.0, dynamic_J / (full_W * price.time_s))

    def price(self, w: ChunkWorkload) -> PricedChunk:
        p = self.predict(w)
        a = self.busy_share(p)
        busy = np.array([[a * p.time_s]])  # [1, 1] one phase, one kernel
        fixed = KernelTable(busy, busy.copy(), np.array([(1.0 - a) * p.time_s]))
        moe = KernelTable(np.zeros((0, 1)), np.zeros((0, 1)), np.zeros(0))  # [0, 1] no per-block rows
        return PricedChunk(["chunk"], fixed, moe, flops=0.0, bytes=0.0)
