"""Benchmark: what the NVML sensor sampler costs in tokens/s, as an interleaved A/B with a 95 % interval.

Workload: the experiment's chunk forward (`forward_chunk`, recorder + NLL + workload read-back) of
the random-weight MoE-DistilGPT2 in bf16 (benchmarks/forward_chunk.py), or a saved model
(`--model-dir`). Each trial runs a fixed number of steps (calibrated to last `--seconds`) inside
an energy window (hw.energy_meter), with the background sampler (hw.sampler) off or on. One
alternation is one off and one on trial, in ABBA order (off-on, on-off, ...) against drift; the
per-alternation ratio r_i = tokens/s(on) / tokens/s(off) pairs trials that ran seconds apart.

  overhead = 1 − exp(mean log r_i)   (%, > 0: slower with the sampler)
  ci_low, ci_high: the same of mean log r_i ∓ t_{0.975, n−1} · sd / √n  (Student t interval)

It also times each NVML query the sampler makes (µs per call) and the sampler's fast tick (power
only) and slow tick (all fields), and reports, for the sampler-on trials, the energy counter
against the integrated instant power. Prints a table; `--json-out` writes the data.

    PYTHONPATH=. python benchmarks/telemetry_overhead.py --alternations 10 --seconds 2 --json-out telemetry_overhead.json
    PYTHONPATH=. python benchmarks/telemetry_overhead.py --device cpu --quick   # smoke run: CPU, constant stand-in sensor

On a machine without a CUDA GPU or NVML it exits with code 2 and a clear message, unless
`--device cpu` (then the sensor is a constant stand-in and nothing about a GPU is measured).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Student t quantiles t_{0.975, df} for df = 1..30; beyond, 1.96 + 2.4/df is within 0.002.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 pairs (df >= 1), got df={df}")
    return T975[df - 1] if df <= 30 else 1.96 + 2.4 / df


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--alternations", type=int, default=10, help="pairs of (sampler off, sampler on) trials")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each trial (s)")
    p.add_argument("--warmup-seconds", type=float, default=3.0)
    p.add_argument("--sample-period", type=float, default=0.01, help="sampler period (s)")
    p.add_argument("--slow-every", type=int, default=10, help="sampler reads the slow fields every N ticks")
    p.add_argument("--device-index", type=int, default=0, help="NVML index of the GPU (same as cuda:0 here)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--model-dir", type=Path, help="saved MoE model (nectar.models.gpt2_moe) instead of random weights")
    p.add_argument("--query-calls", type=int, default=200, help="calls per NVML query in the cost table")
    p.add_argument("--quick", action="store_true", help="tiny model, short trials (smoke test)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.alternations, args.seconds, args.warmup_seconds = min(args.alternations, 3), 0.2, 0.2
        args.batch, args.seq_len, args.vocab, args.query_calls = 2, 32, 256, 20
    if args.seconds <= 0 or args.alternations < 2 or args.sample_period <= 0 or args.slow_every < 1:
        p.error("need --seconds > 0, --alternations >= 2, --sample-period > 0 and --slow-every >= 1")
    return args


def _fail(reason: str) -> int:
    print(f"telemetry_overhead: cannot run: {reason}. Nothing was measured.", file=sys.stderr)
    return 2


class ConstantSensor:
    """The NVML adapter's methods with constant readings: the CPU smoke run's stand-in (no GPU)."""

    unsupported: set = set()
    power_is_average = False

    def __init__(self):
        self._t0 = time.perf_counter()

    def total_energy_mJ(self) -> int:
        return int(100_000 * (time.perf_counter() - self._t0))  # 100 W

    def power_instant_W(self) -> float:
        return 100.0

    def power_and_mem_temp(self):
        return 100.0, 40.0

    def gpu_temp_C(self):
        return 40.0

    def mem_temp_C(self):
        return 40.0

    def memory_B(self):
        return (0, 1)

    def sm_clock_MHz(self):
        return 1000.0

    def clock_event_reasons(self):
        return 0

    def shutdown(self) -> None:
        pass


def open_sensor(args) -> tuple[Any, Any, str]:
    """(torch, sensor adapter, description) or exit 2 with what is missing."""
    try:
        import torch
    except ImportError:
        sys.exit(_fail("torch is not installed"))
    if args.device == "cpu":
        return torch, ConstantSensor(), "constant stand-in (CPU smoke run, no GPU measured)"
    if not torch.cuda.is_available():
        sys.exit(_fail("no CUDA GPU visible to torch (this benchmark needs a GPU host; --device cpu for a smoke run)"))
    from hw.nvml_api import NvmlApi, NvmlUnavailable

    try:
        api = NvmlApi(args.device_index)
    except NvmlUnavailable as exc:
        sys.exit(_fail(str(exc)))
    return torch, api, api.name()


def make_workload(torch, args) -> tuple[Callable[[], Any], int]:
    """(step, tokens per step): one forward_chunk of the model on a fixed random batch."""
    from benchmarks.forward_chunk import build_model
    from nectar.experiment.forward import forward_chunk

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_dir:
        from nectar.models.gpt2_moe import MoEGPT2LMHeadModel

        model = MoEGPT2LMHeadModel.from_pretrained(args.model_dir, local_files_only=True).to(device, dtype).eval()
    else:
        model = build_model(args.vocab, dtype, device, tiny=args.quick)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    return (lambda: forward_chunk(model, ids)), ids.numel()


def query_costs(sensor, calls: int) -> dict[str, float]:
    """µs per call of each NVML query the sampler makes, and of its two kinds of tick."""
    from hw.sample import read_sample

    queries = {
        "power_instant": sensor.power_instant_W, "power_and_mem_temp": sensor.power_and_mem_temp,
        "gpu_temp": sensor.gpu_temp_C, "memory": sensor.memory_B, "sm_clock": sensor.sm_clock_MHz,
        "clock_events": sensor.clock_event_reasons, "energy_counter": sensor.total_energy_mJ,
        "tick_fast (power only)": lambda: read_sample(sensor, time.perf_counter, slow_fields=False),
        "tick_slow (all fields)": lambda: read_sample(sensor, time.perf_counter, slow_fields=True),
    }
    costs = {}
    for name, fn in queries.items():
        n = max(1, calls // 10) if name == "energy_counter" else calls
        start = time.perf_counter()
        for _ in range(n):
            fn()
        costs[name] = (time.perf_counter() - start) / n * 1e6
    return costs


def run_trial(torch, sensor, step, steps: int, tokens_per_step: int, args, sampler_on: bool) -> dict[str, Any]:
    from hw.energy_meter import EnergyMeter
    from hw.sampler import SensorSampler

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sampler = SensorSampler(sensor, args.sample_period, slow_every=args.slow_every).start() if sampler_on else None
    meter = EnergyMeter(sensor, sync=sync, sampler=sampler)
    try:
        meter.begin_window("trial")
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        elapsed = time.perf_counter() - start
        m = meter.end_window("trial")
    finally:
        if sampler is not None:
            sampler.stop()
    disagreement = m.disagreement() if sampler_on else None
    return {
        "sampler": "on" if sampler_on else "off", "steps": steps, "seconds": elapsed,
        "tokens_per_s": steps * tokens_per_step / elapsed, "energy_J": m.energy_J,
        "counter_vs_power_pct": None if disagreement is None else 100 * disagreement,
        "samples": m.sensors.count, "mean_power_W": m.sensors.mean_power_W, "gpu_temp_C": m.sensors.gpu_temp_C,
        "flags": m.flags,
    }


def paired_overhead(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Overhead (%) and its 95 % t interval from the per-alternation on/off tokens/s ratios."""
    pairs = [(trials[i], trials[i + 1]) for i in range(0, len(trials) - 1, 2)]
    ratios = []
    for a, b in pairs:
        on, off = (a, b) if a["sampler"] == "on" else (b, a)
        ratios.append(on["tokens_per_s"] / off["tokens_per_s"])
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"overhead": 100 * (1 - math.exp(mean)), "ci_low": 100 * (1 - math.exp(mean + half)),
            "ci_high": 100 * (1 - math.exp(mean - half)), "unit": "percent of tokens/s (> 0: slower with sampler)",
            "alternations": len(ratios), "ratios_on_over_off": ratios,
            "interval": "Student t, 95 %, on the mean log ratio"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, sensor, sensor_name = open_sensor(args)
    try:
        step, tokens_per_step = make_workload(torch, args)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        warm_end, warm_steps = time.perf_counter() + args.warmup_seconds, 0
        step()
        sync()
        start = time.perf_counter()
        while time.perf_counter() < warm_end or warm_steps < 2:
            step()
            warm_steps += 1
        sync()
        per_step = (time.perf_counter() - start) / warm_steps
        steps = max(1, round(args.seconds / per_step))
        costs = query_costs(sensor, args.query_calls)
        trials = []
        for i in range(args.alternations):
            order = (False, True) if i % 2 == 0 else (True, False)  # ABBA against drift
            trials += [run_trial(torch, sensor, step, steps, tokens_per_step, args, on) for on in order]
        summary = paired_overhead(trials)
        gaps = [t["counter_vs_power_pct"] for t in trials if t["counter_vs_power_pct"] is not None]
        summary.update(counter_vs_power_pct_mean=statistics.fmean(gaps) if gaps else None,
                       counter_vs_power_abs_pct_max=max(map(abs, gaps)) if gaps else None)
    finally:
        sensor.shutdown()
    print_report(sensor_name, costs, trials, summary, steps, tokens_per_step)
    report = {**summary, "sensor": sensor_name, "torch": torch.__version__, "steps_per_trial": steps,
              "tokens_per_step": tokens_per_step, "sample_period_s": args.sample_period, "slow_every": args.slow_every,
              "workload": f"forward_chunk of {'a saved model' if args.model_dir else 'random-weight MoE-DistilGPT2'}",
              "nvml_query_us": costs, "trials": trials, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.json_out:
        from benchmarks.timing import write_json

        write_json(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0


def print_report(sensor_name, costs, trials, summary, steps, tokens_per_step) -> None:
    print(f"# sensor: {sensor_name}; {steps} steps of {tokens_per_step} tokens per trial")
    print("# NVML query cost (µs per call): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    print(f"{'#':>2} {'sampler':>7} {'s':>6} {'tok/s':>12} {'W':>6} {'samples':>7} {'counter-power %':>15}")
    for i, t in enumerate(trials):
        diff = "" if t["counter_vs_power_pct"] is None else f"{t['counter_vs_power_pct']:+.2f}"
        print(f"{i:>2} {t['sampler']:>7} {t['seconds']:6.2f} {t['tokens_per_s']:12.0f} "
              f"{t['mean_power_W'] or float('nan'):6.1f} {t['samples']:7d} {diff:>15}")
    print(f"sampler overhead {summary['overhead']:+.2f} % of tokens/s, 95 % interval "
          f"[{summary['ci_low']:+.2f}, {summary['ci_high']:+.2f}] % over {summary['alternations']} alternations")
    if summary["counter_vs_power_pct_mean"] is not None:
        print(f"counter vs integrated instant power: mean {summary['counter_vs_power_pct_mean']:+.2f} %, "
              f"max |diff| {summary['counter_vs_power_abs_pct_max']:.2f} %")


if __name__ == "__main__":
    raise SystemExit(main())
