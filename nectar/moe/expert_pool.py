"""A layer's experts stored as groups of identical experts with stacked (3-D) parameters.

`ExpertPool` is what `MoELayer.experts` holds. Consecutive experts of the same kind and shape form
one group whose weights are single tensors with a leading expert axis, so that all experts of a
group run in one grouped matrix multiplication (`nectar.moe.dispatch`):

- `GELUGroup`    GPT-2 MLPs: c_fc [G, D, H], c_fc_bias [G, H], c_proj [G, H, D], c_proj_bias [G, D]
- `SwiGLUGroup`  fused gate|up [G, D, 2H] (gate in columns :H, up in H:), down [G, H, D]
- `ZeroGroup`, `CopyGroup`  no weights, no matmul (E(x) = 0, E(x) = x)
- `ConstantGroup` constant [G, D], mixer [G, 2, D] (MoE++ constant experts: a 2-way mixer, no GEMM)
- `ModuleGroup`  one expert of any other kind (e.g. LaCT), kept as its own module

Indexing the pool (`pool[i]`, `for expert in pool`, `len(pool)`) gives one `Expert` per expert,
in expert order. For stacked groups these are views (`StackedGELUExpert`, ...) whose weights are
slices of the group's parameters, read at each access: they report `cost_per_token()` exactly as
a standalone expert of the same shape does, run the per-token reference (`expert(x)`), and writing
into `view.c_fc.weight` writes into the stack.

State dicts: keys are `groups.<g>.<name>`. Checkpoints written before the stacked layout (one
module per expert: `experts.<i>.c_fc.weight`, ...) are stacked on load by a pre-hook.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from nectar.moe.experts import (EXPERT_KINDS, ConstantExpert, CopyExpert, Expert, ExpertSpec, GELUExpert,
                                SwiGLUExpert, ZeroExpert, check_positive_int)

CONV1D_INIT_STD = 0.02  # transformers' Conv1D initialisation


def gelu_activation(name: str) -> nn.Module:
    """The activation module of a GPT-2 MLP; gelu_new runs as torch's fused tanh GELU (same function)."""
    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; transformers knows {sorted(ACT2FN)}")
    return ACT2FN["gelu_pytorch_tanh" if name == "gelu_new" else name]


# ---------------------------------------------------------------------------------------------
# groups


class ExpertGroup(nn.Module):
    """`count` identical experts. `runs_gemm`: its rows go through (grouped) matrix multiplies."""

    kind: str = ""
    runs_gemm: bool = False

    def __init__(self, d_model: int, count: int):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.count = check_positive_int("count", count)

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Expert j of the group on its rows x_RD [R, D] -> [R, D]."""
        raise NotImplementedError

    def make_views(self) -> list[Expert]:  # pragma: no cover - abstract
        raise NotImplementedError

    def legacy_keys(self) -> dict[str, list[str]]:
        """New parameter name -> per-expert key suffixes of the old layout whose stack it is."""
        return {}

    def stack_legacy(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The stacked parameter `name` from the old per-expert tensors (in legacy_keys order)."""
        return torch.stack(tensors)


