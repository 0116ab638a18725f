"""Writing a run directory: summary.json, chunks.csv, trace.csv.gz, meta.json, the convexity
instance and the plots. Shared by `nectar run` (simulator or NVML) and the on-device runner.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from nectar.experiment.runner import PolicyRun
from nectar.experiment.summary import record_rows
from nectar.telemetry.trace import TraceRow, write_meta, write_trace


def write_chunks_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})


def export_convexity(out: Path, runs: list[PolicyRun]) -> None:
    """The nectar controller's last chunk problem (first MoE layer) for `verify-convexity --run`."""
    nectar_run = next((r for r in runs if r.spec.is_nectar), None)
    if nectar_run is None or nectar_run.controller.last_instance is None:
        return
    inst = nectar_run.controller.last_instance
    np.savez_compressed(out / "convexity_instance.npz", **{k: np.asarray(v) for k, v in inst.items()})


def write_outputs(out: Path, runs: list[PolicyRun], summary: dict, command: str,
                  extra_trace: list[TraceRow] | None = None, extra_files: dict[str, dict] | None = None,
                  plots: tuple[str, ...] = (), **meta) -> None:
    """Everything a run leaves: summary.json, chunks.csv, trace.csv.gz, meta.json, the convexity
    instance, any `extra_files` (name → JSON document) and the plots (the run's, plus `plots`
    families, e.g. "frontier")."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for name, document in (extra_files or {}).items():
        (out / name).write_text(json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
    rows = record_rows(runs)
    write_chunks_csv(out / "chunks.csv", rows)
    write_trace(out / "trace.csv.gz", [*(extra_trace or []), *(row for run in runs for row in run.trace)])
    write_meta(out / "meta.json", command=command, backend=summary["backend"], gpu=summary["gpu"],
               seed=summary["seed"], **meta)
    export_convexity(out, runs)
    from nectar.experiment.plots import write_all  # matplotlib only when plots are written

    write_all(rows, summary, out, temp_cap=summary.get("temp_cap_C"))
    if "frontier" in plots and extra_files and "frontier.json" in extra_files:
        from nectar.experiment.frontier_plots import write_frontier_plots

        write_frontier_plots(extra_files["frontier.json"], rows, out)
