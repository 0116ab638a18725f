"""Each supported transformers MoE family's own expert selection and gate formula, and detection.

In transformers v5 (5.17 and 5.24 alike) every supported family builds its sparse block as
`<decoder layer>.mlp` with a `gate` (the router; `gate(x)` returns `(router_logits [N, E],
top_k_weights [N, K], top_k_index [N, K])`) and `experts` (3-D SwiGLU weights `gate_up_proj
[E, 2H, D]`, `down_proj [E, D, H]`, run as `experts(x [N, D], top_k_index, top_k_weights)`).

A `FamilyRouting` re-implements one family's router as a function of its logits, split in two so
that a NECTAR router can keep fewer slots and still weigh them the family's way:

- `select(logits)`: the family's own top-K choice, in the family's slot order, with the raw gate
  values (`scores`: softmax probabilities or sigmoid scores at the chosen experts, fp32);
- `gates(scores, mask, dtype)`: the family's gate formula over the kept slots (gate 0 elsewhere).
  With every slot kept, `gates(select(l).scores, all, l.dtype)` equals the family's own
  `top_k_weights` bit for bit (tests/hf/test_families.py checks it for every family and dtype).

Families (read from `models/<family>/modeling_<family>.py`):
- Mixtral: softmax of the logits in fp32 over all E, top-K, always renormalised, fp32 gates.
- Qwen2-MoE, Qwen3-MoE, OLMoE: fp32 softmax, top-K, renormalised iff `norm_topk_prob`, gates
  cast back to the logits' dtype. (Qwen2-MoE also has an always-on gated shared expert.)
- DeepSeek-V3: fp32 logits, sigmoid scores; selection on scores + `e_score_correction_bias`
  restricted to the `topk_group` best of `n_group` groups (group score = sum of its top-2); gates
  are the *unbiased* scores, renormalised (+1e-20) iff `norm_topk_prob`, times
  `routed_scaling_factor`. (It also has always-on shared experts.)
The family is recognised by the router's class name, identical in both transformers versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


@dataclass
class TopKSelection:
    """The family's own top-K choice for N tokens.

    experts  [N, K] long   chosen experts, in the family's slot order
    scores   [N, K] float  raw gate values at the chosen experts (fp32)
    probs    [N, E] float  the family's routing distribution (DeepSeek: sigmoid scores / their sum)
    """

    experts: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor

    def weights(self) -> torch.Tensor:
        """[N, K] the raw scores renormalised over the K chosen slots (sum 1 per token)."""
        return self.scores / self.scores.sum(-1, keepdim=True).clamp_min(torch.finfo(self.scores.dtype).tiny)


class FamilyRouting:
    """One family's router maths over a live gate module (its attributes are read at call time)."""

    name = ""
    score_fn = "softmax"

    def __init__(self, gate: nn.Module):
        self.gate = gate

    @property
    def top_k(self) -> int:
        return int(self.gate.top_k)

    @property
    def num_experts(self) -> int:
        return int(self.gate.weight.shape[0])

    @property
    def renormalizes(self) -> bool:
        return bool(self.gate.norm_topk_prob)

    def select(self, logits: torch.Tensor) -> TopKSelection:  # pragma: no cover - abstract
        raise NotImplementedError

    def gates(self, scores: torch.Tensor, mask: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [N, K], gates [N, K]): exactly the family's own (top_k_index, top_k_weights)."""
        sel = self.select(logits)
        return sel.experts, self.gates(sel.scores, torch.ones_like(sel.experts, dtype=torch.bool), logits.dtype)


