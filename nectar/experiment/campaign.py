"""On-device runner (`nectar hw-run`): the whole GPU experiment in one command.

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only (no simpy, no cvxpy, no
network), run with `PYTHONPATH=. python -m nectar hw-run --out DIR`:

1. build MoE-DistilGPT2 as DESIGN.md §9 says — train the dense DistilGPT2-architecture model on
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
from nectar.experiment.runner import RunConfig, build_summary, forward_chunk, install, run_experiment
from nectar.plugins import make_backend
from nectar.experiment.policies import DEFAULT_POLICIES, make_router
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar hw-run", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/hw"))
    p.add_argument("--backend", choices=["nvml", "sim"], default="nvml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", type=Path, default=None, help="load this saved MoE model instead of training")
    p.add_argument("--preset", default="distilgpt2", choices=sorted(RECIPES))
    p.add_argument("--train-budget-s", type=float, default=200.0, help="wall-clock budget for training")
    p.add_argument("--save-model", type=Path, default=None)
    p.add_argument("--segments", default="main,thermal,power", help=f"comma list from {','.join(SEGMENTS)}")
    p.add_argument("--policy-seconds", type=float, default=20.0, help="GPU seconds per policy in 'main'")
    p.add_argument("--thermal-seconds", type=float, default=35.0)
    p.add_argument("--power-seconds", type=float, default=25.0)
    p.add_argument("--long-seconds", type=float, default=240.0)
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--calibration-s", type=float, default=5.0)
    p.add_argument("--chunk-tokens", type=int, default=1048576,
                   help="tokens per controller chunk; ~0.8 s on an H100, so the NVML counter is usable per chunk")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward inside a chunk")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--guard-tokens", type=int, default=8192)
    p.add_argument("--guard-check-tokens", type=int, default=2048)
    p.add_argument("--lambda", dest="lam", type=float, default=ControllerConfig.lam)
    p.add_argument("--max-ppl-increase", type=float, default=GuardConfig.max_ppl_increase)
    p.add_argument("--temp-cap", type=float, default=None, help="default: static-top2's peak in 'main' − 4 °C")
    p.add_argument("--power-budget", type=float, default=None, help="default: 90%% of static-top2's mean power")
    p.add_argument("--deadline-s", type=float, default=560.0, help="skip segments that would end after this")
    p.add_argument("--max-chunks", type=int, default=None, help="cap on chunks per policy and segment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _build_model(args):
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


def _chunk(stream: torch.Tensor, args, device) -> torch.Tensor:
    """One micro-batch [micro_batch, seq_len] of the stream, for warm-up and calibration."""
    rows = min(args.micro_batch, args.chunk_tokens // args.seq_len)
    need = rows * args.seq_len
    return stream.repeat(math.ceil(need / stream.numel()))[:need].view(rows, args.seq_len).to(device)


def measured_block(model, backend, chunk, policy: str, seconds: float, kind: str) -> TraceRow:
    """One window of back-to-back chunks under `policy` lasting ≥ `seconds` (calibration/warm-up)."""
    install(model, [make_router(policy, layer) for _, layer in model.moe_layers()])
    workloads = []

    def compute():
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            workloads.append(forward_chunk(model, chunk, policy=policy)["workload"])

    if backend.name == "sim":  # the simulator prices what ran; NVML measures it while it runs
        compute()
        merged = merge_workloads(workloads, policy)
        return TraceRow(backend.run_chunk(merged), merged, kind=kind, policy=policy)
    window = backend.run_chunk(None, compute)
    return TraceRow(window, merge_workloads(workloads, policy), kind=kind, policy=policy)


def _report_speed(model, chunk) -> None:
    """Print the forward throughput of the built model (plain call and forward_chunk), so a slow
    run can be told apart from a slow measurement."""
    install(model, [make_router("static-top2", layer) for _, layer in model.moe_layers()])
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


def _tokens_for(seconds: float, tokens_per_s: float, chunk_tokens: int, max_chunks: int | None) -> int:
    """Stream tokens per policy so that each policy runs about `seconds` on the GPU."""
    chunks = max(1, round(seconds * tokens_per_s / chunk_tokens))
    return (chunks if max_chunks is None else min(chunks, max_chunks)) * chunk_tokens


def run_segment(seg: Segment, model, stream, guard, backend, args, tokens_per_s, info, extra_trace=()):
    controller = ControllerConfig(lam=args.lam, temp_cap_C=seg.temp_cap_C, power_budget_W=seg.power_budget_W)
    cfg = RunConfig(policies=seg.policies, tokens=_tokens_for(seg.seconds / len(seg.policies), tokens_per_s, args.chunk_tokens, args.max_chunks),
                    chunk_tokens=args.chunk_tokens, seq_len=args.seq_len, seed=args.seed,
                    guard_tokens=args.guard_tokens, guard_check_tokens=args.guard_check_tokens,
                    price_as=None, interleave=seg.interleave,
                    micro_batch_rows=args.micro_batch,
                    controller=controller, guard=GuardConfig(max_ppl_increase=args.max_ppl_increase))
    runs = run_experiment(model, stream, guard, lambda: backend, cfg, progress=not args.no_progress)
    summary = build_summary(runs, cfg, backend=args.backend, segment=seg.name, model=info)
    write_outputs(args.out / seg.name, runs, summary, command="nectar hw-run " + " ".join(sys.argv[2:]),
                  extra_trace=list(extra_trace), **_device_meta(args))
    return summary


def _device_meta(args) -> dict:
    if args.backend != "nvml":
        return {}
    from hw.info import device_info

    return {"device": device_info()}


def _plan(args, main_summary: dict | None) -> list[Segment]:
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


def _auto_limits(seg: Segment, main: dict | None) -> Segment:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        backend = make_backend(args.backend, **({"seed": args.seed} if args.backend == "sim" else {}))
        plan = _plan(args, None)
    except (ValueError, RuntimeError) as exc:
        print(f"nectar hw-run: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model, stream, guard, info = _build_model(args)
    print(f"model ready after {time.monotonic() - started:.0f} s: {json.dumps({k: info.get(k) for k in ('dense_steps', 'moe_steps', 'dense_heldout_ppl')})}", flush=True)
    chunk = _chunk(stream, args, next(model.parameters()).device)
    _report_speed(model, chunk)
    calibration = [measured_block(model, backend, chunk, "static-top2", args.warmup_s, "warmup"),
                   TraceRow(backend.idle(args.calibration_s), None, kind="idle", policy="idle")]
    calibration += [measured_block(model, backend, chunk, p, args.calibration_s, "calibration") for p in ("static-top2", "static-top1")]
    top2 = calibration[2]
    tokens_per_s = top2.workload.tokens / top2.window.duration_s
    print(f"calibration: static-top2 {tokens_per_s / 1e6:.3f} M tokens/s, {top2.window.energy_J / top2.workload.tokens * 1e3:.3f} mJ/token", flush=True)
    main_summary = None
    for seg in plan:
        seg = _auto_limits(seg, main_summary)
        expected = seg.seconds * 1.3 + 5
        if time.monotonic() - started + expected > args.deadline_s:
            print(f"skipping segment {seg.name}: {expected:.0f} s would pass the {args.deadline_s:.0f} s deadline", flush=True)
            continue
        summary = run_segment(seg, model, stream, guard, backend, args, tokens_per_s, info,
                              extra_trace=calibration if seg.name == "main" else ())
        main_summary = summary if seg.name == "main" else main_summary
        print(json.dumps({"segment": seg.name, "temp_cap_C": seg.temp_cap_C, "power_budget_W": seg.power_budget_W,
                          "policies": summary["policies"]}, indent=1), flush=True)
    backend.close()
    print(f"done in {time.monotonic() - started:.0f} s; results under {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
