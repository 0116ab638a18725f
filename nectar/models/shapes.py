"""Named model shapes: the one definition of the OLMoE-1B-7B shape (random-weight stand-ins).

`MoEShape` is the shape of a transformers OLMoE-family model — depth, width, attention heads,
routed experts and their width, top-k, vocabulary, positions — without weights. The simulator
prices a small model's routing at its width (`sim.price_as`, `--price-as olmoe-1b-7b`),
`benchmarks/decode_step.py` times a random-weight model of it, and `nectar serve --drive-shape
olmoe-1b-7b` runs one driven by a trained small model's routing (`nectar.serving.driven`); all
three read `SHAPES`. Only `olmoe_config` imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MoEShape:
    name: str
    layers: int
    hidden: int
    heads: int
    experts: int
    expert_hidden: int
    top_k: int
    vocab_size: int
    max_positions: int

    def with_layers(self, layers: int | None) -> "MoEShape":
        """The same shape at `layers` decoder blocks (None: as defined)."""
        if layers is None:
            return self
        if layers < 1:
            raise ValueError(f"a shape needs at least 1 layer, got {layers}")
        return replace(self, layers=layers)

    def olmoe_config(self, **overrides):
        """A transformers `OlmoeConfig` of this shape (full multi-head attention, no shared expert)."""
        from transformers import OlmoeConfig

        return OlmoeConfig(**{**dict(vocab_size=self.vocab_size, hidden_size=self.hidden,
                                     intermediate_size=self.expert_hidden, num_hidden_layers=self.layers,
                                     num_attention_heads=self.heads, num_key_value_heads=self.heads,
                                     num_experts=self.experts, num_experts_per_tok=self.top_k,
                                     max_position_embeddings=self.max_positions), **overrides})


SHAPES = {
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 16 layers, hidden 2048, 16 heads of 128, 64 experts of
    # 1024, top-8, its 50 304-token vocabulary, 4096 positions
    "olmoe-1b-7b": MoEShape("olmoe-1b-7b", layers=16, hidden=2048, heads=16, experts=64, expert_hidden=1024,
                            top_k=8, vocab_size=50304, max_positions=4096),
}


def shape_named(name: str) -> MoEShape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]
