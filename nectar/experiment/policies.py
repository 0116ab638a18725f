"""Routing policies compared by `nectar run`: name → one router per MoE layer.

- static-top1 / static-top2 / static-top3: the trained gate's top-k (dropless);
- static-cheap: the static top-1 expert plus the best cheap expert by the trained logits;
- nectar: the energy-aware test-time router (its controller is built by the experiment).
Cheap experts are those whose forward FLOPs per token are at most `cheap_fraction` of the
layer's most expensive expert (narrow and zero-computation experts).
"""

from __future__ import annotations

from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.fast_router import FastWeightRouterNet
from nectar.moe.layer import MoELayer
from nectar.moe.static_routers import CheapStaticRouter, TopKRouter
from nectar.moe.router import Router

POLICIES = ("static-top2", "static-top1", "static-top3", "static-cheap", "nectar")
DEFAULT_POLICIES = ("static-top2", "static-top1", "static-cheap", "nectar")


def cheap_experts(layer: MoELayer, cheap_fraction: float = 0.5) -> list[int]:
    """Indices of experts whose FLOPs per token are ≤ cheap_fraction × the layer's maximum."""
    flops = [expert.cost_per_token().flops for expert in layer.experts]
    top = max(flops)
    return [i for i, f in enumerate(flops) if f <= cheap_fraction * top]


def check_policies(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {list(POLICIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"policies listed twice: {names}")
    return list(names)


def policy_router(policy: str, layer: MoELayer, temperature: float = 1.0, fast_router: bool = False) -> Router:
    """A fresh router of `policy` for `layer`; `fast_router` gives NECTAR's router a fast-weight
    network (LaCT machinery) beside its per-expert bias."""
    num = layer.num_experts
    if policy.startswith("static-top"):
        k = int(policy.removeprefix("static-top"))
        if k > num:
            raise ValueError(f"{policy} needs at least {k} experts, the layer has {num}")
        return TopKRouter(num, k, temperature=temperature)
    cheap = cheap_experts(layer)
    if not cheap:
        raise ValueError(f"policy {policy!r} needs cheap experts (narrow or zero-compute); the model has none")
    if policy == "static-cheap":
        return CheapStaticRouter(num, cheap, temperature=temperature)
    if policy == "nectar":
        net = FastWeightRouterNet(layer.d_model, num) if fast_router else None
        return EnergyAwareRouter(num, cheap, temperature=temperature, fast_net=net)
    raise ValueError(f"unknown policy {policy!r}; choose from {list(POLICIES)}")
