"""One sparse block of an attached transformers MoE model, as the rest of NECTAR sees an MoE layer.

`HFMoELayer` mirrors the parts of `nectar.moe.layer.MoELayer` that the experiment and the
controller use: `num_experts`, `d_model`, a settable `router` (any `nectar.moe.router.Router` over
E experts), `gate.weight` (device placement), `experts` (one cost view per routed expert, so
`nectar.experiment.policies.cheap_experts` works), `recorder` (set by `AttachedMoE.recording`) and
`layer_workload(...)`. It is a view, not a module: the weights stay in the transformers model,
and the gate hook (`nectar.hf.attach`) calls `router` and `recorder` through it.
"""

from __future__ import annotations

from torch import nn

from nectar.hf.describe import SharedExperts, param_bytes, shared_experts_of, swiglu_cost
from nectar.hf.families import FamilyRouting
from nectar.moe.recorder import RoutingRecorder
from nectar.moe.router import Router
from nectar.telemetry.workload import ExpertCost, LayerWorkload


class RoutedExpertView:
    """Routed expert `index` of a layer: only what policies ask of an expert, its cost per token."""

    def __init__(self, layer: "HFMoELayer", index: int):
        self.layer, self.index = layer, index

    def cost_per_token(self, dtype_bytes: int | None = None) -> ExpertCost:
        return self.layer.expert_cost(dtype_bytes)


class HFMoELayer:
    """View of block `block_index` (`block`: a transformers sparse block with `gate` and `experts`)."""

    def __init__(self, block_index: int, name: str, block: nn.Module, family: FamilyRouting, router: Router,
                 sentinel: bool):
        self.block_index, self.name, self.block, self.family = block_index, name, block, family
        self.sentinel = sentinel               # unused slots skipped (True) or computed at gate 0
        self.recorder: RoutingRecorder | None = None
        self.holder = None                     # gets every decision the router makes (`holder.keep(decision)`):
                                               # a driven model's leader (`nectar.serving.driven`)
        self.shared: SharedExperts = shared_experts_of(block)
        self._router: Router | None = None
        self.router = router
        self.experts = tuple(RoutedExpertView(self, i) for i in range(self.num_experts))

    # ----- shape ---------------------------------------------------------------------------------
    @property
    def gate(self) -> nn.Module:
        return self.block.gate

    @property
    def experts_module(self) -> nn.Module:
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return int(self.block.experts.num_experts)

    @property
    def top_k(self) -> int:
        return self.family.top_k

    @property
    def d_model(self) -> int:
        return int(self.block.experts.down_proj.shape[1])   # [E, D, H]

    @property
    def expert_hidden(self) -> int:
        return int(self.block.experts.down_proj.shape[2])

    # ----- router --------------------------------------------------------------------------------
    @property
    def router(self) -> Router:
        return self._router

    @router.setter
    def router(self, router: Router) -> None:
        if not isinstance(router, Router) or router.num_experts != self.num_experts:
            raise ValueError(f"block {self.block_index} needs a nectar Router over {self.num_experts} experts, "
                             f"got {router!r}")
        self._router = router

    def policy_router(self, policy: str) -> Router:
        """A fresh router of a named policy for this layer (`nectar.hf.policies`)."""
        from nectar.hf.policies import hf_policy_router

        return hf_policy_router(policy, self)

    # ----- costs ---------------------------------------------------------------------------------
    def _bytes(self, dtype_bytes: int | None) -> int:
        return param_bytes(self.block.experts) if dtype_bytes is None else dtype_bytes

    def expert_cost(self, dtype_bytes: int | None = None) -> ExpertCost:
        """One token through one routed expert (all routed experts of a block have one width)."""
        return swiglu_cost(self.d_model, self.expert_hidden, self._bytes(dtype_bytes))

    def shared_costs(self, dtype_bytes: int | None = None) -> list[ExpertCost]:
        """The always-on shared experts as one entry (empty without them)."""
        return [self.shared.cost(self.d_model, self._bytes(dtype_bytes))] if self.shared.count else []

    @property
    def router_flops_per_token(self) -> float:
        return 2.0 * self.d_model * self.num_experts

    def layer_workload(self, tokens_per_expert: list[int], dtype_bytes: int, dropped_tokens: int = 0,
                       tokens: int = 0) -> LayerWorkload:
        """The block's LayerWorkload: the E routed experts' (token, slot) counts, then the shared
        experts (if any) as one extra entry that every one of the `tokens` tokens goes through."""
        if len(tokens_per_expert) != self.num_experts:
            raise ValueError(f"block {self.block_index}: got {len(tokens_per_expert)} counts for "
                             f"{self.num_experts} experts")
        shared = self.shared_costs(dtype_bytes)
        return LayerWorkload(
            tokens_per_expert=list(tokens_per_expert) + [tokens] * len(shared),
            expert_costs=[self.expert_cost(dtype_bytes)] * self.num_experts + shared,
            router_flops_per_token=self.router_flops_per_token,
            dropped_tokens=dropped_tokens,
        )
