"""LaCT Algorithms 3 and 4: the SwiGLU fast-weight kernel split over torch.distributed ranks.

Both functions reproduce the single-process kernel `nectar.lact.fastweight.swiglu_fast_weight`
(same arguments, same options — momentum, Muon, weight norm, causal — and the same results up to
floating-point reassociation) and are differentiable: autograd runs through the collectives of
`nectar.lact.collectives`.

* `context_parallel_fast_weight` (Algorithm 3, context parallelism). Every chunk of
  `chunk_size` tokens is cut into `world_size` equal contiguous slices; rank r holds the r-th
  slice of every chunk, so its tensors are [B, L/W, ·] (`context_shard_index` builds that
  layout). Per chunk, each rank applies the current fast weights to its own queries, computes its
  partial update (a sum over its tokens) and ONE SUM all-reduce combines the partial updates of
  all ranks (dW0, dW1, dW2 and the momentum-gate sum packed into one flat buffer). The
  non-linear steps (momentum, Muon, weight norm) then run identically on every rank, so every
  rank ends with the same fast weights. A shorter last chunk is supported: each rank holds an
  equal share of it (its length must be divisible by W, which the layout guarantees).
  The momentum gate of a chunk is the mean of `momentum` over the chunk's tokens; each rank
  contributes its local sum and the gate is (sum of local sums) / (W · local slice length),
  the same number the single-process `momentum[:, chunk].mean(dim=1)` computes.
  The initial weights w0, w1, w2 are replicated (every rank passes the same tensors); their
  gradients on one rank are that rank's share: their sum over the ranks (a SUM all-reduce, as
  for any parameter replicated over a context-parallel group) is the single-process gradient.
  Gradients of the token inputs (q, k, v, lr*, momentum) are complete on their own rank.

* `head_parallel_fast_weight` (Algorithm 4, head parallelism). Each rank passes its contiguous
  sequence shard for ALL heads (batch × heads folded in the first dimension BH, divisible by W)
  and the fast weights of ITS OWN heads only, [BH/W, ·, ·]: rank r owns the heads
  [r·BH/W, (r+1)·BH/W) (`head_shard` slices a full tensor). One all-to-all gives every rank the
  whole sequence of its heads, the single-process kernel runs locally, one all-to-all returns the
  outputs for the rank's sequence shard. Returns those outputs [BH, l_r, dv] and the final fast
  weights of the rank's own heads. Shards may have different lengths (the all-to-alls use split
  sizes). Gradients w.r.t. the own-heads weights are complete (no summation needed).

Autograd caveat (as for any collective in a graph): every rank must backpropagate through the
same collectives, so use the returned outputs and final weights in the loss on all ranks or on
none (a zero-weighted use counts as a use); otherwise the ranks' backward collectives mismatch.

Input errors raise ValueError on EVERY rank: a rank first checks its own inputs, then all ranks
exchange a small metadata row (one all_gather), so a bad shape on one rank, or ranks that disagree
on a shape or an option, make all ranks raise instead of hanging in a later collective.

Communication per chunk of `chunk_size` tokens, per rank: Alg. 3 all-reduces B·(2·dh·dk + dv·dh)
(+B with momentum) elements; Alg. 4 sends BH·(chunk_size/W)·(2·dk + 2·dv + 3 (+1)) elements on
average (inputs out, outputs back, amortised over the call). Optional `comm_stats` (a `CommStats`)
accumulates the wall time, call count and payload bytes of the forward collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from nectar.lact.collectives import CommStats, all_reduce_sum, all_to_all
from nectar.lact.fastweight import (
    Weights,
    fast_weight_step,
    row_norms,
    swiglu_apply,
    swiglu_chunk_update,
    swiglu_fast_weight,
)

# ----------------------------------------------------------------------------- layout helpers


def context_shard_index(length: int, chunk_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Token indices rank `rank` holds in Algorithm 3: its slice of every chunk, in order.

    Use as `x.index_select(1, index)` on a full [B, L, ·] tensor. Raises ValueError when the
    chunk size or the (shorter) last chunk is not divisible by the world size.
    """
    if chunk_size % world_size:
        raise ValueError(f"chunk_size {chunk_size} is not divisible by the world size {world_size}")
    if length % chunk_size % world_size:
        raise ValueError(
            f"the last chunk has {length % chunk_size} tokens (L={length}, chunk_size={chunk_size}), "
            f"not divisible by the world size {world_size}"
        )
    pieces = []
    for start in range(0, length, chunk_size):
        share = (min(chunk_size, length - start)) // world_size
        pieces.append(torch.arange(start + rank * share, start + (rank + 1) * share))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def head_shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rank's own heads of a [BH, ...] tensor in Algorithm 4: rows [r·BH/W, (r+1)·BH/W)."""
    if x.shape[0] % world_size:
        raise ValueError(f"batch × heads {x.shape[0]} is not divisible by the world size {world_size}")
    per_rank = x.shape[0] // world_size
    return x[rank * per_rank : (rank + 1) * per_rank]


