"""`nectar run`: the main job — routing policies on one token stream against a telemetry backend.

Default backend: the deterministic simulator. With `--backend nvml` the model runs on the GPU in
bf16 inside NVML energy windows (for the full GPU experiment — training DistilGPT2-MoE, calibration
windows, thermal and power segments — use `nectar hw-run`). Writes DIR/summary.json, DIR/chunks.csv (one row per
policy chunk), DIR/trace.csv.gz (every telemetry window, the backend-neutral trace format),
DIR/meta.json, DIR/convexity_instance.npz (for `nectar verify-convexity --run DIR`) and plots;
prints a table, or the summary as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from nectar.control.controller import ControllerConfig
from nectar.experiment.runner import RunConfig, run_experiment
from nectar.experiment.summary import build_summary
from nectar.plugins import make_backend
from nectar.experiment.policies import DEFAULT_POLICIES, POLICIES
from nectar.control.quality_guard import GuardConfig
from nectar.experiment.outputs import write_outputs


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _policies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown or text!r}; choose from {', '.join(POLICIES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar run", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim")
    p.add_argument("--policies", type=_policies, default=list(DEFAULT_POLICIES),
                   help=f"comma list from {', '.join(POLICIES)} (default: {','.join(DEFAULT_POLICIES)})")
    p.add_argument("--tokens", type=_positive_int, default=65536, help="stream tokens per policy")
    p.add_argument("--chunk-tokens", type=_positive_int, default=4096, help="tokens per controller chunk")
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/latest"))
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--model", type=Path, default=None,
                   help="a saved MoE checkpoint directory (default: train or reuse the CPU demo model)")
    p.add_argument("--lambda", dest="lam", type=float, default=ControllerConfig.lam,
                   help="quality weight λ of the chunk problem (smaller = more energy saving)")
    p.add_argument("--temp-cap", type=float, default=None, help="hold the GPU below this temperature (°C)")
    p.add_argument("--power-budget", type=float, default=None, help="hold mean power below this (W)")
    p.add_argument("--max-ppl-increase", type=float, default=GuardConfig.max_ppl_increase,
                   help="quality guard bound, relative perplexity increase (0.01 = 1%%)")
    p.add_argument("--guard-tokens", type=_positive_int, default=RunConfig.guard_tokens,
                   help="held-out guard set, scored once under static routing")
    p.add_argument("--guard-check-tokens", type=_positive_int, default=RunConfig.guard_check_tokens,
                   help="guard tokens scored after each nectar chunk (in rotation through the set)")
    p.add_argument("--faults", default=None, help="simulator fault injection, e.g. 'stale:0.1,nan:0.05,hot_ambient:45'")
    p.add_argument("--gpu", default=None, help="simulator GPU preset, name or JSON path (default: h100_sxm)")
    p.add_argument("--price-as", default="auto",
                   help="simulator: price routing at this shape (auto = distilgpt2; none = as it ran)")
    p.add_argument("--price-batch", type=_positive_int, default=128,
                   help="simulator: sequences of 1024 tokens per priced chunk (128 ≈ 0.25 s on an H100)")
    p.add_argument("--interleave", action="store_true", help="one shared backend, policies interleaved in time")
    p.add_argument("--fast-router", action="store_true",
                   help="give NECTAR's router a fast-weight network (LaCT machinery, Muon steps) beside its bias")
    p.add_argument("--no-progress", action="store_true")
    return p


def _configs(args) -> RunConfig:
    controller = ControllerConfig(lam=args.lam, temp_cap_C=args.temp_cap, power_budget_W=args.power_budget)
    guard = GuardConfig(max_ppl_increase=args.max_ppl_increase)
    return RunConfig(policies=args.policies, tokens=args.tokens, chunk_tokens=args.chunk_tokens,
                     seq_len=args.seq_len, seed=args.seed, guard_tokens=args.guard_tokens,
                     guard_check_tokens=args.guard_check_tokens,
                     interleave=True if args.interleave else None, fast_router=args.fast_router,
                     controller=controller, guard=guard)


def _backend_factory(args):
    options = dict(seed=args.seed, preset=args.gpu, faults=args.faults, price_as=args.price_as,
                   price_batch=args.price_batch)
    return lambda: make_backend(args.backend, **options)


def place_model(model, torch_device: str):
    """The model where the backend measures it: bf16 on a GPU, fp32 on the CPU."""
    if torch_device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this backend measures a CUDA GPU, but torch sees none")
        return model.to(torch_device, torch.bfloat16)
    return model.to(torch_device, torch.float32)


def print_table(summary: dict) -> None:
    header = f"{'policy':<14}{'mJ/token':>10}{'vs top2':>9}{'ppl':>9}{'Δppl':>8}{'agree':>7}{'maxT°C':>8}{'W':>7}{'fallback':>9}"
    print(f"backend={summary['backend']} gpu={summary['gpu']} seed={summary['seed']}"
          + (f" priced_as={summary['priced_as']}" if summary.get("priced_as") else ""))
    print(header)
    base = summary["policies"].get("static-top2")
    for name, p in summary["policies"].items():
        rel_e = f"{100 * (p['J_per_token'] / base['J_per_token'] - 1):+.1f}%" if base else "-"
        rel_p = f"{100 * (p['perplexity'] / base['perplexity'] - 1):+.2f}%" if base else "-"
        print(f"{name:<14}{1e3 * p['J_per_token']:>10.4f}{rel_e:>9}{p['perplexity']:>9.3f}{rel_p:>8}"
              f"{p['routing_agreement']:>7.3f}{p['max_temp_C']:>8.1f}{p['mean_power_W']:>7.0f}{p['fallback_chunks']:>9d}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _configs(args)
        factory = _backend_factory(args)
        probe = factory()  # fail early and clearly (bad fault spec, no GPU or driver, bad preset)
        torch_device = probe.torch_device
        probe.close()
        from nectar.train.recipes import load_or_train

        model, stream, guard = load_or_train(args.model, seed=args.seed, progress=not args.no_progress,
                                             guard_tokens=args.guard_tokens)
        model = place_model(model, torch_device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"nectar run: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    runs = run_experiment(model, stream, guard, factory, cfg, progress=not args.no_progress)
    summary = build_summary(runs, cfg, backend=args.backend, faults=args.faults)
    for run in runs:
        run.backend.close()
    write_outputs(args.out, runs, summary, command="nectar run " + " ".join(argv if argv is not None else sys.argv[2:]))
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    else:
        print_table(summary)
        print(f"wrote {args.out}/summary.json, chunks.csv, trace.csv.gz and plots")
    return 0
