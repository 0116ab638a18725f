"""Simulation speed: simulated GPU-seconds per wall-second for the DistilGPT2-MoE workload.

Workload: 6 layers, d=768, 12 heads, 8 GELU experts of 3072, top-2, chunks of 32×1024 tokens,
with per-chunk routing that varies (a pool of imbalanced top-2 count matrices, built before the
clock starts, so only the simulator is timed). Goal: ≥ 100× (one simulated GPU-hour in ≤ 36 s).

    python benchmarks/sim_speed.py [--sim-seconds 300] [--preset h100_sxm] [--faults SPEC]

Prints what it measured: wall and CPU seconds, chunks, simulated seconds, and the speed-up.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sim.backend import SimBackend
from sim.synthetic_workload import distilgpt2_moe_workload

N_LAYERS, N_EXPERTS, TOP_K, BATCH, SEQ_LEN = 6, 8, 2, 32, 1024


def workload_pool(size: int, seed: int = 0):
    """`size` chunks whose per-layer expert loads vary like a real router's (Dirichlet shares)."""
    rng = np.random.default_rng(seed)
    total = BATCH * SEQ_LEN * TOP_K
    pool = []
    for _ in range(size):
        shares = rng.dirichlet(np.full(N_EXPERTS, 8.0), size=N_LAYERS)  # [L, E]
        counts = np.floor(shares * total).astype(int)  # [L, E]
        counts[:, 0] += total - counts.sum(axis=1)  # every layer routes exactly tokens·k
        pool.append(distilgpt2_moe_workload(TOP_K, expert="gelu", batch=BATCH, seq_len=SEQ_LEN, n_layers=N_LAYERS,
                                            n_experts=N_EXPERTS, counts=counts.tolist()))
    return pool


def measure(sim_seconds: float, preset: str, faults: str | None, seed: int) -> dict:
    pool = workload_pool(32, seed)
    backend = SimBackend(preset, seed=seed, faults=faults)
    chunks = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while backend.state.time_s < sim_seconds:
        backend.run_chunk(lambda: pool[chunks % len(pool)])
        chunks += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    simulated = backend.state.time_s
    return {"chunks": chunks, "simulated_s": simulated, "wall_s": wall, "cpu_s": cpu,
            "speedup_wall": simulated / wall, "speedup_cpu": simulated / cpu,
            "tokens_per_sim_s": chunks * BATCH * SEQ_LEN / simulated,
            "final_temp_C": backend.state.temperature_C}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-seconds", type=float, default=300.0, help="simulated GPU time to run (s)")
    parser.add_argument("--preset", default="h100_sxm")
    parser.add_argument("--faults", default=None, help="fault spec, e.g. 'nan:0.01,noise:2'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.sim_seconds > 0:
        parser.error("--sim-seconds must be > 0")
    r = measure(args.sim_seconds, args.preset, args.faults, args.seed)
    print(f"preset={args.preset} faults={args.faults or 'none'} chunks={r['chunks']} (32x1024 tokens, GELU top-2)")
    print(f"simulated {r['simulated_s']:.1f} GPU-s in {r['wall_s']:.2f} s wall ({r['cpu_s']:.2f} s CPU); "
          f"final temperature {r['final_temp_C']:.1f} C; {r['tokens_per_sim_s'] / 1e6:.3f} M tokens per simulated s")
    print(f"speed: {r['speedup_wall']:.0f}x real time (wall), {r['speedup_cpu']:.0f}x (CPU time); "
          f"one simulated GPU-hour takes {3600 / r['speedup_wall']:.1f} s wall (goal: >= 100x, <= 36 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
