"""Shared fixtures."""

import pytest
import torch

from nectar.train.recipes import DemoModel, save_demo_model
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from nectar.train.tokenizer import train_tokenizer

SPECS = [{"kind": "gelu", "hidden": 64, "count": 3}, {"kind": "gelu", "hidden": 16}, {"kind": "zero"}, {"kind": "copy"}]


def tiny_moe(vocab_size: int = 100, n_positions: int = 64, seed: int = 0) -> MoEGPT2LMHeadModel:
    """A tiny random MoE-GPT2 (2 blocks, d 32) with full, narrow, zero and copy experts, in eval mode."""
    torch.manual_seed(seed)
    config = preset_config("tiny-moe", vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_inner=64,
                           n_positions=n_positions, expert_specs=SPECS, n_experts=0)
    return MoEGPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny MoE-GPT2 with full, narrow, zero and copy experts, saved the way `nectar run --model` loads it."""
    torch.manual_seed(0)
    texts = [f"the expert {i} routes token {i * 7 % 13} to layer {i % 5}." for i in range(400)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = preset_config("tiny-moe", vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_inner=64,
                           n_positions=64, expert_specs=SPECS, n_experts=0)
    model = MoEGPT2LMHeadModel(config).eval()
    ids = torch.cat([torch.tensor(tokenizer(t)["input_ids"]) for t in texts * 3])
    path = tmp_path_factory.mktemp("model")
    save_demo_model(DemoModel(model, tokenizer, ids, {"test": True}), path)
    return path


