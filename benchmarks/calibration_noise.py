"""Benchmark: how repeatable the cost calibration's measurements are, with and without a settle.

The model is the GPU experiment's MoE-DistilGPT2 shape with random weights (6 layers × 768; the
`distilgpt2` recipe's pool: 6 full GELU experts, one narrow, zero, copy, constant; bf16 on CUDA)
and one chunk of random tokens. The calibration (`nectar.experiment.calibration`, the loop
dispatch, shape pooling off so the raw marginals show) runs `--repeats` times for each settle in
`--settle-fractions` (a fraction of each point's window run un-timed before it), the settings
interleaved repeat by repeat. Per calibration:

  full_J_cv        coefficient of variation of the marginal energy per slot across the six identical
                   full experts (their work is the same: the spread is the windows' noise)
  full_s_cv        the same for their marginal time
  slot_J, slot_s   what one more (dropped) slot per token costs: its time is positive, and its energy
                   should be too
  power_W          each design point's window power (energy / time)
  check_J_error    the held-out static top-2 check: predicted / measured energy − 1
and per setting the mean and spread over repeats of the pooled full-expert marginal
(`full_J_mean`), the quantity the priced policies use. NVML on CUDA (read-only); the simulator's
pricing on the CPU (a smoke run: its noise is the simulator's sensor model).

    PYTHONPATH=. python benchmarks/calibration_noise.py --device cuda --json-out calibration_noise.json
    PYTHONPATH=. python benchmarks/calibration_noise.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.forward_chunk import DTYPES, build_model  # noqa: E402
from benchmarks.policy_speed import telemetry_backend  # noqa: E402
from benchmarks.timing import check_device_and_sizes, environment, write_json  # noqa: E402
from nectar.experiment.calibration import CalibrationConfig, calibrate  # noqa: E402
from nectar.experiment.policies import policy_router  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1024, help="sequences in the calibration chunk")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--budget-s", type=float, default=2.0, help="the calibration's measured-window budget")
    parser.add_argument("--settle-fractions", default="0,0.5,1", help="settle as a fraction of each point's window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model and chunk for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.micro_batch, args.seq_len, args.vocab, args.repeats = 8, 4, 32, 256, 1
    check_device_and_sizes(parser, args, ("rows", "micro_batch", "seq_len", "vocab", "repeats"))
    try:
        args.settle_fractions = [float(f) for f in args.settle_fractions.split(",") if f.strip()]
    except ValueError:
        parser.error("--settle-fractions must be comma-separated numbers")
    if not args.settle_fractions or min(args.settle_fractions) < 0:
        parser.error("--settle-fractions must be numbers >= 0")
    return args


def _cv(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / abs(mean) if mean else float("nan")


def summarise(table, full: list[int]) -> dict:
    """One calibration's row (see the module docstring)."""
    check = table.checks.get("static-top2", {})
    full_J = [table.expert_J_per_token[e] for e in full]
    return {"full_J_cv": _cv(full_J), "full_s_cv": _cv([table.expert_s_per_token[e] for e in full]),
            "full_J_mean": statistics.fmean(full_J), "slot_J": table.slot_J_per_token, "slot_s": table.slot_s_per_token,
            "power_W": {p.name: p.energy_J / p.duration_s for p in table.points},
            "check_J_error": check["predicted_J"] / check["measured_J"] - 1 if check else None,
            "seconds": table.seconds, "wall_s": table.wall_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES["bfloat16" if device.type == "cuda" else "float32"]
    model = build_model(args.vocab, dtype, device, tiny=args.quick)
    chunk = torch.randint(0, args.vocab, (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    layer = model.moe_layers()[0][1]
    full_flops = max(expert.cost_per_token().flops for expert in layer.experts)
    full = [e for e, expert in enumerate(layer.experts) if expert.cost_per_token().flops == full_flops]
    window_s = args.budget_s / (layer.num_experts + 5)                      # as calibrate() spreads its budget
    backend = telemetry_backend(device)
    rows = {f: [] for f in args.settle_fractions}
    try:
        for r in range(args.repeats):
            for fraction in args.settle_fractions:
                config = CalibrationConfig(budget_s=args.budget_s, micro_rows=args.micro_batch, choose_dispatch=False,
                                           settle_s=fraction * window_s, pool_shapes=False)
                table = calibrate(model, backend, chunk, config, static_router=lambda l: policy_router("static-top2", l))
                rows[fraction].append(summarise(table, full))
                row = rows[fraction][-1]
                print(f"repeat {r} settle {fraction:g}: full-expert J cv {row['full_J_cv']:.3f}, s cv {row['full_s_cv']:.3f}, "
                      f"slot {row['slot_J'] * 1e6:+.3f} µJ / {row['slot_s'] * 1e9:+.3f} ns per token, "
                      f"check J error {row['check_J_error']:+.3f}, {row['seconds']:.2f} s", flush=True)
    finally:
        backend.close()
    settings = [{"settle_fraction": f, "repeats": runs,
                 "full_J_mean_cv_over_repeats": _cv([run["full_J_mean"] for run in runs]) if len(runs) > 1 else None,
                 "median_full_J_cv": statistics.median(run["full_J_cv"] for run in runs)} for f, runs in rows.items()]
    for s in settings:
        print(f"settle {s['settle_fraction']:g}: median cv across identical experts {s['median_full_J_cv']:.3f}; "
              f"cv of their mean over repeats {s['full_J_mean_cv_over_repeats']}", flush=True)
    write_json(args.json_out, {"env": environment(device), "args": {k: v for k, v in vars(args).items()},
                               "full_experts": full, "settings": settings})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
