"""generate() with NECTAR adapting (`nectar.serving.generation`), checked against an independent
decode loop: same tokens as the fixed-price router, the same quality gaps as a loop that copies the
cache for the static shadow instead of cropping it, and the price moving the way the bound says."""

import copy
import math

import pytest
import torch

from nectar.experiment.forward import install
from nectar.hf.attach import attach
from nectar.serving.controller import ServingControllerConfig
from nectar.serving.frontier import routers_for
from nectar.serving.generation import adaptive_generation, next_token_kl
from tests.hf.models import tiny

NEW_TOKENS = 6


def olmoe_and_prompt(seed: int = 0):
    model = attach(tiny("olmoe")).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (3, 5), generator=gen)
    return model, ids


def reference_loop(model, ids: torch.Tensor, price: float, check_every: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy decode with the batch-price routers at a fixed `price`; on check steps the static
    shadow runs on a deep copy of the cache. Returns (tokens [B, P + n], gaps per checked step)."""
    policy, static = routers_for(model, "nectar"), routers_for(model, f"static-top{model.top_k}")
    for router in policy:
        router.price = price
    install(model, policy)
    with torch.no_grad():
        out = model.hf(input_ids=ids, use_cache=True)
        cache, tokens, gaps = out.past_key_values, ids, []
        tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for step in range(NEW_TOKENS - 1):
            feed = tokens[:, -1:]
            if step % check_every == 0:
                install(model, static)
                shadow = model.hf(input_ids=feed, past_key_values=copy.deepcopy(cache), use_cache=True).logits[:, -1]
                install(model, policy)
            out = model.hf(input_ids=feed, past_key_values=cache, use_cache=True)
            if step % check_every == 0:
                gaps.append(float(next_token_kl(shadow, out.logits[:, -1])))
            tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens, gaps


def generate(model, ids, config: ServingControllerConfig):
    with torch.no_grad(), adaptive_generation(model, config) as session:
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokens, session


def test_generation_matches_an_independent_loop_with_checks_on_copies():
    model, ids = olmoe_and_prompt()
    config = ServingControllerConfig(window_steps=100, check_every=2, start_price=0.5)   # no window ends: fixed price
    tokens, session = generate(model, ids, config)
    expected, gaps = reference_loop(model, ids, price=0.5, check_every=2)
    assert torch.equal(tokens, expected)
    assert session.decode_steps == NEW_TOKENS - 1 and session.checks == len(gaps) == 3
    measured = [float(g[0]) for g in session.controller._gaps]
    assert measured == pytest.approx(gaps, rel=1e-5, abs=1e-7)
    assert all(g[1] == 3 for g in session.controller._gaps)          # rows per check


def test_the_shadow_check_changes_nothing_that_is_generated():
    model, ids = olmoe_and_prompt(seed=1)
    checked, _ = generate(model, ids, ServingControllerConfig(window_steps=100, check_every=1, start_price=0.3))
    unchecked, session = generate(model, ids, ServingControllerConfig(window_steps=100, check_every=100, start_price=0.3))
    assert session.checks == 1 and torch.equal(checked, unchecked)


@pytest.mark.parametrize("bound,direction", [(10.0, 1), (1e-9, -1)])
def test_the_price_follows_the_bound(bound, direction):
    """Far under a loose bound the price rises every window; over a tight one it falls (the checks'
    law; the proxy's below)."""
    model, ids = olmoe_and_prompt()
    config = ServingControllerConfig(quality_bound=bound, window_steps=1, check_every=1, start_price=0.05,
                                     quality_signal="checks")
    _, session = generate(model, ids, config)
    prices = [config.start_price] + [w["price"] for w in session.controller.history]
    assert len(prices) == NEW_TOKENS                                   # one window per decode step
    steps = [math.copysign(1, b - a) for a, b in zip(prices, prices[1:]) if b != a]
    assert steps and all(s == direction for s in steps)


@pytest.mark.parametrize("bound,direction", [(10.0, 1), (1e-9, -1)])
def test_priced_by_the_proxy_the_price_follows_the_bound(bound, direction):
    """With the dropped-mass proxy the checks give its slope: under a loose bound the price only
    rises; under a tight one it ends below where it started (a window that drops nothing reads
    as free, so it may probe upwards once)."""
    model, ids = olmoe_and_prompt()
    config = ServingControllerConfig(quality_bound=bound, window_steps=1, check_every=1, start_price=0.05)
    _, session = generate(model, ids, config)
    history = session.controller.history
    assert any("proxy_slope" in w for w in history)
    prices = [config.start_price] + [w["price"] for w in history]
    if direction > 0:
        assert all(b >= a for a, b in zip(prices, prices[1:])) and prices[-1] > prices[0]
    else:
        assert prices[-1] < prices[0]


def test_leaving_the_block_restores_routers_and_forward_even_after_an_error():
    model, ids = olmoe_and_prompt()
    before = [layer.router for _, layer in model.moe_layers()]
    with torch.no_grad():
        own = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with adaptive_generation(model):
                raise RuntimeError("boom")
        assert "forward" not in model.hf.__dict__
        assert [layer.router for _, layer in model.moe_layers()] == before
        assert torch.equal(model(ids).logits, own)


def test_moe_distilgpt2_generates_with_the_controller():
    from tests.serving.models import tiny_gpt2_moe
    model = tiny_gpt2_moe().eval()
    ids = torch.randint(1, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    config = ServingControllerConfig(window_steps=2, check_every=1)
    with torch.no_grad(), adaptive_generation(model, config) as session:
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
    assert tokens.shape == (2, 10)
    assert session.decode_steps == session.checks == 4 and len(session.controller.history) == 2
