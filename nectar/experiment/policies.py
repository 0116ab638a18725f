"""Routing policies: a policy name → one router per MoE layer, and whether something adapts it.

Non-adaptive (the static frontier):
- `static-top1`, `static-top2`, `static-top3`: the trained gate's top-k (dropless);
- `static-cheap`: the static top-1 expert plus the best cheap expert by the trained logits;
- `fixed-bias:B`: NECTAR's own router with a fixed score bias B on the cheap experts and no
  controller (B = 0 is static top-2 over the static-or-cheap candidates);
- `fixed-price:L`: NECTAR's own router (with the drop option) frozen where the chunk problem puts
  it at a fixed quality price λ = L with the run's start costs (measured by the calibration, else
  the FLOP prior): bias −c/λ and drop scale c/λ, no controller — the static policy NECTAR's
  controller moves along;
- `top-p:P`: per-token confidence threshold (top-p routing, at most two experts): a token takes
  experts by probability until their mass reaches P;
- `mix:S`: a random share S of the tokens routes its second slot to the best cheap expert.
Adaptive:
- `pi-share:S`: NECTAR's router whose cheap bias a PI controller moves so that a share S of second
  slots goes to cheap experts (a DTop-p-style baseline: it holds a compute target, not energy);
- `nectar` (a token may go to a cheap expert or skip its remaining slot), and the ablations
  `nectar:prior` (the cost model keeps the FLOP prior, measured costs or not), `nectar:frozen` (the cost model stops
  learning after a few chunks), `nectar:fast` (with the fast-weight router network),
  `nectar:dual` (the price by dual ascent alone, no feed-forward from the sensitivity),
  `nectar:noscale` (dual ascent and one price for every chunk, no per-chunk sensitivity),
  `nectar:nodrop` (cheap experts only, never a skipped slot).
Clock-locked (`nectar.experiment.clocks`; simulator only: the lent GPUs' clocks are never changed):
- `clock:MHZ`: the reference routing (static top-2, or a transformers MoE model's own top-K) with
  the backend's SM clock locked at MHZ (static: the frontier's clock family);
- `POLICY@clock:MHZ`: any policy above with the clock locked at MHZ (`nectar@clock:1300`); a static
  one stays static.
Cheap experts are those whose forward FLOPs per token are at most half of the layer's most
expensive expert (narrow and zero-computation experts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.fast_router import FastWeightRouterNet
from nectar.experiment.clocks import split_clock
from nectar.moe.router import Router
from nectar.moe.static_routers import CheapStaticRouter, MixedTrainingRouter, TopKRouter, TopPRouter
from nectar.telemetry.workload import widest_ffn_flops

NECTAR_VARIANTS = ("nectar", "nectar:prior", "nectar:frozen", "nectar:fast", "nectar:dual", "nectar:noscale",
                   "nectar:nodrop")
STATIC_KINDS = ("static-top", "static-cheap", "fixed-bias", "fixed-price", "top-p", "mix", "threshold")
DEFAULT_POLICIES = ("static-top2", "static-top1", "static-cheap", "nectar")
POLICIES = ("static-top1", "static-top2", "static-top3", "static-cheap", "fixed-bias:B", "fixed-price:L", "top-p:P", "mix:S",
            "pi-share:S", "threshold:T", *NECTAR_VARIANTS, "clock:MHZ", "POLICY@clock:MHZ")


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy name: its kind and its parameter (k, B, P or S; None when it has none), and
    for a clock-locked name the routing policy it runs and the SM clock it locks."""

    name: str
    kind: str
    value: float | None = None
    clock_MHz: float | None = None      # the locked SM clock (None: the backend's own clocks)
    routing: str = ""                   # the routing policy's name ("" : the name itself)

    @property
    def route_name(self) -> str:
        """The routing policy's name, without the clock ("nectar" for "nectar@clock:1300")."""
        return self.routing or self.name

    @property
    def adaptive(self) -> bool:
        return self.kind not in STATIC_KINDS

    @property
    def is_nectar(self) -> bool:
        return self.kind == "nectar"


def parse_policy(name: str) -> PolicySpec:
    """PolicySpec of a name such as "static-top2", "fixed-bias:1.5", "top-p:0.7", "nectar:prior",
    "clock:1300" or "nectar@clock:1300"."""
    routing, clock_MHz = split_clock(name)
    if clock_MHz is not None:
        return replace(_parse_routing(routing), name=name, clock_MHz=clock_MHz, routing=routing)
    return _parse_routing(name)


