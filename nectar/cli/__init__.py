"""Command-line interface: `nectar <command>` (console script) or `python -m nectar <command>`.

Core commands (run, train) live in the core; analysis and hardware commands are reached through
`nectar.plugins` so that the core never imports them.
"""

from __future__ import annotations

import argparse
import sys

from nectar import __version__
from nectar.plugins import COMMANDS, load_object


def _run(argv: list[str]) -> int:
    from nectar.cli.run import main as run_main

    return run_main(argv)


def _train(argv: list[str]) -> int:
    from nectar.cli.train import main as train_main

    return train_main(argv)


def _hw_run(argv: list[str]) -> int:
    from nectar.cli.hw_run import main as hw_run_main

    return hw_run_main(argv)


def _frontier(argv: list[str]) -> int:
    from nectar.cli.frontier import main as frontier_main

    return frontier_main(argv)


CORE = {"run": _run, "train": _train, "hw-run": _hw_run, "frontier": _frontier}
HELP = {
    "run": "run routing policies on one token stream against a telemetry backend (default: sim)",
    "train": "train the dense DistilGPT2-architecture model, upcycle it to MoE and fine-tune",
    "frontier": "NECTAR against the static frontier (every non-adaptive policy and their mixtures) on one workload",
    "verify-convexity": "build the chunk problem in cvxpy and compare with the online router",
    "reconcile": "replay measured traces through the simulator, calibrate, report held-out error",
    "report": "write a markdown report with plots for a run directory",
    "hw-run": "on a GPU host: train/load the model and run policies with NVML energy windows",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="nectar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nectar {__version__}")
    parser.add_argument("command", choices=sorted({*CORE, *COMMANDS}), help="; ".join(f"{k}: {v}" for k, v in HELP.items()))
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in CORE and command not in COMMANDS:
        parser.error(f"unknown command {command!r}")
    if command in CORE:
        return CORE[command](rest)
    return int(load_object(COMMANDS[command])(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
