"""What the controller observes of one chunk: the record a chunk's forward returns.

The experiment's forward (`nectar.experiment.forward.forward_chunk`) runs the chunk and returns one
`ChunkObservation`; the controller receives it as an argument after the chunk's telemetry window.
Nothing is read from the model or the routers behind its back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nectar.telemetry.workload import ChunkWorkload


@dataclass
class LayerObservation:
    """One MoE layer over the chunk: an evenly strided sample of its tokens.

    logits  [n, E] the trained gate's logits
    inputs  [n, D] the gate's inputs (what a fast-weight router network sees)
    """

    logits: torch.Tensor
    inputs: torch.Tensor


@dataclass
class ChunkObservation:
    """The chunk's language-model loss, routing agreement, workload and per-layer samples."""

    nll_sum: float                 # Σ next-token NLL over the chunk (nats)
    nll_tokens: int                # tokens scored
    agreement: float               # share of static top-2 (token, expert) selections also computed
    workload: ChunkWorkload        # what the chunk asked of the GPU (per-layer expert counts)
    layers: list[LayerObservation] = field(default_factory=list)
    nll_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [B] NLL sum per sequence

    def rows_nll(self, rows: torch.Tensor) -> tuple[float, int]:
        """(NLL sum, tokens scored) of the chosen sequences `rows` [r] of the chunk."""
        per_row_tokens = self.nll_tokens // max(self.nll_rows.numel(), 1)
        return float(self.nll_rows[rows].sum()), per_row_tokens * rows.numel()

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.nll_tokens, 1)
