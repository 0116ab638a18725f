"""A Mixture-of-Experts expert whose SwiGLU weights are LaCT fast weights (LaCT Algorithm 1).

`LaCTMoEExpert` treats the tokens routed to it as one stream, in arrival order across forward
calls. Its SwiGLU fast weights take one update per chunk of `chunk_size` routed tokens, causally
(apply-then-update): every token is answered with the weights left by the complete chunks before
it, and its key, value and learning rates are buffered until its chunk is full. Fast weights,
momentum and the buffer are carried across calls; `reset()` restores the slow (trained) weights.

Per token: q, k, v = projections of x (silu; q and k L2-normalised per head, as in LaCT),
per-token learning rates softplus(Linear(x) + b), optional momentum gate sigmoid(Linear(x)).
Output: per-head RMSNorm of f_W(q), then an output projection back to d_model.

Gradients: within one forward call the update graph is kept (slow weights, projections and
learning-rate heads are trainable through it); the carried state is detached between calls
(truncated backpropagation), so training code should `reset()` at every new sequence batch.

Importing this module registers the expert kind "lact" (`ExpertSpec(kind="lact", hidden=H)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nectar.moe.experts import Expert, register_expert_kind
from nectar.lact.fastweight import (
    NS5_STEPS,
    fast_weight_step,
    row_norms,
    swiglu_apply,
    swiglu_chunk_update,
)


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


@dataclass
class FastWeightInputs:
    """Per-head fast-weight inputs of n tokens (heads as the batch axis H).

    q, k [H, n, dk]; v [H, n, dv]; lr0, lr1, lr2 [H, n, 1]; momentum [H, n, 1] or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lr0: torch.Tensor
    lr1: torch.Tensor
    lr2: torch.Tensor
    momentum: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.q.shape[1]

    def tokens(self, start: int, stop: int) -> "FastWeightInputs":
        cut = lambda t: None if t is None else t[:, start:stop]  # noqa: E731
        return FastWeightInputs(*(cut(t) for t in self.fields()))

    def fields(self) -> tuple:
        return (self.q, self.k, self.v, self.lr0, self.lr1, self.lr2, self.momentum)

    def detached(self) -> "FastWeightInputs":
        """Detached copies (copies, so that a buffered tail does not pin a whole call's tensors)."""
        return FastWeightInputs(*(None if t is None else t.detach().clone() for t in self.fields()))

    @staticmethod
    def concat(parts: list["FastWeightInputs"]) -> "FastWeightInputs":
        columns = zip(*(p.fields() for p in parts))
        return FastWeightInputs(*(None if c[0] is None else torch.cat(c, dim=1) for c in columns))


@dataclass
class LaCTStreamState:
    """What the expert carries between calls.

    weights          current fast weights (w0 [H, dh, dk], w1 [H, dv, dh], w2 [H, dh, dk]);
                     None until the first update: the slow weights themselves (trainable)
    previous_deltas  momentum-accumulated updates of the last chunk (None before the first)
    pending          buffered inputs of the current, incomplete chunk
    chunks_done      updates taken since the last reset
    """

    weights: tuple[torch.Tensor, ...] | None = None
    previous_deltas: tuple[torch.Tensor, ...] | None = None
    pending: list[FastWeightInputs] = field(default_factory=list)
    chunks_done: int = 0

    @property
    def pending_tokens(self) -> int:
        return sum(p.num_tokens for p in self.pending)

    def detach_(self, first_new_pending: int = 0) -> None:
        """Cut the autograd graph at a call boundary; pending entries before `first_new_pending`
        are already detached copies from earlier calls."""
        if self.weights is not None:
            self.weights = tuple(w.detach() for w in self.weights)
        if self.previous_deltas is not None:
            self.previous_deltas = tuple(d.detach() for d in self.previous_deltas)
        fresh = [p.detached() for p in self.pending[first_new_pending:]]
        self.pending = self.pending[:first_new_pending] + fresh


