"""Muon's orthogonalisation of fast-weight updates (Newton–Schulz quintic) and the shared constants.

Used by both fast-weight paths: `nectar.lact.fastweight` (torch) and `nectar.lact.fastweight_triton`
(fused kernels), which therefore import it rather than each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS5_STEPS = 5
MUON_EPS = 1e-7
WEIGHT_NORM_EPS = 1e-5


def zeropower_via_newtonschulz5(g: torch.Tensor, steps: int = NS5_STEPS, eps: float = MUON_EPS) -> torch.Tensor:
    """Muon's Newton–Schulz quintic: push the singular values of each matrix g [..., r, c] towards 1.

    X ← X / (‖X‖_F + eps), transposed when r > c so that A = X Xᵀ is the smaller Gram matrix,
    then `steps` times X ← aX + (bA + cA²)X with (a, b, c) = (3.4445, −4.7750, 2.0315). The
    quintic is tuned for speed, not exactness: singular values land near, not at, 1.
    """
    if g.ndim < 2:
        raise ValueError(f"Newton–Schulz needs matrices [..., rows, cols], got shape {tuple(g.shape)}")
    a, b, c = NS5_COEFFICIENTS
    transpose = g.shape[-2] > g.shape[-1]
    x = g.mT if transpose else g  # [..., r', c'] with r' <= c'
    x = x / (torch.linalg.matrix_norm(x, ord="fro", keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # [..., r', r']
        x = a * x + (b * gram + c * gram @ gram) @ x  # [..., r', c']
    return x.mT if transpose else x


def orthogonalise_blocks(delta: torch.Tensor, blocks: int) -> torch.Tensor:
    """Newton–Schulz on each of `blocks` equal row blocks of delta [..., r, c] (one batched call)."""
    if blocks == 1:
        return zeropower_via_newtonschulz5(delta)
    rows, cols = delta.shape[-2:]
    split = delta.reshape(*delta.shape[:-2], blocks, rows // blocks, cols)  # [..., blocks, r/blocks, c]
    return zeropower_via_newtonschulz5(split).reshape(delta.shape)


def momentum_steps(deltas: Sequence[torch.Tensor], previous_deltas: Sequence[torch.Tensor] | None,
                   momentum_gate: torch.Tensor | float | None, use_muon: bool, scale: float,
                   row_blocks: Sequence[int] | None) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """(steps to add to the weights, momentum-accumulated deltas): dW ← dW + m·dW_prev, then Muon per
    row block (if `use_muon`), then × scale — the part of a fast-weight step both paths share."""
    accumulated = list(deltas)
    if momentum_gate is not None and previous_deltas is not None:
        accumulated = [d + momentum_gate * p for d, p in zip(deltas, previous_deltas)]
    steps = []
    for index, d in enumerate(accumulated):
        step = orthogonalise_blocks(d, row_blocks[index] if row_blocks else 1) if use_muon else d
        steps.append(step if scale == 1.0 else scale * step)
    return steps, tuple(accumulated)
