"""The cost calibration: before the first chunk, measure what each expert costs on this device.

Every MoE layer gets a `ForcedRouter` and the model runs a few design points through the backend's
own telemetry windows (the real forward on the GPU, the simulator's pricing on the simulator — the
same code for both):

    drop-all      both slots of every token dropped (the body and the dispatch of dropped slots)
    expert:<e>    slot 0 of every token computed by expert e, slot 1 dropped   (one point per expert)
    spread        slot 0 of token i computed by expert i mod E, slot 1 dropped (every expert active)
    drop-all:1-slot  one slot per token, dropped (what a decision's second slot costs even dropped)
    static-top2   the trained gate's top-2, a held-out check of the table's prediction

expert e's marginal cost per slot is (point e − drop-all) / (layers · tokens); what `spread` costs
beyond the sum of those is the fixed cost of one more active expert in a layer's forward (a loop
dispatch's launches, say), per layer and micro-batch; in time and in energy (`nectar.telemetry.energy.window_energy_J`: integrated instant power on short windows).
First, where the layers can take either dispatch path (the grouped path exists for the device and
dtype), the static routing's forward is timed in each and the layers keep the faster one for the
whole run (`dispatch_s` in the table): the dispatch experiments use is the one measured fastest on
the device at hand, not a default.

Each point runs an un-timed warm-up (one micro-batch, or about `settle_s` of forwards so that a
power reading that lags the work does not carry the previous point into this one), then as many
rows of the calibration batch as make a window of about `window_s` (at least one micro-batch, at
most the batch), so the measured windows stay near `budget_s` of device time.

Experts of one shape (same kind, FLOPs and bytes per token) do the same work, so with `pool_shapes`
they share one cost: the mean of their measured marginals. On a GPU the marginals of identical
experts differ by a window's energy noise (±10 % on 0.15 s windows of an H100), which would
otherwise teach the priced policies a preference that saves nothing; the points keep the raw
measurements and `expert_raw_*` in the table keeps the unpooled marginals. The dispatch each layer
uses is the run's own (`layer.grouped`, compiled or not): the table prices the path the run takes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from nectar.control.cost_model import OnlineCostModel
from nectar.control.cost_table import CalibrationPoint, CostTable
from nectar.experiment.forward import forward_chunk, install
from nectar.moe.dispatch import dispatch_path
from nectar.moe.router import RoutingDecision, Router, check_logits, gate_probs
from nectar.telemetry.energy import window_energy_J

DROP = -1          # ForcedRouter's expert for "drop every slot"
SPREAD = -2        # ForcedRouter's expert for "token i to expert i mod E"
FORCED = ("drop-all", "spread", "drop-all:1-slot")   # design points besides "expert:<e>"


class CalibrationError(ValueError):
    """The calibration could not measure a usable table (bad telemetry, no positive cost)."""


class ForcedRouter(Router):
    """`slots` (2 or 1) slots per token: slot 0 → `expert` (dropped when expert is DROP; expert
    i mod E for token i when it is SPREAD), slot 1 dropped."""

    def __init__(self, num_experts: int, expert: int, slots: int = 2):
        super().__init__(num_experts)
        if not SPREAD <= expert < num_experts:
            raise ValueError(f"forced expert {expert} is out of range for {num_experts} experts")
        if slots not in (1, 2):
            raise ValueError(f"a forced routing has 1 or 2 slots per token, got {slots}")
        self.expert, self.slots = expert, slots

    @property
    def max_slots(self) -> int:
        return self.slots

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        n, k = logits.shape[0], self.slots
        experts_NK = torch.full((n, k), max(self.expert, 0), dtype=torch.long, device=logits.device)   # [N, K]
        if self.expert == SPREAD:
            experts_NK[:, 0] = torch.arange(n, device=logits.device) % self.num_experts
        mask_NK = torch.ones((n, k), dtype=torch.bool, device=logits.device)
        dropped_NK = torch.ones_like(mask_NK)
        if self.expert != DROP:
            dropped_NK[:, 0] = False
        gates_NK = (~dropped_NK).to(logits.dtype)                                            # [N, K]
        return RoutingDecision(experts_NK, gates_NK, mask_NK, dropped_NK, gate_probs(logits, 1.0), logits)


@dataclass
class CalibrationConfig:
    budget_s: float = 2.0          # target device time of the whole calibration
    choose_dispatch: bool = True   # time loop vs grouped dispatch first and keep the faster
    window_s: float | None = None  # one point's window; None: budget spread over the points
    micro_rows: int | None = None  # rows per forward (the run's micro-batch)
    settle_s: float = 0.0          # un-timed forwards of a point's routing before its window (≥ 1 micro-batch)
    pool_shapes: bool = True       # experts of one shape share the mean of their measured marginals

    def __post_init__(self):
        if not self.budget_s > 0 or (self.window_s is not None and not self.window_s > 0):
            raise ValueError("calibration budget_s and window_s must be > 0")
        if not self.settle_s >= 0:
            raise ValueError(f"calibration settle_s must be >= 0, got {self.settle_s}")


def supports_calibration(model) -> bool:
    """Whether every MoE layer takes a plain Router and all layers share one expert pool."""
    layers = [layer for _, layer in model.moe_layers()]
    if not layers or any(hasattr(layer, "policy_router") or not hasattr(layer, "experts") for layer in layers):
        return False
    return len({tuple(_kinds(layer)) for layer in layers}) == 1


def calibrate(model, backend, batch: torch.Tensor, config: CalibrationConfig | None = None,
              static_router=None, on_window=None) -> CostTable:
    """Measure the model's CostTable on `backend` with rows of `batch` [B, T] (see module docstring).
    `static_router(layer)` makes the check routing's router; `on_window(name, window)` sees every
    measured window (e.g. to log it in a trace). The layers' routers are restored afterwards."""
    config = config or CalibrationConfig()
    if not supports_calibration(model):
        raise ValueError("cost calibration needs MoE layers that take a Router and share one expert pool")
    layers = [layer for _, layer in model.moe_layers()]
    saved = [layer.router for layer in layers]
    started = time.perf_counter()
    try:
        dispatch_s = {}
        if config.choose_dispatch and static_router is not None:
            dispatch_s = choose_dispatch(model, backend, batch, config, layers, static_router)
        points = _measure_points(model, backend, batch, config, layers, static_router, on_window)
    finally:
        install(model, saved)
    table = _table(model, layers, points, time.perf_counter() - started, config.micro_rows or batch.shape[0])
    if config.pool_shapes:
        pool_shapes(table, [expert.cost_per_token() for expert in layers[0].experts])
    if not max(table.expert_J_per_token) > 0:
        raise CalibrationError("no expert has a positive measured energy per slot")
    table.dispatch_s = {path: seconds for path, (seconds, _) in dispatch_s.items()}
    table.seconds += sum(seconds for seconds, _ in dispatch_s.values())          # its windows are overhead too
    table.energy_J += sum(joules for _, joules in dispatch_s.values())
    return table