class LaCTMoEExpert(Expert):
    """forward(x [N, D]) -> [N, D] through per-head SwiGLU fast weights updated once per chunk.

    d_model: model width D; hidden: total fast-weight hidden width (split over `num_heads`);
    chunk_size: routed tokens per update; use_muon / use_momentum / weight_norm: the update's
    optional steps (fastweight.fast_weight_step); base_lr: learning rate at zero lr logits.
    """

    kind = "lact"

    def __init__(self, d_model: int, hidden: int, chunk_size: int = 2048, *, num_heads: int = 1,
                 use_muon: bool = False, use_momentum: bool = False, weight_norm: bool = True,
                 base_lr: float = 1e-3):
        super().__init__(d_model)
        self._check_config(d_model, hidden, chunk_size, num_heads, base_lr)
        self.hidden, self.chunk_size, self.num_heads = hidden, chunk_size, num_heads
        self.head_dim, self.head_hidden = d_model // num_heads, hidden // num_heads
        self.use_muon, self.use_momentum, self.weight_norm = use_muon, use_momentum, weight_norm
        self.adapt = True  # False: answer with the current fast weights and take no updates
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)  # weight [3D, D]
        self.lr_proj = nn.Linear(d_model, 3 * num_heads)  # weight [3H, D]
        self.base_lr_logit = inverse_softplus(base_lr)
        self.momentum_proj = nn.Linear(d_model, num_heads) if use_momentum else None
        dk, dh = self.head_dim, self.head_hidden
        self.w0 = nn.Parameter(torch.randn(num_heads, dh, dk) / math.sqrt(dk))  # [H, dh, dk]
        self.w1 = nn.Parameter(torch.randn(num_heads, dk, dh) / math.sqrt(dh))  # [H, dv, dh]
        self.w2 = nn.Parameter(torch.randn(num_heads, dh, dk) / math.sqrt(dk))  # [H, dh, dk]
        self.out_norm = nn.RMSNorm(dk, eps=1e-6)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)  # weight [D, D]
        self.state: LaCTStreamState | None = None

    @staticmethod
    def _check_config(d_model, hidden, chunk_size, num_heads, base_lr) -> None:
        for name, value in (("hidden", hidden), ("chunk_size", chunk_size), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaCTMoEExpert {name} must be a positive int, got {value!r}")
        if d_model % num_heads or hidden % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} and hidden={hidden}")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")

    # ---- stream state -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream: fast weights back to the slow weights, momentum and buffer cleared."""
        self.state = None

    def _current_state(self) -> LaCTStreamState:
        if self.state is None:
            self.state = LaCTStreamState()
        return self.state

    def _weights(self, state: LaCTStreamState | None) -> tuple[torch.Tensor, ...]:
        if state is None or state.weights is None:
            return (self.w0, self.w1, self.w2)
        return state.weights

    def fast_weights(self) -> tuple[torch.Tensor, ...]:
        """The fast weights the next token will be answered with (detached copies)."""
        return tuple(w.detach().clone() for w in self._weights(self.state))

    # ---- per-token projections ----------------------------------------------------------------

    def project(self, x: torch.Tensor) -> FastWeightInputs:
        """x [N, D] -> per-head q, k, v, learning rates and momentum gates."""
        heads = lambda t: t.reshape(t.shape[0], self.num_heads, -1).transpose(0, 1)  # noqa: E731  [N, H*d] -> [H, N, d]
        q, k, v = F.silu(self.qkv_proj(x)).chunk(3, dim=-1)  # [N, D] each
        q = F.normalize(heads(q), dim=-1, eps=1e-5)  # [H, N, dk]
        k = F.normalize(heads(k), dim=-1, eps=1e-5)  # [H, N, dk]
        lrs = F.softplus(self.lr_proj(x) + self.base_lr_logit)  # [N, 3H]
        lr0, lr1, lr2 = heads(lrs).chunk(3, dim=-1)  # [H, N, 1] each
        momentum = None if self.momentum_proj is None else heads(torch.sigmoid(self.momentum_proj(x)))  # [H, N, 1]
        return FastWeightInputs(q, k, heads(v), lr0, lr1, lr2, momentum)

    def readout(self, fast_out: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm and output projection: fast_out [H, N, dv] -> [N, D]."""
        normed = self.out_norm(fast_out)  # [H, N, dv]
        return self.o_proj(normed.transpose(0, 1).reshape(fast_out.shape[1], self.d_model))  # [N, D]

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        inputs = self.project(x)
        state = self._current_state()
        carried = len(state.pending)  # buffered entries from earlier calls
        outputs, start = [], 0
        while start < inputs.num_tokens:
            room = self.chunk_size - state.pending_tokens if self.adapt else inputs.num_tokens
            segment = inputs.tokens(start, start + room)
            outputs.append(swiglu_apply(segment.q, *self._weights(state)))  # [H, n, dv]
            if self.adapt:
                state.pending.append(segment)
                if state.pending_tokens == self.chunk_size:
                    self._update(state)
                    carried = 0
            start += segment.num_tokens
        fast_out = torch.cat(outputs, dim=1) if outputs else inputs.v  # [H, N, dv]
        state.detach_(first_new_pending=carried)
        return self.readout(fast_out)

    def _update(self, state: LaCTStreamState) -> None:
        """One LaCT update from the buffered chunk; clears the buffer."""
        chunk = FastWeightInputs.concat(state.pending)
        weights = self._weights(state)
        deltas = swiglu_chunk_update(chunk.k, chunk.v, *weights, chunk.lr0, chunk.lr1, chunk.lr2)
        gate = None if chunk.momentum is None else chunk.momentum.mean(dim=1, keepdim=True)  # [H, 1, 1]
        targets = tuple(row_norms(w) for w in (self.w0, self.w1, self.w2)) if self.weight_norm else None
        state.weights, state.previous_deltas = fast_weight_step(
            weights, deltas, state.previous_deltas, gate, self.use_muon, targets
        )
        state.pending = []
        state.chunks_done += 1

    # ---- cost ---------------------------------------------------------------------------------

    def flops_per_token(self) -> float:
        d, heads, dk, dh = self.d_model, self.num_heads, self.head_dim, self.head_hidden
        projections = 2 * d * (3 * d) + 2 * d * d + 2 * d * 3 * heads
        if self.momentum_proj is not None:
            projections += 2 * d * heads
        apply = 6 * dk * dh * heads  # three matmuls of the SwiGLU fast-weight net on q
        update = 12 * dk * dh * heads  # per chunk 12·dk·dh·C per head, amortised over its C tokens
        muon = 0.0
        if self.use_muon:  # NS5 on w0, w2 [dh, dk] and w1 [dk, dh] once per chunk, amortised
            r, c = min(dk, dh), max(dk, dh)
            muon = 3 * heads * NS5_STEPS * (4 * r * r * c + 2 * r**3) / self.chunk_size
        return float(projections + apply + update + muon)

    def activation_elements_per_token(self) -> float:
        # x read; q, k, v and the 3H learning rates written then read; gate, up, hidden written
        # then read twice over (apply on q, update on k); fast output, its norm and y written.
        d, heads, dh = self.d_model, self.num_heads, self.head_hidden
        return float(d + 2 * (3 * d + 3 * heads) + 2 * 2 * 3 * dh * heads + 3 * d)


register_expert_kind("lact", lambda d_model, hidden: LaCTMoEExpert(d_model, hidden), needs_hidden=True)
