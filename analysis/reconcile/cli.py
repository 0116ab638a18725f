"""`nectar reconcile TRACE_DIR`: replay a measured trace through the simulator, calibrate, report held-out error.

TRACE_DIR holds trace.csv.gz (or trace.csv, or several *.csv.gz) and meta.json, as written by
`nectar run` / `nectar hw-run`, e.g. data/traces/h100/. The simulator's free parameters are fitted
on the first --train-fraction of the chunks; the rest is held out. A measured trace (meta backend
"nvml") saves the calibrated preset to sim/presets/calibrated/<preset>.json unless --no-save;
--save-preset PATH saves it anywhere, for any trace. Exit status 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.reconcile.calibrate import CalibrationConfig, save_calibrated
from analysis.reconcile.score import GOALS, Metrics, ReconcileResult, load_trace_dir, pick_preset, reconcile
from analysis.reconcile.replay import ENERGY_SOURCES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar reconcile", description=__doc__.splitlines()[0])
    p.add_argument("trace_dir", type=Path, metavar="TRACE_DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--train-fraction", type=float, default=CalibrationConfig.train_fraction,
                   help="first fraction of the chunks used for calibration (default %(default)s)")
    p.add_argument("--preset", default=None, help="starting preset, name or JSON path (default: by the trace's GPU)")
    p.add_argument("--save-preset", type=Path, default=None, help="write the calibrated preset here")
    p.add_argument("--no-save", action="store_true", help="never write a calibrated preset")
    p.add_argument("--max-evaluations", type=int, default=CalibrationConfig.max_evaluations,
                   help="cap on simulator replays during calibration (default %(default)s)")
    p.add_argument("--energy-source", choices=ENERGY_SOURCES, default="auto",
                   help="measured energy per window: integrated instant power when sampled (auto), counter, power")
    p.add_argument("--no-progress", action="store_true")
    return p


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def _line(name: str, m: Metrics) -> str:
    return (f"{name:<22}{m.chunks:>7}{_pct(m.energy_mape):>11}{_pct(m.total_energy_error):>11}"
            f"{m.temp_rmse_C:>10.2f}{_pct(m.duration_mape):>11}")


def print_text(result: ReconcileResult) -> None:
    cal = result.calibration
    print(f"trace: {result.source}  gpu: {result.gpu_name}  base preset: {result.base_preset}")
    print(f"calibration: {cal.evaluations} simulator replays, cost {cal.cost_initial:.4g} -> {cal.cost_final:.4g} "
          f"({cal.message})")
    for p in cal.parameters:
        print(f"  {p.name:<28}{p.initial:>12.5g} -> {p.fitted:<12.5g}{'  (at bound)' if p.at_bound else ''}")
    print(f"{'split':<22}{'chunks':>7}{'E MAPE':>11}{'E total':>11}{'T RMSE°C':>10}{'t MAPE':>11}")
    print(_line("train (calibrated)", result.train))
    print(_line("held-out (calibrated)", result.heldout))
    print(_line("held-out (base preset)", result.heldout_uncalibrated))
    met = result.goals_met()
    print(f"goals: energy MAPE <= {100 * GOALS['energy_mape']:.0f}%: {'met' if met['energy_mape_le_5pct'] else 'NOT met'}; "
          f"temperature RMSE <= {GOALS['temp_rmse_C']:.0f} °C: {'met' if met['temp_rmse_le_2C'] else 'NOT met'}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.preset_path:
        print(f"calibrated preset saved to {result.preset_path}")


def json_safe(value):
    """NaN/inf become null (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _save_path(args, trace) -> Path | None | bool:
    if args.no_save:
        return None
    if args.save_preset is not None:
        return args.save_preset
    return True if trace.backend == "nvml" else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = CalibrationConfig(train_fraction=args.train_fraction, max_evaluations=args.max_evaluations,
                                   energy_source=args.energy_source)
        trace = load_trace_dir(args.trace_dir)
        base = pick_preset(trace, args.preset)
        result = reconcile(trace, base, config, progress=not args.no_progress)
    except ValueError as exc:
        print(f"nectar reconcile: error: {exc}", file=sys.stderr)
        return 2
    target = _save_path(args, trace)
    if target is not None:
        result.preset_path = save_calibrated(result.calibration, None if target is True else target)
    if args.json:
        print(json.dumps(json_safe(result.to_dict()), indent=2, sort_keys=True))
    else:
        print_text(result)
    return 0
