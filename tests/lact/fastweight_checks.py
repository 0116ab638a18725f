"""The Triton fast-weight path (nectar/lact/fastweight_triton.py) against fp64, piece by piece, with
tolerances of the rule (tests/tolerance.py). Shared by tests/lact/test_fastweight_triton.py and
benchmarks/fastweight.py (which checks before it times).

Both sides get the same bf16/fp16 inputs (the fp64 side upcasts them exactly), so what differs is
the path's own arithmetic. With eps = eps(dtype) and ρ = eps(fp32)/eps (fp32 work in units of eps):
* the kernels' matmul accumulators g = k W0ᵀ, u = k W2ᵀ, d = v W1 are fp32 sums of exact products:
  |δg| ≤ dk·ρ·eps·S_g with S_g = |k| |W0|ᵀ (Σ|terms|), likewise u (dk) and d (dv);
* an element-wise epilogue value y(g, u, d) moves by the first-order terms |∂y/∂x|·|δx|
  (|silu′| ≤ 1.1, |silu″| ≤ 0.5) and is rounded once to the dtype (eps/2·|y|; the other eps/2 of
  n = 1 covers its few fp32 operations; below the dtype's smallest normal number the rounding is
  absolute, half a subnormal step: eps·tiny/2, so tiny/2 joins every rounded value's scale);
* a cuBLAS product of such values (dW02 = dguᵀ k, dW1 = vᵀ hid, out = hidden W1ᵀ) adds the
  propagated element bounds (Σ|terms| of the bounds), its fp32 sum (length·ρ·eps·Σ|terms|) and one
  rounding. cuBLAS must accumulate in fp32: `fp32_cublas()` disallows its reduced-precision
  (bf16/fp16) split-K reductions while checking.
So each comparison is `assert_close(..., n=1, scale=S)` with S the elementwise bound above in
units of eps: these are not loose normwise bounds, an error in any element fails.

The whole stream (`swiglu_fast_weight`, several chunks) is compared normwise instead: the weights
of chunk c carry the roundings of every earlier chunk (dgu|hid, dW, W: 3 a chunk, plus the apply's
hidden and output), so n = 3·chunks + 2; safety 2 because each chunk sum's error is relative to
its terms, which cancel (their values are smaller than Σ|terms|).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from nectar.lact import fastweight as fw
from nectar.lact import fastweight_triton as ft
from tests.tolerance import eps, tol, within

DOUBLE = torch.float64
SILU_SLOPE = 1.1  # max |silu′(x)| = 1.0998 (at x ≈ 2.4)
SILU_CURVE = 0.5  # max |silu″(x)| = 0.5 (at x = 0)


@contextlib.contextmanager
def fp32_cublas():
    """cuBLAS bf16/fp16 products accumulate in fp32 inside (the bounds assume it); restored after."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction)
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


def compare(actual, expected, *, dtype, scale=None, n=1, safety=1.0, what="") -> float:
    """assert_close with the rule (tests/tolerance.py `within`: elements equal on both sides pass, NaN
    fails); decided on the tensors' device, `within` only words a failure. Returns the worst
    |actual − expected| / tol (for reports)."""
    actual = actual.to(DOUBLE)
    if scale is None:
        finite = expected[torch.isfinite(expected)]
        scale = finite.abs().max() if finite.numel() else torch.zeros((), dtype=DOUBLE, device=expected.device)
    err = (actual - expected).abs()
    bound = tol(dtype, n, 1.0, safety) * scale
    bad = (actual != expected) & ~(err <= bound)
    if bool(bad.any()):
        ok, message = within(actual, expected, dtype=dtype, n=n, scale=scale, safety=safety)
        raise AssertionError(f"{what}: {message}")
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scale of one rounding to dtype: |value|, plus half a subnormal step (in units of eps) for underflow."""
    return values.abs() + torch.finfo(dtype).tiny / 2


def _abs_mm(a, b):
    return torch.bmm(a.abs(), b.abs())


def update_bounds(k, v, w02, w1, lr0, lr1, lr2):
    """fp64 reference of the update kernel's outputs and their element bounds (units of eps):
    {"dgate"|"dup"|"hid": (expected, scale)}; inputs in the path's dtype."""
    dtype = k.dtype
    rho = eps(torch.float32) / eps(dtype)
    k, v, w02, w1, lr0, lr1, lr2 = (t.to(DOUBLE) for t in (k, v, w02, w1, lr0, lr1, lr2))
    h = w02.shape[1] // 2
    dk, dv = k.shape[2], v.shape[2]
    w0, w2 = w02[:, :h], w02[:, h:]
    g, u, d = torch.bmm(k, w0.mT), torch.bmm(k, w2.mT), torch.bmm(v, w1)
    dg_abs, du_abs, dd_abs = (dk * rho * _abs_mm(k, w0.mT), dk * rho * _abs_mm(k, w2.mT),
                              dv * rho * _abs_mm(v, w1))  # fp32 accumulator errors / eps
    sigma = torch.sigmoid(g)
    silu, dsilu = g * sigma, sigma * (1 + g * (1 - sigma))
    dgate = lr0 * d * u * dsilu
    dup = lr2 * d * silu
    hid = lr1 * silu * u
    s_dgate = _rounded(dgate, dtype) + lr0.abs() * ((u * dsilu).abs() * dd_abs + (d * dsilu).abs() * du_abs
                                         + SILU_CURVE * (d * u).abs() * dg_abs)
    s_dup = _rounded(dup, dtype) + lr2.abs() * (silu.abs() * dd_abs + SILU_SLOPE * d.abs() * dg_abs)
    s_hid = _rounded(hid, dtype) + lr1.abs() * (silu.abs() * du_abs + SILU_SLOPE * u.abs() * dg_abs)
    return {"dgate": (dgate, s_dgate), "dup": (dup, s_dup), "hid": (hid, s_hid)}


