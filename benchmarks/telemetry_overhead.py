"""Benchmark: what the NVML sensor sampler costs, and how far the energy counter is from integrated power.

On a GPU host it runs a bf16 workload (a stand-in MoE forward: per layer an attention-sized pair of
projections plus top-k routed GELU experts in a per-expert loop, or a saved MoE model with
`--model-dir`) in interleaved trials with the background sampler off and on (ABBA order, same
process, same warm GPU). Each trial is one energy window of `--seconds` (≥ 5 s advised); it
reports tokens/s per mode, the sampler's overhead in %, and for sampler-on trials the counter's
energy against the integrated instant power in %. Prints a table; `--json-out` writes the data.
Exits with code 2 and a clear message on a machine without a CUDA GPU or NVML.

    PYTHONPATH=. python benchmarks/telemetry_overhead.py --seconds 6 --trials 3 --json-out runs/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="length of each trial window (s)")
    p.add_argument("--trials", type=int, default=3, help="pairs of (sampler off, sampler on) trials")
    p.add_argument("--warmup-seconds", type=float, default=5.0)
    p.add_argument("--sample-period", type=float, default=0.01, help="sampler period (s)")
    p.add_argument("--device-index", type=int, default=0, help="NVML index of the GPU (same as cuda:0 here)")
    p.add_argument("--tokens", type=int, default=32 * 1024, help="tokens per step (stand-in workload)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--model-dir", type=Path, help="saved MoE model (nectar.model) instead of the stand-in")
    p.add_argument("--batch", type=int, default=32, help="batch for --model-dir")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for --model-dir")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.trials < 1 or args.sample_period <= 0 or not 1 <= args.top_k <= args.experts:
        p.error("need --seconds > 0, --trials >= 1, --sample-period > 0 and 1 <= --top-k <= --experts")
    return args


def require_gpu(device_index: int):
    """(torch, NvmlApi) or exit 2 with a message saying what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit(_fail("torch is not installed"))
    if not torch.cuda.is_available():
        sys.exit(_fail("no CUDA GPU visible to torch (this benchmark needs a GPU host)"))
    from hw.nvml_api import NvmlApi, NvmlUnavailable

    try:
        return torch, NvmlApi(device_index)
    except NvmlUnavailable as exc:
        sys.exit(_fail(str(exc)))


