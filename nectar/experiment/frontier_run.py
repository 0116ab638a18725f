"""One frontier run: build the workload, run every policy on it (once or several times), write the
outputs and the report.

Shared by `nectar frontier` (simulator or NVML) and the GPU campaign (`nectar hw-run`). The report is
`nectar.experiment.frontier.frontier_report` of the pooled run plus, with repeats, each repeat's
NECTAR margin and a 95 % interval; it is written as strict JSON (no NaN) to OUT/frontier.json
beside the run's usual outputs (summary.json, chunks.csv, trace.csv.gz, meta.json, plots).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from nectar.experiment import workloads as W
from nectar.experiment.clocks import best_clock, clock_policy, is_clock_sweep, on_clock, split_clock
from nectar.experiment.frontier import frontier_report
from nectar.experiment.outputs import write_outputs
from nectar.experiment.policy_lists import ADAPTIVE, STATIC_FRONTIER
from nectar.experiment.runner import PolicyRun, RunConfig, probe_clocks, run_experiment
from nectar.experiment.summary import build_summary, record_rows

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student t, 97.5 %


def strict(value):
    """JSON-safe copy: NaN and ±inf become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def build_workload(name: str, cfg: RunConfig, heldout: torch.Tensor, domains: dict[str, torch.Tensor] | None,
                   *, block_chunks: int = 4, temp_cap_C: float | None = None, heat=None,
                   power_budget=None) -> W.Workload:
    """The named workload over the model's held-out text (per-domain streams for domain-shift)."""
    rows, n = cfg.chunk_tokens // cfg.seq_len, cfg.tokens // cfg.chunk_tokens
    if name == "stationary":
        return W.stationary(heldout, n, rows, cfg.seq_len)
    if name == "domain-shift":
        if not domains or len(domains) < 2:
            raise ValueError("domain-shift needs a model saved with per-domain held-out streams "
                             "(heldout_domains.pt, written by `nectar train` on the domain-labelled corpus)")
        return W.domain_shift(domains, n, rows, cfg.seq_len, block_chunks=block_chunks)
    if name == "thermal":
        if temp_cap_C is None or heat is None:
            raise ValueError("the thermal workload needs a temperature cap (--temp-cap) and a heat source (--heat)")
        return W.thermal(heldout, n, rows, cfg.seq_len, temp_cap_C, heat)
    if name == "power-schedule":
        if power_budget is None:
            raise ValueError("the power-schedule workload needs --power-budget 'seconds:W,…'")
        return W.power_schedule(heldout, n, rows, cfg.seq_len, power_budget)
    raise ValueError(f"unknown workload {name!r}; choose one of {W.WORKLOADS}")


def with_workload_limits(cfg: RunConfig, workload: W.Workload) -> RunConfig:
    limits = replace(cfg.controller.limits, temp_cap_C=workload.temp_cap_C, power_budget=workload.power_budget)
    return replace(cfg, controller=replace(cfg.controller, limits=limits))