# ----------------------------------------------------------------------------- validation


def _group_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group (or use swiglu_fast_weight)")
    return dist.get_world_size(group)


def _shape_error(name: str, tensor: torch.Tensor | None, expected: tuple[int, ...]) -> str | None:
    if tensor is None or tuple(tensor.shape) == expected:
        return None
    return f"{name} must have shape {expected}, got {tuple(tensor.shape)}"


def _first_error(checks: Sequence[str | None]) -> str | None:
    return next((message for message in checks if message is not None), None)


def _common_checks(q, k, v, lrs, momentum, chunk_size) -> str | None:
    """Errors the two algorithms share: token tensors and chunk size (local shapes)."""
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        return f"expected q, k [B, l, dk] and v [B, l, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not isinstance(chunk_size, int) or chunk_size < 1:
        return f"chunk_size must be a positive int, got {chunk_size!r}"
    token_shape = (q.shape[0], q.shape[1], 1)
    named = list(zip(("lr0", "lr1", "lr2"), lrs)) + [("momentum", momentum)]
    return _first_error([_shape_error(name, t, token_shape) for name, t in named])


def _weight_checks(w0, w1, w2, heads: int, dk: int, dv: int, hint: str = "") -> str | None:
    if w0.ndim != 3:
        return f"w0 must be [heads, dh, dk], got {tuple(w0.shape)}"
    dh = w0.shape[1]
    expected = {"w0": (heads, dh, dk), "w1": (heads, dv, dh), "w2": (heads, dh, dk)}
    errors = [_shape_error(name, w, expected[name]) for name, w in (("w0", w0), ("w1", w1), ("w2", w2))]
    error = _first_error(errors)
    return None if error is None else error + hint


def _agree(error: str | None, meta: dict[str, int], group, device: torch.device,
           may_differ: tuple[str, ...] = ()) -> list[dict[str, int]]:
    """Collective validation: every rank raises if any rank's inputs are bad or ranks disagree
    on an entry of `meta` (except those in `may_differ`). Returns every rank's metadata.
    """
    names = list(meta)
    row = torch.tensor([int(error is not None)] + [meta[n] for n in names], dtype=torch.int64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, row, group=group)
    table = [dict(zip(names, r[1:].tolist())) for r in rows]
    bad_ranks = [rank for rank, r in enumerate(rows) if r[0].item()]
    if error is not None:
        raise ValueError(error)
    if bad_ranks:
        raise ValueError(f"invalid inputs on rank(s) {bad_ranks} (their error says which); no rank ran")
    for name in names:
        values = [entry[name] for entry in table]
        if name not in may_differ and len(set(values)) > 1:
            raise ValueError(f"ranks disagree on {name}: {values}")
    return table


_DTYPE_CODES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # metadata code = index


def _options_meta(chunk_size, use_muon, momentum, weight_norm, causal, dtype: torch.dtype) -> dict[str, int]:
    return {
        "chunk_size": int(chunk_size) if isinstance(chunk_size, int) else -1,
        "use_muon": int(bool(use_muon)),
        "momentum": int(momentum is not None),
        "weight_norm": int(bool(weight_norm)),
        "causal": int(bool(causal)),
        "dtype": _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else -1,
    }


# ----------------------------------------------------------------------------- Algorithm 3


