"""An attached transformers MoE model, shaped like MoE-DistilGPT2 for the rest of NECTAR.

`AttachedMoE` wraps the transformers model (`.hf`, a submodule: `.to`, `.eval`, `.parameters`
reach its weights) and offers what `nectar.experiment.forward.forward_chunk`, the runner and the
controller ask of `nectar.models.gpt2_moe.MoEGPT2LMHeadModel`:

  model(input_ids=..., use_cache=False).logits   the transformers forward (routing via the gate hooks)
  model.moe_layers()                             [(block index, HFMoELayer)] in order
  model.new_recorder(**opts), model.recording(r) a RoutingRecorder over the MoE layers
  model.workload_from_counts(counts, batch, seq_len, policy, dropped) -> ChunkWorkload
  model.dtype, model.config, model.max_positions, model.generate(...), model.set_router(factory)

Workload: one LayerWorkload per decoder block. Attention is priced from the shape fields
(d_model = hidden_size, n_heads = num_attention_heads; GQA and MLA are priced as plain multi-head
attention of that width). An MoE block lists its E routed experts' counts and costs, then its
always-on shared experts as one extra entry with every token; a dense block lists its MLP as one
expert with every token (as `nectar.models.gpt2_moe` does for GPT-2 blocks).
`detach()` removes the hooks and returns the untouched transformers model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from nectar.hf.describe import dense_mlp_cost, describe
from nectar.hf.families import decoder_layers
from nectar.hf.layer import HFMoELayer
from nectar.moe.recorder import RoutingRecorder
from nectar.moe.router import Router
from nectar.telemetry.workload import ChunkWorkload, LayerWorkload


class AttachedMoE(nn.Module):
    """A transformers MoE causal LM with NECTAR routers in its MoE blocks (see the module docstring)."""

    def __init__(self, hf: nn.Module, layers: list[HFMoELayer], undo: Callable[[], None]):
        super().__init__()
        self.hf = hf
        self._layers = layers
        self._undo = undo
        self.attached = True

    # ----- the transformers model ---------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._check_attached()
        return self.hf(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._check_attached()
        return self.hf.generate(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """The transformers model's own save (routers are runtime policy, not weights)."""
        return self.hf.save_pretrained(*args, **kwargs)

    @property
    def config(self):
        return self.hf.config

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def max_positions(self) -> int:
        """Longest sequence the model takes (config.max_position_embeddings)."""
        return int(self.hf.config.max_position_embeddings)

    @property
    def family(self) -> str:
        return self._layers[0].family.name

    @property
    def top_k(self) -> int:
        """The family's top-K (the largest over MoE blocks)."""
        return max(layer.top_k for layer in self._layers)

    @property
    def skips_unused_slots(self) -> bool:
        """True iff every MoE block skips the compute of unused slots (sentinel index); False means
        some block computes them at gate 0, so adaptive k saves no compute there (`nectar.hf.drop`)."""
        return all(layer.sentinel for layer in self._layers)

    @property
    def reference_policy(self) -> str:
        """The static policy that is the model as trained: the family's own top-K."""
        return f"static-top{self.top_k}"

    def describe(self) -> list[dict]:
        return describe(self.hf)

    def detach(self) -> nn.Module:
        """Remove every hook and flag `attach` set; returns the transformers model. Idempotent."""
        if self.attached:
            self._undo()
            self.attached = False
        return self.hf

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this AttachedMoE was detached; use the returned transformers model or attach again")

    # ----- routing ------------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, HFMoELayer]]:
        """(decoder block index, HFMoELayer) for every MoE block, in order."""
        return [(layer.block_index, layer) for layer in self._layers]

    def set_router(self, factory: Callable[[int, int], Router]) -> None:
        """Every MoE layer's router becomes `factory(block_idx, num_experts)` (moved to its gate's device)."""
        for idx, layer in self.moe_layers():
            router = factory(idx, layer.num_experts)
            layer.router = router                                # validates before moving
            layer.router = router.to(layer.gate.weight.device)

    def new_recorder(self, **options) -> RoutingRecorder:
        """A RoutingRecorder over the MoE layers; agreement is measured against the family's top-K
        unless `agreement_k` says otherwise."""
        return RoutingRecorder(list(self._layers), **{"agreement_k": self.top_k, **options})

    @contextmanager
    def recording(self, recorder: RoutingRecorder) -> Iterator[RoutingRecorder]:
        """Every MoE layer writes its routing into `recorder` while the block runs."""
        for layer in self._layers:
            layer.recorder = recorder
        try:
            yield recorder
        finally:
            for layer in self._layers:
                layer.recorder = None

    # ----- workload -----------------------------------------------------------------------------
    def workload_from_counts(self, counts: list[list[int]], batch: int, seq_len: int, policy: str = "",
                             dropped: list[int] | None = None) -> ChunkWorkload:
        """The ChunkWorkload of a chunk [batch, seq_len] whose MoE layers computed `counts` [L_moe][E]
        (token, slot) pairs (see the module docstring for what each block lists)."""
        tokens, dtype_bytes = batch * seq_len, self.dtype.itemsize
        moe = {layer.block_index: layer for layer in self._layers}
        if len(counts) != len(moe) or (dropped is not None and len(dropped) != len(moe)):
            raise ValueError(f"got counts for {len(counts)} MoE layers, the model has {len(moe)}")
        per_block = dict(zip(moe, zip(counts, dropped or [0] * len(counts))))
        blocks = decoder_layers(self.hf)
        layers = [moe[i].layer_workload(per_block[i][0], dtype_bytes, per_block[i][1], tokens) if i in moe
                  else LayerWorkload(tokens_per_expert=[tokens], expert_costs=[dense_mlp_cost(block.mlp, dtype_bytes)])
                  for i, block in enumerate(blocks)]
        config = self.hf.config
        return ChunkWorkload(tokens=tokens, batch=batch, seq_len=seq_len, d_model=int(config.hidden_size),
                             n_layers=len(blocks), n_heads=int(config.num_attention_heads),
                             vocab_size=int(config.vocab_size), layers=layers, dtype_bytes=dtype_bytes,
                             policy=policy)
