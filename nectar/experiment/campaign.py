"""The GPU campaign behind `nectar hw-run`: the whole GPU experiment in one command.

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only (no simpy, no cvxpy, no
network), run with `PYTHONPATH=. python -m nectar hw-run --out DIR`:

1. build MoE-DistilGPT2 (docs/design.md, "Models and data") — train the dense DistilGPT2-architecture model on
   the offline corpus, upcycle it with cheap experts, fine-tune (bf16, a time budget) — or load
   `--model DIR`;
2. warm the GPU up, then measure calibration windows of ≥ 5 s (idle, static-top2, static-top1);
3. segment "main": every policy on the same held-out stream, interleaved in time, chunk windows
   of ≥ 100 ms, with NVML energy windows;
4. segment "thermal": static-top2 then NECTAR under a temperature cap below static-top2's
   temperature; segment "power": the same with a power budget below static-top2's power;
5. optional segment "long": NECTAR alone for several minutes (convergence of router, cost model
   and temperature).
Each segment writes a run directory (summary.json in the `nectar run --json` schema with
"backend": "nvml", chunks.csv, trace.csv.gz, meta.json, plots) under `--out`.
`--backend sim --device cpu` runs the same orchestration on the simulator (for tests).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nectar.control.controller import ControllerConfig
from nectar.train.recipes import RECIPES, load_demo_model, save_demo_model, train_demo_model
from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.runner import RunConfig, run_experiment
from nectar.experiment.summary import build_summary
from nectar.plugins import make_backend
from nectar.experiment.policies import DEFAULT_POLICIES, policy_router
from nectar.control.quality_guard import GuardConfig
from nectar.experiment.outputs import write_outputs
from nectar.telemetry.trace import TraceRow
from nectar.telemetry.workload import merge_workloads

SEGMENTS = ("main", "thermal", "power", "long")


@dataclass
class Segment:
    name: str
    policies: list[str]
    seconds: float
    interleave: bool
    temp_cap_C: float | None = None
    power_budget_W: float | None = None


def build_model(args):
    if args.model is not None:
        demo = load_demo_model(args.model)
    else:
        dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
        demo = train_demo_model(RECIPES[args.preset], seed=args.seed, device=args.device, dtype=dtype,
                                progress=not args.no_progress, time_budget_s=args.train_budget_s)
        if args.save_model is not None:
            save_demo_model(demo, args.save_model)
    model = demo.model.to(args.device)
    if args.device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    guard_tokens = max(args.guard_tokens, args.seq_len)
    return model.eval(), demo.heldout_ids[guard_tokens:], demo.heldout_ids[:guard_tokens], demo.info


def stream_chunk(stream: torch.Tensor, args, device) -> torch.Tensor:
    """One micro-batch [micro_batch, seq_len] of the stream, for warm-up and calibration."""
    rows = min(args.micro_batch, args.chunk_tokens // args.seq_len)
    need = rows * args.seq_len
    return stream.repeat(math.ceil(need / stream.numel()))[:need].view(rows, args.seq_len).to(device)


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


def report_speed(model, chunk) -> None:
    """Print the forward throughput of the built model (plain call and forward_chunk), so a slow
    run can be told apart from a slow measurement."""
    install(model, [policy_router("static-top2", layer) for _, layer in model.moe_layers()])
    sync = torch.cuda.synchronize if chunk.is_cuda else (lambda: None)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    for label, fn in (("plain forward", lambda: model(input_ids=chunk, use_cache=False)),
                      ("forward_chunk", lambda: forward_chunk(model, chunk))):
        with torch.no_grad():
            fn()
            sync()
            start = time.perf_counter()
            for _ in range(3):
                fn()
            sync()
        rate = 3 * chunk.numel() / (time.perf_counter() - start)
        print(f"speed {label}: {rate / 1e6:.3f} M tokens/s (param dtypes {dtypes})", flush=True)


def tokens_for(seconds: float, tokens_per_s: float, chunk_tokens: int, max_chunks: int | None) -> int:
    """Stream tokens per policy so that each policy runs about `seconds` on the GPU."""
    chunks = max(1, round(seconds * tokens_per_s / chunk_tokens))
    return (chunks if max_chunks is None else min(chunks, max_chunks)) * chunk_tokens


def run_segment(seg: Segment, model, stream, guard, backend, args, tokens_per_s, info, extra_trace=()):
    controller = ControllerConfig(lam=args.lam, temp_cap_C=seg.temp_cap_C, power_budget_W=seg.power_budget_W)
    cfg = RunConfig(policies=seg.policies, tokens=tokens_for(seg.seconds / len(seg.policies), tokens_per_s, args.chunk_tokens, args.max_chunks),
                    chunk_tokens=args.chunk_tokens, seq_len=args.seq_len, seed=args.seed,
                    guard_tokens=args.guard_tokens, guard_check_tokens=args.guard_check_tokens,
                    interleave=seg.interleave,
                    micro_batch_rows=args.micro_batch,
                    controller=controller, guard=GuardConfig(max_ppl_increase=args.max_ppl_increase))
    runs = run_experiment(model, stream, guard, lambda: backend, cfg, progress=not args.no_progress)
    summary = build_summary(runs, cfg, backend=args.backend, segment=seg.name, model=info)
    write_outputs(args.out / seg.name, runs, summary, command="nectar hw-run " + " ".join(sys.argv[2:]),
                  extra_trace=list(extra_trace), **device_meta(backend))
    return summary


def device_meta(backend) -> dict:
    """The backend's own account of the device, for meta.json."""
    return {"device": backend.info()}


def plan_segments(args, main_summary: dict | None) -> list[Segment]:
    wanted = [s.strip() for s in args.segments.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SEGMENTS]
    if unknown:
        raise ValueError(f"unknown segments {unknown}; choose from {SEGMENTS}")
    plan = []
    if "main" in wanted:
        plan.append(Segment("main", list(DEFAULT_POLICIES), args.policy_seconds * len(DEFAULT_POLICIES), True))
    if "thermal" in wanted:
        plan.append(Segment("thermal", ["static-top2", "nectar"], 2 * args.thermal_seconds, False, temp_cap_C=args.temp_cap))
    if "power" in wanted:
        plan.append(Segment("power", ["static-top2", "nectar"], 2 * args.power_seconds, False, power_budget_W=args.power_budget))
    if "long" in wanted:
        plan.append(Segment("long", ["nectar"], args.long_seconds, False))
    return plan


def auto_limits(seg: Segment, main: dict | None) -> Segment:
    top2 = (main or {}).get("policies", {}).get("static-top2")
    if seg.name == "thermal" and seg.temp_cap_C is None:
        if top2 is None:
            raise ValueError("the thermal segment needs --temp-cap or the main segment before it")
        seg = replace(seg, temp_cap_C=top2["max_temp_C"] - 4.0)
    if seg.name == "power" and seg.power_budget_W is None:
        if top2 is None:
            raise ValueError("the power segment needs --power-budget or the main segment before it")
        seg = replace(seg, power_budget_W=0.9 * top2["mean_power_W"])
    return seg
