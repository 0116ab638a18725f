"""The driven model (`nectar.serving.driven`): a trained small OLMoE's routing drives a random-weight
big shape. On tiny CPU models (small: 2 layers, d 32; big: 3 layers, d 64; 8 experts, top-2): the
big model's MoE layer l computes exactly what the small model's layer l mod 2 chose (experts,
weights, unused slots) under every serving policy, also after router swaps; the driven model
scores (NLL, greedy tokens) as the small model alone; the big model's logits equal an unattached
copy of it whose MoE blocks are forced, token by token, to the small model's decisions; the
serving loop (eager and static step, NECTAR's shadow checks included) serves what the small model
alone serves and reports the big model's workload; `nectar serve --drive-shape` writes `driven_by`
(wiring run on the simulator; the CLI itself refuses the simulator), and bad options fail with one
line. The captured step on a GPU: the last test (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from nectar.cli import serve as serve_cli
from nectar.experiment.forward import install
from nectar.experiment.host_reads import count_host_reads
from nectar.hf.attach import attach
from nectar.models.shapes import SHAPES, MoEShape
from nectar.plugins import make_backend
from nectar.serving.driven import DrivenCache, build_driven
from nectar.serving.engine import ServingEngine
from nectar.serving.frontier import ServingConfig, routers_for, serve_policy
from nectar.serving.graphs import GraphedServingEngine, StaticDecodeStep
from nectar.train.tokenizer import train_tokenizer
from tests.serving.models import tiny_gpt2_moe
from tests.serving.test_serve import LIMITS, TRACE

VOCAB = 97
BIG = MoEShape("tiny-big", layers=3, hidden=64, heads=4, experts=8, expert_hidden=32, top_k=2, vocab_size=128,
               max_positions=128)
POLICIES = ["static-top2", "static-top1", "batch-aware:2", "batch-aware:1", "batch-price:0.3", "nectar",
            "top-p:0.5", "threshold:0.3"]


def small_hf(impl: str = "grouped_mm", experts: int = 8, top_k: int = 2) -> OlmoeForCausalLM:
    """A tiny OLMoE with sharp, varied routing (what the trained small model is, in miniature)."""
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=16, num_experts=experts, num_experts_per_tok=top_k,
                         max_position_embeddings=64, initializer_range=0.2, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    model.set_experts_implementation(impl)
    return model


def driven(impl: str = "grouped_mm"):
    return build_driven(attach(small_hf(impl)), BIG, seed=1)


class GateTaps:
    """What every MoE gate of a model hands its experts (index [N, K], gates [N, K]), per forward, in order."""

    def __init__(self, hf):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.own: list[torch.Tensor] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook) for layer in hf.model.layers]

    def _hook(self, module, args, output):
        self.seen.append((output[2].clone(), output[1].float().clone()))
        self.own.append((args[0] @ module.weight.T).topk(module.top_k).indices)   # the gate's own choice

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ (1) the follower follows
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_each_big_layer_computes_what_the_small_layer_l_mod_L_chose_under_every_policy(impl):
    model = driven(impl)
    small_taps, big_taps = GateTaps(model.small.hf), GateTaps(model.big.hf)
    ids = _tokens(5, 7)
    for policy in POLICIES:                                   # one driven model: the routers are swapped each time
        install(model, routers_for(model, policy))
        small_taps.seen.clear()
        big_taps.seen.clear()
        with torch.no_grad():
            model(input_ids=ids)
        assert len(small_taps.seen) == 2 and len(big_taps.seen) == 3
        for layer, (index, gates) in enumerate(big_taps.seen):
            want_index, want_gates = small_taps.seen[layer % 2]
            assert torch.equal(index, want_index), (policy, layer)
            assert torch.equal(gates, want_gates), (policy, layer)
        assert not torch.equal(big_taps.own[0], small_taps.seen[0][0])      # its own gate would choose otherwise


def test_the_recorded_counts_are_the_big_models_and_equal_the_small_ones_mapped_by_layer():
    model = driven()
    ids = _tokens(4, 6)
    for policy in ("batch-aware:1", "nectar"):
        install(model, routers_for(model, policy))
        alone = model.small.new_recorder(max_sample_tokens=0)
        with torch.no_grad(), model.small.recording(alone):
            model.small(input_ids=ids)
        recorder = model.new_recorder(max_sample_tokens=0)
        with torch.no_grad(), model.recording(recorder):
            model(input_ids=ids)
        small_counts = [r.tokens_per_expert for r in alone.summary()]
        assert [r.tokens_per_expert for r in recorder.summary()] == [small_counts[i % 2] for i in range(3)]
        engine = ServingEngine(model, slots=4, max_tokens=32, policy=policy)
        workload = engine.prefill(0, ids[0].tolist(), 0, 3).workload
        alone = model.small.new_recorder(max_sample_tokens=0)
        with torch.no_grad(), model.small.recording(alone):
            model.small(input_ids=ids[:1])
        small_counts = [r.tokens_per_expert for r in alone.summary()]
        assert workload.n_layers == 3 and workload.d_model == 64 and workload.vocab_size == 128
        assert [layer.tokens_per_expert[:8] for layer in workload.layers] == [small_counts[i % 2] for i in range(3)]


# ------------------------------------------------------------------ (2) quality is the small model's
def _steps(engine, seqs):
    """Prefill 3 requests in chunks, decode 5 steps with a join, a leave and a slot move; the results."""
    out = []
    for slot, seq in enumerate(seqs[:2]):
        for start in range(0, 9, 4):
            part = seq[start:min(9, start + 4)].tolist()
            out.append(engine.prefill(slot, part, start, int(seq[start + len(part)])))
    lengths = [9, 9]
    for step in range(5):
        if step == 2:
            out.append(engine.prefill(2, seqs[2][:6].tolist(), 0, int(seqs[2][6])))
            lengths.append(6)
        if step == 4:
            engine.move(2, 0)
            seqs, lengths = [seqs[2], seqs[1]], [lengths[2], lengths[1]]
        feed = [int(s[n]) for s, n in zip(seqs, lengths)]
        targets = [int(s[n + 1]) for s, n in zip(seqs, lengths)]
        out.append(engine.decode(feed, lengths, targets))
        lengths = [n + 1 for n in lengths]
    return out


@pytest.mark.parametrize("policy", ["static-top2", "batch-aware:1", "nectar"])
def test_the_driven_model_scores_as_the_small_model_alone(policy):
    model = driven()
    install(model, routers_for(model, policy))
    seqs = list(_tokens(3, 30, seed=4))
    together = _steps(ServingEngine(model, slots=3, max_tokens=32, policy=policy), seqs)
    alone = _steps(ServingEngine(model.small, slots=3, max_tokens=32, policy=policy), seqs)
    for a, b in zip(together, alone):
        assert torch.equal(a.argmax_R, b.argmax_R)
        assert torch.equal(a.nll_R, b.nll_R)
        assert len(a.workload.layers) == 3 and len(b.workload.layers) == 2


# ------------------------------------------------------------------ (3) the big model against a reference
def _forced_block(block, decisions: list):
    """An OLMoE MoE block's forward that takes the next (index, gates) of `decisions`, token by token."""
    def forward(hidden_BTD):
        index_NK, gates_NK = decisions.pop(0)
        x_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        out_ND = torch.zeros_like(x_ND)
        for n in range(x_ND.shape[0]):
            for e, g in zip(index_NK[n].tolist(), gates_NK[n].tolist()):
                if e >= block.experts.num_experts or g == 0.0:
                    continue                                             # an unused slot
                gate, up = (block.experts.gate_up_proj[e] @ x_ND[n]).chunk(2)
                out_ND[n] += g * (block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        return out_ND.reshape(hidden_BTD.shape)
    return forward


def _reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """An unattached copy of the big model, each MoE block l forced to the small model's layer l mod 2
    decision on `ids` (the small model run alone, its gates tapped)."""
    taps = GateTaps(model.small.hf)
    with torch.no_grad():
        model.small(input_ids=ids)
    taps.remove()
    reference = OlmoeForCausalLM(model.big.hf.config).eval()
    reference.load_state_dict(model.big.hf.state_dict())
    decisions = [taps.seen[layer % 2] for layer in range(3)]
    for layer in reference.model.layers:
        layer.mlp.forward = _forced_block(layer.mlp, decisions)
    with torch.no_grad():
        return reference(input_ids=ids).logits


@pytest.mark.parametrize("policy", ["static-top2", "batch-aware:1", "batch-price:0.3"])
def test_the_big_models_logits_equal_a_reference_forced_to_the_small_models_decisions(policy):
    model = driven()
    install(model, routers_for(model, policy))
    ids = _tokens(3, 8, seed=2)
    with torch.no_grad():
        got = model(input_ids=ids).big_logits
    want = _reference_logits(model, ids)
    assert got.shape == want.shape == (3, 8, 128)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_through_the_driven_cache_the_big_model_equals_the_reference_too():
    """Two prefill chunks and a decode step of one request through both slot caches."""
    model = driven()
    install(model, routers_for(model, "top-p:0.5"))          # per token: chunked = whole sequence
    ids = _tokens(1, 11, seed=5)
    want = _reference_logits(model, ids)[0]                  # [11, V]
    cache = model.slot_cache(slots=2, max_tokens=16)
    assert isinstance(cache, DrivenCache) and len(cache.big.keys) == 3 and cache.big.keys[0].shape == (2, 4, 16, 16)
    got = []
    with torch.no_grad():
        for start, n in ((0, 6), (6, 4)):
            position_ids, mask = cache.for_prefill(0, start, n)
            got.append(model(input_ids=ids[:, start:start + n], position_ids=position_ids, attention_mask=mask,
                             use_cache=True, cache=cache).big_logits[0])
        position_ids, mask = cache.for_decode(torch.tensor([10, 0]), 11)
        step = model(input_ids=torch.stack([ids[0, 10:], ids[0, :1]]), position_ids=position_ids,
                     attention_mask=mask, use_cache=True, logits_to_keep=1, cache=cache).big_logits
    torch.testing.assert_close(torch.cat(got), want[:10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step[0, -1], want[10], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ (4) serving end to end
def _stream():
    return torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("path", ["eager", "static"])
def test_the_serving_loop_serves_what_the_small_model_alone_serves(path):
    pytest.importorskip("simpy", reason="the serving loop runs on the simulator's clock (the GPU hosts have no simpy)")
    model = driven()
    cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2", "nectar"), decode_path=path)
    for policy in cfg.policies:
        runs = [serve_policy(m, make_backend("sim", seed=0, price_as="none"), policy, cfg, _stream())
                for m in (model, model.small)]
        assert runs[0].nll_sum == runs[1].nll_sum and runs[0].greedy == runs[1].greedy
        assert runs[0].nll_tokens == sum(r.output_tokens for r in runs[0].requests)
        for big, small in zip(runs[0].workloads, runs[1].workloads):
            assert big.n_layers == 3 and big.d_model == 64
            assert [layer.tokens_per_expert[:8] for layer in big.layers] == \
                [small.layers[i % 2].tokens_per_expert[:8] for i in range(3)]
        if policy == "nectar":
            assert runs[0].controller["windows"] == runs[1].controller["windows"]
            if path == "static":
                assert runs[0].graphs["shadow_eager_steps"] == 0 and runs[0].graphs["eager_fallbacks"] == 0


def test_a_shadow_check_reads_both_caches_and_writes_neither():
    model = driven()
    install(model, routers_for(model, "nectar"))
    engine = GraphedServingEngine(model, slots=2, max_tokens=32, policy="nectar", mode="static",
                                  shadow_routers=routers_for(model, "static-top2"))
    engine.prefill(0, [5, 6, 7, 8], 0, 9)
    engine.prefill(1, [3, 4], 0, 9)
    before = [t.clone() for t in (*engine.cache.keys, *engine.cache.values)]
    assert len(before) == 2 * (2 + 3)
    with engine.shadow():
        shadow = engine.decode([9, 9], [4, 2], [1, 2])
    assert all(torch.equal(a, b) for a, b in zip(before, (*engine.cache.keys, *engine.cache.values)))
    assert engine.stats.shadow_eager_steps == 0 and len(shadow.workload.layers) == 3
    written = engine.decode([9, 9], [4, 2], [1, 2])
    assert not torch.equal(before[2], engine.cache.keys[2])   # the big cache's first layer: the step wrote it
    assert torch.isfinite(written.nll_R).all()


def test_the_static_driven_step_reads_nothing_back_inside_its_forward():
    model = driven()
    install(model, routers_for(model, "nectar"))
    engine = GraphedServingEngine(model, slots=2, max_tokens=32, policy="nectar", mode="static")
    engine.prefill(0, [5, 6, 7, 8], 0, 9)
    engine.prefill(1, [3, 4], 0, 9)
    engine.inputs.load([9, 9], [4, 2], [1, 2])
    with torch.no_grad(), count_host_reads() as reads:
        out = StaticDecodeStep(engine, engine.inputs, rows=2, bucket=16).compute()
    assert dict(reads) == {}
    assert out.routing_X.numel() == 3 * 8 + 3                  # the big model's 3 layers: counts, then drops


@pytest.fixture
def small_dir(tmp_path):
    """The tiny small model saved as `nectar serve --model DIR` loads a transformers MoE."""
    directory = tmp_path / "small"
    small_hf().save_pretrained(directory)
    train_tokenizer([f"word {i} and word {i * 3}" for i in range(100)], vocab_size=300).save_pretrained(directory)
    torch.save(torch.arange(9000, dtype=torch.int32) % VOCAB, directory / "heldout_ids.pt")
    return directory


def test_nectar_serve_drive_shape_records_what_drove_the_energy(small_dir, tmp_path, monkeypatch):
    """The CLI's wiring, on the simulator (which the CLI refuses for --drive-shape: let through here)."""
    pytest.importorskip("simpy", reason="runs on the simulator backend (the GPU hosts have no simpy)")
    monkeypatch.setitem(SHAPES, "tiny-big", BIG)
    monkeypatch.setattr(serve_cli, "check_drive", lambda args, torch_device=None: None)
    out = tmp_path / "serve"
    code = serve_cli.main(["--model", str(small_dir), "--drive-shape", "tiny-big", "--drive-layers", "2",
                           "--requests", "4", "--rate", "100", "--prompt-median", "8", "--output-median", "4",
                           "--batch-max", "2", "--policies", "static-top2,nectar", "--price-as", "none",
                           "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "frontier.json").read_text())
    driven_by = report["driven_by"]
    assert driven_by["shape"] == "tiny-big" and driven_by["layers"] == 2 and driven_by["weights"] == "random"
    assert driven_by["routing_from"]["layers"] == 2 and "driven by the trained model's routing" in driven_by["note"]


# ------------------------------------------------------------------ (5) bad options
@pytest.mark.parametrize("argv,message", [
    (["--drive-shape", "olmoe-1b-7b"], "--drive-shape runs the olmoe-1b-7b shape on the GPU it measures"),
    (["--drive-layers", "2"], "--drive-layers and --drive-dtype need --drive-shape"),
    (["--drive-dtype", "float32"], "--drive-layers and --drive-dtype need --drive-shape"),
    (["--drive-shape", "olmoe-1b-7b", "--backend", "nvml", "--drive-layers", "17"], "exceeds the olmoe-1b-7b"),
])
def test_bad_drive_options_stop_with_one_line(argv, message, tmp_path, capsys):
    if "nvml" not in argv:
        pytest.importorskip("simpy", reason="the default backend is the simulator (the GPU hosts have no simpy)")
    code = serve_cli.main([*argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["--drive-layers", "0"], ["--drive-shape", "gpt-5"], ["--drive-dtype", "int8"]])
def test_malformed_drive_options_are_refused_by_the_parser(argv):
    with pytest.raises(SystemExit) as exc:
        serve_cli.main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("experts,top_k,message", [(16, 2, "has 8 experts, top-2; the trained model 16, top-2"),
                                                   (8, 4, "has 8 experts, top-2; the trained model 8, top-4")])
def test_an_expert_count_or_top_k_mismatch_is_refused(experts, top_k, message):
    with pytest.raises(ValueError, match=message):
        build_driven(attach(small_hf(experts=experts, top_k=top_k)), BIG)


def test_a_model_that_is_not_a_transformers_moe_cannot_drive():
    with pytest.raises(ValueError, match="needs a trained transformers MoE model"):
        build_driven(tiny_gpt2_moe(), BIG)


# ------------------------------------------------------------------ the captured step (GPU)
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA GPU of compute capability >= 9.0")
def test_the_captured_driven_step_replays_what_the_static_step_computes():
    small = attach(small_hf().to("cuda", torch.bfloat16))
    model = build_driven(small, BIG, seed=1)
    install(model, routers_for(model, "nectar"))
    engines = {mode: GraphedServingEngine(model, slots=2, max_tokens=32, policy="nectar", mode=mode,
                                          shadow_routers=routers_for(model, "static-top2"))
               for mode in ("graph", "static")}
    engines["graph"].capture_all()
    results = {}
    for mode, engine in engines.items():
        engine.prefill(0, [5, 6, 7, 8], 0, 9)
        engine.prefill(1, [3, 4], 0, 9)
        with engine.shadow():
            shadow = engine.decode([9, 9], [4, 2], [1, 2])
        results[mode] = (shadow, engine.decode([9, 9], [4, 2], [1, 2]))
    assert engines["graph"].stats.graph_steps == 1 and engines["graph"].stats.shadow_graph_steps == 1
    for got, want in zip(results["graph"], results["static"]):
        assert torch.equal(got.nll_R, want.nll_R) and torch.equal(got.argmax_R, want.argmax_R)
        assert [layer.tokens_per_expert for layer in got.workload.layers] == \
            [layer.tokens_per_expert for layer in want.workload.layers]
