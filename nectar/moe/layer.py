"""The Mixture-of-Experts feed-forward layer: gate -> router -> dispatch -> experts -> combine.

The layer owns the trained gate (`nn.Linear(D, E, bias=False)`) and the experts, an `ExpertPool`
(groups of identical experts with stacked weights; `layer.experts[i]` is expert i); the router is
a separate, swappable module (`layer.router = other_router`), so several routing policies can
run on one set of weights. The router gets the gate logits and the gate inputs (adaptive routers
use the inputs; static ones ignore them).

Dispatch (`nectar.moe.dispatch`): in eager mode the per-expert loop (one host read of the counts
per layer, then one large GEMM per expert) is the default, because it measured faster on the H200
(docs/results/h200/bench: whole MoE-DistilGPT2 forward 2.50 vs 1.68 M tokens/s; MoE layer at 128K
tokens 0.62× vs 0.58× dense, SwiGLU); `layer.grouped = True` takes the grouped, host-sync-free
`torch._grouped_mm` path where it can run (CUDA, bf16). `layer.compile_dispatch()` runs gate →
router → grouped dispatch through `torch.compile` (0.91× dense for SwiGLU at 32K tokens on the
H200; optional, and it turns the grouped path on). `layer.compile_router()` compiles gate → router
alone and leaves the dispatch as it is (the loop path keeps its eager per-expert GEMMs; the router's
dozen small element-wise kernels fuse into a few). Without compile, the routers themselves take one
Triton kernel a decision on a GPU where they can (`nectar.moe.fused_router`).

While a `RoutingRecorder` is set (`layer.recorder`, for the length of one chunk: see
`MoEGPT2LMHeadModel.recording`), every forward adds its counts and a sample of its logits and
inputs to it, on the device. For training, the layer also keeps the last routing decision
(`last_decision`, with its autograd graph, for balancing losses on the gates) and a detached
summary (`last_metrics`), computed on first access (it reads counts back to the host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nectar.moe.balancing import routing_entropy
from nectar.moe.dispatch import dispatch_path, dispatch_with_counts
from nectar.moe.expert_pool import ExpertPool
from nectar.moe.experts import Expert
from nectar.moe.recorder import RoutingRecorder
from nectar.moe.router import Router, RoutingDecision
from nectar.telemetry.workload import LayerWorkload


@dataclass
class MoEMetrics:
    """Detached summary of one forward.

    tokens_per_expert  [E] (token, slot) pairs each expert computed (after drops)
    routing_entropy    mean per-token entropy of the router distribution (nats)
    dropped_tokens     (token, slot) pairs dropped for capacity
    workload           the layer's LayerWorkload for the chunk
    marginal_entropy   entropy of the batch-mean router distribution (nats; log E = balanced)
    num_tokens         tokens in the forward
    """

    tokens_per_expert: list[int]
    routing_entropy: float
    dropped_tokens: int
    workload: LayerWorkload
    marginal_entropy: float = 0.0
    num_tokens: int = 0


class MoELayer(nn.Module):
    """forward(x [B, T, D] or [N, D]) -> same shape: Σ_slots gate · expert(x)."""

    def __init__(self, d_model: int, experts: ExpertPool | Sequence[Expert], router: Router):
        super().__init__()
        if not isinstance(experts, ExpertPool):
            experts = list(experts)
            if len(experts) == 0:
                raise ValueError("MoELayer needs at least one expert")
            experts = ExpertPool.from_experts(experts)  # copies the experts' weights into stacks
        for i, expert in enumerate(experts):
            if expert.d_model != d_model:
                raise ValueError(f"expert {i} has d_model={expert.d_model}, layer has d_model={d_model}")
        if not isinstance(router, Router):
            raise ValueError(f"router must be a nectar.moe.router.Router, got {type(router).__name__}")
        self.d_model = d_model
        self.gate = nn.Linear(d_model, len(experts), bias=False)  # weight [E, D]
        self.experts = experts
        self.router = router
        self.grouped = False  # True: the grouped (sync-free) dispatch path where it can run (see above)
        self.compile_options: dict | None = None  # set by compile_dispatch
        self.router_compile_options: dict | None = None  # set by compile_router
        self.recorder: RoutingRecorder | None = None
        self.last_decision: RoutingDecision | None = None
        self._last_counts: torch.Tensor | None = None
        self._last_dtype_bytes = 0
        self._last_metrics: MoEMetrics | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def compile_dispatch(self, enabled: bool = True, **options) -> "MoELayer":
        """Run gate → router → grouped dispatch through torch.compile(**options) when the grouped
        path applies (the loop path stays eager). Off by default."""
        self.compile_options = dict(options) if enabled else None
        self.grouped = self.grouped or enabled
        return self

    def compile_router(self, enabled: bool = True, **options) -> "MoELayer":
        """Run gate → router through torch.compile(**options) (the dispatch stays as it is; a
        compiled dispatch, `compile_dispatch`, compiles the router with it). Off by default."""
        self.router_compile_options = dict(options) if enabled else None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_ND = x.reshape(-1, self.d_model)                     # [N, D]
        if self.compile_options is not None and dispatch_path(x_ND, self.experts, self.grouped) == "grouped":
            y_ND, counts_E, *fields = _compiled(self.compile_options)(self, x_ND)
            decision = RoutingDecision(*fields)
        else:
            y_ND, counts_E, decision = route_and_dispatch(self, x_ND)
        if self.recorder is not None:
            self.recorder.record(self, x_ND, decision, counts_E=counts_E)
        self.last_decision, self._last_counts = decision, counts_E
        self._last_dtype_bytes, self._last_metrics = x.element_size(), None
        return y_ND.reshape(x.shape)

    @property
    def last_metrics(self) -> MoEMetrics | None:
        """MoEMetrics of the last forward (None before the first), computed on first access."""
        if self._last_metrics is None and self.last_decision is not None:
            self._last_metrics = self.metrics(self.last_decision, self._last_dtype_bytes)
        return self._last_metrics

    def _check_input(self, x: torch.Tensor) -> None:
        if self.router.num_experts != self.num_experts:
            raise ValueError(f"router is built for {self.router.num_experts} experts; layer has {self.num_experts}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer expects x of shape [B, T, {self.d_model}] or [N, {self.d_model}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoELayer expects floating-point input, got {x.dtype}")

    @torch.no_grad()
    def metrics(self, decision: RoutingDecision, dtype_bytes: int) -> MoEMetrics:
        """Counts, entropies and the LayerWorkload of one decision (detached, on the host)."""
        counts = self._last_counts if decision is self.last_decision and self._last_counts is not None \
            else decision.tokens_per_expert()
        tokens_per_expert = counts.tolist()
        num_tokens = int(decision.probs.shape[0])
        entropy = routing_entropy(decision.probs.float()) if num_tokens else None
        workload = self.layer_workload(tokens_per_expert, dtype_bytes, decision.dropped_count())
        return MoEMetrics(
            tokens_per_expert=tokens_per_expert,
            routing_entropy=float(entropy.token) if entropy is not None else 0.0,
            dropped_tokens=workload.dropped_tokens,
            workload=workload,
            marginal_entropy=float(entropy.marginal) if entropy is not None else 0.0,
            num_tokens=num_tokens,
        )

    def layer_workload(self, tokens_per_expert: list[int], dtype_bytes: int, dropped_tokens: int = 0) -> LayerWorkload:
        """The LayerWorkload of routing `tokens_per_expert` [E] (token, slot) pairs through this layer."""
        return LayerWorkload(
            tokens_per_expert=list(tokens_per_expert),
            expert_costs=[expert.cost_per_token(dtype_bytes) for expert in self.experts],
            router_flops_per_token=2.0 * self.d_model * self.num_experts,
            dropped_tokens=dropped_tokens,
        )

    def dense_equivalent_flops(self) -> float:
        """FLOPs per token of the last forward (experts actually run + router): the width of the
        dense FFN with the same active compute is this divided by 4·D (GELU) or 6·D (SwiGLU)."""
        if self.last_metrics is None:
            raise ValueError("dense_equivalent_flops needs a forward pass first")
        work = self.last_metrics.workload
        tokens = max(self.last_metrics.num_tokens, 1)
        expert_flops = sum(n * cost.flops for n, cost in zip(work.tokens_per_expert, work.expert_costs))
        return expert_flops / tokens + work.router_flops_per_token


def route_and_dispatch(layer: MoELayer, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutingDecision]:
    """gate -> router -> dispatch: (y [N, D], per-expert counts [E] on the device, the decision)."""
    if layer.router_compile_options is not None:
        decision = RoutingDecision(*_compiled(layer.router_compile_options, _gate_and_route_tensors)(layer, x_ND))
    else:
        decision = layer.router(layer.gate(x_ND), x_ND)     # gate logits [N, E] -> decision
    if decision.num_experts != layer.num_experts:
        raise ValueError(f"router returned a decision over {decision.num_experts} experts; layer has {layer.num_experts}")
    y_ND, counts_E = dispatch_with_counts(x_ND, decision, layer.experts, grouped=layer.grouped)
    return y_ND, counts_E, decision


def _gate_and_route_tensors(layer: MoELayer, x_ND: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = layer.router(layer.gate(x_ND), x_ND)
    return d.experts, d.gates, d.mask, d.dropped, d.probs, d.logits


def _route_and_dispatch_tensors(layer: MoELayer, x_ND: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y_ND, counts_E, d = route_and_dispatch(layer, x_ND)
    return y_ND, counts_E, d.experts, d.gates, d.mask, d.dropped, d.probs, d.logits


_COMPILED: dict[str, object] = {}


def _compiled(options: dict, fn=_route_and_dispatch_tensors):
    """One torch.compile'd `fn` (route_and_dispatch, or gate → router) per set of options, shared by
    all layers."""
    key = fn.__name__ + repr(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]
