"""Routing policies for attached transformers MoE models: name → one router per MoE layer.

Names follow `nectar.experiment.policies` where the concept is the same:
- static-top<k>   the k largest of the family's top-K slots (k = K: the model as trained, exact);
- threshold:<τ>   static top-1 plus every slot of renormalised weight ≥ τ (`ThresholdRouter`),
                  the pretrained model's fixed knob (as fixed-bias:B is MoE-DistilGPT2's);
- top-p:<p>       per token the fewest largest slots whose weights reach p (`ConfidenceRouter`);
- nectar, nectar:<variant>   the adaptive-k router (`AdaptiveKRouter`), τ steered by the controller.
static-top1..K, threshold:τ and top-p:p are the static frontier's points. Policies built on cheap
experts (static-cheap, fixed-bias, mix, pi-share) have no meaning here: a pretrained pool's
routed experts all have one width.
"""

from __future__ import annotations

import re

from nectar.hf.adaptive_k import AdaptiveKRouter
from nectar.hf.routers import ConfidenceRouter, FamilyTopKRouter, ThresholdRouter
from nectar.moe.router import Router

_PATTERN = re.compile(r"^(?:static-top(?P<k>\d+)|threshold:(?P<tau>[^:]+)|top-p:(?P<p>[^:]+)|(?P<nectar>nectar(?::\w+)?))$")


def _number(text: str, policy: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"policy {policy!r}: {text!r} is not a number") from None


def hf_policy_router(policy: str, layer, renormalize: str = "family") -> Router:
    """A fresh router of `policy` for an `HFMoELayer` (see the module docstring for the names)."""
    match = _PATTERN.match(policy)
    if match is None:
        raise ValueError(f"unknown policy {policy!r} for a transformers MoE model; use static-top<k> (k <= "
                         f"{layer.top_k}), threshold:<τ>, top-p:<p> or nectar")
    family = layer.family
    if match["k"] is not None:
        k = int(match["k"])
        if not 1 <= k <= layer.top_k:
            raise ValueError(f"{policy} needs 1 <= k <= the family's top-k ({layer.top_k})")
        return FamilyTopKRouter(family, k, renormalize)
    if match["tau"] is not None:
        return ThresholdRouter(family, _number(match["tau"], policy), renormalize)
    if match["p"] is not None:
        return ConfidenceRouter(family, _number(match["p"], policy), renormalize)
    return AdaptiveKRouter(family, 0.0, renormalize)


def is_hf_policy(policy: str) -> bool:
    """Whether `policy` is a name this module understands (its parameters are checked later)."""
    return _PATTERN.match(policy) is not None


def frontier_policies(top_k: int, thresholds=(0.05, 0.1, 0.15, 0.2, 0.3), top_ps=(0.5, 0.7, 0.9)) -> list[str]:
    """The static frontier's policy names for a family with top-K = `top_k`."""
    return ([f"static-top{k}" for k in range(top_k, 0, -1)] + [f"threshold:{t:g}" for t in thresholds]
            + [f"top-p:{p:g}" for p in top_ps])
