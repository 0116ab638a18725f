"""`nectar reconcile --frontier RUN_DIR`: a GPU frontier run's stream re-priced by the simulator from
the run's own measured cost table, and each policy's saving, simulated vs measured.

A frontier run directory (`nectar frontier` / `nectar hw-run`) holds `frontier.json` (each policy's
saving and perplexity increase against static-top2), `trace.csv.gz` (every telemetry window with the
chunk's workload: its per-layer, per-expert kept slots) and, since the cost calibration,
`cost_table.json` (`nectar.control.cost_table`). The replay runs the trace's windows in their
recorded order and timing on a simulated GPU of the run's GPU preset that prices every chunk by that
table (`sim.cost_pricing`: kept, dropped and cheap slots and the dispatch as the device measured
them, scaled to the table's static-top2 check), with the preset's power limit, leakage and RC
thermal model acting on it (`analysis.reconcile.replay.replay_trace`, each recording starting at
its measured temperature). The table's energies are taken as measured at the temperature of the
run's first window (the calibration runs just before it).

Per policy, over the same windows (its chunks, and its pauses if any):

    gpu_saved  1 − (Σ measured window energy / tokens) ÷ static-top2's   (`window_energy_J`, as the run)
    sim_saved  the same with the simulator's energy of the replayed windows
    gpu_dppl   the run's perplexity increase vs static-top2 (frontier.json)
    sim_dppl   the same: the replay prices the GPU's own routing decisions, it does not re-decide
               them, so the perplexity is the run's
    gpu_ns_per_token / sim_ns_per_token  the policy's chunk windows' time per token, measured and as
               the simulator priced it from the table; time_error = sim / gpu − 1 (the machinery
               issue's goal: every policy's speed within 3 % of what the measured table predicts)

tokens = stream chunks × chunk_tokens (NECTAR's ride-along check rows are inside its windows and
its energy, not its tokens, as in the run's accounting). Written as JSON with a plot beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from analysis.reconcile.replay import ReplayRow, replay_trace
from analysis.reconcile.score import MeasuredTrace, load_trace_dir, metrics, pick_preset
from nectar.control.cost_table import CostTable
from nectar.telemetry.energy import window_energy_J
from sim.cost_pricing import check_scales
from sim.presets import GPUPreset

FORMAT = "nectar-sim-vs-gpu/1"
BASELINE = "static-top2"
OUT_NAME = "sim-vs-gpu-costs.json"
GOAL_POINTS = 2.0          # issue goal: every policy's saving within ±2 points of the GPU's
GOAL_TIME = 0.03           # machinery issue's goal: every policy's speed within 3 % of the table's prediction


@dataclass(frozen=True)
class FrontierRun:
    """What the replay needs from a run directory."""

    path: Path
    report: dict                 # frontier.json
    trace: MeasuredTrace
    table: CostTable
    chunk_tokens: int


@dataclass(frozen=True)
class SavingRow:
    workload: str
    policy: str
    gpu_saved: float | None      # None for the baseline
    sim_saved: float | None
    gpu_dppl: float | None
    sim_dppl: float | None
    chunks: int
    gpu_mJ_per_token: float
    sim_mJ_per_token: float
    gpu_ns_per_token: float
    sim_ns_per_token: float

    @property
    def time_error(self) -> float:
        """Simulated over measured time per token, minus 1 (+0.10: the table prices it 10 % slower)."""
        return self.sim_ns_per_token / self.gpu_ns_per_token - 1.0

    @property
    def gap_points(self) -> float | None:
        if self.gpu_saved is None or self.sim_saved is None:
            return None
        return 100.0 * (self.sim_saved - self.gpu_saved)

    def to_dict(self) -> dict:
        return {**asdict(self), "gap_points": self.gap_points, "time_error": self.time_error}


def _require(run_dir: Path, name: str, why: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {name}: {why}")
    return path


def load_frontier_run(run_dir: str | Path) -> FrontierRun:
    """The run's report, trace and cost table; a one-line ValueError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"frontier run directory {str(run_dir)!r} does not exist")
    report = json.loads(_require(run_dir, "frontier.json", "not a frontier run (`nectar frontier` and "
                                 "`nectar hw-run` write one)").read_text())
    table_path = _require(run_dir, "cost_table.json", "the run measured no per-expert cost table (a run from "
                          "before the cost calibration, or with --no-cost-calibration), so its stream cannot be "
                          "priced by measured costs")
    summary = json.loads(_require(run_dir, "summary.json", "the run's summary (chunk_tokens) is missing").read_text())
    trace = load_trace_dir(run_dir)
    if not any(r.workload is not None and r.kind == "chunk" for r in trace.rows):
        raise ValueError(f"{run_dir}: the trace records no chunk workloads (routing counts) to replay")
    return FrontierRun(run_dir, report, trace, CostTable.load(table_path), int(summary["chunk_tokens"]))


