"""Tests of the LaCT fast-weight kernel (nectar/fastweight.py) against independent references.

The reference below is written differently from the kernel on purpose: one batch element and one
token at a time, update accumulated from autograd of each token's inner loss, Muon through an
SVD (the Newton–Schulz quintic acts on each singular value as a scalar polynomial) and weight
norm row by row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nectar.lact.fastweight import (
    NS5_COEFFICIENTS,
    NS5_STEPS,
    renormalize_rows,
    row_norms,
    swiglu_apply,
    swiglu_chunk_update,
    swiglu_chunk_update_fused,
    swiglu_chunk_update_lean,
    swiglu_fast_weight,
    zeropower_via_newtonschulz5,
)
from tests.lact import NS5_GAIN
from tests.tolerance import assert_close, within

DOUBLE = torch.float64


def make_inputs(batch, length, dk, dv, dh, seed=0, dtype=DOUBLE, with_momentum=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    tensors = dict(
        q=rand(batch, length, dk),
        k=rand(batch, length, dk),
        v=rand(batch, length, dv),
        w0=rand(batch, dh, dk) / dk**0.5,
        w1=rand(batch, dv, dh) / dh**0.5,
        w2=rand(batch, dh, dk) / dk**0.5,
        lr0=F.softplus(rand(batch, length, 1)) * 0.1,
        lr1=F.softplus(rand(batch, length, 1)) * 0.1,
        lr2=F.softplus(rand(batch, length, 1)) * 0.1,
    )
    momentum = torch.sigmoid(rand(batch, length, 1)) if with_momentum else None
    return tensors, momentum


def swiglu_vector(weights, x):
    """f_W(x) for one token x [dk] with weights (W0 [dh, dk], W1 [dv, dh], W2 [dh, dk])."""
    w0, w1, w2 = weights
    return w1 @ (F.silu(w0 @ x) * (w2 @ x))


def newton_schulz_via_svd(matrix):
    """NS5 as a scalar polynomial on the singular values of the Frobenius-normalised matrix."""
    a, b, c = NS5_COEFFICIENTS
    x = matrix / (torch.linalg.matrix_norm(matrix) + 1e-7)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


def token_loop_update(weights, k, v, lrs):
    """Sum over tokens of lr_j · ∂⟨f_W(k_t), v_t⟩/∂W_j, each term from its own autograd call."""
    deltas = [torch.zeros_like(w) for w in weights]
    for t in range(k.shape[0]):
        leaves = [w.detach().clone().requires_grad_(True) for w in weights]
        inner = -(swiglu_vector(leaves, k[t]) @ v[t])  # the token's inner loss without η
        grads = torch.autograd.grad(inner, leaves)
        for j in range(3):
            deltas[j] -= lrs[j][t, 0] * grads[j]
    return deltas


def reference_fast_weight(inputs, chunk_size, use_muon, momentum, weight_norm, causal):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    batch, length, _ = q.shape
    out = torch.zeros(batch, length, v.shape[2], dtype=q.dtype)
    finals = []
    for b in range(batch):
        weights = [inputs[n][b].clone() for n in ("w0", "w1", "w2")]
        initial_row_norms = [[w[r].norm() for r in range(w.shape[0])] for w in weights]
        previous = None
        for start in range(0, length, chunk_size):
            tokens = range(start, min(length, start + chunk_size))
            if causal:
                for t in tokens:
                    out[b, t] = swiglu_vector(weights, q[b, t])
            lrs = [inputs[n][b, start : start + chunk_size] for n in ("lr0", "lr1", "lr2")]
            deltas = token_loop_update(weights, k[b, tokens.start : tokens.stop], v[b, tokens.start : tokens.stop], lrs)
            if momentum is not None:
                gate = sum(momentum[b, t, 0] for t in tokens) / len(tokens)
                if previous is not None:
                    deltas = [d + gate * p for d, p in zip(deltas, previous)]
                previous = deltas
            if use_muon:
                deltas = [newton_schulz_via_svd(d) for d in deltas]
            weights = [w + d for w, d in zip(weights, deltas)]
            if weight_norm:
                for w, norms in zip(weights, initial_row_norms):
                    for r in range(w.shape[0]):
                        w[r] = w[r] / (w[r].norm() + 1e-5) * norms[r]
            if not causal:
                for t in tokens:
                    out[b, t] = swiglu_vector(weights, q[b, t])
        finals.append(weights)
    stacked = tuple(torch.stack([f[j] for f in finals]) for j in range(3))
    return out, stacked


def test_hand_gradients_equal_autograd_of_inner_loss():
    inputs, _ = make_inputs(batch=3, length=9, dk=5, dv=4, dh=7, seed=1)
    k, v = inputs["k"], inputs["v"]
    deltas = swiglu_chunk_update(k, v, inputs["w0"], inputs["w1"], inputs["w2"], inputs["lr0"], inputs["lr1"], inputs["lr2"])
    for j, name in enumerate(("w0", "w1", "w2")):
        leaves = [inputs[n].clone().requires_grad_(True) for n in ("w0", "w1", "w2")]
        lr = inputs[f"lr{j}"]
        inner_loss = -(lr * swiglu_apply(k, *leaves) * v).sum()  # −Σ η ⟨f_W(k), v⟩, batched
        (grad,) = torch.autograd.grad(inner_loss, leaves[j])
        # the same sums two ways: over dk (gate, up), dv (W1ᵀ v) and the chunk's tokens
        assert_close(deltas[j], -grad, n=k.shape[-1] + v.shape[-1] + k.shape[1], what=f"d{name}")


def test_lean_update_equals_autograd_of_inner_loss():
    inputs, _ = make_inputs(batch=3, length=9, dk=5, dv=4, dh=7, seed=4)
    k, v, lrs = inputs["k"], inputs["v"], [inputs[f"lr{j}"] for j in range(3)]
    w02 = torch.cat([inputs["w0"], inputs["w2"]], dim=1)  # [B, 2dh, dk]
    dw02, dw1 = swiglu_chunk_update_lean(k, v, w02, inputs["w1"], *lrs)
    want02, want1 = swiglu_chunk_update_fused(k, v, w02, inputs["w1"], *lrs)
    n = k.shape[-1] + v.shape[-1] + k.shape[1]  # as above: dk, dv and the chunk's tokens
    assert_close(dw02, want02, n=n, what="dW02")
    assert_close(dw1, want1, n=n, what="dW1")
    leaves = [inputs[name].clone().requires_grad_(True) for name in ("w0", "w1", "w2")]
    inner_loss = -(lrs[0] * swiglu_apply(k, *leaves) * v).sum()  # −Σ η0 ⟨f_W(k), v⟩
    (grad0,) = torch.autograd.grad(inner_loss, leaves[0])
    assert_close(dw02[:, : inputs["w0"].shape[1]], -grad0, n=n, what="dW0 against autograd")


SHAPES = [  # (batch, length, dk, dv, dh, chunk): partial last chunk, single chunk, tall and wide matrices
    (2, 11, 4, 5, 6, 4),
    (1, 7, 6, 3, 4, 3),
    (2, 6, 3, 3, 5, 6),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_muon", [False, True])
@pytest.mark.parametrize("with_momentum", [False, True])
@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lean", [False, True])
def test_kernel_matches_token_loop_reference(shape, use_muon, with_momentum, weight_norm, causal, lean):
    batch, length, dk, dv, dh, chunk = shape
    inputs, momentum = make_inputs(batch, length, dk, dv, dh, seed=sum(shape), with_momentum=with_momentum)
    out, weights = swiglu_fast_weight(
        **inputs, chunk_size=chunk, use_muon=use_muon, momentum=momentum, weight_norm=weight_norm, causal=causal,
        lean=lean,
    )
    ref_out, ref_weights = reference_fast_weight(inputs, chunk, use_muon, momentum, weight_norm, causal)
    # n: the stream's tokens (chained chunk sums) and the apply's reductions; Muon (the kernel's
    # iteration vs the SVD's polynomial) amplifies by up to NS5_GAIN
    bound = dict(n=length + dk + dv + dh, safety=NS5_GAIN if use_muon else 1.0)
    assert_close(out, ref_out, **bound, what="outputs")
    for got, want in zip(weights, ref_weights):
        assert_close(got, want, **bound, what="final weights")


@pytest.mark.parametrize("changed_chunk", [1, 2])
def test_causal_chunks_never_see_the_future(changed_chunk):
    chunk = 4
    inputs, momentum = make_inputs(batch=2, length=11, dk=4, dv=4, dh=6, seed=3, with_momentum=True)
    base, _ = swiglu_fast_weight(**inputs, chunk_size=chunk, momentum=momentum, use_muon=True)
    start, stop = changed_chunk * chunk, (changed_chunk + 1) * chunk
    changed = {name: t.clone() for name, t in inputs.items()}
    for name in ("q", "k", "v"):
        changed[name][:, start:stop] += 1.0
    out, _ = swiglu_fast_weight(**changed, chunk_size=chunk, momentum=momentum, use_muon=True)
    torch.testing.assert_close(out[:, :start], base[:, :start], rtol=0, atol=0)
    assert not within(out[:, start:stop], base[:, start:stop], n=11 + 14, safety=NS5_GAIN)[0]  # beyond rounding
    # apply-then-update: the chunk's own keys and values do not reach its outputs either
    kv_only = {name: t.clone() for name, t in inputs.items()}
    for name in ("k", "v"):
        kv_only[name][:, start:stop] += 1.0
    out_kv, _ = swiglu_fast_weight(**kv_only, chunk_size=chunk, momentum=momentum, use_muon=True)
    torch.testing.assert_close(out_kv[:, :stop], base[:, :stop], rtol=0, atol=0)
    if stop < 11:
        assert not within(out_kv[:, stop:], base[:, stop:], n=11 + 14, safety=NS5_GAIN)[0]


def test_non_causal_update_then_apply_uses_own_chunk():
    inputs, _ = make_inputs(batch=1, length=8, dk=4, dv=4, dh=6, seed=4)
    base, _ = swiglu_fast_weight(**inputs, chunk_size=4, causal=False)
    changed = {name: t.clone() for name, t in inputs.items()}
    changed["k"][:, 4:] += 1.0
    out, _ = swiglu_fast_weight(**changed, chunk_size=4, causal=False)
    torch.testing.assert_close(out[:, :4], base[:, :4], rtol=0, atol=0)
    assert not within(out[:, 4:], base[:, 4:], n=8 + 14)[0]  # beyond rounding


@pytest.mark.parametrize("rows, cols", [(64, 64), (32, 128), (128, 32), (96, 48), (16, 256)])
def test_muon_equals_singular_value_polynomial_and_lands_near_one(rows, cols):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    matrix = torch.randn(3, rows, cols, generator=gen, dtype=DOUBLE)
    ortho = zeropower_via_newtonschulz5(matrix)
    for b in range(3):
        # five steps of three chained matmuls (X Xᵀ over the long side, A², A·X over the short)
        # vs an SVD; the quintic's gain applies to rounding in the small singular directions
        n = NS5_STEPS * (max(rows, cols) + 2 * min(rows, cols))
        assert_close(ortho[b], newton_schulz_via_svd(matrix[b]), n=n, safety=NS5_GAIN)
    # Known behaviour of the tuned quintic (5 steps), checked here rather than assumed: it
    # overshoots, so no singular value exceeds ~1.203; every singular value that was at least
    # 2e-3 of the Frobenius norm lands in [0.68, 1.203]; smaller ones (ill-conditioned square
    # Gaussians have some) are amplified but stay below 0.68. Never exactly 1.
    relative_in = torch.linalg.svdvals(matrix) / torch.linalg.matrix_norm(matrix)[:, None]  # [3, min(r, c)]
    singular_out = torch.linalg.svdvals(ortho)  # [3, min(r, c)]
    assert singular_out.max() < 1.21
    well_scaled = (relative_in >= 2e-3).sum(dim=1)
    near_one = (singular_out >= 0.68).sum(dim=1)
    barely_scaled = (relative_in >= 1.4e-3).sum(dim=1)  # the exact threshold is ~1.5e-3
    assert (near_one >= well_scaled).all() and (near_one <= barely_scaled).all(), (near_one, well_scaled)
    assert (singular_out - 1).abs().max() > 0.05  # approximately, not exactly, orthogonal


def test_muon_leaves_tiny_singular_values_small():
    """The documented limit: directions far below the Frobenius norm are not fully amplified."""
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=DOUBLE, generator=torch.Generator().manual_seed(0)))
    spectrum = torch.tensor([1.0] * 7 + [1e-6], dtype=DOUBLE)
    singular = torch.linalg.svdvals(zeropower_via_newtonschulz5(u @ torch.diag(spectrum) @ u.T))
    assert singular.min() < 0.01 and singular.max() > 0.6


def test_renormalize_rows_closed_form():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 6, 5, generator=gen, dtype=DOUBLE)
    target = torch.rand(2, 6, 1, generator=gen, dtype=DOUBLE) + 0.5
    out = renormalize_rows(w, target)
    norms = row_norms(w)
    # a row norm (5 squares summed, a root), the rescaling (+, ÷, ×) and the norm again
    assert_close(row_norms(out), target * norms / (norms + 1e-5), n=2 * 5 + 4, scale=target * norms / (norms + 1e-5))
    cosine = (out * w).sum(-1) / (row_norms(out) * norms).squeeze(-1)
    assert_close(cosine, torch.ones_like(cosine), n=3 * 5 + 6)  # three sums over the 5 columns, ÷, ×


def test_kernel_weight_norm_keeps_initial_row_norms():
    inputs, momentum = make_inputs(batch=2, length=20, dk=4, dv=5, dh=6, seed=6, with_momentum=True)
    inputs["lr0"], inputs["lr1"], inputs["lr2"] = (inputs[n] * 20 for n in ("lr0", "lr1", "lr2"))  # big steps
    _, weights = swiglu_fast_weight(**inputs, chunk_size=4, momentum=momentum, use_muon=True)
    for name, w in zip(("w0", "w1", "w2"), weights):
        initial = row_norms(inputs[name])
        assert not within(w, inputs[name], n=20)[0]  # moved by more than rounding
        # not rounding: weight norm divides by ‖w‖ + WEIGHT_NORM_EPS (1e-5), so the norms land a
        # relative 1e-5/‖w‖ short of their targets; 1e-4 allows row norms down to 0.1
        torch.testing.assert_close(row_norms(w), initial, rtol=1e-4, atol=0)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_returned_weights_continue_the_stream(weight_norm):
    inputs, _ = make_inputs(batch=2, length=14, dk=4, dv=3, dh=5, seed=7)
    chunk, split = 4, 8
    whole, whole_weights = swiglu_fast_weight(**inputs, chunk_size=chunk, weight_norm=weight_norm)
    first = {n: (t[:, :split] if t.shape[1] == 14 else t) for n, t in inputs.items()}
    second = {n: (t[:, split:] if t.shape[1] == 14 else t) for n, t in inputs.items()}
    out1, w_mid = swiglu_fast_weight(**first, chunk_size=chunk, weight_norm=weight_norm)
    second["w0"], second["w1"], second["w2"] = w_mid
    out2, w_end = swiglu_fast_weight(**second, chunk_size=chunk, weight_norm=weight_norm)
    if weight_norm:
        # Not rounding: the second call renormalises to the norms it was given, which are the
        # first call's targets times ‖w‖/(‖w‖ + 1e-5): a relative drift of order 1e-5 (1e-4: row
        # norms down to 0.1), and outputs near zero move by that drift times |W|·|x| ≤ 1e-6.
        tol = dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([out1, out2], dim=1), whole, **tol)
        for got, want in zip(w_end, whole_weights):
            torch.testing.assert_close(got, want, **tol)
    else:  # the same operations on the same numbers: split calls reassociate nothing in principle
        n = 14 + 4 + 3 + 5  # the stream and the apply's reductions
        assert_close(torch.cat([out1, out2], dim=1), whole, n=n, what="outputs")
        for got, want in zip(w_end, whole_weights):
            assert_close(got, want, n=n, what="final weights")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_computes_in_input_dtype(dtype):
    inputs, momentum = make_inputs(batch=1, length=6, dk=4, dv=4, dh=4, seed=8, dtype=dtype, with_momentum=True)
    out, weights = swiglu_fast_weight(**inputs, chunk_size=4, momentum=momentum, use_muon=True)
    assert out.dtype == dtype and all(w.dtype == dtype for w in weights)
    assert torch.isfinite(out.float()).all()


def test_bad_inputs_raise_clear_errors():
    inputs, _ = make_inputs(batch=2, length=6, dk=4, dv=3, dh=5)
    with pytest.raises(ValueError, match="chunk_size"):
        swiglu_fast_weight(**inputs, chunk_size=0)
    bad = dict(inputs, w1=inputs["w1"].transpose(1, 2))
    with pytest.raises(ValueError, match="w1 must have shape"):
        swiglu_fast_weight(**bad, chunk_size=2)
    bad = dict(inputs, lr0=inputs["lr0"][:, :3])
    with pytest.raises(ValueError, match="lr0"):
        swiglu_fast_weight(**bad, chunk_size=2)
    with pytest.raises(ValueError, match="momentum"):
        swiglu_fast_weight(**inputs, chunk_size=2, momentum=torch.rand(2, 6))
    with pytest.raises(ValueError, match="Newton"):
        zeropower_via_newtonschulz5(torch.ones(3))