def choose_dispatch(model, backend, batch: torch.Tensor, config: CalibrationConfig, layers, static_router) -> dict:
    """{path: (seconds, joules) of the static routing's forward}: the layers are left on the faster
    path ({} and unchanged where only the loop path can run on this device and dtype)."""
    if any(_path(layer, True) != "grouped" for layer in layers):
        return {}
    install(model, [static_router(layer) for layer in layers])
    micro = config.micro_rows or batch.shape[0]
    rows = None
    seconds = {}
    for path in ("loop", "grouped"):
        for layer in layers:
            layer.grouped = path == "grouped"
        forward_chunk(model, batch[:micro], micro, "dispatch-warm-up", max_sample_tokens=0)
        rows = rows or _rows_for_window(model, backend, batch, micro, config.window_s or config.budget_s / 8)
        _, window = _window(model, backend, batch[:rows], micro, f"dispatch:{path}")
        seconds[path] = (window.duration_s, window_energy_J(window))
    fastest = min(seconds, key=lambda path: seconds[path][0])
    for layer in layers:
        layer.grouped = fastest == "grouped"
    return seconds


def _measure_points(model, backend, batch, config, layers, static_router, on_window) -> list[CalibrationPoint]:
    num = layers[0].num_experts
    designs = ([("drop-all", DROP)] + [(f"expert:{e}", e) for e in range(num)] + [("spread", SPREAD)]
               + [("drop-all:1-slot", DROP)])                     # FORCED and the per-expert points
    if static_router is not None:
        designs.append(("static-top2", None))
    micro = config.micro_rows or batch.shape[0]
    window_s = config.window_s or config.budget_s / (len(designs) + 1)
    rows = None
    points = []
    for name, expert in designs:
        slots = 1 if name.endswith(":1-slot") else 2
        routers = [static_router(layer) if expert is None else ForcedRouter(num, expert, slots) for layer in layers]
        install(model, routers)
        if rows is None:
            forward_chunk(model, batch[:micro], micro, name, max_sample_tokens=0)      # compile/warm-up, not measured
            rows = _rows_for_window(model, backend, batch, micro, window_s)
        settle = _settle_rows(rows, micro, config.settle_s / window_s)
        forward_chunk(model, batch[:settle], micro, name, max_sample_tokens=0)         # settle, not measured
        point, window = _measure(model, backend, batch[:rows], micro, name)
        if on_window is not None:
            on_window(name, window)
        points.append(point)
    return points