def frontier(model, workload: W.Workload, backend_factory, cfg: RunConfig, backend_name: str, repeats: int = 1,
             progress: bool = True, before_policy=None,
             clock_sweep: list[float] | None = None) -> tuple[list[PolicyRun], dict, dict]:
    """Run the policies on the workload `repeats` times (seeds seed, seed+1, …); returns the runs of
    the last repeat, the pooled summary and the report (with per-repeat margins). The caller owns
    the backends the factory makes (a shared GPU backend stays open across repeats).
    `before_policy`: see `run_experiment` (policies one after another only). `clock_sweep` (MHz,
    simulator only): the policies run with `clock:MHZ` for each clock added, then every policy but
    the reference and the sweep runs again on the sweep's best clock (`clock_stage`)."""
    cfg = with_workload_limits(cfg, workload)
    baseline = getattr(model, "reference_policy", "static-top2")      # transformers MoE: the family's top-K
    if clock_sweep:
        cfg = replace(cfg, policies=cfg.policies + [clock_policy(c) for c in clock_sweep])
    stages = [[_repeat(model, workload, backend_factory, cfg, r, progress, before_policy) for r in range(repeats)]]
    if clock_sweep:
        later = clock_stage(stages[0], cfg, backend_name, workload, baseline)
        later_cfg = replace(cfg, policies=later, calibration=None)
        stages.append([_repeat(model, workload, backend_factory, later_cfg, r, progress, before_policy,
                               stages[0][r][0].cost_table) for r in range(repeats)])
    per_repeat = [[run for stage in stages for run in stage[r]] for r in range(repeats)]
    all_rows, margins = [], []
    for r, runs in enumerate(per_repeat):
        rep_cfg = _repeat_config(cfg, r)
        rows = [{**row, "repeat": r} for row in record_rows(runs)]
        summary = build_summary(runs, rep_cfg, backend=backend_name, workload=workload.describe())
        margins.append(frontier_report(summary, rows, workload.name, workload.temp_cap_C,
                                       workload.power_budget, baseline=baseline).get("nectar_margin_over_hull"))
        all_rows += rows
    runs = per_repeat[-1]
    summary = build_summary(runs, cfg, backend=backend_name, workload=workload.describe(), repeats=repeats)
    summary["policies"] = pooled_policies(runs, all_rows)
    report = frontier_report(summary, all_rows, workload.name, workload.temp_cap_C, workload.power_budget,
                             baseline=baseline)
    report.update(repeats=repeats, nectar_margin_per_repeat=margins, **interval(margins),
                  workload_detail=workload.describe(), chunk_domains=workload.domains,
                  settings=settings(cfg))
    return runs, strict(summary), strict(report)


def _repeat_config(cfg: RunConfig, r: int) -> RunConfig:
    return replace(cfg, seed=cfg.seed + r, controller=replace(cfg.controller, seed=cfg.seed + r))


def _repeat(model, workload: W.Workload, backend_factory, cfg: RunConfig, r: int, progress: bool, before_policy,
            cost_table=None) -> list[PolicyRun]:
    """Repeat r (seed + r) of `cfg`'s policies on the workload."""
    rep_cfg = _repeat_config(cfg, r)
    torch.manual_seed(rep_cfg.seed)
    return run_experiment(model, workload.chunks, backend_factory, rep_cfg, progress=progress,
                          before_policy=before_policy, cost_table=cost_table)


def clock_stage(first: list[list[PolicyRun]], cfg: RunConfig, backend_name: str, workload: W.Workload,
                baseline: str) -> list[str]:
    """The second stage of a clock sweep: every policy of the first stage but the reference and the
    `clock:MHZ` sweep, locked at the best clock of the pooled first stage (`clocks.best_clock`);
    ValueError when no clock of the sweep holds the bound and the limits."""
    rows = [{**row, "repeat": r} for r, runs in enumerate(first) for row in record_rows(runs)]
    summary = build_summary(first[-1], cfg, backend=backend_name, workload=workload.describe())
    summary["policies"] = pooled_policies(first[-1], rows)
    report = frontier_report(summary, rows, workload.name, workload.temp_cap_C, workload.power_budget,
                             baseline=baseline)
    best = best_clock(report["policies"], report["quality_bound"])
    if best is None:
        raise ValueError("no clock of --clock-sweep holds the quality bound and the workload's limits")
    clock_MHz = split_clock(best["name"])[1]
    return [on_clock(name, clock_MHz) for name in cfg.policies if name != baseline and split_clock(name)[1] is None]


def pooled_policies(runs: list[PolicyRun], rows: list[dict]) -> dict:
    """Per-policy totals over every repeat's records (the summary schema of a single run)."""
    from nectar.experiment.summary import summarise_records

    return {run.name: summarise_records([r for r in rows if r["policy"] == run.name], run.spec.adaptive)
            for run in runs}


def interval(margins: list) -> dict:
    values = [m for m in margins if m is not None]
    if len(values) < 2:
        return {"nectar_margin_ci95": None}
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))
    return {"nectar_margin_mean": mean, "nectar_margin_ci95": [mean - half, mean + half]}


