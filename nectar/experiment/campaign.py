"""The GPU campaign behind `nectar hw-run`: the whole GPU experiment in one command.

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only (no simpy, no cvxpy, no
network), run with `PYTHONPATH=. python -m nectar hw-run --out DIR`:

1. build the model (docs/design.md §8): train it with a recipe within a time budget (dense
   DistilGPT2-shape parent → sparse upcycling → MoE fine-tune, bf16), or load `--model DIR`;
2. warm the GPU up, then measure calibration windows of ≥ 5 s (idle, static-top2, static-top1): a
   trace for the reconciliation of the simulator with the GPU;
3. per workload (stationary, domain-shift, power-schedule, thermal): the static frontier and NECTAR
   on the same stream with NVML energy windows, `--repeats` times; each workload writes a run
   directory (frontier.json, summary.json, chunks.csv, trace.csv.gz, meta.json, plots). Policies
   are interleaved in time on the one GPU, except under a temperature cap: the GPU's temperature is
   shared, so there each policy runs on its own, after the same warm-up, beside a co-tenant process
   that heats the GPU (`backend.cotenant`). A power budget is a schedule over each policy's own
   time (default: 0.85 / 0.75 / 0.85 of static-top2's calibrated power over thirds of it).
A workload that would end after `--deadline-s` is skipped and says so. `--backend sim --device cpu`
runs the same orchestration on the simulator (for tests).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nectar.control.schedule import Schedule
from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.frontier_run import build_workload, frontier, write_frontier
from nectar.experiment.policies import policy_router
from nectar.experiment.runner import RunConfig
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.trace import TraceRow, write_trace
from nectar.telemetry.workload import merge_workloads


@dataclass
class Calibration:
    rows: list[TraceRow]
    tokens_per_s: float            # static-top2 throughput
    power_W: float                 # static-top2 mean power
    joules_per_token: float


def stream_chunk(stream: torch.Tensor, rows: int, seq_len: int, device) -> torch.Tensor:
    """One micro-batch [rows, seq_len] of the stream, for warm-up and calibration."""
    need = rows * seq_len
    return stream.repeat(math.ceil(need / stream.numel()))[:need].view(rows, seq_len).to(device)


def measured_block(model, backend, chunk, policy: str, seconds: float, kind: str) -> TraceRow:
    """One window of back-to-back chunks under `policy` lasting ≥ `seconds` (calibration/warm-up)."""
    install(model, [policy_router(policy, layer) for _, layer in model.moe_layers()])

    def compute():
        workloads, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            workloads.append(forward_chunk(model, chunk, policy=policy).workload)
        return merge_workloads(workloads, policy)

    window = backend.run_chunk(compute)
    return TraceRow(window, window.workload, kind=kind, policy=policy)


def calibrate(model, backend, chunk, warmup_s: float, calibration_s: float) -> Calibration:
    """Warm-up, then ≥ `calibration_s` windows of idle, static-top2 and static-top1."""
    rows = [measured_block(model, backend, chunk, "static-top2", warmup_s, "warmup"),
            TraceRow(backend.idle(calibration_s), None, kind="idle", policy="idle")]
    rows += [measured_block(model, backend, chunk, p, calibration_s, "calibration") for p in ("static-top2", "static-top1")]
    top2 = rows[2]
    tokens = top2.workload.tokens
    return Calibration(rows, tokens / top2.window.duration_s, top2.window.mean_power_W,
                       window_energy_J(top2.window) / tokens)


def report_speed(model, chunk) -> dict:
    """Forward throughput of the model (plain call and forward_chunk), so that a slow run can be told
    apart from a slow measurement."""
    install(model, [policy_router("static-top2", layer) for _, layer in model.moe_layers()])
    sync = torch.cuda.synchronize if chunk.is_cuda else (lambda: None)
    out = {}
    for label, fn in (("plain_forward", lambda: model(input_ids=chunk, use_cache=False)),
                      ("forward_chunk", lambda: forward_chunk(model, chunk))):
        with torch.no_grad():
            fn()
            sync()
            start = time.perf_counter()
            for _ in range(3):
                fn()
            sync()
        out[f"{label}_tokens_per_s"] = 3 * chunk.numel() / (time.perf_counter() - start)
    out["ratio"] = out["forward_chunk_tokens_per_s"] / out["plain_forward_tokens_per_s"]
    return out


def chunks_for(seconds: float, tokens_per_s: float, chunk_tokens: int, policies: int, lo: int = 2, hi: int = 64) -> int:
    """Chunks per policy so that one repeat of a workload takes about `seconds` of GPU time."""
    per_chunk_s = chunk_tokens / tokens_per_s
    return max(lo, min(hi, round(seconds / (per_chunk_s * policies))))


def default_power_budget(power_W: float, policy_seconds: float) -> Schedule:
    """0.85, 0.75, then 0.85 × static-top2's calibrated power over thirds of a policy's own time."""
    third = max(policy_seconds / 3, 1.0)
    return Schedule((0.0, third, 2 * third), tuple(round(f * power_W) for f in (0.85, 0.75, 0.85)))


def run_workload(name: str, model, demo, backend, cfg: RunConfig, out: Path | None, *, repeats: int, backend_name: str,
                 block_chunks: int, command: str, progress: bool, meta: dict, conditions: dict | None = None,
                 before_policy=None) -> dict:
    """One workload's frontier on the shared backend; writes the run directory `out` (None: nothing,
    a data-parallel replica other than rank 0), returns the report. `conditions`: the workload's
    temp_cap_C / heat / power_budget (see `build_workload`)."""
    workload = build_workload(name, cfg, demo.heldout_ids, getattr(demo, "heldout_domains", None),
                              block_chunks=block_chunks, **(conditions or {}))
    runs, summary, report = frontier(model, workload, lambda: backend, cfg, backend_name, repeats=repeats,
                                     progress=progress, before_policy=before_policy)
    if out is not None:
        write_frontier(out, runs, summary, report, command, **meta)
    return report


def save_calibration(out: Path, calibration: Calibration, speed: dict, model_info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_trace(out / "calibration.csv.gz", calibration.rows)
    (out / "campaign.json").write_text(json.dumps({
        "static_top2_tokens_per_s": calibration.tokens_per_s, "static_top2_power_W": calibration.power_W,
        "static_top2_J_per_token": calibration.joules_per_token, "speed": speed, "model": model_info},
        indent=2, sort_keys=True, allow_nan=False) + "\n")
