"""Batch-aware routing for decode steps: a token's extra experts are cheap when the batch reads them anyway.

In a decode step an expert's weights are read from memory once for every token of the batch that
uses it, so the cost of a (token, expert) slot depends on the rest of the batch. Here every token
keeps its top-1 expert; the union of the batch's top-1 experts is the set the step reads anyway
(`read_E`). A further slot among the token's top-K′ is then

- free when its expert is already read: kept (batch-aware re-routing, `batch-aware:K′`);
- otherwise priced: kept when its renormalised weight w ≥ λ · c_e / m_e, where c_e is the
  expert's relative weight-read cost (1 for a full expert, 0 for a zero/copy expert) and m_e the
  number of the batch's candidate slots on expert e that would share the read (`batch-price:λ`;
  λ = ∞ is batch-aware re-routing, λ = 0 the static top-K′).

Everything is computed on the device with fixed shapes (scatter, no boolean indexing): the decode
step queues without a host read. The price lives on the device too (`price_t`, a 0-d float64
buffer that setting `router.price` fills): a captured decode step (`nectar.serving.graphs`) reads
the price in force at each replay, so the controller moves λ without a new capture. Only λ = ∞
(no priced slots at all) is a different computation, read from the host float `price`. The same rule serves MoE-DistilGPT2 (`BatchPriceRouter`, softmax
gates renormalised over the kept slots) and transformers families (`BatchPriceFamilyRouter`: the
family's own selection and gate formula over the kept slots).
"""

from __future__ import annotations

import math

import torch

from nectar.hf.routers import FamilyRouter
from nectar.hf.threshold import slot_ranks
from nectar.moe.router import Router, RoutingDecision, check_logits, gate_probs, probs_decision


def batch_keep(experts_NK: torch.Tensor, ranks_NK: torch.Tensor, weights_NK: torch.Tensor, k_max: int,
               price: float | torch.Tensor, cost_E: torch.Tensor) -> torch.Tensor:
    """[N, K] bool slots kept by the batch rule (see the module docstring); rank 0 always kept.
    `price` is a float or a 0-d device tensor (read by the kernels, never by the host); the
    threshold is computed in at least fp32 (fp32 weights: as with a float price, bit for bit)."""
    num_experts = cost_E.shape[0]
    first_NK = ranks_NK == 0
    flat_experts = experts_NK.reshape(-1)
    read_E = torch.zeros(num_experts, device=experts_NK.device).scatter_reduce(
        0, flat_experts, first_NK.reshape(-1).float(), reduce="amax") > 0           # [E] read by a top-1
    candidate_NK = ranks_NK < k_max
    keep_NK = first_NK | (candidate_NK & read_E[experts_NK])
    if not isinstance(price, torch.Tensor) and price == math.inf:
        return keep_NK
    sharers_E = torch.zeros(num_experts, device=experts_NK.device).scatter_add(
        0, flat_experts, candidate_NK.reshape(-1).float())                         # [E] candidate slots
    dtype = torch.promote_types(weights_NK.dtype, torch.float32)
    price = price.to(dtype) if isinstance(price, torch.Tensor) else price
    need_NK = price * cost_E.to(dtype)[experts_NK] / sharers_E.to(dtype)[experts_NK].clamp_min(1)
    return keep_NK | (candidate_NK & (weights_NK.to(dtype) >= need_NK))


def check_price(price: float) -> float:
    if isinstance(price, bool) or not isinstance(price, (int, float)) or math.isnan(price) or price < 0:
        raise ValueError(f"a batch price must be a number >= 0 (inf: batch-aware only), got {price!r}")
    return float(price)


class DevicePrice:
    """`price` (a host float) mirrored into the 0-d device buffer `price_t` whenever it is set; the
    router's computation reads `batch_price()`: the tensor, or ∞ (no priced slots). The router also
    meters what its decisions drop, on the device (`dropped_mass_t`: Σ over routed tokens of the
    renormalised weight of the slots not kept; `routed_tokens_t`: tokens routed), running totals a
    controller reads once a window (a free quality proxy: no forward of its own)."""

    def _init_price(self, price: float) -> None:
        self.register_buffer("price_t", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("dropped_mass_t", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("routed_tokens_t", torch.zeros((), dtype=torch.float64), persistent=False)
        self.price = price

    def _meter(self, weights_NK: torch.Tensor, keep_NK: torch.Tensor) -> None:
        """Add this forward's dropped weight and token count to the running totals (in place: a
        captured step adds at every replay)."""
        self.dropped_mass_t.add_((weights_NK.double() * (~keep_NK)).sum())
        self.routed_tokens_t.add_(float(weights_NK.shape[0]))

    @property
    def price(self) -> float:
        return self._price

    @price.setter
    def price(self, value: float) -> None:
        self._price = check_price(value)
        self.price_t.fill_(self._price)              # a kernel on the buffer's device; no host read

    def batch_price(self) -> float | torch.Tensor:
        return math.inf if self._price == math.inf else self.price_t


class BatchPriceRouter(DevicePrice, Router):
    """MoE-DistilGPT2's router under the batch rule: top-K′ of the gate, slots kept by `batch_keep`."""

    def __init__(self, num_experts: int, k_max: int, cost_E: torch.Tensor, price: float = math.inf,
                 temperature: float = 1.0):
        super().__init__(num_experts, temperature)
        if not 1 <= k_max <= num_experts:
            raise ValueError(f"k_max must lie in 1..{num_experts}, got {k_max}")
        self.k_max = k_max
        self.register_buffer("cost_E", cost_E.detach().float().clone(), persistent=False)
        self._init_price(price)

    @property
    def max_slots(self) -> int:
        return self.k_max

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        probs_NE = gate_probs(logits, self.temperature)
        top = torch.topk(probs_NE.detach(), self.k_max, dim=-1, sorted=True)            # rank = slot
        weights_NK = top.values / top.values.sum(-1, keepdim=True)
        ranks_NK = torch.arange(self.k_max, device=logits.device).expand_as(top.indices)
        mask_NK = batch_keep(top.indices, ranks_NK, weights_NK, self.k_max, self.batch_price(), self.cost_E)
        self._meter(weights_NK, mask_NK)
        return probs_decision(logits, probs_NE, top.indices, mask_NK)


class BatchPriceFamilyRouter(DevicePrice, FamilyRouter):
    """A transformers family's own top-K under the batch rule (K′ = k_max of its K slots)."""

    def __init__(self, family, k_max: int, cost_E: torch.Tensor, price: float = math.inf,
                 renormalize: str = "family"):
        super().__init__(family, renormalize)
        if not 1 <= k_max <= family.top_k:
            raise ValueError(f"k_max must lie in 1..{family.top_k} (the family's top-k), got {k_max}")
        self.k_max = k_max
        self.register_buffer("cost_E", cost_E.detach().float().clone(), persistent=False)
        self._init_price(price)

    def keep_slots(self, sel, weights_NK: torch.Tensor) -> torch.Tensor | None:
        keep_NK = batch_keep(sel.experts, slot_ranks(weights_NK), weights_NK, self.k_max, self.batch_price(), self.cost_E)
        self._meter(weights_NK / weights_NK.sum(-1, keepdim=True), keep_NK)    # weights over the family's K slots
        return keep_NK
