"""The router as a fast-weight network: dynamic expert scores adapted per chunk from an external loss.

`FastWeightRouterNet` (one per MoE layer) maps tokens to a score delta over the E experts,

    scores(x) = f_W(x) − f_{W_slow}(x) + b,    f_W(x) = W1 · (silu(W0 x) ⊙ (W2 x)),

with SwiGLU fast weights W0, W2 [h, D], W1 [E, h] and a fast per-expert bias b [E]. At reset
W = W_slow and b = 0, so the delta is exactly zero and routing starts as the trained (static)
router's. The bias alone is the parametrisation that reaches the convex chunk problem's optimum
(docs/design.md §3); the SwiGLU part lets the delta depend on the token.

`step(signal, lr, momentum, use_muon)` takes one optimizer step per chunk from an externally
supplied loss — the controller's energy + quality loss, not LaCT's dot-product loss: either the
gradient of that loss w.r.t. the scores of the tokens of the last forward ([N, E]), or a callable
scores -> scalar loss. The gradient w.r.t. the fast weights comes from autograd; the update reuses
LaCT's pieces (nectar.lact.fastweight): heavy-ball momentum, optional Muon on the matrices, then
weight norm of every matrix row back to the slow weights' row norms. The bias takes momentum only.

Muon's orthogonalised direction has unit spectral scale whatever the gradient's size, so on its own
it would take full-size steps on a near-zero gradient. Here the orthogonalised direction is
rescaled to the Frobenius norm of the (momentum-accumulated) gradient: Muon chooses the direction,
the gradient the length, and a vanishing gradient moves nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from nectar.lact.fastweight import renormalize_rows, row_norms, swiglu_apply, zeropower_via_newtonschulz5

LossSignal = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def scaled_muon(step: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalised direction of `step` [..., r, c], rescaled to ‖step‖_F."""
    direction = zeropower_via_newtonschulz5(step)
    norm = torch.linalg.matrix_norm(direction, keepdim=True).clamp_min(1e-30)
    return direction * (torch.linalg.matrix_norm(step, keepdim=True) / norm)


@dataclass
class RouterStepStats:
    """What one `step` did: the external loss (nan when only its gradient was given), the norm of
    the gradient w.r.t. all fast parameters, and the norm of the change of the fast parameters."""

    loss: float
    grad_norm: float
    update_norm: float
    steps_done: int


