"""One chunk's forward pass: run the model over a chunk of sequences and return its observation.

`forward_chunk` runs a chunk [B, T] in micro-batches (a long chunk window need not fit in memory at
once) with a `RoutingRecorder` set on the model, so per-expert counts, the agreement with static
routing and the next-token NLL accumulate on the device; they are read back once, after the chunk.
Nothing inside the loop waits for the device (the MoE layers' grouped dispatch and the recorder
keep their counts on the device; the NLL is a fused fp32 reduction for bf16 logits on CUDA, see
`nectar.experiment.token_nll`), so the host queues the whole chunk ahead of the GPU.
"""

from __future__ import annotations

import math

import torch

from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.experiment.token_nll import nll_rows as nll_rows_of


def install(model, routers) -> None:
    """Put one router per MoE layer into the model (in layer order)."""
    for (_, layer), router in zip(model.moe_layers(), routers):
        layer.router = router.to(layer.gate.weight.device)


def forward_chunk(model, batch: torch.Tensor, micro_rows: int | None = None, policy: str = "",
                  max_sample_tokens: int = 65536) -> ChunkObservation:
    """Run `batch` [B, T] through the model; the observation holds the chunk's NLL (total and per
    sequence), routing agreement, workload and, per MoE layer, an evenly strided sample of at most
    `max_sample_tokens` tokens' gate logits and inputs."""
    stride = max(1, math.ceil(batch.numel() / max_sample_tokens)) if max_sample_tokens else 1
    recorder = model.new_recorder(sample_stride=stride, max_sample_tokens=max_sample_tokens)
    nll_rows = []
    with torch.no_grad(), model.recording(recorder):
        for part in batch.split(micro_rows or batch.shape[0]):                     # [b, T]
            logits = model(input_ids=part, use_cache=False).logits                 # [b, T, V]
            nll_rows.append(nll_rows_of(logits, part))                               # [b] on the device
    nll_rows_B = torch.cat(nll_rows).double().cpu()                                 # [B] one transfer
    layers = recorder.summary()
    workload = model.workload_from_counts([r.tokens_per_expert for r in layers], batch.shape[0], batch.shape[1],
                                          policy, [r.dropped_tokens for r in layers])
    return ChunkObservation(
        nll_sum=float(nll_rows_B.sum()), nll_tokens=batch[:, 1:].numel(), nll_rows=nll_rows_B,
        agreement=sum(r.agreement for r in layers) / max(len(layers), 1),
        workload=workload, layers=[LayerObservation(r.logits, r.inputs) for r in layers])
