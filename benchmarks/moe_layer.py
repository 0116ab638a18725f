"""Benchmark: MoE layer throughput (tokens/s) vs a dense FFN with the same active FLOPs.

E experts of width H with top-k routing do k·H-wide FFN work per token, like one dense FFN of
width k·H (e.g. E=8, top-2, H=3072 vs dense 6144). Times forward passes under inference mode,
after warm-up, synchronising the device before and after each timed call, and prints what it
measured: median time, tokens/s and achieved GFLOP/s (active expert + router FLOPs).

    python benchmarks/moe_layer.py --device cpu --tokens 1024 --d-model 256 --hidden 1024
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 32768
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nectar.moe import dispatch
from nectar.moe.dispatch import grouped_mm_usable
from nectar.moe.experts import EXPERT_KINDS, ExpertSpec, build_experts
from nectar.moe.layer import MoELayer
from nectar.moe.static_routers import TopKRouter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per forward (batch × sequence)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072, help="width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--kind", choices=["swiglu", "gelu"], default="swiglu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grouped-on-cpu", action="store_true", help="also try torch._grouped_mm on CPU (off by default)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    for name in ("tokens", "repeats", "d_model", "hidden", "experts", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.top_k > args.experts:
        parser.error("--top-k must not exceed --experts")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward, one synchronised measurement per repeat."""
    for _ in range(warmup):
        module(x)
    times = []
    for _ in range(repeats):
        synchronize(x.device)
        start = time.perf_counter()
        module(x)
        synchronize(x.device)
        times.append(time.perf_counter() - start)
    return times


def report(name: str, times: list[float], tokens: int, flops_per_token: float, baseline: float | None) -> float:
    median = statistics.median(times)
    throughput = tokens / median
    relative = "" if baseline is None else f"  {throughput / baseline:5.2f}x dense"
    print(f"{name:<22} {median * 1e3:9.2f} ms  (min {min(times) * 1e3:8.2f})  {throughput:12,.0f} tok/s  "
          f"{flops_per_token * tokens / median / 1e12:8.3f} TFLOP/s{relative}")
    return throughput


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.grouped_on_cpu:
        dispatch.GROUPED_MM_DEVICE_TYPES.add("cpu")
    build = EXPERT_KINDS[args.kind].build
    dense = build(args.d_model, args.top_k * args.hidden).to(device, args.dtype).eval()
    experts = build_experts([ExpertSpec(args.kind, args.hidden, args.experts)], args.d_model)
    moe = MoELayer(args.d_model, experts, TopKRouter(args.experts, args.top_k)).to(device, args.dtype).eval()
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=args.dtype)

    with torch.inference_mode():
        moe(x)
    loads = moe.last_metrics.tokens_per_expert
    grouped_ok = grouped_mm_usable(x)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"tokens={args.tokens} d_model={args.d_model} {args.kind}: E={args.experts} top-{args.top_k} hidden={args.hidden} "
          f"vs dense hidden={args.top_k * args.hidden}; repeats={args.repeats} warmup={args.warmup}")
    print(f"routing load per expert: {loads} (max/mean {max(loads) / (sum(loads) / len(loads)):.2f}); "
          f"torch._grouped_mm usable: {grouped_ok}")

    dense_flops = dense.cost_per_token().flops
    baseline = report("dense FFN", time_forward(dense, x, args.warmup, args.repeats), args.tokens, dense_flops, None)
    moe_flops = moe.dense_equivalent_flops()
    default_rows = dispatch.GROUPED_MM_MAX_MEAN_ROWS
    variants = [("MoE (default policy)", True, default_rows), ("MoE (per-expert loop)", False, default_rows)]
    if grouped_ok:
        variants.insert(1, ("MoE (grouped mm)", True, float("inf")))
    for name, grouped, max_rows in variants:
        moe.grouped, dispatch.GROUPED_MM_MAX_MEAN_ROWS = grouped, max_rows
        report(name, time_forward(moe, x, args.warmup, args.repeats), args.tokens, moe_flops, baseline)
    dispatch.GROUPED_MM_MAX_MEAN_ROWS = default_rows
    print(f"active FLOPs/token: dense {dense_flops:,.0f}, MoE {moe_flops:,.0f} (experts + router 2·D·E)")


if __name__ == "__main__":
    main()