class MixtralRouting(FamilyRouting):
    name = "mixtral"

    @property
    def renormalizes(self) -> bool:
        return True

    def select(self, logits: torch.Tensor) -> TopKSelection:
        probs_NE = F.softmax(logits.float(), dim=-1)
        scores_NK, experts_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        return TopKSelection(experts_NK, scores_NK, probs_NE)

    def gates(self, scores: torch.Tensor, mask: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:
        kept_NK = scores.masked_fill(~mask, 0.0)
        return kept_NK / kept_NK.sum(dim=-1, keepdim=True)  # fp32, as Mixtral hands them to the experts


class SoftmaxTopKRouting(FamilyRouting):
    """Qwen2-MoE, Qwen3-MoE and OLMoE share this router."""

    def __init__(self, gate: nn.Module, name: str):
        super().__init__(gate)
        self.name = name

    def select(self, logits: torch.Tensor) -> TopKSelection:
        probs_NE = F.softmax(logits, dtype=torch.float, dim=-1)
        scores_NK, experts_NK = torch.topk(probs_NE, self.top_k, dim=-1)
        return TopKSelection(experts_NK, scores_NK, probs_NE)

    def gates(self, scores: torch.Tensor, mask: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:
        kept_NK = scores.masked_fill(~mask, 0.0)
        if self.renormalizes:
            kept_NK = kept_NK / kept_NK.sum(dim=-1, keepdim=True)
        return kept_NK.to(logits_dtype)


class DeepseekV3Routing(FamilyRouting):
    name = "deepseek_v3"
    score_fn = "sigmoid"

    def select(self, logits: torch.Tensor) -> TopKSelection:
        gate = self.gate
        num_experts, num_group = self.num_experts, int(gate.num_group)
        scores_NE = logits.float().sigmoid()
        choice_NE = scores_NE + gate.e_score_correction_bias.to(scores_NE.device)
        group_NG = choice_NE.view(-1, num_group, num_experts // num_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_NG, k=int(gate.topk_group), dim=-1, sorted=False)[1]
        group_mask_NG = torch.zeros_like(group_NG)
        group_mask_NG.scatter_(1, group_idx, 1)
        score_mask_NE = (group_mask_NG.unsqueeze(-1).expand(-1, num_group, num_experts // num_group)
                         .reshape(-1, num_experts))
        choice_NE = choice_NE.masked_fill(~score_mask_NE.bool(), float("-inf"))
        experts_NK = torch.topk(choice_NE, k=self.top_k, dim=-1, sorted=False)[1]
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_NE.dtype).tiny)
        return TopKSelection(experts_NK, scores_NE.gather(1, experts_NK), probs_NE)

    def gates(self, scores: torch.Tensor, mask: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:
        kept_NK = scores.masked_fill(~mask, 0.0)
        if self.renormalizes:
            kept_NK = kept_NK / (kept_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return kept_NK * self.gate.routed_scaling_factor


ROUTER_CLASSES = {
    "MixtralTopKRouter": MixtralRouting,
    "Qwen2MoeTopKRouter": lambda gate: SoftmaxTopKRouting(gate, "qwen2_moe"),
    "Qwen3MoeTopKRouter": lambda gate: SoftmaxTopKRouting(gate, "qwen3_moe"),
    "OlmoeTopKRouter": lambda gate: SoftmaxTopKRouting(gate, "olmoe"),
    "DeepseekV3TopkRouter": DeepseekV3Routing,
}


def family_of(gate: nn.Module) -> FamilyRouting:
    """The FamilyRouting of a gate module; ValueError for a router class NECTAR does not know."""
    build = ROUTER_CLASSES.get(type(gate).__name__)
    if build is None:
        raise ValueError(f"unsupported MoE router {type(gate).__name__}; supported families: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return build(gate)


def is_moe_block(module: nn.Module) -> bool:
    """A transformers-v5 sparse block: a `gate` with `top_k` and 3-D `experts`."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and hasattr(gate, "top_k")
            and hasattr(experts, "num_experts") and hasattr(experts, "gate_up_proj"))


@dataclass
class FoundBlock:
    block_index: int     # decoder-layer index
    name: str            # module path, e.g. "model.layers.3.mlp"
    block: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def find_moe_blocks(model: nn.Module) -> list[FoundBlock]:
    """Every sparse block of `model`, in forward order."""
    found = []
    for name, module in model.named_modules():
        if is_moe_block(module):
            match = re.search(r"layers\.(\d+)\.", name + ".")
            if match is None:
                raise ValueError(f"MoE block {name!r} is not inside a numbered decoder layer")
            found.append(FoundBlock(int(match.group(1)), name, module))
    return found
