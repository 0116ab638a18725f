"""The main experiment: routing policies on one token stream against a telemetry backend.

Every policy sees the same held-out token stream, chunk by chunk. With the simulator each policy
runs on its own simulated GPU that starts in the same state (seeded, isolated: temperature history
cannot favour one policy); on a real GPU the policies share the device and are interleaved in
time (A B C D, then B C D A, …) so that temperature drift spreads over all of them.
The `nectar` policy's controller takes one step after each of its chunks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.experiment.policies import DEFAULT_POLICIES, check_policies, make_router
from nectar.control.quality_guard import GuardConfig, QualityGuard
from nectar.telemetry.window import TelemetryBackend, TelemetryWindow
from nectar.telemetry.trace import TraceRow
from nectar.telemetry.workload import ChunkWorkload, merge_workloads
from sim.price_as import TARGETS, rescale


@dataclass
class RunConfig:
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    tokens: int = 65536                 # stream tokens per policy
    chunk_tokens: int = 4096            # tokens per chunk (one controller step per chunk)
    seq_len: int = 256
    seed: int = 0
    guard_tokens: int = 8192            # held-out guard set (scored once under static routing)
    guard_check_tokens: int = 1024      # guard tokens scored after each nectar chunk, in rotation
    price_as: str | None = "distilgpt2"  # simulator only: price routing at this shape
    price_batch: int = 128              # simulator only: sequences per priced chunk (≈0.25 s on an H100)
    micro_batch_rows: int | None = None  # forward a chunk in micro-batches of this many sequences
    fast_router: bool = False           # NECTAR's router gets a fast-weight network beside its bias
    interleave: bool = False            # share one backend and interleave policies in time
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
        if self.price_as is not None and self.price_as not in TARGETS:
            raise ValueError(f"unknown price-as target {self.price_as!r}; choose one of {sorted(TARGETS)} or none")
        if self.guard_check_tokens < self.seq_len or self.guard_tokens < self.guard_check_tokens:
            raise ValueError(f"need seq_len ({self.seq_len}) <= guard_check_tokens ({self.guard_check_tokens}) "
                             f"<= guard_tokens ({self.guard_tokens})")


@dataclass
class ChunkRecord:
    """One row of the per-chunk log."""

    policy: str
    chunk: int
    t_start_s: float
    t_end_s: float
    tokens: int
    energy_J: float
    mean_power_W: float
    peak_power_W: float
    temp_C: float
    sm_clock_MHz: float | None
    nll_sum: float
    nll_tokens: int
    routing_agreement: float
    guard_energy_J: float = 0.0
    pause_s: float = 0.0
    pause_energy_J: float = 0.0
    fallback: bool = False
    alpha: float = 1.0
    lam_eff: float | None = None
    guard_excess: float | None = None
    cost_residual: float | None = None
    skipped: str = ""
    expert_counts: list[list[int]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    energy_mJ_start: float | None = None
    energy_mJ_end: float | None = None


@dataclass
class PolicyRun:
    name: str
    routers: list
    backend: Any
    controller: NectarController | None = None
    records: list[ChunkRecord] = field(default_factory=list)
    trace: list[TraceRow] = field(default_factory=list)   # every telemetry window, in order
    setup_energy_J: float = 0.0         # one-time cost (the guard's static reference), in the totals


# ----------------------------------------------------------------------------------- forward


def install(model, routers) -> None:
    for (_, layer), router in zip(model.moe_layers(), routers):
        layer.router = router.to(layer.gate.weight.device)


def forward_chunk(model, batch: torch.Tensor, micro_rows: int | None = None, policy: str = "",
                  max_controller_tokens: int = 65536) -> dict:
    """Run one chunk [B, T] in micro-batches of `micro_rows` sequences (a long chunk window need
    not fit in memory at once). Returns the next-token NLL (sum), the routing agreement with static
    top-2, each MoE layer's gate logits (the first `max_controller_tokens` tokens, for the
    controller) and the chunk's merged workload."""
    parts = batch.split(micro_rows or batch.shape[0])
    nll = torch.zeros((), device=batch.device)
    agreement, workloads = 0.0, []
    layer_logits: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for part in parts:
            logits = model(input_ids=part, use_cache=False).logits                 # [b, T, V]
            nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), part[:, 1:].reshape(-1), reduction="sum")
            decisions = [layer.last_decision for _, layer in model.moe_layers()]
            agreement += part.numel() * sum(static_agreement(d) for d in decisions) / max(len(decisions), 1)
            if sum(x.shape[0] for x in (layer_logits[0] if layer_logits else [])) < max_controller_tokens:
                for i, d in enumerate(decisions):
                    if len(layer_logits) <= i:
                        layer_logits.append([])
                    layer_logits[i].append(d.logits.detach())
            workloads.append(model.chunk_workload(part.shape[0], part.shape[1], policy=policy))
    return {
        "nll_sum": float(nll),
        "nll_tokens": batch[:, 1:].numel(),
        "agreement": agreement / batch.numel(),
        "logits": [torch.cat(chunks)[:max_controller_tokens] for chunks in layer_logits],    # [N, E] per layer
        "workload": merge_workloads(workloads, policy),
    }


