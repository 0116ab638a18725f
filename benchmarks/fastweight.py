"""Benchmark: LaCT fast-weight throughput (nectar.lact.fastweight) next to the device's matmul rate.

For each chunk size L it times, on the chosen device and dtype (eager, and with --compile under
torch.compile as well):
  kernel          swiglu_fast_weight over `--chunks` chunks (apply-then-update, fused W0|W2 layout)
  update          one chunk's fused update (4 bmm) + the fast-weight step (momentum/Muon/weight norm)
  update_unfused  the same update in the unfused 9-bmm form it replaced (gate, up, dW0, dW2 apart)
  update_bmm      the fused update's 4 bmm alone on ready operands: the ceiling at these shapes
  kernel_triton   swiglu_fast_weight(backend="triton"): the element-wise work fused into Triton
                  matmul kernels (nectar/lact/fastweight_triton.py), cuBLAS for the weight gradients
  update_triton   one chunk's update and step on that path
  apply_triton    one chunk's apply on that path (apply: the torch apply, only when named in --rows)
  update_kernel_triton  the update's Triton kernel alone (k W0ᵀ, k W2ᵀ, v W1 and the element-wise
                  outputs dgu, hid: 6·D·H·L), without the cuBLAS weight gradients and the step
  hidden_triton   the apply's Triton kernel alone (x W0ᵀ, x W2ᵀ, silu·: 4·D·H·L), without hidden W1ᵀ
and reports TFLOP/s with the FLOP count (per head, per chunk, D = dk = dv, H = hidden):
  apply  on the chunk's queries: 3 matmuls               =  6·D·H·L
  update on the chunk's keys: W0k, W2k, W1ᵀv, dW0, dW1, dW2 = 12·D·H·L
  kernel = apply + update                                = 18·D·H·L
Element-wise work and Muon's Newton–Schulz matmuls (independent of L) are not counted, so a run
with --muon reports a lower bound. share_of_matmul = TFLOP/s / the rate of a dense n×n×n matmul
(2·n³ FLOPs) measured in the same run and dtype.

The Triton rows run where CUDA and Triton are (a CPU run skips them with a note, or runs them in
Triton's interpreter under TRITON_INTERPRET=1: slow, --quick only). Before timing them at each L,
the path is run on all heads (so that Triton autotunes at the timed shape and those configs are
the checked ones) and checked against fp64 on the first --check-heads heads
(tests/lact/fastweight_checks.py: every piece elementwise, the whole stream normwise); a failure
stops the run with the offending element, and the worst err/tol ratios go into the Triton rows as
`fp64_check`.

  PYTHONPATH=. python benchmarks/fastweight.py --device cuda --compile --json-out fastweight.json
  PYTHONPATH=. python benchmarks/fastweight.py --device cpu --quick       # tiny smoke run
  PYTHONPATH=. python benchmarks/fastweight.py --device cuda --dtype bf16 --dim 512 --hidden 1024 --heads 16 \
      --chunk-sizes 4096 16384 --compile --compile-kernel-sizes 16384 \
      --rows kernel update update_bmm kernel_triton update_triton apply apply_triton   # issue 28's rows

The JSON is a list of rows {L, what, compiled, ms, tflops, share_of_matmul, ...}.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, median, seconds_per_call, write_json  # noqa: E402
from nectar.lact import fastweight_triton  # noqa: E402
from nectar.lact.fastweight import (fast_weight_step, row_norms, silu_derivative,  # noqa: E402
                                    swiglu_apply_fused, swiglu_chunk_update_fused, swiglu_fast_weight)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
TORCH_ROWS = ("kernel", "update", "update_unfused", "update_bmm")
TRITON_ROWS = ("kernel_triton", "update_triton", "apply_triton", "update_kernel_triton", "hidden_triton")
ROWS = TORCH_ROWS + ("apply",) + TRITON_ROWS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512, help="D = dk = dv per head")
    parser.add_argument("--hidden", type=int, default=1024, help="H, fast-weight hidden width per head")
    parser.add_argument("--heads", type=int, default=16, help="B = batch x heads (folded)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per sequence in the kernel timing")
    parser.add_argument("--muon", action="store_true", help="orthogonalise updates (Newton-Schulz, not counted)")
    parser.add_argument("--momentum", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    parser.add_argument("--compile-kernel-sizes", type=int, nargs="*", default=None,
                        help="chunk sizes at which the whole kernel is compiled (default: all); the update is "
                             "compiled once with dynamic shapes")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(TORCH_ROWS + TRITON_ROWS),
                        help="rows to time (default: all but apply); the Triton rows need CUDA and Triton")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the compiled rows (default: torch's default)")
    parser.add_argument("--check-heads", type=int, default=2,
                        help="heads on which the Triton path is checked against fp64 before it is timed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.chunk_sizes, args.dim, args.hidden, args.heads = [64, 128], 32, 64, 2
        args.chunks, args.warmup, args.repeats, args.matmul_size = 2, 1, 2, 256
    for name in ("dim", "hidden", "heads", "chunks", "repeats", "matmul_size", "check_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(c < 1 for c in args.chunk_sizes):
        parser.error("--chunk-sizes must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu --quick")
    if args.compile_kernel_sizes is None:
        args.compile_kernel_sizes = list(args.chunk_sizes)
    return args


def matmul_tflops(args, device, dtype) -> float:
    a = torch.randn(args.matmul_size, args.matmul_size, device=device, dtype=dtype)
    b = torch.randn(args.matmul_size, args.matmul_size, device=device, dtype=dtype)
    seconds = median(seconds_per_call(lambda: a @ b, device, args.warmup, args.repeats))
    return 2 * args.matmul_size**3 / seconds / 1e12


def make_stream(args, length: int, device, dtype) -> dict:
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    b, d, h = args.heads, args.dim, args.hidden
    lr = lambda: torch.full((b, length, 1), 1e-3, device=device, dtype=dtype)  # noqa: E731
    return dict(q=F.normalize(rand(b, length, d), dim=-1), k=F.normalize(rand(b, length, d), dim=-1),
                v=rand(b, length, d), w0=rand(b, h, d) / d**0.5, w1=rand(b, d, h) / h**0.5,
                w2=rand(b, h, d) / d**0.5, lr0=lr(), lr1=lr(), lr2=lr())


def fused_update(stream: dict, chunk: int, momentum, use_muon: bool):
    """One chunk's update in the kernel's layout: fused hand gradients, then the step."""
    w02 = stream["w02"]
    lrs = (stream[n][:, :chunk] for n in ("lr0", "lr1", "lr2"))
    deltas = swiglu_chunk_update_fused(stream["k"][:, :chunk], stream["v"][:, :chunk], w02, stream["w1"], *lrs)
    gate = None if momentum is None else momentum[:, :chunk].mean(dim=1, keepdim=True)
    weights = (w02, stream["w1"])
    return fast_weight_step(weights, deltas, deltas, gate, use_muon, tuple(row_norms(w) for w in weights),
                            row_blocks=(2, 1))


def triton_update(stream: dict, chunk: int, momentum, use_muon: bool):
    """`fused_update` on the Triton path: fused kernel + cuBLAS gradients, then the one-pass step."""
    w02 = stream["w02"]
    lrs = (stream[n][:, :chunk] for n in ("lr0", "lr1", "lr2"))
    deltas = fastweight_triton.swiglu_chunk_update_fused(stream["k"][:, :chunk], stream["v"][:, :chunk], w02,
                                                         stream["w1"], *lrs)
    gate = None if momentum is None else momentum[:, :chunk].mean(dim=1, keepdim=True)
    weights = (w02, stream["w1"])
    return fastweight_triton.fast_weight_step(weights, deltas, deltas, gate, use_muon,
                                              tuple(row_norms(w) for w in weights), row_blocks=(2, 1))


def triton_skip_reason(args, device, dtype) -> str | None:
    """Why the Triton rows cannot run here (None: they can)."""
    if not fastweight_triton.available(device):
        return "Triton rows skipped: they need CUDA and Triton (or Triton's interpreter, TRITON_INTERPRET=1)"
    if dtype not in fastweight_triton.DTYPES:
        return f"Triton rows skipped: the path computes in bf16/fp16, not {args.dtype}"
    return None


def check_triton(args, stream: dict, kernel_inputs: dict, chunk: int, momentum) -> dict:
    """The Triton path, run on all heads, against fp64 on the first --check-heads heads (raises
    AssertionError if off)."""
    from tests.lact.fastweight_checks import check_pieces, check_stream

    heads = min(args.check_heads, args.heads)
    # the Triton side runs on all heads (the timed shape: its autotuned configs are the checked ones)
    ratios = check_pieces(kernel_inputs, chunk, heads=heads)
    ratios.update(check_stream(kernel_inputs, chunk, momentum=momentum, use_muon=args.muon, heads=heads))
    worst = max(ratios, key=ratios.get)
    print(f"# fp64 check of the Triton path (L={chunk}, {heads} heads, {args.chunks} chunks): passed, worst "
          f"err/tol {ratios[worst]:.3g} ({worst})", flush=True)
    return ratios


def unfused_update(stream: dict, chunk: int, momentum, use_muon: bool):
    """The 9-bmm form the kernel used before (gate, up, dW0, dW2 in separate bmm)."""
    k, v = stream["k"][:, :chunk], stream["v"][:, :chunk]
    w0, w1, w2 = stream["w0"], stream["w1"], stream["w2"]
    lr0, lr1, lr2 = (stream[n][:, :chunk] for n in ("lr0", "lr1", "lr2"))
    gate = torch.bmm(k, w0.transpose(1, 2))
    up = torch.bmm(k, w2.transpose(1, 2))
    gate_act = F.silu(gate)
    hidden = gate_act * up
    dhidden = torch.bmm(v, w1)
    dw1 = torch.bmm((v * lr1).transpose(1, 2), hidden)
    dw2 = torch.bmm((dhidden * gate_act * lr2).transpose(1, 2), k)
    dw0 = torch.bmm((dhidden * up * silu_derivative(gate) * lr0).transpose(1, 2), k)
    m = None if momentum is None else momentum[:, :chunk].mean(dim=1, keepdim=True)
    weights, deltas = (w0, w1, w2), (dw0, dw1, dw2)
    return fast_weight_step(weights, deltas, deltas, m, use_muon, tuple(row_norms(w) for w in weights))


def bmm_only(operands: dict):
    """The fused update's four bmm on ready operands (no element-wise work)."""
    gate_up = torch.bmm(operands["k"], operands["w02t"])
    dhidden = torch.bmm(operands["v"], operands["w1"])
    dw1 = torch.bmm(operands["vt"], operands["hidden"])
    dw02 = torch.bmm(operands["dgut"], operands["k"])
    return gate_up, dhidden, dw1, dw02


