"""LaCT Algorithm 1: large-chunk test-time training of a SwiGLU fast-weight network.

The functional kernel `swiglu_fast_weight` runs a token stream through per-head fast weights
f_W(x) = W1 · (silu(W0 x) ⊙ (W2 x)) that take one update per chunk of `chunk_size` tokens. The
update is the hand-derived minus-gradient of the inner loss L = −Σ_i η_i ⟨f_W(k_i), v_i⟩
(docs/design.md §4), followed by optional momentum, optional Muon (Newton–Schulz orthogonalisation)
and weight normalisation back to the initial row norms. Heads are folded into the batch axis B.

The pieces are exposed so that other fast-weight users (the LaCT expert, the fast-weight router)
share one implementation: `swiglu_apply`, `swiglu_chunk_update`, `fast_weight_step`,
`zeropower_via_newtonschulz5`, `renormalize_rows`, `row_norms`.

Fused layout: the kernel keeps W0 and W2 stacked as one weight W02 = [W0; W2] [B, 2dh, dk], so
that gate and up come out of one bmm (`swiglu_apply_fused`) and dW0, dW2 out of one bmm over the
stacked [dgate·lr0 | dup·lr2] (`swiglu_chunk_update_fused`): six bmm per chunk instead of nine,
each larger. Muon orthogonalises W0's and W2's updates separately (`fast_weight_step(...,
row_blocks=(2, 1))`), weight norm is per row, so the result is the unfused algorithm's.

Everything computes in the dtype of its inputs (fp64 in, fp64 out; bf16 matmuls accumulate in
fp32 in cuBLAS); mixed precision is the caller's choice.

Lean variant (`swiglu_fast_weight(..., lean=True)`, what the hybrid attention layer uses): the same
sums with fewer element-wise kernels forward and backward, for autograd training —
`swiglu_apply_lean`, `swiglu_chunk_update_lean`, `fast_weight_step_lean`: gate and up come apart
by `chunk` (backward: one cat, where two slices each zero-fill a full-width gradient), silu′ as one
addcmul σ + silu(g)(1 − σ) instead of four kernels, and the weight norm multiplies by one per-row
factor. Equal to the default path up to rounding
(tests/lact/test_fastweight.py runs both against the token-loop reference).

`swiglu_fast_weight(..., backend="triton")` runs the same stream with the element-wise work fused
into Triton matmul kernels (`nectar.lact.fastweight_triton`: CUDA, bf16/fp16, forward only);
`backend="auto"` takes that path where it can and this module's torch code elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from nectar.lact.muon import (MUON_EPS, NS5_COEFFICIENTS, NS5_STEPS, WEIGHT_NORM_EPS,  # noqa: F401  (re-exported)
                               momentum_steps, zeropower_via_newtonschulz5)

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def swiglu_apply(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """f_W(x) = W1 · (silu(W0 x) ⊙ (W2 x)) for every token: x [B, L, dk] -> [B, L, dv]."""
    gate = torch.bmm(x, w0.transpose(1, 2))  # [B, L, dh]
    up = torch.bmm(x, w2.transpose(1, 2))  # [B, L, dh]
    hidden = F.silu(gate) * up  # [B, L, dh]
    return torch.bmm(hidden, w1.transpose(1, 2))  # [B, L, dv]


def silu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d silu(x) / dx = σ(x) · (1 + x · (1 − σ(x)))."""
    sigma = torch.sigmoid(x)
    return sigma * (1 + x * (1 - sigma))