class GELUGroup(ExpertGroup):
    """GPT-2 MLPs c_proj(act(c_fc(x))) with weights stored [in, out] like transformers' Conv1D."""

    kind, runs_gemm = "gelu", True

    def __init__(self, d_model: int, hidden: int, count: int, activation: str = "gelu_new"):
        super().__init__(d_model, count)
        self.hidden = check_positive_int("hidden", hidden)
        self.activation = activation
        self.act = gelu_activation(activation)
        self.c_fc = nn.Parameter(torch.empty(count, d_model, hidden))      # [G, D, H]
        self.c_fc_bias = nn.Parameter(torch.empty(count, hidden))          # [G, H]
        self.c_proj = nn.Parameter(torch.empty(count, hidden, d_model))    # [G, H, D]
        self.c_proj_bias = nn.Parameter(torch.empty(count, d_model))       # [G, D]
        self.reset_parameters()
        self._augmented: dict = {}  # inference cache of the bias-augmented c_fc (see augmented_fc)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight in (self.c_fc, self.c_proj):
            nn.init.normal_(weight, std=CONV1D_INIT_STD)
        for bias in (self.c_fc_bias, self.c_proj_bias):
            nn.init.zeros_(bias)

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        hidden_RH = self.act(torch.addmm(self.c_fc_bias[j], x_RD, self.c_fc[j]))  # as Conv1D does
        return torch.addmm(self.c_proj_bias[j], hidden_RH, self.c_proj[j])        # [R, D]

    def augmented_fc(self, pad: int) -> torch.Tensor:
        """[G, D + pad, H]: c_fc with c_fc_bias as row D and zero rows after it, so that rows of x
        padded with `pad` ones columns get their bias inside the matmul. Cached while the weights
        are unchanged and no gradient is needed (inference tensors track no version: not cached)."""
        if (torch.is_grad_enabled() and self.c_fc.requires_grad) or self.c_fc.is_inference() \
                or self.c_fc_bias.is_inference():
            return self._build_augmented(pad)
        key = (pad, self.c_fc.data_ptr(), self.c_fc._version, self.c_fc_bias.data_ptr(), self.c_fc_bias._version,
               self.c_fc.dtype)
        if self._augmented.get("key") != key:
            with torch.no_grad():
                self._augmented = {"key": key, "value": self._build_augmented(pad)}
        return self._augmented["value"]

    def _build_augmented(self, pad: int) -> torch.Tensor:
        zeros = self.c_fc.new_zeros(self.count, pad - 1, self.hidden)
        return torch.cat([self.c_fc, self.c_fc_bias.unsqueeze(1), zeros], dim=1)  # [G, D + pad, H]

    def make_views(self) -> list[Expert]:
        return [StackedGELUExpert(self, j) for j in range(self.count)]

    def legacy_keys(self) -> dict[str, list[str]]:
        return {"c_fc": ["c_fc.weight"], "c_fc_bias": ["c_fc.bias"], "c_proj": ["c_proj.weight"],
                "c_proj_bias": ["c_proj.bias"]}


