"""One row of a run's per-chunk log: the `ChunkRecord` every policy writes for every chunk (the runner
fills it, the summary adds the rows up, chunks.csv holds them)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    guard_energy_J: float = 0.0        # the quality check's energy and time, charged to the policy
    guard_s: float = 0.0
    pause_s: float = 0.0
    pause_energy_J: float = 0.0
    fallback: bool = False
    alpha: float = 1.0
    lam: float | None = None           # the controller's λ for the next chunk
    price: float | None = None
    kappa: float | None = None
    delta_nll: float | None = None     # paired shadow check: NLL increase per token
    deviation: float | None = None
    budget_W: float | None = None
    nu_temp: float | None = None
    nu_power: float | None = None
    cost_residual: float | None = None
    skipped: str = ""
    expert_counts: list[list[int]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    energy_mJ_start: float | None = None
    energy_mJ_end: float | None = None
