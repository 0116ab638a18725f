"""Recipe pieces that touch the expert layout: narrow experts start as the first hidden units of
the dense FFN (checked against a slice of HF's GPT2MLP), full experts stay copies of it."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nectar.model import MoEGPT2LMHeadModel
from nectar.train.recipes import init_narrow_from_dense


def test_narrow_experts_are_the_first_units_of_the_dense_ffn():
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_layer=2, n_embd=16, n_head=2)).eval()
    with torch.no_grad():
        for block in dense.transformer.h:
            block.mlp.c_fc.bias.normal_(0, 0.1)
            block.mlp.c_proj.bias.normal_(0, 0.1)
    specs = [{"kind": "gelu", "count": 2}, {"kind": "gelu", "hidden": 24, "count": 2}, {"kind": "zero"}]
    moe = MoEGPT2LMHeadModel.from_dense(dense, top_k=2, expert_specs=specs).eval()
    init_narrow_from_dense(moe, dense)
    x = torch.randn(5, 16)
    for idx, layer in moe.moe_layers():
        mlp = dense.transformer.h[idx].mlp
        with torch.no_grad():
            hidden = mlp.act(mlp.c_fc(x))                                    # [5, 64]
            narrow = hidden[:, :24] @ mlp.c_proj.weight[:24] + mlp.c_proj.bias
            for i in (2, 3):
                torch.testing.assert_close(layer.experts[i](x), narrow, rtol=1e-5, atol=1e-6)
            for i in (0, 1):
                torch.testing.assert_close(layer.experts[i](x), mlp(x), rtol=1e-5, atol=1e-6)
