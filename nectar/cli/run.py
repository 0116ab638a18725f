"""`nectar run`: the main job — routing policies on one token stream against a telemetry backend.

Default backend: the deterministic simulator. With `--backend nvml` the model runs on the GPU in
bf16 inside NVML energy windows (for the full GPU experiment — training DistilGPT2-MoE, calibration
windows, thermal and power segments — use `nectar hw-run`). Writes DIR/summary.json, DIR/chunks.csv (one row per
policy chunk), DIR/trace.csv.gz (every telemetry window, the backend-neutral trace format),
DIR/meta.json, DIR/convexity_instance.npz (for `nectar verify-convexity --run DIR`) and plots;
prints a table, or the summary as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from nectar.cli.experiment_args import (add_controller_args, add_sim_args, add_stream_args, backend_factory,
                                       configs, place_model)
from nectar.experiment.outputs import write_outputs
from nectar.experiment.policies import DEFAULT_POLICIES, POLICIES, check_policies
from nectar.experiment.runner import run_experiment
from nectar.experiment.summary import build_summary


def _policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return check_policies(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar run", description=__doc__.splitlines()[0])
    p.add_argument("--policies", type=_policies, default=list(DEFAULT_POLICIES),
                   help=f"comma list from {', '.join(POLICIES)} (default: {','.join(DEFAULT_POLICIES)})")
    add_stream_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory (default: runs/latest)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--model", type=Path, default=None,
                   help="a saved MoE checkpoint directory (default: the committed CPU demo model)")
    p.add_argument("--interleave", action="store_true", help="one shared backend, policies interleaved in time")
    add_controller_args(p)
    add_sim_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def print_table(summary: dict) -> None:
    header = f"{'policy':<16}{'mJ/token':>10}{'vs top2':>9}{'ppl':>9}{'Δppl':>8}{'agree':>7}{'maxT°C':>8}{'W':>7}{'pause':>7}"
    print(f"backend={summary['backend']} gpu={summary['gpu']} seed={summary['seed']}"
          + (f" priced_as={summary['priced_as']}" if summary.get("priced_as") else ""))
    print(header)
    base = summary["policies"].get("static-top2")
    for name, p in summary["policies"].items():
        rel_e = f"{100 * (p['J_per_token'] / base['J_per_token'] - 1):+.1f}%" if base else "-"
        rel_p = f"{100 * (p['perplexity'] / base['perplexity'] - 1):+.2f}%" if base else "-"
        print(f"{name:<16}{1e3 * p['J_per_token']:>10.4f}{rel_e:>9}{p['perplexity']:>9.3f}{rel_p:>8}"
              f"{p['routing_agreement']:>7.3f}{p['max_temp_C']:>8.1f}{p['mean_power_W']:>7.0f}{100 * p['pause_share']:>6.1f}%")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = configs(args, args.policies, interleave=True if args.interleave else None)
        factory = backend_factory(args, cfg)
        probe = factory()  # fail early and clearly (bad fault spec, no GPU or driver, bad preset)
        torch_device = probe.torch_device
        probe.close()
        from nectar.train.recipes import load_or_train

        model, stream, _ = load_or_train(args.model, seed=args.seed, progress=not args.no_progress)
        model = place_model(model, torch_device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"nectar run: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        runs = run_experiment(model, stream, factory, cfg, progress=not args.no_progress)
    except ValueError as exc:  # a policy the model cannot run (e.g. static-top9 on 6 experts)
        print(f"nectar run: error: {exc}", file=sys.stderr)
        return 2
    summary = build_summary(runs, cfg, backend=args.backend, faults=args.faults)
    for run in runs:
        run.backend.close()
    write_outputs(args.out, runs, summary, command="nectar run " + " ".join(argv if argv is not None else sys.argv[2:]))
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    else:
        print_table(summary)
        print(f"wrote {args.out}/summary.json, chunks.csv, trace.csv.gz and plots")
    return 0
