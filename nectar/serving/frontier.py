"""The serving frontier: every policy serves the same request trace; NECTAR against the static hull.

Per policy: the serving metrics (`nectar.serving.metrics`: steady-state J per generated token, J
per request, TTFT/TPOT percentiles, prefill and decode energy apart), the teacher-forced perplexity
of the reference continuations under its routing, the agreement of its greedy tokens with the
baseline's (static top-k of the model's trained k), and, from the decode steps' workloads, the
bytes a decode step must read and the achieved fraction of the GPU's memory bandwidth, and how its
decode steps ran (`graphs`: replayed CUDA graphs, `capture_s`, `eager_fallbacks`, and for NECTAR its
shadow checks: `shadow_graph_steps` replayed, `shadow_eager_steps` eager; `nectar.serving.graphs`).

What NECTAR's ride-along quality checks cost inside its totals: per policy `checked_steps`,
`check_energy_J` and `check_time_s` (0 for a policy without checks), each checked step's energy and
duration times the check's share of the step's predicted bytes (`nectar.serving.step_cost`), and
`guard_share` = check_energy_J / decode_J (the report's `nectar_guard_share` for NECTAR).

Savings and perplexity increases are against the baseline on the same trace, and the hull is
`nectar.experiment.frontier.frontier_report`'s over the non-adaptive policies. The energy per token
the frontier compares is the steady-state one (decode steps with a full batch) when every policy
has such steps, else all non-idle energy per generated token (`energy_metric` says which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from nectar.experiment.forward import install
from nectar.experiment.frontier import frontier_report
from nectar.serving.controller import ServingController, ServingControllerConfig
from nectar.serving.engine import ServingEngine
from nectar.serving.graphs import GraphedServingEngine
from nectar.serving.loop import PolicyServing, ServeLimits, serve
from nectar.serving.metrics import summarize
from nectar.serving.policies import is_adaptive, serving_router
from nectar.serving.step_cost import step_bytes
from nectar.serving.traces import TraceConfig, make_trace


DECODE_PATHS = ("eager", "graph", "static")


@dataclass
class ServingConfig:
    trace: TraceConfig
    limits: ServeLimits = field(default_factory=ServeLimits)
    policies: tuple[str, ...] = ("static-top2", "static-top1", "batch-aware:2", "nectar")
    baseline: str = "static-top2"
    quality_bound: float = 0.01
    seed: int = 0
    hbm_GBps: float | None = None            # the GPU's memory bandwidth (GB/s), for hbm_fraction
    controller: ServingControllerConfig = field(default_factory=ServingControllerConfig)
    decode_path: str = "eager"               # "eager", "graph" (CUDA graphs) or "static" (the graphs' step, eagerly)
    graphs_note: str | None = None           # why decode steps are not captured, when graphs were asked for

    def validate(self) -> None:
        self.trace.validate()
        if self.decode_path not in DECODE_PATHS:
            raise ValueError(f"decode_path must be one of {DECODE_PATHS}, got {self.decode_path!r}")
        if self.baseline not in self.policies:
            raise ValueError(f"the baseline {self.baseline!r} must be among the policies")
        if not self.quality_bound > 0:
            raise ValueError(f"quality_bound must be > 0, got {self.quality_bound}")


def routers_for(model, policy: str) -> list:
    return [serving_router(policy, layer, top_k=model_top_k(model, layer)) for _, layer in model.moe_layers()]


def model_top_k(model, layer) -> int:
    """The trained top-k: a transformers family's own, or MoE-DistilGPT2's config `moe_top_k`."""
    return int(getattr(layer, "top_k", None) or model.config.moe_top_k)


def serve_policy(model, backend, policy: str, cfg: ServingConfig, stream: torch.Tensor,
                 progress: Callable[[int], None] | None = None) -> PolicyServing:
    """One policy over the trace: fresh routers, a fresh cache, the controller if it adapts."""
    routers = routers_for(model, policy)
    install(model, routers)
    controller = None
    if is_adaptive(policy):
        controller = ServingController(routers, routers_for(model, cfg.baseline),
                                       replace(cfg.controller, quality_bound=cfg.quality_bound))
    engine = make_engine(model, cfg, policy, shadow_routers=None if controller is None else controller.static)
    return serve(engine, backend, make_trace(cfg.trace), stream, cfg.limits, cfg.seed, controller, progress)


def make_engine(model, cfg: ServingConfig, policy: str, shadow_routers: list | None = None) -> ServingEngine:
    """The eager engine, or the captured one with every (rows, bucket) graph captured now, with the
    policy's routers installed and before any request: outside every telemetry window. With
    `shadow_routers` (the controller's static routers) the shadow checks get their own graph set."""
    if cfg.decode_path == "eager":
        return ServingEngine(model, cfg.limits.batch_max, cfg.limits.max_context_tokens, policy)
    engine = GraphedServingEngine(model, cfg.limits.batch_max, cfg.limits.max_context_tokens, policy,
                                  mode=cfg.decode_path, shadow_routers=shadow_routers,
                                  step_logp=shadow_routers is not None and cfg.controller.check_gap == "kl")
    if cfg.decode_path == "graph":
        engine.capture_all()
    return engine


def hbm_fraction(run: PolicyServing, total_bytes: float, hbm_GBps: float | None) -> float | None:
    """Achieved share of the memory bandwidth over the decode steps: Σ bytes ÷ (Σ time · bandwidth)."""
    decode = [s for s in run.steps if s.phase == "decode"]
    if not hbm_GBps or not decode:
        return None
    seconds = sum(s.t_end_s - s.t_start_s for s in decode)
    return total_bytes / (seconds * hbm_GBps * 1e9)


def agreement(run: PolicyServing, base: PolicyServing) -> float:
    """Share of generated positions where the greedy token equals the baseline's."""
    same = total = 0
    for rid, tokens in base.greedy.items():
        mine = run.greedy.get(rid, [])
        same += sum(a == b for a, b in zip(mine, tokens))
        total += len(tokens)
    return same / total if total else math.nan


def policy_summary(run: PolicyServing, base: PolicyServing, cfg: ServingConfig) -> dict:
    metrics = summarize(run.steps, run.requests, cfg.limits.batch_max)
    energy_J = sum(s.energy_J for s in run.steps if s.phase != "idle")
    total_bytes = sum(step_bytes(w) for w in run.workloads)                 # the decode steps'
    return {**metrics.to_dict(), "adaptive": is_adaptive(run.policy),
            "perplexity": math.exp(run.nll_sum / max(run.nll_tokens, 1)), "nll_tokens": run.nll_tokens,
            "greedy_agreement": agreement(run, base), "energy_J": energy_J,
            "mean_power_W": energy_J / max(sum(s.t_end_s - s.t_start_s for s in run.steps if s.phase != "idle"), 1e-12),
            "max_temp_C": None, "hbm_fraction": hbm_fraction(run, total_bytes, cfg.hbm_GBps),
            "mean_step_bytes": total_bytes / len(run.workloads) if run.workloads else None,
            "controller": run.controller, **graph_fields(run, cfg)}


CHECK_FIELDS = ("checked_steps", "check_energy_J", "check_time_s")   # NECTAR's checks inside its totals (metrics)

GRAPH_FIELDS = ("graphs", "capture_s", "eager_fallbacks", "graph_steps", "shadow_graph_steps", "shadow_eager_steps",
                "graphs_captured", "shadow_graphs_captured", "graphs_note")


def graph_fields(run: PolicyServing, cfg: ServingConfig) -> dict:
    """How the policy's decode steps ran (eager engines: graphs False, nothing captured)."""
    fields = {"graphs": False, "capture_s": 0.0, "eager_fallbacks": 0, "graph_steps": 0, "shadow_graph_steps": 0,
              "shadow_eager_steps": 0, "graphs_captured": 0, "shadow_graphs_captured": 0, **run.graphs}
    return {**{k: fields[k] for k in GRAPH_FIELDS[:-1]}, "graphs_note": cfg.graphs_note}


def serving_report(runs: dict[str, PolicyServing], cfg: ServingConfig, backend_info: dict) -> dict:
    """The frontier JSON of a serving run (the keys of `nectar frontier --json`, plus the trace's)."""
    base = runs[cfg.baseline]
    policies = {name: policy_summary(run, base, cfg) for name, run in runs.items()}
    steady = all(math.isfinite(p["steady_J_per_token"]) for p in policies.values())
    for p in policies.values():
        p["J_per_token"] = p["steady_J_per_token"] if steady else p["J_per_token"]
    summary = {"policies": policies, "max_ppl_increase": cfg.quality_bound,
               "backend": backend_info.get("backend"), "gpu": backend_info.get("gpu")}
    report = frontier_report(summary, [], f"serving-{cfg.trace.name}", baseline=cfg.baseline)
    report.update(trace=cfg.trace.name, batch_max=cfg.limits.batch_max,
                  energy_metric="steady_J_per_token" if steady else "J_per_generated_token")
    for row in report["policies"]:
        row.update({k: policies[row["name"]][k] for k in (
            "tpot_p50_s", "tpot_p99_s", "ttft_p50_s", "ttft_p99_s", "J_per_request", "prefill_J", "decode_J",
            "tokens_per_s", "mean_batch", "greedy_agreement", "hbm_fraction", "mean_step_bytes", "controller",
            *CHECK_FIELDS, *GRAPH_FIELDS)})
    return report
