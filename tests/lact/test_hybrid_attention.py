"""Tests of the LaCT hybrid attention (nectar/hybrid_attention.py): the sliding window against
torch's causal attention and a per-query loop, and the layer inside HF's own GPT-2."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from nectar.lact.hybrid_attention import HybridLaCTAttention, sliding_window_attention, visibility_from_hf_mask
from tests.lact import NS5_GAIN
from tests.tolerance import assert_close, tol

DOUBLE = torch.float64


def attention_n(dim: int, keys: int) -> int:
    """Reductions on an attention output's path (tests/tolerance.py): the scores' dot product over
    `dim`, the softmax's max and sum over the keys, the weighted sum over the keys, and the few
    roundings of exp, ÷ and the scale."""
    return dim + 2 * keys + 4


def random_qkv(batch=2, heads=3, length=37, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=gen, dtype=DOUBLE) for _ in range(3))


@pytest.mark.parametrize("block_size", [None, 5, 16])
def test_window_covering_sequence_equals_full_causal_attention(block_size):
    q, k, v = random_qkv()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for window in (37, 100):
        got = sliding_window_attention(q, k, v, window, block_size=block_size)
        assert_close(got, want, n=attention_n(q.shape[-1], q.shape[2]), what=f"window {window}")


@pytest.mark.parametrize("window, block_size", [(1, None), (4, None), (4, 3), (7, 10), (20, 8)])
def test_window_equals_per_query_loop(window, block_size):
    q, k, v = random_qkv(seed=window)
    scale = 0.3
    want = torch.empty_like(q)
    for t in range(q.shape[2]):
        first = max(0, t - window + 1)
        scores = (q[:, :, t : t + 1] @ k[:, :, first : t + 1].transpose(-1, -2)) * scale  # [B, H, 1, w]
        want[:, :, t] = (scores.softmax(-1) @ v[:, :, first : t + 1])[:, :, 0]
    got = sliding_window_attention(q, k, v, window, scale=scale, block_size=block_size)
    assert_close(got, want, n=attention_n(q.shape[-1], window))


def test_window_padding_mask_and_fully_masked_rows():
    q, k, v = random_qkv(batch=1, heads=1, length=6)
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    allowed[..., :2] = False  # the first two keys are padding
    got = sliding_window_attention(q, k, v, 3, allowed=allowed, block_size=4)
    assert torch.isfinite(got).all()
    assert_close(got[:, :, :2], v[:, :, :2], n=attention_n(8, 3))  # no visible key: the query attends to itself
    scores = (q[0, 0, 3] @ k[0, 0, 2:4].T * 8**-0.5).softmax(-1)  # query 3 sees keys 1..3; key 1 is padding
    assert_close(got[0, 0, 3], scores @ v[0, 0, 2:4], n=attention_n(8, 3))
    key_padding = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, T]
    assert_close(sliding_window_attention(q, k, v, 3, allowed=key_padding, block_size=4), got, n=attention_n(8, 3))


def test_visibility_from_hf_masks():
    padding = torch.tensor([[0, 1, 1], [1, 1, 1]])  # [B, T]
    from_2d = visibility_from_hf_mask(padding, 3)
    assert from_2d.shape == (2, 1, 1, 3) and from_2d[0, 0, 0].tolist() == [False, True, True]
    additive = torch.zeros(2, 1, 3, 3)
    additive[0, ..., 0] = torch.finfo(torch.float32).min
    assert torch.equal(visibility_from_hf_mask(additive, 3), from_2d.expand(2, 1, 3, 3))  # booleans
    assert visibility_from_hf_mask(additive.bool(), 3).dtype == torch.bool
    assert visibility_from_hf_mask(None, 3) is None and visibility_from_hf_mask(additive, 4) is None


def tiny_config(**overrides) -> GPT2Config:
    options = dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=61, bos_token_id=0, eos_token_id=0,
                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    options.update(overrides)
    return GPT2Config(**options)


def swap_in_hybrid(model: GPT2Model, config: GPT2Config) -> None:
    """Replace every block's attention by a hybrid one that keeps the trained c_attn / c_proj."""
    for index, block in enumerate(model.h):
        hybrid = HybridLaCTAttention(config, layer_idx=index).to(DOUBLE)
        missing, unexpected = hybrid.load_state_dict(block.attn.state_dict(), strict=False)
        assert not unexpected and not any(name.startswith("c_") for name in missing)
        block.attn = hybrid


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_zero_gain_wide_window_reproduces_hf_gpt2(implementation):
    torch.manual_seed(0)
    config = tiny_config(lact_window=64, lact_chunk_size=8, attn_implementation=implementation)
    model = GPT2Model(config).to(DOUBLE).eval()
    ids = torch.randint(0, 61, (2, 20))
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        want = model(ids, use_cache=False).last_hidden_state
        want_padded = model(ids, attention_mask=padding, use_cache=False).last_hidden_state
        swap_in_hybrid(model, config)
        got = model(ids, use_cache=False).last_hidden_state
        got_padded = model(ids, attention_mask=padding, use_cache=False).last_hidden_state
        got_with_cache_object = model(ids, use_cache=True).last_hidden_state  # cache is ignored
    # n: per block, the reductions on the path: two layer norms (mean and variance over n_embd),
    # c_attn, the attention (head dim, 20 keys), c_proj, the MLP (n_embd and 4·n_embd): 9·n_embd
    # + head dim + 2·20; times the layers, plus the final layer norm
    width = config.n_embd
    n = config.n_layer * (9 * width + width // config.n_head + 2 * 20 + 4) + 2 * width
    assert_close(got, want, n=n, what="no padding")
    assert_close(got_padded[0], want_padded[0], n=n, what="unpadded row")
    assert_close(got_padded[1, 5:], want_padded[1, 5:], n=n, what="padded row")
    assert_close(got_with_cache_object, want, n=n, what="with a cache object")


def hybrid_layer(window=4, chunk=8, **overrides) -> HybridLaCTAttention:
    torch.manual_seed(1)
    config = tiny_config(lact_window=window, lact_chunk_size=chunk, lact_ttt_gain_init=1.0, lact_base_lr=0.3,
                         lact_use_momentum=True, lact_use_muon=True, **overrides)
    return HybridLaCTAttention(config, layer_idx=0).to(DOUBLE).eval()


def test_layer_is_causal_and_remembers_beyond_the_window():
    layer = hybrid_layer(window=4, chunk=8)
    x = torch.randn(1, 24, 32, dtype=DOUBLE, generator=torch.Generator().manual_seed(2))
    changed = x.clone()
    changed[:, 2] += 1.0  # a token in the first chunk
    with torch.no_grad():
        base, none = layer(x)
        out, _ = layer(changed)
        layer.ttt_gain.zero_()
        local_base, _ = layer(x)
        local_out, _ = layer(changed)
    assert none is None
    torch.testing.assert_close(out[:, :2], base[:, :2], rtol=0, atol=0)  # nothing before the change moves
    # window-only: positions >= 2 + window are out of reach
    torch.testing.assert_close(local_out[:, 6:], local_base[:, 6:], rtol=0, atol=0)
    # LaCT branch: the first chunk's update carries the change to every later chunk
    # (every later position moves by more than rounding could: the stream, the layer's reductions
    # and Muon's gain, tests/tolerance.py)
    rounding = tol(DOUBLE, n=24 + 9 * 32 + 2 * 4, scale=base.abs().max().item(), safety=NS5_GAIN)
    assert (out[:, 8:] - base[:, 8:]).abs().amax(dim=-1).min() > rounding
    # ...but not to the rest of its own chunk beyond the window (apply-then-update)
    torch.testing.assert_close(out[:, 6:8], base[:, 6:8], rtol=0, atol=0)


def test_drop_in_gpt2_lm_forward_backward():
    torch.manual_seed(3)
    config = tiny_config(lact_window=4, lact_chunk_size=8, lact_ttt_gain_init=1.0, lact_use_muon=True)
    model = GPT2LMHeadModel(config).to(DOUBLE)
    swap_in_hybrid(model.transformer, config)
    ids = torch.randint(0, 61, (2, 19))
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    attn = model.transformer.h[0].attn
    for name in ("w0", "w1", "w2", "qk_affine", "ttt_gain", "lr_proj.weight", "c_attn.weight", "c_proj.weight"):
        grad = attn.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="lact_num_heads"):
        HybridLaCTAttention(tiny_config(lact_num_heads=3))
    with pytest.raises(ValueError, match="lact_window"):
        HybridLaCTAttention(tiny_config(lact_window=0))
    with pytest.raises(ValueError, match="cross-attention"):
        HybridLaCTAttention(tiny_config())(torch.randn(1, 3, 32), encoder_hidden_states=torch.randn(1, 3, 32))
    q, k, v = random_qkv(length=5)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match=r"\[B, H, T, d\]"):
        sliding_window_attention(q[0], k[0], v[0], 2)