class SwiGLUGroup(ExpertGroup):
    """down(silu(gate(x)) ⊙ up(x)), bias-free; gate and up fused into one [G, D, 2H] weight."""

    kind, runs_gemm = "swiglu", True

    def __init__(self, d_model: int, hidden: int, count: int):
        super().__init__(d_model, count)
        self.hidden = check_positive_int("hidden", hidden)
        self.gate_up = nn.Parameter(torch.empty(count, d_model, 2 * hidden))  # [G, D, 2H]
        self.down = nn.Parameter(torch.empty(count, hidden, d_model))         # [G, H, D]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation (uniform ±1/√fan_in)."""
        nn.init.uniform_(self.gate_up, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        gate_up_R2H = x_RD @ self.gate_up[j]                                         # [R, 2H]
        hidden_RH = F.silu(gate_up_R2H[:, : self.hidden]) * gate_up_R2H[:, self.hidden :]
        return hidden_RH @ self.down[j]                                              # [R, D]

    def make_views(self) -> list[Expert]:
        return [StackedSwiGLUExpert(self, j) for j in range(self.count)]

    def legacy_keys(self) -> dict[str, list[str]]:
        return {"gate_up": ["gate_proj.weight", "up_proj.weight"], "down": ["down_proj.weight"]}

    def stack_legacy(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if name == "gate_up":  # per expert: gate [H, D], up [H, D] (nn.Linear) -> [D, 2H]
            return torch.stack([torch.cat([g.T, u.T], dim=1) for g, u in zip(tensors[0::2], tensors[1::2])])
        return torch.stack([w.T for w in tensors])  # down [D, H] -> [H, D]


class ZeroGroup(ExpertGroup):
    """E(x) = 0: tokens routed here contribute nothing and run nothing."""

    kind = "zero"

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_RD)

    def make_views(self) -> list[Expert]:
        return [ZeroExpert(self.d_model) for _ in range(self.count)]


class CopyGroup(ExpertGroup):
    """E(x) = x: the token itself, gathered, no matmul."""

    kind = "copy"

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        return x_RD

    def make_views(self) -> list[Expert]:
        return [CopyExpert(self.d_model) for _ in range(self.count)]


class ConstantGroup(ExpertGroup):
    """E(x) = α_a·x + α_b·v_j with [α_a, α_b] = softmax(W_j x): a 2-way mixer, no GEMM over D×H."""

    kind = "constant"

    def __init__(self, d_model: int, count: int):
        super().__init__(d_model, count)
        self.constant = nn.Parameter(torch.randn(count, d_model) * 0.02)  # v [G, D]
        self.mixer = nn.Parameter(torch.empty(count, 2, d_model))          # W [G, 2, D]
        with torch.no_grad():
            nn.init.uniform_(self.mixer, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        alpha_R2 = torch.softmax(F.linear(x_RD, self.mixer[j]), dim=-1)  # [R, 2]
        return alpha_R2[:, :1] * x_RD + alpha_R2[:, 1:] * self.constant[j]

    def make_views(self) -> list[Expert]:
        return [StackedConstantExpert(self, j) for j in range(self.count)]

    def legacy_keys(self) -> dict[str, list[str]]:
        return {"constant": ["constant"], "mixer": ["mixer.weight"]}


class ModuleGroup(ExpertGroup):
    """One expert of a kind without a stacked layout (e.g. LaCT), run as its own module."""

    def __init__(self, expert: Expert):
        super().__init__(expert.d_model, 1)
        self.kind = expert.kind
        self.expert = expert

    def forward_expert(self, j: int, x_RD: torch.Tensor) -> torch.Tensor:
        return self.expert(x_RD)

    def make_views(self) -> list[Expert]:
        return [self.expert]


# ---------------------------------------------------------------------------------------------
# views: one Expert per stacked expert, weights read from the group at each access


class _Conv1DView:
    """Expert j's slice of a GELU group as a Conv1D: y = x @ weight + bias, weight [in, out]."""

    def __init__(self, group: GELUGroup, weight: str, bias: str, j: int):
        self._group, self._names, self._j = group, (weight, bias), j

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._group, self._names[0])[self._j]

    @property
    def bias(self) -> torch.Tensor:
        return getattr(self._group, self._names[1])[self._j]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


class _LinearView:
    """A column block of a stacked [in, out] weight as an nn.Linear: weight [out, in]."""

    def __init__(self, group: ExpertGroup, name: str, j: int, columns: slice = slice(None)):
        self._group, self._name, self._j, self._columns = group, name, j, columns

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._group, self._name)[self._j][:, self._columns].T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _bind(view: Expert, group: ExpertGroup, j: int) -> None:
    """Point a view at its group without registering the group as the view's submodule."""
    object.__setattr__(view, "_group", group)
    object.__setattr__(view, "index", j)


class _StackedView:
    """What all stacked views share: weight size and element size from the group's parameter
    shapes, without slicing (cost_per_token runs for every expert of every layer per chunk)."""

    _group: ExpertGroup

    def weight_numel(self) -> int:
        return sum(p.numel() for p in self._group._parameters.values()) // self._group.count

    def weight_element_size(self) -> int | None:
        return next(iter(self._group._parameters.values())).element_size()


class StackedGELUExpert(_StackedView, GELUExpert):
    """Expert j of a GELUGroup (c_fc / c_proj are views into the group's parameters)."""

    def __init__(self, group: GELUGroup, j: int):
        Expert.__init__(self, group.d_model)
        _bind(self, group, j)
        self.hidden, self.activation, self.act = group.hidden, group.activation, group.act
        self.c_fc = _Conv1DView(group, "c_fc", "c_fc_bias", j)
        self.c_proj = _Conv1DView(group, "c_proj", "c_proj_bias", j)

    def storage(self) -> list[torch.Tensor]:
        g, j = self._group, self.index
        return [g.c_fc[j], g.c_fc_bias[j], g.c_proj[j], g.c_proj_bias[j]]