def swiglu_apply_fused(x: torch.Tensor, w02: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """f_W(x) with W0, W2 stacked as w02 [B, 2dh, dk]: x [B, L, dk] -> [B, L, dv] in two bmm."""
    dh = w02.shape[1] // 2
    gate_up = torch.bmm(x, w02.transpose(1, 2))  # [B, L, 2dh]
    hidden = F.silu(gate_up[..., :dh]) * gate_up[..., dh:]  # [B, L, dh]
    return torch.bmm(hidden, w1.transpose(1, 2))  # [B, L, dv]


def swiglu_chunk_update(
    k: torch.Tensor,
    v: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
) -> Weights:
    """Hand-derived update (dW0, dW1, dW2) from one chunk: k [B, l, dk], v [B, l, dv], lr* [B, l, 1].

    dWj = −∂Lj/∂Wj with Lj = −Σ_i lrj_i ⟨f_W(k_i), v_i⟩, i.e. with g = W0 k, h = W2 k,
    hid = silu(g) ⊙ h and dhid = W1ᵀ v:
        dW1 = Σ_i lr1_i v_i hid_iᵀ
        dW2 = Σ_i lr2_i (dhid ⊙ silu(g))_i k_iᵀ
        dW0 = Σ_i lr0_i (dhid ⊙ h ⊙ silu′(g))_i k_iᵀ
    Computed in the fused layout (`swiglu_chunk_update_fused`).
    """
    dh = w0.shape[1]
    dw02, dw1 = swiglu_chunk_update_fused(k, v, torch.cat([w0, w2], dim=1), w1, lr0, lr1, lr2)
    return dw02[:, :dh], dw1, dw02[:, dh:]


def swiglu_chunk_update_fused(
    k: torch.Tensor,
    v: torch.Tensor,
    w02: torch.Tensor,
    w1: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`swiglu_chunk_update` with W0, W2 stacked: returns (dW02 = [dW0; dW2] [B, 2dh, dk], dW1)
    from four bmm: [g | h] = k W02ᵀ, dhid = v W1, dW1 = (lr1 v)ᵀ hid, dW02 = [lr0 dg | lr2 dh]ᵀ k."""
    dh = w02.shape[1] // 2
    gate_up = torch.bmm(k, w02.transpose(1, 2))  # [B, l, 2dh]
    gate, up = gate_up[..., :dh], gate_up[..., dh:]
    sigma = torch.sigmoid(gate)
    gate_act = gate * sigma  # silu(g)  [B, l, dh]
    dhidden = torch.bmm(v, w1)  # [B, l, dh]  (rows of W1ᵀ v)
    dgate_up = torch.cat([dhidden * up * (sigma * (1 + gate * (1 - sigma))) * lr0,  # lr0 · dhid ⊙ h ⊙ silu′(g)
                          dhidden * gate_act * lr2], dim=-1)  # lr2 · dhid ⊙ silu(g)  -> [B, l, 2dh]
    dw1 = torch.bmm((v * lr1).transpose(1, 2), gate_act * up)  # [B, dv, dh]
    dw02 = torch.bmm(dgate_up.transpose(1, 2), k)  # [B, 2dh, dk]
    return dw02, dw1


def swiglu_apply_lean(x: torch.Tensor, w02: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """`swiglu_apply_fused` with gate and up split by `chunk` (its backward is one cat, not two
    zero-filled slice gradients): x [B, L, dk] -> [B, L, dv]."""
    gate, up = torch.bmm(x, w02.transpose(1, 2)).chunk(2, dim=-1)  # [B, L, dh] each
    return torch.bmm(F.silu(gate) * up, w1.transpose(1, 2))  # [B, L, dv]


def swiglu_chunk_update_lean(
    k: torch.Tensor,
    v: torch.Tensor,
    w02: torch.Tensor,
    w1: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`swiglu_chunk_update_fused` in fewer element-wise kernels: gate and up split by `chunk`, silu′(g)
    as one addcmul σ + silu(g)(1 − σ) (the fused `aten.silu_backward` has no double backward).
    Returns (dW02 [B, 2dh, dk], dW1 [B, dv, dh])."""
    gate, up = torch.bmm(k, w02.transpose(1, 2)).chunk(2, dim=-1)  # [B, l, dh] each
    sigma = torch.sigmoid(gate)  # [B, l, dh]
    gate_act = gate * sigma  # silu(g)  [B, l, dh]
    silu_slope = torch.addcmul(sigma, gate_act, 1 - sigma)  # silu′(g) = σ + silu(g)(1 − σ)  [B, l, dh]
    dhidden = torch.bmm(v, w1)  # [B, l, dh]  (rows of W1ᵀ v)
    dgate = dhidden * up * silu_slope * lr0  # lr0 · dhid ⊙ h ⊙ silu′(g)  [B, l, dh]
    dup = dhidden * gate_act * lr2  # lr2 · dhid ⊙ silu(g)  [B, l, dh]
    dw1 = torch.bmm((v * lr1).transpose(1, 2), gate_act * up)  # [B, dv, dh]
    dw02 = torch.bmm(torch.cat([dgate, dup], dim=-1).transpose(1, 2), k)  # [B, 2dh, dk]
    return dw02, dw1


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """Norm of every row (over the last dimension): w [..., r, c] -> [..., r, 1]."""
    return w.norm(dim=-1, keepdim=True)


def renormalize_rows(w: torch.Tensor, target_norms: torch.Tensor, eps: float = WEIGHT_NORM_EPS) -> torch.Tensor:
    """Weight norm: rescale each row of w [..., r, c] to `target_norms` [..., r, 1] (+eps in the divisor)."""
    return w / (row_norms(w) + eps) * target_norms


def rescale_rows(w: torch.Tensor, target_norms: torch.Tensor, eps: float = WEIGHT_NORM_EPS) -> torch.Tensor:
    """`renormalize_rows` as one multiply of w [..., r, c] by target / (‖row‖ + eps), computed on the
    [..., r, 1] norms."""
    return w * (target_norms / (row_norms(w) + eps))


def fast_weight_step(
    weights: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    previous_deltas: Sequence[torch.Tensor] | None = None,
    momentum_gate: torch.Tensor | float | None = None,
    use_muon: bool = False,
    target_norms: Sequence[torch.Tensor] | None = None,
    scale: float = 1.0,
    row_blocks: Sequence[int] | None = None,
    lean: bool = False,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """One optimizer step of matrix fast weights, in LaCT's order.

    deltas are the raw updates (LaCT: minus gradient times per-token learning rates). With
    `momentum_gate` m (a scalar or a tensor broadcasting against each delta, e.g. [B, 1, 1]) and
    `previous_deltas`, dW ← dW + m·dW_prev. Then Muon (if `use_muon`), W ← W + scale·dW, and
    weight norm to `target_norms` (if given). `scale` is 1 in LaCT; an optimizer with one scalar
    learning rate passes minus gradients as deltas and the rate as `scale` (Muon's convention:
    the rate multiplies the orthogonalised step). Returns (new weights, momentum-accumulated
    deltas), the latter to pass as `previous_deltas` at the next chunk.

    `row_blocks[i]` (default 1) splits weight i into that many equal row blocks that Muon
    orthogonalises separately (the fused [W0; W2] passes 2). `lean`: the weight norm as one multiply
    (`rescale_rows`) instead of a divide and a multiply over the whole weight.
    """
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights but {len(deltas)} deltas")
    steps, accumulated = momentum_steps(deltas, previous_deltas, momentum_gate, use_muon, scale, row_blocks)
    renorm = rescale_rows if lean else renormalize_rows
    new_weights = [w + step if target_norms is None else renorm(w + step, target_norms[index])
                   for index, (w, step) in enumerate(zip(weights, steps))]
    return tuple(new_weights), accumulated


fast_weight_step_lean = partial(fast_weight_step, lean=True)


def _check_kernel_inputs(q, k, v, w0, w1, w2, lrs, chunk_size, momentum) -> None:
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [B, L, dk] and v [B, L, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, _, dk = q.shape
    dv = v.shape[2]
    dh = w0.shape[1] if w0.ndim == 3 else -1
    expected = {"w0": (batch, dh, dk), "w2": (batch, dh, dk), "w1": (batch, dv, dh)}
    for name, w in (("w0", w0), ("w1", w1), ("w2", w2)):
        if tuple(w.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (B, rows, cols), got {tuple(w.shape)}")
    for name, lr in zip(("lr0", "lr1", "lr2"), lrs):
        if tuple(lr.shape) != (batch, q.shape[1], 1):
            raise ValueError(f"{name} must have shape {(batch, q.shape[1], 1)}, got {tuple(lr.shape)}")
    if momentum is not None and tuple(momentum.shape) != (batch, q.shape[1], 1):
        raise ValueError(f"momentum must be None or of shape {(batch, q.shape[1], 1)}, got {tuple(momentum.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def swiglu_fast_weight(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
    chunk_size: int,
    *,
    use_muon: bool = False,
    momentum: torch.Tensor | None = None,
    weight_norm: bool = True,
    causal: bool = True,
    backend: str = "torch",
    lean: bool = False,
) -> tuple[torch.Tensor, Weights]:
    """Run a stream through chunk-wise updated SwiGLU fast weights.

    q, k [B, L, dk]; v [B, L, dv]; w0, w2 [B, dh, dk]; w1 [B, dv, dh]; lr0, lr1, lr2 [B, L, 1];
    momentum None or [B, L, 1] in (0, 1). Returns out [B, L, dv] and the weights after the
    update with every chunk (the last, possibly shorter, chunk included), so that a stream can
    continue in a later call. causal=True: apply-then-update per chunk; causal=False:
    update-then-apply. Weight norm restores the row norms of the weights passed in.
    Momentum state does not cross calls (it starts at zero in each call).

    backend: "torch" (this module), "triton" (fused Triton kernels, `nectar.lact.fastweight_triton`:
    CUDA, bf16/fp16, no autograd; raises where it cannot run) or "auto" (Triton where it can run).
    lean: the torch path's lean functions (module doc; same sums, fewer element-wise kernels).
    """
    _check_kernel_inputs(q, k, v, w0, w1, w2, (lr0, lr1, lr2), chunk_size, momentum)
    apply, update, step = _chunk_functions(backend, (q, k, v, w0, w1, w2, lr0, lr1, lr2), lean)
    dh = w0.shape[1]
    weights: tuple[torch.Tensor, ...] = (torch.cat([w0, w2], dim=1), w1)  # (W02 [B, 2dh, dk], W1 [B, dv, dh])
    target_norms = tuple(row_norms(w) for w in weights) if weight_norm else None  # [B, rows, 1] each
    previous: tuple[torch.Tensor, ...] | None = None
    outputs = []
    for start in range(0, q.shape[1], chunk_size):
        chunk = slice(start, start + chunk_size)
        if causal:
            outputs.append(apply(q[:, chunk], *weights))  # [B, l, dv]
        deltas = update(k[:, chunk], v[:, chunk], *weights, lr0[:, chunk], lr1[:, chunk], lr2[:, chunk])
        gate = None if momentum is None else momentum[:, chunk].mean(dim=1, keepdim=True)  # [B, 1, 1]
        weights, previous = step(weights, deltas, previous, gate, use_muon, target_norms, row_blocks=(2, 1))
        if not causal:
            outputs.append(apply(q[:, chunk], *weights))  # [B, l, dv]
    out = torch.cat(outputs, dim=1) if outputs else v.new_zeros(v.shape)  # [B, L, dv]
    w02, w1_out = weights
    return out, (w02[:, :dh], w1_out, w02[:, dh:])


BACKENDS = ("torch", "triton", "auto")


def _chunk_functions(backend: str, tensors: Sequence[torch.Tensor], lean: bool = False):
    """(apply, update, step) of one chunk for `swiglu_fast_weight`'s backend (lean: the torch path's
    lean functions)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    torch_path = ((swiglu_apply_lean, swiglu_chunk_update_lean, fast_weight_step_lean) if lean
                  else (swiglu_apply_fused, swiglu_chunk_update_fused, fast_weight_step))
    if backend == "torch":
        return torch_path
    from nectar.lact import fastweight_triton

    if backend == "auto" and not fastweight_triton.supported(*tensors):
        return torch_path
    fastweight_triton.require(*tensors)
    return (fastweight_triton.swiglu_apply_fused, fastweight_triton.swiglu_chunk_update_fused,
            fastweight_triton.fast_weight_step)
