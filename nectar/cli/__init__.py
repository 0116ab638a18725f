"""NECTAR: energy- and thermal-aware Mixture-of-Experts inference with test-time-adapted routing.

NECTAR routes the tokens of a Mixture-of-Experts language model (a DistilGPT2-architecture MoE)
with a router that adapts at test time, once per chunk of tokens, to the GPU energy, temperature
and power it measures, behind a quality guard that bounds the perplexity cost. One core runs
against a deterministic GPU simulator (default) or NVML on a real GPU.

Core commands (run, train, hw-run) live in the core; analysis commands are reached through
`nectar.plugins` so that the core never imports them. `nectar --help` and `nectar <command>
--help` import neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import signal
import sys

from nectar import __version__
from nectar.cli.common import HelpFormatter, cli_errors
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


def _serve(argv: list[str]) -> int:
    from nectar.cli.serve import main as serve_main

    return serve_main(argv)


CORE = {"run": _run, "train": _train, "hw-run": _hw_run, "frontier": _frontier, "serve": _serve}
HELP = {
    "run": "run routing policies on one token stream against a telemetry backend (default: the simulator)",
    "train": "train the dense DistilGPT2-architecture model, upcycle it to MoE and fine-tune",
    "frontier": "NECTAR against the static frontier (every non-adaptive policy and their mixtures) on one workload",
    "serve": "serving with continuous batching: every policy on one request trace (TTFT, TPOT, J/token vs load)",
    "hw-run": "on a GPU host: train/load the model, then the static frontier and NECTAR with NVML energy windows",
    "verify-convexity": "build the chunk problem in cvxpy and compare the online router with the optimum",
    "reconcile": "replay measured traces through the simulator, calibrate it, report held-out error",
    "report": "write a markdown report with plots for a run directory",
}
EPILOG = ("examples:\n  nectar run --out runs/main            the main simulated experiment (~25 s on 2 cores)\n"
          "  nectar run --help                     options of one command\n"
          "  nectar reconcile data/traces/h100 --by-segment\n"
          "exit status: 0 ok, 1 a check failed or results are incomplete, 2 bad input, 130 interrupted")


def build_parser() -> argparse.ArgumentParser:
    description = "\n\n".join(__doc__.strip().split("\n\n")[:2]) + "\n\ncommands:\n" + "\n".join(
        f"  {name:<18}{text}" for name, text in HELP.items())
    parser = argparse.ArgumentParser(prog="nectar", description=description, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"nectar {__version__}")
    parser.add_argument("command", choices=sorted({*CORE, *COMMANDS}), metavar="COMMAND",
                        help="one of: " + ", ".join(HELP))
    return parser


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def _dispatch(command: str, rest: list[str]) -> int:
    """The command's main, inside the one-line-error wrapper (which loading it may also need)."""
    def call(argv: list[str]) -> int:
        if command in CORE:
            return CORE[command](argv)
        return int(load_object(COMMANDS[command])(argv) or 0)
    return cli_errors(command)(call)(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in CORE and command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose one of {', '.join(HELP)}")
    try:  # SIGTERM ends a command like Ctrl-C: outputs cleaned up, exit status 130
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored (nohup, &)
    except ValueError:  # not the main thread
        pass
    return _dispatch(command, rest)


if __name__ == "__main__":
    raise SystemExit(main())
