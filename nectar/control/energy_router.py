"""NECTAR's test-time router: the trained gate's logits plus α times an adapted dynamic part.

Scores are logits/τ + b + α·f(x): a per-expert bias b (the convex chunk problem's solution) and,
optionally, a fast-weight network f of the token (`nectar.control.fast_router`) mixed in with a
learned coefficient α. Safeguards:

- the static top-1 expert (argmax of the trained logits) always takes the first slot;
- the remaining 1–2 slots go to the best experts by the *adapted* scores, which the energy bias
  steers towards cheap experts (narrow, zero-compute). Which experts may take them is set by
  `candidates`: "static-or-cheap" (default) — the static router's own choices or the best cheap
  experts by the trained logits, i.e. exactly the two kinds of routing the model was fine-tuned
  with (`MixedTrainingRouter`), so adaptation decides per token *whether* to go cheap and never
  leaves the trained distribution; "all" — any expert; "cheap" — cheap experts only;
- combine gates come from the unbiased static probabilities, renormalised over the chosen slots
  (the bias steers selection only, as in auxiliary-loss-free balancing);
- with `drop`, a token may also skip its remaining slot and use its static top-1 expert alone: it
  does when −log(1 − w) < d[e], w the chosen expert's share of the two static gates and d[e] the
  drop scale of that expert (c_e / λ from the controller: the per-token minimiser of cost + λ ×
  the KL of the dropped gate mass); d = 0 never drops;
- in fallback the router is the static top-k router (the quality guard decides).

What adapts — bias, α and fallback — is one `Adaptation` record, read with `adaptation()` and
written with `adapt(...)`; nothing else of the router changes from outside. The controller reaches
it through the priced interface (`nectar.control.priced`): a price table per chunk, its deviation,
a step at a price (`nectar.control.energy_pricing`). The soft routing
distribution p_t = softmax(logits_t/τ + α·b) is the one the convex chunk problem is about
(docs/design.md); `soft_distribution` exposes it for the chunk loss and the cvxpy check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nectar.control.energy_pricing import (Candidates, bias_step, energy_price_table, new_optimizer, priced_adaptation,
                                           routing_stats)
from nectar.control.fast_router import FastWeightRouterNet
from nectar.control.priced import PriceStep, PriceTable, StepConfig
from nectar.control.routing_proxy import dropped_mass_kl
from nectar.moe import fused_router
from nectar.moe.router import Router, RoutingDecision, gate_probs, probs_decision
from nectar.moe.static_routers import check_cheap

CANDIDATES = ("static-or-cheap", "all", "cheap")


@dataclass
class Adaptation:
    """The adaptable state of one EnergyAwareRouter.

    bias        [E] per-expert score bias (the convex chunk problem's parametrisation)
    alpha       mixing coefficient of the fast-weight network's token-dependent part, in [0, 1]
    fallback    True: route as the static top-k router
    drop_scale  [E] per-expert drop scale d (zeros: never drop the remaining slot)
    """

    bias: torch.Tensor
    alpha: float = 1.0
    fallback: bool = False
    drop_scale: torch.Tensor | None = None


class EnergyAwareRouter(Router):
    """logits [N, E] (+ gate inputs [N, D] for the fast net) -> decision with NECTAR's safeguards."""

    START_PRICE = 0.3   # the controller's start price for this router (see quality_guard)

    def __init__(
        self,
        num_experts: int,
        cheap_experts: list[int],
        extra_slots: int = 1,
        temperature: float = 1.0,
        candidates: str = "static-or-cheap",
        fallback_k: int = 2,
        fast_net: FastWeightRouterNet | None = None,
        drop: bool = False,
    ):
        super().__init__(num_experts, temperature)
        check_cheap(cheap_experts, num_experts, extra_slots)
        if candidates not in CANDIDATES:
            raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
        if not 1 <= fallback_k <= num_experts:
            raise ValueError(f"fallback_k must be in [1, {num_experts}], got {fallback_k}")
        self.cheap_experts = list(cheap_experts)
        self.extra_slots = extra_slots
        self.candidates = candidates
        cheap_mask = torch.full((num_experts,), float("-inf"))
        cheap_mask[cheap_experts] = 0.0
        self.register_buffer("cheap_mask", cheap_mask, persistent=False)       # [E]
        self.fallback_k = fallback_k
        self.fast_net = fast_net
        self.register_buffer("bias", torch.zeros(num_experts), persistent=False)  # [E]
        self.register_buffer("drop_scale", torch.zeros(num_experts), persistent=False)  # [E]
        self.drop = drop
        self.alpha = 1.0
        self.fallback = False
        self._step_config = StepConfig()
        self._optimizer = None                 # the bias optimiser of the current controller
        self._seen: Candidates | None = None   # the last sample's candidates

    @property
    def max_slots(self) -> int:
        return max(1 + self.extra_slots, self.fallback_k)

    # ---- adaptation state -----------------------------------------------------------------------

    def adaptation(self) -> Adaptation:
        """A copy of the current adaptable state."""
        return Adaptation(self.bias.detach().clone(), self.alpha, self.fallback, self.drop_scale.detach().clone())

    def adapt(self, bias: torch.Tensor | None = None, alpha: float | None = None, fallback: bool | None = None,
              drop_scale: torch.Tensor | None = None) -> None:
        """Set any of bias [E], α, fallback and drop_scale [E] (the only way the controller changes
        the router)."""
        if bias is not None:
            self.bias = self._vector(bias, "bias")
        if drop_scale is not None:
            if not self.drop:
                raise ValueError("this router was built without drop=True; it never drops a slot")
            scale = self._vector(drop_scale, "drop_scale")
            if bool((scale < 0).any()):
                raise ValueError("drop_scale must be >= 0")
            self.drop_scale = scale
        if alpha is not None:
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {alpha}")
            self.alpha = float(alpha)
        if fallback is not None:
            self.fallback = bool(fallback)

    def _vector(self, value, name: str) -> torch.Tensor:
        value = torch.as_tensor(value)
        if value.shape != self.bias.shape:
            raise ValueError(f"{name} must have shape {list(self.bias.shape)}, got {list(value.shape)}")
        return value.to(device=self.bias.device, dtype=torch.float32)

    # ---- the priced interface (nectar.control.priced) ------------------------------------------

    def configure_pricing(self, config: StepConfig) -> None:
        """A new controller's step settings; the bias optimiser's state starts anew."""
        self._step_config = config
        self._optimizer = None
        self._seen = None

    def chunk_candidates(self, logits: torch.Tensor) -> Candidates:
        """The chunk problem's view of a sample of gate logits [n, E], built once per sample."""
        if self._seen is None or self._seen.source is not logits:
            self._seen = Candidates.of(self, logits)
            self._seen.source = logits
        return self._seen

    def price_table(self, logits: torch.Tensor, cost: torch.Tensor, lams: torch.Tensor) -> PriceTable:
        """Mean cost and deviation at every price of `lams` [G] on gate logits [n, E]."""
        opt = self._optimizer
        return energy_price_table(self, self.chunk_candidates(logits), cost, lams, None if opt is None else opt.mu,
                                  0.0 if opt is None else opt.nu)

    def deviation(self, logits: torch.Tensor) -> float:
        """Mean KL to static routing of the routing in force on gate logits [n, E] (0 in fallback):
        `routing_proxy.deviation_kl`, on the shared candidates."""
        if self.fallback:
            return 0.0
        scale = self.drop_scale[:, None].cpu() if self.drop else None
        bias = self.bias[:, None].double().cpu()
        return float(routing_stats(self, self.chunk_candidates(logits), torch.zeros(self.num_experts, dtype=torch.float64),
                                   bias, scale)[1][0])

    def adapt_at_price(self, step: PriceStep) -> dict:
        """The chunk's bias step at step.lam (and the fast network's); the instance it solved."""
        if self._optimizer is None:
            self._optimizer = new_optimizer(self, self._step_config, step.lam)
        return bias_step(self, self._optimizer, self._step_config, step, self.chunk_candidates(step.logits))

    def start_at_price(self, cost: torch.Tensor, lam: float) -> None:
        """Route where the chunk problem puts costs [E] at price λ (bias −c/λ, drop scale c/λ)."""
        self.adapt(**priced_adaptation(self, cost, lam))

    def state_vector(self) -> list[float]:
        return self.bias.tolist()

    # ---- routing --------------------------------------------------------------------------------

    def dynamic_scores(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """[N, E] the dynamic part: per-expert bias plus α times the fast-weight network's output."""
        dyn = self.bias.to(logits.device, logits.dtype).expand_as(logits)      # [N, E]
        if self.fast_net is not None and inputs is not None:
            dyn = dyn + self.alpha * self.fast_net(inputs.float()).to(logits.dtype)
        return dyn

    def soft_distribution(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """[N, E] p = softmax(logits/τ + dynamic): the routing distribution of the chunk problem."""
        return torch.softmax(logits / self.temperature + self.dynamic_scores(logits, inputs), dim=-1)

    def second_slot_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, E] 0 where an expert may take the second slot (a candidate, not the static top-1), -inf elsewhere."""
        top1_N1 = logits.argmax(-1, keepdim=True)                                 # [N, 1]
        return self._allowed(logits).scatter(-1, top1_N1, float("-inf"))

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        """One fp32 softmax and one static top-k serve the gates, the drop rule, the forced top-1
        and the static candidates; nothing waits for the host."""
        fused = self._fused_decision(logits, inputs)                             # one kernel on a GPU
        if fused is not None:
            return fused
        probs_NE = gate_probs(logits.float(), self.temperature)                  # [N, E] fp32
        if self.fallback:
            experts = logits.topk(self.fallback_k, dim=-1).indices             # [N, k]
            return probs_decision(logits, probs_NE.to(logits.dtype), experts)
        static_Nk = logits.topk(1 + self.extra_slots, dim=-1).indices           # [N, 1 + extra] static choice
        top1_N1 = static_Nk[:, :1]
        scores = logits / self.temperature + self.dynamic_scores(logits, inputs) + self._allowed(logits, static_Nk)
        rest = scores.scatter(-1, top1_N1, float("-inf")).topk(self.extra_slots, dim=-1).indices
        experts = torch.cat([top1_N1, rest], dim=-1)                              # [N, 1 + extra]
        return probs_decision(logits, probs_NE.to(logits.dtype), experts, self.kept_slots(probs_NE, experts))

    def _fused_decision(self, logits: torch.Tensor, inputs: torch.Tensor | None) -> RoutingDecision | None:
        """The decision from `nectar.moe.fused_router` where it applies (fallback: static top-k;
        else static-or-cheap with one extra slot and no token-dependent part), None elsewhere."""
        if not fused_router.fusable(logits, self.temperature):
            return None
        if self.fallback:
            return (fused_router.topk_decision(logits, self.fallback_k, None, renormalize=True)
                    if self.fallback_k <= fused_router.MAX_K else None)
        if self.candidates != "static-or-cheap" or self.extra_slots != 1 or (self.fast_net is not None and inputs is not None):
            return None
        return fused_router.energy_decision(logits, self.bias, self.cheap_mask, self.drop_scale if self.drop else None)

    def kept_slots(self, probs_NE: torch.Tensor, experts: torch.Tensor) -> torch.Tensor | None:
        """[N, K] bool: the slots a token uses (None: all, for a router without `drop`); with
        `drop`, slot 2 goes where −log(1 − w) < d[expert], w its share of the two static gates
        (probs_NE [N, E] the fp32 static softmax; computed whatever d is — d = 0 keeps every slot —
        so that no decision waits for the host)."""
        if not self.drop:
            return None
        cost_N = dropped_mass_kl(probs_NE, experts)
        mask = torch.ones_like(experts, dtype=torch.bool)
        mask[:, 1] = cost_N >= self.drop_scale.to(cost_N.device)[experts[:, 1]]
        return mask

    def _allowed(self, logits: torch.Tensor, static: torch.Tensor | None = None) -> torch.Tensor:
        """[N, E] 0 where an expert may take a remaining slot, -inf elsewhere (`static` [N, 1 + extra]:
        the static top-k indices, when the caller has them)."""
        cheap = self.cheap_mask.to(logits.device, logits.dtype).expand_as(logits)   # [N, E]
        if self.candidates == "all":
            return torch.zeros_like(logits)
        if self.candidates == "cheap":
            return cheap
        if static is None:
            static = logits.topk(1 + self.extra_slots, dim=-1).indices           # [N, 1 + extra]
        not_top1 = torch.zeros_like(logits).scatter(-1, static[:, :1], float("-inf"))  # [N, E]
        best_cheap = (logits + cheap + not_top1).topk(self.extra_slots, dim=-1).indices  # [N, extra]
        allowed = torch.full_like(logits, float("-inf"))
        allowed.scatter_(-1, torch.cat([static, best_cheap], dim=-1), 0.0)
        return allowed

