"""Runs a serving step on a model: one request's prefill chunk, or one decode step of the batch.

The engine owns the `SlotCache` and drives the model's own forward (MoE-DistilGPT2 or an attached
transformers MoE model: anything with `moe_layers`, `new_recorder`, `recording` and
`workload_from_counts`; a model with `slot_cache(slots, max_tokens)` builds its own cache:
`nectar.serving.driven`). Every step is teacher-forced on the request's *reference continuation*:
a decode step feeds each row the reference token at its position and scores the next reference
token (its NLL) and the greedy choice (argmax). The step's compute is exactly a generation step's
(one new token per request through the KV cache; logits for the last position only), its input
tokens are the same under every policy, so policies see one stream and their quality is the
teacher-forced NLL of the reference continuation under their own routing.

Per step the engine returns device tensors (NLL sum, greedy tokens) and the step's workload (the
MoE layers' per-expert counts (`recorded_layers`), read once after the forward, with the serving
shape fields the simulator prices: attention pairs, KV positions read, logit rows).

This is the eager path (every step launches the model's kernels from Python). The captured decode
step, a CUDA graph per batch size and visible-length bucket, is `nectar.serving.graphs`
(`GraphedServingEngine`, a subclass: prefill chunks stay here, and read-only shadow forwards
where it has no shadow graph for them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from nectar.serving.slot_cache import CacheShape, SlotCache
from nectar.telemetry.workload import ChunkWorkload


@dataclass
class StepResult:
    """One forward's outputs: device tensors and the workload the backend prices or measures."""

    nll_R: torch.Tensor        # [R] fp32 NLL of each row's next reference token (device)
    argmax_R: torch.Tensor     # [R] long greedy token of each row (device)
    workload: ChunkWorkload
    logp_RV: torch.Tensor | None = None   # [R, V] fp32 next-token log-probs (device), when the engine keeps them


def _cache_kwarg(model) -> str:
    """transformers ≥ 5.25 names the cache argument `cache` (`past_key_values` is deprecated)."""
    target = getattr(model, "hf", model)
    return "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"


def recorded_layers(model) -> list:
    """The (index, layer) pairs whose routing a step records, in order: the model's MoE layers, or a
    driven model's big ones (`nectar.serving.driven`: what the GPU reads)."""
    own = getattr(model, "recorded_layers", None)
    return own() if callable(own) else model.moe_layers()


class ServingEngine:
    """Prefill chunks and decode steps of `model` over a cache of `slots` requests."""

    def __init__(self, model, slots: int, max_tokens: int, policy: str = ""):
        self.model, self.policy = model, policy
        self.keep_logp = False       # StepResult.logp_RV for decode steps (a controller's vocabulary-KL check)
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        own = getattr(model, "slot_cache", None)            # a driven model: one cache per model it runs
        self.cache = own(slots, max_tokens) if callable(own) else \
            SlotCache(CacheShape.of(model.config), slots, max_tokens, self.dtype, self.device)
        self._cache_kw = _cache_kwarg(model)

    def _ids(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def _forward(self, ids_RQ: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Logits of the last position [R, V] and the MoE layers' records of this forward."""
        recorder = self.model.new_recorder(max_sample_tokens=0)
        with torch.no_grad(), self.model.recording(recorder):
            out = self.model(input_ids=ids_RQ, position_ids=position_ids, attention_mask=mask,
                             use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        return out.logits[:, -1], recorder.summary()

    def _result(self, logits_RV: torch.Tensor, targets: list[int], workload: ChunkWorkload) -> StepResult:
        logp_RV = torch.log_softmax(logits_RV.float(), dim=-1)
        nll_R = -logp_RV.gather(-1, self._ids(targets)[:, None])[:, 0]
        return StepResult(nll_R, logits_RV.argmax(-1), workload, logp_RV if self.keep_logp else None)

    def prefill(self, slot: int, tokens: list[int], start: int, target: int) -> StepResult:
        """Prompt tokens `tokens` at positions start.. of `slot`; `target` is the reference token
        after the chunk (scored when this is the prompt's last chunk)."""
        position_ids, mask = self.cache.for_prefill(slot, start, len(tokens))
        logits_RV, layers = self._forward(self._ids(tokens)[None], position_ids, mask)
        workload = self._workload(layers, batch=1, seq_len=len(tokens), phase="prefill",
                                  pairs=len(tokens) * start + len(tokens) * (len(tokens) + 1) / 2,
                                  kv_read=start, logit_rows=1)
        return self._result(logits_RV, [target], workload)

    def decode(self, tokens: list[int], positions: list[int], targets: list[int]) -> StepResult:
        """One decode step of rows 0..R-1: row r feeds `tokens[r]` at `positions[r]` and scores
        `targets[r]`."""
        position_ids, mask = self.cache.for_decode(self._ids(positions), max(positions) + 1)
        logits_RV, layers = self._forward(self._ids(tokens)[:, None], position_ids, mask)
        workload = self._workload(layers, batch=len(tokens), seq_len=1, phase="decode",
                                  pairs=sum(positions) + len(positions), kv_read=sum(positions),
                                  logit_rows=len(tokens))
        return self._result(logits_RV, targets, workload)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def prepare_decode(self, tokens: list[int], positions: list[int], targets: list[int]) -> float:
        """Called with a decode step's inputs before its telemetry window opens; seconds spent
        preparing it (the eager path has nothing to prepare; a captured path may capture a graph)."""
        return 0.0

    def graph_summary(self) -> dict:
        """How the decode steps ran: the eager path never captures and never falls back."""
        return {"graphs": False, "capture_s": 0.0, "eager_fallbacks": 0}

    def decode_workload(self, counts: list[list[int]], dropped: list[int], positions: list[int]) -> ChunkWorkload:
        """The workload of a decode step of rows at `positions` whose MoE layers computed `counts`."""
        return self._counts_workload(counts, dropped, batch=len(positions), seq_len=1, phase="decode",
                                     pairs=sum(positions) + len(positions), kv_read=sum(positions),
                                     logit_rows=len(positions))

    def _workload(self, layers: list, batch: int, seq_len: int, phase: str, pairs: float, kv_read: int,
                  logit_rows: int) -> ChunkWorkload:
        return self._counts_workload([r.tokens_per_expert for r in layers], [r.dropped_tokens for r in layers],
                                     batch, seq_len, phase, pairs, kv_read, logit_rows)

    def _counts_workload(self, counts: list[list[int]], dropped: list[int], batch: int, seq_len: int, phase: str,
                         pairs: float, kv_read: int, logit_rows: int) -> ChunkWorkload:
        base = self.model.workload_from_counts(counts, batch, seq_len, self.policy, dropped)
        return replace(base, attention_pairs=float(pairs), kv_read_tokens=int(kv_read), logit_tokens=logit_rows,
                       phase=phase)
