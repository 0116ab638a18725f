"""MoE-GPT2 model tests against independent references: HF's own dense GPT2LMHeadModel
(sparse upcycling must reproduce its logits), a per-token routing loop, a cache-free greedy
decoding loop, closed-form expert costs, and save/load round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from nectar.moe.experts import CopyExpert, GELUExpert, ZeroExpert
from nectar.models.gpt2_moe import MoEGPT2Config, MoEGPT2LMHeadModel, MoEMLP, load_dense_gpt2, preset_config
from nectar.moe.static_routers import TopKRouter, TopPRouter
from nectar.telemetry.workload import ChunkWorkload
from tests.tolerance import assert_close, tol

VOCAB = 61
SEQ = 11  # tokens()'s default length


def path_n(n_layer=2, n_embd=32, n_inner=None, top_k=2, seq=SEQ, **_):
    """n of tests/tolerance.py for a logit of these models: the reductions on its path that two
    implementations may evaluate differently. Per block: two layer norms (mean and variance, 2·d
    each), c_attn, the attention scores, c_proj, the gate, c_fc (d each: 9·d), the softmax and the
    value sum over the keys (2·seq), the expert's c_proj (hidden) and the sum over the top-k
    experts; then ln_f (2·d) and the head (d)."""
    hidden = n_inner or 4 * n_embd
    return n_layer * (9 * n_embd + 2 * seq + hidden + top_k) + 3 * n_embd


def make_dense(n_layer=2, n_embd=32, n_head=4, n_inner=None, dropout=0.0, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_inner=n_inner, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():  # non-zero biases so that a wrongly copied bias would show
        for block in model.transformer.h:
            block.mlp.c_fc.bias.normal_(0, 0.1)
            block.mlp.c_proj.bias.normal_(0, 0.1)
    return model


def tokens(batch=3, seq=11, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def scramble_gates(model, std=2.0, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=generator) * std)


DENSE_SHAPES = [dict(n_layer=1, n_embd=16, n_head=2), dict(n_layer=2, n_embd=32, n_head=4, n_inner=48),
                dict(n_layer=3, n_embd=24, n_head=3)]


@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)])
@pytest.mark.parametrize("subset", [False, True])
def test_upcycled_logits_equal_dense(shape, num_experts, top_k, subset):
    dense = make_dense(**shape)
    moe_layers = [shape["n_layer"] - 1] if subset else "all"
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers).eval()
    scramble_gates(moe)  # whatever the gate says, identical experts with renormalised gates = dense
    x = tokens()
    with torch.no_grad():
        expected, got = dense(x).logits, moe(x).logits
    assert_close(got, expected, n=path_n(**shape, top_k=top_k))
    expected_moe_blocks = [shape["n_layer"] - 1] if subset else list(range(shape["n_layer"]))
    assert [i for i, _ in moe.moe_layers()] == expected_moe_blocks
    for i, block in enumerate(moe.transformer.h):
        assert isinstance(block.mlp, MoEMLP) == (i in expected_moe_blocks)


@pytest.mark.parametrize("router", [dict(router="topp", top_p=0.7), dict(router="topk", router_temperature=0.3)])
def test_upcycled_equal_dense_fp64_other_routers(router):
    dense = make_dense(n_layer=2, dropout=0.1, dtype=torch.float64)  # dropout configured, eval mode
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=4, top_k=2, **router).eval()
    assert moe.dtype == torch.float64 and not moe.training
    scramble_gates(moe)
    x = tokens()
    with torch.no_grad():
        assert_close(moe(x).logits, dense(x).logits, n=path_n(n_layer=2, top_k=2))


def test_distinct_experts_change_logits_and_follow_a_per_token_reference():
    dense = make_dense(n_layer=2)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=3, top_k=2).eval()
    scramble_gates(moe)
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            for expert in layer.experts:
                expert.c_fc.weight.add_(torch.randn_like(expert.c_fc.weight) * 0.2)
    x = tokens()
    with torch.no_grad():
        expected = dense(x).logits  # the experts differ: beyond what rounding on the path could do
        assert (moe(x).logits - expected).abs().max() > tol(torch.float32, n=path_n(), scale=expected.abs().max())
        layer = moe.transformer.h[0].mlp.moe
        hidden = torch.randn(2, 5, 32, dtype=torch.float32)
        got = moe.transformer.h[0].mlp(hidden)
        reference = torch.zeros_like(hidden)
        for b in range(2):
            for t in range(5):
                probs = torch.softmax(layer.gate(hidden[b, t]), -1)
                top = torch.topk(probs, 2).indices
                weights = probs[top] / probs[top].sum()
                for w, e in zip(weights, top):
                    reference[b, t] += w * layer.experts[int(e)](hidden[b, t : t + 1])[0]
    # the gate (d = 32) and its 3-way softmax and renormalisation, c_fc (d), c_proj (hidden 128), the sum of 2
    assert_close(got, reference, n=32 + 8 + 32 + 128 + 2)


def test_heterogeneous_expert_specs_copy_only_matching_gelu_experts():
    dense = make_dense(n_layer=2)
    specs = [{"kind": "gelu", "count": 2}, {"kind": "gelu", "hidden": 16, "count": 1},
             {"kind": "zero", "count": 1}, {"kind": "copy", "count": 1}]
    moe = MoEGPT2LMHeadModel.from_dense(dense, top_k=2, expert_specs=specs).eval()
    assert moe.config.num_experts() == 5
    experts = moe.transformer.h[1].mlp.moe.experts
    kinds = [GELUExpert, GELUExpert, GELUExpert, ZeroExpert, CopyExpert]
    assert len(experts) == 5 and all(isinstance(e, kind) for e, kind in zip(experts, kinds))
    dense_mlp = dense.transformer.h[1].mlp
    for expert in experts[:2]:
        assert torch.equal(expert.c_fc.weight, dense_mlp.c_fc.weight)
        assert torch.equal(expert.c_proj.bias, dense_mlp.c_proj.bias)
    assert experts[2].hidden == 16
    out = moe(tokens()).logits
    assert out.shape == (3, 11, VOCAB) and torch.isfinite(out).all()


def test_save_load_round_trip(tmp_path):
    moe = MoEGPT2LMHeadModel.from_dense(make_dense(n_layer=2), num_experts=4, top_k=2, moe_layers=[1],
                                        router="capacity", capacity_factor=2.0).eval()
    scramble_gates(moe)
    moe.save_pretrained(tmp_path / "moe")
    assert AutoConfig.from_pretrained(tmp_path / "moe").model_type == "nectar_moe_gpt2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert isinstance(loaded, MoEGPT2LMHeadModel)
    for field in ("moe_layers", "router", "moe_top_k", "capacity_factor", "n_experts"):
        assert getattr(loaded.config, field) == getattr(moe.config, field)
    original, restored = moe.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    assert type(loaded.transformer.h[1].mlp.moe.router).__name__ == "CapacityRouter"
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, moe(x).logits)  # the same weights and code: the same bits


def test_generate_matches_cache_free_greedy_loop():
    moe = MoEGPT2LMHeadModel.from_dense(make_dense(n_layer=2), num_experts=4, top_k=2).eval()
    scramble_gates(moe)
    with torch.no_grad():
        for _, layer in moe.moe_layers():  # distinct experts, so routing matters
            for expert in layer.experts:
                expert.c_proj.weight.add_(torch.randn_like(expert.c_proj.weight) * 0.3)
    prompt = tokens(batch=1, seq=5)
    out = moe.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = moe(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(out, sequence)


def test_router_swapping_changes_routing_not_shapes():
    moe = MoEGPT2LMHeadModel.from_dense(make_dense(n_layer=2), num_experts=4, top_k=2).eval()
    scramble_gates(moe)
    gates_before = [layer.gate.weight.clone() for _, layer in moe.moe_layers()]
    x = tokens()
    logits_top2 = moe(x).logits.detach()
    assert all(sum(m.tokens_per_expert) == 2 * x.numel() for m in moe.routing_metrics().values())
    moe.set_router_by_name("topk", k=1)
    logits_top1 = moe(x).logits.detach()
    assert logits_top1.shape == logits_top2.shape
    for _, layer in moe.moe_layers():
        assert isinstance(layer.router, TopKRouter) and layer.router.k == 1
        assert layer.last_decision.active.sum(-1).eq(1).all()
    assert all(sum(m.tokens_per_expert) == x.numel() for m in moe.routing_metrics().values())
    moe.set_router(lambda idx, n: TopPRouter(n, p=0.3 + 0.4 * idx))
    moe(x)
    assert [type(layer.router) for _, layer in moe.moe_layers()] == [TopPRouter, TopPRouter]
    assert all(torch.equal(a, layer.gate.weight) for a, (_, layer) in zip(gates_before, moe.moe_layers()))
    with pytest.raises(ValueError, match="Router over 4 experts"):
        moe.set_router(lambda idx, n: TopKRouter(n + 1, k=1))


def test_routing_metrics_and_chunk_workload():
    dense = make_dense(n_layer=3, n_embd=32, n_inner=48)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=4, top_k=2, moe_layers=[0, 2])
    with pytest.raises(ValueError, match="forward"):
        moe.routing_metrics()
    x = tokens(batch=3, seq=11)
    moe(x)
    assert sorted(moe.routing_metrics()) == [0, 2]
    work = moe.chunk_workload(3, 11, policy="static")
    assert (work.tokens, work.n_layers, work.d_model, work.n_heads, work.vocab_size) == (33, 3, 32, 4, VOCAB)
    assert work.policy == "static" and work.dtype_bytes == 4 and len(work.layers) == 3
    dense_layer = work.layers[1]
    assert dense_layer.tokens_per_expert == [33] and dense_layer.router_flops_per_token == 0
    assert dense_layer.expert_costs[0].flops == 2 * 2 * 32 * 48  # two matmuls, 2 FLOPs per MAC
    for idx in (0, 2):
        assert len(work.layers[idx].tokens_per_expert) == 4 and sum(work.layers[idx].tokens_per_expert) == 2 * 33
        assert work.layers[idx].tokens_per_expert == moe.routing_metrics()[idx].tokens_per_expert
    assert ChunkWorkload.from_dict(work.to_dict()) == work
    with pytest.raises(ValueError, match="batch\\*seq_len"):
        moe.chunk_workload(2, 11)


def test_hybrid_lact_attention_option(tmp_path):
    dense = make_dense(n_layer=2)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=2, top_k=2, attention_type="hybrid_lact",
                                        lact_window=64, lact_chunk_size=4).eval()
    assert all(type(b.attn).__name__ == "HybridLaCTAttention" for b in moe.transformer.h)
    assert moe.config.use_cache is False and moe.transformer.h[0].attn.window == 64
    x = tokens()
    with torch.no_grad():  # TTT gain starts at 0 and the window covers the sequence: equals dense GPT-2
        assert_close(moe(x).logits, dense(x).logits, n=path_n(n_layer=2, top_k=2))
        for block in moe.transformer.h:
            block.attn.ttt_gain.fill_(1.0)
        with_memory = moe(x).logits
    expected = dense(x).logits  # the LaCT branch is live: beyond what rounding on the path could do
    assert (with_memory - expected).abs().max() > tol(torch.float32, n=path_n(), scale=expected.abs().max())
    moe.save_pretrained(tmp_path / "hybrid")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert type(loaded.transformer.h[1].attn).__name__ == "HybridLaCTAttention"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, with_memory)  # the same weights and code: the same bits
    with pytest.raises(ValueError, match="attention_type"):
        MoEGPT2Config(attention_type="flash")


def test_load_dense_gpt2_from_local_directory(tmp_path):
    dense = make_dense(n_layer=2)
    dense.save_pretrained(tmp_path / "gpt2")
    loaded = load_dense_gpt2(tmp_path / "gpt2")
    assert isinstance(loaded, GPT2LMHeadModel) and not isinstance(loaded, MoEGPT2LMHeadModel)
    original = dense.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(FileNotFoundError, match="not found locally"):
        load_dense_gpt2(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dense_gpt2("nectar-no-such-org/no-such-model")


def test_bad_inputs_raise_value_errors():
    dense = make_dense(n_layer=2)
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="dense"):
        MoEGPT2LMHeadModel.from_dense(moe)
    with pytest.raises(ValueError, match="dense"):
        MoEGPT2LMHeadModel.from_dense(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="moe_layers"):
        MoEGPT2LMHeadModel.from_dense(dense, moe_layers=[5])
    with pytest.raises(ValueError, match="moe_top_k"):
        MoEGPT2LMHeadModel.from_dense(dense, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown router"):
        MoEGPT2LMHeadModel.from_dense(dense, router="random")
    with pytest.raises(ValueError, match="expert spec"):
        MoEGPT2Config(expert_specs=[{"kind": "gelu", "width": 3}])
    with pytest.raises(ValueError, match="MoEGPT2Config"):
        MoEGPT2LMHeadModel(GPT2Config(n_layer=1))


def test_presets():
    distil = preset_config("distilgpt2", vocab_size=8192)
    assert (distil.n_layer, distil.n_embd, distil.n_head, distil.n_inner, distil.vocab_size) == (6, 768, 12, 3072, 8192)
    tiny_moe = preset_config("tiny-moe", vocab_size=500, eos_token_id=3)
    assert isinstance(tiny_moe, MoEGPT2Config) and tiny_moe.eos_token_id == 3 and tiny_moe.n_positions >= 128
    with torch.device("meta"):  # the full-size MoE builds (shapes only, no memory)
        big = MoEGPT2LMHeadModel(preset_config("distilgpt2-moe"))
    assert len(big.moe_layers()) == 6 and big.moe_layers()[0][1].num_experts == 8
    model = MoEGPT2LMHeadModel(tiny_moe)
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 500)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpt5")


def test_a_checkpoint_with_per_expert_keys_loads_into_the_stacked_layout(tmp_path):
    """Checkpoints saved before the stacked layout hold one module per expert
    (`...experts.<i>.c_fc.weight`): a copy of data/models/cpu-demo rewritten that way loads, every
    such tensor lands in its stack, and a layer computes what those per-expert modules compute."""
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from nectar.moe.dispatch import reference_dispatch
    from nectar.moe.expert_pool import GELUGroup

    demo = Path(__file__).resolve().parents[2] / "data" / "models" / "cpu-demo"
    current = MoEGPT2LMHeadModel.from_pretrained(demo, dtype=torch.float32).eval()
    with safe_open(str(demo / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    legacy = {k: v for k, v in tensors.items() if ".mlp.moe.experts.groups." not in k}
    for idx, layer in current.moe_layers():
        for g, (group, first, _) in enumerate(layer.experts.spans()):
            stacked = f"transformer.h.{idx}.mlp.moe.experts.groups.{g}."
            if isinstance(group, GELUGroup) and stacked + "c_fc" in tensors:
                for j in range(group.count):
                    old = f"transformer.h.{idx}.mlp.moe.experts.{first + j}."
                    for name, key in (("c_fc.weight", "c_fc"), ("c_fc.bias", "c_fc_bias"), ("c_proj.weight", "c_proj"),
                                      ("c_proj.bias", "c_proj_bias")):
                        legacy[old + name] = tensors[stacked + key][j].clone()
    shutil.copytree(demo, tmp_path / "legacy")
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    model = MoEGPT2LMHeadModel.from_pretrained(tmp_path / "legacy", dtype=torch.float32).eval()
    saved = {k: v.float() for k, v in legacy.items()}
    layer = model.transformer.h[3].mlp.moe
    old = []
    for i, view in enumerate(layer.experts):
        prefix = f"transformer.h.3.mlp.moe.experts.{i}."
        if isinstance(view, GELUExpert):
            expert = GELUExpert(view.d_model, view.hidden, view.activation)
            expert.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
            assert torch.equal(view.c_fc.weight, expert.c_fc.weight) and torch.equal(view.c_proj.bias, expert.c_proj.bias)
        else:
            expert = type(view)(view.d_model)
        old.append(expert)
    gelu_experts = sum(isinstance(view, GELUExpert) for view in layer.experts)
    assert len([k for k in saved if ".mlp.moe.experts." in k]) == 6 * 4 * gelu_experts  # 6 layers, 4 tensors each
    hidden = torch.randn(40, model.config.n_embd)
    with torch.no_grad():
        decision = layer.router(layer.gate(hidden))
        # stacked vs per-expert matmuls: c_fc (d = 128), c_proj (hidden 512), the sum over the top-2
        assert_close(layer(hidden), reference_dispatch(hidden, decision, old), n=128 + 512 + 2)
        ids = torch.arange(24).view(2, 12)
        assert torch.equal(model(ids).logits, current(ids).logits)  # the same stacked weights: the same bits


def test_a_dense_parent_with_hybrid_lact_attention_upcycles_with_its_fast_weights():
    """`dense_model` of a hybrid-LaCT config is this module's model without MoE layers; upcycling it
    copies every attention weight, the fast-weight memory's included, and its MLPs into the experts."""
    from nectar.lact.hybrid_attention import HybridLaCTAttention
    from nectar.models.gpt2_moe import dense_model

    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=32,
                           attention_type="hybrid_lact", lact_window=8, lact_chunk_size=16)
    dense = dense_model(config)
    assert isinstance(dense.transformer.h[0].attn, HybridLaCTAttention) and not dense.moe_layers()
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=2, top_k=1)
    dense_state = dense.state_dict()
    for key, value in moe.state_dict().items():
        if ".attn." in key:
            assert torch.equal(value, dense_state[key]), key
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():                     # every expert is the dense MLP, top-1 gate weight 1: same function
        assert_close(moe(input_ids=ids, use_cache=False).logits, dense(input_ids=ids, use_cache=False).logits,
                     n=4 * 64, dtype=torch.float32)