def _fail(reason: str) -> int:
    print(f"telemetry_overhead: cannot run: {reason}. Nothing was measured.", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------- workloads
def stand_in_moe(torch, args) -> tuple[Callable[[], Any], int]:
    """A bf16 MoE-shaped forward step; returns (step, tokens per step)."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def weight(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) / shape[-2] ** 0.5

    d, f, e = args.d_model, args.d_ff, args.experts
    layers = [dict(qkv=weight(d, 3 * d), proj=weight(3 * d, d), gate=weight(d, e),
                   w1=weight(e, d, f), w2=weight(e, f, d)) for _ in range(args.layers)]
    x0 = torch.randn(args.tokens, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # [N, D]

    def moe(x, layer):
        scores = (x @ layer["gate"]).float().softmax(-1)  # [N, E]
        gates, experts = scores.topk(args.top_k, dim=-1)  # [N, K]
        out = torch.zeros_like(x)  # [N, D]
        for i in range(e):
            rows, slots = (experts == i).nonzero(as_tuple=True)  # [n_i]
            h = torch.nn.functional.gelu(x[rows] @ layer["w1"][i]) @ layer["w2"][i]  # [n_i, D]
            out.index_add_(0, rows, h * gates[rows, slots, None].to(h.dtype))
        return out

    @torch.inference_mode()
    def step():
        x = x0
        for layer in layers:
            x = x + (x @ layer["qkv"]) @ layer["proj"]  # attention-sized projections [N, D]
            x = x + moe(x, layer)
        return x

    return step, args.tokens


def saved_model(torch, args) -> tuple[Callable[[], Any], int]:
    """Forward passes of a saved MoE model on random token ids."""
    try:
        from nectar.model import MoEGPT2LMHeadModel as model_class
    except ImportError:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(args.model_dir, local_files_only=True).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device="cuda")  # [B, T]

    @torch.inference_mode()
    def step():
        return model(input_ids=ids).logits

    return step, args.batch * args.seq_len


# ---------------------------------------------------------------------- trials
def run_trial(torch, api, step, tokens_per_step, args, sampler_on: bool) -> dict[str, Any]:
    from hw.energy_meter import EnergyMeter
    from hw.sampler import SensorSampler

    sampler = SensorSampler(api, args.sample_period).start() if sampler_on else None
    meter = EnergyMeter(api, sync=torch.cuda.synchronize, sampler=sampler)
    try:
        meter.begin_window("trial")
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < args.seconds:
            step()
            steps += 1
        m = meter.end_window("trial")
    finally:
        if sampler is not None:
            sampler.stop()
    disagreement = m.disagreement() if sampler_on else None
    return {
        "sampler": "on" if sampler_on else "off", "steps": steps, "duration_s": m.duration_s,
        "tokens_per_s": steps * tokens_per_step / m.duration_s, "energy_J": m.energy_J,
        "counter_energy_J": m.counter_energy_J, "power_energy_J": m.power_energy_J,
        "counter_vs_power_pct": None if disagreement is None else 100 * disagreement,
        "mJ_per_token": 1000 * m.energy_J / (steps * tokens_per_step),
        "mean_power_W": m.sensors.mean_power_W, "samples": m.sensors.count,
        "gpu_temp_C": m.sensors.gpu_temp_C, "flags": m.flags,
    }


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    rate = {mode: statistics.median(t["tokens_per_s"] for t in trials if t["sampler"] == mode) for mode in ("off", "on")}
    gaps = [t["counter_vs_power_pct"] for t in trials if t["counter_vs_power_pct"] is not None]
    return {
        "tokens_per_s_sampler_off": rate["off"], "tokens_per_s_sampler_on": rate["on"],
        "sampler_overhead_pct": 100 * (rate["off"] - rate["on"]) / rate["off"],
        "counter_vs_power_pct_mean": statistics.fmean(gaps) if gaps else None,
        "counter_vs_power_abs_pct_max": max(map(abs, gaps)) if gaps else None,
    }


def print_table(trials: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(f"{'#':>2} {'sampler':>7} {'s':>6} {'tok/s':>11} {'mJ/tok':>7} {'W':>6} {'°C':>4} {'samples':>7} "
          f"{'counter J':>10} {'power J':>10} {'diff %':>7}")
    for i, t in enumerate(trials):
        diff = "" if t["counter_vs_power_pct"] is None else f"{t['counter_vs_power_pct']:+.2f}"
        print(f"{i:>2} {t['sampler']:>7} {t['duration_s']:6.2f} {t['tokens_per_s']:11.0f} {t['mJ_per_token']:7.3f} "
              f"{t['mean_power_W'] or float('nan'):6.1f} {t['gpu_temp_C'] or float('nan'):4.0f} {t['samples']:7d} "
              f"{t['counter_energy_J'] or float('nan'):10.1f} {t['power_energy_J'] or float('nan'):10.1f} {diff:>7}")
    print(f"median tokens/s: sampler off {summary['tokens_per_s_sampler_off']:.0f}, "
          f"on {summary['tokens_per_s_sampler_on']:.0f} -> sampler overhead {summary['sampler_overhead_pct']:+.2f}%")
    if summary["counter_vs_power_pct_mean"] is not None:
        print(f"counter vs integrated instant power: mean {summary['counter_vs_power_pct_mean']:+.2f}%, "
              f"max |diff| {summary['counter_vs_power_abs_pct_max']:.2f}%")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, api = require_gpu(args.device_index)
    from hw.info import device_info

    try:
        step, tokens_per_step = saved_model(torch, args) if args.model_dir else stand_in_moe(torch, args)
        warm_end = time.perf_counter() + args.warmup_seconds
        while time.perf_counter() < warm_end:
            step()
        torch.cuda.synchronize()
        trials = []
        for trial in range(args.trials):
            order = (False, True) if trial % 2 == 0 else (True, False)  # ABBA against drift
            trials += [run_trial(torch, api, step, tokens_per_step, args, on) for on in order]
        summary = summarise(trials)
        print_table(trials, summary)
        report = {"device": device_info(args.device_index, api), "args": {k: str(v) for k, v in vars(args).items()},
                  "workload": "saved model" if args.model_dir else "stand-in MoE", "trials": trials, "summary": summary}
    finally:
        api.shutdown()
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
