"""`nectar hw-run`: the whole GPU experiment in one command (see nectar.experiment.campaign).

On a GPU host with torch (CUDA), transformers and nvidia-ml-py only, run
`PYTHONPATH=. python -m nectar hw-run --out DIR`: train (or load) the model, calibrate, then the
static frontier and NECTAR on each workload with NVML energy windows. `--backend sim --device
cpu` runs the same orchestration on the simulator (for tests). Every argument, --out and
--save-model are checked before the model is trained or loaded; each workload's run directory
appears under --out as soon as that workload is complete (so a campaign stopped by a deadline
keeps what it finished).

On N GPUs of one host, `torchrun --nproc-per-node N -m nectar hw-run --model DIR …` runs the same
campaign on data-parallel replicas (one process per GPU, see nectar.cli.replicas): every chunk is
split over the GPUs, the calibration and every window are the node's (energy summed, the hottest
GPU's temperature), and rank 0 writes. The replicas load a saved model (--model); none trains one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from nectar.cli.common import RECIPE_NAMES, cli_errors, comma_list, non_negative_int, parser, positive_float, positive_int, strict_json, wrap_note
from nectar.cli.experiment_args import add_controller_args, check_model_option, check_stream_args, configs

# Spelled out so that `nectar hw-run --help` does not import torch (tests/cli/test_help.py checks them).
GPU_WORKLOADS = ("stationary", "domain-shift", "power-schedule", "thermal")
DEFAULT_WORKLOADS = ("stationary", "domain-shift")
GPU_POLICIES = ["static-top1", "static-top2", "static-top3", "static-cheap", "fixed-bias:0.5", "fixed-bias:1",
                "fixed-bias:2", "fixed-bias:3", "top-p:0.5", "top-p:0.8", "mix:0.5", "pi-share:0.5", "nectar"]
MAX_SEQ_LEN = 1024


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar hw-run", __doc__)
    p.add_argument("--out", type=Path, default=Path("runs/hw"), help="folder for one run directory per workload")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--backend", choices=["nvml", "sim"], default="nvml", help="telemetry backend")
    p.add_argument("--device", default="cuda", help="torch device of the model: cuda, cuda:N or cpu")
    p.add_argument("--model", type=Path, default=None, help="load this saved model folder (as for `nectar run --model`) instead of training one")
    p.add_argument("--preset", default="distilgpt2", choices=RECIPE_NAMES, help="recipe of the model trained without --model")
    p.add_argument("--train-budget-s", type=positive_float, default=330.0, help="wall-clock budget for training")
    p.add_argument("--save-model", type=Path, default=None, help="also save the trained model to this folder")
    p.add_argument("--workloads", type=comma_list, default=list(DEFAULT_WORKLOADS),
                   help=f"comma list of frontier workloads out of {', '.join(GPU_WORKLOADS)} (default: "
                        f"{','.join(DEFAULT_WORKLOADS)}); thermal takes --temp-cap (default: see --thermal-headroom-c), "
                        "power-schedule --power-budget (default: 0.85/0.75/0.85 of static-top2's calibrated power)")
    p.add_argument("--policies", type=comma_list, default=list(GPU_POLICIES),
                   help=f"comma list of policies (default: {','.join(GPU_POLICIES)}; for a transformers MoE "
                        "model its own static frontier and nectar)")
    p.add_argument("--repeats", type=positive_int, default=2, help="repeats of every workload (the margin's interval)")
    p.add_argument("--workload-seconds", type=positive_float, default=45.0,
                   help="GPU seconds per repeat of a workload, all policies together")
    p.add_argument("--block-chunks", type=positive_int, default=2, help="domain-shift: chunks per domain block")
    p.add_argument("--warmup-s", type=positive_float, default=8.0, help="warm-up window before calibration")
    p.add_argument("--calibration-s", type=positive_float, default=5.0, help="length of each calibration window")
    p.add_argument("--cotenant-duty", type=positive_float, default=0.3,
                   help="thermal: share of every 100 ms a co-tenant process spends on bf16 matmuls beside the run")
    p.add_argument("--policy-warmup-s", type=positive_float, default=15.0,
                   help="thermal: static-top2 warm-up (with the co-tenant) before each policy, seconds")
    p.add_argument("--thermal-headroom-c", type=positive_float, default=2.0,
                   help="thermal without --temp-cap: the cap is this many °C below the temperature static-top2 "
                        "reaches in one warm-up beside the co-tenant (rounded down)")
    p.add_argument("--chunk-tokens", type=positive_int, default=1048576,
                   help="tokens per controller chunk, a multiple of --seq-len (~0.6 s on an H200: the NVML counter "
                        "is usable per chunk)")
    p.add_argument("--micro-batch", type=positive_int, default=64, help="sequences per forward inside a chunk")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence (default: the model's positions, at most {MAX_SEQ_LEN})")
    p.add_argument("--deadline-s", type=positive_float, default=560.0, help="skip workloads that would end after this")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of training and of the experiment")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_controller_args(p)
    return p


def model_positions(args: argparse.Namespace) -> int:
    """n_positions of the model hw-run will use: the saved model's config, or the recipe's preset."""
    if args.model is not None:
        from nectar.hf.load import is_hf_moe_dir
        from nectar.train.recipes import check_model_dir

        check_model_option(args.model)                     # a dense model, a transformers MoE's missing files
        if is_hf_moe_dir(args.model):                      # a transformers MoE (nectar.hf)
            return int(json.loads((args.model / "config.json").read_text())["max_position_embeddings"])
        check_model_dir(args.model)
        return int(json.loads((args.model / "config.json").read_text())["n_positions"])
    from nectar.models.gpt2_moe import PRESETS
    from nectar.train.recipes import RECIPES as RECIPE_TABLE

    return int(PRESETS[RECIPE_TABLE[args.preset].base]["n_positions"])


def hf_default_policies(model_dir) -> list[str] | None:
    """A transformers MoE's own static frontier and NECTAR (None for a NECTAR MoE model)."""
    from nectar.hf.load import is_hf_moe_dir

    if not is_hf_moe_dir(model_dir):
        return None
    from nectar.hf.policies import frontier_policies

    return frontier_policies(int(json.loads((model_dir / "config.json").read_text())["num_experts_per_tok"])) + ["nectar"]


