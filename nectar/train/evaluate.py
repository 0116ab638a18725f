"""Held-out evaluation of a trained model: perplexity per domain, and a FLOP-priced static frontier.

- `perplexities`: exp(mean NLL) on the mixed held-out stream ("all") and on each domain's stream;
- `routing_report`: for each static policy (static-top2, static-top1, static-cheap by default), the
  mixed held-out perplexity, its increase over static-top2, the expert FLOPs per token actually
  routed (also as full-expert equivalents per token and MoE layer: 2 for two full experts), and a
  whole-model FLOP estimate per token with its saving versus static-top2. FLOPs are
  a proxy only: the energy frontier is measured by `nectar hw-run` / `nectar frontier`.
Both evaluate at most `max_tokens` tokens per stream (consecutive windows from the start).
"""

from __future__ import annotations

import math

import torch

from nectar.train.loop import autocast, evaluate_perplexity

REPORT_POLICIES = ("static-top2", "static-top1", "static-cheap")


def perplexities(model, mixed: torch.Tensor, domains: dict[str, torch.Tensor], seq_len: int, batch: int,
                 max_tokens: int | None, dtype: str = "float32") -> dict[str, float]:
    """{"all": ppl of the mixed stream, <domain>: ppl of that domain's stream}."""
    ppl = lambda ids: evaluate_perplexity(model, ids, seq_len, batch, max_tokens=max_tokens, dtype=dtype)  # noqa: E731
    return {"all": ppl(mixed), **{name: ppl(ids) for name, ids in domains.items()}}


def dense_flops_per_token(config, seq_len: int) -> float:
    """Matmul FLOPs per token outside the FFNs: attention projections (8·d²) and scores/values
    (2·T·d on average over a causal window of T) in every block, and the LM head (2·d·V)."""
    d = config.n_embd
    return config.n_layer * (8 * d * d + 2 * seq_len * d) + 2 * d * config.vocab_size


@torch.no_grad()
def routing_report(model, ids: torch.Tensor, seq_len: int, batch: int, max_tokens: int | None,
                   dtype: str = "float32", policies=REPORT_POLICIES) -> dict[str, dict]:
    """Per static policy: perplexity, Δppl and FLOP saving vs static-top2, expert FLOPs per token."""
    from nectar.experiment.forward import forward_chunk, install
    from nectar.experiment.policies import cheap_experts, policy_router

    if max_tokens is not None:
        ids = ids[: max(seq_len, max_tokens)]
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)   # [S, T]
    device = next(model.parameters()).device
    saved_routers = [layer.router for _, layer in model.moe_layers()]
    other = dense_flops_per_token(model.config, seq_len)
    full_flops = sum(max(e.cost_per_token().flops for e in layer.experts) for _, layer in model.moe_layers())
    rows = {}
    has_cheap = all(cheap_experts(layer) for _, layer in model.moe_layers())
    try:
        for policy in [p for p in policies if has_cheap or p != "static-cheap"]:
            install(model, [policy_router(policy, layer) for _, layer in model.moe_layers()])
            nll, tokens, expert_flops = 0.0, 0, 0.0
            for start in range(0, windows.shape[0], batch):
                part = windows[start:start + batch].to(device)                 # [b, T]
                with autocast(str(device), dtype):
                    obs = forward_chunk(model, part, policy=policy, max_sample_tokens=0)
                nll += obs.nll_sum
                tokens += obs.nll_tokens
                expert_flops += sum(n * c.flops for layer in obs.workload.layers
                                    for n, c in zip(layer.tokens_per_expert, layer.expert_costs))
            per_token = expert_flops / windows[:, :].numel()
            rows[policy] = {"perplexity": math.exp(nll / tokens), "expert_flops_per_token": per_token,
                            "full_experts_per_layer": per_token / full_flops if full_flops else 0.0,
                            "flops_per_token": other + per_token}
    finally:
        install(model, saved_routers)
    base = rows.get("static-top2")
    for row in rows.values():
        row["dppl"] = row["perplexity"] / base["perplexity"] - 1.0 if base else None
        row["flops_saved"] = 1.0 - row["flops_per_token"] / base["flops_per_token"] if base else None
    return rows
