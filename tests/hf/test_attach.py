"""attach / detach on tiny models of every family: exact logits, exact undo, generate(), errors."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nectar.hf.adaptive_k import AdaptiveKRouter
from nectar.hf.attach import attach, detach
from nectar.hf.families import family_of
from nectar.hf.routers import FamilyRouter, FamilyTopKRouter, ThresholdRouter
from tests.hf.models import FAMILIES, padded_batch, tiny
from tests.tolerance import assert_close

# (dtype, experts implementation); CPU grouped_mm has no fp64 kernel (it fails unattached too)
SETTINGS = [(torch.float32, "grouped_mm"), (torch.float32, "eager"), (torch.float64, "eager"),
            (torch.float64, "batched_mm"), (torch.bfloat16, "grouped_mm")]
IDS = [f"{str(d).split('.')[-1]}-{impl}" for d, impl in SETTINGS]


@torch.no_grad()
def logits_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("dtype,impl", SETTINGS, ids=IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_routing_gives_the_models_own_logits_exactly(family, dtype, impl):
    model = tiny(family, dtype, impl)
    ids, mask = padded_batch()
    before = logits_of(model, ids, mask)
    attached = attach(model)
    during = logits_of(attached, ids, mask)
    detach(attached)
    assert torch.equal(during, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_router_with_nothing_to_drop_is_exact_in_fp64(family):
    model = tiny(family, torch.float64, "eager")
    ids, mask = padded_batch(2)
    before = logits_of(model, ids, mask)
    k = tiny(family).config.num_experts_per_tok
    for make in (lambda l: FamilyTopKRouter(l.family, k), lambda l: ThresholdRouter(l.family, 0.0),
                 lambda l: AdaptiveKRouter(l.family, 0.3, renormalize="mass"), lambda l: FamilyRouter(l.family)):
        for drop in ("zero", "auto"):
            attached = attach(model, make, drop=drop)
            if isinstance(attached.moe_layers()[0][1].router, AdaptiveKRouter):
                for _, layer in attached.moe_layers():
                    layer.router.adapt(fallback=True)
            during = logits_of(attached, ids, mask)
            attached.detach()
            assert_close(during, before, what="detached model")  # a readable message first; then exactly:
            assert torch.equal(during, before)


def _hook_registries(model):
    names = ["_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"]
    return {n: [sorted(getattr(m, r, {})) for r in names] for n, m in model.named_modules()}


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_detach_restores_hooks_flags_weights_and_logits(family):
    model = tiny(family, torch.float32, "grouped_mm")
    ids, mask = padded_batch()
    before, hooks = logits_of(model, ids, mask), _hook_registries(model)
    flags = {n: m.__dict__.get("_is_expert_parallel") for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attached = attach(model, lambda layer: ThresholdRouter(layer.family, 0.3))
    changed = logits_of(attached, ids, mask)
    assert not torch.equal(changed, before)                     # the routing did change the model...
    assert attached.detach() is model
    assert _hook_registries(model) == hooks                      # ...and nothing of it is left
    assert {n: m.__dict__.get("_is_expert_parallel") for n, m in model.named_modules()} == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits_of(model, ids, mask), before)
    with pytest.raises(RuntimeError, match="detached"):
        attached(input_ids=ids)
    attach(model).detach()                                       # attachable again


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_works_attached(family):
    model = tiny(family, torch.float32, "eager")
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        own = model.generate(ids, **kwargs)
        attached = attach(model)
        same = attached.generate(ids, **kwargs)
        for _, layer in attached.moe_layers():
            layer.router = AdaptiveKRouter(layer.family, 0.4)
        with pytest.warns(UserWarning, match="nothing adapts it inside generate"):
            adaptive = attached.generate(ids, **kwargs)
        attached.detach()
    assert torch.equal(same, own)
    assert adaptive.shape == own.shape and torch.equal(adaptive[:, : ids.shape[1]], ids)


def test_bad_attachments_are_refused_and_leave_nothing_behind():
    model = tiny("mixtral")
    hooks = _hook_registries(model)
    family = family_of(model.model.layers[0].mlp.gate)
    with pytest.raises(ValueError, match="2 routers for 3 MoE blocks"):
        attach(model, [FamilyRouter(family), FamilyRouter(family)])
    assert _hook_registries(model) == hooks
    with pytest.raises(ValueError, match="not one Router"):
        attach(model, FamilyRouter(family))
    with pytest.raises(ValueError, match="drop must be one of"):
        attach(model, drop="maybe")
    assert _hook_registries(model) == hooks
    attached = attach(model)
    with pytest.raises(ValueError, match="already has NECTAR attached"):
        attach(model)
    attached.detach()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="no sparse MoE blocks"):
        attach(gpt2)


def test_a_router_for_the_wrong_number_of_experts_is_refused():
    model = tiny("olmoe")
    from nectar.moe.static_routers import TopKRouter
    with pytest.raises(ValueError, match="nectar Router over 16 experts"):
        attach(model, lambda layer: TopKRouter(8, 2))
    attached = attach(model, lambda layer: TopKRouter(16, 2))   # any nectar Router over E experts works
    with torch.no_grad():
        out = attached(input_ids=padded_batch()[0]).logits
    attached.detach()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_sentinel_slots_where_the_implementation_skips_them(impl):
    from nectar.hf.drop import sentinel_support
    model = tiny("olmoe", torch.float32, impl)
    experts = model.model.layers[0].mlp.experts
    support = sentinel_support(experts)
    assert support.supported == (impl != "eager" or hasattr(experts, "_is_expert_parallel"))  # 5.17 eager crashes on E
    if not support.supported:
        with pytest.raises(ValueError, match="cannot skip a sentinel"):
            attach(model, drop="sentinel")
        auto = attach(model, drop="auto")
        assert not auto.skips_unused_slots
        auto.detach()
        return
    attached = attach(model, drop="sentinel")
    assert attached.skips_unused_slots
    if support.needs_flag:                                           # 5.24 grouped/batched_mm
        assert experts._is_expert_parallel is True
    ids, mask = padded_batch()
    for _, layer in attached.moe_layers():
        layer.router = ThresholdRouter(layer.family, 0.3)
    sentinel = logits_of(attached, ids, mask)
    attached.detach()
    assert experts.__dict__.get("_is_expert_parallel", False) is False
    zero = attach(model, lambda layer: ThresholdRouter(layer.family, 0.3), drop="zero")
    assert not zero.skips_unused_slots
    # float32: zero-gated slots vs skipped ones change which rows each expert's matmuls see (sums
    # over D and the expert width, blocked differently) and the mix over the K slots, per layer
    config = tiny("olmoe").config
    n = config.num_hidden_layers * (config.hidden_size + config.intermediate_size + 2 * config.num_experts_per_tok)
    assert_close(logits_of(zero, ids, mask), sentinel, n=n)
    zero.detach()


def _generate_twice(attached, model):
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        attached.generate(ids, **kwargs)                         # through the attachment...
        model.generate(ids, **kwargs)                            # ...or the transformers model itself


def test_generate_with_an_adaptive_router_warns_once_per_attachment():
    model = tiny("olmoe", torch.float32, "eager")
    attached = attach(model, lambda layer: AdaptiveKRouter(layer.family))
    with pytest.warns(UserWarning, match=r"nothing adapts it inside generate\(\).*nectar run\|frontier\|hw-run") as seen:
        _generate_twice(attached, model)
    assert len([w for w in seen if "nothing adapts it" in str(w.message)]) == 1
    assert seen[0].filename == __file__                         # points at the caller, not at nectar/hf
    attached.detach()
    assert "generate" not in model.__dict__                      # detach restores the class's generate
    again = attach(model, lambda layer: AdaptiveKRouter(layer.family))
    with pytest.warns(UserWarning, match="nothing adapts it"):   # a new attachment warns again, once
        _generate_twice(again, model)
    again.detach()


def test_generate_with_static_routers_does_not_warn_until_an_adaptive_one_is_set():
    import warnings

    model = tiny("mixtral", torch.float32, "eager")
    attached = attach(model, lambda layer: ThresholdRouter(layer.family, 0.3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _generate_twice(attached, model)
        attached.set_router(lambda idx, experts: FamilyRouter(attached.moe_layers()[0][1].family))
        _generate_twice(attached, model)
    assert not [w for w in seen if "nothing adapts it" in str(w.message)]
    for _, layer in attached.moe_layers():                       # a router swapped in later is seen
        layer.router = AdaptiveKRouter(layer.family)
    with pytest.warns(UserWarning, match="AdaptiveKRouter in 3 of 3 MoE blocks"):
        _generate_twice(attached, model)
    attached.detach()
