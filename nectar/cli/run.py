"""`nectar run`: the main job — routing policies on one token stream against a telemetry backend.

Default backend: the deterministic simulator. With `--backend nvml` the model runs on the GPU in
bf16 inside NVML energy windows (for the full GPU experiment — training DistilGPT2-MoE, calibration
windows, thermal and power segments — use `nectar hw-run`). Writes DIR/summary.json, DIR/chunks.csv (one row per
policy chunk), DIR/trace.csv.gz (every telemetry window, the backend-neutral trace format),
DIR/meta.json, DIR/convexity_instance.npz (for `nectar verify-convexity --run DIR`) and plots;
prints a table, or the summary as JSON with --json.

The experiment seed (`--seed`) never chooses the model: `--model DIR` loads a saved checkpoint
(default: the committed data/models/cpu-demo) and `--model-seed S` asks for the cpu-demo model
trained with seed S (trained first, ~20-25 minutes on 2 cores, when it is not cached). Every
argument is checked, and --out with it, before anything is computed; the run directory appears
only when the run is complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nectar.cli.common import (cli_errors, comma_list, non_negative_int, parser, positive_float, positive_int,
                               strict_json)

# Defaults of the experiment's own config classes, spelled out so that `nectar run --help` does not
# import torch; tests/cli/test_help.py checks that they agree with RunConfig, ControllerConfig,
# GuardConfig and nectar.experiment.policies.
DEFAULT_POLICIES = ("static-top2", "static-top1", "static-cheap", "nectar")
LAMBDA = 0.3
MAX_PPL_INCREASE = 0.01
GUARD_TOKENS = 8192
GUARD_CHECK_TOKENS = 1024


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar run", __doc__)
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim",
                   help="telemetry: the deterministic GPU simulator, or NVML on this machine's GPU")
    p.add_argument("--policies", type=comma_list, default=list(DEFAULT_POLICIES),
                   help=f"comma list of routing policies (default: {','.join(DEFAULT_POLICIES)}; "
                        "an unknown name lists them all)")
    p.add_argument("--tokens", type=positive_int, default=65536,
                   help="stream tokens per policy; a multiple of --chunk-tokens")
    p.add_argument("--chunk-tokens", type=positive_int, default=4096,
                   help="tokens per controller chunk; a multiple of --seq-len")
    p.add_argument("--seq-len", type=positive_int, default=256,
                   help="tokens per sequence; at most the model's n_positions")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="experiment seed (simulator sensor noise and faults, torch); it does not choose the model")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is deleted only once the new run is complete)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=None,
                       help="a saved NECTAR MoE checkpoint directory (default: the committed data/models/cpu-demo)")
    model.add_argument("--model-seed", type=non_negative_int, default=None,
                       help="use the cpu-demo model trained with this seed (0: the committed one); another "
                            "seed is trained first when runs/models/ has no copy: about 20-25 minutes on 2 CPU "
                            "cores, announced before it starts")
    p.add_argument("--lambda", dest="lam", type=positive_float, default=LAMBDA,
                   help="quality weight λ of the chunk problem (smaller = more energy saving)")
    p.add_argument("--temp-cap", type=float, default=None, help="hold the GPU below this temperature, °C (20-100)")
    p.add_argument("--power-budget", type=float, default=None, help="hold mean power below this, W (10-2000)")
    p.add_argument("--max-ppl-increase", type=positive_float, default=MAX_PPL_INCREASE,
                   help="quality guard bound, relative perplexity increase (0.01 = 1%%)")
    p.add_argument("--guard-tokens", type=positive_int, default=GUARD_TOKENS,
                   help="held-out guard set, scored once under static routing; a multiple of --guard-check-tokens")
    p.add_argument("--guard-check-tokens", type=positive_int, default=GUARD_CHECK_TOKENS,
                   help="guard tokens scored after each nectar chunk (in rotation through the set); "
                        "a multiple of --seq-len")
    p.add_argument("--faults", default=None, help="simulator fault injection, e.g. 'stale:0.1,nan:0.05,hot_ambient:45' "
                   "(sim/faults.py lists them; default: none)")
    p.add_argument("--gpu", default=None, help="simulator GPU preset, name or JSON path (default: h100_sxm)")
    p.add_argument("--price-as", default="auto",
                   help="simulator: price routing at this shape (auto = distilgpt2; none = as it ran)")
    p.add_argument("--price-batch", type=positive_int, default=128,
                   help="simulator: sequences of 1024 tokens per priced chunk (128 ≈ 0.25 s on an H100)")
    p.add_argument("--interleave", action="store_true", help="one shared backend, policies interleaved in time")
    p.add_argument("--fast-router", action="store_true",
                   help="give NECTAR's router a fast-weight network (LaCT machinery, Muon steps) beside its bias")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither torch nor the model (ValueError with the option's name)."""
    if args.chunk_tokens % args.seq_len:
        raise ValueError(f"--chunk-tokens {args.chunk_tokens} is not a multiple of --seq-len {args.seq_len}")
    if args.tokens % args.chunk_tokens:
        lower = args.tokens // args.chunk_tokens * args.chunk_tokens
        choices = " or ".join(str(n) for n in (lower, lower + args.chunk_tokens) if n > 0)
        raise ValueError(f"--tokens {args.tokens} is not a multiple of --chunk-tokens {args.chunk_tokens}: "
                         f"use {choices}")
    if args.guard_check_tokens % args.seq_len:
        raise ValueError(f"--guard-check-tokens {args.guard_check_tokens} is not a multiple of --seq-len {args.seq_len}")
    if args.guard_tokens % args.guard_check_tokens:
        raise ValueError(f"--guard-tokens {args.guard_tokens} is not a multiple of --guard-check-tokens "
                         f"{args.guard_check_tokens}")
    if not 0 < args.max_ppl_increase < 1:
        raise ValueError(f"--max-ppl-increase must lie in (0, 1), got {args.max_ppl_increase}")
    from nectar.experiment.policies import POLICIES, check_policies

    try:
        check_policies(args.policies)
    except ValueError as exc:
        raise ValueError(f"--policies: {exc}") from None
    assert set(DEFAULT_POLICIES) <= set(POLICIES)


