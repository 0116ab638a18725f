"""Price a small model's routing as if it ran at a larger shape ("price as").

The CPU demo runs a narrow model of DistilGPT2's depth for real (routing decisions, perplexity),
but a GPU energy model of such a narrow model is dominated by launch overheads. `rescale` keeps
what routing decided — each layer's share of tokens per expert, and each expert's kind and
width *relative to d_model* — and scales the dimensions and the chunk shape to a target, so the
simulator prices the same routing at DistilGPT2 scale. `PriceAs` is the simulator backend's
setting (`SimBackend(price_as=...)`); results priced this way say so (`summary["priced_as"]`).
Runs on a GPU price nothing: they measure the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nectar.models.shapes import SHAPES
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload


@dataclass(frozen=True)
class TargetShape:
    name: str
    d_model: int
    n_heads: int
    seq_len: int
    batch: int
    vocab_size: int
    dtype_bytes: int = 2            # the GPU runs the target in bf16


_OLMOE = SHAPES["olmoe-1b-7b"]   # the one definition of the OLMoE-1B-7B shape (nectar.models.shapes)

TARGETS = {
    # DistilGPT2's shape with the project's vocabulary, in bf16: the model `nectar hw-run` trains on the GPU
    "distilgpt2": TargetShape("distilgpt2", d_model=768, n_heads=12, seq_len=1024, batch=32, vocab_size=16384),
    # OLMoE-1B-7B's width (d 2048, 16 heads, its 50 304-token vocabulary; experts keep their width
    # relative to d_model, so a small model with experts of d/2 is priced with experts of 1024, as
    # OLMoE's), at the small model's own depth: the serving steps the H100 preset's captured-decode
    # constants were fitted on were of this width
    "olmoe-1b-7b": TargetShape(_OLMOE.name, d_model=_OLMOE.hidden, n_heads=_OLMOE.heads, seq_len=_OLMOE.max_positions,
                               batch=8, vocab_size=_OLMOE.vocab_size),
}


def _scale_counts(counts: list[int], factor: float) -> list[int]:
    """Scale integer counts by `factor`, keeping the scaled total exact (largest remainder)."""
    exact = [n * factor for n in counts]
    floors = [int(x) for x in exact]
    missing = round(sum(exact)) - sum(floors)
    order = sorted(range(len(counts)), key=lambda i: floors[i] - exact[i])
    for i in order[:missing]:
        floors[i] += 1
    return floors


def _scale_cost(cost: ExpertCost, width_ratio: float, dtype_ratio: float) -> ExpertCost:
    """An FFN expert's FLOPs and weights grow with D·H (both scale): ratio²; the activations a token
    moves grow with D and H: ratio. Zero-compute experts scale with D alone. Bytes also change with
    the element size (the CPU model runs fp32, the priced GPU model bf16)."""
    if cost.kind in ("zero", "copy", "constant"):
        return replace(cost, flops=cost.flops * width_ratio, bytes=cost.bytes * width_ratio * dtype_ratio,
                       weight_bytes=cost.weight_bytes * width_ratio * dtype_ratio)
    return replace(cost, flops=cost.flops * width_ratio**2, bytes=cost.bytes * width_ratio * dtype_ratio,
                   weight_bytes=cost.weight_bytes * width_ratio**2 * dtype_ratio)


def rescale(workload: ChunkWorkload, target: TargetShape | str) -> ChunkWorkload:
    """The same routing shares at the target's width and chunk shape. A serving step (phase
    "prefill" or "decode") keeps its own shape — tokens, attention pairs, KV reads, logit rows —
    and only its widths change."""
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(f"unknown price-as target {target!r}; choose one of {sorted(TARGETS)}")
        target = TARGETS[target]
    if workload.phase:
        target = replace(target, batch=workload.batch, seq_len=workload.seq_len)
    width_ratio = target.d_model / workload.d_model
    dtype_ratio = target.dtype_bytes / workload.dtype_bytes
    tokens = target.batch * target.seq_len
    token_ratio = tokens / workload.tokens
    layers = [
        LayerWorkload(
            tokens_per_expert=_scale_counts(layer.tokens_per_expert, token_ratio),
            expert_costs=[_scale_cost(c, width_ratio, dtype_ratio) for c in layer.expert_costs],
            router_flops_per_token=layer.router_flops_per_token * width_ratio,
            dropped_tokens=round(layer.dropped_tokens * token_ratio),
        )
        for layer in workload.layers
    ]
    return replace(workload, tokens=tokens, batch=target.batch, seq_len=target.seq_len,
                   d_model=target.d_model, n_heads=target.n_heads, vocab_size=target.vocab_size,
                   layers=layers, dtype_bytes=target.dtype_bytes)


@dataclass(frozen=True)
class PriceAs:
    """How the simulator prices the workloads it is given: as they ran (`target` None), or
    rescaled to `target`'s shape with every sequence that ran priced as `rows_per_row` sequences of
    the target length, so a stream chunk of `chunk_rows` sequences is priced as `batch` sequences
    and a smaller batch (a quality check) in proportion."""

    target: TargetShape | None = None
    rows_per_row: float = 1.0

    @staticmethod
    def make(target: str | TargetShape | None, batch: int = 128, chunk_rows: int | None = None) -> "PriceAs":
        if isinstance(target, str):
            if target not in TARGETS:
                raise ValueError(f"unknown price-as target {target!r}; choose one of {sorted(TARGETS)} or none")
            target = TARGETS[target]
        for name, value in (("price batch", batch), ("chunk rows", chunk_rows or 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        return PriceAs(target, batch / (chunk_rows or batch))

    def apply(self, workload: ChunkWorkload) -> ChunkWorkload:
        if self.target is None:
            return workload
        rows = max(1, round(workload.batch * self.rows_per_row))
        return rescale(workload, replace(self.target, batch=rows))

    def info(self) -> dict:
        """The summary's record of the pricing: priced_as (None = as run) and rows per streamed row."""
        return {"priced_as": None if self.target is None else self.target.name,
                "priced_rows_per_row": None if self.target is None else self.rows_per_row}