def _settle_rows(rows: int, micro: int, fraction: float) -> int:
    """Rows of a point's un-timed settle: `fraction` of its window's rows, whole micro-batches, ≥ one."""
    return max(micro, math.ceil(rows * fraction / micro) * micro)


def _rows_for_window(model, backend, batch: torch.Tensor, micro: int, window_s: float) -> int:
    """Rows whose forward lasts about window_s (one micro-batch is timed through the backend)."""
    _, probe = _window(model, backend, batch[:micro], micro, "calibration-probe")
    per_row_s = max(probe.duration_s, 1e-9) / micro
    rows = math.ceil(window_s / per_row_s / micro) * micro
    return max(micro, min(rows, batch.shape[0]))


def _window(model, backend, rows: torch.Tensor, micro: int, name: str):
    """(workload, window) of one measured forward of rows; the workload as the backend accounted it
    (a simulator pricing a small model at a larger shape scales tokens and counts)."""
    box = {}

    def compute():
        box["workload"] = forward_chunk(model, rows, micro, name, max_sample_tokens=0).workload
        return box["workload"]

    window = backend.run_chunk(compute)
    return (window.workload if window.workload is not None else box["workload"]), window


def _measure(model, backend, rows: torch.Tensor, micro: int, name: str):
    """(point, window) of one measured forward of rows."""
    workload, window = _window(model, backend, rows, micro, name)
    counts = workload.expert_counts()
    moe_counts = [counts[i] for i, _ in model.moe_layers()]                     # [L][E]
    per_layer = [round(sum(col) / len(moe_counts)) for col in zip(*moe_counts)]   # [E] mean over layers
    energy_J = window_energy_J(window)
    if not (window.is_valid() and math.isfinite(energy_J) and window.duration_s > 0):
        raise CalibrationError(f"the {name} window's telemetry is unusable (flags: {', '.join(window.flags) or 'none'})")
    point = CalibrationPoint(name, workload.tokens, per_layer, window.duration_s, energy_J,
                             forwards=math.ceil(rows.shape[0] / micro))
    return point, window


def _per_token(point: CalibrationPoint) -> tuple[float, float]:
    """(seconds, joules) per token of a point's window."""
    return point.duration_s / point.tokens, point.energy_J / point.tokens