def table_temperature_C(trace: MeasuredTrace) -> float | None:
    """The temperature the cost table was measured at: the run's first reading (calibration runs first)."""
    temps = [r.window.gpu_temp_C for r in trace.rows if math.isfinite(r.window.gpu_temp_C)]
    return temps[0] if temps else None


def replay_run(run: FrontierRun, preset: GPUPreset) -> list[ReplayRow]:
    """Every window of the run, replayed on the simulator priced by the run's cost table."""
    options = {"cost_table": run.table, "cost_table_temp_C": table_temperature_C(run.trace)}
    return replay_trace(run.trace.rows, preset, breaks=run.trace.breaks, backend_options=options)


def _policy_energies(run: FrontierRun, replayed: Sequence[ReplayRow]) -> dict[str, list[float]]:
    """policy -> [stream chunks, measured J, simulated J, measured chunk s, simulated chunk s] over its
    chunk and pause windows (the times over its chunk windows only)."""
    totals: dict[str, list[float]] = {}
    for r in replayed:
        row = run.trace.rows[r.index]
        if r.kind not in ("chunk", "idle") or row.policy in ("", "idle"):
            continue
        entry = totals.setdefault(row.policy, [0, 0.0, 0.0, 0.0, 0.0])
        chunk = r.kind == "chunk"
        entry[0] += chunk
        entry[1] += window_energy_J(row.window)
        entry[2] += r.sim_energy_J
        entry[3] += row.window.duration_s if chunk else 0.0
        entry[4] += r.sim_duration_s if chunk else 0.0
    return totals


def saving_rows(run: FrontierRun, replayed: Sequence[ReplayRow]) -> list[SavingRow]:
    """One row per policy of the run (module docstring)."""
    totals = _policy_energies(run, replayed)
    if BASELINE not in totals:
        raise ValueError(f"{run.path}: the trace has no {BASELINE} windows, the baseline every saving is measured against")
    per_token = {p: [value / (chunks * run.chunk_tokens) for value in (gpu, sim, gpu_s, sim_s)]
                 for p, (chunks, gpu, sim, gpu_s, sim_s) in totals.items() if chunks}
    gpu_base, sim_base = per_token[BASELINE][:2]
    dppl = {p["name"]: p.get("dppl") for p in run.report.get("policies", [])}
    workload = run.report.get("workload", "")
    rows = []
    for policy, (gpu, sim, gpu_s, sim_s) in per_token.items():
        base = policy == BASELINE
        rows.append(SavingRow(workload, policy, None if base else 1.0 - gpu / gpu_base, None if base else 1.0 - sim / sim_base,
                              dppl.get(policy), dppl.get(policy), int(totals[policy][0]), 1e3 * gpu, 1e3 * sim,
                              1e9 * gpu_s, 1e9 * sim_s))
    return rows


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=True)
    return [order.index(i) for i in range(len(values))]


def verdict(rows: Sequence[SavingRow]) -> dict:
    """The issue's goals over the rows: every saving within ±2 points, policies ranked alike."""
    scored = [r for r in rows if r.gap_points is not None]
    by_workload: dict[str, list[SavingRow]] = {}
    for r in scored:
        by_workload.setdefault(r.workload, []).append(r)
    same_ranking = all(_ranks([r.gpu_saved for r in rs]) == _ranks([r.sim_saved for r in rs]) for rs in by_workload.values())
    gaps = [abs(r.gap_points) for r in scored]
    times = [abs(r.time_error) for r in rows if math.isfinite(r.time_error)]
    return {"max_abs_gap_points": max(gaps) if gaps else None,
            "within_2_points": sum(g <= GOAL_POINTS for g in gaps), "policies_scored": len(gaps),
            "ranking_identical": same_ranking,
            "time_within_3_percent": sum(t <= GOAL_TIME for t in times), "time_rows": len(times),
            "max_abs_time_error": max(times) if times else None}


