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

from nectar.cli.common import cli_errors, comma_list, non_negative_int, parser, strict_json, wrap_note
from nectar.cli.experiment_args import (add_controller_args, add_sim_args, add_stream_args, backend_factory,
                                        check_model_fits, check_stream_args, configs, place_model)

# Spelled out so that `nectar run --help` does not import torch (tests/cli/test_help.py checks them).
DEFAULT_POLICIES = ("static-top2", "static-top1", "static-cheap", "nectar")


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar run", __doc__)
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim",
                   help="telemetry: the deterministic GPU simulator, or NVML on this machine's GPU")
    p.add_argument("--policies", type=comma_list, default=None,
                   help=f"comma list of routing policies (default: {','.join(DEFAULT_POLICIES)}; a transformers "
                        "MoE model: static-top<K>,static-top1,nectar; an unknown name lists them all; `nectar "
                        "frontier` runs the whole static frontier)")
    add_stream_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is deleted only once the new run is complete)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=None,
                       help="a saved model folder: a NECTAR MoE checkpoint (`nectar train --out`) or a transformers "
                            "MoE of a supported family with tokenizer.json and heldout_ids.pt (README: transformers "
                            "MoE models) (default: the committed data/models/cpu-demo)")
    model.add_argument("--model-seed", type=non_negative_int, default=None,
                       help="use the cpu-demo model trained with this seed (0: the committed one); another "
                            "seed is trained first when runs/models/ has no copy: about 20-25 minutes on 2 CPU "
                            "cores, announced before it starts")
    p.add_argument("--interleave", action="store_true", help="one shared backend, policies interleaved in time")
    add_controller_args(p)
    add_sim_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither torch nor the model (ValueError with the option's name)."""
    check_stream_args(args)
    if args.policies is None:
        return
    from nectar.experiment.policies import check_policies

    try:
        check_policies(args.policies)
    except ValueError as exc:
        raise ValueError(f"--policies: {exc}") from None


def policies_for(model, cfg, asked: list[str] | None):
    """The policies to run on this model: the asked ones, each checked against the model (a policy the
    model cannot route fails here, before any compute), or the model's defaults (a transformers MoE
    model: its own top-K, top-1 and NECTAR)."""
    from dataclasses import replace

    from nectar.experiment.policies import policy_router

    reference = getattr(model, "reference_policy", None)
    if asked is None and reference is not None:
        cfg = replace(cfg, policies=[reference, "static-top1", "nectar"])
    for name in cfg.policies:
        try:
            policy_router(name, model.moe_layers()[0][1])
        except ValueError as exc:
            raise ValueError(f"--policies: {exc}") from None
    return cfg


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
            f"{priced_per_chunk} tokens of {summary['priced_as']}'s shape ({summary.get('priced_rows_per_row')} "
            "sequences of that shape per streamed sequence), "
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
    header = f"{'policy':<16}{'mJ/token':>10}{'vs top2':>9}{'ppl':>9}{'Δppl':>8}{'agree':>7}{'maxT°C':>8}{'W':>7}{'pause':>7}"
    print(f"backend={summary['backend']} gpu={summary['gpu']} seed={summary['seed']}"
          + (f" priced_as={summary['priced_as']}" if summary.get("priced_as") else ""))
    print(header)
    base = summary["policies"].get("static-top2")

    def rel(key: str, p: dict, spec: str) -> str:
        if not base or not all(_finite(v) for v in (p[key], base[key])) or not base[key]:
            return "—"
        return _cell(100 * (p[key] / base[key] - 1), spec) + "%"

    for name, p in summary["policies"].items():
        print(f"{name:<16}{_cell(p['J_per_token'], '.4f', 1e3):>10}{rel('J_per_token', p, '+.1f'):>9}"
              f"{_cell(p['perplexity'], '.3f'):>9}{rel('perplexity', p, '+.2f'):>8}"
              f"{_cell(p['routing_agreement'], '.3f'):>7}{_cell(p['max_temp_C'], '.1f'):>8}"
              f"{_cell(p['mean_power_W'], '.0f'):>7}{_cell(p.get('pause_share', 0.0), '.1f', 100):>6}%")


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
    from contextlib import nullcontext

    from nectar.cli.replicas import device_options, launch, replica_group
    from nectar.experiment.outputs import prepare_out

    from nectar.train.recipes import committed_model

    where = launch()   # started by torchrun: this process is one data-parallel replica (None: one process)
    if where is not None:
        check_replica_model(args)
    out = (prepare_out(args.out, args.overwrite, inputs=[args.model or committed_model("cpu-demo")])
           if where is None or where.writes else nullcontext(None))
    cfg = configs(args, args.policies or list(DEFAULT_POLICIES), interleave=True if args.interleave else None)
    factory = backend_factory(args, cfg)
    probe = factory()  # fail early and clearly (bad fault spec, no GPU or driver, bad preset)
    torch_device = probe.torch_device
    probe.close()
    if where is not None:
        factory = backend_factory(args, cfg, **device_options(torch_device, where))
    with replica_group(torch_device, where) as group, out as tmp:
        runs, summary = _run(args, cfg, factory, torch_device, argv, group)
        if tmp is not None:
            from nectar.experiment.outputs import write_outputs

            write_outputs(tmp, runs, summary, command="nectar run " + " ".join(argv if argv is not None else sys.argv[2:]))
    failed = any(not _finite(p.get("J_per_token")) for p in summary["policies"].values())
    if where is not None and not where.writes:
        return 1 if failed else 0
    if args.json:
        print(strict_json(summary, indent=2, sort_keys=True))
    else:
        print_table(summary)
        print(wrap_note(summary["tokens_note"]))
        print(f"wrote {args.out}/summary.json, chunks.csv, trace.csv.gz and plots")
    warnings = energy_warnings(summary)
    for line in warnings:
        print(wrap_note(f"nectar run: warning: {line}"), file=sys.stderr)
    return 1 if failed else 0


def check_replica_model(args: argparse.Namespace) -> None:
    """Replicas load one model; none of them trains one (each would, into the same cache)."""
    if args.model is not None or not args.model_seed:
        return
    from nectar.train.recipes import default_cache

    if not (default_cache("cpu-demo", args.model_seed) / "config.json").exists():
        raise ValueError(f"--model-seed {args.model_seed}: that model is not trained yet; train it in one process first "
                         f"(python -m nectar run --model-seed {args.model_seed} …), then start the replicas")


def _run(args, cfg, factory, torch_device: str, argv, group=None):
    import torch

    from nectar.experiment.runner import run_experiment
    from nectar.experiment.summary import build_summary
    from nectar.train.recipes import load_or_train

    announce = lambda message: print(wrap_note(f"nectar run: {message}"), file=sys.stderr, flush=True)  # noqa: E731
    model_seed = args.model_seed if args.model_seed is not None else 0
    model, stream, _ = load_or_train(args.model, seed=model_seed, progress=not args.no_progress, announce=announce)
    check_model_fits(model, args.seq_len)
    model = place_model(model, torch_device)
    cfg = policies_for(model, cfg, args.policies)
    torch.manual_seed(args.seed)
    runs = run_experiment(model, stream, factory, cfg, progress=not args.no_progress)
    summary = explain_tokens(build_summary(runs, cfg, backend=args.backend, faults=args.faults), cfg.tokens,
                             cfg.chunk_tokens, priced_tokens_per_chunk(runs))
    if group is not None:   # data-parallel: the records are the node's; say over which GPUs
        summary["replicas"] = group.world_size
        summary["replica_gpus"] = [info["gpu"] for info in group.gather_objects(runs[0].backend.info())]
    for run in runs:
        run.backend.close()
    return runs, summary