def check_args(args: argparse.Namespace) -> None:
    """Resolve --seq-len and check everything before the model is built (ValueError)."""
    unknown = [w for w in args.workloads if w not in GPU_WORKLOADS]
    if unknown or not args.workloads:
        raise ValueError(f"hw-run runs the workloads {', '.join(GPU_WORKLOADS)}; got {unknown or args.workloads}")
    if not 0 < args.cotenant_duty <= 1:
        raise ValueError(f"--cotenant-duty must be in (0, 1], got {args.cotenant_duty}")
    positions = model_positions(args)
    if args.seq_len is None:
        args.seq_len = min(MAX_SEQ_LEN, positions)
    elif args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's {positions} positions (n_positions)")
    args.tokens = args.chunk_tokens          # one chunk per policy until the calibration sizes the stream
    if args.policies == list(GPU_POLICIES) and args.model is not None:
        args.policies = hf_default_policies(args.model) or args.policies
    check_stream_args(args)
    from nectar.experiment.policies import check_policies

    check_policies(args.policies)
    if args.model is not None and args.save_model is not None:
        raise ValueError("--save-model saves the model hw-run trains; with --model nothing is trained")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU (use --backend sim --device cpu to try "
                         "the campaign on the simulator)")


def build_model(args, save):
    """The DemoModel: trained within the budget with the recipe (announced), or loaded from --model."""
    from nectar.train.recipes import RECIPES as RECIPE_TABLE, load_demo_model, save_demo_model, train_demo_model

    if args.model is not None:
        return load_demo_model(args.model)
    print(wrap_note(f"nectar hw-run: training the {args.preset} recipe on {args.device} for at most "
                    f"{args.train_budget_s:g} s (use --model DIR to load a saved model instead)"), file=sys.stderr, flush=True)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    demo = train_demo_model(RECIPE_TABLE[args.preset], seed=args.seed, device=args.device, dtype=dtype,
                            progress=not args.no_progress, time_budget_s=args.train_budget_s)
    if save is not None:
        with save as tmp:
            save_demo_model(demo, tmp)
    return demo


