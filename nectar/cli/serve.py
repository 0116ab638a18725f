"""`nectar serve`: serving with continuous batching — every policy on the same request trace.

Requests arrive by a named load trace (steady, bursty, ramp; seeded), their prompts come from the
model's held-out stream, and they are served with continuous batching: a KV cache of --batch-max
slots, chunked prefill, one decode step at a time for the requests in flight. Each step runs in
the backend's telemetry window (the simulator prices it; NVML measures it). Decode steps are
teacher-forced on each request's reference continuation, so every policy sees the same tokens and
its quality is the perplexity of those continuations under its routing. Per policy: steady-state
J per generated token, J per request, TTFT and TPOT p50/p99, tokens/s, prefill and decode energy;
then NECTAR against the static hull (static top-k, batch-aware re-routing, batch prices, top-p).
NECTAR's ride-along quality checks run inside its decode steps, so its totals include them; the
report says what they took (`nectar_guard_share`: their share of its decode energy; per policy
`checked_steps`, `check_energy_J`, `check_time_s`).
Writes DIR/frontier.json, steps.csv, requests.csv and plots (J/token and TPOT vs load, frontier).
--cuda-graphs: decode steps as CUDA graph replays (one per batch size and length bucket, captured
before each policy's run; nectar.serving.graphs): auto = on when the backend runs the model on a
CUDA device and the model can be captured there, off otherwise; on = captured or an error; off =
the eager path.
--drive-shape olmoe-1b-7b (with --backend nvml): energy at a realistic size. The trained model is
served as before (its routers are the policies', its logits the quality), and a random-weight
model of the OLMoE-1B-7B shape (`nectar.models.shapes`; --drive-layers N blocks instead of 16,
--drive-dtype) runs after it on the same rows and positions, its MoE layer l routing exactly as the
trained model's layer l mod L did (`nectar.serving.driven`). Energy, time and the workload are the
step's: both forwards, the big model's expert reads; frontier.json says so (`driven_by`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nectar.cli.common import cli_errors, comma_list, non_negative_int, parser, positive_float, positive_int, strict_json
from nectar.models.shapes import SHAPES

TRACES = ("steady", "bursty", "ramp")   # spelled out so that --help does not import numpy
HBM_GBPS = {"H100": 3350.0, "H200": 4800.0}   # published peak memory bandwidth (SXM), GB/s
GRAPH_CHOICES = ("auto", "on", "off")
DRIVE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar serve", __doc__)
    p.add_argument("--backend", choices=["sim", "nvml"], default="sim",
                   help="telemetry: the deterministic GPU simulator, or NVML on this machine's GPU")
    p.add_argument("--model", type=Path, default=None,
                   help="a saved model folder (default: the committed data/models/cpu-demo)")
    p.add_argument("--trace", choices=TRACES, default="bursty", help="the arrival process")
    p.add_argument("--requests", type=positive_int, default=48, help="requests in the trace")
    p.add_argument("--rate", type=positive_float, default=40.0, help="mean arrival rate, requests/s")
    p.add_argument("--prompt-median", type=positive_int, default=48, help="median prompt length, tokens (lognormal)")
    p.add_argument("--output-median", type=positive_int, default=24, help="median output length, tokens (lognormal)")
    p.add_argument("--batch-max", type=positive_int, default=8, help="KV-cache slots: requests decoded at once")
    p.add_argument("--prefill-chunk", type=positive_int, default=64, help="prompt tokens per prefill step")
    p.add_argument("--policies", type=comma_list, default=None,
                   help="comma list; the baseline (static-top<k> of the model's k) must be among them "
                        "(default: static-top<k>..1, batch-aware:<k>, batch-price:0.1,0.3,1, top-p:0.5, nectar)")
    p.add_argument("--max-ppl-increase", type=positive_float, default=0.01,
                   help="quality bound: relative perplexity increase vs the baseline (0.01 = 1%%)")
    p.add_argument("--check-every", type=positive_int, default=None,
                   help="nectar: a shadow quality check every this many decode steps (default 16)")
    p.add_argument("--check-backoff", type=positive_int, default=None,
                   help="nectar, proxy: once the checks agree on the slope, space them out to "
                        "check-every × up to this (1: a check every check-every steps; default 8)")
    p.add_argument("--check-rows", type=positive_int, default=None,
                   help="nectar: rows a check re-runs under static routing, the batch's first ones (default: all)")
    p.add_argument("--quality-signal", choices=["checks", "proxy"], default="proxy",
                   help="nectar: price by the routing weight dropped (every token, free) times a slope the "
                        "checks estimate (proxy, nectar/serving/dropped_mass.py), or by the checked gaps alone")
    p.add_argument("--check-gap", choices=["nll", "kl"], default="nll",
                   help="nectar: a checked row's quality gap — the NLL increase of its next reference token (nll), "
                        "or the vocabulary KL(static ‖ routed) of its next-token distribution (kl: no sampling noise)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="trace and request-window seed")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="serve every policy this many times (seeds seed, seed+1, …); the margin gets a 95%% interval")
    p.add_argument("--cuda-graphs", choices=GRAPH_CHOICES, default="auto",
                   help="decode steps as CUDA graph replays (auto: on a CUDA device where the model can be "
                        "captured; on: required; off: the eager path)")
    p.add_argument("--gpu", default=None, help="simulator GPU preset, name or JSON path (default: h100_sxm)")
    p.add_argument("--price-as", default="auto", help="simulator: price at this width (auto = distilgpt2; none = as it ran)")
    p.add_argument("--drive-shape", choices=sorted(SHAPES), default=None,
                   help="also run a random-weight model of this shape, routed as the trained model routes "
                        "(energy at that size; needs a device backend: --backend nvml)")
    p.add_argument("--drive-layers", type=positive_int, default=None,
                   help="blocks of the driven shape (default: the shape's own, 16 for olmoe-1b-7b)")
    p.add_argument("--drive-dtype", choices=DRIVE_DTYPES, default="auto",
                   help="dtype of the driven model (auto: the trained model's, bfloat16 on a GPU)")
    p.add_argument("--out", type=Path, default=Path("runs/serve"), help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the frontier report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def default_policies(top_k: int) -> list[str]:
    statics = [f"static-top{k}" for k in range(top_k, 0, -1)]
    return statics + [f"batch-aware:{top_k}", "batch-price:0.1", "batch-price:0.3", "batch-price:1",
                      "top-p:0.5", "nectar"]


def check_cuda_graphs(choice: str, torch_device: str | None = None) -> None:
    """`--cuda-graphs on` needs the model on a CUDA device: refused before anything runs otherwise
    (first whether torch sees a GPU at all, then, once the backend exists, where it runs the model)."""
    if choice != "on":
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--cuda-graphs on needs a CUDA device, and torch sees none (use --cuda-graphs auto|off)")
    if torch_device is not None and not torch_device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs on needs the model on a CUDA device; this backend runs it on {torch_device} "
                         "(use --backend nvml, or --cuda-graphs auto|off)")


def check_drive(args, torch_device: str | None = None) -> None:
    """--drive-* options make sense together, and (once the backend's `torch_device` is known) only
    where it runs the model on a GPU (the simulator runs it on the CPU and prices a larger width with
    --price-as instead)."""
    if args.drive_shape is None:
        if args.drive_layers is not None or args.drive_dtype != "auto":
            raise ValueError("--drive-layers and --drive-dtype need --drive-shape")
        return
    if torch_device is not None and not torch_device.startswith("cuda"):
        raise ValueError(f"--drive-shape runs the {args.drive_shape} shape on the GPU it measures (--backend nvml); "
                         f"the simulator prices a larger width with --price-as {args.drive_shape}")
    layers = SHAPES[args.drive_shape].layers
    if args.drive_layers is not None and args.drive_layers > layers:
        raise ValueError(f"--drive-layers {args.drive_layers} exceeds the {args.drive_shape} shape's {layers} layers")


def drive(model, args):
    """The served model, driving a random-weight model of --drive-shape when asked."""
    if args.drive_shape is None:
        return model
    import torch

    from nectar.serving.driven import build_driven

    dtype = None if args.drive_dtype == "auto" else getattr(torch, args.drive_dtype)
    return build_driven(model, SHAPES[args.drive_shape], args.drive_layers, dtype, seed=args.seed)


def decode_path(choice: str, model) -> tuple[str, str | None]:
    """("graph" | "eager", why not captured): auto captures where it can, on insists."""
    from nectar.serving.graphs import capture_blocker

    if choice == "off" or (choice == "auto" and next(model.parameters()).device.type != "cuda"):
        return "eager", None
    reason = capture_blocker(model)
    if reason and choice == "on":
        raise ValueError(f"--cuda-graphs on: the decode step cannot be captured: {reason}")
    return ("eager", f"not captured: {reason}") if reason else ("graph", None)


def hbm_for(gpu: str) -> float | None:
    return next((bw for name, bw in HBM_GBPS.items() if name in (gpu or "")), None)


def _config(args, top_k: int, max_positions: int):
    from nectar.serving.controller import ServingControllerConfig
    from nectar.serving.frontier import ServingConfig
    from nectar.serving.loop import ServeLimits
    from nectar.serving.traces import LengthDist, TraceConfig

    context = min(max_positions, 4 * (args.prompt_median + args.output_median))
    prompt = LengthDist(args.prompt_median, 0.5, min(8, args.prompt_median), max(args.prompt_median, context // 2))
    output = LengthDist(args.output_median, 0.5, min(4, args.output_median), max(args.output_median, context // 4))
    trace = TraceConfig(args.trace, args.requests, args.rate, args.seed, prompt, output)
    policies = tuple(args.policies or default_policies(top_k))
    checks = {"check_every": args.check_every or ServingControllerConfig.check_every, "check_rows": args.check_rows,
              "quality_signal": args.quality_signal, "check_gap": args.check_gap,
              "check_backoff": args.check_backoff or ServingControllerConfig.check_backoff}
    return ServingConfig(trace, ServeLimits(args.batch_max, args.prefill_chunk, context), policies,
                         f"static-top{top_k}", args.max_ppl_increase, args.seed,
                         controller=ServingControllerConfig(**checks))


def run_serving(args, out: Path, command: str) -> dict:
    from dataclasses import replace

    from nectar.cli.experiment_args import place_model
    from nectar.plugins import make_backend
    from nectar.serving.frontier import model_top_k, serving_report
    from nectar.serving.outputs import write_serving_outputs
    from nectar.serving.policies import check_serving_policies
    from nectar.train.recipes import committed_model
    from nectar.train.saved_model import load_demo_model

    demo = load_demo_model(args.model or committed_model("cpu-demo"))
    factory = lambda: make_backend(args.backend, seed=args.seed, preset=args.gpu, price_as=args.price_as)  # noqa: E731
    first = factory()
    check_cuda_graphs(args.cuda_graphs, first.torch_device)
    check_drive(args, first.torch_device)
    model = drive(place_model(demo.model, first.torch_device).eval(), args)
    layer = model.moe_layers()[0][1]
    top_k = model_top_k(model, layer)
    positions = getattr(model, "max_positions", None) or model.config.n_positions
    cfg = _config(args, top_k, positions)
    cfg.decode_path, cfg.graphs_note = decode_path(args.cuda_graphs, model)
    cfg.validate()
    check_serving_policies(list(cfg.policies), layer, top_k)
    info = first.info()
    cfg.hbm_GBps = hbm_for(info.get("gpu", ""))
    warm_up(model, first, cfg, demo.heldout_ids)
    reports, runs = [], {}
    for r in range(args.repeats):
        rep = replace(cfg, seed=cfg.seed + r, trace=replace(cfg.trace, seed=cfg.trace.seed + r))
        runs = serve_policies(model, first, factory, rep, demo.heldout_ids, args.no_progress, r)
        reports.append(serving_report(runs, rep, {"backend": args.backend, "gpu": info.get("gpu")}))
    first.close()
    report = with_repeats(reports)
    if hasattr(model, "drive_info"):
        report["driven_by"] = model.drive_info()
    write_serving_outputs(out, report, runs, command)
    return report


def serve_policies(model, first, factory, cfg, stream, quiet: bool, repeat: int) -> dict:
    """Every policy once over the trace: on `first` when the backend is shared (a real GPU), on a
    fresh backend each when backends are isolated (the simulator: same initial state for all)."""
    from tqdm import tqdm

    from nectar.serving.frontier import serve_policy

    runs = {}
    for policy in cfg.policies:
        backend = factory() if first.isolated else first
        label = policy if repeat == 0 else f"{policy} (repeat {repeat})"
        with tqdm(total=cfg.trace.n_requests, desc=label, disable=quiet, file=sys.stderr) as bar:
            runs[policy] = serve_policy(model, backend, policy, cfg, stream, progress=lambda done: bar.update(done - bar.n))
        if backend is not first:
            backend.close()
    return runs


def with_repeats(reports: list[dict]) -> dict:
    """The first repeat's report (seed --seed; its steps and requests are the ones written) with every
    repeat's margin over the hull and their 95 % interval (seeds seed, seed+1, …)."""
    from nectar.experiment.frontier_run import interval

    margins = [r.get("nectar_margin_over_hull") for r in reports]
    return {**reports[0], "repeats": len(reports), "nectar_margin_per_repeat": margins,
            "nectar_saved_per_repeat": [r.get("nectar_saved") for r in reports],
            "nectar_dppl_per_repeat": [r.get("nectar_dppl") for r in reports],
            "nectar_guard_share_per_repeat": [r.get("nectar_guard_share") for r in reports], **interval(margins)}


def warm_up(model, backend, cfg, stream) -> None:
    """Serve the first few requests once with the baseline, unmeasured, before any policy: the first
    policy must not pay for kernel selection, allocator growth and clock ramp-up."""
    from dataclasses import replace

    from nectar.serving.frontier import serve_policy

    short = replace(cfg, trace=replace(cfg.trace, n_requests=min(cfg.trace.n_requests, 2 * cfg.limits.batch_max)))
    serve_policy(model, backend, cfg.baseline, short, stream)


def print_report(report: dict) -> None:
    print(f"serving, trace {report['trace']}, batch_max {report['batch_max']}, {report['backend']} ({report['gpu']}); "
          f"energy: {report['energy_metric']}")
    print(f"{'policy':<20}{'saved %':>9}{'dppl %':>9}{'agree':>7}{'TPOT p99 ms':>13}{'TTFT p99 ms':>13}{'batch':>7}")
    for p in report["policies"]:
        print(f"{p['name']:<20}{100 * p['saved']:>9.2f}{100 * p['dppl']:>9.3f}{p['greedy_agreement']:>7.3f}"
              f"{1e3 * p['tpot_p99_s']:>13.2f}{1e3 * p['ttft_p99_s']:>13.2f}{p['mean_batch']:>7.2f}")
    margin = report.get("nectar_margin_over_hull")
    if "nectar_saved" in report:
        print(f"nectar: saved {100 * report['nectar_saved']:.2f} % at {100 * report['nectar_dppl']:+.3f} % ppl; "
              f"margin over the hull: {'n/a' if margin is None else f'{100 * margin:+.2f} points'}")
    if "nectar_guard_share" in report:
        print(check_line(report))
    if report.get("nectar_margin_ci95"):
        lo, hi = report["nectar_margin_ci95"]
        print(f"margin over {report['repeats']} repeats: {100 * report['nectar_margin_mean']:+.2f} points, "
              f"95 % interval [{100 * lo:+.2f}, {100 * hi:+.2f}]")
    print(decode_line(report["policies"]))
    if report.get("driven_by"):
        print(f"driven: {report['driven_by']['note']}")


def check_line(report: dict) -> str:
    """What NECTAR's quality checks cost inside its totals (its decode energy and time include them)."""
    row = next((p for p in report["policies"] if p["name"] == "nectar"), {})
    return (f"nectar's checks: {row.get('checked_steps', 0)} steps, {row.get('check_energy_J', 0.0):.3g} J "
            f"= {100 * report['nectar_guard_share']:.2f} % of its decode energy, {row.get('check_time_s', 0.0):.3g} s "
            "(inside its totals)")


def decode_line(policies: list[dict]) -> str:
    """How the decode steps ran, over all policies (captured: graphs, capture time, fallbacks)."""
    if not all(p.get("graphs") for p in policies):
        note = next((p["graphs_note"] for p in policies if p.get("graphs_note")), None)
        return "decode steps: eager" + (f" ({note})" if note else "")
    captured = sum(p["graphs_captured"] + p.get("shadow_graphs_captured", 0) for p in policies)
    return (f"decode steps: CUDA graphs, {captured} captured in "
            f"{sum(p['capture_s'] for p in policies):.1f} s (before each policy's run), "
            f"{sum(p['eager_fallbacks'] for p in policies)} eager fallbacks, shadow checks "
            f"{sum(p.get('shadow_graph_steps', 0) for p in policies)} replayed / "
            f"{sum(p['shadow_eager_steps'] for p in policies)} eager")


@cli_errors("serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nectar.experiment.outputs import prepare_out
    from nectar.train.recipes import committed_model

    command = "nectar serve " + " ".join(argv if argv is not None else sys.argv[2:])
    check_cuda_graphs(args.cuda_graphs)
    check_drive(args)
    out = prepare_out(args.out, args.overwrite, inputs=[args.model or committed_model("cpu-demo")])
    with out as tmp:
        report = run_serving(args, tmp, command)
    if args.json:
        print(strict_json(report, indent=2, sort_keys=True))
    else:
        print_report(report)
        print(f"wrote {args.out}/frontier.json, steps.csv, requests.csv and plots")
    return 0