def window_energy(window: TelemetryWindow) -> float:
    """The window's energy for accounting: the best estimate (integrated power for sub-second
    windows, the counter otherwise), else mean power × duration, else NaN (left out of totals)."""
    for value in (window.energy_estimate_J, window.mean_power_W * window.duration_s):
        if math.isfinite(value) and value >= 0:
            return value
    return float("nan")


def static_agreement(decision, k: int = 2) -> float:
    """Fraction of the static top-k (token, expert) selections that `decision` also computes."""
    static = decision.logits.topk(min(k, decision.num_experts), dim=-1).indices  # [N, k]
    active = decision.active                                                    # [N, K]
    same = (decision.experts.unsqueeze(-1) == static.unsqueeze(-2)) & active.unsqueeze(-1)  # [N, K, k]
    return float(same.any(dim=1).float().mean())


def _priced(workload: ChunkWorkload, rows: int, backend, cfg: RunConfig) -> ChunkWorkload:
    """On the simulator with `price_as`, the workload rescaled to the target shape: a stream chunk
    is priced as `price_batch` sequences, a guard batch as its own number of sequences (at the
    target sequence length). Otherwise the workload as it ran."""
    if not cfg.price_as or getattr(backend, "name", "") != "sim":
        return workload
    is_guard = workload.policy.startswith("guard")
    return rescale(workload, replace(TARGETS[cfg.price_as], batch=rows if is_guard else cfg.price_batch))


def measure(backend: TelemetryBackend, model, batch, policy: str, cfg: RunConfig) -> tuple[dict, ChunkWorkload, TelemetryWindow]:
    """Forward pass + its telemetry window. The simulator prices the workload afterwards; a
    measuring backend (NVML) runs the forward inside its window."""
    run = lambda: forward_chunk(model, batch, cfg.micro_batch_rows, policy)  # noqa: E731
    if getattr(backend, "name", "") == "sim":
        result = run()
        workload = _priced(result["workload"], batch.shape[0], backend, cfg)
        return result, workload, backend.run_chunk(workload)
    box: dict = {}
    window = backend.run_chunk(None, lambda: box.setdefault("result", run()))
    return box["result"], box["result"]["workload"], window


# ----------------------------------------------------------------------------------- policies


@dataclass
class GuardSet:
    """Held-out guard batches [check_rows, T] and their NLL under static routing."""

    batches: list[torch.Tensor]
    static_nll: list[float]
    checks: int = 0

    def next(self) -> tuple[torch.Tensor, float]:
        i = self.checks % len(self.batches)
        self.checks += 1
        return self.batches[i], self.static_nll[i]


def _guard_scorer(model, guard: GuardSet, run: "PolicyRun", index: int, cfg: RunConfig, spent: dict):
    def score() -> tuple[float, float]:
        batch, static_nll = guard.next()
        result, workload, window = measure(run.backend, model, batch, "guard", cfg)
        run.trace.append(TraceRow(window, workload, kind="chunk", policy=f"{run.name}:guard", chunk_index=index))
        spent["energy_J"] += window_energy(window)
        return result["nll_sum"] / result["nll_tokens"], static_nll
    return score


def build_policy(name: str, model, backend, cfg: RunConfig, guard: GuardSet, flops, setup_J: float) -> PolicyRun:
    routers = [make_router(name, layer, fast_router=cfg.fast_router) for _, layer in model.moe_layers()]
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
    result, workload, window = measure(run.backend, model, batch, run.name, cfg)
    record = ChunkRecord(
        policy=run.name, chunk=index, t_start_s=window.t_start_s, t_end_s=window.t_end_s,
        tokens=workload.tokens, energy_J=window_energy(window), mean_power_W=window.mean_power_W,
        peak_power_W=window.peak_power_W, temp_C=window.gpu_temp_C, sm_clock_MHz=window.sm_clock_MHz,
        nll_sum=result["nll_sum"], nll_tokens=result["nll_tokens"], routing_agreement=result["agreement"],
        expert_counts=workload.expert_counts(), flags=list(window.flags),
        energy_mJ_start=window.energy_mJ_start, energy_mJ_end=window.energy_mJ_end)
    run.trace.append(TraceRow(window, workload, kind="chunk", policy=run.name, chunk_index=index))
    if run.controller is not None:
        record.fallback = run.controller.guard.fallback
        spent = {"energy_J": 0.0}
        scorer = _guard_scorer(model, guard, run, index, cfg, spent)
        control = run.controller.after_chunk(workload, window, result["logits"], scorer)
        record.alpha, record.lam_eff = control.alpha, control.lam_eff
        record.guard_excess, record.cost_residual = control.guard_excess, control.cost_residual
        record.skipped, record.guard_energy_J = control.skipped, spent["energy_J"]
        if control.pause_s > 0:
            pause = run.backend.idle(control.pause_s)
            run.trace.append(TraceRow(pause, None, kind="idle", policy=run.name, chunk_index=index))
            record.pause_s, record.pause_energy_J = pause.duration_s, window_energy(pause)
    return record


