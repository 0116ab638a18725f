"""Benchmark: the experiment's chunk forward (routing record + workload + NLL) against a plain forward.

The model is the GPU experiment's MoE-DistilGPT2 shape with random weights (6 layers × 768, 12
heads, vocabulary 8192; per layer the `distilgpt2` recipe's experts: 6 full GELU experts 768→3072,
one narrow 768→768, one zero, one copy; static top-2), in bf16 on CUDA. In interleaved rounds it
times

  plain          model(input_ids) under no_grad (logits, no routing record)
  forward_chunk  nectar.experiment.forward.forward_chunk: recorder on every MoE layer, NLL, the
                 routing sample for the controller, the workload read back once

on the same token batch, first with the default dispatch (grouped, sync-free on CUDA bf16) and
then with the per-expert loop (one host sync per MoE layer), and reports tokens/s and
ratio_vs_plain = forward_chunk tokens/s / plain tokens/s (the median of the per-round ratios).

    PYTHONPATH=. python benchmarks/forward_chunk.py --device cuda --json-out forward_chunk.json
    PYTHONPATH=. python benchmarks/forward_chunk.py --device cpu --quick    # tiny smoke run

The JSON is a list of rows {path, dispatch, tokens, ms, tokens_per_s, ratio_vs_plain, ...}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, synchronize, write_json  # noqa: E402
from nectar.experiment.forward import forward_chunk  # noqa: E402
from nectar.moe.dispatch import dispatch_path  # noqa: E402
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The `distilgpt2` recipe's pool (nectar.train.recipes.RECIPES["distilgpt2"].expert_specs(3072)).
DISTILGPT2_EXPERTS = [{"kind": "gelu", "hidden": 3072, "count": 6}, {"kind": "gelu", "hidden": 768, "count": 1},
                      {"kind": "zero", "count": 1}, {"kind": "copy", "count": 1}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (plain, chunk) per dispatch path")
    parser.add_argument("--calls", type=int, default=3, help="back-to-back calls per timed measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dispatch", nargs="+", choices=["grouped", "loop"], default=["grouped", "loop"])
    parser.add_argument("--quick", action="store_true", help="tiny model and batch for a smoke test")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.vocab, args.rounds, args.calls, args.warmup = 2, 32, 256, 2, 1, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    for name in ("batch", "seq_len", "vocab", "rounds", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    return args


def build_model(vocab: int, dtype: torch.dtype, device: torch.device, tiny: bool = False) -> MoEGPT2LMHeadModel:
    """The MoE-DistilGPT2 of the GPU experiment with random weights (tiny: 2 narrow layers)."""
    torch.manual_seed(0)
    if tiny:
        config = preset_config("tiny-moe", vocab_size=vocab, n_layer=2, expert_specs=[
            {"kind": "gelu", "hidden": 128, "count": 3}, {"kind": "gelu", "hidden": 32}, {"kind": "zero"},
            {"kind": "copy"}], n_experts=0)
    else:
        config = preset_config("distilgpt2-moe", vocab_size=vocab, expert_specs=DISTILGPT2_EXPERTS, n_experts=0)
    return MoEGPT2LMHeadModel(config).to(device, dtype).eval()


def timed(fn, device: torch.device, calls: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def count_host_syncs(fn, device: torch.device) -> dict | None:
    """Synchronising CUDA calls made by one fn() (torch.cuda.set_sync_debug_mode), with where they
    came from; None off CUDA."""
    if device.type != "cuda":
        return None
    import traceback
    import warnings

    sites: dict[str, int] = {}
    original = warnings.showwarning
    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if "synchroniz" not in text or "prototype feature" in text:   # the debug mode's own notice
                return
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and "warnings" not in f.filename]
            site = f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
            sites[site] = sites.get(site, 0) + 1

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    return {"count": sum(sites.values()), "sites": sites}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.vocab, args.dtype, device, tiny=args.quick)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    tokens = batch.numel()
    env = {**environment(device), "dtype": str(args.dtype).replace("torch.", ""), "batch": args.batch,
           "seq_len": args.seq_len, "vocab": args.vocab, "experts": model.config.expert_specs}
    print(f"# {env}", flush=True)

    def plain():
        with torch.no_grad():
            return model(input_ids=batch, use_cache=False).logits

    def chunk():
        return forward_chunk(model, batch)

    rows = []
    for dispatch in args.dispatch:
        for _, layer in model.moe_layers():
            layer.grouped = dispatch == "grouped"
        probe = torch.zeros(1, model.config.n_embd, device=device, dtype=args.dtype)
        taken = dispatch_path(probe, model.moe_layers()[0][1].experts, dispatch == "grouped")
        if taken != dispatch:
            print(f"# {dispatch} dispatch cannot run here; the layers take the {taken} path", flush=True)
        for _ in range(args.warmup):
            plain(), chunk()
        syncs = {"plain": count_host_syncs(plain, device), "forward_chunk": count_host_syncs(chunk, device)}
        if syncs["plain"] is not None:
            print(f"# host syncs per call ({dispatch}): plain {syncs['plain']}, forward_chunk {syncs['forward_chunk']}",
                  flush=True)
        times = {"plain": [], "forward_chunk": []}
        for r in range(args.rounds):  # alternate which goes first: drift hits both
            order = ("plain", "forward_chunk") if r % 2 == 0 else ("forward_chunk", "plain")
            for name in order:
                times[name].append(timed(plain if name == "plain" else chunk, device, args.calls))
        ratios = [p / c for p, c in zip(times["plain"], times["forward_chunk"])]
        for name, values in times.items():
            seconds = statistics.median(values)
            row = {"path": name, "dispatch": dispatch, "dispatch_taken": taken, "tokens": tokens, "ms": seconds * 1e3,
                   "tokens_per_s": tokens / seconds, "round_ms": [v * 1e3 for v in values],
                   "ratio_vs_plain": 1.0 if name == "plain" else statistics.median(ratios),
                   "host_syncs": syncs[name], **env}
            if name == "forward_chunk":
                row["round_ratios"] = ratios
            rows.append(row)
            print(f"{dispatch:<8} {name:<14} {seconds * 1e3:10.2f} ms {tokens / seconds / 1e6:8.3f} M tok/s "
                  f"ratio_vs_plain {row['ratio_vs_plain']:.3f}", flush=True)
            write_json(args.json_out, rows)
    if args.json_out:
        print(f"wrote {args.json_out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
