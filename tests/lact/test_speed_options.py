"""Tests of the hybrid LaCT layer's speed options (nectar/lact/hybrid_attention.py, `set_speed_options`):
each option against the reference path (lean off, cast off, compile off) — the layer's output and
the gradients of every parameter and of the input, i.e. the training step's forward and backward.

The lean fast-weight functions themselves are checked against the token-loop reference in
tests/lact/test_fastweight.py; here the whole layer, with momentum and Muon on, runs in fp64 (lean),
in fp32 (cast: a no-op without autocast), under CPU bf16 autocast (cast against fp64) and under
torch.compile (where this host can compile; the fallback to eager everywhere).
"""

from __future__ import annotations

import pytest
import torch

from nectar.lact import hybrid_attention
from nectar.lact.hybrid_attention import HybridLaCTAttention, set_speed_options
from tests.lact import NS5_GAIN
from tests.lact.test_hybrid_attention import tiny_config
from tests.tolerance import assert_close

DOUBLE = torch.float64
LENGTH, CHUNK, WIDTH, HEADS = 21, 8, 32, 4  # a partial last chunk
REFERENCE = dict(lean=False, cast_inputs=False, compile_branch=False)


def layer(dtype=DOUBLE, use_muon=True) -> HybridLaCTAttention:
    torch.manual_seed(5)
    config = tiny_config(lact_window=4, lact_chunk_size=CHUNK, lact_ttt_gain_init=1.0, lact_base_lr=0.3,
                         lact_use_momentum=True, lact_use_muon=use_muon)
    return HybridLaCTAttention(config, layer_idx=0).to(dtype)


def layer_input(dtype=DOUBLE) -> torch.Tensor:
    return torch.randn(2, LENGTH, WIDTH, generator=torch.Generator().manual_seed(6), dtype=dtype)  # [B, T, D]


def output_and_gradients(module: HybridLaCTAttention, x: torch.Tensor, autocast_bf16: bool = False):
    """(output [B, T, D], {name: gradient} of every parameter and of x) of sum(output · fixed weights)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        out, _ = module(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)  # [B, T, D]
    (out * probe).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, "input": x.grad.clone()}


def stream_n() -> int:
    """Reductions on the longest path (tests/tolerance.py): the fast-weight stream's tokens and its
    sums over dk, dv, dh (tests/lact/test_fastweight.py), the layer's c_attn / c_proj (WIDTH each)
    and normalisations (head dims); twice for a gradient (backward retraces the path)."""
    head = WIDTH // HEADS
    return 2 * (LENGTH + 2 * head + 2 * head + 2 * WIDTH + 2 * head)


@pytest.mark.parametrize("use_muon", [False, True])
def test_lean_equals_reference_forward_and_backward(use_muon):
    module, x = layer(use_muon=use_muon), layer_input()
    module.set_speed_options(**REFERENCE)
    want_out, want_grads = output_and_gradients(module, x)
    module.set_speed_options(lean=True)
    got_out, got_grads = output_and_gradients(module, x)
    safety = NS5_GAIN if use_muon else 1.0  # Muon's gain on rounding, forward and backward
    assert_close(got_out, want_out, n=stream_n(), safety=safety, what="output")
    assert set(got_grads) == set(want_grads) and len(got_grads) > 10
    for name, want in want_grads.items():
        assert_close(got_grads[name], want, n=stream_n(), safety=safety, what=f"grad {name}")


def test_cast_inputs_is_a_no_op_without_autocast():
    module, x = layer(torch.float32), layer_input(torch.float32)
    want_out, want_grads = output_and_gradients(module, x)
    module.set_speed_options(cast_inputs=True)
    got_out, got_grads = output_and_gradients(module, x)
    assert torch.equal(got_out, want_out)
    assert all(torch.equal(got_grads[name], want) for name, want in want_grads.items())


def test_cast_inputs_under_bf16_autocast_stays_within_bf16_rounding_of_fp64():
    exact = layer(DOUBLE, use_muon=False)
    want_out, want_grads = output_and_gradients(exact, layer_input(DOUBLE))
    module = layer(torch.float32, use_muon=False)
    module.load_state_dict({k: v.float() for k, v in exact.state_dict().items()})
    for cast in (False, True):
        module.set_speed_options(lean=True, cast_inputs=cast)
        got_out, got_grads = output_and_gradients(module, layer_input(torch.float32), autocast_bf16=True)
        # bf16 everywhere on the path: the same n as the fp64 comparisons, in bf16's eps
        assert_close(got_out, want_out, dtype=torch.bfloat16, n=stream_n(), what=f"output, cast={cast}")
        for name in ("w0", "w1", "w2", "qk_affine", "lr_proj.weight", "c_attn.weight", "input"):
            assert_close(got_grads[name], want_grads[name], dtype=torch.bfloat16, n=stream_n(),
                         what=f"grad {name}, cast={cast}")


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(hybrid_attention._COMPILED, "fn", broken)
    module, x = layer(), layer_input()
    want_out, _ = output_and_gradients(module, x)
    module.set_speed_options(compile_branch=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got_out, _ = output_and_gradients(module, x)
    assert torch.equal(got_out, want_out) and hybrid_attention._COMPILED["fn"] is None
    assert torch.equal(output_and_gradients(module, x)[0], want_out)  # eager from then on, no new warning


@pytest.mark.slow
def test_compiled_branch_equals_eager(monkeypatch):
    monkeypatch.delitem(hybrid_attention._COMPILED, "fn", raising=False)
    module, x = layer(torch.float32, use_muon=False), layer_input(torch.float32)
    module.set_speed_options(lean=True)
    want_out, want_grads = output_and_gradients(module, x)
    module.set_speed_options(compile_branch=True)
    got_out, got_grads = output_and_gradients(module, x)
    if hybrid_attention._COMPILED.get("fn") is None:
        pytest.skip("torch.compile does not work on this host (the layer fell back to eager)")
    assert_close(got_out, want_out, n=stream_n(), what="output")  # Inductor fuses and reorders the sums
    for name, want in want_grads.items():
        assert_close(got_grads[name], want, n=stream_n(), what=f"grad {name}")


def test_set_speed_options_reaches_every_hybrid_layer():
    from transformers import GPT2LMHeadModel

    from tests.lact.test_hybrid_attention import swap_in_hybrid

    config = tiny_config(lact_window=4, lact_chunk_size=CHUNK)
    model = GPT2LMHeadModel(config)
    swap_in_hybrid(model.transformer, config)
    assert set_speed_options(model, lean=False, cast_inputs=True) == config.n_layer
    layers = [block.attn for block in model.transformer.h]
    assert all(not m.lean and m.cast_inputs and not m.compile_branch for m in layers)
    assert HybridLaCTAttention(tiny_config(lact_lean=False, lact_compile=True)).compile_branch
