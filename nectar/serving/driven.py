"""A driven model: a trained small MoE's routing drives a random-weight model of a big shape.

On a GPU the trained small OLMoE-style model's decode step is latency-bound (its blocks' fixed
cost, not the experts' bytes), so routing cannot save energy there; a random-weight model of the
OLMoE-1B-7B shape pays per expert read, but its random gates route near-uniformly, unlike a
trained model. `DrivenModel` runs both on the same rows and positions, one after the other:

- the **small** model (an attached transformers MoE, `nectar.hf.attach`) is the one served: its
  MoE layers are `moe_layers()`, so the serving policy's routers, the controller's price and its
  shadow swaps all act on it, and the logits (NLL, greedy tokens: the quality) are its own;
- the **big** model (`build_driven`: random weights, `nectar.models.shapes`) then runs the same
  token ids; its MoE layer l routes exactly as the small model's layer l mod L_small did in this
  forward: the same expert indices, combine weights, chosen and dropped slots. Its own gate is
  computed and ignored. Its logits are computed and not used (the LM head's read is part of the step).

How routing flows, with no host read (a captured step replays it): each small MoE layer has a
`DecisionHolder` (`HFMoELayer.holder`); the gate hook hands it whatever decision the layer's router
in force made (any router: it follows swaps). Each big MoE layer's router is a `FollowerRouter`
returning its leader holder's decision, which the big layer's own gate hook realises for its
experts and records. So what the step records — per-expert counts, the workload the backend
prices, `step_bytes` — is the big model's (`recorded_layers`, `new_recorder`, `recording`,
`workload_from_counts`), equal to the leader's decisions mapped by layer.

The KV cache (`slot_cache`) is a `DrivenCache`: one `SlotCache` per model (the big one sized for
its layers and heads), written and read in step; read-only mode (the controller's shadow check)
holds for both. Time and energy measured over a step cover both forwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nectar.models.shapes import MoEShape
from nectar.moe.router import Router, RoutingDecision
from nectar.serving.engine import _cache_kwarg
from nectar.serving.slot_cache import CacheShape, SlotCache

DRIVEN_NOTE = ("energy and step time are those of a random-weight model of the {shape} shape ({layers} layers) "
               "driven by the trained model's routing (its MoE layer l routes as the trained model's layer "
               "l mod {small_layers} did), plus the trained model's own forward (quality: the trained model's)")


@dataclass
class DecisionHolder:
    """The last decision the router of small MoE layer `layer` made (whichever router is installed)."""

    layer: int
    decision: RoutingDecision | None = None

    def keep(self, decision: RoutingDecision) -> None:
        self.decision = decision


class FollowerRouter(Router):
    """A big MoE layer's router: its leader holder's decision, as it is (the gate's logits unused)."""

    def __init__(self, holder: DecisionHolder, num_experts: int, top_k: int):
        super().__init__(num_experts)
        self.holder, self.top_k = holder, top_k

    @property
    def max_slots(self) -> int:
        return self.top_k

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        decision = self.holder.decision
        if decision is None:
            raise RuntimeError(f"small MoE layer {self.holder.layer} made no decision in this forward: "
                               "a driven model's big layers run only inside DrivenModel.forward")
        return decision


@dataclass
class DrivenOutput:
    """The small model's logits [R, q, V_small] (what serving scores) and the big one's [R, q, V_big]."""

    logits: torch.Tensor
    big_logits: torch.Tensor


class DrivenCache:
    """A `SlotCache` per model, driven in step: `for_decode` / `for_prefill` set both and return the
    small model's (position ids, mask); the big one's are `big_inputs` (its mask in its dtype)."""

    def __init__(self, small: SlotCache, big: SlotCache):
        self.small, self.big = small, big
        self.big_inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return self.small.slots

    @property
    def max_tokens(self) -> int:
        return self.small.max_tokens

    @property
    def keys(self) -> list[torch.Tensor]:
        return [*self.small.keys, *self.big.keys]

    @property
    def values(self) -> list[torch.Tensor]:
        return [*self.small.values, *self.big.values]

    @property
    def read_only(self) -> bool:
        return self.small.read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self.small.read_only = self.big.read_only = value

    def for_decode(self, positions_R: torch.Tensor, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.big_inputs = self.big.for_decode(positions_R, visible)
        return self.small.for_decode(positions_R, visible)

    def for_prefill(self, slot: int, start: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.big_inputs = self.big.for_prefill(slot, start, n_tokens)
        return self.small.for_prefill(slot, start, n_tokens)

    def move(self, src: int, dst: int) -> None:
        self.small.move(src, dst)
        self.big.move(src, dst)


class DrivenModel(nn.Module):
    """The small model served, the big one driven by its routing (see the module docstring)."""

    def __init__(self, small, big, shape: str = ""):
        super().__init__()
        check_drivable(small, big)
        self.small, self.big, self.shape = small, big, shape
        self.holders = [DecisionHolder(i) for i in range(len(small.moe_layers()))]
        for (_, layer), holder in zip(small.moe_layers(), self.holders):
            layer.holder = holder
        for i, (_, layer) in enumerate(big.moe_layers()):
            layer.router = FollowerRouter(self.holders[i % len(self.holders)], layer.num_experts, layer.top_k)
        self._small_kw, self._big_kw = _cache_kwarg(small), _cache_kwarg(big)

    # ----- the forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                cache: DrivenCache | None = None) -> DrivenOutput:
        """The small model's forward, then the big one's on the same ids and positions (through
        their own caches when `cache` is a `DrivenCache`; without one, `attention_mask` serves both)."""
        big_positions, big_mask = position_ids, attention_mask
        if cache is not None:
            big_positions, big_mask = cache.big_inputs
        for (_, layer), holder in zip(self.small.moe_layers(), self.holders):
            holder.decision = None                       # a follower never reads an earlier forward's decision
            layer.holder = holder
        common = dict(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)
        small = self.small(position_ids=position_ids, attention_mask=attention_mask, **common,
                           **({} if cache is None else {self._small_kw: cache.small}))
        big = self.big(position_ids=big_positions, attention_mask=big_mask, **common,
                       **({} if cache is None else {self._big_kw: cache.big}))
        return DrivenOutput(small.logits, big.logits)

    def slot_cache(self, slots: int, max_tokens: int) -> DrivenCache:
        """The serving cache of both models (`nectar.serving.engine.ServingEngine` asks for it)."""
        def one(model) -> SlotCache:
            param = next(model.parameters())
            return SlotCache(CacheShape.of(model.config), slots, max_tokens, param.dtype, param.device)
        return DrivenCache(one(self.small), one(self.big))

    # ----- what serving asks of a model: the small one's routing, the big one's records ------------
    def moe_layers(self) -> list:
        """The served (small) model's MoE layers: where policies install routers."""
        return self.small.moe_layers()

    def recorded_layers(self) -> list:
        """The MoE layers a step records (the big model's: what the GPU reads)."""
        return self.big.moe_layers()

    def new_recorder(self, **options):
        return self.big.new_recorder(**options)

    @contextmanager
    def recording(self, recorder):
        with self.big.recording(recorder):
            yield recorder

    def workload_from_counts(self, counts, batch: int, seq_len: int, policy: str = "", dropped=None):
        return self.big.workload_from_counts(counts, batch, seq_len, policy, dropped)

    @property
    def config(self):
        return self.small.config

    @property
    def dtype(self) -> torch.dtype:
        return self.small.dtype

    @property
    def max_positions(self) -> int:
        return min(self.small.max_positions, self.big.max_positions)

    @property
    def top_k(self) -> int:
        return self.small.top_k

    @property
    def reference_policy(self) -> str:
        return self.small.reference_policy

    def drive_info(self) -> dict:
        """What a report records about the driven run (frontier.json's `driven_by`)."""
        big, small = self.big.config, self.small.config
        return {"shape": self.shape, "weights": "random", "layers": int(big.num_hidden_layers),
                "hidden": int(big.hidden_size), "heads": int(big.num_attention_heads),
                "experts": int(big.num_experts), "expert_hidden": int(big.intermediate_size),
                "top_k": int(big.num_experts_per_tok), "vocab": int(big.vocab_size), "dtype": str(self.big.dtype),
                "routing_from": {"layers": len(self.holders), "hidden": int(small.hidden_size),
                                 "rule": "big MoE layer l routes as the trained model's layer l mod its layers"},
                "note": DRIVEN_NOTE.format(shape=self.shape or "big", layers=int(big.num_hidden_layers),
                                           small_layers=len(self.holders))}


def first_moe_layer(small):
    """The trained model's first MoE layer; ValueError unless it is an attached transformers MoE."""
    if not hasattr(small, "hf") or not small.moe_layers():
        raise ValueError("a driven model needs a trained transformers MoE model (nectar.hf.train_small), "
                         f"got {type(small).__name__}")
    return small.moe_layers()[0][1]


def check_drivable(small, big) -> None:
    """ValueError unless `big`'s MoE layers can replay `small`'s decisions expert for expert."""
    first = first_moe_layer(small)
    for _, layer in big.moe_layers():
        if layer.num_experts != first.num_experts:
            raise ValueError(f"the driven shape has {layer.num_experts} experts per layer, the trained model "
                             f"{first.num_experts}: routing is replayed expert for expert, so they must match")
        if layer.top_k != first.top_k:
            raise ValueError(f"the driven shape routes top-{layer.top_k}, the trained model top-{first.top_k}: "
                             "they must match")
    if int(big.config.vocab_size) < int(small.config.vocab_size):
        raise ValueError(f"the driven shape's vocabulary ({big.config.vocab_size}) is smaller than the trained "
                         f"model's ({small.config.vocab_size}): it must read the same token ids")


def build_driven(small, shape: MoEShape, layers: int | None = None, dtype: torch.dtype | None = None,
                 seed: int = 0) -> DrivenModel:
    """`small` (an attached transformers MoE, placed) driving a random-weight model of `shape`
    (`layers` blocks instead of the shape's own when given), built on small's device in `dtype`
    (default small's) with small's experts implementation."""
    from transformers import OlmoeForCausalLM

    from nectar.hf.attach import attach
    from nectar.hf.drop import experts_implementation

    first = first_moe_layer(small)
    if (shape.experts, shape.top_k) != (first.num_experts, first.top_k):
        raise ValueError(f"the {shape.name} shape has {shape.experts} experts, top-{shape.top_k}; the trained model "
                         f"{first.num_experts}, top-{first.top_k}: routing is replayed expert for expert, so they "
                         "must match")
    config = shape.with_layers(layers).olmoe_config(eos_token_id=None)     # it never generates
    config.output_router_logits = False                      # inference: no auxiliary loss in the forward
    param = next(small.parameters())
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):             # the caller's random state stays as it was
        torch.manual_seed(seed)
        with torch.device(param.device):
            hf = OlmoeForCausalLM._from_config(config, dtype=dtype or param.dtype).eval()
    hf.set_experts_implementation(experts_implementation(first.experts_module))
    return DrivenModel(small, attach(hf), shape.name)