def _context_meta(q, v, w0, chunk_size, world, options) -> tuple[str | None, dict[str, int]]:
    """Local validation of Algorithm 3 inputs and the metadata all ranks must agree on."""
    lrs, momentum = options["lrs"], options["momentum"]
    error = _common_checks(q, options["k"], v, lrs, momentum, chunk_size)
    if error is None:
        error = _weight_checks(w0, options["w1"], options["w2"], q.shape[0], q.shape[2], v.shape[2])
    if error is None and chunk_size % world:
        error = (f"chunk_size {chunk_size} is not divisible by the world size {world} "
                 "(each rank holds chunk_size/W tokens of every chunk)")
    ok = error is None
    meta = {
        "batch": q.shape[0] if ok else -1,
        "local_length": q.shape[1] if ok else -1,  # must agree: equal shares of every chunk
        "dk": q.shape[2] if ok else -1,
        "dv": v.shape[2] if ok else -1,
        "dh": w0.shape[1] if ok else -1,
    }
    meta.update(_options_meta(chunk_size, options["use_muon"], momentum, options["weight_norm"], options["causal"], q.dtype))
    return error, meta


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flatten per-head tensors [B, ...] into one buffer [B, n]."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)  # [B, n]


def _unpack(buffer: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [t[0].numel() for t in like]
    return [part.reshape(t.shape) for part, t in zip(buffer.split(sizes, dim=1), like)]


def _combined_update(deltas, gate_sum, group, stats) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Sum the partial updates (and momentum-gate sums) of all ranks in ONE all-reduce."""
    parts = list(deltas) + ([] if gate_sum is None else [gate_sum.to(deltas[0].dtype)])
    total = all_reduce_sum(_pack(parts), group, stats)  # [B, n]
    unpacked = _unpack(total, parts)
    return unpacked[:3], (None if gate_sum is None else unpacked[3])


def context_parallel_fast_weight(
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
    group=None,
    *,
    use_muon: bool = False,
    momentum: torch.Tensor | None = None,
    weight_norm: bool = True,
    causal: bool = True,
    comm_stats: CommStats | None = None,
) -> tuple[torch.Tensor, Weights]:
    """LaCT Algorithm 3: `swiglu_fast_weight` with every chunk split over the ranks of `group`.

    Local tensors: q, k [B, L/W, dk]; v [B, L/W, dv]; lr*, momentum [B, L/W, 1] — rank r's slice
    of every chunk, concatenated (see `context_shard_index`). w0, w2 [B, dh, dk], w1 [B, dv, dh]
    are the same on every rank. Returns the rank's outputs [B, L/W, dv] and the final fast
    weights (identical on every rank).
    """
    world = _group_size(group)
    options = {"k": k, "w1": w1, "w2": w2, "lrs": (lr0, lr1, lr2), "momentum": momentum,
               "use_muon": use_muon, "weight_norm": weight_norm, "causal": causal}
    error, meta = _context_meta(q, v, w0, chunk_size, world, options)
    _agree(error, meta, group, q.device)
    local_chunk = chunk_size // world
    weights: tuple[torch.Tensor, ...] = (w0, w1, w2)
    target_norms = tuple(row_norms(w) for w in weights) if weight_norm else None  # [B, rows, 1] each
    previous: tuple[torch.Tensor, ...] | None = None
    outputs = []
    for start in range(0, q.shape[1], local_chunk):
        part = slice(start, start + local_chunk)
        if causal:
            outputs.append(swiglu_apply(q[:, part], *weights))  # [B, l/W, dv]
        partial = swiglu_chunk_update(k[:, part], v[:, part], *weights, lr0[:, part], lr1[:, part], lr2[:, part])
        gate_sum = None if momentum is None else momentum[:, part].sum(dim=1, keepdim=True)  # [B, 1, 1]
        deltas, gate_sum = _combined_update(partial, gate_sum, group, comm_stats)
        gate = None if gate_sum is None else gate_sum / (world * q[:, part].shape[1])  # [B, 1, 1] chunk mean
        weights, previous = fast_weight_step(weights, deltas, previous, gate, use_muon, target_norms)
        if not causal:
            outputs.append(swiglu_apply(q[:, part], *weights))  # [B, l/W, dv]
    out = torch.cat(outputs, dim=1) if outputs else v.new_zeros(v.shape)  # [B, L/W, dv]
    return out, (weights[0], weights[1], weights[2])


# ----------------------------------------------------------------------------- Algorithm 4


def _head_meta(q, v, w0, chunk_size, world, options) -> tuple[str | None, dict[str, int]]:
    """Local validation of Algorithm 4 inputs and the metadata all ranks share."""
    lrs, momentum = options["lrs"], options["momentum"]
    error = _common_checks(q, options["k"], v, lrs, momentum, chunk_size)
    if error is None and q.shape[0] % world:
        error = f"batch × heads {q.shape[0]} (first dimension) is not divisible by the world size {world}"
    if error is None:
        own = q.shape[0] // world
        hint = f" (each rank passes the fast weights of its own {own} heads only, e.g. head_shard(w, rank, {world}))"
        error = _weight_checks(w0, options["w1"], options["w2"], own, q.shape[2], v.shape[2], hint)
    ok = error is None
    meta = {
        "batch": q.shape[0] if ok else -1,
        "local_length": q.shape[1] if ok else -1,  # may differ between ranks
        "dk": q.shape[2] if ok else -1,
        "dv": v.shape[2] if ok else -1,
        "dh": w0.shape[1] if ok else -1,
    }
    meta.update(_options_meta(chunk_size, options["use_muon"], momentum, options["weight_norm"], options["causal"], q.dtype))
    return error, meta


def _sequence_to_heads(x: torch.Tensor, lengths: list[int], rank: int, group, stats) -> torch.Tensor:
    """[BH, l_r, F] sequence shard of all heads -> [BH/W, L, F] whole sequence of own heads."""
    world = len(lengths)
    own, features = x.shape[0] // world, x.shape[2]
    in_splits = [own * lengths[rank] * features] * world  # block j = heads of rank j
    out_splits = [own * length * features for length in lengths]  # block i = rank i's shard
    received = all_to_all(x.contiguous().reshape(-1), out_splits, in_splits, group, stats)
    pieces = [p.reshape(own, length, features) for p, length in zip(received.split(out_splits), lengths)]
    return torch.cat(pieces, dim=1)  # [BH/W, L, F]


def _heads_to_sequence(y: torch.Tensor, lengths: list[int], rank: int, group, stats) -> torch.Tensor:
    """[BH/W, L, F] whole sequence of own heads -> [BH, l_r, F] sequence shard of all heads."""
    world = len(lengths)
    own, features = y.shape[0], y.shape[2]
    pieces = y.split(lengths, dim=1)  # piece j: [BH/W, l_j, F] goes to rank j
    flat = torch.cat([p.reshape(-1) for p in pieces])  # [BH/W · L · F]
    in_splits = [own * length * features for length in lengths]
    out_splits = [own * lengths[rank] * features] * world
    received = all_to_all(flat, out_splits, in_splits, group, stats)
    return received.reshape(world * own, lengths[rank], features)  # [BH, l_r, F]


def head_parallel_fast_weight(
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
    group=None,
    *,
    use_muon: bool = False,
    momentum: torch.Tensor | None = None,
    weight_norm: bool = True,
    causal: bool = True,
    comm_stats: CommStats | None = None,
) -> tuple[torch.Tensor, Weights]:
    """LaCT Algorithm 4: `swiglu_fast_weight` with the heads split over the ranks of `group`.

    Local tensors: q, k [BH, l_r, dk]; v [BH, l_r, dv]; lr*, momentum [BH, l_r, 1] — the rank's
    contiguous sequence shard (shards concatenate in rank order to the whole sequence) for all
    heads; w0, w2 [BH/W, dh, dk], w1 [BH/W, dv, dh] — the rank's OWN heads (see `head_shard`).
    Returns the outputs for the rank's shard [BH, l_r, dv] and its own heads' final weights.
    """
    world, rank = _group_size(group), dist.get_rank(group)
    options = {"k": k, "w1": w1, "w2": w2, "lrs": (lr0, lr1, lr2), "momentum": momentum,
               "use_muon": use_muon, "weight_norm": weight_norm, "causal": causal}
    error, meta = _head_meta(q, v, w0, chunk_size, world, options)
    table = _agree(error, meta, group, q.device, may_differ=("local_length",))
    lengths = [entry["local_length"] for entry in table]  # every rank's shard length
    streams = [q, k, v, lr0, lr1, lr2] + ([] if momentum is None else [momentum])
    widths = [t.shape[2] for t in streams]
    packed = torch.cat([t.to(q.dtype) for t in streams], dim=2)  # [BH, l_r, 2dk+dv+3(+1)]
    whole = _sequence_to_heads(packed, lengths, rank, group, comm_stats)  # [BH/W, L, 2dk+dv+3(+1)]
    parts = whole.split(widths, dim=2)
    out, weights = swiglu_fast_weight(
        parts[0], parts[1], parts[2], w0, w1, w2, parts[3], parts[4], parts[5], chunk_size,
        use_muon=use_muon, momentum=None if momentum is None else parts[6], weight_norm=weight_norm, causal=causal,
    )  # out [BH/W, L, dv]
    return _heads_to_sequence(out, lengths, rank, group, comm_stats), weights  # [BH, l_r, dv]