class StackedSwiGLUExpert(_StackedView, SwiGLUExpert):
    """Expert j of a SwiGLUGroup (gate_proj / up_proj / down_proj are views, nn.Linear layout)."""

    def __init__(self, group: SwiGLUGroup, j: int):
        Expert.__init__(self, group.d_model)
        _bind(self, group, j)
        self.hidden = group.hidden
        self.gate_proj = _LinearView(group, "gate_up", j, slice(0, group.hidden))
        self.up_proj = _LinearView(group, "gate_up", j, slice(group.hidden, 2 * group.hidden))
        self.down_proj = _LinearView(group, "down", j)

    def storage(self) -> list[torch.Tensor]:
        return [self._group.gate_up[self.index], self._group.down[self.index]]


class StackedConstantExpert(_StackedView, ConstantExpert):
    """Expert j of a ConstantGroup."""

    def __init__(self, group: ConstantGroup, j: int):
        Expert.__init__(self, group.d_model)
        _bind(self, group, j)
        self.mixer = _MixerView(group, j)

    @property
    def constant(self) -> torch.Tensor:  # type: ignore[override]
        return self._group.constant[self.index]

    def storage(self) -> list[torch.Tensor]:
        return [self._group.constant[self.index], self._group.mixer[self.index]]


class _MixerView:
    def __init__(self, group: ConstantGroup, j: int):
        self._group, self._j = group, j

    @property
    def weight(self) -> torch.Tensor:
        return self._group.mixer[self._j]  # [2, D]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# ---------------------------------------------------------------------------------------------
# the pool


def _signature(expert: Expert) -> tuple:
    """Experts with equal signatures can share a group (exact classes only: subclasses such as
    LaCT experts, or views of another pool, are copied as they are)."""
    cls = type(expert)
    if cls in (GELUExpert, StackedGELUExpert):
        return ("gelu", expert.hidden, expert.activation)
    if cls in (SwiGLUExpert, StackedSwiGLUExpert):
        return ("swiglu", expert.hidden)
    if cls in (ZeroExpert, CopyExpert):
        return (expert.kind,)
    if cls in (ConstantExpert, StackedConstantExpert):
        return ("constant",)
    return ("module", id(expert))


def _group_from_signature(signature: tuple, d_model: int, count: int) -> ExpertGroup:
    kind = signature[0]
    if kind == "gelu":
        return GELUGroup(d_model, signature[1], count, signature[2])
    if kind == "swiglu":
        return SwiGLUGroup(d_model, signature[1], count)
    if kind == "zero":
        return ZeroGroup(d_model, count)
    if kind == "copy":
        return CopyGroup(d_model, count)
    return ConstantGroup(d_model, count)


def _runs(signatures: list[tuple]) -> list[tuple[int, int]]:
    """[first, last) ranges of consecutive equal signatures."""
    runs, first = [], 0
    for i in range(1, len(signatures) + 1):
        if i == len(signatures) or signatures[i] != signatures[first]:
            runs.append((first, i))
            first = i
    return runs