def bmm_operands(stream: dict, chunk: int) -> dict:
    k, v = stream["k"][:, :chunk].contiguous(), stream["v"][:, :chunk].contiguous()
    b, h = k.shape[0], stream["w0"].shape[1]
    return dict(k=k, v=v, w02t=stream["w02"].transpose(1, 2), w1=stream["w1"], vt=v.transpose(1, 2),
                hidden=torch.randn(b, chunk, h, device=k.device, dtype=k.dtype),
                dgut=torch.randn(b, chunk, 2 * h, device=k.device, dtype=k.dtype).transpose(1, 2))


def measure_chunk(args, chunk: int, device, dtype, reference: float, env: dict, rows: list, phase: str) -> None:
    """phase "eager": the eager rows; "compiled": the torch.compile rows (kernel first)."""
    stream = make_stream(args, chunk * args.chunks, device, dtype)
    stream["w02"] = torch.cat([stream["w0"], stream["w2"]], dim=1)
    momentum = torch.full_like(stream["lr0"], 0.5) if args.momentum else None
    kernel_inputs = {n: stream[n] for n in ("q", "k", "v", "w0", "w1", "w2", "lr0", "lr1", "lr2")}
    per_chunk = args.heads * args.dim * args.hidden * chunk  # B·D·H·L
    operands = bmm_operands(stream, chunk)
    query = stream["q"][:, :chunk]
    eager: list[tuple[str, bool, Callable[[], object], float]] = [
        ("kernel", False, lambda: swiglu_fast_weight(**kernel_inputs, chunk_size=chunk, use_muon=args.muon,
                                                     momentum=momentum), 18 * per_chunk * args.chunks),
        ("update", False, lambda: fused_update(stream, chunk, momentum, args.muon), 12 * per_chunk),
        ("update_unfused", False, lambda: unfused_update(stream, chunk, momentum, args.muon), 12 * per_chunk),
        ("update_bmm", False, lambda: bmm_only(operands), 12 * per_chunk),
        ("apply", False, lambda: swiglu_apply_fused(query, stream["w02"], stream["w1"]), 6 * per_chunk),
        ("kernel_triton", False, lambda: swiglu_fast_weight(**kernel_inputs, chunk_size=chunk, use_muon=args.muon,
                                                            momentum=momentum, backend="triton"),
         18 * per_chunk * args.chunks),
        ("update_triton", False, lambda: triton_update(stream, chunk, momentum, args.muon), 12 * per_chunk),
        ("apply_triton", False, lambda: fastweight_triton.swiglu_apply_fused(query, stream["w02"], stream["w1"]),
         6 * per_chunk),
        ("update_kernel_triton", False, lambda: fastweight_triton.swiglu_update_operands(
            stream["k"][:, :chunk], stream["v"][:, :chunk], stream["w02"], stream["w1"],
            *(stream[n][:, :chunk] for n in ("lr0", "lr1", "lr2"))), 6 * per_chunk),
        ("hidden_triton", False, lambda: fastweight_triton.swiglu_hidden(query, stream["w02"]), 4 * per_chunk),
    ]
    compiled = []
    if chunk in args.compile_kernel_sizes and "kernel" in args.rows:
        kernel = torch.compile(swiglu_fast_weight, **compile_options(args))
        compiled.append(("kernel", True, lambda: kernel(**kernel_inputs, chunk_size=chunk, use_muon=args.muon,
                                                        momentum=momentum), 18 * per_chunk * args.chunks))
    if "update" in args.rows:
        compiled.append(("update", True, lambda: compiled_update(args)(stream, chunk, momentum, args.muon),
                         12 * per_chunk))
    candidates = [c for c in eager if c[0] in args.rows] if phase == "eager" else compiled
    if any(c[0] in TRITON_ROWS for c in candidates):
        skip = triton_skip_reason(args, device, dtype)
        if skip is not None:
            print(f"# {skip}", flush=True)
            candidates = [c for c in candidates if c[0] not in TRITON_ROWS]
        else:  # loud: an AssertionError here ends the run before any Triton row is timed
            extra = {"fp64_check": check_triton(args, stream, kernel_inputs, chunk, momentum)}
    for what, compiled, fn, flops in candidates:
        try:
            with torch.no_grad():
                seconds = median(seconds_per_call(fn, device, args.warmup, args.repeats))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the others
            traceback.print_exc()
            rows.append(dict(L=chunk, what=what, compiled=compiled, share_of_matmul=None,
                             error=f"{type(exc).__name__}: {exc}", **env))
            write_json(args.json_out, rows)
            continue
        tflops = flops / seconds / 1e12
        row = dict(L=chunk, what=what, compiled=compiled, ms=seconds * 1e3, flops=float(flops), tflops=tflops,
                   share_of_matmul=tflops / reference, matmul_tflops=reference, **env)
        if what in TRITON_ROWS:
            row.update(extra, triton_configs=fastweight_triton.tuned_configs())
        rows.append(row)
        print(f"{what:<22}{'compile' if compiled else 'eager':>8}{chunk:>8}{seconds * 1e3:>12.3f}{tflops:>12.4g}"
              f"{row['share_of_matmul']:>11.1%}", flush=True)
        write_json(args.json_out, rows)