def hidden_bounds(x, w02):
    """fp64 silu(x W0ᵀ) ⊙ (x W2ᵀ) and its element bound (units of eps)."""
    dtype = x.dtype
    rho = eps(torch.float32) / eps(dtype)
    x, w02 = x.to(DOUBLE), w02.to(DOUBLE)
    h, dk = w02.shape[1] // 2, x.shape[2]
    w0, w2 = w02[:, :h], w02[:, h:]
    g, u = torch.bmm(x, w0.mT), torch.bmm(x, w2.mT)
    silu = F.silu(g)
    hidden = silu * u
    scale = _rounded(hidden, dtype) + dk * rho * (silu.abs() * _abs_mm(x, w2.mT)
                                                  + SILU_SLOPE * u.abs() * _abs_mm(x, w0.mT))
    return hidden, scale


def _product_scale(left_scale, right, left_values, length, rho, expected, dtype):
    """Bound of a cuBLAS product left·right from left's element bounds: propagated + fp32 sum + rounding."""
    return (torch.bmm(left_scale, right.abs()) + length * rho * torch.bmm(left_values.abs(), right.abs())
            + 0.5 * _rounded(expected, dtype))


def check_pieces(inputs: dict, chunk: int, heads: int | None = None) -> dict[str, float]:
    """One chunk of the Triton path (apply, update kernel, update, step) against fp64 at the chunk's
    start; inputs as for swiglu_fast_weight (bf16/fp16). The Triton side runs on every head of the
    inputs (so at the shape, and with the autotuned configs, that a benchmark then times), the fp64
    side on the first `heads` (default all), which are compared. Raises AssertionError; returns
    worst ratios."""
    dtype = inputs["q"].dtype
    rho = eps(torch.float32) / eps(dtype)
    c = slice(0, chunk)
    q, k, v = inputs["q"][:, c], inputs["k"][:, c], inputs["v"][:, c]
    lrs = tuple(inputs[n][:, c] for n in ("lr0", "lr1", "lr2"))
    w02 = torch.cat([inputs["w0"], inputs["w2"]], dim=1)
    w1 = inputs["w1"]
    h, length = w02.shape[1] // 2, k.shape[1]
    s = slice(0, q.shape[0] if heads is None else heads)  # the compared heads
    q_s, k_s, v_s, w02_s, w1_s = q[s], k[s], v[s], w02[s], w1[s]
    lrs_s = tuple(lr[s] for lr in lrs)
    ratios = {}
    with torch.no_grad(), fp32_cublas():
        # the update kernel's element-wise outputs, every element
        dgu, hid = ft.swiglu_update_operands(k, v, w02, w1, *lrs)
        dgu, hid = dgu[s], hid[s]
        bounds = update_bounds(k_s, v_s, w02_s, w1_s, *lrs_s)
        for name, got in (("dgate", dgu[..., :h]), ("dup", dgu[..., h:]), ("hid", hid)):
            expected, scale = bounds[name]
            ratios[f"update kernel {name}"] = compare(got, expected, dtype=dtype, scale=scale, what=name)
        # the update (kernel + cuBLAS) against the fp64 torch update
        dw02, dw1 = (d[s] for d in ft.swiglu_chunk_update_fused(k, v, w02, w1, *lrs))
        ref02, ref1 = fw.swiglu_chunk_update_fused(*(t.to(DOUBLE) for t in (k_s, v_s, w02_s, w1_s, *lrs_s)))
        k64, v64 = k_s.to(DOUBLE), v_s.to(DOUBLE)
        s_dgu = torch.cat([bounds["dgate"][1], bounds["dup"][1]], dim=-1)
        dgu_ref = torch.cat([bounds["dgate"][0], bounds["dup"][0]], dim=-1)
        scale02 = _product_scale(s_dgu.mT, k64, dgu_ref.mT, length, rho, ref02, dtype)
        scale1 = torch.bmm(v64.abs().mT, bounds["hid"][1]) + length * rho * torch.bmm(
            v64.abs().mT, bounds["hid"][0].abs()) + 0.5 * _rounded(ref1, dtype)
        ratios["dW02"] = compare(dw02, ref02, dtype=dtype, scale=scale02, what="dW02")
        ratios["dW1"] = compare(dw1, ref1, dtype=dtype, scale=scale1, what="dW1")
        # the apply: hidden (kernel) and output (kernel + cuBLAS)
        hidden = ft.swiglu_hidden(q, w02)[s]
        hidden_ref, s_hidden = hidden_bounds(q_s, w02_s)
        ratios["apply hidden"] = compare(hidden, hidden_ref, dtype=dtype, scale=s_hidden, what="apply hidden")
        out = ft.swiglu_apply_fused(q, w02, w1)[s]
        out_ref = fw.swiglu_apply_fused(q_s.to(DOUBLE), w02_s.to(DOUBLE), w1_s.to(DOUBLE))
        w1t = w1_s.to(DOUBLE).mT
        scale_out = _product_scale(s_hidden, w1t, hidden_ref, h, rho, out_ref, dtype)
        ratios["apply out"] = compare(out, out_ref, dtype=dtype, scale=scale_out, what="apply out")
        # the step (W + dW, weight norm) on the path's own dW: a sum, a row norm (C squares), ÷, ×
        for name, w, dw in (("step W02", w02_s, dw02), ("step W1", w1_s, dw1)):
            target = fw.row_norms(w)
            got = ft.add_renormalize_rows(w, dw, target)
            expected = fw.renormalize_rows(w.to(DOUBLE) + dw.to(DOUBLE), target.to(DOUBLE))
            scale = _rounded(expected, dtype) * (1 + rho * (w.shape[-1] + 8))
            ratios[name] = compare(got, expected, dtype=dtype, scale=scale, what=name)
    return ratios


