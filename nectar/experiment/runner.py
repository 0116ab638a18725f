"""The main experiment: routing policies on one token stream against a telemetry backend.

Every policy sees the same token stream, chunk by chunk. With one backend per policy (the
simulator) each policy runs on its own simulated GPU that starts in the same state (seeded,
isolated: temperature history cannot favour one policy); with one shared backend (a real GPU) the
policies are interleaved in time (A B C D, then B C D A, …) so that temperature drift spreads over
all of them.

One chunk: the backend runs the chunk's forward inside its telemetry window (`run_chunk(compute)`),
the forward returns a `ChunkObservation`, and an adaptive policy's controller gets both as
arguments, plus a shadow check that re-runs sequences of the chunk under static routing (charged
to the policy). Under operating limits (temperature cap, power budget), a non-adaptive policy is
held by the same pause governor NECTAR falls back on, with its routing left alone.

Data-parallel replicas (`nectar.control.replicas`; one process per GPU under torchrun): each
replica runs a contiguous share of every chunk's sequences on its own backend, then the replicas
combine the chunk's observation and windows (and the quality check's) into the node's, and every
replica takes the same controller step on them. The hooks are the `replicas` branches below and the
section at the end of this file; without an active replica group nothing changes.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.limits import LimitGovernor
from nectar.control.quality_guard import QualityCheck
from nectar.control.replicas import ReplicaGroup, replica_extra
from nectar.control.replicas import active as active_replicas
from nectar.control.share_controller import ShareController
from nectar.experiment.forward import forward_chunk, install
from nectar.control.cost_table import CostTable
from nectar.experiment.calibration import (CalibrationConfig, CalibrationError, calibrate, measured_cost_model, start_costs,
                                           supports_calibration)
from nectar.experiment.clocks import is_clock_sweep
from nectar.experiment.policies import DEFAULT_POLICIES, PolicySpec, check_policies, parse_policy, policy_router
from nectar.experiment.records import ChunkRecord
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import lock_clock
from nectar.telemetry.workload import merge_workloads
from nectar.telemetry.trace import TraceRow


@dataclass
class RunConfig:
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    tokens: int = 65536                 # stream tokens per policy
    chunk_tokens: int = 4096            # tokens per chunk (one controller step per chunk)
    seq_len: int = 256
    seed: int = 0
    micro_batch_rows: int | None = None  # forward a chunk in micro-batches of this many sequences
    interleave: bool | None = None      # share one backend and interleave policies in time (None: unless
                                        # the backend gives each policy its own isolated device)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    calibration: CalibrationConfig | None = None   # measure expert costs before the first chunk (None: FLOP prior)

    def __post_init__(self):
        check_policies(self.policies)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.chunk_tokens < self.seq_len or self.chunk_tokens % self.seq_len:
            raise ValueError(f"chunk_tokens ({self.chunk_tokens}) must be a positive multiple of seq_len ({self.seq_len})")
        if self.tokens < self.chunk_tokens:
            raise ValueError(f"tokens ({self.tokens}) must be at least one chunk ({self.chunk_tokens})")
        if self.tokens % self.chunk_tokens:
            raise ValueError(f"tokens ({self.tokens}) must be a multiple of chunk_tokens ({self.chunk_tokens}); "
                             f"e.g. {self.tokens // self.chunk_tokens * self.chunk_tokens}")

    @property
    def has_limits(self) -> bool:
        limits = self.controller.limits
        return limits.temp_cap_C is not None or limits.power_budget is not None


@dataclass
class PolicyRun:
    name: str
    spec: PolicySpec
    routers: list
    static_routers: list                # static top-2, for the shadow check
    backend: Any
    controller: NectarController | ShareController | None = None
    governor: LimitGovernor | None = None   # holds limits for a non-adaptive policy (pauses only)
    records: list[ChunkRecord] = field(default_factory=list)
    trace: list[TraceRow] = field(default_factory=list)   # every telemetry window, in order
    replicas: ReplicaGroup | None = None   # data-parallel: windows and observations are the node's
    cost_table: CostTable | None = None    # the run's calibration (shared by every policy), if any

    def log(self, window, kind: str, chunk_index: int, suffix: str = "") -> None:
        self.trace.append(TraceRow(window, window.workload, kind=kind, policy=self.name + suffix,
                                   chunk_index=chunk_index, extra=replica_extra(window)))


def measured_forward(backend, model, batch: torch.Tensor, policy: str, micro_rows: int | None = None,
                     max_sample_tokens: int | None = None, check_rows: torch.Tensor | None = None,
                     run: "PolicyRun | None" = None):
    """(observation, window, static observation or None): the chunk's forward run inside the
    backend's telemetry window; with `check_rows` [r] (rows of `batch`), those rows are re-run
    under `run`'s static routers inside the same window, whose workload is then both forwards'."""
    box: dict = {}
    sample = {} if max_sample_tokens is None else {"max_sample_tokens": max_sample_tokens}

    def compute():
        box["observation"] = forward_chunk(model, batch, micro_rows, policy, **sample)
        if check_rows is None or not check_rows.numel():
            return box["observation"].workload
        install(model, run.static_routers)
        try:
            box["static"] = forward_chunk(model, batch[check_rows.to(batch.device)], micro_rows, "guard-shadow",
                                          max_sample_tokens=0)
        finally:
            install(model, run.routers)
        return merge_workloads([box["observation"].workload, box["static"].workload], policy)

    window = backend.run_chunk(compute)
    return box["observation"], window, box.get("static")


def ride_along_check(run: "PolicyRun", rows: torch.Tensor, observation, static, window, share: float) -> QualityCheck:
    """The paired check of `rows` (of the whole chunk) whose static re-run rode along in the chunk's
    `window` (this process's re-run: `static`, None if it held none of the rows); it costs `share`
    of the window's energy and time. Over replicas the static NLLs of every replica's rows combine."""
    if run.replicas is None:
        adapted_sum, tokens = observation.rows_nll(rows)
        check = QualityCheck(adapted_sum / tokens, static.nll_sum / static.nll_tokens, tokens)
    else:
        local = None if static is None else (static.nll_rows, static.nll_tokens, None)
        check = run.replicas.quality_check(rows, observation, local)
    return replace(check, energy_J=share * window_energy_J(window), seconds=share * window.duration_s)


def build_policy(name: str, model, backend, cfg: RunConfig, table: CostTable | None = None) -> PolicyRun:
    """A policy's routers (and controller): priced policies start from `table`'s measured costs
    (`nectar:prior` from the FLOP prior), or from the FLOP prior without a table."""
    reference = getattr(model, "reference_policy", "static-top2")   # transformers MoE: the family's own top-K
    spec = routed_spec(parse_policy(name), reference)
    layers = [layer for _, layer in model.moe_layers()]
    measured = table if spec.route_name != "nectar:prior" else None
    costs = start_costs(model, measured)
    routers = [policy_router(spec, layer, seed=cfg.seed, costs=c) for layer, c in zip(layers, costs)]
    run = PolicyRun(name, spec, routers, [policy_router(reference, layer) for layer in layers], backend,
                    cost_table=table)
    if spec.is_nectar:
        run.controller = NectarController(routers, nectar_config(spec, cfg.controller),
                                          cost_layers=[idx for idx, _ in model.moe_layers()], start_costs=costs,
                                          cost_model=None if measured is None else measured_cost_model(model, measured))
    elif spec.kind == "pi-share":
        run.controller = ShareController(routers, target_share=spec.value, limits=cfg.controller.limits)
    elif cfg.has_limits:
        run.governor = LimitGovernor(replace(cfg.controller.limits, routing=False))
    return run


def routed_spec(spec: PolicySpec, reference: str) -> PolicySpec:
    """`clock:MHZ` routes with the model's reference policy (static-top2, or a transformers MoE
    model's own top-K); every other name routes as it says."""
    if not is_clock_sweep(spec.name) or reference == spec.route_name:
        return spec
    return replace(parse_policy(reference), name=spec.name, clock_MHz=spec.clock_MHz, routing=reference)


def nectar_config(spec: PolicySpec, base: ControllerConfig) -> ControllerConfig:
    """The controller configuration of a NECTAR variant (see nectar.experiment.policies)."""
    name = spec.route_name
    if name == "nectar:prior":
        return replace(base, cost_learning="prior")
    if name == "nectar:frozen":
        return replace(base, cost_learning="frozen")
    if name == "nectar:noscale":
        return replace(base, guard=replace(base.guard, sensitivity=False, feedforward=False))
    if name == "nectar:dual":
        return replace(base, guard=replace(base.guard, feedforward=False))
    return base


def run_chunk(model, run: PolicyRun, batch, index: int, cfg: RunConfig) -> ChunkRecord:
    """One chunk of one policy. NECTAR's quality check rides along: the rows it re-runs under static
    routing run inside the chunk's own window, which is split between chunk and check by their
    shares of the rows (every row has the same length)."""
    install(model, run.routers)
    world = 1 if run.replicas is None else run.replicas.world_size
    planned = run.controller.planned_check(batch.shape[0] * world) if isinstance(run.controller, NectarController) else None
    here = planned if planned is None or run.replicas is None else run.replicas.rows_here(planned, batch.shape[0])
    if run.replicas is None:
        observation, window, static = measured_forward(run.backend, model, batch, run.spec.route_name,
                                                       cfg.micro_batch_rows, check_rows=here, run=run)
    else:
        observation, window, static = replica_forward(model, run, batch, cfg, here)
    share = 0.0 if planned is None else planned.numel() / (batch.shape[0] * world + planned.numel())
    workload = window.workload
    own = 1.0 - share                                              # the chunk's share of its window
    record = ChunkRecord(
        policy=run.name, chunk=index, t_start_s=window.t_start_s, t_end_s=window.t_start_s + own * window.duration_s,
        tokens=round(own * workload.tokens), energy_J=own * window_energy_J(window), mean_power_W=window.mean_power_W,
        peak_power_W=window.peak_power_W, temp_C=window.gpu_temp_C, sm_clock_MHz=window.sm_clock_MHz,
        nll_sum=observation.nll_sum, nll_tokens=observation.nll_tokens, routing_agreement=observation.agreement,
        expert_counts=workload.expert_counts(), flags=list(window.flags),
        energy_mJ_start=window.energy_mJ_start, energy_mJ_end=window.energy_mJ_end)
    run.log(window, "chunk", index)
    pause_s = 0.0
    if isinstance(run.controller, NectarController):
        record.fallback = any(r.fallback for r in run.routers)
        shadow = None if planned is None else (  # the planned check rode along in the chunk's window
            lambda rows: ride_along_check(run, rows, observation, static, window, share))  # noqa: E731
        control = run.controller.after_chunk(observation, window, shadow)
        record.alpha, record.lam, record.price, record.kappa = control.alpha, control.lam, control.price, control.kappa
        record.delta_nll, record.deviation, record.budget_W = control.delta_nll, control.deviation, control.budget_W
        record.nu_temp, record.nu_power = control.nu_temp, control.nu_power
        record.cost_residual, record.skipped = control.cost_residual, control.skipped
        record.guard_energy_J, record.guard_s = control.guard_energy_J, control.guard_s
        pause_s = control.pause_s
    elif run.controller is not None:
        pause_s = run.controller.after_chunk(observation, window).pause_s
    elif run.governor is not None:
        run.governor.update(window)
        pause_s = run.governor.pause_s(window, window.duration_s)
    if pause_s > 0:
        _pause(run, record, pause_s, index)
    return record


def _pause(run: PolicyRun, record: ChunkRecord, seconds: float, index: int) -> None:
    pause = run.backend.idle(seconds)
    if run.replicas is not None:
        pause = run.replicas.window(pause)
    run.log(pause, "idle", index)
    record.pause_s, record.pause_energy_J = pause.duration_s, window_energy_J(pause)
    governor = run.governor if run.governor is not None else getattr(run.controller, "limits", None)
    if governor is not None:
        governor.observe_idle(pause)


def chunks_of(stream: torch.Tensor, cfg: RunConfig) -> list[torch.Tensor]:
    """Cut the 1-D token stream into `tokens // chunk_tokens` chunks [chunk_tokens // seq_len,
    seq_len]. A stream shorter than `tokens` is cycled (every policy still sees the same tokens)."""
    rows = cfg.chunk_tokens // cfg.seq_len
    n_chunks = cfg.tokens // cfg.chunk_tokens
    if stream.numel() < cfg.seq_len:
        raise ValueError(f"the stream has {stream.numel()} tokens, fewer than one sequence ({cfg.seq_len})")
    needed = n_chunks * cfg.chunk_tokens
    usable = stream.repeat(math.ceil(needed / stream.numel()))[:needed]
    return list(usable.view(n_chunks, rows, cfg.seq_len))


def run_experiment(model, chunks: torch.Tensor | list[torch.Tensor], backend_factory: Callable[[], Any],
                   cfg: RunConfig, progress: bool = True, replicas: ReplicaGroup | None = None,
                   before_policy: Callable[[PolicyRun], Any] | None = None,
                   cost_table: CostTable | None = None) -> list[PolicyRun]:
    """Run every policy over the same chunks ([chunk_rows, seq_len] each; a 1-D stream is cut by
    `chunks_of`); returns the per-policy runs with their records. With `replicas` (default: the
    active replica group, if any) this process runs its share of every chunk and the records are
    the node's. `before_policy(run)` is called before each policy's first chunk when policies run
    one after another (not interleaved): e.g. the same warm-up for every policy of a thermal run.
    `cost_table`: a table measured earlier in the same run (a later stage), used instead of a new
    calibration. Clock-locked policies (`nectar.experiment.clocks`) lock their backend's clock
    before each of their chunks (the others release it); a backend that cannot lock its clock
    refuses before the first chunk."""
    model.eval()
    device = next(model.parameters()).device
    chunks = chunks_of(chunks, cfg) if isinstance(chunks, torch.Tensor) and chunks.dim() == 1 else list(chunks)
    chunks = [c.to(device) for c in chunks]
    replicas = replicas if replicas is not None else active_replicas()
    if replicas is not None:
        chunks = replica_shares(replicas, model, chunks, cfg)
        progress = progress and replicas.rank == 0
    first = backend_factory()
    interleave = cfg.interleave if cfg.interleave is not None else not first.isolated
    clocks = [parse_policy(n).clock_MHz for n in cfg.policies if parse_policy(n).clock_MHz is not None]
    clocked = bool(clocks)
    if clocked:
        probe_clocks(first, clocks)
    table = cost_table if cost_table is not None else run_calibration(model, first, chunks[0], cfg, progress)
    runs = [build_policy(n, model, first if (interleave or j == 0) else backend_factory(), cfg, table)
            for j, n in enumerate(cfg.policies)]
    for run in runs:
        run.replicas = replicas
    schedule = [(i, (i + j) % len(runs) if interleave else j) for i in range(len(chunks)) for j in range(len(runs))]
    if not interleave:
        schedule.sort(key=lambda item: item[1])
    try:
        for i, j in tqdm(schedule, desc="chunks", disable=not progress):
            if before_policy is not None and not interleave and i == 0:
                before_policy(runs[j])
            if clocked:
                lock_clock(runs[j].backend, runs[j].spec.clock_MHz)
            runs[j].records.append(run_chunk(model, runs[j], chunks[i], i, cfg))
    finally:
        if clocked:   # a shared backend leaves the run at its own clocks
            for backend in {id(run.backend): run.backend for run in runs}.values():
                lock_clock(backend, None)
    return runs


def probe_clocks(backend, clocks: list[float]) -> None:
    """Lock `backend` at each clock in turn, then release it: a backend that cannot lock its clock,
    or a clock it cannot run, is refused (ValueError) before any work."""
    for clock_MHz in [*sorted(set(clocks)), None]:
        lock_clock(backend, clock_MHz)


def run_calibration(model, backend, chunk: torch.Tensor, cfg: RunConfig, progress: bool) -> CostTable | None:
    """The run's cost table (None when calibration is off or the model's layers cannot be forced)."""
    if cfg.calibration is None or not supports_calibration(model):
        return None
    calibration = replace(cfg.calibration, micro_rows=cfg.calibration.micro_rows or cfg.micro_batch_rows)
    try:
        table = calibrate(model, backend, chunk, calibration,
                          static_router=lambda layer: policy_router(getattr(model, "reference_policy", "static-top2"), layer))
    except CalibrationError as exc:
        print(f"nectar: warning: cost calibration failed ({exc}); priced policies start from the FLOP prior",
              file=sys.stderr, flush=True)
        return None
    table.gpu = backend.gpu_name()
    if progress:
        check = table.checks.get("static-top2", {})
        print(f"cost calibration: {table.seconds:.2f} s, {table.dispatch} dispatch; static top-2 measured "
              f"{check.get('measured_J', float('nan')):.3g} J, predicted {check.get('predicted_J', float('nan')):.3g} J",
              file=sys.stderr, flush=True)
    return table


# ---------------------------------------------------------------------------- data-parallel replicas

SAMPLE_TOKENS = inspect.signature(forward_chunk).parameters["max_sample_tokens"].default  # one process's budget


def replica_shares(replicas: ReplicaGroup, model, chunks: list[torch.Tensor], cfg: RunConfig) -> list[torch.Tensor]:
    """This replica's contiguous share of every chunk, once every replica is known to run the same
    experiment on the same model and stream (ValueError on every replica otherwise)."""
    replicas.check_same(replica_settings(model, chunks, cfg))
    return [replicas.local_rows(c) for c in chunks]


def replica_settings(model, chunks: list[torch.Tensor], cfg: RunConfig) -> dict:
    """What every replica must agree on: the run's configuration, the chunks, the model's weights."""
    flat = _flatten(asdict(cfg))
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.detach().cpu().contiguous().numpy().tobytes())
    with torch.no_grad():
        weights = sum(float(p.double().sum()) for p in model.parameters())
    return {**flat, "chunk_shapes": [tuple(c.shape) for c in chunks], "stream_sha256": digest.hexdigest(),
            "model_parameters": sum(p.numel() for p in model.parameters()), "model_weight_sum": weights}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def replica_forward(model, run: PolicyRun, batch: torch.Tensor, cfg: RunConfig, check_rows: torch.Tensor | None):
    """(observation, window, static observation or None) of the whole chunk: this replica's share
    (and its `check_rows` of the quality check) runs in its own window, then the replicas combine
    observations and windows (the gate inputs only when a fast-weight router network reads them)."""
    observation, window, static = measured_forward(run.backend, model, batch, run.spec.route_name, cfg.micro_batch_rows,
                                                   run.replicas.sample_tokens(SAMPLE_TOKENS), check_rows, run)
    with_inputs = any(getattr(r, "fast_net", None) is not None for r in run.routers)
    return run.replicas.observation(observation, with_inputs), run.replicas.window(window), static
