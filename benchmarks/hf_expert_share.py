"""Benchmark: how much of a small OLMoE-style forward the routed experts take, per shape.

The energy knob of a pretrained MoE (fewer of the top-K slots per token) can only save what the
routed experts cost. For each model shape (random weights: timing does not depend on training) it
times one forward of a [rows, seq_len] micro-batch with NECTAR attached at static top-k for several
k, and the unattached model; the share of the forward that scales with k is read off the times
(top-K vs top-1). With `--profile`, the first shape's top CUDA kernels at top-K are listed too.
Saves everything as JSON.

    PYTHONPATH=. python benchmarks/hf_expert_share.py --shapes 512x256 768x1024 --json-out runs/expert_share.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, median, seconds_per_call, write_json  # noqa: E402

from nectar.hf.attach import attach  # noqa: E402
from nectar.hf.policies import hf_policy_router  # noqa: E402
from nectar.hf.train_small import SmallMoERecipe, olmoe_config  # noqa: E402


def parse_shape(text: str) -> tuple[int, int]:
    try:
        hidden, expert_hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is HIDDENxEXPERT_HIDDEN, e.g. 512x256; got {text!r}") from None
    return hidden, expert_hidden


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[(512, 256), (768, 1024)],
                   help="HIDDENxEXPERT_HIDDEN per model (64 experts, top-8, 4 layers)")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 6, 4, 2, 1])
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (the corpus BPE has 16384 ids)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="list the first shape's top CUDA kernels at top-K")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def build(hidden: int, expert_hidden: int, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random-weight OLMoE of the recipe's other defaults (bf16 and grouped_mm on a GPU, fp32 on a
    CPU) and one micro-batch of random ids [rows, seq_len]."""
    torch.manual_seed(0)
    recipe = SmallMoERecipe(hidden=hidden, expert_hidden=expert_hidden)
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM(olmoe_config(recipe, vocab_size=args.vocab, eos_token_id=0))
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu:
        model.set_experts_implementation("grouped_mm")
    model = model.to(args.device, torch.bfloat16 if on_gpu else torch.float32).eval()
    return model, torch.randint(0, args.vocab, (args.rows, args.seq_len), device=args.device)


def time_forward(model, ids: torch.Tensor, device: str) -> float:
    with torch.no_grad():
        return median(seconds_per_call(lambda: model(input_ids=ids).logits, device, warmup=2, repeats=5))


def measure_shape(hidden: int, expert_hidden: int, args: argparse.Namespace) -> dict:
    model, ids = build(hidden, expert_hidden, args)
    row = {"hidden": hidden, "expert_hidden": expert_hidden, "tokens": ids.numel(),
           "parameters": sum(p.numel() for p in model.parameters()), "plain_s": time_forward(model, ids, args.device)}
    for k in args.ks:
        attached = attach(model, routers=lambda layer, k=k: hf_policy_router(f"static-top{k}", layer))
        row[f"top{k}_s"] = time_forward(model, ids, args.device)
        attached.detach()
    k_max, k_min = max(args.ks), min(args.ks)
    scaled = (row[f"top{k_max}_s"] - row[f"top{k_min}_s"]) / (k_max - k_min) * k_max
    row["expert_share"] = scaled / row[f"top{k_max}_s"]      # share of the top-K forward that scales with k
    print(row, flush=True)
    return row


def profile(hidden: int, expert_hidden: int, args: argparse.Namespace, top: int = 15) -> list[dict]:
    model, ids = build(hidden, expert_hidden, args)
    attached = attach(model)
    with torch.no_grad():
        model(input_ids=ids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids)
            torch.cuda.synchronize()
    attached.detach()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    rows = [{"kernel": e.key[:90], "calls": e.count, "device_ms": e.device_time_total / 1e3} for e in events]
    for r in rows:
        print(r, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [measure_shape(h, eh, args) for h, eh in args.shapes]
    payload = {"environment": environment(args.device), "rows_per_forward": args.rows, "seq_len": args.seq_len,
               "shapes": rows}
    if args.profile and torch.device(args.device).type == "cuda":
        payload["profile"] = profile(*args.shapes[0], args)
    write_json(args.json_out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
