"""Tiny random-config transformers MoE models of every supported family (no hub, no weights).

Routers are re-drawn sharp (std 0.5) and DeepSeek-V3 gets a random selection bias, so that routing
is varied and a wrong selection or gate formula changes the output. Qwen2-MoE has a dense first
block and a shared expert; DeepSeek-V3 a dense first block, two shared experts and 4 expert groups.
"""

from __future__ import annotations

import torch
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from nectar.hf.families import find_moe_blocks

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
VOCAB, D = 97, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
              initializer_range=0.2)


def config_of(family: str):
    if family == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16,
                              shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False, mlp_only_layers=[0])
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16, head_dim=8, num_experts=8,
                              num_experts_per_tok=3, norm_topk_prob=True)
    if family == "olmoe":
        return OlmoeConfig(**COMMON, intermediate_size=16, num_experts=16, num_experts_per_tok=4)
    if family == "deepseek_v3":
        return DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=40, moe_intermediate_size=16,
                                n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=4,
                                topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                                norm_topk_prob=True)
    raise KeyError(family)


MODEL_CLASSES = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
                 "olmoe": OlmoeForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM}


def tiny(family: str, dtype=torch.float32, impl: str = "eager", seed: int = 0):
    """A tiny eval-mode model of `family` with sharp, varied routing."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config_of(family)).eval()
    with torch.no_grad():
        for found in find_moe_blocks(model):
            found.block.gate.weight.normal_(0.0, 0.5)
            if hasattr(found.block.gate, "e_score_correction_bias"):
                found.block.gate.e_score_correction_bias.normal_(0.0, 0.3)
    model.set_experts_implementation(impl)
    return model.to(dtype)


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """3 left-padded rows of lengths 9, 6, 3: (ids [3, 9], attention mask [3, 9])."""
    gen = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(3, VOCAB, (3, 9), generator=gen)
    mask_BS = torch.ones_like(ids_BS)
    for row, length in enumerate([9, 6, 3]):
        ids_BS[row, : 9 - length] = 0
        mask_BS[row, : 9 - length] = 0
    return ids_BS, mask_BS
