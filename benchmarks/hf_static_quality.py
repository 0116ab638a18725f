"""Benchmark: quality vs experts per token of static routings of a saved transformers MoE model.

For every static policy of the frontier family (`nectar.hf.policies.frontier_policies`: the
family's top-k for k = K..1, fixed thresholds τ, top-p over the top-K) it runs the held-out
stream through `forward_chunk` and prints the mean routed experts per token and MoE layer (from the
workload's counts: what the experts computed) and the perplexity; with `--choose` it also prints
the threshold `choose_threshold` picks per layer for several λ at one cost unit per slot. No
energy here: that is `nectar run` / the campaign's job. Saves everything as JSON.

    PYTHONPATH=. python benchmarks/hf_static_quality.py --model runs/olmoe-small --out runs/olmoe-quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from nectar.experiment.forward import forward_chunk, install
from nectar.hf.policies import frontier_policies, hf_policy_router
from nectar.train.saved_model import load_hf_demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a directory written by nectar.hf.train_small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=12288, help="held-out tokens scored per policy")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=32, help="sequences per forward")
    p.add_argument("--renormalize", choices=["family", "mass"], nargs="+", default=["family", "mass"])
    p.add_argument("--choose", type=float, nargs="*", default=[0.3, 1, 3, 10, 30], help="λ values for choose_threshold")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def score(model, batches: torch.Tensor, rows: int) -> tuple[float, float]:
    """(perplexity, mean routed experts per token and MoE layer) of the installed routers, the
    latter from the workload's counts of the routed experts (shared experts and dense blocks excluded)."""
    nll, scored, slots = 0.0, 0, 0
    for part in batches.split(rows):
        obs = forward_chunk(model, part)
        nll, scored = nll + obs.nll_sum, scored + obs.nll_tokens
        slots += sum(sum(obs.workload.layers[i].tokens_per_expert[: layer.num_experts]) for i, layer in model.moe_layers())
    return math.exp(nll / scored), slots / (batches.numel() * len(model.moe_layers()))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    demo = load_hf_demo(args.model)
    model = demo.model.to(args.device, dtype)
    usable = min(args.tokens, demo.heldout_ids.numel()) // args.seq_len * args.seq_len
    batches = demo.heldout_ids[:usable].view(-1, args.seq_len).to(args.device)
    result = {"model": str(args.model), "device": args.device, "dtype": str(dtype), "tokens": usable,
              "skips_unused_slots": model.skips_unused_slots, "policies": [], "chosen_thresholds": {}}
    start = time.perf_counter()
    for renorm in args.renormalize:
        for name in frontier_policies(model.top_k):
            if renorm != "family" and name == model.reference_policy:
                continue                                  # the model as trained: the same either way
            install(model, [hf_policy_router(name, layer, renorm) for _, layer in model.moe_layers()])
            ppl, mean_k = score(model, batches, args.rows)
            result["policies"].append({"policy": name, "renormalize": renorm, "mean_k": mean_k, "perplexity": ppl})
            print(f"{renorm:<7}{name:<16} mean_k={mean_k:6.3f}  ppl={ppl:9.3f}", flush=True)
    if args.choose:
        install(model, [hf_policy_router("nectar", layer) for _, layer in model.moe_layers()])
        obs = forward_chunk(model, batches[: args.rows], max_sample_tokens=4096)
        for lam in args.choose:
            taus = [layer.router.choose_threshold(seen.logits, 1.0, lam)
                    for (_, layer), seen in zip(model.moe_layers(), obs.layers)]
            result["chosen_thresholds"][str(lam)] = taus
            print(f"λ={lam:<6g} τ per MoE layer: {taus}", flush=True)
    result["seconds"] = time.perf_counter() - start
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
