"""What a serving run reports: per-step records in, serving figures out.

The loop writes one `StepRecord` per backend step (a prefill chunk, a decode step, or idle time
waiting for the next arrival) with its energy from the backend's telemetry window; `summarize` turns
those and the scheduler's `RequestRecord`s into `ServingMetrics`:
- steady_J_per_token: decode energy / generated tokens over the decode steps whose batch is at least
  full_fraction * batch_max — the steady-state window of the ML.ENERGY benchmark, where the batch is
  full. NaN, with the flag "no_steady_window", when no step qualifies.
- J_per_token: all non-idle energy / all generated tokens.
- J_per_request: mean over the requests of the energy attributed to each (`attribute_energy`): a
  step's energy is split equally over the tokens it computed — a prefill chunk's all to its request,
  a decode step's one share per row. Idle energy is attributed to nobody.
- prefill_J, decode_J, idle_J: energy by phase.
- ttft_p50_s / ttft_p99_s: t_first_token - arrival over requests that got a first token.
- tpot_p50_s / tpot_p99_s: per finished request with >= 2 output tokens, (t_done - t_first) /
  (output_tokens - 1).
- tokens_per_s: generated tokens / (last step's t_end - first step's t_start), idle included.
- mean_batch: mean decode batch over decode steps (each step counts once).
- checked_steps: decode steps that carried NECTAR's ride-along quality check (0 for a policy
  without checks); check_energy_J / check_time_s: the checks' part of those steps, each step's
  energy and duration times its `check_share` (the check's share of the step's predicted bytes,
  `nectar.serving.step_cost.check_share`); they are inside decode_J and the decode time, not on top.
- guard_share: check_energy_J / decode_J, the checks' share of the decode energy (0 without checks).
Percentiles use numpy's default (linear) method; a percentile over no requests is NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from nectar.serving.scheduler import RequestRecord

PHASES = ("prefill", "decode", "idle")
NO_STEADY = "no_steady_window"


@dataclass
class StepRecord:
    """One backend step on its clock (s) with its energy (J).

    batch: decode rows (0 for prefill and idle); tokens: tokens computed (chunk length, or the decode
    batch); generated: tokens generated (the batch for decode, 1 for a last prefill chunk, else 0);
    request_ids: the prefilled request, or the decode rows in slot order, or [] when idle;
    check_share: the share of the step's window that was a ride-along quality check's forward (a
    decode step's, `nectar.serving.step_cost.check_share`; 0 for a step without one)."""

    phase: str
    t_start_s: float
    t_end_s: float
    energy_J: float
    batch: int = 0
    tokens: int = 0
    generated: int = 0
    request_ids: list[int] = field(default_factory=list)
    check_share: float = 0.0

    @property
    def check_energy_J(self) -> float:
        """The check's part of the step's energy (the step's energy as it stands: after the run's
        steps are scaled to the energy counter, `nectar.serving.loop`)."""
        return self.check_share * self.energy_J

    @property
    def check_s(self) -> float:
        """The check's part of the step's duration."""
        return self.check_share * (self.t_end_s - self.t_start_s)

    def validate(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"step phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if not (self.t_end_s >= self.t_start_s and math.isfinite(self.energy_J) and self.energy_J >= 0):
            raise ValueError(f"step needs t_end_s >= t_start_s and finite energy_J >= 0, got {self}")
        if self.phase == "decode" and not self.batch == self.tokens == self.generated == len(self.request_ids) >= 1:
            raise ValueError(f"a decode step needs batch == tokens == generated == len(request_ids) >= 1, got {self}")
        if self.phase == "prefill" and (len(self.request_ids) != 1 or self.batch != 0 or self.generated not in (0, 1)):
            raise ValueError(f"a prefill step needs one request id, batch 0 and generated 0 or 1, got {self}")
        if self.phase == "idle" and (self.request_ids or self.tokens or self.generated or self.batch):
            raise ValueError(f"an idle step computes nothing, got {self}")
        if not 0.0 <= self.check_share < 1.0 or (self.check_share and self.phase != "decode"):
            raise ValueError(f"check_share must be in [0, 1), and 0 except on a decode step, got {self}")


@dataclass
class ServingMetrics:
    """The serving figures of one run (see the module docstring for each definition)."""

    steady_J_per_token: float
    J_per_token: float
    J_per_request: float
    prefill_J: float
    decode_J: float
    idle_J: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    tokens_per_s: float
    mean_batch: float
    steady_steps: int
    generated_tokens: int
    n_requests: int
    batch_max: int
    full_fraction: float
    checked_steps: int = 0
    check_energy_J: float = 0.0
    check_time_s: float = 0.0
    guard_share: float = 0.0
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def attribute_energy(steps: Sequence[StepRecord]) -> dict[int, float]:
    """{request id: J}: each non-idle step's energy split equally over its request_ids (a prefill
    chunk's tokens all belong to its one request; a decode step computes one token per row)."""
    out: dict[int, float] = {}
    for step in steps:
        for rid in step.request_ids:
            out[rid] = out.get(rid, 0.0) + step.energy_J / len(step.request_ids)
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(np.asarray(values, dtype=float), [50, 99])
    return float(p50), float(p99)


def _energy(steps: Sequence[StepRecord], phase: str) -> float:
    return float(sum(s.energy_J for s in steps if s.phase == phase))


def ttfts_s(requests: Sequence[RequestRecord]) -> list[float]:
    return [r.t_first_token_s - r.arrival_s for r in requests if r.t_first_token_s is not None]


def tpots_s(requests: Sequence[RequestRecord]) -> list[float]:
    return [(r.t_done_s - r.t_first_token_s) / (r.output_tokens - 1) for r in requests
            if r.output_tokens > 1 and r.t_done_s is not None and r.t_first_token_s is not None]


def summarize(steps: Sequence[StepRecord], requests: Sequence[RequestRecord], batch_max: int,
              full_fraction: float = 0.9) -> ServingMetrics:
    """The run's ServingMetrics from its steps and request records."""
    if batch_max < 1 or not 0 < full_fraction <= 1:
        raise ValueError(f"need batch_max >= 1 and 0 < full_fraction <= 1, got {batch_max}, {full_fraction}")
    for step in steps:
        step.validate()
    decode = [s for s in steps if s.phase == "decode"]
    steady = [s for s in decode if s.batch >= full_fraction * batch_max]
    generated = sum(s.generated for s in steps)
    busy_J = _energy(steps, "prefill") + _energy(steps, "decode")
    shares = attribute_energy(steps)
    span_s = max((s.t_end_s for s in steps), default=0.0) - min((s.t_start_s for s in steps), default=0.0)
    ttft, tpot = _percentiles(ttfts_s(requests)), _percentiles(tpots_s(requests))
    checked = [s for s in decode if s.check_share > 0]
    check_J = float(sum(s.check_energy_J for s in checked))
    return ServingMetrics(
        steady_J_per_token=_ratio(sum(s.energy_J for s in steady), sum(s.generated for s in steady)),
        J_per_token=_ratio(busy_J, generated),
        J_per_request=float(np.mean([shares.get(r.request_id, 0.0) for r in requests])) if requests else math.nan,
        prefill_J=_energy(steps, "prefill"), decode_J=_energy(steps, "decode"), idle_J=_energy(steps, "idle"),
        ttft_p50_s=ttft[0], ttft_p99_s=ttft[1], tpot_p50_s=tpot[0], tpot_p99_s=tpot[1],
        tokens_per_s=_ratio(generated, span_s),
        mean_batch=float(np.mean([s.batch for s in decode])) if decode else math.nan,
        steady_steps=len(steady), generated_tokens=int(generated), n_requests=len(requests),
        batch_max=batch_max, full_fraction=full_fraction, checked_steps=len(checked), check_energy_J=check_J,
        check_time_s=float(sum(s.check_s for s in checked)),
        guard_share=check_J / _energy(steps, "decode") if _energy(steps, "decode") > 0 else 0.0,
        flags=[] if steady else [NO_STEADY])
