"""Measured-like traces made by the simulator, for testing the reconciliation without a GPU.

A "true GPU" is a preset whose parameters differ from the shipped one (`perturbed_preset`). It
runs a seeded schedule of DistilGPT2-MoE chunks (varied batch, top-k and expert skew), with
unmeasured host gaps between windows, bursts of back-to-back chunks that heat the GPU and a few
measured idle pauses that let it cool. The windows are what the simulated NVML sensor reported
(quantised counter, noisy instant power, whole-degree temperatures), written in the trace format
of `nectar.telemetry.trace`, so calibrating the shipped preset against them is a real identification
problem with sensor noise, not a copy of the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nectar.telemetry.trace import TraceRow, write_meta, write_trace
from nectar.telemetry.workload import ChunkWorkload
from sim.backend import SimBackend
from sim.presets import GPUPreset
from sim.synthetic_workload import distilgpt2_moe_workload

# Multiplicative changes that make a plausibly different GPU of the same model.
DEFAULT_PERTURBATION = {
    "gemm_efficiency": 0.88, "bandwidth_efficiency": 1.06, "compute_power_W": 1.12, "idle_power_W": 1.15,
    "memory_power_W": 0.9, "thermal_resistance_C_per_W": 1.2, "thermal_capacitance_J_per_C": 0.8,
}


@dataclass(frozen=True)
class Schedule:
    chunks: int = 60
    batches: tuple[int, ...] = (192, 256, 384, 512)   # sequences of 1024 tokens per chunk
    gap_s: tuple[float, float] = (0.05, 1.2)           # unmeasured host time between windows
    burst_every: int = 15                              # every n-th chunk starts a back-to-back burst
    burst_len: int = 6
    pause_s: float = 8.0                               # measured idle window after each burst


def perturbed_preset(base: GPUPreset, factors: dict[str, float] | None = None,
                     ambient_shift_C: float = 2.0) -> GPUPreset:
    """`base` with fields scaled by `factors` (default DEFAULT_PERTURBATION) and a warmer ambient."""
    factors = DEFAULT_PERTURBATION if factors is None else factors
    changes = {name: getattr(base, name) * factor for name, factor in factors.items()}
    return base.replace(name=f"{base.name}-true", ambient_C=base.ambient_C + ambient_shift_C, **changes)


def _workload(rng: np.random.Generator, schedule: Schedule) -> ChunkWorkload:
    top_k = int(rng.integers(1, 4))
    batch = int(rng.choice(schedule.batches))
    tokens = batch * 1024
    counts = []
    for _ in range(6):
        share = rng.dirichlet(np.full(8, 6.0))                         # [E] skewed expert popularity
        layer = rng.multinomial(tokens * top_k, share)                  # [E]
        counts.append([int(min(c, tokens)) for c in layer])
    return distilgpt2_moe_workload(top_k, batch=batch, counts=counts)


def _truth(backend: SimBackend) -> dict[str, float]:
    t = backend.last_truth
    return {"true_energy_J": t.energy_J, "true_duration_s": t.t_end_s - t.t_start_s, "true_temp_C": t.temp_end_C}


def synthetic_measured_rows(true_preset: GPUPreset, schedule: Schedule = Schedule(), seed: int = 0) -> list[TraceRow]:
    """Run the schedule on the true GPU; the trace rows its simulated sensor produced. Each row's
    `extra` keeps the noise-free truth of its window (true_energy_J, true_duration_s, true_temp_C)."""
    rng = np.random.default_rng(seed)
    backend = SimBackend(preset=true_preset, seed=seed)
    rows = [TraceRow(backend.idle(3.0), None, kind="idle", policy="", chunk_index=None, extra=_truth(backend))]
    burst_left = 0
    for i in range(schedule.chunks):
        workload = _workload(rng, schedule)
        window = backend.run_chunk(lambda: workload)
        rows.append(TraceRow(window, workload, kind="chunk", policy=workload.policy, chunk_index=i, extra=_truth(backend)))
        if i % schedule.burst_every == 0 and i > 0:
            burst_left = schedule.burst_len
        if burst_left > 0:
            burst_left -= 1
            if burst_left == 0:
                window = backend.idle(schedule.pause_s)
                rows.append(TraceRow(window, None, kind="idle", policy="", chunk_index=i, extra=_truth(backend)))
            continue
        backend.idle(float(rng.uniform(*schedule.gap_s)))               # unmeasured gap: no row
    return rows


def write_synthetic_trace(out_dir: str | Path, true_preset: GPUPreset, schedule: Schedule = Schedule(),
                          seed: int = 0) -> Path:
    """Write out_dir/trace.csv.gz and meta.json (backend "synthetic"); returns out_dir."""
    out = Path(out_dir)
    write_trace(out / "trace.csv.gz", synthetic_measured_rows(true_preset, schedule, seed))
    write_meta(out, backend="synthetic", gpu_name=true_preset.gpu_name, seed=seed,
               true_preset=true_preset.to_dict())
    return out
