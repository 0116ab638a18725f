"""`nectar report RUN_DIR`: a markdown page (RUN_DIR/report.md) about one `nectar run`, with figures.

Reads RUN_DIR/summary.json, chunks.csv and meta.json (and trace.csv.gz for a measured run) and
writes the policy table, the energy–perplexity Pareto front, temperature traces, expert loads,
the energy cost model's fit and, when the run was measured on a GPU (backend "nvml") or
--trace-dir points at a measured trace, the simulator-vs-measurement reconciliation
(analysis.reconcile.score). Figures go to RUN_DIR/report_figures/. Exit status 2 on unusable input.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import nnls

from analysis.report import plots
from analysis.reconcile.calibrate import CalibrationConfig
from analysis.reconcile.score import GOALS, Metrics, ReconcileResult, load_trace_dir, pick_preset, reconcile

FIGURES = "report_figures"
BASELINE = "static-top2"


# ---------------------------------------------------------------------------- inputs
def _cell(text: str) -> Any:
    """A chunks.csv cell back to a value: '' → None, True/False, JSON lists, numbers, else the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[0] in "[{":
        return json.loads(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_chunks(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def load_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(summary, chunk rows, meta) of a run directory, with clear errors when something is missing."""
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no summary.json: is it a `nectar run --out` directory?")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{summary_path} is not valid JSON: {exc}") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("policies"), dict) or not summary["policies"]:
        raise ValueError(f"{summary_path} has no 'policies' table")
    chunks_path = run_dir / "chunks.csv"
    try:
        rows = read_chunks(chunks_path) if chunks_path.is_file() else []
    except (ValueError, KeyError, csv.Error) as exc:
        raise ValueError(f"cannot read {chunks_path}: {exc}") from exc
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return summary, rows, meta


# ---------------------------------------------------------------------------- derived data
def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (energy, perplexity): no other point is ≤ in both and < in one."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points.values())
    return [name for name, p in points.items() if all(map(math.isfinite, p)) and not dominated(p)]


def expert_shares(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per policy, [L, E] share of each layer's expert slots over all its chunks."""
    out = {}
    for policy, rs in plots.by_policy(rows).items():
        counts = [np.asarray(r["expert_counts"], dtype=float) for r in rs if r.get("expert_counts")]
        if not counts or any(c.shape != counts[0].shape or c.ndim != 2 for c in counts):
            continue
        total = np.sum(counts, axis=0)                                   # [L, E]
        out[policy] = total / np.maximum(total.sum(axis=1, keepdims=True), 1.0)
    return out


@dataclass
class AffineFit:
    """Offline non-negative least squares E ≈ e0·T + Σ_i c_i·n_i (n_i: tokens to expert i, all layers)."""

    idle_W: float
    joule_per_token: list[float]     # [E]
    r2: float
    mape: float
    measured: np.ndarray             # [N]
    predicted: np.ndarray            # [N]


def affine_cost_fit(rows: Sequence[dict]) -> AffineFit | None:
    """Fit over every chunk with a finite energy and expert counts; None when too few chunks."""
    usable = [r for r in rows if r.get("expert_counts") and isinstance(r.get("energy_J"), (int, float))
              and math.isfinite(r["energy_J"]) and r["energy_J"] > 0]
    if not usable:
        return None
    width = len(usable[0]["expert_counts"][0])
    usable = [r for r in usable if all(len(layer) == width for layer in r["expert_counts"])]
    if len(usable) < width + 2:
        return None
    duration = np.array([r["t_end_s"] - r["t_start_s"] for r in usable])             # [N]
    counts = np.array([np.sum(r["expert_counts"], axis=0) for r in usable], float)    # [N, E]
    features = np.column_stack([duration, counts])                                    # [N, 1 + E]
    measured = np.array([r["energy_J"] for r in usable], float)                       # [N]
    scale = np.maximum(features.max(axis=0), 1e-12)                                   # [1 + E]
    coef, _ = nnls(features / scale, measured)
    coef = coef / scale
    predicted = features @ coef
    ss_res = float(np.sum((measured - predicted) ** 2))
    ss_tot = float(np.sum((measured - measured.mean()) ** 2))
    return AffineFit(float(coef[0]), coef[1:].tolist(), 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
                     float(np.mean(np.abs(predicted - measured) / measured)), measured, predicted)


def online_residuals(rows: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for policy, rs in plots.by_policy(rows).items():
        pairs = [(r["chunk"], r["cost_residual"]) for r in rs if isinstance(r.get("cost_residual"), (int, float))]
        if pairs:
            out[policy] = pairs
    return out


# ---------------------------------------------------------------------------- markdown
def _fmt(value: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    if spec == "d":
        return str(int(round(value)))
    return format(value if scale == 1.0 else value * scale, spec)


def _rel(value: Any, base: Any) -> str:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (value, base)) or base == 0:
        return "—"
    return f"{100 * (value / base - 1):+.2f}%"


def policy_table(summary: dict) -> list[str]:
    policies = summary["policies"]
    base = policies.get(BASELINE, {})
    lines = [f"| policy | tokens | energy (J) | mJ/token | vs {BASELINE} | perplexity | Δppl | routing agreement "
             "| max °C | mean W | fallback chunks |", "|" + "---|" * 11]
    for name, p in policies.items():
        lines.append(
            f"| {name} | {_fmt(p.get('tokens'), 'd')} "
            f"| {_fmt(p.get('energy_J'), '.1f')} | {_fmt(p.get('J_per_token'), '.4f', 1e3)} "
            f"| {_rel(p.get('J_per_token'), base.get('J_per_token'))} | {_fmt(p.get('perplexity'))} "
            f"| {_rel(p.get('perplexity'), base.get('perplexity'))} | {_fmt(p.get('routing_agreement'))} "
            f"| {_fmt(p.get('max_temp_C'), '.1f')} | {_fmt(p.get('mean_power_W'), '.0f')} "
            f"| {p.get('fallback_chunks', '—')} |")
    return lines


def _header(run_dir: Path, summary: dict, meta: dict) -> list[str]:
    backend = summary.get("backend", meta.get("backend", "?"))
    what = "measured with NVML on a real GPU" if backend == "nvml" else "simulated (sim/ GPU model)"
    facts = [f"backend **{backend}** ({what})", f"GPU {summary.get('gpu', meta.get('gpu_name', '?'))}",
             f"seed {summary.get('seed', '?')}"]
    for key, label in (("chunk_tokens", "tokens per chunk"), ("lambda", "λ"), ("priced_as", "priced as"),
                       ("temp_cap_C", "temperature cap °C"), ("power_budget_W", "power budget W"), ("faults", "faults")):
        if summary.get(key) is not None:
            facts.append(f"{label} {summary[key]}")
    lines = [f"# NECTAR run report: `{run_dir.name}`", "", "Run: " + ", ".join(facts) + "."]
    if meta.get("created_utc") or meta.get("command"):
        lines.append(f"Created {meta.get('created_utc', '?')} by `{meta.get('command', '?')}`.")
    return lines + [""]


def _section_policies(summary: dict) -> list[str]:
    return ["## Policies", "",
            f"Totals per policy over the same token stream. Energy includes guard checks and pauses; "
            f"relative columns compare with `{BASELINE}` (the trained router).", "",
            *policy_table(summary), ""]


def _section_pareto(summary: dict, fig_dir: Path) -> list[str]:
    points = {n: (1e3 * p.get("J_per_token", math.nan), p.get("perplexity", math.nan))
              for n, p in summary["policies"].items()}
    points = {n: p for n, p in points.items() if all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)}
    if not points:
        return ["## Energy vs perplexity", "", "No policy has a finite energy and perplexity.", ""]
    front = pareto_front(points)
    plots.pareto(points, front, fig_dir / "pareto.png")
    return ["## Energy vs perplexity", "", f"![energy vs perplexity]({FIGURES}/pareto.png)", "",
            "Pareto-optimal policies (no other policy has both lower energy per token and lower perplexity): "
            + ", ".join(f"**{n}**" for n in front) + ".", ""]


def _section_chunks(rows: list[dict], fig_dir: Path) -> list[str]:
    if not rows:
        return ["## Per-chunk views", "", "chunks.csv is missing or empty: no temperature, load or cost-model plots.", ""]
    out = ["## Temperature", ""]
    if all(isinstance(r.get(k), (int, float)) for r in rows for k in ("t_start_s", "t_end_s", "temp_C")):
        plots.temperature_traces(rows, fig_dir / "temperature.png")
        out += [f"![temperature]({FIGURES}/temperature.png)", "",
                "GPU temperature read at the end of each chunk; each policy's clock starts at its first chunk.", ""]
    shares = expert_shares(rows)
    out += ["## Expert loads", ""]
    if shares:
        plots.expert_loads(shares, fig_dir / "expert_loads.png")
        out += [f"![expert loads]({FIGURES}/expert_loads.png)", "",
                "Share of each layer's (token, slot) assignments that went to each expert, summed over the run.", ""]
    else:
        out += ["No expert counts in chunks.csv.", ""]
    return out + _section_cost(rows, fig_dir)


def _section_cost(rows: list[dict], fig_dir: Path) -> list[str]:
    fit, online = affine_cost_fit(rows), online_residuals(rows)
    out = ["## Energy cost model", ""]
    if fit is None and not online:
        return out + ["Too few chunks with energy and expert counts to fit a cost model.", ""]
    empty = np.zeros(0)
    plots.cost_model(online, fit.measured if fit else empty, fit.predicted if fit else empty, fig_dir / "cost_model.png")
    out += [f"![cost model]({FIGURES}/cost_model.png)", ""]
    if online:
        means = ", ".join(f"{p}: {100 * np.mean([r for _, r in v]):.2f}%" for p, v in online.items())
        out.append(f"Left: the controller's online cost model, relative error of its prediction before each update "
                   f"(mean {means}).")
    if fit is not None:
        per_expert = ", ".join(f"{1e6 * c:.2f}" for c in fit.joule_per_token)
        out.append(f"Right: offline non-negative least squares over the {fit.measured.size} chunks with a positive "
                   f"measured energy, "
                   f"E ≈ e0·T + Σ_i c_i·n_i: e0 = {fit.idle_W:.1f} W, c_i = [{per_expert}] µJ per token-slot "
                   f"(summed over layers), R² = {fit.r2:.4f}, MAPE = {100 * fit.mape:.2f}%.")
    return out + [""]


def _metrics_row(name: str, m: Metrics) -> str:
    return (f"| {name} | {m.chunks} | {_fmt(m.energy_mape, '.2f', 100)}% | {_fmt(m.total_energy_error, '+.2f', 100)}% "
            f"| {_fmt(m.temp_rmse_C, '.2f')} | {_fmt(m.duration_mape, '.2f', 100)}% |")


def _section_reconcile(result: ReconcileResult | None, reason: str, fig_dir: Path) -> list[str]:
    out = ["## Simulator vs measurement", ""]
    if result is None:
        return out + [reason, ""]
    cal, met = result.calibration, result.goals_met()
    plots.energy_per_chunk(result.replay, result.split_row, fig_dir / "reconcile_energy.png")
    plots.temperature_replay(result.replay, result.replay_uncalibrated, result.split_row, fig_dir / "reconcile_temperature.png")
    out += [f"Trace `{result.source}` replayed through the simulator (same workloads, same idle gaps). "
            f"The preset `{result.base_preset}` was calibrated on the first {result.train.chunks} chunk windows "
            f"({cal.evaluations} simulator replays, scipy least_squares) and scored on the remaining "
            f"{result.heldout.chunks}.", "",
            "| split | chunks | energy MAPE | total energy error | temperature RMSE (°C) | duration MAPE |",
            "|---|---|---|---|---|---|",
            _metrics_row("train, calibrated", result.train), _metrics_row("held-out, calibrated", result.heldout),
            _metrics_row("held-out, base preset", result.heldout_uncalibrated), "",
            f"Goals on held-out chunks: energy MAPE ≤ {100 * GOALS['energy_mape']:.0f}% "
            f"{'met' if met['energy_mape_le_5pct'] else '**not met**'}; temperature RMSE ≤ {GOALS['temp_rmse_C']:.0f} °C "
            f"{'met' if met['temp_rmse_le_2C'] else '**not met**'}.", "",
            *[f"Warning: {w}" for w in result.warnings], *([""] if result.warnings else []),
            f"![energy per chunk]({FIGURES}/reconcile_energy.png)", "",
            f"![temperature replay]({FIGURES}/reconcile_temperature.png)", "",
            "| calibrated parameter | base | fitted |", "|---|---|---|"]
    out += [f"| {p.name} | {p.initial:.5g} | {p.fitted:.5g}{' (at bound)' if p.at_bound else ''} |" for p in cal.parameters]
    return out + [""]


# ---------------------------------------------------------------------------- driver
def _reconciliation(args, run_dir: Path, summary: dict, meta: dict) -> tuple[ReconcileResult | None, str]:
    measured = summary.get("backend") == "nvml" or meta.get("backend") == "nvml"
    trace_dir = args.trace_dir or (run_dir if measured else None)
    if args.no_reconcile:
        return None, "Reconciliation skipped (--no-reconcile)."
    if trace_dir is None:
        return None, ("This run's telemetry came from the simulator itself, so there is no measurement to compare "
                      "with. Pass `--trace-dir data/traces/<gpu>` to add a reconciliation with a measured trace.")
    trace = load_trace_dir(trace_dir)
    base = pick_preset(trace, args.preset)
    config = CalibrationConfig(max_evaluations=args.max_evaluations)
    return reconcile(trace, base, config, progress=not args.no_progress), ""


def write_report(run_dir: Path, args) -> Path:
    summary, rows, meta = load_run(run_dir)
    fig_dir = run_dir / FIGURES
    fig_dir.mkdir(exist_ok=True)
    result, reason = _reconciliation(args, run_dir, summary, meta)
    lines = [*_header(run_dir, summary, meta), *_section_policies(summary), *_section_pareto(summary, fig_dir),
             *_section_chunks(rows, fig_dir), *_section_reconcile(result, reason, fig_dir)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--trace-dir", type=Path, default=None, help="a measured trace to reconcile with (default: the "
                   "run's own trace when the run was measured)")
    p.add_argument("--preset", default=None, help="simulator preset to calibrate from (default: by GPU name)")
    p.add_argument("--max-evaluations", type=int, default=150, help="simulator replays for the calibration")
    p.add_argument("--no-reconcile", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = write_report(args.run_dir, args)
    except ValueError as exc:
        print(f"nectar report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
