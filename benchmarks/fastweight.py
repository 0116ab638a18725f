"""Benchmark: LaCT fast-weight throughput (nectar.lact.fastweight) next to the device's matmul rate.

For each chunk size L it times, on the chosen device and dtype,
  kernel  swiglu_fast_weight over `--chunks` chunks (apply-then-update), and
  update  one chunk's update alone (hand gradients + momentum/Muon/weight-norm step),
and reports TFLOP/s with the FLOP count (per head, per chunk, D = dk = dv, H = hidden):
  apply  on the chunk's queries: 3 matmuls               =  6·D·H·L
  update on the chunk's keys: W0k, W2k, W1ᵀv, dW0, dW1, dW2 = 12·D·H·L
  kernel = apply + update                                = 18·D·H·L
Element-wise work and Muon's Newton–Schulz matmuls (independent of L) are not counted, so a
run with --muon reports a lower bound. In the same run it measures a dense n×n×n matmul
(2·n³ FLOPs) in the same dtype as the reference rate.

  python benchmarks/fastweight.py                       # CUDA, bf16, L = 2048..16384
  python benchmarks/fastweight.py --device cpu --quick  # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from nectar.lact.fastweight import fast_weight_step, row_norms, swiglu_chunk_update, swiglu_fast_weight

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass
class Row:
    """One measured configuration."""

    what: str
    chunk: int
    seconds: float
    flops: float
    tflops: float
    fraction_of_matmul: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512, help="D = dk = dv per head")
    parser.add_argument("--hidden", type=int, default=1024, help="H, fast-weight hidden width per head")
    parser.add_argument("--heads", type=int, default=16, help="B = batch x heads (folded)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per sequence in the kernel timing")
    parser.add_argument("--muon", action="store_true", help="orthogonalise updates (Newton-Schulz, not counted)")
    parser.add_argument("--momentum", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the timed functions")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.chunk_sizes, args.dim, args.hidden, args.heads = [64, 128], 32, 64, 2
        args.chunks, args.warmup, args.iters, args.matmul_size = 2, 2, 3, 256
    for name in ("dim", "hidden", "heads", "chunks", "iters", "matmul_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in args.chunk_sizes):
        parser.error("--chunk-sizes must be >= 1")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in seconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_tflops(n: int, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, warmup, iters)
    return 2 * n**3 / seconds / 1e12


def make_stream(args, length: int, device: torch.device, dtype: torch.dtype) -> dict:
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    b, d, h = args.heads, args.dim, args.hidden
    lr = lambda: torch.full((b, length, 1), 1e-3, device=device, dtype=dtype)  # noqa: E731
    return dict(q=rand(b, length, d), k=rand(b, length, d), v=rand(b, length, d),
                w0=rand(b, h, d) / d**0.5, w1=rand(b, d, h) / h**0.5, w2=rand(b, h, d) / d**0.5,
                lr0=lr(), lr1=lr(), lr2=lr())


def update_only(stream: dict, chunk: int, momentum: torch.Tensor | None, use_muon: bool):
    """One chunk's update: hand gradients, then momentum / Muon / weight norm."""
    weights = (stream["w0"], stream["w1"], stream["w2"])
    lrs = (stream[n][:, :chunk] for n in ("lr0", "lr1", "lr2"))
    deltas = swiglu_chunk_update(stream["k"][:, :chunk], stream["v"][:, :chunk], *weights, *lrs)
    gate = None if momentum is None else momentum[:, :chunk].mean(dim=1, keepdim=True)
    return fast_weight_step(weights, deltas, deltas, gate, use_muon, tuple(row_norms(w) for w in weights))


def measure_chunk(args, chunk: int, device, dtype, reference_tflops: float) -> list[Row]:
    stream = make_stream(args, chunk * args.chunks, device, dtype)
    momentum = torch.full_like(stream["lr0"], 0.5) if args.momentum else None
    kernel = lambda: swiglu_fast_weight(**stream, chunk_size=chunk, use_muon=args.muon, momentum=momentum)  # noqa: E731
    update = lambda: update_only(stream, chunk, momentum, args.muon)  # noqa: E731
    if args.compile:
        kernel, update = torch.compile(kernel), torch.compile(update)
    per_chunk = args.heads * args.dim * args.hidden * chunk  # B·D·H·L
    rows = []
    for what, fn, flops in (("kernel", kernel, 18 * per_chunk * args.chunks), ("update", update, 12 * per_chunk)):
        seconds = time_call(fn, device, args.warmup, args.iters)
        tflops = flops / seconds / 1e12
        rows.append(Row(what, chunk, seconds, float(flops), tflops, tflops / reference_tflops))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available; use --device cpu --quick")
    torch.manual_seed(0)
    reference = matmul_tflops(args.matmul_size, device, dtype, args.warmup, args.iters)
    rows = [row for chunk in args.chunk_sizes for row in measure_chunk(args, chunk, device, dtype, reference)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device_name} | dtype {args.dtype} | B={args.heads} D={args.dim} H={args.hidden} "
          f"| muon={args.muon} momentum={args.momentum} compile={args.compile}")
    print("FLOPs per head per chunk: kernel 18*D*H*L (apply 6 + update 12), update 12*D*H*L; "
          "element-wise and Newton-Schulz work not counted")
    print(f"dense {args.matmul_size}^3 matmul: {reference:.4g} TFLOP/s")
    print(f"{'what':<8}{'L':>8}{'ms':>12}{'TFLOP/s':>12}{'of matmul':>12}")
    for row in rows:
        print(f"{row.what:<8}{row.chunk:>8}{row.seconds * 1e3:>12.3f}{row.tflops:>12.4g}{row.fraction_of_matmul:>11.1%}")
    if args.json_out:
        report = dict(device=device_name, torch=torch.__version__, args=vars(args), matmul_tflops=reference,
                      flop_formula="kernel 18*B*D*H*L per chunk (apply 6, update 12); update 12*B*D*H*L",
                      rows=[asdict(r) for r in rows])
        with open(args.json_out, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