@cli_errors("hw-run")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    from nectar.cli.replicas import device_options, launch, replica_group

    where = launch()   # started by torchrun: one data-parallel replica (None: one process); before CUDA starts
    if where is not None:
        check_replica_args(args)
    check_args(args)
    from nectar.experiment.outputs import check_out, prepare_out
    from nectar.plugins import make_backend

    if where is None or where.writes:
        check_out(args.out, args.overwrite, "--out", [p for p in (args.model,) if p is not None])
    save = prepare_out(args.save_model, args.overwrite, "--save-model") if args.save_model is not None else None
    configs(args, args.policies, interleave=True)          # checks the controller's options
    backend = make_backend(args.backend, seed=args.seed, price_as="none")
    if where is not None:                                   # the replica's own GPU (NVML's index of its CUDA device)
        options = device_options(backend.torch_device, where)
        if options:
            backend.close()
            backend = make_backend(args.backend, seed=args.seed, price_as="none", **options)
    try:
        refuse_unlockable_clocks(backend, args.policies)
        with replica_group(args.device, where) as group:
            campaign(args, backend, save, started, "nectar hw-run " + " ".join(argv if argv is not None else sys.argv[2:]),
                     group)
    finally:
        backend.close()
    if where is None or where.writes:
        print(f"done in {time.monotonic() - started:.0f} s; results under {args.out}", flush=True)
    return 0


def check_replica_args(args: argparse.Namespace) -> None:
    """Replicas run one saved model on one GPU each (ValueError otherwise)."""
    if args.model is None:
        raise ValueError("under torchrun, hw-run needs --model DIR: the replicas load one saved model and none trains "
                         "one (train it first, e.g. nectar train --recipe distilgpt2 --device cuda --out DIR)")
    if args.device not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device}: under torchrun each replica takes the GPU of its LOCAL_RANK; "
                         "use --device cuda (or cpu)")


def refuse_unlockable_clocks(backend, policies: list[str]) -> None:
    """Clock-locked policies (clock:MHZ, POLICY@clock:MHZ) are refused here, before any training or
    calibration, by a backend that cannot lock its clock (the NVML backend never does)."""
    from nectar.experiment.policies import parse_policy
    from nectar.experiment.runner import probe_clocks

    clocks = [spec.clock_MHz for spec in map(parse_policy, policies) if spec.clock_MHz is not None]
    if clocks:
        probe_clocks(backend, clocks)