class FastWeightRouterNet(nn.Module):
    """forward(x [N, D]) -> dynamic scores [N, E]; step(signal, lr, ...) adapts the fast weights."""

    def __init__(self, d_model: int, num_experts: int, hidden: int = 16, *, weight_norm: bool = True, seed: int = 0):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastWeightRouterNet {name} must be a positive int, got {value!r}")
        self.d_model, self.num_experts, self.hidden, self.weight_norm = d_model, num_experts, hidden, weight_norm
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("slow_w0", torch.randn(1, hidden, d_model, generator=gen) / math.sqrt(d_model))  # [1, h, D]
        self.register_buffer("slow_w1", torch.randn(1, num_experts, hidden, generator=gen) / math.sqrt(hidden))  # [1, E, h]
        self.register_buffer("slow_w2", torch.randn(1, hidden, d_model, generator=gen) / math.sqrt(d_model))  # [1, h, D]
        for name in ("w0", "w1", "w2"):
            self.register_buffer(f"fast_{name}", getattr(self, f"slow_{name}").clone(), persistent=False)
        self.register_buffer("fast_bias", torch.zeros(num_experts), persistent=False)  # [E]
        self._previous: tuple[torch.Tensor, ...] | None = None  # momentum state (w0, w1, w2, bias)
        self._last_inputs: torch.Tensor | None = None
        self.steps_done = 0

    # ---- state --------------------------------------------------------------------------------

    def slow_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.slow_w0, self.slow_w1, self.slow_w2

    def fast_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fast_w0, self.fast_w1, self.fast_w2

    def reset(self) -> None:
        """Back to the slow weights and a zero bias; momentum and cached inputs forgotten."""
        for name in ("w0", "w1", "w2"):
            getattr(self, f"fast_{name}").copy_(getattr(self, f"slow_{name}"))
        self.fast_bias.zero_()
        self._previous, self._last_inputs, self.steps_done = None, None, 0

    # ---- scores -------------------------------------------------------------------------------

    def _scores(self, x: torch.Tensor, w0, w1, w2, bias) -> torch.Tensor:
        tokens = x.to(w0.dtype).unsqueeze(0)  # [1, N, D]
        fast = swiglu_apply(tokens, w0, w1, w2)  # [1, N, E]
        slow = swiglu_apply(tokens, *self.slow_weights())  # [1, N, E]
        return (fast - slow)[0] + bias  # [N, E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic score delta [N, E] for tokens x [N, D]; remembers x for the next `step`."""
        self._check_tokens(x)
        self._last_inputs = x.detach()
        return self._scores(x, *self.fast_weights(), self.fast_bias).to(x.dtype)

    def _check_tokens(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FastWeightRouterNet expects tokens of shape [N, {self.d_model}], got {shape}")

    # ---- adaptation ---------------------------------------------------------------------------

    def step(self, signal: LossSignal, lr: float, momentum: float | None = None, use_muon: bool = False,
             inputs: torch.Tensor | None = None) -> RouterStepStats:
        """One chunk's update from an external loss on the scores of `inputs` (default: the tokens
        of the last forward). `signal`: ∂loss/∂scores [N, E], or a callable scores [N, E] -> scalar.
        Fast params θ (W0, W1, W2, b) move by lr · (−∇θ + momentum · previous), with Muon
        orthogonalising the matrix steps when `use_muon`; then matrix rows are renormalised."""
        tokens = self._step_inputs(inputs)
        self._check_step_args(lr, momentum)
        loss, grads = self._gradients(signal, tokens)
        deltas = tuple(-g for g in grads)  # minus gradients: (w0, w1, w2, bias)
        previous = self._previous
        targets = tuple(row_norms(w) for w in self.slow_weights()) if self.weight_norm else None
        with torch.no_grad():
            old = [t.clone() for t in (*self.fast_weights(), self.fast_bias)]
            steps = deltas if momentum is None or previous is None else tuple(
                d + momentum * p for d, p in zip(deltas, previous))
            for index, (buffer, step) in enumerate(zip(self.fast_weights(), steps[:3])):
                direction = scaled_muon(step) if use_muon else step
                value = buffer + lr * direction
                buffer.copy_(renormalize_rows(value, targets[index]) if targets is not None else value)
            self.fast_bias.add_(lr * steps[3])
            self._previous = steps
            change = torch.sqrt(sum(((t - o) ** 2).sum() for t, o in zip((*self.fast_weights(), self.fast_bias), old)))
        self.steps_done += 1
        grad_norm = torch.sqrt(sum((g**2).sum() for g in grads))
        return RouterStepStats(loss, float(grad_norm), float(change), self.steps_done)

    def _step_inputs(self, inputs: torch.Tensor | None) -> torch.Tensor:
        if inputs is None:
            if self._last_inputs is None:
                raise ValueError("step() needs the tokens of a forward() first, or pass inputs=[N, D]")
            return self._last_inputs
        self._check_tokens(inputs)
        return inputs.detach()

    @staticmethod
    def _check_step_args(lr: float, momentum: float | None) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")

    def _gradients(self, signal: LossSignal, tokens: torch.Tensor) -> tuple[float, tuple[torch.Tensor, ...]]:
        """(loss or nan, gradients w.r.t. (W0, W1, W2, b)) by autograd through the scores."""
        leaves = [t.detach().clone().requires_grad_(True) for t in (*self.fast_weights(), self.fast_bias)]
        with torch.enable_grad():
            scores = self._scores(tokens, *leaves)  # [N, E]
            if callable(signal):
                loss = signal(scores)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("a loss callable must return a scalar tensor")
                value = float(loss.detach())
            else:
                if not isinstance(signal, torch.Tensor) or signal.shape != scores.shape:
                    shape = list(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
                    raise ValueError(f"gradient w.r.t. the scores must have shape {list(scores.shape)}, got {shape}")
                loss, value = (scores * signal.detach().to(scores.dtype)).sum(), float("nan")
            grads = torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
        return value, tuple(torch.zeros_like(l) if g is None else g for g, l in zip(grads, leaves))