def _configs(args):
    from nectar.control.controller import ControllerConfig
    from nectar.control.quality_guard import GuardConfig
    from nectar.experiment.runner import RunConfig

    controller = ControllerConfig(lam=args.lam, temp_cap_C=args.temp_cap, power_budget_W=args.power_budget)
    guard = GuardConfig(max_ppl_increase=args.max_ppl_increase)
    return RunConfig(policies=args.policies, tokens=args.tokens, chunk_tokens=args.chunk_tokens,
                     seq_len=args.seq_len, seed=args.seed, guard_tokens=args.guard_tokens,
                     guard_check_tokens=args.guard_check_tokens,
                     interleave=True if args.interleave else None, fast_router=args.fast_router,
                     controller=controller, guard=guard)


def _backend_factory(args):
    from nectar.plugins import make_backend

    options = dict(seed=args.seed, preset=args.gpu, faults=args.faults, price_as=args.price_as,
                   price_batch=args.price_batch)
    return lambda: make_backend(args.backend, **options)


def place_model(model, torch_device: str):
    """The model where the backend measures it: bf16 on a GPU, fp32 on the CPU."""
    import torch

    if torch_device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this backend measures a CUDA GPU, but torch sees none")
        return model.to(torch_device, torch.bfloat16)
    return model.to(torch_device, torch.float32)


def check_model_fits(model, seq_len: int, option: str = "--seq-len") -> None:
    positions = model.config.n_positions
    if seq_len > positions:
        raise ValueError(f"{option} {seq_len} exceeds the model's {positions} positions (n_positions in its config)")


def priced_tokens_per_chunk(runs) -> int | None:
    """Tokens the backend accounted for one stream chunk (the first chunk window of the first run)."""
    for run in runs:
        for row in run.trace:
            if row.kind == "chunk" and row.policy == run.name and row.workload is not None:
                return int(row.workload.tokens)
    return None


def explain_tokens(summary: dict, streamed_tokens: int, chunk_tokens: int, priced_per_chunk: int | None) -> dict:
    """Add per policy `streamed_tokens` (what the model read) beside `tokens` (what the backend
    accounted and J/token divides by) and a top-level `tokens_note` saying why they differ."""
    for p in summary["policies"].values():
        p["streamed_tokens"] = streamed_tokens
    if summary.get("priced_as") and priced_per_chunk:
        priced = streamed_tokens // chunk_tokens * priced_per_chunk
        summary["tokens_note"] = (
            f"tokens = priced tokens: the simulator priced every {chunk_tokens}-token chunk of the stream as "
            f"{priced_per_chunk} tokens of {summary['priced_as']}'s shape ({summary.get('price_batch')} sequences), "
            f"so each policy's {streamed_tokens} streamed tokens count as {priced}; J_per_token divides energy by "
            "priced tokens, and chunks without a usable energy reading are left out of both")
    else:
        summary["tokens_note"] = ("tokens = the streamed tokens of the chunks with a usable energy reading "
                                  f"(streamed_tokens = {streamed_tokens} per policy)")
    return summary


