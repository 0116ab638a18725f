"""`nectar frontier`: NECTAR against the static frontier — every policy that does not adapt, and
their time-sharing mixtures — on the same token stream, in the same run.

Runs the static policies (static-top1/2/3, static-cheap, a sweep of fixed cheap-expert biases in
NECTAR's own router, per-token confidence thresholds, random per-token cheap mixtures), an adaptive
baseline that holds a cheap share with a PI controller, and NECTAR, on one workload (stationary,
domain-shift, thermal, power-schedule); computes the static hull and NECTAR's margin over it.
Writes DIR/frontier.json (the report), DIR/summary.json, chunks.csv, trace.csv.gz, meta.json and
plots (frontier.png, timeline.png); prints a table, or the report as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nectar.cli.experiment_args import add_controller_args, add_sim_args, add_stream_args, positive_int

STATIC_FRONTIER = ("static-top1", "static-top2", "static-top3", "static-cheap",
                   "fixed-bias:0.5", "fixed-bias:1", "fixed-bias:2", "fixed-bias:3", "fixed-bias:5",
                   "top-p:0.5", "top-p:0.7", "top-p:0.9", "mix:0.25", "mix:0.5", "mix:0.75")
ADAPTIVE = ("pi-share:0.5", "nectar")


def build_parser() -> argparse.ArgumentParser:
    from nectar.experiment.workloads import WORKLOADS

    p = argparse.ArgumentParser(prog="nectar frontier", description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=WORKLOADS, default="stationary", help="the stream and its conditions (default: stationary)")
    p.add_argument("--policies", default=",".join(STATIC_FRONTIER + ADAPTIVE),
                   help="comma list of policies (default: the whole static frontier, pi-share:0.5 and nectar)")
    p.add_argument("--model", type=Path, default=None, help="a saved MoE model directory (default: the committed CPU demo model)")
    add_stream_args(p, tokens=65536)
    p.add_argument("--block-chunks", type=positive_int, default=4, help="domain-shift: chunks per domain block (default: 4)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run every policy this many times (seeds seed, seed+1, …); the margin gets a 95%% interval")
    p.add_argument("--out", type=Path, default=Path("runs/frontier"), help="output directory (default: runs/frontier)")
    p.add_argument("--json", action="store_true", help="print the frontier report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_controller_args(p)
    add_sim_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nectar.experiment.frontier_run import run_frontier, print_frontier

    try:
        report = run_frontier(args, command="nectar frontier " + " ".join(argv if argv is not None else sys.argv[2:]))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"nectar frontier: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, allow_nan=False))
    else:
        print_frontier(report)
        print(f"wrote {args.out}/frontier.json, summary.json, chunks.csv, trace.csv.gz and plots")
    return 0