COMPILED_UPDATE = torch.compile(fused_update, dynamic=True)
_COMPILED_UPDATES: dict = {}


def compile_options(args) -> dict:
    return {} if args.compile_mode is None else {"mode": args.compile_mode}


def compiled_update(args):
    """The compiled update (compiled once per mode, with dynamic shapes)."""
    if args.compile_mode is None:
        return COMPILED_UPDATE
    if args.compile_mode not in _COMPILED_UPDATES:
        _COMPILED_UPDATES[args.compile_mode] = torch.compile(fused_update, dynamic=True, mode=args.compile_mode)
    return _COMPILED_UPDATES[args.compile_mode]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    reference = matmul_tflops(args, device, dtype)
    env = {**environment(device), "dtype": args.dtype, "B": args.heads, "D": args.dim, "H": args.hidden,
           "chunks": args.chunks, "muon": args.muon, "momentum": args.momentum, "compile_mode": args.compile_mode,
           "flop_formula": "kernel 18*B*D*H*L per chunk (apply 6, update 12); update 12*B*D*H*L; apply 6*B*D*H*L"}
    print(f"# {env}", flush=True)
    print(f"# dense {args.matmul_size}^3 matmul: {reference:.4g} TFLOP/s; element-wise and Newton-Schulz work not counted",
          flush=True)
    print(f"{'what':<22}{'mode':>8}{'L':>8}{'ms':>12}{'TFLOP/s':>12}{'of matmul':>11}", flush=True)
    rows: list[dict] = []
    # compiled rows last (compiling is slow; a time limit then costs only them), largest L first
    plan = [("eager", c) for c in args.chunk_sizes]
    if args.compile:
        plan += [("compiled", c) for c in sorted(args.chunk_sizes, reverse=True)]
    for phase, chunk in plan:
        measure_chunk(args, chunk, device, dtype, reference, env, rows, phase)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json_out:
        print(f"wrote {args.json_out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
