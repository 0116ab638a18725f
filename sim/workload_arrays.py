"""ChunkWorkload → validated numpy arrays [L, E], the input of the vectorised pricer.

Validation happens here once, with ValueErrors that name the offending field, so that a bad
workload never reaches the roofline as NaNs or a numpy broadcasting error. Layers with fewer
experts than the widest layer are padded with zero-token experts (which cost nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nectar.telemetry.workload import ChunkWorkload, ExpertCost

_SHAPE_FIELDS = ("tokens", "batch", "seq_len", "d_model", "n_layers", "n_heads", "vocab_size", "dtype_bytes")


@dataclass
class ExpertArrays:
    counts: np.ndarray          # [L, E] tokens routed to each expert (int64, zero padded)
    flops: np.ndarray           # [L, E] FLOPs per token
    bytes: np.ndarray           # [L, E] activation bytes per token
    weight_bytes: np.ndarray    # [L, E]
    n_experts: np.ndarray       # [L] real (unpadded) experts per layer
    router_flops: np.ndarray    # [L] router FLOPs per token


def _check_shape(w: ChunkWorkload) -> None:
    if not isinstance(w, ChunkWorkload):
        raise ValueError(f"workload must be a nectar.telemetry.workload.ChunkWorkload, got {type(w).__name__}")
    for name in _SHAPE_FIELDS:
        value = getattr(w, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"ChunkWorkload.{name} must be a positive integer, got {value!r}")
    if w.tokens != w.batch * w.seq_len:
        raise ValueError(f"ChunkWorkload.tokens={w.tokens} must equal batch*seq_len={w.batch * w.seq_len}")
    if len(w.layers) != w.n_layers:
        raise ValueError(f"ChunkWorkload has {len(w.layers)} layer workloads but n_layers={w.n_layers}")
    _check_serving_fields(w)
    for l, layer in enumerate(w.layers):
        if not layer.tokens_per_expert or len(layer.tokens_per_expert) != len(layer.expert_costs):
            raise ValueError(f"layer {l}: tokens_per_expert has {len(layer.tokens_per_expert)} entries and "
                             f"expert_costs {len(layer.expert_costs)}; they must match and be non-empty")


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _check_serving_fields(w: ChunkWorkload) -> None:
    """attention_pairs, kv_read_tokens, logit_tokens and phase of a serving step."""
    pairs = w.attention_pairs
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, (int, float, np.number))
                              or not np.isfinite(pairs) or pairs < 0):
        raise ValueError(f"ChunkWorkload.attention_pairs must be None or a finite number >= 0, got {pairs!r}")
    if not _is_int(w.kv_read_tokens) or w.kv_read_tokens < 0:
        raise ValueError(f"ChunkWorkload.kv_read_tokens must be a non-negative integer, got {w.kv_read_tokens!r}")
    logits = w.logit_tokens
    if logits is not None and (not _is_int(logits) or not 0 < logits <= w.tokens):
        raise ValueError(f"ChunkWorkload.logit_tokens must be None or an integer in [1, tokens={w.tokens}], got {logits!r}")
    if w.phase not in ("", "prefill", "decode"):
        raise ValueError(f"ChunkWorkload.phase must be '', 'prefill' or 'decode', got {w.phase!r}")


_NO_EXPERT = ExpertCost(0.0, 0.0, 0.0, "zero")


def _padded_layers(w: ChunkWorkload, width: int) -> tuple[list[list[int]], list]:
    """Counts [L][E] and costs flattened over [L·E], narrow layers padded with idle zero experts."""
    counts, costs = [], []
    for layer in w.layers:
        missing = width - len(layer.tokens_per_expert)
        counts.append(list(layer.tokens_per_expert) + [0] * missing if missing else layer.tokens_per_expert)
        costs.extend(layer.expert_costs)
        costs.extend([_NO_EXPERT] * missing)
    return counts, costs


def workload_arrays(w: ChunkWorkload) -> ExpertArrays:
    """Validate `w` and return its per-layer, per-expert arrays."""
    _check_shape(w)
    n_experts = [len(layer.tokens_per_expert) for layer in w.layers]
    width = max(n_experts)
    counts_rows, costs = _padded_layers(w, width)
    counts = np.array(counts_rows)  # [L, E]
    if counts.dtype.kind not in "iu" or counts.min() < 0:
        raise ValueError(f"tokens_per_expert must be non-negative integers, got {w.expert_counts()}")
    per_token = np.array([[c.flops for c in costs], [c.bytes for c in costs], [c.weight_bytes for c in costs]],
                         dtype=float).reshape(3, w.n_layers, width)  # [3, L, E]: flops, bytes/token, weight bytes
    if not (np.isfinite(per_token).all() and per_token.min() >= 0):
        raise ValueError("expert costs (flops, bytes, weight_bytes) must be finite and >= 0, got "
                         f"{[layer.expert_costs for layer in w.layers]}")
    router = np.array([layer.router_flops_per_token for layer in w.layers], dtype=float)  # [L]
    if not (np.isfinite(router).all() and router.min() >= 0):
        raise ValueError(f"router_flops_per_token must be finite and >= 0, got {router.tolist()}")
    return ExpertArrays(counts.astype(np.int64, copy=False), per_token[0], per_token[1], per_token[2],
                        np.array(n_experts), router)
