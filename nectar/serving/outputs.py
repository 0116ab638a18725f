"""What a serving run writes: the frontier JSON, per-step and per-request CSVs, and three plots.

steps.csv has one row per step (`nectar.serving.metrics.StepRecord`), with `check_share`: the share
of a decode step's window that was NECTAR's ride-along check (0 on every other step).

Plots: J per generated token against the decode batch (the load), time per decode step against
the decode batch (TPOT as the load moves), and the frontier (savings vs perplexity increase, the
static hull). Files are written inside the run's temporary folder (`OutputDir`), which replaces
the output folder in one rename.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nectar.cli.common import strict_json  # noqa: E402
from nectar.experiment.frontier_plots import frontier_plot  # noqa: E402
from nectar.serving.loop import PolicyServing  # noqa: E402


def write_steps_csv(path: Path, runs: dict[str, PolicyServing]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "phase", "t_start_s", "t_end_s", "energy_J", "batch", "tokens", "generated",
                         "check_share"])
        for name, run in runs.items():
            for s in run.steps:
                writer.writerow([name, s.phase, f"{s.t_start_s:.6f}", f"{s.t_end_s:.6f}", f"{s.energy_J:.6f}",
                                 s.batch, s.tokens, s.generated, f"{s.check_share:.6f}"])


def write_requests_csv(path: Path, runs: dict[str, PolicyServing]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "request_id", "arrival_s", "prompt_tokens", "output_tokens", "t_first_token_s",
                         "t_done_s"])
        for name, run in runs.items():
            for r in run.requests:
                writer.writerow([name, r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens,
                                 r.t_first_token_s, r.t_done_s])


def by_batch(run: PolicyServing) -> dict[int, tuple[float, float, int]]:
    """Decode steps grouped by batch size: (J per generated token, seconds per step, steps)."""
    groups: dict[int, list] = defaultdict(list)
    for s in run.steps:
        if s.phase == "decode":
            groups[s.batch].append(s)
    return {b: (sum(s.energy_J for s in ss) / sum(s.generated for s in ss),
                sum(s.t_end_s - s.t_start_s for s in ss) / len(ss), len(ss)) for b, ss in sorted(groups.items())}


def load_plots(runs: dict[str, PolicyServing], out: Path) -> None:
    """J/token vs load and step time (TPOT) vs load, one line per policy."""
    for column, ylabel, name in ((0, "J per generated token (decode)", "j_per_token_vs_load.png"),
                                 (1, "decode step time = TPOT (ms)", "tpot_vs_load.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy, run in runs.items():
            rows = by_batch(run)
            scale = 1e3 if column == 1 else 1.0
            ax.plot(list(rows), [scale * v[column] for v in rows.values()], marker="o", ms=3, label=policy)
        ax.set(xlabel="requests in the decode batch", ylabel=ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def write_serving_outputs(out: Path, report: dict, runs: dict[str, PolicyServing], command: str) -> None:
    (out / "frontier.json").write_text(strict_json(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "command.txt").write_text(command + "\n", encoding="utf-8")
    write_steps_csv(out / "steps.csv", runs)
    write_requests_csv(out / "requests.csv", runs)
    load_plots(runs, out)
    frontier_plot(report, out / "frontier.png")
