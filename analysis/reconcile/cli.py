"""`nectar reconcile TRACE_DIR`: replay measured traces through the simulator, calibrate it, report held-out error.

TRACE_DIR is one trace folder (trace.csv.gz or trace.csv, or several *.csv.gz, and meta.json, as
`nectar run` / `nectar hw-run` write them), or a GPU folder of segment folders such as
data/traces/h100/ (main, thermal, power, long).

- One trace folder: the simulator's free parameters are fitted on the first --train-fraction of
  its chunks (in time order) and scored on the rest (held out by time).
- A GPU folder (or --by-segment): fitted on every window of --calibrate-on (default main) and
  scored on every other segment (held out by segment), with each policy's saving versus
  static-top2, measured and simulated.

- `--frontier RUN_DIR [RUN_DIR ...]` (no TRACE_DIR): a frontier run's stream re-priced by the
  simulator from the run's own cost_table.json (kept, dropped and cheap slots, dispatch, as the
  device measured them) with the GPU preset's power and thermal models, and each policy's saving
  vs static-top2 simulated beside measured (analysis/reconcile/frontier_replay.py). Writes --out
  (default: sim-vs-gpu-costs.json beside the first RUN_DIR) and a PNG plot of the same name.

- `--decode-steps FILE.json` (no TRACE_DIR): captured serving decode steps measured on a GPU
  (`benchmarks/decode_step.py`'s JSON), each row rebuilt as the decode-step workloads it timed and
  priced by the simulator, before and after fitting the preset's three captured-decode constants
  (decode_bandwidth_efficiency, decode_block_latency_s, decode_row_latency_s) on --calibrate-on's
  rows (default: the model with the most weight bytes), the other models held out
  (analysis/reconcile/decode_steps.py). Writes --out (default: sim-vs-gpu-decode.json beside FILE)
  and a PNG of the same name; --save PATH writes --preset with the fitted constants, only when they
  lower the held-out error (exit 1 otherwise).

- `--diagnose` (a GPU folder): per segment, each chunk's signed energy error set against what the
  trace records (temperature, power, clock, throttling, window length, tokens/s, position, idle
  time before it, the routing's FFN slots), bias versus scatter, the sensor-noise floor, and
  corrections fitted on --calibrate-on and applied to the others, with a one-line stated reason
  per segment (analysis/reconcile/diagnose.py); a `diagnosis` object per segment in the JSON.

Otherwise nothing is written unless --save PATH is given: then the calibrated preset is written
there (e.g. `--save sim/presets/h200_sxm.json` fits a preset for a new GPU from its committed
traces), named after the file; with a GPU folder, --out FILE.json writes the by-segment result
(with its diagnosis) as JSON. Exit status: 0 done, 2 unusable input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from nectar.cli.common import cli_errors, fraction, parser, positive_int, strict_json, wrap_note


def build_parser() -> argparse.ArgumentParser:
    from analysis.reconcile.replay import ENERGY_SOURCES, TIMINGS

    p = parser("nectar reconcile", __doc__)
    p.add_argument("trace_dir", type=Path, metavar="TRACE_DIR", nargs="?", default=None,
                   help="a trace folder, or a GPU folder of segment folders")
    p.add_argument("--frontier", type=Path, nargs="+", metavar="RUN_DIR", default=None,
                   help="frontier run folders (with frontier.json, trace.csv.gz, cost_table.json) to re-price "
                        "by their own measured cost tables; instead of TRACE_DIR")
    p.add_argument("--decode-steps", type=Path, metavar="FILE.json", default=None,
                   help="a decode-step benchmark JSON (benchmarks/decode_step.py) to reconcile and fit the "
                        "captured-decode constants on; instead of TRACE_DIR")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON to write: with --frontier its report (default: sim-vs-gpu-costs.json beside the "
                        "first RUN_DIR; the plot goes beside it as .png); with --decode-steps its report (default: "
                        "sim-vs-gpu-decode.json beside FILE, plot beside it); with a GPU folder the by-segment result")
    p.add_argument("--by-segment", action="store_true",
                   help="calibrate on one segment and hold out the others (implied by a GPU folder)")
    p.add_argument("--diagnose", action="store_true",
                   help="with a GPU folder: explain each segment's per-chunk energy error by what the traces record, "
                        "fit corrections on --calibrate-on, and state why a segment misses the energy goal")
    p.add_argument("--calibrate-on", default=None,
                   help="with --by-segment: the segment to calibrate on (default main); with --decode-steps: the model "
                        "to fit on (default: the one with the most weight bytes)")
    p.add_argument("--decode-time", choices=("graph_ms", "replay_ms"), default="graph_ms",
                   help="with --decode-steps: the measured time to match, the whole captured step (graph_ms) or the "
                        "replay alone (replay_ms)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--train-fraction", type=fraction, default=0.6,
                   help="one trace folder: first fraction of the chunks used for calibration")
    p.add_argument("--preset", default=None, help="starting preset, name or JSON path (default: by the trace's GPU)")
    p.add_argument("--save", "--save-preset", dest="save", type=Path, default=None,
                   help="write the calibrated preset to this JSON file (default: nothing is written)")
    p.add_argument("--overwrite", action="store_true", help="let --save or --out replace an existing file")
    p.add_argument("--max-evaluations", type=positive_int, default=300,
                   help="cap on simulator replays during calibration")
    p.add_argument("--energy-source", choices=ENERGY_SOURCES, default="mean",
                   help="measured energy per window: mean of counter and integrated power (mean), integrated power "
                        "when sampled (auto), counter, power")
    p.add_argument("--timing", choices=TIMINGS, default="measured",
                   help="replayed windows last as long as measured (idle padding), or only as long as their kernels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------- text output
def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _line(name: str, m) -> str:
    return (f"{name:<26}{m.chunks:>7}{_pct(m.energy_mape):>11}{_pct(m.total_energy_error):>11}"
            f"{m.temp_rmse_C:>10.2f}{_pct(m.duration_mape):>11}")


HEADER = f"{'':<26}{'chunks':>7}{'E MAPE':>11}{'E total':>11}{'T RMSE°C':>10}{'t MAPE':>11}"


def _calibration_lines(cal) -> list[str]:
    lines = [f"calibration: {cal.evaluations} simulator replays, cost {cal.cost_initial:.4g} -> {cal.cost_final:.4g} "
             f"({cal.message})"]
    lines += [f"  {p.name:<28}{p.initial:>12.5g} -> {p.fitted:<12.5g}{'  (at bound)' if p.at_bound else ''}"
              for p in cal.parameters]
    return lines


def _goal_line(met: dict[str, bool]) -> str:
    from analysis.reconcile.score import GOALS

    words = {"energy_mape_le_3pct": f"energy MAPE <= {100 * GOALS['energy_mape']:.0f}%",
             "temp_rmse_le_1.5C": f"temperature RMSE <= {GOALS['temp_rmse_C']:g} °C",
             "saving_within_3_points": f"saving within {GOALS['saving_points']:g} points"}
    return "goals (held out): " + "; ".join(f"{words[k]}: {'met' if v else 'NOT met'}" for k, v in met.items())


def print_time_split(result) -> None:
    print(f"trace: {result.source}  gpu: {result.gpu_name}  base preset: {result.base_preset}")
    print("\n".join(_calibration_lines(result.calibration)))
    print(HEADER)
    print(_line("train (calibrated)", result.train))
    print(_line("held-out (calibrated)", result.heldout))
    print(_line("held-out (base preset)", result.heldout_uncalibrated))
    print(_goal_line(result.goals_met()))
    for warning in result.warnings:
        print(wrap_note(f"warning: {warning}"))


def print_by_segment(result) -> None:
    print(f"traces: {result.source}  gpu: {result.gpu_name}  base preset: {result.base_preset}  "
          f"calibrated on: {result.calibrate_on} (every window)")
    print("\n".join(_calibration_lines(result.calibration)))
    print(HEADER)
    for s in result.segments:
        role = "held out" if s.held_out else "calibration"
        print(_line(f"{s.name} ({role})", s.calibrated))
        print(_line(f"{s.name} (base preset)", s.base))
    print(f"{'saving vs static-top2':<26}{'policy':>14}{'measured':>10}{'simulated':>11}{'gap (points)':>14}")
    for s in result.segments:
        for p in s.savings:
            if p.measured_saving is None:
                continue
            print(f"{s.name:<26}{p.policy:>14}{100 * p.measured_saving:>9.1f}%{100 * p.simulated_saving:>10.1f}%"
                  f"{p.gap_points:>+14.1f}")
    print(_goal_line(result.goals_met()))
    diagnosed = [s.diagnosis for s in result.segments if s.diagnosis is not None]
    if diagnosed:
        print(f"why (per-chunk energy error; corrections fitted on {result.calibrate_on}, applied to the others):")
        for d in diagnosed:
            print(f"  {d.reason}")
    for warning in result.warnings:
        print(wrap_note(f"warning: {warning}"))


# ---------------------------------------------------------------------------- driver
def _command(argv: list[str] | None) -> str:
    return "nectar reconcile " + " ".join(str(a) for a in (sys.argv[2:] if argv is None else argv))


def _save(result, path: Path) -> Path:
    """The calibrated preset, named after the file, written atomically."""
    from nectar.experiment.outputs import atomic_write
    from sim.presets import save_preset

    preset = result.calibration.preset.replace(name=path.stem)
    return atomic_write(path, lambda tmp: save_preset(preset, tmp))


def run_frontier(args, argv: list[str] | None) -> int:
    """--frontier: write the sim-vs-gpu report and its plot, print the table (or the JSON)."""
    from analysis.reconcile.frontier_replay import default_out, reconcile_frontier, table_text, write_plot
    from nectar.experiment.outputs import atomic_write_text, check_out_file

    out = args.out or default_out(args.frontier)
    plot = out.with_suffix(".png")
    check_out_file(out, args.overwrite, "--out")
    check_out_file(plot, args.overwrite, "--out (its plot)")
    report = reconcile_frontier(args.frontier, args.preset)
    report["command"] = _command(argv)
    atomic_write_text(out, strict_json(report, indent=1, sort_keys=True) + "\n")
    write_plot(report, plot)
    if args.json:
        print(strict_json(report, indent=2, sort_keys=True))
    else:
        print(table_text(report))
        print(f"written: {out} and {plot}")
    return 0


def run_decode_steps(args, argv: list[str] | None) -> int:
    """--decode-steps: write the sim-vs-gpu decode report and its plot, print the table (or the JSON),
    and with --save the fitted preset when it lowers the held-out error."""
    from analysis.reconcile.decode_steps import (default_out, fitted_preset, reconcile_decode_steps, table_text,
                                                 write_plot)
    from nectar.experiment.outputs import atomic_write, atomic_write_text, check_out_file
    from sim.presets import load_preset, save_preset

    out = args.out or default_out(args.decode_steps)
    plot = out.with_suffix(".png")
    check_out_file(out, args.overwrite, "--out")
    check_out_file(plot, args.overwrite, "--out (its plot)")
    if args.save is not None:
        check_out_file(args.save, args.overwrite, "--save")
    preset = load_preset(args.preset or "h100_sxm")
    report = reconcile_decode_steps(args.decode_steps, preset, args.calibrate_on, args.decode_time)
    report["command"] = _command(argv)
    atomic_write_text(out, strict_json(report, indent=1, sort_keys=True) + "\n")
    write_plot(report, plot)
    print(strict_json(report, indent=2, sort_keys=True) if args.json else table_text(report))
    if not args.json:
        print(f"written: {out} and {plot}")
    if args.save is None:
        return 0
    if not report["improves_held_out"]:
        print(f"nectar reconcile: the fitted constants do not lower the held-out error "
              f"({report['held_out_mape_before']:.3g} -> {report['held_out_mape_after']:.3g}); {args.save} not written",
              file=sys.stderr)
        return 1
    fitted = fitted_preset(report, preset, args.save.stem)
    atomic_write(args.save, lambda tmp: save_preset(fitted, tmp))
    if not args.json:
        print(f"preset with the fitted constants saved to {args.save}")
    return 0


@cli_errors("reconcile")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sources = [args.trace_dir is not None, args.frontier is not None, args.decode_steps is not None]
    if sum(sources) != 1:
        raise ValueError("give either TRACE_DIR or --frontier RUN_DIR [RUN_DIR ...] or --decode-steps FILE.json: exactly one")
    if args.frontier is not None:
        return run_frontier(args, argv)
    if args.decode_steps is not None:
        return run_decode_steps(args, argv)
    from analysis.reconcile.calibrate import CalibrationConfig
    from analysis.reconcile.score import load_trace_dir, pick_preset, reconcile
    from analysis.reconcile.segments import is_segment_folder, load_segments, reconcile_by_segment
    from nectar.experiment.outputs import atomic_write_text, check_out_file

    if not args.trace_dir.exists():
        raise ValueError(f"trace directory {str(args.trace_dir)!r} does not exist")
    by_segment = args.by_segment or is_segment_folder(args.trace_dir)
    if not by_segment and (args.out is not None or args.diagnose):
        raise ValueError("--out and --diagnose go with --frontier or a GPU folder of segments (--by-segment); "
                         "one trace folder writes only --save")
    if args.save is not None:
        check_out_file(args.save, args.overwrite, "--save")
    if args.out is not None:
        check_out_file(args.out, args.overwrite, "--out")
    config = CalibrationConfig(train_fraction=args.train_fraction, max_evaluations=args.max_evaluations,
                               energy_source=args.energy_source, timing=args.timing)
    if by_segment:
        segments = load_segments(args.trace_dir)
        base = pick_preset(next(iter(segments.values())), args.preset)
        result = reconcile_by_segment(segments, base, config, calibrate_on=args.calibrate_on or "main",
                                      progress=not args.no_progress, source=str(args.trace_dir))
        if args.diagnose:
            from analysis.reconcile.diagnose import diagnose_reconciliation

            diagnose_reconciliation(result, segments)
        show = print_by_segment
    else:
        trace = load_trace_dir(args.trace_dir)
        base = pick_preset(trace, args.preset)
        result = reconcile(trace, base, config, progress=not args.no_progress)
        show = print_time_split
    if args.save is not None:
        result.preset_path = _save(result, args.save)
    if args.out is not None:
        atomic_write_text(args.out, strict_json({**result.to_dict(), "command": _command(argv)}, indent=1,
                                                sort_keys=True) + "\n")
    if args.json:
        print(strict_json(result.to_dict(), indent=2, sort_keys=True))
    else:
        show(result)
        if result.preset_path:
            print(f"calibrated preset saved to {result.preset_path}")
        if args.out is not None:
            print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