# ----------------------------------------------------------------------------------- the run


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


def static_guard_set(model, guard: torch.Tensor, backend, cfg: RunConfig) -> tuple[GuardSet, list[list[float]], float]:
    """Score every guard batch under static top-2 routing. Returns the guard set, the per-layer
    per-expert FLOPs (the cost model's prior) and the energy this one-time reference cost."""
    install(model, [make_router("static-top2", layer) for _, layer in model.moe_layers()])
    rows = cfg.guard_check_tokens // cfg.seq_len
    n_batches = cfg.guard_tokens // cfg.guard_check_tokens
    if guard.numel() < n_batches * rows * cfg.seq_len:
        raise ValueError(f"the guard stream has {guard.numel()} tokens, fewer than guard_tokens={cfg.guard_tokens}")
    batches = list(guard[: n_batches * rows * cfg.seq_len].view(n_batches, rows, cfg.seq_len))
    nlls, energy, flops = [], 0.0, []
    for batch in batches:
        result, workload, window = measure(backend, model, batch, "guard-static", cfg)
        nlls.append(result["nll_sum"] / result["nll_tokens"])
        energy += window_energy(window)
        flops = [[c.flops for c in layer.expert_costs] for layer in workload.layers]
    return GuardSet(batches, nlls), flops, energy


def run_experiment(model, stream: torch.Tensor, guard: torch.Tensor, backend_factory: Callable[[], Any],
                   cfg: RunConfig, progress: bool = True) -> list[PolicyRun]:
    """Run every policy over the same chunks; returns the per-policy runs with their records."""
    model.eval()
    device = next(model.parameters()).device
    chunks = chunks_of(stream.to(device), cfg)
    shared = backend_factory() if cfg.interleave else None
    reference_backend = shared or backend_factory()
    guard_set, flops, setup_J = static_guard_set(model, guard.to(device), reference_backend, cfg)
    runs = [build_policy(n, model, shared or backend_factory(), cfg, guard_set, flops, setup_J) for n in cfg.policies]
    schedule = [(i, (i + j) % len(runs) if cfg.interleave else j) for i in range(len(chunks)) for j in range(len(runs))]
    if not cfg.interleave:
        schedule.sort(key=lambda item: item[1])
    for i, j in tqdm(schedule, desc="chunks", disable=not progress):
        runs[j].records.append(run_chunk(model, runs[j], chunks[i], i, cfg, guard_set))
    return runs


def summarise(runs: list[PolicyRun]) -> dict[str, dict]:
    """Per-policy totals in the schema of `nectar run --json`."""
    out = {}
    for run in runs:
        r = run.records
        valid = [x for x in r if math.isfinite(x.energy_J + x.guard_energy_J + x.pause_energy_J)]
        energy = run.setup_energy_J + sum(x.energy_J + x.guard_energy_J + x.pause_energy_J for x in valid)
        duration = sum((x.t_end_s - x.t_start_s) + x.pause_s for x in valid)
        tokens = sum(x.tokens for x in valid)
        nll = sum(x.nll_sum for x in r) / max(sum(x.nll_tokens for x in r), 1)
        out[run.name] = {
            "tokens": tokens,
            "energy_J": energy,
            "duration_s": duration,
            "J_per_token": energy / tokens if tokens else float("nan"),
            "mean_power_W": energy / duration if duration > 0 else float("nan"),
            "max_temp_C": max(x.temp_C for x in r),
            "perplexity": math.exp(nll),
            "routing_agreement": sum(x.routing_agreement for x in r) / len(r),
            "fallback_chunks": sum(x.fallback for x in r),
            "guard_energy_J": run.setup_energy_J + sum(x.guard_energy_J for x in r),
            "pause_s": sum(x.pause_s for x in r),
            "invalid_energy_chunks": len(r) - len(valid),
        }
        if run.controller is not None:
            out[run.name]["cost_model_residual"] = run.controller.cost_model.fit_residual()
    return out


def record_rows(runs: list[PolicyRun]) -> list[dict]:
    rows = []
    for run in runs:
        for rec in run.records:
            rows.append(asdict(rec))
    return rows


def build_summary(runs: list[PolicyRun], cfg: RunConfig, backend: str, **extra) -> dict:
    """The run's summary in the schema of `nectar run --json` (plus the run's settings)."""
    return {"backend": backend, "seed": cfg.seed, "gpu": runs[0].backend.gpu_name(),
            "priced_as": cfg.price_as, "price_batch": cfg.price_batch if cfg.price_as else None,
            "chunk_tokens": cfg.chunk_tokens, "seq_len": cfg.seq_len, "lambda": cfg.controller.lam,
            "temp_cap_C": cfg.controller.temp_cap_C, "power_budget_W": cfg.controller.power_budget_W,
            "max_ppl_increase": cfg.guard.max_ppl_increase, **extra, "policies": summarise(runs)}
