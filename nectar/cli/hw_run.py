"""`nectar hw-run`: the whole GPU experiment in one command (see nectar.experiment.campaign).

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only, run
`PYTHONPATH=. python -m nectar hw-run --out DIR`; `--backend sim --device cpu` runs the same
orchestration on the simulator (for tests). Every argument, --out and --save-model are checked
before the model is trained or loaded; the segments' run directories appear under --out only when
the whole campaign is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nectar.cli.common import (cli_errors, comma_list, non_negative_int, parser, positive_float, positive_int,
                               strict_json)

# Names and defaults of the campaign, spelled out so that `nectar hw-run --help` does not import torch;
# tests/cli/test_help.py checks that they agree with nectar.experiment.campaign and nectar.train.recipes.
SEGMENTS = ("main", "thermal", "power", "long")
RECIPES = ("cpu-demo", "distilgpt2")
LAMBDA = 0.3
MAX_PPL_INCREASE = 0.01
MAX_SEQ_LEN = 1024


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar hw-run", __doc__)
    p.add_argument("--out", type=Path, default=Path("runs/hw"), help="folder for one run directory per segment")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is deleted only once the campaign is complete)")
    p.add_argument("--backend", choices=["nvml", "sim"], default="nvml", help="telemetry backend")
    p.add_argument("--device", default="cuda", help="torch device of the model: cuda, cuda:N or cpu")
    p.add_argument("--model", type=Path, default=None, help="load this saved MoE model instead of training one")
    p.add_argument("--preset", default="distilgpt2", choices=RECIPES, help="recipe of the model trained without --model")
    p.add_argument("--train-budget-s", type=positive_float, default=200.0, help="wall-clock budget for training")
    p.add_argument("--save-model", type=Path, default=None, help="also save the trained model to this folder (default: not saved)")
    p.add_argument("--segments", type=comma_list, default=["main", "thermal", "power"],
                   help=f"comma list from {','.join(SEGMENTS)} (default: main,thermal,power)")
    p.add_argument("--policy-seconds", type=positive_float, default=20.0, help="GPU seconds per policy in 'main'")
    p.add_argument("--thermal-seconds", type=positive_float, default=35.0, help="GPU seconds per policy in 'thermal'")
    p.add_argument("--power-seconds", type=positive_float, default=25.0, help="GPU seconds per policy in 'power'")
    p.add_argument("--long-seconds", type=positive_float, default=240.0, help="GPU seconds of NECTAR in 'long'")
    p.add_argument("--warmup-s", type=positive_float, default=10.0, help="warm-up window before calibration")
    p.add_argument("--calibration-s", type=positive_float, default=5.0, help="length of each calibration window")
    p.add_argument("--chunk-tokens", type=positive_int, default=1048576,
                   help="tokens per controller chunk, a multiple of --seq-len; ~0.8 s on an H100, so the NVML "
                        "counter is usable per chunk")
    p.add_argument("--micro-batch", type=positive_int, default=64, help="sequences per forward inside a chunk")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence (default: the model's positions, at most {MAX_SEQ_LEN})")
    p.add_argument("--guard-tokens", type=positive_int, default=8192, help="held-out guard set")
    p.add_argument("--guard-check-tokens", type=positive_int, default=2048, help="guard tokens scored after each nectar chunk")
    p.add_argument("--lambda", dest="lam", type=positive_float, default=LAMBDA, help="quality weight λ of the chunk problem")
    p.add_argument("--max-ppl-increase", type=positive_float, default=MAX_PPL_INCREASE,
                   help="quality guard bound, relative perplexity increase")
    p.add_argument("--temp-cap", type=float, default=None, help="default: static-top2's peak in 'main' − 4 °C")
    p.add_argument("--power-budget", type=float, default=None, help="default: 90%% of static-top2's mean power")
    p.add_argument("--deadline-s", type=positive_float, default=560.0, help="skip segments that would end after this")
    p.add_argument("--max-chunks", type=positive_int, default=None, help="cap on chunks per policy and segment (default: none)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of training and of the experiment")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def model_positions(args: argparse.Namespace) -> int:
    """n_positions of the model hw-run will use: the saved model's config, or the recipe's preset."""
    if args.model is not None:
        from nectar.train.recipes import check_model_dir

        check_model_dir(args.model)
        return int(json.loads((args.model / "config.json").read_text())["n_positions"])
    from nectar.model import PRESETS
    from nectar.train.recipes import RECIPES as RECIPE_TABLE

    return int(PRESETS[RECIPE_TABLE[args.preset].base]["n_positions"])


def check_args(args: argparse.Namespace) -> None:
    """Resolve --seq-len and check everything before the model is built (ValueError)."""
    unknown = [s for s in args.segments if s not in SEGMENTS]
    if unknown:
        raise ValueError(f"unknown segments {unknown}; choose from {SEGMENTS}")
    args.segments = ",".join(args.segments)  # the campaign's format
    positions = model_positions(args)
    if args.seq_len is None:
        args.seq_len = min(MAX_SEQ_LEN, positions)
    elif args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {positions} positions (n_positions)")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    for option, value in (("--chunk-tokens", args.chunk_tokens), ("--guard-check-tokens", args.guard_check_tokens)):
        if value % args.seq_len:
            raise ValueError(f"{option} {value} is not a multiple of --seq-len {args.seq_len}")
    if args.guard_tokens % args.guard_check_tokens:
        raise ValueError(f"--guard-tokens {args.guard_tokens} is not a multiple of --guard-check-tokens "
                         f"{args.guard_check_tokens}")
    if not 0 < args.max_ppl_increase < 1:
        raise ValueError(f"--max-ppl-increase must lie in (0, 1), got {args.max_ppl_increase}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU (use --backend sim --device cpu to try "
                         "the campaign on the simulator)")


@cli_errors("hw-run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    check_args(args)
    from nectar.experiment.campaign import plan_segments
    from nectar.experiment.outputs import prepare_out
    from nectar.plugins import make_backend

    if args.model is not None and args.save_model is not None:
        raise ValueError("--save-model saves the model hw-run trains; with --model nothing is trained")
    out = prepare_out(args.out, args.overwrite, inputs=[args.model])
    save = prepare_out(args.save_model, args.overwrite, "--save-model") if args.save_model is not None else None
    plan = plan_segments(args, None)
    from nectar.control.controller import ControllerConfig
    from nectar.control.quality_guard import GuardConfig

    ControllerConfig(lam=args.lam, temp_cap_C=args.temp_cap, power_budget_W=args.power_budget)  # checks the limits
    GuardConfig(max_ppl_increase=args.max_ppl_increase)
    backend = make_backend(args.backend, seed=args.seed, price_as="none")
    try:
        with out as tmp:
            campaign(args, backend, plan, tmp, save, started)
    finally:
        backend.close()
    print(f"done in {time.monotonic() - started:.0f} s; results under {args.out}", flush=True)
    return 0


def _build_model(args, save):
    from nectar.experiment.campaign import build_model

    if args.model is None:
        print(f"nectar hw-run: training the {args.preset} recipe on {args.device} for at most "
              f"{args.train_budget_s:g} s (use --model DIR to load a saved model instead)", file=sys.stderr, flush=True)
    if save is None:
        return build_model(args)
    with save as tmp:
        return build_model(argparse.Namespace(**{**vars(args), "save_model": tmp}))


def campaign(args, backend, plan, tmp: Path, save, started: float) -> None:
    import torch

    from nectar.experiment.campaign import (auto_limits, measured_block, report_speed, run_segment, stream_chunk)
    from nectar.telemetry.trace import TraceRow

    torch.manual_seed(args.seed)
    model, stream, guard, info = _build_model(args, save)
    ready = {k: info.get(k) for k in ("dense_steps", "moe_steps", "dense_heldout_ppl")}
    print(f"model ready after {time.monotonic() - started:.0f} s: {strict_json(ready)}", flush=True)
    chunk = stream_chunk(stream, args, next(model.parameters()).device)
    report_speed(model, chunk)
    calibration = [measured_block(model, backend, chunk, "static-top2", args.warmup_s, "warmup"),
                   TraceRow(backend.idle(args.calibration_s), None, kind="idle", policy="idle")]
    calibration += [measured_block(model, backend, chunk, p, args.calibration_s, "calibration") for p in ("static-top2", "static-top1")]
    top2 = calibration[2]
    tokens_per_s = top2.workload.tokens / top2.window.duration_s
    print(f"calibration: static-top2 {tokens_per_s / 1e6:.3f} M tokens/s, {top2.window.energy_J / top2.workload.tokens * 1e3:.3f} mJ/token", flush=True)
    segment_args = argparse.Namespace(**{**vars(args), "out": tmp})  # segments write into the temporary folder
    main_summary = None
    for seg in plan:
        seg = auto_limits(seg, main_summary)
        expected = seg.seconds * 1.3 + 5
        if time.monotonic() - started + expected > args.deadline_s:
            print(f"skipping segment {seg.name}: {expected:.0f} s would pass the {args.deadline_s:.0f} s deadline", flush=True)
            continue
        summary = run_segment(seg, model, stream, guard, backend, segment_args, tokens_per_s, info,
                              extra_trace=calibration if seg.name == "main" else ())
        main_summary = summary if seg.name == "main" else main_summary
        print(strict_json({"segment": seg.name, "temp_cap_C": seg.temp_cap_C, "power_budget_W": seg.power_budget_W,
                           "policies": summary["policies"]}, indent=1), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
