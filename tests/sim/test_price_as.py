"""Pricing a small model's routing at DistilGPT2 scale keeps routing shares and scales costs."""

import pytest

from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from sim.price_as import TARGETS, TargetShape, _scale_counts, rescale
from tests.tolerance import approx


def _small():
    full = ExpertCost(flops=4 * 128 * 512, bytes=1e4, weight_bytes=2 * 128 * 512 * 4)
    zero = ExpertCost(flops=0.0, bytes=128 * 4, kind="zero")
    layer = LayerWorkload([700, 300, 1048], [full, full, zero], router_flops_per_token=2 * 128 * 3)
    return ChunkWorkload(tokens=1024, batch=4, seq_len=256, d_model=128, n_layers=1, n_heads=4,
                         vocab_size=8192, layers=[layer])


def test_shares_kept_and_costs_scaled():
    big = rescale(_small(), TargetShape("t", d_model=768, n_heads=12, seq_len=1024, batch=8, vocab_size=50257))
    assert big.tokens == 8192 and big.d_model == 768 and big.seq_len == 1024
    counts = big.layers[0].tokens_per_expert
    assert sum(counts) == 8 * 2048
    assert counts == [5600, 2400, 8384]
    ratio = 768 / 128
    # products of a few widths and the width ratio (and its square): n = 6 roundings
    assert big.layers[0].expert_costs[0].flops == approx(4 * 128 * 512 * ratio**2, n=6)
    assert big.layers[0].expert_costs[0].flops == approx(4 * 768 * 3072, n=6)
    assert big.layers[0].expert_costs[2].bytes == approx(128 * 4 * ratio, n=6)


def test_count_scaling_keeps_the_exact_total():
    counts = [3, 5, 7, 11]
    for factor in (0.3, 1.7, 13.25):
        scaled = _scale_counts(counts, factor)
        assert sum(scaled) == round(sum(counts) * factor)
        assert all(abs(s - c * factor) < 1 for s, c in zip(scaled, counts))  # whole counts: each within one


def test_unknown_target():
    with pytest.raises(ValueError):
        rescale(_small(), "gpt5")
    assert "distilgpt2" in TARGETS


def test_activation_bytes_scale_with_width_and_element_size_weights_with_area():
    """A GELU expert D→H moves (2D + 4H) activations per token and holds D·H·2 weights: priced at
    768→3072 in bf16 from 128→512 in fp32, both must equal the big expert's own figures."""
    small, big = (128, 512), (768, 3072)
    cost = lambda d, h, elem: ExpertCost(flops=4 * d * h, bytes=(2 * d + 4 * h) * elem, weight_bytes=2 * d * h * elem)  # noqa: E731
    layer = LayerWorkload([1024], [cost(*small, 4)])
    work = ChunkWorkload(tokens=1024, batch=4, seq_len=256, d_model=128, n_layers=1, n_heads=4, vocab_size=100,
                         layers=[layer], dtype_bytes=4)
    priced = rescale(work, TargetShape("t", d_model=768, n_heads=12, seq_len=1024, batch=4, vocab_size=100))
    want = cost(*big, 2)
    got = priced.layers[0].expert_costs[0]
    assert (got.flops, got.bytes, got.weight_bytes) == approx((want.flops, want.bytes, want.weight_bytes), n=6)
    assert priced.dtype_bytes == 2


def test_a_decode_step_priced_at_olmoe_width_keeps_its_shape_and_reads_olmoe_sized_experts():
    """A small OLMoE-style decode step (d 256, experts of 128, fp32) priced as OLMoE-1B-7B: the
    step's rows and counts stay, each expert's weights become a 2048 → 1024 SwiGLU expert's in bf16."""
    expert = ExpertCost(flops=6 * 256 * 128, bytes=1e3, weight_bytes=3 * 256 * 128 * 4)
    layer = LayerWorkload([3, 0, 5, 8], [expert] * 4)
    step = ChunkWorkload(tokens=16, batch=16, seq_len=1, d_model=256, n_layers=1, n_heads=4, vocab_size=8192,
                         layers=[layer], phase="decode", kv_read_tokens=900, logit_tokens=16, dtype_bytes=4)
    big = rescale(step, "olmoe-1b-7b")
    assert (big.tokens, big.batch, big.seq_len, big.phase, big.kv_read_tokens) == (16, 16, 1, "decode", 900)
    assert big.layers[0].tokens_per_expert == [3, 0, 5, 8] and big.d_model == 2048
    assert big.layers[0].expert_costs[0].weight_bytes == approx(3 * 2048 * 1024 * 2, n=6)
