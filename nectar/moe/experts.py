"""Experts of a Mixture-of-Experts feed-forward layer, and a builder for heterogeneous pools.

Every expert maps a flat batch of tokens `[N, D] -> [N, D]` and reports what one token costs
(`cost_per_token() -> ExpertCost`), which is what the simulator prices and the energy cost model
attributes energy to. Kinds:

- `GELUExpert`   GPT-2's MLP (Conv1D c_fc [D→H], gelu_new, Conv1D c_proj [H→D]); a GPT-2 MLP
                 state_dict loads into it as is (sparse upcycling).
- `SwiGLUExpert` down(silu(gate(x)) ⊙ up(x)), no biases (LLaMA / LaCT layout).
- `ZeroExpert`, `CopyExpert`, `ConstantExpert`: MoE++'s zero-computation experts,
  E(x) = 0, E(x) = x, E(x) = α_a·x + α_b·v with [α_a, α_b] = softmax(W_c x).

FLOPs count the matrix multiplications only (2 FLOPs per multiply-add); bytes count the
activations one token moves in an unfused eager implementation (input read, output written, each
hidden tensor written once and read once), in `dtype_bytes` per element. Weights are reported
separately in `weight_bytes` because they are amortised over all tokens of a chunk.

These modules are the standalone form of an expert (and what `build_experts` returns). Inside a
`MoELayer` the experts live in an `ExpertPool` (`nectar.moe.expert_pool`): identical experts are
stacked into 3-D parameters, and `layer.experts[i]` is a view of expert i with the same cost and
forward as the standalone module.

`EXPERT_KINDS` maps a kind name to its builder so that other modules (e.g. a LaCT fast-weight
expert) can add kinds with `register_expert_kind` without editing this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from nectar.telemetry.workload import ExpertCost


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


_check_positive_int = check_positive_int


def _element_bytes(expert: "Expert", dtype_bytes: int | None) -> int:
    """Bytes per element: the caller's choice, else the weights' dtype, else the default dtype."""
    if dtype_bytes is not None:
        return _check_positive_int("dtype_bytes", dtype_bytes)
    size = expert.weight_element_size()
    return size if size is not None else torch.empty((), dtype=torch.get_default_dtype()).element_size()


class Expert(nn.Module):
    """Base class: `forward(x [N, D]) -> [N, D]` and `cost_per_token() -> ExpertCost`."""

    kind: str = "ffn"

    def __init__(self, d_model: int):
        super().__init__()
        self._d_model = _check_positive_int("d_model", d_model)

    @property
    def d_model(self) -> int:
        return self._d_model

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self._d_model:
            raise ValueError(f"{type(self).__name__} expects x of shape [N, {self._d_model}], got {list(x.shape)}")

    def storage(self) -> list[torch.Tensor]:
        """The tensors holding this expert's weights (its parameters; slices of a stacked group
        for the views of `nectar.moe.expert_pool`)."""
        return list(self.parameters())

    def weight_numel(self) -> int:
        return sum(t.numel() for t in self.storage())

    def weight_element_size(self) -> int | None:
        """Bytes per weight element (None for an expert without weights)."""
        for tensor in self.storage():
            return tensor.element_size()
        return None

    def flops_per_token(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def activation_elements_per_token(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost_per_token(self, dtype_bytes: int | None = None) -> ExpertCost:
        """Forward FLOPs and activation bytes of one token; weights in `weight_bytes`."""
        elem = _element_bytes(self, dtype_bytes)
        return ExpertCost(
            flops=float(self.flops_per_token()),
            bytes=float(self.activation_elements_per_token() * elem),
            weight_bytes=float(self.weight_numel() * elem),
            kind=self.kind,
        )


class GELUExpert(Expert):
    """GPT-2's MLP: c_proj(gelu_new(c_fc(x))) with Conv1D layers (weights stored [in, out])."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu_new"):
        super().__init__(d_model)
        self.hidden = _check_positive_int("hidden", hidden)
        if activation not in ACT2FN:
            raise ValueError(f"unknown activation {activation!r}; transformers knows {sorted(ACT2FN)}")
        self.activation = activation
        self.c_fc = Conv1D(hidden, d_model)    # weight [D, H], bias [H]
        self.c_proj = Conv1D(d_model, hidden)  # weight [H, D], bias [D]
        # gelu_new is the tanh approximation of GELU; torch's fused kernel computes the same
        # function several times faster on CPU than transformers' element-wise formula.
        self.act = ACT2FN["gelu_pytorch_tanh" if activation == "gelu_new" else activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.c_proj(self.act(self.c_fc(x)))  # [N, D]

    def flops_per_token(self) -> float:
        return 2 * 2 * self.d_model * self.hidden

    def activation_elements_per_token(self) -> float:
        # x read, y written; pre-activation and activation [H] each written once, read once.
        return 2 * self.d_model + 4 * self.hidden


class SwiGLUExpert(Expert):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), bias-free nn.Linear layers."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__(d_model)
        self.hidden = _check_positive_int("hidden", hidden)
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)  # weight [H, D]
        self.up_proj = nn.Linear(d_model, hidden, bias=False)    # weight [H, D]
        self.down_proj = nn.Linear(hidden, d_model, bias=False)  # weight [D, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        hidden_NH = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)  # [N, H]
        return self.down_proj(hidden_NH)  # [N, D]

    def flops_per_token(self) -> float:
        return 2 * 3 * self.d_model * self.hidden

    def activation_elements_per_token(self) -> float:
        # x read, y written; gate, up and their product [H] each written once, read once.
        return 2 * self.d_model + 6 * self.hidden


