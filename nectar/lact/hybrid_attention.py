"""LaCT Algorithm 2: a hybrid attention layer, drop-in for GPT-2's attention.

One shared qkv projection (GPT-2's `c_attn`) feeds two branches:
(a) causal sliding-window softmax attention for local dependencies (`sliding_window_attention`),
(b) a LaCT branch: per-head SwiGLU fast weights updated once per large chunk (apply-then-update,
    nectar.lact.fastweight.swiglu_fast_weight), for long-range memory.
The TTT output gets a per-head RMSNorm and a per-head gain, is added to the attention output,
and the sum goes through GPT-2's `c_proj`.

`HybridLaCTAttention(config, layer_idx)` subclasses transformers' `GPT2Attention`, so it replaces
`block.attn` of a `GPT2Block` and keeps `c_attn` / `c_proj` (a trained GPT-2's attention weights
load as they are). Configuration attributes read from the GPT2Config (defaults in brackets):
lact_window [256], lact_chunk_size [2048], lact_num_heads [n_head], lact_inter_multi [2.0],
lact_use_muon [False], lact_use_momentum [False], lact_base_lr [1e-3], lact_ttt_gain_init [0.0].
With the default gain 0 the layer starts as plain sliding-window GPT-2 attention (so a trained
model keeps its behaviour, and equals GPT-2 exactly when the window covers the sequence) and the
gain is learned. Transformers' weight init resets norms to 1 but leaves the gain alone.

Speed options (implementation only; config attributes, defaults in brackets; `set_speed_options`
changes them on a built model):
- lact_lean [True]: the fast-weight stream through `swiglu_fast_weight(..., lean=True)` (same
  sums, fewer element-wise kernels forward and backward) and the q/k affine as one addcmul;
- lact_cast_inputs [False]: the stream's q, k and learning rates cast once to v's dtype (under
  bf16 autocast: bf16, where otherwise q and k are cast at every bmm and the fp32 rates promote
  the update's element-wise products to fp32; one more bf16 rounding of the rates), and the TTT
  RMSNorm's weight to its input's dtype (rms_norm's fused kernel instead of the mixed-dtype
  fallback); a no-op in fp32;
- lact_compile [False]: the LaCT branch (`lact_memory`, a free function so that the six layers
  share one graph) under torch.compile, falling back to eager with a warning when compiling fails
  (e.g. no C++ compiler on a CPU host). A failure inside the compiled backward is not caught.
tests/lact/test_speed_options.py checks each against the reference path (all off).

Limits: no KV cache. The layer accepts and ignores `past_key_values` / `use_cache` and never
writes to the cache, so generation must run with `use_cache=False` (every step recomputes the
whole prefix). Padding masks from the model are applied to the window attention; padded tokens
still write into the fast weights (pad on the right, or not at all). No cross-attention.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from nectar.lact.fastweight import swiglu_fast_weight


def _band_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[q, k] bool: key j is visible to query i iff 0 <= pos_i − pos_j < window."""
    distance = query_positions[:, None] - key_positions[None, :]  # [q, k]
    return (distance >= 0) & (distance < window)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    scale: float | None = None,
    allowed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention where each query sees itself and the `window − 1` keys before it.

    q, k, v [B, H, T, d] -> [B, H, T, d]. `allowed` (optional, bool, broadcastable to
    [B, H, T, T], e.g. [B, 1, 1, T] for key padding) further restricts visibility. Queries are processed in
    blocks of `block_size` (default: the window, at least 256) against the keys they can reach,
    so memory is O(T · (block + window)), not O(T²). A query left with no visible key attends to
    itself (finite output instead of NaN).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k, v of shape [B, H, T, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    length = q.shape[2]
    block = block_size or max(window, 256)
    positions = torch.arange(length, device=q.device)
    outputs = []
    for q_start in range(0, length, block):
        q_stop = min(length, q_start + block)
        k_start = max(0, q_start - window + 1)
        visible = _band_mask(positions[q_start:q_stop], positions[k_start:q_stop], window)  # [bq, bk]
        if allowed is not None:
            rows = allowed if allowed.shape[-2] == 1 else allowed[..., q_start:q_stop, :]  # [B|1, H|1, bq|1, T]
            visible = visible & rows[..., k_start:q_stop]  # [B|1, H|1, bq, bk]
            diagonal = _band_mask(positions[q_start:q_stop], positions[k_start:q_stop], 1)  # [bq, bk]
            visible = visible | (diagonal & ~visible.any(dim=-1, keepdim=True))
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, q_start:q_stop], k[:, :, k_start:q_stop], v[:, :, k_start:q_stop],
            attn_mask=visible, dropout_p=dropout_p, scale=scale,
        ))  # [B, H, bq, d]
    return torch.cat(outputs, dim=2) if outputs else torch.zeros_like(v)  # [B, H, T, d]


