"""Put NECTAR's routing into a transformers MoE model without touching its weights, and take it out.

Every supported block calls `_, gates, index = self.gate(x)` and then `self.experts(x, index,
gates)`. `attach` registers one forward hook on each `gate` (prepended, so transformers' own
router-logit recorders after it see NECTAR's choice; they read only the logits, which pass
through untouched). The hook hands the logits [N, E] and the gate's input [N, D] to the layer's
NECTAR router, hands the decision to the layer's `holder` when it has one (a driven model's leader,
`nectar.serving.driven`), realises it for the experts module (`nectar.hf.drop`), records it when a
recorder is set, and returns `(logits, gates, index)`. No parameter, buffer, module or forward
method is replaced; the experts, shared experts and attention stay the model's own code, so every
experts implementation (eager, grouped_mm, batched_mm) keeps working, and so does `generate()`.

Nothing adapts a router inside `generate()`: adaptation (the controller's step per chunk) runs
inside `nectar run|frontier|hw-run`. So `attach` wraps the model's `generate` (an instance
attribute over the class's method, removed by `detach`): the first `generate()` that finds an
adaptive router in force (one with `adapt_at_price`, e.g. `nectar.hf.adaptive_k.AdaptiveKRouter`)
warns once per attachment (`UserWarning`) that the router stays at its current setting there.

With the default routers (`nectar.hf.routers.FamilyRouter`, the family's own top-K) the model's
logits are bit-identical to the unattached model's. `detach` removes the hooks and restores the
one flag a sentinel attachment may set (`experts._is_expert_parallel`, transformers 5.24).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
import weakref
from typing import Callable, Sequence

from torch import nn

from nectar.hf.adapter import AttachedMoE
from nectar.hf.drop import experts_implementation, realise, resolve_drop
from nectar.hf.families import SUPPORTED_MODEL_TYPES, family_of, find_moe_blocks
from nectar.hf.layer import HFMoELayer
from nectar.hf.routers import FamilyRouter
from nectar.moe.router import Router

RouterSpec = Callable[[HFMoELayer], Router] | Sequence[Router] | None
_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _gate_hook(layer: HFMoELayer, impl_at_attach: str):
    """Forward hook of `layer.gate`: keep its logits, substitute the NECTAR router's (gates, index)."""
    def hook(gate: nn.Module, args: tuple, kwargs: dict, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(f"{type(gate).__name__} returned {type(output).__name__}; expected "
                            "(router_logits, top_k_weights, top_k_index)")
        logits_NE, family_gates_NK, _ = output
        if layer.sentinel and experts_implementation(layer.experts_module) != impl_at_attach:
            raise RuntimeError("the experts implementation changed after attach with sentinel slots; attach again")
        x = args[0] if args else next(iter(kwargs.values()))
        x_ND = x.reshape(-1, x.shape[-1])                                    # DeepSeek-V3 passes [B, S, D]
        decision = layer.router(logits_NE, x_ND)
        if decision.num_experts != layer.num_experts or decision.experts.shape[0] != logits_NE.shape[0]:
            raise ValueError(f"block {layer.block_index}: the router's decision covers {decision.num_experts} experts "
                             f"and {decision.experts.shape[0]} tokens, not {layer.num_experts} and {logits_NE.shape[0]}")
        if layer.holder is not None:
            layer.holder.keep(decision)                                      # a driven model's leader
        index_NK, gates_NK, computed = realise(decision, layer.num_experts, layer.sentinel)
        if layer.recorder is not None:
            layer.recorder.record(layer, x_ND, computed)
        return logits_NE, gates_NK.to(family_gates_NK.dtype), index_NK

    return hook


def _routers_for(layers: list[HFMoELayer], routers: RouterSpec) -> list[Router]:
    if routers is None:
        return [FamilyRouter(layer.family) for layer in layers]
    if isinstance(routers, Router):
        raise ValueError("routers must be a factory (layer -> Router) or one Router per MoE block, not one Router")
    if callable(routers):
        return [routers(layer) for layer in layers]
    routers = list(routers)
    if len(routers) != len(layers):
        raise ValueError(f"got {len(routers)} routers for {len(layers)} MoE blocks")
    return routers


GENERATE_WARNING = ("an adaptive router ({routers}) is attached, but nothing adapts it inside generate(): it "
                    "routes every token at its current setting ({setting}); adaptation runs inside `nectar "
                    "run|frontier|hw-run`; to generate with NECTAR adapting, use "
                    "`nectar.serving.generation.adaptive_generation`)")


def is_adaptive(router: Router) -> bool:
    """Whether a controller adapts `router` (it has the priced interface's `adapt_at_price`)."""
    return callable(getattr(router, "adapt_at_price", None))


def _setting(router: Router) -> str:
    adaptation = getattr(router, "adaptation", None)
    text = repr(adaptation()) if callable(adaptation) else "as built"
    return text if len(text) <= 100 else text[:97] + "..."


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside nectar/hf (the user's generate() call, whether it
    went through `AttachedMoE.generate` or the transformers model itself)."""
    level, frame, here = 1, sys._getframe(1), os.path.dirname(__file__)
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1
    return level


def _warn_once_in_generate(model: nn.Module, layers: list[HFMoELayer]) -> Callable[[], None]:
    """Wrap `model.generate` so that the first call with an adaptive router in force (checked per
    call: routers may be swapped after attach) warns once; returns what restores the model's own."""
    if not callable(getattr(model, "generate", None)):
        return lambda: None
    had_own, own = "generate" in model.__dict__, model.__dict__.get("generate")
    inner = model.generate
    warned = False

    @functools.wraps(inner)
    def generate(*args, **kwargs):
        nonlocal warned
        if not warned:
            adaptive = [layer.router for layer in layers if is_adaptive(layer.router)]
            if adaptive:
                warned = True
                names = " and ".join(sorted({type(r).__name__ for r in adaptive}))
                warnings.warn(GENERATE_WARNING.format(routers=f"{names} in {len(adaptive)} of {len(layers)} MoE blocks",
                                                      setting=_setting(adaptive[0])),
                              UserWarning, stacklevel=_caller_stacklevel())
        return inner(*args, **kwargs)

    model.__dict__["generate"] = generate

    def restore() -> None:
        if had_own:
            model.__dict__["generate"] = own
        else:
            model.__dict__.pop("generate", None)

    return restore


def attach(model: nn.Module, routers: RouterSpec = None, drop: str = "auto") -> AttachedMoE:
    """Route every MoE block of a transformers causal LM through NECTAR routers.

    routers  None: the family's own top-K (exact); a callable `layer -> Router`; or one Router per
             MoE block, in order.
    drop     how unused slots reach the experts: "auto" (skipped where the experts implementation
             can, else computed at gate 0), "sentinel" (skipped, or ValueError), "zero" (gate 0).
    Raises ValueError for a model without MoE blocks, an unsupported family, or a model that is
    already attached; nothing stays changed after an error."""
    if model in _ATTACHED:
        raise ValueError("this model already has NECTAR attached; detach it first")
    found = find_moe_blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no sparse MoE blocks (a gate with top_k and 3-D experts) of a "
                         f"supported family ({', '.join(SUPPORTED_MODEL_TYPES)})")
    families = [family_of(f.block.gate) for f in found]
    hooks, flags, restores = [], [], []

    def undo() -> None:
        for handle in hooks:
            handle.remove()
        hooks.clear()
        for restore in restores:
            restore()
        restores.clear()
        for experts, value in flags:
            experts._is_expert_parallel = value
        flags.clear()
        _ATTACHED.discard(model)

    try:
        layers = []
        for f, family in zip(found, families):
            support = resolve_drop(f.block.experts, drop)
            if support.supported and support.needs_flag and not f.block.experts._is_expert_parallel:
                flags.append((f.block.experts, f.block.experts._is_expert_parallel))
                f.block.experts._is_expert_parallel = True
            layers.append(HFMoELayer(f.block_index, f.name, f.block, family, FamilyRouter(family), support.supported))
        for layer, router in zip(layers, _routers_for(layers, routers)):
            layer.router = router                                            # validates before moving
            layer.router = router.to(layer.gate.weight.device)
        for layer in layers:
            hook = _gate_hook(layer, experts_implementation(layer.experts_module))
            hooks.append(layer.gate.register_forward_hook(hook, prepend=True, with_kwargs=True))
        restores.append(_warn_once_in_generate(model, layers))
    except BaseException:
        undo()
        raise
    _ATTACHED.add(model)
    return AttachedMoE(model, layers, undo)


def detach(attached: AttachedMoE) -> nn.Module:
    """Undo `attach`; returns the transformers model, as it was before."""
    return attached.detach()
