"""The frontier report: NECTAR against every policy that does not adapt, on the same stream.

From a run's per-policy summary and per-chunk records: each policy's J/token saving and
perplexity increase against static-top2 (both fractions), whether it held the workload's operating
limits, the static hull over the non-adaptive policies that held them (`nectar.experiment.hull`),
and NECTAR's margin over that hull at its own perplexity increase. With clock-locked policies
(`nectar.experiment.clocks`: simulator figures) the hull covers them too, and a `clocks` section
says which clock saves most (`best_clock`) and what NECTAR saves alone and on top of that clock
(`clock_report`). Limits:
- a temperature cap is held when, after the first `settle_s` seconds, no reading is above the cap
  and pauses take at most `max_pause_share` of the time;
- a power budget is held when every `power_window_s` window's mean power is within 1 % of the
  budget in force; `budget_use` is mean power / mean budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nectar.control.schedule import Schedule
from nectar.experiment.clocks import best_clock, is_clock_sweep, on_clock, split_clock
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
            guard_share=guard_share(p),
            limits=check_limits(records, temp_cap_C, budget)))
    return points


def guard_share(policy: dict) -> float:
    """The quality checks' share of a policy's energy: the summary's own `guard_share` when it states
    one (a serving run: the checks' share of the decode energy, `nectar.serving.metrics`), else its
    checks' energy over its energy (checks included)."""
    if "guard_share" in policy:
        return policy["guard_share"]
    return policy.get("guard_energy_J", 0.0) / policy["energy_J"] if policy["energy_J"] else 0.0


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
    if any(split_clock(p.name)[1] is not None for p in points):
        report.update(clock_report(report, summary, points, chosen, baseline))
    return report


CLOCK_FIGURES = ("simulated: the simulator's voltage-frequency model (sim/power.py, docs/design.md); "
                 "no GPU clock was changed")


def _margin(point: PolicyPoint | None, hull: StaticHull) -> dict:
    """A policy's saving and Δppl, the hull's saving at its Δppl and the margin over it."""
    if point is None:
        return {"saved": None, "dppl": None, "hull_saved": None, "margin": None}
    at = hull.saved_at(point.dppl)
    finite = math.isfinite(at)
    return {"saved": point.saved, "dppl": point.dppl, "hull_saved": at if finite else None,
            "margin": point.saved - at if finite else None}


def clock_report(report: dict, summary: dict, points: list[PolicyPoint], chosen: PolicyPoint | None,
                 baseline: str) -> dict:
    """The clock figures: every `clock:MHZ` policy's saving and slowdown against `baseline`, the
    best clock within the bound, NECTAR alone against the hull of every static policy (clocks
    included) and of those at the backend's own clocks, and NECTAR on the best clock
    (`nectar@clock:MHZ`) against the full hull and against the hull of the policies locked at that
    clock (its routing saving on top of the clock)."""
    policies, base = summary["policies"], summary["policies"][baseline]
    static = [p for p in points if not p.adaptive and p.limits.holds]
    by_name = {p["name"]: p for p in report["policies"]}
    sweep = [{"policy": n, "clock_MHz": split_clock(n)[1], "saved": by_name[n]["saved"], "dppl": by_name[n]["dppl"],
              "slowdown": _time_per_token(policies[n]) / _time_per_token(base) - 1.0}
             for n in by_name if is_clock_sweep(n)]
    best = best_clock(report["policies"], report["quality_bound"])
    full = StaticHull([HullPoint(p.name, p.dppl, p.saved) for p in static])
    unlocked = StaticHull([HullPoint(p.name, p.dppl, p.saved) for p in static if split_clock(p.name)[1] is None])
    out = {"clock_figures": CLOCK_FIGURES, "clock_sweep": sorted(sweep, key=lambda r: -r["clock_MHz"]),
           "best_clock": None if best is None else next(r for r in sweep if r["policy"] == best["name"])}
    if chosen is not None:
        out["nectar_margin_over_unlocked_hull"] = _margin(chosen, unlocked)["margin"]
    if best is None or chosen is None:
        return out
    clock_MHz = split_clock(best["name"])[1]
    name = on_clock(chosen.name, clock_MHz)
    point = next((p for p in points if p.name == name), None)
    locked = StaticHull([HullPoint(p.name, p.dppl, p.saved) for p in static if split_clock(p.name)[1] == clock_MHz])
    over_full, over_locked = _margin(point, full), _margin(point, locked)
    out.update(nectar_on_best_clock=name, nectar_on_best_clock_saved=over_full["saved"],
               nectar_on_best_clock_dppl=over_full["dppl"],
               hull_saved_at_nectar_on_best_clock_dppl=over_full["hull_saved"],
               nectar_on_best_clock_margin_over_hull=over_full["margin"],
               best_clock_hull_saved_at_nectar_on_best_clock_dppl=over_locked["hull_saved"],
               nectar_on_best_clock_margin_over_best_clock_hull=over_locked["margin"],
               nectar_on_best_clock_saved_over_best_clock=None if point is None else
               1.0 - point.J_per_token / policies[best["name"]]["J_per_token"])
    return out


def _time_per_token(policy: dict) -> float:
    return policy["duration_s"] / policy["tokens"] if policy["tokens"] else math.nan
