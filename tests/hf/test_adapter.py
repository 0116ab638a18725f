"""The attached model as NECTAR's experiment sees it: forward_chunk, recorder, workload, policies."""

import math

import pytest
import torch

from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.policies import cheap_experts
from nectar.hf.adaptive_k import AdaptiveKRouter
from nectar.hf.attach import attach
from nectar.hf.policies import frontier_policies, hf_policy_router, is_hf_policy
from nectar.hf.routers import FamilyTopKRouter, ThresholdRouter
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.workload import ChunkWorkload
from tests.hf.models import D, VOCAB, config_of, tiny
from tests.tolerance import approx


def _batch(rows=4, seq=12, seed=0):
    return torch.randint(1, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _eager_skips(model) -> bool:
    """Whether this transformers' eager experts skip index E (5.24 does, 5.17 crashes on it)."""
    from nectar.hf.drop import sentinel_support
    return sentinel_support(model.model.layers[1].mlp.experts).supported


def _count_what_the_experts_receive(model):
    """Forward pre-hooks on every experts module: per block, the index tensors the experts got."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            handles.append(layer.mlp.experts.register_forward_pre_hook(
                lambda mod, args, i=i: seen.setdefault(i, []).append(args[1].clone())))
    return seen, handles


@pytest.mark.parametrize("drop", ["auto", "zero"])
@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe"])
def test_workload_counts_equal_a_hand_count_of_the_expert_inputs(family, drop):
    hf = tiny(family, torch.float32, "eager")
    model = attach(hf, lambda layer: ThresholdRouter(layer.family, 0.25), drop=drop)
    seen, handles = _count_what_the_experts_receive(hf)              # after attach: its sentinel probe is not counted
    batch = _batch()
    obs = forward_chunk(model, batch, micro_rows=3)
    for h in handles:
        h.remove()
    work, tokens, cfg = obs.workload, batch.numel(), config_of(family)
    assert isinstance(work, ChunkWorkload) and (work.tokens, work.batch, work.seq_len) == (tokens, 4, 12)
    assert (work.d_model, work.n_layers, work.n_heads, work.vocab_size) == (D, 3, 4, VOCAB)
    assert work.dtype_bytes == 4
    for idx, _ in model.moe_layers():
        index = torch.cat([t.reshape(-1) for t in seen[idx]])
        E = model.moe_layers()[0][1].num_experts
        hand = torch.bincount(index[index < E], minlength=E).tolist()
        layer = work.layers[idx]
        assert layer.tokens_per_expert[:E] == hand
        skipped = int((index == E).sum())
        assert sum(hand) + skipped == tokens * cfg.num_experts_per_tok
        assert (skipped > 0) == dict(model.moe_layers())[idx].sentinel   # unused slots skipped, or computed at gate 0
        assert dict(model.moe_layers())[idx].sentinel == (drop == "auto" and _eager_skips(hf))
        assert layer.expert_costs[0].flops == 6 * D * 16 and layer.router_flops_per_token == 2 * D * E
        if family == "olmoe":
            assert len(layer.tokens_per_expert) == len(layer.expert_costs) == E
            continue
        assert layer.tokens_per_expert[E:] == [tokens]               # the shared experts: every token
        assert layer.expert_costs[E].flops == (6 * D * 48 + 2 * D if family == "qwen2_moe" else 6 * D * 32)
    dense = [i for i in range(3) if i not in dict(model.moe_layers())]
    for i in dense:
        assert work.layers[i].tokens_per_expert == [tokens]
        assert work.layers[i].expert_costs[0].flops == 6 * D * cfg.intermediate_size
    model.detach()


def test_olmoe_workload_has_no_shared_entry_and_forward_chunk_matches_the_plain_model():
    hf = tiny("olmoe", torch.float64, "eager")
    batch = _batch(seed=1)
    with torch.no_grad():
        logits = hf(input_ids=batch, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1),
                                            reduction="sum")                 # forward_chunk scores in fp32
    model = attach(hf)
    obs = forward_chunk(model, batch, max_sample_tokens=16)
    # both in fp32 from the same logits: a log-softmax over VOCAB per token, a sum over the tokens;
    # each NLL = lse − logit cancels terms of size ≤ 2·max|logit|, whose sum is the scale
    tokens = batch[:, 1:].numel()
    assert obs.nll_sum == approx(float(nll), dtype=torch.float32, n=2 * VOCAB + 4 + tokens,
                                 scale=2 * tokens * float(logits.abs().max()))
    assert obs.nll_tokens == tokens
    assert obs.agreement == 1.0                                      # static top-K vs the family's top-K
    assert all(len(l.tokens_per_expert) == 16 for l in obs.workload.layers)
    assert [tuple(l.logits.shape) for l in obs.layers] == [(16, 16)] * 3
    assert [tuple(l.inputs.shape) for l in obs.layers] == [(16, D)] * 3
    assert sum(obs.workload.layers[0].tokens_per_expert) == batch.numel() * 4
    model.detach()


def test_policies_install_and_order_the_compute():
    model = attach(tiny("qwen2_moe", torch.float32, "grouped_mm"))   # skips unused slots on 5.17 and 5.24
    _, layer = model.moe_layers()[0]
    assert cheap_experts(layer) == []                                # one width: nothing is "cheap"
    assert model.reference_policy == "static-top3" and model.max_positions == 64
    assert frontier_policies(3)[:3] == ["static-top3", "static-top2", "static-top1"]
    flops = {}
    for policy in ["static-top3", "static-top1", "threshold:0.2", "top-p:0.5", "nectar"]:
        assert is_hf_policy(policy)
        install(model, [layer.policy_router(policy) for _, layer in model.moe_layers()])
        work = forward_chunk(model, _batch(), policy=policy).workload
        assert work.policy == policy
        flops[policy] = sum(n * c.flops for l in work.layers for n, c in zip(l.tokens_per_expert, l.expert_costs))
    assert flops["static-top1"] < flops["threshold:0.2"] < flops["static-top3"]
    assert flops["static-top1"] < flops["top-p:0.5"] < flops["static-top3"]
    assert flops["nectar"] == flops["static-top3"]                    # τ starts at 0: the model as trained
    assert isinstance(hf_policy_router("nectar:prior", layer), AdaptiveKRouter)
    for bad, match in [("static-top4", "1 <= k <="), ("static-cheap", "unknown policy"), ("threshold:2", "threshold"), ("top-p:x", "not a number"), ("nectar:a:b", "unknown policy")]:
        with pytest.raises(ValueError, match=match):
            hf_policy_router(bad, layer)
    model.detach()


def test_the_simulator_prices_an_attached_models_chunk():
    sim_backend = pytest.importorskip("sim.backend")
    model = attach(tiny("deepseek_v3", torch.float32, "eager"))
    install(model, [layer.policy_router("static-top2") for _, layer in model.moe_layers()])
    for price_as in ("none", "auto"):
        box = {}

        def compute():
            box["obs"] = forward_chunk(model, _batch(), policy="static-top2")
            return box["obs"].workload

        window = sim_backend.create(seed=0, price_as=price_as).run_chunk(compute)
        obs = box["obs"]
        assert window_energy_J(window) > 0 and math.isfinite(window_energy_J(window))
        assert len(window.workload.layers) == 3 and obs.workload.expert_counts()[0] == [48]     # the dense block
    model.detach()


def test_set_router_recorder_options_and_bad_counts():
    model = attach(tiny("mixtral", torch.float32, "grouped_mm"))
    model.set_router(lambda idx, num: FamilyTopKRouter(model.moe_layers()[0][1].family, 1))
    recorder = model.new_recorder(agreement_k=1)
    with torch.no_grad(), model.recording(recorder):
        model(input_ids=_batch(), use_cache=False)
    assert all(layer.recorder is None for _, layer in model.moe_layers())
    summary = recorder.summary()
    assert [sum(s.tokens_per_expert) for s in summary] == [48] * 3
    with pytest.raises(ValueError, match="counts for 2 MoE layers"):
        model.workload_from_counts([[0] * 8] * 2, 4, 12)
    with pytest.raises(ValueError, match="nectar Router over 8 experts"):
        model.set_router(lambda idx, num: torch.nn.Linear(2, 2))
    model.detach()
