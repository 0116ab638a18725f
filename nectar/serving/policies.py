"""Serving policies: a name → one router per MoE layer for decode steps and prefill chunks.

The serving frontier (static, every one in the hull):
- the teacher-forced frontier's static names (`static-top<k>`, `top-p:P`, `fixed-price:L`, and for
  transformers families `threshold:T`), built by `nectar.experiment.policies.policy_router`;
- `batch-aware:K′`: every token keeps its top-1 and takes further experts among its top-K′ only
  when the batch already reads them (`nectar.serving.batch_routers`, price ∞);
- `batch-price:L`: the same with new experts priced: kept when the slot's weight ≥ L · c_e / m_e
  (K′ = the model's trained top-k).
Adaptive: `nectar` — `batch-price` whose price the serving controller moves once per window
(`nectar.serving.controller`).

c_e is an expert's weight bytes relative to the layer's largest (what a decode step reads for it).
"""

from __future__ import annotations

import math

import torch

from nectar.experiment.policies import policy_router
from nectar.moe.router import Router
from nectar.serving.batch_routers import BatchPriceFamilyRouter, BatchPriceRouter

SERVING_KINDS = ("batch-aware", "batch-price")
SERVING_POLICIES = ("static-top<k>", "top-p:P", "fixed-price:L", "threshold:T", "batch-aware:K", "batch-price:L",
                    "nectar")
NECTAR_START_PRICE = 0.05   # the controller's first price (a mid point of batch-price's useful range)


def weight_costs(layer) -> torch.Tensor:
    """[E] each expert's weight bytes relative to the layer's largest (0 for zero/copy experts)."""
    costs = layer.layer_workload([0] * layer.num_experts, 2).expert_costs
    weights = torch.tensor([c.weight_bytes for c in costs], dtype=torch.float64)
    return weights / weights.max().clamp_min(1.0)


def parse_serving(name: str) -> tuple[str, float | None]:
    """(kind, value) of a serving-only name, or (name, None) for a name of the teacher-forced set."""
    kind, sep, value = name.partition(":")
    if kind in SERVING_KINDS:
        if not sep:
            raise ValueError(f"policy {name!r} needs a value ({kind}:<number>)")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"policy {name!r}: {value!r} is not a number") from None
        if kind == "batch-aware" and (number < 1 or number != int(number)):
            raise ValueError(f"policy {name!r}: K' must be a whole number >= 1")
        if kind == "batch-price" and not number >= 0:
            raise ValueError(f"policy {name!r}: the price must be >= 0")
        return kind, number
    return name, None


def batch_router(layer, k_max: int, price: float) -> Router:
    """The batch rule for `layer`, native or transformers family."""
    costs = weight_costs(layer)
    if hasattr(layer, "family"):
        return BatchPriceFamilyRouter(layer.family, k_max, costs, price)
    return BatchPriceRouter(layer.num_experts, k_max, costs, price)


def serving_router(name: str, layer, top_k: int, costs: torch.Tensor | None = None) -> Router:
    """A fresh router of serving policy `name` for `layer`, whose trained top-k is `top_k`."""
    kind, value = parse_serving(name)
    if kind == "batch-aware":
        if value > top_k:
            raise ValueError(f"policy {name!r}: K' = {value:g} exceeds the model's top-k ({top_k})")
        return batch_router(layer, int(value), math.inf)
    if kind == "batch-price":
        return batch_router(layer, top_k, value)
    if name == "nectar":
        return batch_router(layer, top_k, NECTAR_START_PRICE)
    return policy_router(name, layer, costs=costs)


def check_serving_policies(names: list[str], layer, top_k: int) -> list[str]:
    """Build every policy once on `layer` so a bad name fails before any step runs."""
    if not names:
        raise ValueError("no policies given")
    if len(set(names)) != len(names):
        raise ValueError(f"policies listed twice: {names}")
    for name in names:
        serving_router(name, layer, top_k)
    return list(names)


def is_adaptive(name: str) -> bool:
    return name == "nectar"
