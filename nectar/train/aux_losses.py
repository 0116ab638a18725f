"""Auxiliary losses of the MoE fine-tune for experts of unequal cost (adaptive compute).

- `null_aware_switch_loss` (AdaMoE's null-aware balancing): the Switch loss over the *full* experts
  only. With F the full experts, n_F = |F|, over the active (token, slot) pairs that went to a full
  expert, f_i = their share at expert i, and q_ti = p_ti / Σ_{j∈F} p_tj the routing distribution
  renormalised over F,
      L = n_F · Σ_{i∈F} f_i · mean_t q_ti,
  1 when the full experts share the load evenly, n_F when one takes it all, and independent of how
  much probability goes to cheap experts — so balancing never pushes tokens towards or away from
  them. Differentiable through q (f is a count), 0 when no pair reached a full expert.
- `expected_compute_loss` (a ReMoE / AdaMoE-style compute regulariser): the expected cost of the
  routing distribution, mean_t Σ_i q_ti · c_i with q = softmax(logits / τ), so that probability
  moves to cheap experts wherever the language-model loss does not hold it back. Costs
  (`compute_costs`): "flops", c_i = FLOPs_i / max_j FLOPs_j (every cheap expert is rewarded), or
  "skip", c_i = 0 for the zero expert and 1 for every other (only skipping the FFN is rewarded, so
  a token's first choice may become the zero expert while its second stays a computing expert).
  A temperature τ < 1 sharpens q towards the top choice, so the term acts mostly on the first slot.
"""

from __future__ import annotations

import torch

from nectar.moe.router import RoutingDecision


def relative_costs(layer) -> torch.Tensor:
    """[E] FLOPs per token of each expert of an MoE layer ÷ the layer's largest (1 = a full expert)."""
    flops = torch.tensor([expert.cost_per_token().flops for expert in layer.experts], dtype=torch.float32)
    top = flops.max()
    return flops / top if top > 0 else torch.zeros_like(flops)


COMPUTE_COSTS = ("flops", "skip")


def compute_costs(layer, kind: str = "flops") -> torch.Tensor:
    """[E] the per-expert costs of the compute regulariser (see the module docstring)."""
    if kind == "flops":
        return relative_costs(layer)
    if kind == "skip":
        return torch.tensor([0.0 if expert.kind == "zero" else 1.0 for expert in layer.experts])
    raise ValueError(f"compute costs must be one of {COMPUTE_COSTS}, got {kind!r}")


def full_mask(costs_E: torch.Tensor, cheap_fraction: float = 0.5) -> torch.Tensor:
    """[E] bool: the full experts, those costing more than `cheap_fraction` of the largest
    (the complement of `nectar.experiment.policies.cheap_experts`)."""
    return costs_E > cheap_fraction


def null_aware_switch_loss(decision: RoutingDecision, full_E: torch.Tensor) -> torch.Tensor:
    """The Switch loss over the full experts only (see the module docstring)."""
    probs_NE = decision.probs.float()
    full_E = full_E.to(probs_NE.device)
    n_full = int(full_E.sum())
    if n_full == 0:
        raise ValueError("null-aware balancing needs at least one full expert")
    q_NF = probs_NE[:, full_E]
    q_NF = q_NF / q_NF.sum(-1, keepdim=True).clamp_min(1e-9)                      # [N, F]
    experts_P = decision.experts[decision.active]                                 # active pairs
    counts_E = torch.zeros(probs_NE.shape[1], device=probs_NE.device).index_add_(
        0, experts_P, torch.ones_like(experts_P, dtype=torch.float32))            # [E], no host read
    counts_F = counts_E[full_E]
    fraction_F = counts_F / counts_F.sum().clamp_min(1.0)
    return n_full * (fraction_F * q_NF.mean(0)).sum()


def expected_compute_loss(decision: RoutingDecision, costs_E: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean_t Σ_i q_ti · c_i with q = softmax(logits / temperature) (at 1: the routing distribution)."""
    q_NE = decision.probs.float() if temperature == 1.0 else torch.softmax(decision.logits.float() / temperature, -1)
    return (q_NE @ costs_E.to(q_NE.device)).mean()