def check_stream(inputs: dict, chunk: int, *, momentum=None, use_muon=False, weight_norm=True,
                 causal=True, heads: int | None = None) -> dict[str, float]:
    """swiglu_fast_weight(backend="triton") against the fp64 torch kernel, normwise (module docstring);
    the Triton side on every head, the fp64 side on the first `heads` (default all), which are compared."""
    dtype = inputs["q"].dtype
    chunks = math.ceil(inputs["q"].shape[1] / chunk)
    s = slice(0, inputs["q"].shape[0] if heads is None else heads)
    options = dict(chunk_size=chunk, use_muon=use_muon, weight_norm=weight_norm, causal=causal)
    with torch.no_grad(), fp32_cublas():
        out, weights = fw.swiglu_fast_weight(**inputs, momentum=momentum, backend="triton", **options)
        out, weights = out[s], tuple(w[s] for w in weights)
        ref_out, ref_weights = fw.swiglu_fast_weight(
            **{n: t[s].to(DOUBLE) for n, t in inputs.items()},
            momentum=None if momentum is None else momentum[s].to(DOUBLE), **options)
    # Muon's quintic amplifies rounding in small singular directions (tests/lact NS5_GAIN)
    safety = 2.0 * (fw.NS5_COEFFICIENTS[0] ** fw.NS5_STEPS if use_muon else 1.0)
    n = 3 * chunks + 2
    ratios = {"stream out": compare(out, ref_out, dtype=dtype, n=n, safety=safety, what="stream outputs")}
    for name, got, want in zip(("W0", "W1", "W2"), weights, ref_weights):
        ratios[f"stream {name}"] = compare(got, want, dtype=dtype, n=n, safety=safety, what=f"final {name}")
    return ratios
