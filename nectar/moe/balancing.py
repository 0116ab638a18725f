"""Anti-collapse tools for MoE routing: auxiliary losses, diagnostics and the aux-free bias update.

Notation: probs p [N, E] (each row a distribution over E experts), p̄ = mean_t p_t (batch-mean
routing distribution), f_i = fraction of tokens whose top choice is expert i, H(q) = −Σ q log q
in nats, U = uniform over E.

The softmax temperature, the other classic knob against collapse, lives in the routers
(`nectar.moe.static_routers`, scores = logits / temperature), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nectar.moe.router import RoutingDecision


def _check_probs(probs: torch.Tensor, what: str = "routing probabilities") -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        shape = list(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"expected {what} of shape [N>0, E>0], got {shape}")
    if not probs.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {probs.dtype}")


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """H over the last dim, with 0·log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def switch_load_balancing_loss(routing: RoutingDecision | torch.Tensor, top1: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer auxiliary loss, L = E · Σ_i f_i · P_i with P_i = p̄_i.

    L = 1 for perfectly uniform routing and L = E when every token goes to one expert with
    probability 1. `routing` is a RoutingDecision (top choice = slot 0, the dispatched top-1) or
    probs [N, E]; then `top1` [N] (or [N, K], slot 0 used) gives the top choices, default argmax.
    Differentiable through P only (f is a count), as in the paper.
    """
    if isinstance(routing, RoutingDecision):
        probs, top1 = routing.probs, routing.experts[:, 0] if top1 is None else top1
    else:
        probs = routing
    _check_probs(probs)
    n, num_experts = probs.shape
    top1 = probs.argmax(-1) if top1 is None else top1
    top1 = top1[:, 0] if top1.dim() == 2 else top1
    if top1.shape != (n,):
        raise ValueError(f"top1 must have shape [{n}] or [{n}, K], got {list(top1.shape)}")
    fraction_E = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / n  # f [E]
    return num_experts * (fraction_E * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, L_z = mean_t (logsumexp_j x_tj)²; keeps gate logits small."""
    _check_probs(logits, "router logits")
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class RoutingEntropy:
    """token: mean_t H(p_t) (confidence of each decision); marginal: H(p̄) (load spread)."""

    token: torch.Tensor
    marginal: torch.Tensor


def routing_entropy(probs: torch.Tensor) -> RoutingEntropy:
    """Mean per-token entropy mean_t H(p_t) and entropy of the batch-mean distribution H(p̄).

    Uniform routing: both log E. Every token one-hot on the same expert: both 0. One-hot tokens
    spread evenly over the experts: token 0, marginal log E.
    """
    _check_probs(probs)
    return RoutingEntropy(token=_entropy(probs).mean(), marginal=_entropy(probs.mean(0)))


def entropy_regularizer(probs: torch.Tensor, token_coef: float = 0.0, marginal_coef: float = 1.0) -> torch.Tensor:
    """R = token_coef · mean_t H(p_t) − marginal_coef · H(p̄), a loss to minimise.

    The marginal term rewards spreading the load (anti-collapse); a positive token term rewards
    sharp per-token decisions. With equal coefficients R = −I(token; expert), the negative mutual
    information between tokens and experts: minimal (−log E) for sharp and balanced routing.
    """
    entropy = routing_entropy(probs)
    return token_coef * entropy.token - marginal_coef * entropy.marginal


def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(p̄ ‖ U) = Σ_i p̄_i log(E · p̄_i) = log E − H(p̄): 0 when balanced, log E when collapsed."""
    _check_probs(probs)
    return math.log(probs.shape[1]) - _entropy(probs.mean(0))


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. (2017) importance loss CV(Σ_t p_t)² (population variance / mean²).

    0 when every expert receives the same total probability; E − 1 when one expert gets it all.
    """
    _check_probs(probs)
    importance_E = probs.sum(0)
    return importance_E.var(unbiased=False) / importance_E.mean().square()


def aux_free_bias_update(bias: torch.Tensor, tokens_per_expert: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """Auxiliary-loss-free balancing step (DeepSeek-V3; torchtitan's centring):

        Δ_i = γ · sign(mean_j load_j − load_i),   Δ ← Δ − mean(Δ),   bias ← bias + Δ.

    Under-loaded experts gain selection bias, over-loaded ones lose it; Σ Δ = 0. Returns a new
    tensor (the caller copies it into its router's `selection_bias` buffer).
    """
    if bias.dim() != 1 or tokens_per_expert.shape != bias.shape:
        raise ValueError(f"bias [E] and tokens_per_expert [E] must match, got {list(bias.shape)} and {list(tokens_per_expert.shape)}")
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    load_E = tokens_per_expert.to(bias.device, torch.float64)
    if (load_E < 0).any():
        raise ValueError("tokens_per_expert must be non-negative")
    delta_E = gamma * torch.sign(load_E.mean() - load_E)
    delta_E = delta_E - delta_E.mean()
    return bias + delta_E.to(bias.dtype)
