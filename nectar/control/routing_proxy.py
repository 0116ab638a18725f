"""What the energy-aware router can actually choose, as a distribution: the chunk problem's q.

The router forces the static top-1 expert into the first slot and picks the remaining slot among
a candidate set A_t (the static second choice and the best cheap expert, for "static-or-cheap").
The chunk problem is therefore posed over A_t: q_t is the static softmax restricted to A_t and
renormalised (zero elsewhere), and p_t = softmax(log q_t + b) over A_t; the router's argmax over
A_t is the mode of that p_t. `deviation_kl` is the mean KL(p_t ‖ q_t) of the bias in force, plus,
for a token whose remaining slot is dropped, the KL of the dropped gate mass −log(1 − w): the
routing deviation the quality guard relates to the measured NLL increase.
"""

from __future__ import annotations

import torch

from nectar.moe.router import Router

# `router` below is NECTAR's `EnergyAwareRouter` (`nectar.control.energy_router`), which imports
# this module for its drop rule and its deviation: annotated by its base class, not imported.


def allowed_distribution(router: Router, logits: torch.Tensor) -> torch.Tensor:
    """[N, E] static second-slot distribution: softmax(logits/τ) restricted to the candidates."""
    logits = logits.float()
    allowed_NE = router.second_slot_mask(logits)                               # [N, E] 0 or -inf
    return torch.softmax(logits / router.temperature + allowed_NE, dim=-1)


def deviation_kl(router: Router, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p ‖ q) with q the candidates' static distribution, p = q·exp(b)."""
    if logits.numel() == 0:
        return 0.0
    q_NE = allowed_distribution(router, logits)
    log_q = torch.log(q_NE.clamp_min(1e-30))
    log_p = torch.log_softmax(log_q + router.bias.to(log_q), dim=-1)          # [N, E]
    p_NE = log_p.exp()
    kl_N = (p_NE * (log_p - log_q)).where(q_NE > 0, torch.zeros_like(p_NE)).sum(-1)
    return float(kl_N.mean()) + drop_kl(router, logits)


def drop_kl(router: Router, logits: torch.Tensor) -> float:
    """Mean over tokens of −log(1 − w) for the tokens whose remaining slot the router drops."""
    logits = logits.float()
    decision = router(logits)
    if decision.mask.all():
        return 0.0
    dropped_N = ~decision.mask[:, 1]
    return float((dropped_mass_kl(decision.probs, decision.experts) * dropped_N).mean())


def dropped_mass_kl(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[...] −log(1 − w): the KL cost of dropping slot 2, w its share of the two static gates
    (probs [..., E] static softmax, experts [..., K ≥ 2] chosen experts; leading dims broadcast)."""
    q_xK = probs.gather(-1, experts)
    share = q_xK[..., 1] / (q_xK[..., 0] + q_xK[..., 1]).clamp_min(1e-30)
    return -torch.log1p(-share.clamp(max=1 - 1e-7))
