"""`nectar hw-run`: the whole GPU experiment in one command (see nectar.experiment.campaign).

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only, run
`PYTHONPATH=. python -m nectar hw-run --out DIR`: train (or load) the model, calibrate, then the
static frontier and NECTAR per workload with NVML energy windows. `--backend sim --device cpu`
runs the same orchestration on the simulator (for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nectar.cli.experiment_args import add_controller_args, configs, positive_int

GPU_POLICIES = ("static-top1,static-top2,static-top3,static-cheap,fixed-bias:0.5,fixed-bias:1,fixed-bias:2,"
                "fixed-bias:3,top-p:0.5,top-p:0.8,mix:0.5,pi-share:0.5,nectar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar hw-run", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/hw"), help="output directory (default: runs/hw)")
    p.add_argument("--backend", choices=["nvml", "sim"], default="nvml", help="telemetry backend (default: nvml)")
    p.add_argument("--device", default="cuda", help="torch device of the model (default: cuda)")
    p.add_argument("--model", type=Path, default=None, help="load this saved MoE model instead of training one")
    p.add_argument("--preset", default="distilgpt2", help="training recipe when no --model is given (default: distilgpt2)")
    p.add_argument("--train-budget-s", type=float, default=330.0, help="wall-clock budget for training (default: 330)")
    p.add_argument("--save-model", type=Path, default=None, help="save the trained model here")
    p.add_argument("--workloads", default="stationary,domain-shift",
                   help="comma list of frontier workloads (default: stationary,domain-shift)")
    p.add_argument("--policies", default=GPU_POLICIES, help="comma list of policies (default: the GPU frontier set)")
    p.add_argument("--repeats", type=positive_int, default=2, help="repeats of every workload (default: 2)")
    p.add_argument("--workload-seconds", type=float, default=45.0,
                   help="GPU seconds per repeat of a workload, all policies together (default: 45)")
    p.add_argument("--block-chunks", type=positive_int, default=2, help="domain-shift: chunks per domain block (default: 2)")
    p.add_argument("--warmup-s", type=float, default=8.0, help="warm-up before calibration (default: 8)")
    p.add_argument("--calibration-s", type=float, default=5.0, help="each calibration window (default: 5)")
    p.add_argument("--chunk-tokens", type=positive_int, default=1048576,
                   help="tokens per controller chunk; ~0.6 s on an H200, so the NVML counter is usable per chunk")
    p.add_argument("--micro-batch", type=positive_int, default=64, help="sequences per forward inside a chunk (default: 64)")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--deadline-s", type=float, default=560.0, help="skip workloads that would end after this (default: 560)")
    p.add_argument("--seed", type=int, default=0, help="experiment and training seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_controller_args(p)
    return p


def build_model(args):
    """(DemoModel, info): trained within the budget with the recipe, or loaded from --model."""
    from nectar.train.recipes import RECIPES, load_demo_model, save_demo_model, train_demo_model

    if args.model is not None:
        return load_demo_model(args.model)
    if args.preset not in RECIPES:
        raise ValueError(f"unknown recipe {args.preset!r}; choose one of {sorted(RECIPES)}")
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    print(f"training the {args.preset} model for at most {args.train_budget_s:.0f} s on {args.device}", flush=True)
    demo = train_demo_model(RECIPES[args.preset], seed=args.seed, device=args.device, dtype=dtype,
                            progress=not args.no_progress, time_budget_s=args.train_budget_s)
    if args.save_model is not None:
        save_demo_model(demo, args.save_model)
    return demo


def main(argv: list[str] | None = None) -> int:
    from nectar.experiment.campaign import calibrate, chunks_for, report_speed, run_workload, save_calibration, stream_chunk
    from nectar.plugins import make_backend

    args = build_parser().parse_args(argv)
    started = time.monotonic()
    command = "nectar hw-run " + " ".join(argv if argv is not None else sys.argv[2:])
    try:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in workloads if w not in ("stationary", "domain-shift")]
        if unknown or not workloads:
            raise ValueError(f"hw-run runs the workloads stationary and domain-shift; got {unknown or workloads} "
                             "(thermal and power-schedule run in the simulator: nectar frontier --workload …)")
        args.tokens = args.chunk_tokens  # placeholder until the calibration sizes the stream
        cfg = configs(args, policies, interleave=True)
        backend = make_backend(args.backend, seed=args.seed, price_as="none")
    except (ValueError, RuntimeError) as exc:
        print(f"nectar hw-run: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    demo = build_model(args)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = demo.model.to(args.device, dtype).eval()
    print(f"model ready after {time.monotonic() - started:.0f} s", flush=True)
    chunk = stream_chunk(demo.heldout_ids, min(args.micro_batch, args.chunk_tokens // args.seq_len), args.seq_len,
                         args.device)
    speed = report_speed(model, chunk)
    calibration = calibrate(model, backend, chunk, args.warmup_s, args.calibration_s)
    save_calibration(args.out, calibration, speed, demo.info)
    print(json.dumps({"speed": speed, "tokens_per_s": calibration.tokens_per_s, "power_W": calibration.power_W}), flush=True)
    for name in workloads:
        n = chunks_for(args.workload_seconds, calibration.tokens_per_s, args.chunk_tokens, len(policies))
        wl_cfg = configs(args, policies, interleave=True)
        wl_cfg.tokens = n * args.chunk_tokens
        expected = args.repeats * args.workload_seconds * 1.3 + 5
        if time.monotonic() - started + expected > args.deadline_s:
            print(f"skipping workload {name}: ~{expected:.0f} s would pass the {args.deadline_s:.0f} s deadline", flush=True)
            continue
        report = run_workload(name, model, demo, backend, wl_cfg, args.out, repeats=args.repeats,
                              backend_name=args.backend, block_chunks=args.block_chunks, command=command,
                              progress=not args.no_progress, meta={"device": backend.info(), "model": demo.info})
        print(json.dumps({k: report.get(k) for k in ("workload", "nectar_saved", "nectar_dppl", "hull_saved_at_nectar_dppl",
                                                     "nectar_margin_over_hull", "nectar_margin_ci95",
                                                     "best_fixed_saved_within_bound")}), flush=True)
    backend.close()
    print(f"done in {time.monotonic() - started:.0f} s; results under {args.out}", flush=True)
    return 0
