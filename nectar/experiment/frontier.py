"""The frontier report: NECTAR against every policy that does not adapt, on the same stream.

From a run's per-policy summary and per-chunk records: each policy's J/token saving and
perplexity increase against static-top2 (both fractions), whether it held the workload's operating
limits, the static hull over the non-adaptive policies that held them (`nectar.experiment.hull`),
and NECTAR's margin over that hull at its own perplexity increase. Limits:
- a temperature cap is held when, after the first `settle_s` seconds, no reading is above the cap
  and pauses take at most `max_pause_share` of the time;
- a power budget is held when every `power_window_s` window's mean power is within 1 % of the
  budget in force; `budget_use` is mean power / mean budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nectar.control.schedule import Schedule
from nectar.experiment.hull import HullPoint, StaticHull

NECTAR = "nectar"
BASELINE = "static-top2"


@dataclass
class LimitCheck:
    holds: bool
    max_temp_after_settle_C: float | None = None
    pause_share: float = 0.0
    worst_power_ratio: float | None = None     # max over windows of mean power / budget
    budget_use: float | None = None            # mean power / mean budget


@dataclass
class PolicyPoint:
    name: str
    adaptive: bool
    saved: float          # 1 − J/token ÷ static-top2's
    dppl: float           # perplexity ÷ static-top2's − 1
    J_per_token: float
    perplexity: float
    mean_power_W: float
    max_temp_C: float
    pause_share: float
    guard_share: float    # the quality checks' share of the policy's energy
    limits: LimitCheck


def timeline(records: list[dict]) -> list[tuple[float, float, float]]:
    """(start_s, duration_s, energy_J) of every busy, check and pause interval of one policy, in order
    (time since the policy's first chunk, counting only its own intervals)."""
    out, t = [], 0.0
    for r in records:
        for duration, energy in ((r["t_end_s"] - r["t_start_s"], r["energy_J"]), (r["guard_s"], r["guard_energy_J"]),
                                 (r["pause_s"], r["pause_energy_J"])):
            if duration > 0:
                out.append((t, duration, energy))
                t += duration
    return out


def power_windows(records: list[dict], window_s: float) -> list[tuple[float, float]]:
    """(window start s, mean power W) over consecutive windows of `window_s` of the policy's time."""
    bins: dict[int, list[float]] = {}
    for start, duration, energy in timeline(records):
        # spread an interval's energy uniformly over the windows it overlaps
        t, end = start, start + duration
        while t < end - 1e-12:
            k = int(t // window_s)
            step = min(end, (k + 1) * window_s) - t
            acc = bins.setdefault(k, [0.0, 0.0])
            acc[0] += energy * step / duration
            acc[1] += step
            t += step
    return [(k * window_s, e / d) for k, (e, d) in sorted(bins.items()) if d >= 0.5 * window_s]


def check_limits(records: list[dict], temp_cap_C: float | None, budget: Schedule | None, *, settle_s: float = 20.0,
                 max_pause_share: float = 0.05, power_window_s: float = 10.0, power_tolerance: float = 0.01) -> LimitCheck:
    spans = timeline(records)
    total = sum(d for _, d, _ in spans) or 1.0
    pause = sum(r["pause_s"] for r in records) / total
    check = LimitCheck(True, pause_share=pause)
    if temp_cap_C is not None:
        t, temps = 0.0, []
        for r in records:
            t += r["t_end_s"] - r["t_start_s"] + r["guard_s"] + r["pause_s"]
            if t > settle_s:
                temps.append(r["temp_C"])
        check.max_temp_after_settle_C = max(temps) if temps else None
        check.holds &= bool(temps) and max(temps) <= temp_cap_C and pause <= max_pause_share
    if budget is not None:
        windows = power_windows(records, power_window_s)
        ratios = [w / budget.at(t) for t, w in windows]
        check.worst_power_ratio = max(ratios) if ratios else None
        energy = sum(e for _, _, e in spans)
        mean_budget = sum(budget.at(s) * d for s, d, _ in spans) / total
        check.budget_use = energy / total / mean_budget
        check.holds &= bool(ratios) and max(ratios) <= 1 + power_tolerance
    return check


def policy_points(summary: dict, chunks: list[dict], temp_cap_C: float | None = None,
                  budget: Schedule | None = None, baseline: str = BASELINE) -> list[PolicyPoint]:
    policies = summary["policies"]
    if baseline not in policies:
        raise ValueError(f"the frontier needs {baseline} among the policies (it is the reference)")
    base = policies[baseline]
    points = []
    for name, p in policies.items():
        records = [r for r in chunks if r["policy"] == name]
        points.append(PolicyPoint(
            name=name, adaptive=bool(p.get("adaptive", name.startswith(NECTAR))),
            saved=1.0 - p["J_per_token"] / base["J_per_token"], dppl=p["perplexity"] / base["perplexity"] - 1.0,
            J_per_token=p["J_per_token"], perplexity=p["perplexity"], mean_power_W=p["mean_power_W"],
            max_temp_C=p["max_temp_C"], pause_share=p.get("pause_share", 0.0),
            guard_share=p.get("guard_energy_J", 0.0) / p["energy_J"] if p["energy_J"] else 0.0,
            limits=check_limits(records, temp_cap_C, budget)))
    return points


def frontier_report(summary: dict, chunks: list[dict], workload: str, temp_cap_C: float | None = None,
                    budget: Schedule | None = None, nectar: str = NECTAR, baseline: str = BASELINE) -> dict:
    """The frontier JSON: top-level figures of the issue, then one row per policy (savings and
    perplexity increases against `baseline`: static-top2, or a pretrained model's own top-K)."""
    bound = summary["max_ppl_increase"]
    points = policy_points(summary, chunks, temp_cap_C, budget, baseline)
    static = [p for p in points if not p.adaptive and p.limits.holds]
    hull = StaticHull([HullPoint(p.name, p.dppl, p.saved) for p in static])
    within = [p.saved for p in static if p.dppl <= bound]
    report = {"backend": summary["backend"], "gpu": summary["gpu"], "workload": workload, "quality_bound": bound,
              "baseline": baseline,
              "temp_cap_C": temp_cap_C, "power_budget_W": None if budget is None else budget.describe(),
              "best_fixed_saved_within_bound": max(within) if within else None,
              "static_policies_holding_limits": [p.name for p in static]}
    chosen = next((p for p in points if p.name == nectar), None)
    if chosen is not None:
        at = hull.saved_at(chosen.dppl)
        report.update(
            nectar_saved=chosen.saved, nectar_dppl=chosen.dppl,
            hull_saved_at_nectar_dppl=at if math.isfinite(at) else None,
            nectar_margin_over_hull=chosen.saved - at if math.isfinite(at) else None,
            hull_mixture_at_nectar=[{"policy": n, "share": w} for n, w in hull.mixture_at(chosen.dppl)],
            nectar_budget_use=chosen.dppl / bound, nectar_holds_limits=chosen.limits.holds,
            nectar_guard_share=chosen.guard_share)
    report["policies"] = [{**asdict(p), "limits": asdict(p.limits)} for p in points]
    report["hull"] = [{"dppl": d, "saved": s} for d, s in hull.envelope(100) if math.isfinite(s)]
    return report
