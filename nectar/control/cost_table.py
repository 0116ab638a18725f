"""Measured expert costs: what one routed slot costs the device, per expert, in the run's own dispatch.

A `CostTable` is what the calibration (`nectar.experiment.calibration`) measures before the first
chunk. Its model of one forward over `tokens` tokens in which layer l sends n[l, e] slots to expert e:

    time_s   ≈ (base_s_per_token + (K − 2) · slot_s_per_token) · tokens + Σ_l Σ_e expert_s_per_token[e] · n[l, e]
               + active_expert_s · forwards · Σ_l (experts layer l uses − 1)
    energy_J ≈ the same with the _J terms

K is the decisions' slots per token. `base_*` is the forward with both of two slots dropped
(attention, LM head, gate, router and whatever the dispatch does for a dropped slot), `slot_*` what
one more slot per token costs even when it is dropped (the permutation and combine run over N·K
rows); `expert_*[e]` is the marginal cost of one slot computed by
expert e over a dropped one — so it is also what dropping a slot of expert e saves. A zero or copy
expert whose cost is above 0 costs a dispatch. The rows are the same for every MoE layer (the
calibration forces every layer alike; tables are for models whose layers share one expert pool).

NECTAR's cost model and the `fixed-price:L` policies start from `relative_costs()` (energy per
slot, normalised to the costliest expert); `predict()` gives a routing's time and energy.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FORMAT = "nectar-cost-table/1"


@dataclass
class CalibrationPoint:
    """One measured design point: a forced routing run over `tokens` tokens."""

    name: str                       # "drop-all", "expert:<e>" or a check routing such as "static-top2"
    tokens: int
    slots_per_layer: list[int]      # [E] slots each layer sent to each expert
    duration_s: float
    energy_J: float
    forwards: int = 1               # micro-batch forwards the window ran


@dataclass
class CostTable:
    gpu: str
    dispatch: str                   # the MoE layers' dispatch path when it was measured
    layers: int                     # MoE layers the model has (all forced alike)
    expert_kinds: list[str]         # [E] "ffn", "zero", "copy", …
    base_s_per_token: float
    base_J_per_token: float
    expert_s_per_token: list[float]  # [E] per slot, per layer
    expert_J_per_token: list[float]  # [E]
    micro_rows: int = 0             # rows per forward when it was measured
    active_expert_s: float = 0.0    # per layer, forward and active expert beyond the first
    active_expert_J: float = 0.0
    slot_s_per_token: float = 0.0   # one more slot per token in the decision (dropped or not), per token
    slot_J_per_token: float = 0.0
    points: list[CalibrationPoint] = field(default_factory=list)
    seconds: float = 0.0            # device time of its measured windows (the run's overhead)
    energy_J: float = 0.0           # energy of its measured windows
    wall_s: float = 0.0             # host wall time of the whole calibration (warm-ups and probe too)
    checks: dict = field(default_factory=dict)   # check routing -> {measured_s, predicted_s, measured_J, predicted_J}
    dispatch_s: dict = field(default_factory=dict)   # dispatch path -> static forward seconds, when both could run
    expert_raw_s_per_token: list[float] | None = None   # [E] the marginals before experts of one shape were pooled
    expert_raw_J_per_token: list[float] | None = None
    format: str = FORMAT

    def __post_init__(self):
        sizes = {len(self.expert_kinds), len(self.expert_s_per_token), len(self.expert_J_per_token)}
        if len(sizes) != 1:
            raise ValueError(f"cost table: expert_kinds, expert_s_per_token and expert_J_per_token differ in length {sizes}")
        self.points = [p if isinstance(p, CalibrationPoint) else CalibrationPoint(**p) for p in self.points]

    @property
    def num_experts(self) -> int:
        return len(self.expert_kinds)

    def predict(self, slots: list[list[int]] | torch.Tensor, tokens: int, forwards: int = 1,
                slots_per_token: int = 2) -> tuple[float, float]:
        """(seconds, joules) the table predicts for `forwards` micro-batch forwards over `tokens`
        tokens in all whose layers send slots [L][E] to the experts (each forward alike), from
        decisions of `slots_per_token` slots (the base was measured with 2)."""
        n_LE = torch.as_tensor(slots, dtype=torch.float64).reshape(-1, self.num_experts)   # [L, E]
        per_expert_E = n_LE.sum(0)                                                       # [E]
        extra = forwards * float((n_LE > 0).sum(1).sub(1).clamp_min(0).sum())          # active experts beyond one
        structure = slots_per_token - 2                                                  # slots beyond the base's
        seconds = ((self.base_s_per_token + structure * self.slot_s_per_token) * tokens + self.active_expert_s * extra
                   + float(per_expert_E @ torch.tensor(self.expert_s_per_token, dtype=torch.float64)))
        joules = ((self.base_J_per_token + structure * self.slot_J_per_token) * tokens + self.active_expert_J * extra
                  + float(per_expert_E @ torch.tensor(self.expert_J_per_token, dtype=torch.float64)))
        return seconds, joules

    def relative_costs(self, floor: float = 0.0) -> torch.Tensor:
        """[E] float64 energy per slot normalised to the costliest FFN expert (the costliest of any
        kind when there is no FFN: a LaCT expert reads > 1 and leaves the fixed-price grid alone); a
        measured cost below `floor` (noise around a free expert) is held at `floor`."""
        c_E = torch.tensor(self.expert_J_per_token, dtype=torch.float64).clamp_min(floor)
        ffn = [c for c, kind in zip(c_E.tolist(), self.expert_kinds) if kind == "ffn"]
        top = max(ffn) if ffn else float(c_E.max())
        if not top > 0:
            raise ValueError("cost table: no expert has a positive measured energy per slot")
        return c_E / top

    def base_power_W(self) -> float:
        """Mean power of the all-dropped forward (the cost model's expert-independent term)."""
        return self.base_J_per_token / self.base_s_per_token if self.base_s_per_token > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "CostTable":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cost table (format {d.get('format')!r}, expected {FORMAT!r})")
        return CostTable(**d)

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.chmod(tmp, 0o644)                      # mkstemp's 0600 would make the table private
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | Path) -> "CostTable":
        try:
            return CostTable.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"cannot read cost table {path}: {exc}") from None
