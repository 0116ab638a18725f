"""`nectar frontier`: NECTAR against the static frontier — every policy that does not adapt, and
their time-sharing mixtures — on the same token stream, in the same run.

Runs the static policies (static-top1/2/3, static-cheap, a sweep of fixed cheap-expert biases in
NECTAR's own router, per-token confidence thresholds, random per-token cheap mixtures), an adaptive
baseline that holds a cheap share with a PI controller, and NECTAR, on one workload (stationary,
domain-shift, thermal, power-schedule); computes the static hull and NECTAR's margin over it.
With --clock-sweep (simulator only: the lent GPUs' clocks are never changed) the static frontier
also gets the clock family `clock:MHZ` (static top-2 with the simulated SM clock locked at MHZ),
and every policy runs again on the sweep's best clock (`POLICY@clock:MHZ`): the report gives NECTAR
alone and on top of the best clock. Writes DIR/frontier.json (the report), summary.json,
chunks.csv, trace.csv.gz, meta.json and plots (frontier.png, timeline.png); prints a table, or the
report as JSON with --json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nectar.cli.common import cli_errors, comma_list, parser, positive_int, strict_json
from nectar.cli.experiment_args import (add_controller_args, add_sim_args, add_stream_args, check_stream_args,
                                        schedule)
from nectar.experiment.policy_lists import ADAPTIVE, STATIC_FRONTIER

# Spelled out so that `--help` does not import torch (tests/cli/test_help.py checks them).
WORKLOADS = ("stationary", "domain-shift", "thermal", "power-schedule")


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar frontier", __doc__)
    p.add_argument("--workload", choices=WORKLOADS, default="stationary", help="the stream and its conditions")
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim",
                   help="telemetry: the deterministic GPU simulator, or NVML on this machine's GPU")
    p.add_argument("--policies", type=comma_list, default=None,
                   help="comma list of policies; the reference (static-top2, or a transformers MoE model's own "
                        f"top-K) must be among them (default: {','.join(STATIC_FRONTIER + ADAPTIVE)}; a transformers "
                        "MoE model: its own static frontier, then nectar)")
    p.add_argument("--clock-sweep", type=clock_sweep, default=None, metavar="MHZ,MHZ,...",
                   help="simulator only: add clock:MHZ (static top-2 at that locked SM clock) for each clock, then "
                        "run every policy but the reference again at the best one (POLICY@clock:MHZ)")
    p.add_argument("--model", type=Path, default=None,
                   help="a saved model folder, as for `nectar run --model` (default: the committed data/models/cpu-demo)")
    add_stream_args(p)
    p.add_argument("--block-chunks", type=positive_int, default=4, help="domain-shift: chunks per domain block")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="run every policy this many times (seeds seed, seed+1, …); the margin gets a 95%% interval")
    p.add_argument("--out", type=Path, default=Path("runs/frontier"), help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the frontier report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_controller_args(p)
    add_sim_args(p)
    return p


def clock_sweep(text: str) -> list[float]:
    """argparse type of --clock-sweep: distinct positive clocks in MHz."""
    from nectar.experiment.clocks import parse_clock_sweep

    try:
        return parse_clock_sweep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_args(args: argparse.Namespace) -> None:
    check_stream_args(args)
    if args.workload == "thermal" and (args.temp_cap is None or args.heat is None):
        raise ValueError("--workload thermal needs --temp-cap C and --heat 'seconds:°C,…' (the heat source)")
    if args.workload == "power-schedule" and args.power_budget is None:
        raise ValueError("--workload power-schedule needs --power-budget 'seconds:W,…'")
    if args.policies is None:
        return
    if not any(name.startswith("static-top") for name in args.policies):
        raise ValueError("--policies must include the reference (static-top2, or a transformers MoE model's own "
                         "static-top<K>): the frontier measures every policy against it")
    from nectar.experiment.policies import check_policies

    try:
        check_policies(args.policies)
    except ValueError as exc:
        raise ValueError(f"--policies: {exc}") from None


@cli_errors("frontier")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from nectar.cli.replicas import launch
    from nectar.experiment.frontier_run import run_frontier
    from nectar.experiment.outputs import prepare_out
    from nectar.train.recipes import committed_model

    command = "nectar frontier " + " ".join(argv if argv is not None else sys.argv[2:])
    where = launch()   # started by torchrun: this process is one data-parallel replica (None: one process)
    if where is not None:
        return _replica_main(args, command, where)
    out = prepare_out(args.out, args.overwrite, inputs=[args.model or committed_model("cpu-demo")])
    with out as tmp:
        report = run_frontier(args, tmp, command=command)
    _print(args, report)
    return 0


def _replica_main(args: argparse.Namespace, command: str, where) -> int:
    """One data-parallel replica of `nectar frontier` (see nectar.cli.replicas): rank 0 writes and prints."""
    from contextlib import nullcontext

    from nectar.cli.experiment_args import backend_factory, configs
    from nectar.cli.replicas import device_options, replica_group
    from nectar.experiment.frontier_run import default_policies, run_frontier
    from nectar.experiment.outputs import prepare_out
    from nectar.train.recipes import committed_model

    out = (prepare_out(args.out, args.overwrite, inputs=[args.model or committed_model("cpu-demo")])
           if where.writes else nullcontext(None))
    probe = backend_factory(args, configs(args, args.policies or default_policies(None)))()
    torch_device = probe.torch_device
    probe.close()
    with replica_group(torch_device, where), out as tmp:
        report = run_frontier(args, tmp, command, backend_options=device_options(torch_device, where))
    if where.writes:
        _print(args, report)
    return 0


def _print(args: argparse.Namespace, report: dict) -> None:
    if args.json:
        print(strict_json(report, indent=2, sort_keys=True))
    else:
        from nectar.experiment.frontier_run import print_frontier

        print_frontier(report)
        print(f"wrote {args.out}/frontier.json, summary.json, chunks.csv, trace.csv.gz and plots")


__all__ = ["build_parser", "main", "schedule"]