def settings(cfg: RunConfig) -> dict:
    c = cfg.controller
    return {"tokens": cfg.tokens, "chunk_tokens": cfg.chunk_tokens, "seq_len": cfg.seq_len, "seed": cfg.seed,
            "shadow_share": c.shadow_share, "shadow_agree": c.shadow_agree, "price_init": c.guard.price_init, "budget_use": c.guard.budget_use,
            "sensitivity": c.guard.sensitivity, "cost_learning": c.cost_learning}


def write_frontier(out: Path, runs: list[PolicyRun], summary: dict, report: dict, command: str, **meta) -> None:
    write_outputs(out, runs, summary, command=command, extra_files={"frontier.json": report}, plots=("frontier",),
                  **meta)


def run_frontier(args, out: Path | None, command: str, backend_options: dict | None = None) -> dict:
    """`nectar frontier`: load the model, build the workload, run, write into `out` (None: write
    nothing — a data-parallel replica other than rank 0); returns the report. Without --policies: the
    model's whole static frontier, the PI baseline and NECTAR. `backend_options`: extra backend
    options (a replica's GPU)."""
    from nectar.cli.experiment_args import backend_factory, check_model_fits, configs, place_model
    from nectar.train.recipes import committed_model, load_demo_model

    cfg = configs(args, args.policies or default_policies(None))
    factory = backend_factory(args, cfg, **(backend_options or {}))
    probe = factory()
    torch_device = probe.torch_device
    clocks = [c for c in [*(getattr(args, "clock_sweep", None) or []), *(split_clock(n)[1] for n in cfg.policies)]
              if c is not None]
    if clocks:
        probe_clocks(probe, clocks)   # a backend or clock that cannot be locked is refused before the model loads
    probe.close()
    demo = load_demo_model(Path(args.model) if args.model is not None else committed_model("cpu-demo"))
    check_model_fits(demo.model, cfg.seq_len)
    workload = build_workload(args.workload, cfg, demo.heldout_ids, getattr(demo, "heldout_domains", None),
                              block_chunks=args.block_chunks, temp_cap_C=args.temp_cap, heat=args.heat,
                              power_budget=args.power_budget)
    model = place_model(demo.model, torch_device)
    if args.policies is None:
        cfg = replace(cfg, policies=default_policies(model))
    reference = getattr(model, "reference_policy", "static-top2")
    if reference not in cfg.policies:
        raise ValueError(f"--policies must include {reference}: the frontier measures every policy against it")
    runs, summary, report = frontier(model, workload, factory, cfg, args.backend, repeats=args.repeats,
                                     progress=not args.no_progress, clock_sweep=getattr(args, "clock_sweep", None))
    for run in runs:
        run.backend.close()
    if out is not None:
        write_frontier(out, runs, summary, report, command)
    return report


def default_policies(model) -> list[str]:
    """The frontier's policies for `model` (None: MoE-DistilGPT2's): the static frontier, the PI
    baseline and NECTAR; a transformers MoE model has its own static frontier (nectar.hf.policies)."""
    if model is not None and hasattr(model, "reference_policy"):
        from nectar.hf.policies import frontier_policies

        return frontier_policies(model.top_k) + ["nectar"]
    return STATIC_FRONTIER + ADAPTIVE


def within_bound(policy: dict, bound: float) -> str:
    """The quality-bound column: whether the policy's perplexity increase is within the bound (the
    header's bound=+X% ppl); the temperature/power limits are the next column."""
    if policy["dppl"] is None:
        return "—"
    return "within" if policy["dppl"] <= bound else "ABOVE"


def limits_cell(limits: dict, report: dict) -> str:
    """The temperature/power column: whether the policy held the workload's temperature cap and
    power budget (`check_limits`); the quality bound is the column before it."""
    if report.get("temp_cap_C") is None and report.get("power_budget_W") is None:
        return "none set"
    if limits["holds"]:
        return "held"
    if report.get("temp_cap_C") is not None and limits.get("max_temp_after_settle_C") is None:
        return "NOT held (no reading after settling)"
    return "NOT held"


