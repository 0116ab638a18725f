"""Benchmark: MoE layer throughput, and energy per token, next to a dense FFN of equal active FLOPs.

E experts of width H with top-k routing do k·H-wide FFN work per token, like one dense FFN of width
k·H (E=8, top-2, H=3072 vs dense 6144). For each expert kind (SwiGLU, GELU) and token count it times
the dense FFN and the MoE layer on each dispatch path:

  grouped          sync-free grouped path (torch._grouped_mm, device offsets; CUDA bf16)
  loop             per-expert matmuls on exact slices (one host sync per forward)
  grouped+compile  the grouped path with gate → router → dispatch under torch.compile (--compile)

ratio_vs_dense = dense time / MoE time (tokens/s ratio). It then splits the grouped path into its
parts (gate, router, permutation, gather, expert GEMMs, combine) and times the first expert matmul
alone as torch._grouped_mm (row-major and K-major weights) against one dense torch.mm of the same
FLOPs, so that one run shows where the time goes. With NVML (a GPU host with nvidia-ml-py) it
measures energy per token of the MoE layer and of the dense FFN in alternating windows of the same
run. Timings: back-to-back calls between device synchronisations (benchmarks/timing.py).

    PYTHONPATH=. python benchmarks/moe_layer.py --device cuda --tokens 32768 131072 --json-out moe_layer.json
    PYTHONPATH=. python benchmarks/moe_layer.py --device cpu --quick     # tiny smoke run

The JSON is a list of rows: {kind, tokens, path, ratio_vs_dense, ms, tflops, tokens_per_s, ...};
part rows have path "part:<name>" and their share of the grouped path's time.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, median, seconds_per_call, synchronize, write_json  # noqa: E402
from nectar.moe import dispatch as dispatch_module  # noqa: E402
from nectar.moe.dispatch import (combine_group, dispatch_path, group_rows, grouped_gemm, make_context,  # noqa: E402
                                 permute_by_expert)
from nectar.moe.expert_pool import ExpertPool  # noqa: E402
from nectar.moe.experts import EXPERT_KINDS, ExpertSpec  # noqa: E402
from nectar.moe.layer import MoELayer  # noqa: E402
from nectar.moe.static_routers import TopKRouter  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072], help="tokens per forward")
    parser.add_argument("--kinds", nargs="+", choices=["swiglu", "gelu"], default=["swiglu", "gelu"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072, help="width of each expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd grouped path")
    parser.add_argument("--compile-tokens", type=int, nargs="*", default=None,
                        help="token counts to compile for (default: the first of --tokens)")
    parser.add_argument("--energy-seconds", type=float, default=1.5,
                        help="length of each NVML energy window (0: no energy measurement)")
    parser.add_argument("--energy-tokens", type=int, default=None, help="token count of the energy windows (default: first)")
    parser.add_argument("--grouped-on-cpu", action="store_true", help="let the grouped path run on CPU (fp32/bf16)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.hidden, args.experts = [256], 64, 128, 4
        args.repeats, args.warmup, args.energy_seconds = 2, 1, min(args.energy_seconds, 0.2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    for name in ("repeats", "d_model", "hidden", "experts", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(t < 1 for t in args.tokens) or args.top_k > args.experts:
        parser.error("--tokens must be >= 1 and --top-k must not exceed --experts")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    args.compile_tokens = args.compile_tokens if args.compile_tokens is not None else args.tokens[:1]
    args.energy_tokens = args.energy_tokens or args.tokens[0]
    return args


class Bench:
    """Collects rows, prints them and rewrites the JSON after each one."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.rows = args, device, []
        self.env = {**environment(device), "dtype": str(args.dtype).replace("torch.", ""), "d_model": args.d_model,
                    "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k}

    def add(self, **row) -> dict:
        row = {**row, **self.env}
        self.rows.append(row)
        ratio = "" if row.get("ratio_vs_dense") is None else f"{row['ratio_vs_dense']:6.2f}x dense"
        share = "" if row.get("share_of_grouped") is None else f"{row['share_of_grouped']:6.1%} of grouped"
        tflops = "" if row.get("tflops") is None else f"{row['tflops']:8.1f} TFLOP/s"
        print(f"{row['kind']:<7}{row['tokens']:>8} {row['path']:<30}{row['ms']:10.3f} ms {tflops:>16} {ratio} {share}",
              flush=True)
        write_json(self.args.json_out, self.rows)
        return row

    def time(self, fn) -> float:
        return median(seconds_per_call(fn, self.device, self.args.warmup, self.args.repeats))


def build(args, kind: str, device: torch.device) -> tuple[torch.nn.Module, MoELayer]:
    torch.manual_seed(args.seed)
    dense = EXPERT_KINDS[kind].build(args.d_model, args.top_k * args.hidden).to(device, args.dtype).eval()
    pool = ExpertPool.from_specs([ExpertSpec(kind, args.hidden, args.experts)], args.d_model)
    moe = MoELayer(args.d_model, pool, TopKRouter(args.experts, args.top_k)).to(device, args.dtype).eval()
    with torch.no_grad():  # GPT-2-like scales so that activations stay O(1) in bf16
        for name, param in moe.experts.named_parameters():
            if not name.endswith("bias"):
                param.normal_(0, 0.02)
    return dense, moe


def measure(bench: Bench, kind: str, tokens: int, energy: "EnergyWindows | None", compiled: bool) -> None:
    """Eager rows, parts and energy (compiled=False), or the torch.compile row (compiled=True)."""
    dense, moe = build(bench.args, kind, bench.device)  # outside inference mode: weights stay normal tensors
    with torch.inference_mode():
        measure_built(bench, kind, tokens, energy, dense, moe, compiled)


def measure_built(bench: Bench, kind: str, tokens: int, energy: "EnergyWindows | None", dense, moe,
                  compiled_only: bool) -> None:
    args, device = bench.args, bench.device
    x = torch.randn(tokens, args.d_model, device=device, dtype=args.dtype)
    moe.grouped = False
    moe(x)  # the exact loop path, for the load printout
    moe.grouped = True
    loads = moe.last_metrics.tokens_per_expert
    print(f"# {kind} tokens={tokens}: load per expert {loads} (max/mean {max(loads) / (sum(loads) / len(loads)):.2f}); "
          f"grouped path here: {dispatch_path(x, moe.experts) == 'grouped'}", flush=True)
    dense_flops, moe_flops = dense.cost_per_token().flops, moe.dense_equivalent_flops()
    dense_s = bench.time(lambda: dense(x))
    rows = {}
    if not compiled_only:
        rows["dense"] = bench.add(kind=kind, tokens=tokens, path="dense", ratio_vs_dense=1.0, ms=dense_s * 1e3,
                                  tflops=dense_flops * tokens / dense_s / 1e12, tokens_per_s=tokens / dense_s)
    paths = [("grouped+compile", True, True)] if compiled_only else [("grouped", True, False), ("loop", False, False)]
    for name, grouped, compiled in paths:
        moe.grouped = grouped
        moe.compile_dispatch(compiled)
        if grouped and dispatch_path(x, moe.experts) != "grouped":
            print(f"# {name}: the grouped path cannot run here (device/dtype); skipped", flush=True)
            continue
        with attempt(bench, kind, tokens, name):
            seconds = bench.time(lambda: moe(x))
            rows[name] = bench.add(kind=kind, tokens=tokens, path=name, ratio_vs_dense=dense_s / seconds,
                                   ms=seconds * 1e3, tflops=moe_flops * tokens / seconds / 1e12,
                                   tokens_per_s=tokens / seconds)
    moe.grouped = True
    moe.compile_dispatch(False)
    if compiled_only:
        return
    if "grouped" in rows:
        with attempt(bench, kind, tokens, "part:*"):
            breakdown(bench, kind, tokens, moe, x, rows["grouped"]["ms"] / 1e3, dense_s)
    if energy is not None and tokens == args.energy_tokens:
        path = "grouped" if "grouped" in rows else "loop"
        moe.grouped = path == "grouped"
        with attempt(bench, kind, tokens, "energy"):
            energy.compare(bench, kind, tokens, {"dense": lambda: dense(x), path: lambda: moe(x)}, rows)


@contextmanager
def attempt(bench: Bench, kind: str, tokens: int, path: str) -> Iterator[None]:
    """Run a measurement; on an error print it, keep an error row and go on with the next one."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - one failing path must not cost the others
        traceback.print_exc()
        bench.rows.append({"kind": kind, "tokens": tokens, "path": path, "ratio_vs_dense": None,
                           "error": f"{type(exc).__name__}: {exc}", **bench.env})
        write_json(bench.args.json_out, bench.rows)


def breakdown(bench: Bench, kind: str, tokens: int, moe: MoELayer, x: torch.Tensor, grouped_s: float,
              dense_s: float) -> None:
    """Time the grouped path's parts one by one on the same inputs."""
    logits = moe.gate(x)
    decision = moe.router(logits, x)
    perm = permute_by_expert(decision)
    ctx = make_context(x, decision, moe.experts, perm)
    group, first, last = moe.experts.spans()[0]
    in_NK, weights_NK = ctx.slots_of(first, last)
    rows = group_rows(ctx, group, first, last)
    y_RD = grouped_gemm(ctx, group, rows.tokens_R, rows.offsets_G, None)
    source = torch.nn.functional.pad(x, (0, dispatch_module.bias_pad_columns(x)), value=1.0) if kind == "gelu" else x
    parts = {"pad": lambda: torch.nn.functional.pad(x, (0, dispatch_module.bias_pad_columns(x)), value=1.0)} \
        if kind == "gelu" else {}
    parts |= {
        "gate": lambda: moe.gate(x),
        "router": lambda: moe.router(logits, x),
        "permute": lambda: permute_by_expert(decision),
        "gather": lambda: source.index_select(0, rows.tokens_R),
        "experts": lambda: grouped_gemm(ctx, group, rows.tokens_R, rows.offsets_G, None),
        "combine": lambda: combine_group(ctx, group, first, rows, y_RD, in_NK, weights_NK),
    }
    total = 0.0
    for name, fn in parts.items():
        seconds = bench.time(fn)
        total += seconds
        bench.add(kind=kind, tokens=tokens, path=f"part:{name}", ratio_vs_dense=None, ms=seconds * 1e3,
                  share_of_grouped=seconds / grouped_s)
    print(f"# parts sum to {total * 1e3:.3f} ms of the grouped path's {grouped_s * 1e3:.3f} ms "
          f"(experts part includes the gather; dense FFN {dense_s * 1e3:.3f} ms)", flush=True)
    first_gemm(bench, kind, tokens, moe, x, rows)


def first_gemm(bench: Bench, kind: str, tokens: int, moe: MoELayer, x: torch.Tensor, rows) -> None:
    """The first expert matmul alone: grouped (as stored, and K-major) vs one dense mm of equal FLOPs."""
    group = moe.experts.groups[0]
    weight = group.gate_up if kind == "swiglu" else group.c_fc          # [G, D, F]
    x_RD = x.index_select(0, rows.tokens_R)
    offsets = rows.offsets_G
    real_rows = int(offsets[-1])
    flops = 2 * real_rows * weight.shape[1] * weight.shape[2]
    k_major = weight.transpose(-2, -1).contiguous().transpose(-2, -1)  # same values, column-major B
    dense_w = torch.randn(weight.shape[1], weight.shape[2] * real_rows // max(tokens, 1), device=x.device, dtype=x.dtype)
    candidates = {
        "gemm1:grouped_mm": lambda: torch._grouped_mm(x_RD, weight, offs=offsets),
        "gemm1:grouped_mm_kmajor": lambda: torch._grouped_mm(x_RD, k_major, offs=offsets),
        "gemm1:dense_mm": lambda: x @ dense_w,
    }
    for name, fn in candidates.items():
        if name != "gemm1:dense_mm" and dispatch_path(x, moe.experts) != "grouped":
            continue
        seconds = bench.time(fn)
        bench.add(kind=kind, tokens=tokens, path=f"part:{name}", ratio_vs_dense=None, ms=seconds * 1e3,
                  tflops=flops / seconds / 1e12)


class EnergyWindows:
    """NVML energy of alternating windows (counter at the edges, hw.energy_meter)."""

    def __init__(self, seconds: float):
        from hw.energy_meter import EnergyMeter
        from hw.nvml_api import NvmlApi

        self.api = NvmlApi(torch.cuda.current_device())
        self.meter = EnergyMeter(self.api, sync=torch.cuda.synchronize)
        self.seconds = seconds

    def compare(self, bench: Bench, kind: str, tokens: int, fns: dict, rows: dict, rounds: int = 2) -> None:
        per_call = {name: bench.time(fn) for name, fn in fns.items()}
        joules = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():  # alternating windows: drift hits both
                calls = max(1, math.ceil(self.seconds / per_call[name]))
                with self.meter.window(f"{kind}-{name}") as handle:
                    for _ in range(calls):
                        fn()
                joules[name].append(handle.measurement.energy_J / (calls * tokens))
        for name, values in joules.items():
            rows[name]["energy_J_per_token"] = median(values)
            rows[name]["energy_windows_J_per_token"] = values
        moe_name = next(n for n in fns if n != "dense")
        rows[moe_name]["energy_ratio_vs_dense"] = rows[moe_name]["energy_J_per_token"] / rows["dense"]["energy_J_per_token"]
        print(f"# energy {kind} tokens={tokens}: dense {rows['dense']['energy_J_per_token'] * 1e6:.3f} µJ/token, "
              f"MoE ({moe_name}) {rows[moe_name]['energy_J_per_token'] * 1e6:.3f} µJ/token "
              f"({rows[moe_name]['energy_ratio_vs_dense']:.2f}x dense)", flush=True)
        write_json(bench.args.json_out, bench.rows)

    def close(self) -> None:
        self.api.shutdown()


def open_energy(args, device: torch.device) -> EnergyWindows | None:
    if args.energy_seconds <= 0 or device.type != "cuda":
        return None
    try:
        return EnergyWindows(args.energy_seconds)
    except Exception as exc:  # noqa: BLE001 - no nvidia-ml-py / no NVML: time only
        print(f"# no energy measurement: {exc}", flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.grouped_on_cpu:
        dispatch_module.GROUPED_MM_DEVICE_TYPES["cpu"] = {torch.float32, torch.bfloat16}
    bench = Bench(args, device)
    print(f"# {bench.env} threads={torch.get_num_threads()}", flush=True)
    print(f"# E={args.experts} top-{args.top_k} expert hidden={args.hidden} vs dense hidden={args.top_k * args.hidden}; "
          f"ms = median of {args.repeats} measurements", flush=True)
    energy = open_energy(args, device)
    plan = [(kind, tokens, False) for kind in args.kinds for tokens in args.tokens]
    if args.compile:  # last: compiling is slow, and a time limit should cost the compiled rows only
        plan += [(kind, tokens, True) for kind in args.kinds for tokens in args.tokens if tokens in args.compile_tokens]
    try:
        for kind, tokens, compiled in plan:
            with attempt(bench, kind, tokens, "grouped+compile" if compiled else "*"):
                measure(bench, kind, tokens, energy, compiled)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if energy is not None:
            energy.close()
    if args.json_out:
        print(f"wrote {args.json_out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
