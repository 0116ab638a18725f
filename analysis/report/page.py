"""`nectar report RUN_DIR`: a markdown page (RUN_DIR/report.md) about one `nectar run`, with figures.

Reads RUN_DIR/summary.json, chunks.csv and meta.json (and trace.csv.gz for a measured run) and
writes the policy table, the energy–perplexity Pareto front, temperature traces, expert loads,
the energy cost model's fit and, when the run was measured on a GPU (backend "nvml") or
--trace-dir points at a measured trace (one trace folder, or a GPU folder of segment folders
such as data/traces/h100), the simulator-vs-measurement reconciliation (analysis.reconcile).
Figures go to RUN_DIR/report_figures/ and the page to RUN_DIR/report.md; both replace the old
ones only once everything is drawn. Exit status 2 on unusable input.
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

from nectar.cli.common import cli_errors, parser, positive_int

FIGURES = "report_figures"
BASELINE = "static-top2"
POLICY_NUMBERS = ("tokens", "energy_J", "J_per_token", "perplexity", "routing_agreement", "max_temp_C",
                  "mean_power_W", "fallback_chunks")
CHUNK_COLUMNS = ("policy", "chunk")


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
    """The rows of chunks.csv as typed dicts; ValueError naming the line when one is malformed."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CHUNK_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing} (is it a `nectar run` chunks.csv?)")
        rows = []
        for line, raw in enumerate(reader, start=2):
            if None in raw or any(v is None for v in raw.values()):
                raise ValueError(f"{path} line {line} has {'more' if None in raw else 'fewer'} cells than the header")
            try:
                row = {k: _cell(v) for k, v in raw.items()}
            except ValueError as exc:
                raise ValueError(f"{path} line {line}: {exc}") from None
            _check_chunk_row(row, path, line)
            rows.append(row)
    return rows


def _check_chunk_row(row: dict, path: Path, line: int) -> None:
    if not isinstance(row["chunk"], int) or row["policy"] is None:
        raise ValueError(f"{path} line {line}: 'chunk' must be an integer and 'policy' a name")
    counts = row.get("expert_counts")
    if counts is not None and not (isinstance(counts, list) and all(
            isinstance(layer, list) and all(isinstance(n, (int, float)) for n in layer) for layer in counts)):
        raise ValueError(f"{path} line {line}: 'expert_counts' must be a list of per-layer lists of counts")
    for key in ("t_start_s", "t_end_s", "temp_C", "energy_J"):
        if key in row and row[key] is not None and not isinstance(row[key], (int, float)):
            raise ValueError(f"{path} line {line}: {key!r} must be a number, got {row[key]!r}")