def visibility_from_hf_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Bool visibility (True = may attend) from what transformers passes: a 4-D mask [B, 1, T, T]
    (bool, True = visible; or additive float, 0 = visible) or a 2-D padding mask [B, T] (1 = token).
    None when absent or of another shape (e.g. with a cache, which this layer does not use)."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2 and attention_mask.shape[-1] == length:
        return attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    if attention_mask.ndim != 4 or attention_mask.shape[-2:] != (length, length):
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


class LaCTParams(NamedTuple):
    """The LaCT branch's parameters, as `lact_memory` takes them."""

    qk_affine: torch.Tensor  # [scale|offset, q|k, D]
    lr_weight: torch.Tensor  # [3Hf, D]
    lr_bias: torch.Tensor  # [3Hf]
    momentum_weight: torch.Tensor | None  # [Hf, D]
    momentum_bias: torch.Tensor | None  # [Hf]
    w0: torch.Tensor  # [Hf, dh, dk]
    w1: torch.Tensor  # [Hf, dv, dh]
    w2: torch.Tensor  # [Hf, dh, dk]
    norm_weight: torch.Tensor  # [dk]
    gain: torch.Tensor  # [Hf, 1, 1]


class LaCTSettings(NamedTuple):
    """The LaCT branch's static settings (hashable: torch.compile specialises on them)."""

    heads: int
    chunk_size: int
    base_lr_logit: float
    norm_eps: float
    use_muon: bool
    lean: bool
    cast_inputs: bool


def fold_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, Hf·d] -> [B·Hf, T, d]."""
    batch, length, _ = t.shape
    return t.view(batch, length, heads, -1).transpose(1, 2).reshape(batch * heads, length, -1)


def _feature(t: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, lean: bool) -> torch.Tensor:
    """silu(t · scale + offset): t [B, T, D], scale and offset [D]."""
    return F.silu(torch.addcmul(offset, t, scale) if lean else t * scale + offset)


def lact_memory(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: LaCTParams,
                s: LaCTSettings) -> torch.Tensor:
    """The LaCT branch of the layer: x, q, k, v [B, T, D] -> gained, normed fast-weight output [B, T, D]."""
    batch, length, d_model = x.shape
    scale, offset = p.qk_affine[0], p.qk_affine[1]  # [2, D] each
    fast_q = F.normalize(fold_heads(_feature(q, scale[0], offset[0], s.lean), s.heads), dim=-1, eps=1e-5)  # [B·Hf, T, dk]
    fast_k = F.normalize(fold_heads(_feature(k, scale[1], offset[1], s.lean), s.heads), dim=-1, eps=1e-5)  # [B·Hf, T, dk]
    fast_v = fold_heads(F.silu(v), s.heads)  # [B·Hf, T, dv]
    lrs = F.softplus(F.linear(x, p.lr_weight, p.lr_bias) + s.base_lr_logit)  # [B, T, 3·Hf]
    lr0, lr1, lr2 = fold_heads(lrs, s.heads).chunk(3, dim=-1)  # [B·Hf, T, 1] each
    momentum = None
    if p.momentum_weight is not None:
        momentum = fold_heads(torch.sigmoid(F.linear(x, p.momentum_weight, p.momentum_bias)), s.heads)  # [B·Hf, T, 1]
    if s.cast_inputs:
        fast_q, fast_k, lr0, lr1, lr2 = (t.to(fast_v.dtype) for t in (fast_q, fast_k, lr0, lr1, lr2))
    weights = [w.repeat(batch, 1, 1) for w in (p.w0, p.w1, p.w2)]  # [B·Hf, rows, cols]
    fast_out, _ = swiglu_fast_weight(fast_q, fast_k, fast_v, *weights, lr0, lr1, lr2, s.chunk_size,
                                     use_muon=s.use_muon, momentum=momentum, causal=True, lean=s.lean)  # [B·Hf, T, dv]
    norm_weight = p.norm_weight.to(fast_out.dtype) if s.cast_inputs else p.norm_weight  # [dv] (same dtype: fused)
    normed = F.rms_norm(fast_out, (fast_out.shape[-1],), norm_weight, s.norm_eps)  # [B·Hf, T, dv]
    gained = normed.view(batch, s.heads, length, -1) * p.gain  # [B, Hf, T, dv]
    return gained.transpose(1, 2).reshape(batch, length, d_model)  # [B, T, D]


_COMPILED: dict[str, object] = {}


def compiled_lact_memory():
    """torch.compile(lact_memory), made once per process (None after a failure: eager from then on)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(lact_memory, dynamic=False)
    return _COMPILED["fn"]


