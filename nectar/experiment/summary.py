"""A run's records and totals: one `ChunkRecord` per policy chunk, the per-policy summary.

Totals are in the schema of `nectar run --json`: energy includes the one-time guard reference,
every quality check and every pause; J/token divides by the tokens the backend accounted (the
simulator's priced tokens when it prices at another shape).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from nectar.experiment.runner import PolicyRun, RunConfig


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


def summarise(runs: list["PolicyRun"]) -> dict[str, dict]:
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


def record_rows(runs: list["PolicyRun"]) -> list[dict]:
    rows = []
    for run in runs:
        for rec in run.records:
            rows.append(asdict(rec))
    return rows


def build_summary(runs: list["PolicyRun"], cfg: "RunConfig", backend: str, **extra) -> dict:
    """The run's summary in the schema of `nectar run --json` (plus the run's settings)."""
    return {"backend": backend, "seed": cfg.seed, **runs[0].backend.info(),
            "chunk_tokens": cfg.chunk_tokens, "seq_len": cfg.seq_len, "lambda": cfg.controller.lam,
            "temp_cap_C": cfg.controller.temp_cap_C, "power_budget_W": cfg.controller.power_budget_W,
            "max_ppl_increase": cfg.guard.max_ppl_increase, **extra, "policies": summarise(runs)}
