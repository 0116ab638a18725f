"""The main experiment: routing policies on one token stream against a telemetry backend.

Every policy sees the same held-out token stream, chunk by chunk. With one backend per policy
(the simulator) each policy runs on its own simulated GPU that starts in the same state (seeded,
isolated: temperature history cannot favour one policy); with one shared backend (a real GPU) the
policies are interleaved in time (A B C D, then B C D A, …) so that temperature drift spreads over
all of them. The `nectar` policy's controller takes one step after each of its chunks.

One chunk: the backend runs the chunk's forward inside its telemetry window (`run_chunk(compute)`),
the forward returns a `ChunkObservation`, and the controller gets both as arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.quality_guard import GuardConfig, QualityGuard
from nectar.experiment.forward import install
from nectar.experiment.guard_set import GuardSet, guard_check, measured_forward, static_guard_set
from nectar.experiment.policies import DEFAULT_POLICIES, check_policies, policy_router
from nectar.experiment.summary import ChunkRecord
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.trace import TraceRow


@dataclass
class RunConfig:
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    tokens: int = 65536                 # stream tokens per policy
    chunk_tokens: int = 4096            # tokens per chunk (one controller step per chunk)
    seq_len: int = 256
    seed: int = 0
    guard_tokens: int = 8192            # held-out guard set (scored once under static routing)
    guard_check_tokens: int = 1024      # guard tokens scored after each nectar chunk, in rotation
    micro_batch_rows: int | None = None  # forward a chunk in micro-batches of this many sequences
    fast_router: bool = False           # NECTAR's router gets a fast-weight network beside its bias
    interleave: bool | None = None      # share one backend and interleave policies in time (None: unless
                                        # the backend gives each policy its own isolated device)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self):
        check_policies(self.policies)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.chunk_tokens < self.seq_len or self.chunk_tokens % self.seq_len:
            raise ValueError(f"chunk_tokens ({self.chunk_tokens}) must be a positive multiple of seq_len ({self.seq_len})")
        if self.tokens < self.chunk_tokens:
            raise ValueError(f"tokens ({self.tokens}) must be at least one chunk ({self.chunk_tokens})")
        if self.guard_check_tokens < self.seq_len or self.guard_tokens < self.guard_check_tokens:
            raise ValueError(f"need seq_len ({self.seq_len}) <= guard_check_tokens ({self.guard_check_tokens}) "
                             f"<= guard_tokens ({self.guard_tokens})")


@dataclass
class PolicyRun:
    name: str
    routers: list
    backend: Any
    controller: NectarController | None = None
    records: list[ChunkRecord] = field(default_factory=list)
    trace: list[TraceRow] = field(default_factory=list)   # every telemetry window, in order
    setup_energy_J: float = 0.0         # one-time cost (the guard's static reference), in the totals

    def log(self, window, kind: str, chunk_index: int, suffix: str = "") -> None:
        self.trace.append(TraceRow(window, window.workload, kind=kind, policy=self.name + suffix,
                                   chunk_index=chunk_index))


def build_policy(name: str, model, backend, cfg: RunConfig, guard: GuardSet, flops, setup_J: float) -> PolicyRun:
    routers = [policy_router(name, layer, fast_router=cfg.fast_router) for _, layer in model.moe_layers()]
    run = PolicyRun(name, routers, backend)
    if name == "nectar":
        run.setup_energy_J = setup_J
        static_guard_nll = sum(guard.static_nll) / len(guard.static_nll)
        moe_blocks = [idx for idx, _ in model.moe_layers()]
        run.controller = NectarController(
            [r for r in routers if isinstance(r, EnergyAwareRouter)],
            OnlineCostModel(flops), QualityGuard(static_guard_nll, cfg.guard), cfg.controller,
            cost_layers=moe_blocks)
    return run


def run_chunk(model, run: PolicyRun, batch, index: int, cfg: RunConfig, guard: GuardSet) -> ChunkRecord:
    install(model, run.routers)
    observation, window = measured_forward(run.backend, model, batch, run.name, cfg.micro_batch_rows)
    workload = window.workload
    record = ChunkRecord(
        policy=run.name, chunk=index, t_start_s=window.t_start_s, t_end_s=window.t_end_s,
        tokens=workload.tokens, energy_J=window_energy_J(window), mean_power_W=window.mean_power_W,
        peak_power_W=window.peak_power_W, temp_C=window.gpu_temp_C, sm_clock_MHz=window.sm_clock_MHz,
        nll_sum=observation.nll_sum, nll_tokens=observation.nll_tokens, routing_agreement=observation.agreement,
        expert_counts=workload.expert_counts(), flags=list(window.flags),
        energy_mJ_start=window.energy_mJ_start, energy_mJ_end=window.energy_mJ_end)
    run.log(window, "chunk", index)
    if run.controller is not None:
        record.fallback = run.controller.guard.fallback
        check = guard_check(model, guard, run.backend, lambda w: run.log(w, "chunk", index, ":guard"))
        control = run.controller.after_chunk(observation, window, check)
        record.alpha, record.lam_eff = control.alpha, control.lam_eff
        record.guard_excess, record.cost_residual = control.guard_excess, control.cost_residual
        record.skipped, record.guard_energy_J = control.skipped, control.guard_energy_J
        if control.pause_s > 0:
            pause = run.backend.idle(control.pause_s)
            run.log(pause, "idle", index)
            record.pause_s, record.pause_energy_J = pause.duration_s, window_energy_J(pause)
    return record


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


def run_experiment(model, stream: torch.Tensor, guard: torch.Tensor, backend_factory: Callable[[], Any],
                   cfg: RunConfig, progress: bool = True) -> list[PolicyRun]:
    """Run every policy over the same chunks; returns the per-policy runs with their records."""
    model.eval()
    device = next(model.parameters()).device
    chunks = chunks_of(stream.to(device), cfg)
    reference_backend = backend_factory()
    interleave = cfg.interleave if cfg.interleave is not None else not reference_backend.isolated
    shared = reference_backend if interleave else None
    guard_set, flops, setup_J = static_guard_set(model, guard.to(device), reference_backend,
                                                 cfg.guard_check_tokens, cfg.guard_tokens, cfg.seq_len)
    runs = [build_policy(n, model, shared or backend_factory(), cfg, guard_set, flops, setup_J) for n in cfg.policies]
    schedule = [(i, (i + j) % len(runs) if interleave else j) for i in range(len(chunks)) for j in range(len(runs))]
    if not interleave:
        schedule.sort(key=lambda item: item[1])
    for i, j in tqdm(schedule, desc="chunks", disable=not progress):
        runs[j].records.append(run_chunk(model, runs[j], chunks[i], i, cfg, guard_set))
    return runs