class ExpertPool(nn.Module):
    """The experts of one MoE layer, as groups of identical experts (see the module docstring)."""

    def __init__(self, groups: Sequence[ExpertGroup]):
        super().__init__()
        if not groups:
            raise ValueError("ExpertPool needs at least one expert group")
        d_models = {g.d_model for g in groups}
        if len(d_models) != 1:
            raise ValueError(f"all expert groups must have the same d_model, got {sorted(d_models)}")
        self.d_model = d_models.pop()
        self.groups = nn.ModuleList(groups)
        self.first = [0]  # first expert index of each group
        for group in groups:
            self.first.append(self.first[-1] + group.count)
        self._views = [view for group in groups for view in group.make_views()]

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: Sequence[ExpertSpec], d_model: int, activation: str = "gelu_new") -> "ExpertPool":
        """A pool built directly in the stacked layout; GELU experts use `activation`."""
        check_positive_int("d_model", d_model)
        if not specs:
            raise ValueError("an expert pool needs at least one ExpertSpec")
        gelu_activation(activation)
        signatures: list[tuple] = []
        for spec in specs:
            if not isinstance(spec, ExpertSpec):
                raise ValueError(f"expected ExpertSpec, got {type(spec).__name__}: {spec!r}")
            spec.validate()
            signature = {"gelu": ("gelu", spec.hidden, activation), "swiglu": ("swiglu", spec.hidden),
                         "zero": ("zero",), "copy": ("copy",), "constant": ("constant",)}.get(spec.kind)
            signatures += [signature or ("module", spec.kind, spec.hidden)] * spec.count
        groups: list[ExpertGroup] = []
        for first, last in _runs(signatures):
            if signatures[first][0] == "module":
                _, kind, hidden = signatures[first]
                groups += [ModuleGroup(EXPERT_KINDS[kind].build(d_model, hidden)) for _ in range(first, last)]
            else:
                groups.append(_group_from_signature(signatures[first], d_model, last - first))
        return cls(groups)

    @classmethod
    def from_experts(cls, experts: Sequence[Expert]) -> "ExpertPool":
        """A pool holding copies of the given experts' weights (module experts are kept as they are)."""
        experts = list(experts)
        if not experts:
            raise ValueError("an expert pool needs at least one expert")
        for i, expert in enumerate(experts):
            if not isinstance(expert, Expert):
                raise ValueError(f"expert {i} is a {type(expert).__name__}, not a nectar.moe.experts.Expert")
        signatures = [_signature(e) for e in experts]
        groups: list[ExpertGroup] = []
        for first, last in _runs(signatures):
            if signatures[first][0] == "module":
                groups.append(ModuleGroup(experts[first]))
                continue
            group = _group_from_signature(signatures[first], experts[first].d_model, last - first)
            _copy_into(group, experts[first:last])
            groups.append(group)
        return cls(groups)

    # ---- the Expert view of the pool ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._views)

    def __iter__(self) -> Iterator[Expert]:
        return iter(self._views)

    def __getitem__(self, index: int) -> Expert:
        return self._views[index]

    @property
    def num_experts(self) -> int:
        return len(self._views)

    def spans(self) -> list[tuple[ExpertGroup, int, int]]:
        """(group, first expert, last expert + 1) for every group, in expert order."""
        return [(g, self.first[i], self.first[i + 1]) for i, g in enumerate(self.groups)]

    # ---- checkpoints of the per-expert layout ------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.stack_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def stack_legacy_keys(self, state_dict: dict, prefix: str = "") -> None:
        """Stack old per-expert keys (`<prefix><i>.c_fc.weight`, ...) into `<prefix>groups.<g>.<name>`
        (in place; keys of the stacked layout are left alone)."""
        for g, (group, first, last) in enumerate(self.spans()):
            new_prefix = f"{prefix}groups.{g}."
            if isinstance(group, ModuleGroup):
                old = f"{prefix}{first}."
                for key in [k for k in state_dict if k.startswith(old)]:
                    state_dict[new_prefix + "expert." + key[len(old):]] = state_dict.pop(key)
                continue
            for name, suffixes in group.legacy_keys().items():
                keys = [f"{prefix}{i}.{suffix}" for i in range(first, last) for suffix in suffixes]
                if all(k in state_dict for k in keys):
                    state_dict[new_prefix + name] = group.stack_legacy(name, [state_dict.pop(k) for k in keys])


@torch.no_grad()
def _copy_into(group: ExpertGroup, experts: Sequence[Expert]) -> None:
    """Copy standalone experts' weights into a freshly built group of the same signature (the
    group takes their device and dtype first, so that nothing is rounded)."""
    reference = next((t for e in experts for t in e.storage()), None)
    if reference is not None:
        group.to(device=reference.device, dtype=reference.dtype)
    for j, expert in enumerate(experts):
        if isinstance(group, GELUGroup):
            group.c_fc[j].copy_(expert.c_fc.weight)
            group.c_fc_bias[j].copy_(expert.c_fc.bias)
            group.c_proj[j].copy_(expert.c_proj.weight)
            group.c_proj_bias[j].copy_(expert.c_proj.bias)
        elif isinstance(group, SwiGLUGroup):
            group.gate_up[j, :, : group.hidden].copy_(expert.gate_proj.weight.T)
            group.gate_up[j, :, group.hidden :].copy_(expert.up_proj.weight.T)
            group.down[j].copy_(expert.down_proj.weight.T)
        elif isinstance(group, ConstantGroup):
            group.constant[j].copy_(expert.constant)
            group.mixer[j].copy_(expert.mixer.weight)
