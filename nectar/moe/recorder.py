"""What the MoE layers of one forward chunk did, gathered on the device while the chunk runs.

A `RoutingRecorder` is handed to the model for the length of a chunk (`model.recording(recorder)`);
every MoE layer adds its micro-batch to its own `LayerRecord`: per-expert (token, slot) counts and
the agreement with static top-2 routing accumulate as device tensors (no host read inside the
forward), and an evenly strided sample of the gate logits [n, E] and gate inputs [n, D] is kept
for the controller (every `sample_stride`-th token of the chunk, at most `max_sample_tokens`; when
every token of a piece is kept, the layer's own tensors are kept, not copied: nothing mutates them).
`summary()` reads everything back to the host once, after the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nectar.moe.dispatch import count_per_expert
from nectar.moe.router import RoutingDecision


@dataclass
class LayerRecord:
    """One MoE layer over a chunk. counts_E [E] long and agree_hits [] float live on the device."""

    counts_E: torch.Tensor
    agree_hits: torch.Tensor
    dropped: torch.Tensor
    tokens: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)   # sampled pieces [n, E]
    inputs: list[torch.Tensor] = field(default_factory=list)   # sampled pieces [n, D]
    sampled: int = 0


@dataclass
class LayerSummary:
    """A layer's record on the host: counts [E], agreement in [0, 1], the sample tensors."""

    tokens_per_expert: list[int]
    dropped_tokens: int
    agreement: float
    logits: torch.Tensor    # [n, E]
    inputs: torch.Tensor    # [n, D]


def active_counts(decision: RoutingDecision) -> torch.Tensor:
    """[E] long: (token, slot) pairs each expert computes, counted on the device (no boolean
    indexing, which would read its size back to the host)."""
    num_experts = decision.num_experts
    experts_NK = decision.experts.long()
    valid_NK = decision.active & (experts_NK >= 0) & (experts_NK < num_experts)
    return count_per_expert(torch.where(valid_NK, experts_NK, num_experts), num_experts + 1)[:num_experts]


def static_choice(logits_NE: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] the experts of the k largest logits, the lower index among equals (the fused router's
    rule). For k <= 2 by arg-max passes: a bf16 `topk` over a few experts is one slow sort kernel
    (~100 µs on [65 536, 10] on an H100, measured in the router), a row arg-max a light reduction."""
    if k > 2:
        return logits_NE.topk(k, dim=-1).indices
    first_N1 = logits_NE.argmax(dim=-1, keepdim=True)                              # [N, 1]
    if k == 1:
        return first_N1
    second_N1 = logits_NE.scatter(-1, first_N1, float("-inf")).argmax(dim=-1, keepdim=True)
    return torch.cat([first_N1, second_N1], dim=-1)                                 # [N, 2]


def static_agreement_hits(decision: RoutingDecision, k: int = 2) -> torch.Tensor:
    """[] float: how many of the static top-k (token, expert) selections `decision` also computes."""
    static_Nk = static_choice(decision.logits, min(k, decision.num_experts))        # [N, k]
    active_NK = decision.active                                                     # [N, K]
    same_NKk = (decision.experts.unsqueeze(-1) == static_Nk.unsqueeze(-2)) & active_NK.unsqueeze(-1)
    return same_NKk.any(dim=1).float().sum()


class RoutingRecorder:
    """Collects one LayerRecord per MoE layer (in the order of `layers`) over a chunk."""

    def __init__(self, layers: list[nn.Module], sample_stride: int = 1, max_sample_tokens: int = 65536,
                 keep_inputs: bool = True, agreement_k: int = 2):
        if sample_stride < 1 or max_sample_tokens < 0:
            raise ValueError("sample_stride must be >= 1 and max_sample_tokens >= 0")
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.records: list[LayerRecord | None] = [None] * len(layers)
        self.sample_stride, self.max_sample_tokens = sample_stride, max_sample_tokens
        self.keep_inputs, self.agreement_k = keep_inputs, agreement_k

    def record(self, layer: nn.Module, x_ND: torch.Tensor, decision: RoutingDecision,
               counts_E: torch.Tensor | None = None) -> None:
        """Add one forward of `layer` (x_ND [N, D], its decision) to the layer's record; `counts_E`
        [E] are the dispatch's per-expert counts when the caller has them (else counted here).
        Nothing is read back to the host."""
        i = self.index[id(layer)]
        rec = self.records[i]
        if rec is None:
            zero = torch.zeros((), device=x_ND.device)
            rec = self.records[i] = LayerRecord(
                torch.zeros(decision.num_experts, dtype=torch.long, device=x_ND.device), zero, zero.long())
        if counts_E is None:
            counts_E = active_counts(decision)
        rec.counts_E += counts_E
        rec.agree_hits += static_agreement_hits(decision, self.agreement_k)
        rec.dropped += decision.dropped.sum()
        self._sample(rec, x_ND, decision.logits)
        rec.tokens += x_ND.shape[0]

    def _sample(self, rec: LayerRecord, x_ND: torch.Tensor, logits_NE: torch.Tensor) -> None:
        room = self.max_sample_tokens - rec.sampled
        if room <= 0:
            return
        first = (-rec.tokens) % self.sample_stride          # first token of this piece on the stride grid
        if first == 0 and self.sample_stride == 1 and room >= x_ND.shape[0]:  # every token: keep, no copy
            rec.logits.append(logits_NE.detach())
            if self.keep_inputs:
                rec.inputs.append(x_ND.detach())
            rec.sampled += x_ND.shape[0]
            return
        rows = torch.arange(first, x_ND.shape[0], self.sample_stride, device=x_ND.device)[:room]  # [n]
        rec.logits.append(logits_NE.detach()[rows])
        if self.keep_inputs:
            rec.inputs.append(x_ND.detach()[rows])
        rec.sampled += rows.numel()

    def summary(self) -> list[LayerSummary]:
        """Every layer's record read back to the host (one transfer per tensor kind)."""
        if any(r is None for r in self.records):
            raise ValueError("the recorder saw no forward of some MoE layer")
        counts = torch.stack([r.counts_E for r in self.records]).tolist()       # [L, E]
        hits = torch.stack([r.agree_hits for r in self.records]).tolist()       # [L]
        dropped = torch.stack([r.dropped for r in self.records]).tolist()       # [L]
        out = []
        for rec, n, h, d in zip(self.records, counts, hits, dropped):
            k = min(self.agreement_k, len(n))
            logits = _joined(rec.logits, torch.empty(0, len(n)))
            inputs = _joined(rec.inputs, torch.empty(0, 0))
            out.append(LayerSummary(n, int(d), h / max(k * rec.tokens, 1), logits, inputs))
        return out


def _joined(pieces: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """The pieces concatenated (a single piece as it is: no copy)."""
    if not pieces:
        return empty
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