def _table(model, layers, points: list[CalibrationPoint], wall_s: float, micro: int) -> CostTable:
    by_name = {p.name: p for p in points}
    num, count = layers[0].num_experts, len(layers)
    base_s, base_J = _per_token(by_name["drop-all"])
    marginal = [_per_token(by_name[f"expert:{e}"]) for e in range(num)]      # per token, all layers forced alike
    expert_s = [(s - base_s) / count for s, _ in marginal]
    expert_J = [(j - base_J) / count for _, j in marginal]
    table = CostTable(
        gpu="", dispatch=_dispatch_name(layers[0]), layers=count, expert_kinds=_kinds(layers[0]),
        base_s_per_token=base_s, base_J_per_token=base_J, expert_s_per_token=expert_s, expert_J_per_token=expert_J,
        micro_rows=micro, points=points, seconds=sum(p.duration_s for p in points),
        energy_J=sum(p.energy_J for p in points), wall_s=wall_s)
    spread = by_name["spread"]
    linear_s, linear_J = table.predict([spread.slots_per_layer] * count, spread.tokens, spread.forwards)
    extra = count * spread.forwards * (num - 1)         # active experts beyond one, over layers and forwards
    table.active_expert_s = (spread.duration_s - linear_s) / extra
    table.active_expert_J = (spread.energy_J - linear_J) / extra
    one_slot_s, one_slot_J = _per_token(by_name["drop-all:1-slot"])   # a decision's second slot, dropped
    table.slot_s_per_token, table.slot_J_per_token = base_s - one_slot_s, base_J - one_slot_J
    for p in points:
        if p.name in FORCED or p.name.startswith("expert:"):
            continue                                     # the design points; the rest are checks
        predicted_s, predicted_J = table.predict([p.slots_per_layer] * count, p.tokens, p.forwards)
        table.checks[p.name] = {"measured_s": p.duration_s, "predicted_s": predicted_s,
                                "measured_J": p.energy_J, "predicted_J": predicted_J}
    return table


def pool_shapes(table: CostTable, costs: list) -> None:
    """Give experts of one shape (equal `ExpertCost` descriptors) the mean of their measured
    marginal time and energy per slot; the unpooled marginals stay in `expert_raw_*`."""
    table.expert_raw_s_per_token = list(table.expert_s_per_token)
    table.expert_raw_J_per_token = list(table.expert_J_per_token)
    groups: dict = {}
    for e, cost in enumerate(costs):
        groups.setdefault((cost.kind, cost.flops, cost.bytes, cost.weight_bytes), []).append(e)
    for members in groups.values():
        for values in (table.expert_s_per_token, table.expert_J_per_token):
            mean = sum(values[e] for e in members) / len(members)
            for e in members:
                values[e] = mean


def _kinds(layer) -> list[str]:
    return [expert.cost_per_token().kind for expert in layer.experts]


def _path(layer, grouped: bool) -> str:
    """The dispatch path `layer` takes on its own device and dtype with `grouped` set so."""
    weight = layer.gate.weight
    return dispatch_path(torch.empty(1, layer.d_model, device=weight.device, dtype=weight.dtype), layer.experts, grouped)


def _dispatch_name(layer) -> str:
    """The path layer's forward takes ("loop", "grouped", "grouped+compile")."""
    path = _path(layer, layer.grouped)
    return path + ("+compile" if path == "grouped" and layer.compile_options is not None else "")


# ---------------------------------------------------------------------------- what a run starts from


def start_costs(model, table: CostTable | None) -> list[torch.Tensor]:
    """Per MoE layer, [E] the relative per-slot costs the priced policies start from: the table's
    measured energy (normalised to the costliest expert), else the FLOP prior."""
    from nectar.experiment.policies import prior_costs

    return [prior_costs(layer) if table is None else table.relative_costs() for _, layer in model.moe_layers()]


def measured_cost_model(model, table: CostTable) -> OnlineCostModel:
    """NECTAR's online cost model with the table's measurements as its prior (MoE blocks: the
    measured J per slot; other blocks and the layout: from the model's workload)."""
    moe = {index for index, _ in model.moe_layers()}
    blocks = model.workload_from_counts([[0] * layer.num_experts for _, layer in model.moe_layers()], 1, 1).layers
    measured = [max(0.0, j) for j in table.expert_J_per_token]
    return OnlineCostModel([[c.flops for c in block.expert_costs] for block in blocks],
                           prior_J_per_token=[measured if i in moe else None for i in range(len(blocks))],
                           prior_idle_W=table.base_power_W())
