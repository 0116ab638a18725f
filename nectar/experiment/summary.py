"""A run's totals: the per-policy summary of its chunk records (`nectar.experiment.records`).

Totals are in the schema of `nectar run --json`: energy includes the one-time guard reference,
every quality check and every pause; J/token divides by the tokens the backend accounted (the
simulator's priced tokens when it prices at another shape).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from nectar.experiment.runner import PolicyRun, RunConfig


def summarise(runs: list["PolicyRun"]) -> dict[str, dict]:
    """Per-policy totals in the schema of `nectar run --json`."""
    out = {}
    for run in runs:
        out[run.name] = summarise_records([asdict(x) for x in run.records], run.spec.adaptive)
        cost_model = getattr(run.controller, "cost_model", None)
        if cost_model is not None:
            out[run.name]["cost_model_residual"] = cost_model.fit_residual()
    return out


def summarise_records(r: list[dict], adaptive: bool) -> dict:
    """Totals of one policy's chunk records (dicts): energy includes every quality check and pause;
    duration the busy, check and pause time; mean power = energy / duration."""
    valid = [x for x in r if math.isfinite(x["energy_J"] + x["guard_energy_J"] + x["pause_energy_J"])]
    energy = sum(x["energy_J"] + x["guard_energy_J"] + x["pause_energy_J"] for x in valid)
    duration = sum((x["t_end_s"] - x["t_start_s"]) + x["guard_s"] + x["pause_s"] for x in valid)
    tokens = sum(x["tokens"] for x in valid)
    nll = sum(x["nll_sum"] for x in r) / max(sum(x["nll_tokens"] for x in r), 1)
    return {
        "tokens": tokens,
        "energy_J": energy,
        "duration_s": duration,
        "J_per_token": energy / tokens if tokens else float("nan"),
        "mean_power_W": energy / duration if duration > 0 else float("nan"),
        "max_temp_C": max(x["temp_C"] for x in r),
        "perplexity": math.exp(nll),
        "routing_agreement": sum(x["routing_agreement"] for x in r) / len(r),
        "fallback_chunks": sum(bool(x["fallback"]) for x in r),
        "guard_energy_J": sum(x["guard_energy_J"] for x in r),
        "guard_s": sum(x["guard_s"] for x in r),
        "pause_s": sum(x["pause_s"] for x in r),
        "pause_share": sum(x["pause_s"] for x in r) / duration if duration > 0 else 0.0,
        "invalid_energy_chunks": len(r) - len(valid),
        "adaptive": adaptive,
    }


def record_rows(runs: list["PolicyRun"]) -> list[dict]:
    rows = []
    for run in runs:
        for rec in run.records:
            rows.append(asdict(rec))
    return rows


def start_price(runs: list["PolicyRun"], given: float | None) -> float | None:
    """The start price NECTAR's controller used (the given one, or its router family's)."""
    for run in runs:
        if run.spec.is_nectar:
            return run.controller.config.guard.price_init
    return given


def build_summary(runs: list["PolicyRun"], cfg: "RunConfig", backend: str, **extra) -> dict:
    """The run's summary in the schema of `nectar run --json` (plus the run's settings and, at its end,
    the fused router's status: the kernel variants that failed and left their routers on the torch path)."""
    from nectar.moe import fused_router

    limits, guard = cfg.controller.limits, cfg.controller.guard
    budget = None if limits.power_budget is None else limits.power_budget.describe()
    return {"backend": backend, "seed": cfg.seed, **runs[0].backend.info(),
            "chunk_tokens": cfg.chunk_tokens, "seq_len": cfg.seq_len, "price_init": start_price(runs, guard.price_init),
            "temp_cap_C": limits.temp_cap_C, "power_budget_W": budget,
            "max_ppl_increase": guard.max_ppl_increase, "calibration": calibration_summary(runs),
            "fused_router": fused_router.status(), **extra,
            "policies": summarise(runs)}


def calibration_summary(runs: list["PolicyRun"]) -> dict | None:
    """What the run's cost calibration cost and how well its table predicted its check routing."""
    table = getattr(runs[0], "cost_table", None)
    if table is None:
        return None
    return {"seconds": table.seconds, "energy_J": table.energy_J, "dispatch": table.dispatch,
            "relative_costs": table.relative_costs().tolist(), "checks": table.checks}