def run_lact_memory(compile_branch: bool, *args) -> torch.Tensor:
    """lact_memory(*args), compiled when asked and compiling works (else eager, with one warning)."""
    fn = compiled_lact_memory() if compile_branch else None
    if fn is None:
        return lact_memory(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  torch.compile raises many types (backend, missing compiler)
        _COMPILED["fn"] = None
        warnings.warn(f"lact_compile: torch.compile failed ({str(exc).splitlines()[0][:200]}); running eager",
                      RuntimeWarning, stacklevel=2)
        return lact_memory(*args)


class HybridLaCTAttention(GPT2Attention):
    """GPT-2 attention with a sliding window plus a LaCT fast-weight branch (see module doc)."""

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, is_cross_attention=False, layer_idx=layer_idx)
        d_model, heads = config.hidden_size, config.num_attention_heads
        self.window = int(getattr(config, "lact_window", 256))
        self.lact_chunk_size = int(getattr(config, "lact_chunk_size", 2048))
        self.lact_heads = int(getattr(config, "lact_num_heads", None) or heads)
        self.use_muon = bool(getattr(config, "lact_use_muon", False))
        self.use_momentum = bool(getattr(config, "lact_use_momentum", False))
        base_lr = float(getattr(config, "lact_base_lr", 1e-3))
        inter_multi = float(getattr(config, "lact_inter_multi", 2.0))
        self._check_config(d_model, base_lr, inter_multi)
        self.fw_dim = d_model // self.lact_heads
        self.fw_hidden = max(1, int(self.fw_dim * inter_multi))
        self.attn_scale = self._attention_scale(config, layer_idx)
        self.base_lr_logit = base_lr + math.log(-math.expm1(-base_lr))  # inverse softplus
        self.qk_affine = nn.Parameter(torch.stack([torch.ones(2, d_model), torch.zeros(2, d_model)]))  # [scale|offset, q|k, D]
        self.lr_proj = nn.Linear(d_model, 3 * self.lact_heads)  # weight [3Hf, D]
        self.momentum_proj = nn.Linear(d_model, self.lact_heads) if self.use_momentum else None
        dk, dh, hf = self.fw_dim, self.fw_hidden, self.lact_heads
        self.w0 = nn.Parameter(torch.randn(hf, dh, dk) / math.sqrt(dk))  # [Hf, dh, dk]
        self.w1 = nn.Parameter(torch.randn(hf, dk, dh) / math.sqrt(dh))  # [Hf, dv, dh]
        self.w2 = nn.Parameter(torch.randn(hf, dh, dk) / math.sqrt(dk))  # [Hf, dh, dk]
        self.ttt_norm = nn.RMSNorm(dk, eps=1e-6)
        self.ttt_gain = nn.Parameter(torch.full((hf, 1, 1), float(getattr(config, "lact_ttt_gain_init", 0.0))))  # [Hf, 1, 1]
        self.set_speed_options(lean=bool(getattr(config, "lact_lean", True)),
                               cast_inputs=bool(getattr(config, "lact_cast_inputs", False)),
                               compile_branch=bool(getattr(config, "lact_compile", False)))

    def set_speed_options(self, lean: bool | None = None, cast_inputs: bool | None = None,
                          compile_branch: bool | None = None) -> None:
        """Change the implementation options (module doc); None keeps an option as it is."""
        if lean is not None:
            self.lean = lean
        if cast_inputs is not None:
            self.cast_inputs = cast_inputs
        if compile_branch is not None:
            self.compile_branch = compile_branch

    def _check_config(self, d_model: int, base_lr: float, inter_multi: float) -> None:
        if self.window < 1 or self.lact_chunk_size < 1:
            raise ValueError(f"lact_window and lact_chunk_size must be >= 1, got {self.window}, {self.lact_chunk_size}")
        if self.lact_heads < 1 or d_model % self.lact_heads:
            raise ValueError(f"lact_num_heads={self.lact_heads} must divide hidden_size={d_model}")
        if not base_lr > 0 or not inter_multi > 0:
            raise ValueError(f"lact_base_lr and lact_inter_multi must be > 0, got {base_lr}, {inter_multi}")

    @staticmethod
    def _attention_scale(config, layer_idx: int | None) -> float:
        """GPT-2's softmax scale: 1/√head_dim if scale_attn_weights, divided by layer_idx + 1
        if scale_attn_by_inverse_layer_idx."""
        scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float((layer_idx or 0) + 1)
        return scale

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        """hidden_states [B, T, D] -> (output [B, T, D], None). Cache arguments are ignored."""
        if encoder_hidden_states is not None:
            raise ValueError("HybridLaCTAttention is self-attention only (no cross-attention)")
        batch, length, d_model = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)  # [B, T, D] each
        local = self._window_branch(q, k, v, visibility_from_hf_mask(attention_mask, length))  # [B, T, D]
        memory = self._lact_branch(hidden_states, q, k, v)  # [B, T, D]
        out = self.resid_dropout(self.c_proj(local + memory))  # [B, T, D]
        return out, None

    def _window_branch(self, q, k, v, visible) -> torch.Tensor:
        heads = lambda t: t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731 [B, H, T, hd]
        dropout = self.attn_dropout.p if self.training else 0.0
        out = sliding_window_attention(heads(q), heads(k), heads(v), self.window, scale=self.attn_scale,
                                       allowed=visible, dropout_p=dropout)  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(q.shape)  # [B, T, D]

    def _lact_branch(self, x, q, k, v) -> torch.Tensor:
        """x, q, k, v [B, T, D] -> the LaCT branch's output [B, T, D] (`lact_memory`)."""
        momentum = self.momentum_proj
        params = LaCTParams(self.qk_affine, self.lr_proj.weight, self.lr_proj.bias,
                            None if momentum is None else momentum.weight, None if momentum is None else momentum.bias,
                            self.w0, self.w1, self.w2, self.ttt_norm.weight, self.ttt_gain)
        settings = LaCTSettings(self.lact_heads, self.lact_chunk_size, self.base_lr_logit, self.ttt_norm.eps,
                                self.use_muon, self.lean, self.cast_inputs)
        return run_lact_memory(self.compile_branch, x, q, k, v, params, settings)


def set_speed_options(model: nn.Module, **options) -> int:
    """`HybridLaCTAttention.set_speed_options(**options)` on every hybrid layer of `model`; returns
    how many layers there were."""
    layers = [m for m in model.modules() if isinstance(m, HybridLaCTAttention)]
    for layer in layers:
        layer.set_speed_options(**options)
    return len(layers)
