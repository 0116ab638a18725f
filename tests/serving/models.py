"""The tiny random MoE-DistilGPT2 of the serving tests: every expert kind, a gate that routes by token."""

import torch

from nectar.models.gpt2_moe import MoEGPT2LMHeadModel
from tests.conftest import tiny_moe


def tiny_gpt2_moe(seed: int = 0, positions: int = 128) -> MoEGPT2LMHeadModel:
    model = tiny_moe(vocab_size=211, n_positions=positions, seed=seed)
    for _, layer in model.moe_layers():                      # a gate that prefers different experts per token
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    return model