def print_frontier(report: dict) -> None:
    """The report as a table: every policy's saving and perplexity increase, the quality bound and
    the temperature/power limits each held, then the verdict (notes wrapped at 100 columns)."""
    from nectar.cli.common import wrap_note

    print(f"workload={report['workload']} backend={report['backend']} gpu={report['gpu']} "
          f"bound=+{100 * report['quality_bound']:.2f}% ppl repeats={report.get('repeats', 1)}")
    width = max([16] + [len(p["name"]) + 2 for p in report["policies"]])
    print(f"{'policy':<{width}}{'saved':>8}{'Δppl':>9}{'mJ/token':>10}{'W':>6}{'maxT°C':>8}{'pause':>7}"
          f"  {'ppl bound':<11}temp/power limits")
    for p in sorted(report["policies"], key=lambda r: (r["adaptive"], r["dppl"] or 0.0)):
        print(f"{p['name']:<{width}}{100 * (p['saved'] or 0):>7.1f}%{100 * (p['dppl'] or 0):>+8.2f}%"
              f"{1e3 * (p['J_per_token'] or 0):>10.4f}{p['mean_power_W'] or 0:>6.0f}{p['max_temp_C'] or 0:>8.1f}"
              f"{100 * (p['pause_share'] or 0):>6.1f}%  {within_bound(p, report['quality_bound']):<11}"
              f"{limits_cell(p['limits'], report)}")
    if report.get("nectar_saved") is not None:
        hull = report.get("hull_saved_at_nectar_dppl")
        margin = report.get("nectar_margin_over_hull")
        print(wrap_note(f"nectar: saved {100 * report['nectar_saved']:.1f}% at {100 * report['nectar_dppl']:+.2f}% ppl "
                        f"(budget use {100 * report['nectar_budget_use']:.0f}%); static hull there: "
                        + ("no non-adaptive policy holds the temperature/power limits" if hull is None else f"{100 * hull:.1f}%")
                        + ("" if margin is None else f"; margin {100 * margin:+.1f} points")))
        ci = report.get("nectar_margin_ci95")
        if ci:
            print(f"margin over {report['repeats']} repeats: {100 * report['nectar_margin_mean']:+.1f} points, "
                  f"95% interval [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")
    best = report.get("best_fixed_saved_within_bound")
    if best is not None:
        print(f"best fixed policy within the bound: {100 * best:.1f}% saved")
    if "clock_figures" in report:
        print_clocks(report)


def print_clocks(report: dict) -> None:
    """The clock sweep's lines of the table: each clock's saving and slowdown, the best clock, and
    NECTAR alone and on top of it (simulator figures, and the lines say so)."""
    from nectar.cli.common import wrap_note

    print(wrap_note(f"clocks ({report['clock_figures']}):"))
    for row in report["clock_sweep"]:
        print(f"  {row['policy']:<14}saved {100 * row['saved']:5.1f}%  slowdown {100 * row['slowdown']:+6.1f}%")
    best = report.get("best_clock")
    if best is None:
        print("  no clock of the sweep holds the quality bound and the limits")
        return
    alone = report.get("nectar_margin_over_unlocked_hull")
    print(wrap_note(f"best clock {best['clock_MHz']:g} MHz: {100 * best['saved']:.1f}% saved at {100 * best['slowdown']:+.1f}% "
                    "time per token" + ("" if alone is None else
                                        f"; nectar alone: margin {100 * alone:+.1f} points over the unlocked hull")))
    if report.get("nectar_on_best_clock_saved") is None:
        return
    margin = report.get("nectar_on_best_clock_margin_over_hull")
    print(wrap_note(f"{report['nectar_on_best_clock']}: saved {100 * report['nectar_on_best_clock_saved']:.1f}% at "
                    f"{100 * report['nectar_on_best_clock_dppl']:+.2f}% ppl, "
                    f"{100 * report['nectar_on_best_clock_saved_over_best_clock']:.1f}% on top of the clock; "
                    + ("no static hull there" if margin is None else f"margin {100 * margin:+.1f} points over the hull")))
