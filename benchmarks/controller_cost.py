"""Benchmark: the CPU work of a NECTAR chunk against a static chunk, in the main job itself.

Runs `nectar run` (the simulated main job: the committed CPU demo model, the README's policies;
options after `--` go to `nectar run`) with timers around each chunk (`runner.run_chunk`), the
controller's step (`NectarController.after_chunk`) and the quality check's re-run of a share of
the chunk under static routing (the `guard-shadow` forward that rides along inside the chunk's
window), and reports per policy the mean seconds
of a chunk — CPU time of the process (robust to other jobs on the machine) and wall time — split
into forward, check and controller, and each policy's chunk cost relative to static-top2's.

    python benchmarks/controller_cost.py --json-out controller_cost.json
    python benchmarks/controller_cost.py -- --policies static-top2,nectar --tokens 65536
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import write_json  # noqa: E402
from nectar.control.controller import NectarController  # noqa: E402
from nectar.experiment import runner  # noqa: E402


class Timers:
    """Process CPU and wall seconds per (policy, part), one entry per chunk."""

    def __init__(self):
        self.cpu = defaultdict(list)
        self.wall = defaultdict(list)

    def wrap(self, part: str, fn, policy_of):
        def timed(*args, **kwargs):
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (policy_of(*args), part)
                self.cpu[key].append(time.thread_time() - c0)
                self.wall[key].append(time.perf_counter() - w0)
        return timed


def instrument(timers: Timers) -> None:
    current = {"policy": ""}
    run_chunk, forward = runner.run_chunk, runner.forward_chunk

    def chunk(model, run, *args, **kwargs):
        current["policy"] = run.name
        return run_chunk(model, run, *args, **kwargs)

    def check_or_forward(model, batch, micro_rows=None, policy="", **kwargs):
        if policy != "guard-shadow":
            return forward(model, batch, micro_rows, policy, **kwargs)
        return timed_check(model, batch, micro_rows, policy, **kwargs)

    timed_check = timers.wrap("check", forward, lambda *a, **k: current["policy"])
    runner.run_chunk = timers.wrap("chunk", chunk, lambda model, run, *a: run.name)
    runner.forward_chunk = check_or_forward
    after = NectarController.after_chunk
    NectarController.after_chunk = timers.wrap("control", after, lambda self, *a: "nectar-controller")


def rows_of(timers: Timers) -> list[dict]:
    policies = sorted({p for p, part in timers.cpu if part == "chunk"})
    rows = []
    for policy in policies:
        row = {"policy": policy, "chunks": len(timers.cpu[(policy, "chunk")])}
        for clock, table in (("cpu", timers.cpu), ("wall", timers.wall)):
            chunk = sum(table[(policy, "chunk")])
            check = sum(table.get((policy, "check"), []))
            # only NECTAR policies have a controller step (the check rides along in the chunk's forward)
            control = sum(table.get(("nectar-controller", "control"), [])) if policy.startswith("nectar") else 0.0
            n = row["chunks"]
            row.update({f"{clock}_s_per_chunk": chunk / n, f"{clock}_forward_s": (chunk - control - check) / n,
                        f"{clock}_check_s": check / n, f"{clock}_control_s": control / n,
                        f"{clock}_median_chunk_s": statistics.median(table[(policy, "chunk")])})
        rows.append(row)
    base = next((r for r in rows if r["policy"] == "static-top2"), None)
    for row in rows:
        for clock in ("cpu", "wall"):
            row[f"{clock}_vs_static_top2"] = (row[f"{clock}_s_per_chunk"] / base[f"{clock}_s_per_chunk"]
                                              if base else None)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, run_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU time is the main thread's)")
    args = parser.parse_args(ours)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    timers = Timers()
    instrument(timers)
    from nectar.cli.run import main as run_main

    with tempfile.TemporaryDirectory() as tmp:
        code = run_main(["--out", str(Path(tmp) / "run"), "--no-progress", *run_args])
    rows = rows_of(timers)
    print(f"{'policy':<16}{'chunks':>7}{'cpu s/chunk':>13}{'forward':>9}{'check':>8}{'control':>9}{'vs top2':>9}"
          f"{'wall s/chunk':>14}")
    for r in rows:
        print(f"{r['policy']:<16}{r['chunks']:>7}{r['cpu_s_per_chunk']:13.3f}{r['cpu_forward_s']:9.3f}"
              f"{r['cpu_check_s']:8.3f}{r['cpu_control_s']:9.3f}{r['cpu_vs_static_top2']:9.2f}"
              f"{r['wall_s_per_chunk']:14.3f}")
    write_json(args.json_out, rows)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