class ZeroExpert(Expert):
    """E(x) = 0: a token routed here skips the FFN (MoE++ / AdaMoE null expert)."""

    kind = "zero"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return torch.zeros_like(x)

    def flops_per_token(self) -> float:
        return 0.0

    def activation_elements_per_token(self) -> float:
        return 0.0


class CopyExpert(Expert):
    """E(x) = x: the identity expert (MoE++ copy expert, LongCat identity expert)."""

    kind = "copy"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return x

    def flops_per_token(self) -> float:
        return 0.0

    def activation_elements_per_token(self) -> float:
        return 2 * self.d_model  # read x, write the gated copy


class ConstantExpert(Expert):
    """E(x) = α_a·x + α_b·v with a learned vector v [D] and [α_a, α_b] = softmax(W_c x) (MoE++)."""

    kind = "constant"

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.constant = nn.Parameter(torch.randn(d_model) * 0.02)  # v [D]
        self.mixer = nn.Linear(d_model, 2, bias=False)              # W_c [2, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        alpha_N2 = torch.softmax(self.mixer(x), dim=-1)  # [N, 2]
        return alpha_N2[:, :1] * x + alpha_N2[:, 1:] * self.constant  # [N, D]

    def flops_per_token(self) -> float:
        return 2 * 2 * self.d_model  # the 2-way mixer matmul

    def activation_elements_per_token(self) -> float:
        return 2 * self.d_model


@dataclass(frozen=True)
class ExpertKind:
    """How to build one kind of expert: `build(d_model, hidden)`; `needs_hidden` says whether
    an `ExpertSpec` of this kind must give a hidden width (and must not otherwise)."""

    build: Callable[[int, int | None], Expert]
    needs_hidden: bool


EXPERT_KINDS: dict[str, ExpertKind] = {
    "swiglu": ExpertKind(lambda d, h: SwiGLUExpert(d, h), needs_hidden=True),
    "gelu": ExpertKind(lambda d, h: GELUExpert(d, h), needs_hidden=True),
    "zero": ExpertKind(lambda d, h: ZeroExpert(d), needs_hidden=False),
    "copy": ExpertKind(lambda d, h: CopyExpert(d), needs_hidden=False),
    "constant": ExpertKind(lambda d, h: ConstantExpert(d), needs_hidden=False),
}


def register_expert_kind(name: str, build: Callable[[int, int | None], Expert], needs_hidden: bool = True) -> None:
    """Add (or replace) an expert kind usable in `ExpertSpec(kind=name, ...)`."""
    if not name or not isinstance(name, str):
        raise ValueError(f"expert kind name must be a non-empty str, got {name!r}")
    EXPERT_KINDS[name] = ExpertKind(build, needs_hidden)


@dataclass
class ExpertSpec:
    """`count` experts of one `kind` (see `EXPERT_KINDS`), `hidden` wide for FFN kinds."""

    kind: str
    hidden: int | None = None
    count: int = 1

    def validate(self) -> ExpertKind:
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"unknown expert kind {self.kind!r}; choose one of {sorted(EXPERT_KINDS)}")
        kind = EXPERT_KINDS[self.kind]
        _check_positive_int(f"ExpertSpec({self.kind!r}).count", self.count)
        if kind.needs_hidden:
            _check_positive_int(f"ExpertSpec({self.kind!r}).hidden", self.hidden)
        elif self.hidden is not None:
            raise ValueError(f"expert kind {self.kind!r} has no hidden width; leave hidden=None (got {self.hidden!r})")
        return kind


def build_experts(specs: list[ExpertSpec], d_model: int) -> nn.ModuleList:
    """One pool of experts in spec order, e.g. [gelu×6 @3072, gelu×2 @768, zero, copy]."""
    _check_positive_int("d_model", d_model)
    if not specs:
        raise ValueError("build_experts needs at least one ExpertSpec")
    experts = []
    for spec in specs:
        if not isinstance(spec, ExpertSpec):
            raise ValueError(f"expected ExpertSpec, got {type(spec).__name__}: {spec!r}")
        kind = spec.validate()
        experts.extend(kind.build(d_model, spec.hidden) for _ in range(spec.count))
    return nn.ModuleList(experts)