def campaign(args, backend, save, started: float, command: str, group=None) -> None:
    import torch

    from nectar.experiment.campaign import calibrate, chunks_for, report_speed, run_workload, save_calibration, stream_chunk
    from nectar.experiment.outputs import prepare_out

    writes = group is None or group.rank == 0
    say = print if writes else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    demo = build_model(args, save)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = demo.model.to(args.device, dtype).eval()
    say(f"model ready after {time.monotonic() - started:.0f} s", flush=True)
    chunk = stream_chunk(demo.heldout_ids, min(args.micro_batch, args.chunk_tokens // args.seq_len), args.seq_len,
                         args.device)
    speed = report_speed(model, chunk)
    calibration = calibrate(model, backend, chunk, args.warmup_s, args.calibration_s)
    if group is not None:
        calibration = replica_calibration(group, calibration)
    if writes:
        args.out.mkdir(parents=True, exist_ok=True)
        save_calibration(args.out, calibration, speed, demo.info)
    say(strict_json({"speed": speed, "tokens_per_s": calibration.tokens_per_s, "power_W": calibration.power_W}),
        flush=True)
    for name in args.workloads:
        warmups = (len(args.policies) + 1) * args.policy_warmup_s if name == "thermal" else 0.0
        expected = args.repeats * (args.workload_seconds * 1.3 + warmups) + 5
        elapsed = time.monotonic() - started
        if group is not None:
            elapsed = group.gather_objects(elapsed)[0]      # rank 0's clock decides for every replica
        if elapsed + expected > args.deadline_s:
            say(f"skipping workload {name}: ~{expected:.0f} s would pass the {args.deadline_s:.0f} s deadline", flush=True)
            continue
        args.tokens = args.chunk_tokens * chunks_for(args.workload_seconds, calibration.tokens_per_s, args.chunk_tokens,
                                                     len(args.policies))
        conditions, before_policy, heat = workload_conditions(name, args, calibration, model, backend, chunk)
        cfg = configs(args, args.policies, interleave=name != "thermal")
        with heat, prepare_out(args.out / name, args.overwrite) if writes else nullcontext(None) as tmp:
            if conditions.get("temp_cap_C", 0.0) is None:
                conditions["temp_cap_C"] = auto_temp_cap(model, backend, chunk, args)
            if conditions:
                say(f"{name}: {strict_json({k: str(v) for k, v in conditions.items()})}", flush=True)
            report = run_workload(name, model, demo, backend, cfg, tmp, repeats=args.repeats, backend_name=args.backend,
                                  block_chunks=args.block_chunks, command=command, progress=not args.no_progress,
                                  meta={"device": backend.info(), "model": demo.info}, conditions=conditions,
                                  before_policy=before_policy)
        say(strict_json({k: report.get(k) for k in ("workload", "nectar_saved", "nectar_dppl", "hull_saved_at_nectar_dppl",
                                                     "nectar_margin_over_hull", "nectar_margin_ci95",
                                                     "best_fixed_saved_within_bound")}), flush=True)


def workload_conditions(name: str, args, calibration, model, backend, chunk):
    """(build_workload's conditions, the hook before each policy, the heat source's context) of a
    workload: a power budget over each policy's own time; a temperature cap with a co-tenant heating
    the GPU and the same static-top2 warm-up before every policy (they run one after another)."""
    from nectar.control.schedule import Schedule
    from nectar.experiment.campaign import default_power_budget, measured_block

    if name == "power-schedule":
        budget = args.power_budget or default_power_budget(calibration.power_W, args.workload_seconds / len(args.policies))
        return {"power_budget": budget}, None, nullcontext()
    if name == "thermal":
        def warm_up(run):
            measured_block(model, backend, chunk, "static-top2", args.policy_warmup_s, "warmup")
        conditions = {"temp_cap_C": args.temp_cap, "heat": Schedule.constant(args.cotenant_duty)}
        return conditions, warm_up, backend.cotenant(args.cotenant_duty)
    return {}, None, nullcontext()


def auto_temp_cap(model, backend, chunk, args) -> float:
    """A cap that binds: `--thermal-headroom-c` below the temperature static-top2 reaches in one
    warm-up beside the co-tenant (rounded down to whole °C, as the sensor reads)."""
    import math

    from nectar.experiment.campaign import measured_block

    row = measured_block(model, backend, chunk, "static-top2", args.policy_warmup_s, "warmup")
    if not math.isfinite(row.window.gpu_temp_C):
        raise ValueError("thermal: the warm-up read no temperature; give --temp-cap C")
    return float(math.floor(row.window.gpu_temp_C) - args.thermal_headroom_c)


def replica_calibration(group, calibration):
    """The node's calibration from every replica's: throughput and power summed (the GPUs run side by
    side), J/token = Σ energy / Σ tokens of the static-top2 windows; every replica's trace rows, each
    marked with its rank."""
    from dataclasses import replace

    from nectar.experiment.campaign import Calibration
    from nectar.telemetry.energy import window_energy_J

    parts = group.gather_objects(calibration)
    top2 = [part.rows[2] for part in parts]                 # calibrate(): warm-up, idle, static-top2, static-top1
    rows = [replace(row, extra={**row.extra, "replica": rank}) for rank, part in enumerate(parts) for row in part.rows]
    return Calibration(rows, sum(p.tokens_per_s for p in parts), sum(p.power_W for p in parts),
                       sum(window_energy_J(r.window) for r in top2) / sum(r.workload.tokens for r in top2))


if __name__ == "__main__":
    raise SystemExit(main())
