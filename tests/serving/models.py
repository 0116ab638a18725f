"""Tiny random models for the serving tests: MoE-DistilGPT2 with every expert kind, and transformers families."""

import torch

from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config

SPECS = [{"kind": "gelu", "hidden": 64, "count": 3}, {"kind": "gelu", "hidden": 16}, {"kind": "zero"}, {"kind": "copy"}]


def tiny_gpt2_moe(seed: int = 0, positions: int = 128) -> MoEGPT2LMHeadModel:
    torch.manual_seed(seed)
    config = preset_config("tiny-moe", vocab_size=211, n_layer=2, n_embd=32, n_head=2, n_inner=64,
                           n_positions=positions, expert_specs=SPECS, n_experts=0)
    model = MoEGPT2LMHeadModel(config).eval()
    for _, layer in model.moe_layers():                      # a gate that prefers different experts per token
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    return model