def reconcile_frontier(run_dirs: Sequence[str | Path], preset: str | Path | GPUPreset | None = None) -> dict:
    """The sim-vs-gpu report of one or more frontier runs of one GPU."""
    rows, runs, warnings = [], [], []
    for run_dir in run_dirs:
        run = load_frontier_run(run_dir)
        base = pick_preset(run.trace, preset)
        replayed = replay_run(run, base)
        rows += saving_rows(run, replayed)
        scale_s, scale_J = check_scales(run.table)
        runs.append({"run_dir": str(run.path), "workload": run.report.get("workload"), "gpu": run.trace.gpu_name,
                     "preset": base.name, "table_gpu": run.table.gpu, "table_dispatch": run.table.dispatch,
                     "table_temp_C": table_temperature_C(run.trace), "check_scale_time": scale_s,
                     "check_scale_energy": scale_J, "repeats": run.report.get("repeats", 1),
                     "chunk_windows": metrics(replayed).to_dict()})
        warnings += table_warnings(run)
    return {"format": FORMAT, "baseline": BASELINE, "priced_by": "cost-table", "runs": runs,
            "rows": [r.to_dict() for r in rows], "goals": verdict(rows), "warnings": warnings}


def table_warnings(run: FrontierRun) -> list[str]:
    """What the run's table cannot price as measured."""
    if run.table.slot_s_per_token == 0 and run.table.slot_J_per_token == 0:
        return [f"{run.path}: the cost table has no one-slot design point (drop-all:1-slot; tables from before it "
                "have slot_*_per_token = 0), so a decision of one slot per token (static-top1) is priced as a "
                "two-slot decision with one slot dropped, and of three slots as two plus one computed slot"]
    return []


# ---------------------------------------------------------------------------- output
def table_text(report: dict) -> str:
    lines = [f"{'workload':<14}{'policy':<16}{'gpu saved':>10}{'sim saved':>10}{'gap':>8}{'gpu dppl':>10}"
             f"{'gpu ns/tok':>11}{'sim ns/tok':>11}{'time err':>9}"]
    for r in report["rows"]:
        saved = ("" if r["gap_points"] is None else
                 f"{100 * r['gpu_saved']:>9.1f}%{100 * r['sim_saved']:>9.1f}%{r['gap_points']:>+8.1f}")
        lines.append(f"{r['workload']:<14}{r['policy']:<16}{saved:>28}{100 * (r['gpu_dppl'] or 0):>+9.2f}%"
                     f"{r['gpu_ns_per_token']:>11.1f}{r['sim_ns_per_token']:>11.1f}{100 * r['time_error']:>+8.1f}%")
    g = report["goals"]
    lines.append(f"within {GOAL_POINTS:g} points: {g['within_2_points']}/{g['policies_scored']} policies "
                 f"(worst {g['max_abs_gap_points'] or 0:.1f}); ranking identical: {'yes' if g['ranking_identical'] else 'no'}; "
                 f"time within {100 * GOAL_TIME:g} %: {g['time_within_3_percent']}/{g['time_rows']} "
                 f"(worst {100 * (g['max_abs_time_error'] or 0):.1f} %)")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> Path:
    """Simulated vs measured saving per policy, one marker per row, the diagonal and ±2 points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nectar.experiment.outputs import atomic_write

    rows = [r for r in report["rows"] if r["gap_points"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    values = [100 * v for r in rows for v in (r["gpu_saved"], r["sim_saved"])]
    lo, hi = min(values, default=0) - 5, max(values, default=0) + 5
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, label="simulated = measured")
    ax.fill_between([lo, hi], [lo - GOAL_POINTS, hi - GOAL_POINTS], [lo + GOAL_POINTS, hi + GOAL_POINTS],
                    color="0.85", label=f"±{GOAL_POINTS:g} points")
    for workload in sorted({r["workload"] for r in rows}):
        mine = [r for r in rows if r["workload"] == workload]
        ax.scatter([100 * r["gpu_saved"] for r in mine], [100 * r["sim_saved"] for r in mine], s=18, label=workload)
        for r in mine:
            ax.annotate(r["policy"], (100 * r["gpu_saved"], 100 * r["sim_saved"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    gpu = report["runs"][0]["gpu"] if report["runs"] else ""
    ax.set_xlabel("saving vs static-top2 measured on the GPU (%)")
    ax.set_ylabel("saving simulated from the run's cost table (%)")
    ax.set_title(f"{gpu}: simulator priced by measured costs", fontsize=9)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """Beside the (first) run directory: the GPU session's folder."""
    return Path(run_dirs[0]).absolute().parent / OUT_NAME