def _parse_routing(name: str) -> PolicySpec:
    if name.startswith("static-top"):
        return PolicySpec(name, "static-top", _number(name, name.removeprefix("static-top"), integer=True))
    if name == "static-cheap":
        return PolicySpec(name, "static-cheap")
    if name in NECTAR_VARIANTS:
        return PolicySpec(name, "nectar")
    kind, sep, value = name.partition(":")
    if sep and kind in ("fixed-bias", "fixed-price", "top-p", "mix", "pi-share", "threshold"):
        number = _number(name, value)
        if kind == "fixed-price" and not number > 0:
            raise ValueError(f"policy {name!r}: the price must be > 0, got {number}")
        if kind in ("top-p", "mix", "pi-share", "threshold") and not 0.0 <= number <= 1.0:
            raise ValueError(f"policy {name!r}: {kind} takes a value in [0, 1], got {number}")
        return PolicySpec(name, kind, number)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def _number(name: str, text: str, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"policy {name!r}: {text!r} is not a {'whole ' if integer else ''}number") from None
    if integer and value < 1:
        raise ValueError(f"policy {name!r}: k must be >= 1")
    return value


def check_policies(names: list[str]) -> list[str]:
    for name in names:
        parse_policy(name)
    if len(set(names)) != len(names):
        raise ValueError(f"policies listed twice: {names}")
    if not names:
        raise ValueError("no policies given")
    return list(names)


def cheap_experts(layer, cheap_fraction: float = 0.5) -> list[int]:
    """Indices of experts whose FLOPs per token are ≤ cheap_fraction × the widest FFN expert's (an
    expert of another kind — a LaCT expert, several times an FFN's FLOPs — neither is cheap nor
    makes the FFNs cheap; a pool without FFN experts measures against its costliest expert)."""
    costs = [expert.cost_per_token() for expert in layer.experts]
    top = widest_ffn_flops(costs)
    return [i for i, c in enumerate(costs) if c.flops <= cheap_fraction * top]



def policy_router(policy: str | PolicySpec, layer, temperature: float = 1.0, seed: int = 0,
                  costs: torch.Tensor | None = None) -> Router:
    """A fresh router of `policy` for `layer` (an MoE layer: num_experts, d_model, experts);
    `costs` [E]: the relative per-slot costs `fixed-price:L` is priced with (default: the FLOP prior)."""
    spec = parse_policy(policy) if isinstance(policy, str) else policy
    if hasattr(layer, "policy_router"):        # a transformers MoE block: nectar.hf.policies names its routers
        return layer.policy_router(spec.route_name)
    if spec.kind == "threshold":
        raise ValueError(f"policy {spec.name!r} routes pretrained transformers MoE models only")
    num = layer.num_experts
    if spec.kind == "static-top":
        k = int(spec.value)
        if k > num:
            raise ValueError(f"{spec.name} needs at least {k} experts, the layer has {num}")
        return TopKRouter(num, k, temperature=temperature)
    if spec.kind == "top-p":
        return TopPRouter(num, p=max(spec.value, 1e-6), max_k=min(2, num), temperature=temperature)
    cheap = cheap_experts(layer)
    if not cheap:
        raise ValueError(f"policy {spec.name!r} needs cheap experts (narrow or zero-compute); the model has none")
    if spec.kind == "static-cheap":
        return CheapStaticRouter(num, cheap, temperature=temperature)
    if spec.kind == "mix":
        return MixedTrainingRouter(num, cheap, k=2, cheap_prob=spec.value, temperature=temperature, seed=seed)
    fast_net = FastWeightRouterNet(layer.d_model, num) if spec.route_name == "nectar:fast" else None
    drop = spec.route_name != "nectar:nodrop" and spec.kind in ("nectar", "fixed-price")
    router = EnergyAwareRouter(num, cheap, temperature=temperature, fast_net=fast_net, drop=drop)
    if spec.kind == "fixed-bias":
        router.adapt(bias=cheap_bias(num, cheap, spec.value))
    if spec.kind == "fixed-price":
        router.start_at_price(prior_costs(layer) if costs is None else costs, spec.value)
    return router


def prior_costs(layer) -> torch.Tensor:
    """[E] float64 the FLOP prior's per-token expert costs, normalised to the widest FFN expert (so a
    costlier expert of another kind, a LaCT expert, reads > 1 and leaves the fixed-price grid alone)."""
    costs = [expert.cost_per_token() for expert in layer.experts]
    return torch.tensor([c.flops for c in costs], dtype=torch.float64) / widest_ffn_flops(costs)


def cheap_bias(num_experts: int, cheap: list[int], value: float) -> torch.Tensor:
    """[E] a score bias of `value` on the cheap experts, 0 elsewhere."""
    bias = torch.zeros(num_experts)
    bias[cheap] = value
    return bias
