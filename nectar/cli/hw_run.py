"""`nectar hw-run`: the whole GPU experiment in one command (see nectar.experiment.campaign).

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only, run
`PYTHONPATH=. python -m nectar hw-run --out DIR`; `--backend sim --device cpu` runs the same
orchestration on the simulator (for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nectar.control.controller import ControllerConfig
from nectar.control.quality_guard import GuardConfig
from nectar.experiment.campaign import (SEGMENTS, auto_limits, build_model, stream_chunk, plan_segments, report_speed,
                                        measured_block, run_segment)
from nectar.plugins import make_backend
from nectar.telemetry.trace import TraceRow
from nectar.train.recipes import RECIPES


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        backend = make_backend(args.backend, seed=args.seed, price_as="none")
        plan = plan_segments(args, None)
    except (ValueError, RuntimeError) as exc:
        print(f"nectar hw-run: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model, stream, guard, info = build_model(args)
    print(f"model ready after {time.monotonic() - started:.0f} s: {json.dumps({k: info.get(k) for k in ('dense_steps', 'moe_steps', 'dense_heldout_ppl')})}", flush=True)
    chunk = stream_chunk(stream, args, next(model.parameters()).device)
    report_speed(model, chunk)
    calibration = [measured_block(model, backend, chunk, "static-top2", args.warmup_s, "warmup"),
                   TraceRow(backend.idle(args.calibration_s), None, kind="idle", policy="idle")]
    calibration += [measured_block(model, backend, chunk, p, args.calibration_s, "calibration") for p in ("static-top2", "static-top1")]
    top2 = calibration[2]
    tokens_per_s = top2.workload.tokens / top2.window.duration_s
    print(f"calibration: static-top2 {tokens_per_s / 1e6:.3f} M tokens/s, {top2.window.energy_J / top2.workload.tokens * 1e3:.3f} mJ/token", flush=True)
    main_summary = None
    for seg in plan:
        seg = auto_limits(seg, main_summary)
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