def check_summary(summary: Any, path: Path) -> None:
    """ValueError unless summary.json has a non-empty 'policies' table of numbers (or nulls)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("policies"), dict) or not summary["policies"]:
        raise ValueError(f"{path} has no 'policies' table")
    for name, p in summary["policies"].items():
        if not isinstance(p, dict):
            raise ValueError(f"{path}: policy {name!r} must be an object of figures, got {type(p).__name__}")
        bad = [k for k in POLICY_NUMBERS if p.get(k) is not None
               and (isinstance(p[k], bool) or not isinstance(p[k], (int, float)))]
        if bad:
            raise ValueError(f"{path}: policy {name!r} has non-numeric {bad}")


def load_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(summary, chunk rows, meta) of a run directory, with clear errors when something is missing."""
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no summary.json: is it a `nectar run --out` directory?")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{summary_path} is not valid JSON: {exc}") from exc
    check_summary(summary, summary_path)
    chunks_path = run_dir / "chunks.csv"
    try:
        rows = read_chunks(chunks_path) if chunks_path.is_file() else []
    except (KeyError, csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {chunks_path}: {exc}") from exc
    meta_path = run_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object")
    return summary, rows, meta


# ---------------------------------------------------------------------------- derived data
def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (energy, perplexity): no other point is ≤ in both and < in one."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points.values())
    return [name for name, p in points.items() if all(map(math.isfinite, p)) and not dominated(p)]


def by_policy(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(str(row["policy"]), []).append(row)
    return out


def expert_shares(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per policy, [L, E] share of each layer's expert slots over all its chunks."""
    out = {}
    for policy, rs in by_policy(rows).items():
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
    usable = [r for r in usable if all(len(layer) == width for layer in r["expert_counts"])
              and all(isinstance(r.get(k), (int, float)) for k in ("t_start_s", "t_end_s"))]
    if len(usable) < width + 2:
        return None
    from scipy.optimize import nnls

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
    for policy, rs in by_policy(rows).items():
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
    from analysis.report import plots

    plots.pareto(points, front, fig_dir / "pareto.png")
    return ["## Energy vs perplexity", "", f"![energy vs perplexity]({FIGURES}/pareto.png)", "",
            "Pareto-optimal policies (no other policy has both lower energy per token and lower perplexity): "
            + ", ".join(f"**{n}**" for n in front) + ".", ""]


def _section_chunks(rows: list[dict], fig_dir: Path, labels: list[str] | None = None) -> list[str]:
    from analysis.report import plots

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
        plots.expert_loads(shares, fig_dir / "expert_loads.png", labels)
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
    from analysis.report import plots

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


def _metrics_row(name: str, m) -> str:
    return (f"| {name} | {m.chunks} | {_fmt(m.energy_mape, '.2f', 100)}% | {_fmt(m.total_energy_error, '+.2f', 100)}% "
            f"| {_fmt(m.temp_rmse_C, '.2f')} | {_fmt(m.duration_mape, '.2f', 100)}% |")


METRICS_HEADER = ["| split | chunks | energy MAPE | total energy error | temperature RMSE (°C) | duration MAPE |",
                  "|---|---|---|---|---|---|"]


def _goals(met: dict[str, bool]) -> str:
    from analysis.reconcile.score import GOALS

    words = {"energy_mape_le_3pct": f"energy MAPE ≤ {100 * GOALS['energy_mape']:.0f}%",
             "temp_rmse_le_1.5C": f"temperature RMSE ≤ {GOALS['temp_rmse_C']:g} °C",
             "saving_within_3_points": f"each policy's saving within {GOALS['saving_points']:g} points"}
    return "Goals on held-out data: " + "; ".join(f"{words[k]} {'met' if v else '**not met**'}" for k, v in met.items()) + "."


def _parameters(cal) -> list[str]:
    return ["| calibrated parameter | base | fitted |", "|---|---|---|",
            *[f"| {p.name} | {p.initial:.5g} | {p.fitted:.5g}{' (at bound)' if p.at_bound else ''} |" for p in cal.parameters]]


def _section_reconcile(result, reason: str, fig_dir: Path) -> list[str]:
    out = ["## Simulator vs measurement", ""]
    if result is None:
        return out + [reason, ""]
    if hasattr(result, "segments"):
        return out + _by_segment(result, fig_dir)
    from analysis.report import plots

    cal, met = result.calibration, result.goals_met()
    plots.energy_per_chunk(result.replay, result.split_row, fig_dir / "reconcile_energy.png")
    plots.temperature_replay(result.replay, result.replay_uncalibrated, result.split_row, fig_dir / "reconcile_temperature.png")
    out += [f"Trace `{result.source}` replayed through the simulator (same workloads, same idle gaps). "
            f"The preset `{result.base_preset}` was calibrated on the first {result.train.chunks} chunk windows "
            f"({cal.evaluations} simulator replays, scipy least_squares) and scored on the remaining "
            f"{result.heldout.chunks} (held out by time).", "", *METRICS_HEADER,
            _metrics_row("train, calibrated", result.train), _metrics_row("held-out, calibrated", result.heldout),
            _metrics_row("held-out, base preset", result.heldout_uncalibrated), "", _goals(met), "",
            *[f"Warning: {w}" for w in result.warnings], *([""] if result.warnings else []),
            f"![energy per chunk]({FIGURES}/reconcile_energy.png)", "",
            f"![temperature replay]({FIGURES}/reconcile_temperature.png)", "", *_parameters(cal)]
    return out + [""]


def _by_segment(result, fig_dir: Path) -> list[str]:
    from analysis.report import plots

    cal = result.calibration
    rows = []
    for s in result.segments:
        role = "held out" if s.held_out else "calibration"
        rows += [_metrics_row(f"{s.name} ({role})", s.calibrated), _metrics_row(f"{s.name}, base preset", s.base)]
    savings = [f"| {s.name} | {p.policy} | {100 * p.measured_saving:.1f}% | {100 * p.simulated_saving:.1f}% | "
               f"{p.gap_points:+.1f} |" for s in result.segments for p in s.savings if p.measured_saving is not None]
    figure = plots.segment_temperatures(result.segments, fig_dir / "reconcile_segments.png")
    return [f"Traces `{result.source}` replayed through the simulator (same workloads, same timing). The preset "
            f"`{result.base_preset}` was calibrated on every window of segment `{result.calibrate_on}` "
            f"({cal.evaluations} simulator replays, scipy least_squares); the other segments are held out.", "",
            *METRICS_HEADER, *rows, "",
            "| segment | policy | measured saving vs static-top2 | simulated | gap (points) |", "|---|---|---|---|---|",
            *savings, "", _goals(result.goals_met()), "",
            *[f"Warning: {w}" for w in result.warnings], *([""] if result.warnings else []),
            f"![temperature by segment]({FIGURES}/{figure.name})", "", *_parameters(cal), ""]


# ---------------------------------------------------------------------------- driver
def _reconciliation(args, run_dir: Path, summary: dict, meta: dict):
    from analysis.reconcile.calibrate import CalibrationConfig
    from analysis.reconcile.score import load_trace_dir, pick_preset, reconcile
    from analysis.reconcile.segments import is_segment_folder, load_segments, reconcile_by_segment

    measured = summary.get("backend") == "nvml" or meta.get("backend") == "nvml"
    trace_dir = args.trace_dir or (run_dir if measured else None)
    if args.no_reconcile:
        return None, "Reconciliation skipped (--no-reconcile)."
    if trace_dir is None:
        return None, ("This run's telemetry came from the simulator itself, so there is no measurement to compare "
                      "with. Pass `--trace-dir data/traces/<gpu>` (every segment; calibrated on `main`, the others "
                      "held out) or `--trace-dir data/traces/<gpu>/<segment>` (one trace, held out by time) to add "
                      "a reconciliation with measured traces.")
    if not Path(trace_dir).exists():
        raise ValueError(f"--trace-dir {trace_dir} does not exist")
    config = CalibrationConfig(max_evaluations=args.max_evaluations)
    if is_segment_folder(trace_dir):
        segments = load_segments(trace_dir)
        base = pick_preset(next(iter(segments.values())), args.preset)
        return reconcile_by_segment(segments, base, config, progress=not args.no_progress, source=str(trace_dir)), ""
    trace = load_trace_dir(trace_dir)
    base = pick_preset(trace, args.preset)
    return reconcile(trace, base, config, progress=not args.no_progress), ""


def write_report(run_dir: Path, args) -> Path:
    """Draw every figure into a temporary folder, then swap it for report_figures/ and write
    report.md in one rename: an error or Ctrl-C leaves the old report as it was."""
    from nectar.experiment.outputs import OutputDir, atomic_write_text

    summary, rows, meta = load_run(run_dir)
    result, reason = _reconciliation(args, run_dir, summary, meta)
    labels = meta.get("experts") if isinstance(meta.get("experts"), list) else None
    with OutputDir(run_dir / FIGURES, overwrite=True, option="report figures") as fig_dir:
        lines = [*_header(run_dir, summary, meta), *_section_policies(summary), *_section_pareto(summary, fig_dir),
                 *_section_chunks(rows, fig_dir, labels), *_section_reconcile(result, reason, fig_dir)]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines).rstrip() + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar report", __doc__)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `nectar run --out` directory")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="measured traces to reconcile with: data/traces/<gpu> (by segment) or "
                        "data/traces/<gpu>/<segment> (by time) (default: the run's own trace when it was measured)")
    p.add_argument("--preset", default=None, help="simulator preset to calibrate from (default: by GPU name)")
    p.add_argument("--max-evaluations", type=positive_int, default=150, help="simulator replays for the calibration")
    p.add_argument("--no-reconcile", action="store_true", help="leave the reconciliation out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_errors("report")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = write_report(args.run_dir, args)
    print(f"wrote {path}")
    return 0