def _cell(value, spec: str, scale: float = 1.0) -> str:
    if not _finite(value):
        return "—"
    return format(value * scale, spec)


def print_table(summary: dict) -> None:
    header = f"{'policy':<14}{'mJ/token':>10}{'vs top2':>9}{'ppl':>9}{'Δppl':>8}{'agree':>7}{'maxT°C':>8}{'W':>7}{'fallback':>9}"
    print(f"backend={summary['backend']} gpu={summary['gpu']} seed={summary['seed']}"
          + (f" priced_as={summary['priced_as']}" if summary.get("priced_as") else ""))
    print(header)
    base = summary["policies"].get("static-top2")

    def rel(key: str, p: dict, spec: str) -> str:
        if not base or not all(_finite(v) for v in (p[key], base[key])) or not base[key]:
            return "—"
        return _cell(100 * (p[key] / base[key] - 1), spec) + "%"

    for name, p in summary["policies"].items():
        print(f"{name:<14}{_cell(p['J_per_token'], '.4f', 1e3):>10}{rel('J_per_token', p, '+.1f'):>9}"
              f"{_cell(p['perplexity'], '.3f'):>9}{rel('perplexity', p, '+.2f'):>8}"
              f"{_cell(p['routing_agreement'], '.3f'):>7}{_cell(p['max_temp_C'], '.1f'):>8}"
              f"{_cell(p['mean_power_W'], '.0f'):>7}{p['fallback_chunks']:>9d}")


def _finite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


def energy_warnings(summary: dict) -> list[str]:
    """One line per policy whose energy figures miss chunks or are missing (invalid telemetry)."""
    lines = []
    for name, p in summary["policies"].items():
        bad = p.get("invalid_energy_chunks", 0)
        if not _finite(p.get("J_per_token")):
            lines.append(f"policy {name}: no usable energy reading (NaN or non-positive telemetry in {bad} "
                         "chunk(s) or in the guard's reference); its energy figures are missing")
        elif bad:
            lines.append(f"policy {name}: {bad} chunk(s) had no usable energy reading; its energy figures leave them out")
    return lines


@cli_errors("run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from nectar.experiment.outputs import prepare_out

    from nectar.train.recipes import committed_model

    out = prepare_out(args.out, args.overwrite, inputs=[args.model or committed_model("cpu-demo")])
    cfg = _configs(args)
    factory = _backend_factory(args)
    probe = factory()  # fail early and clearly (bad fault spec, no GPU or driver, bad preset)
    torch_device = probe.torch_device
    probe.close()
    with out as tmp:
        runs, summary = _run(args, cfg, factory, torch_device, argv)
        from nectar.experiment.outputs import write_outputs

        write_outputs(tmp, runs, summary, command="nectar run " + " ".join(argv if argv is not None else sys.argv[2:]))
    if args.json:
        print(strict_json(summary, indent=2, sort_keys=True))
    else:
        print_table(summary)
        print(summary["tokens_note"])
        print(f"wrote {args.out}/summary.json, chunks.csv, trace.csv.gz and plots")
    warnings = energy_warnings(summary)
    for line in warnings:
        print(f"nectar run: warning: {line}", file=sys.stderr)
    return 1 if any(not _finite(p.get("J_per_token")) for p in summary["policies"].values()) else 0


def _run(args, cfg, factory, torch_device: str, argv):
    import torch

    from nectar.experiment.runner import run_experiment
    from nectar.experiment.summary import build_summary
    from nectar.train.recipes import load_or_train

    announce = lambda message: print(f"nectar run: {message}", file=sys.stderr, flush=True)  # noqa: E731
    model_seed = args.model_seed if args.model_seed is not None else 0
    model, stream, guard = load_or_train(args.model, seed=model_seed, progress=not args.no_progress,
                                         guard_tokens=args.guard_tokens, announce=announce)
    check_model_fits(model, args.seq_len)
    model = place_model(model, torch_device)
    torch.manual_seed(args.seed)
    runs = run_experiment(model, stream, guard, factory, cfg, progress=not args.no_progress)
    summary = explain_tokens(build_summary(runs, cfg, backend=args.backend, faults=args.faults), cfg.tokens,
                             cfg.chunk_tokens, priced_tokens_per_chunk(runs))
    for run in runs:
        run.backend.close()
    return runs, summary
