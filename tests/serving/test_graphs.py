"""The captured decode step's computation on the CPU: the static step a CUDA graph records (shared
input buffers, exact rows, the visible length rounded up to a bucket and masked) run eagerly gives
the NLL, greedy tokens and routing counts of `ServingEngine.decode` over a sequence of steps with
joins, leaves and slot moves (MoE-DistilGPT2 and OLMoE), and reads nothing back to the host inside
its forward for any serving policy; NECTAR's price is device data; the shadow step (static routers,
read-only cache) gives the eager shadow's NLL, leaves the cache byte-identical and runs only with
the engine's own shadow routers; the serving loop with a controller on the static step serves what
the eager loop serves; `nectar serve --cuda-graphs on` without CUDA stops with one line. The
replayed graphs themselves: tests/serving/test_gpu_graphs.py."""

import json
import math

import pytest
import torch

import nectar.moe.dispatch as dispatch_module
from nectar.cli.serve import main as serve_main
from nectar.experiment.forward import install
from nectar.experiment.host_reads import count_host_reads
from nectar.hf.attach import attach
from nectar.moe.dispatch import grouped_mm_usable
from nectar.plugins import make_backend
from nectar.serving.batch_routers import batch_keep
from nectar.serving.controller import ServingControllerConfig
from nectar.serving.engine import ServingEngine
from nectar.serving.frontier import ServingConfig, model_top_k, routers_for, serve_policy
from nectar.serving.graphs import (GraphedServingEngine, StaticDecodeStep, bucket_of, length_buckets,
                                   routing_signature)
from nectar.serving.policies import serving_router
from tests.hf.models import tiny
from tests.serving.models import tiny_gpt2_moe
from tests.serving.test_serve import LIMITS, TRACE
from tests.tolerance import assert_close

BUCKET = 16


def _olmoe():
    return attach(tiny("olmoe", impl="grouped_mm"))


def _prefill(engine, seqs, lengths, slots):
    for slot, seq, n in zip(slots, seqs, lengths):
        for start in range(0, n, 8):
            part = seq[start:min(n, start + 8)].tolist()
            engine.prefill(slot, part, start, int(seq[start + len(part)]))


def _decode_both(eager, static, seqs, lengths):
    feed = [int(s[n]) for s, n in zip(seqs, lengths)]
    targets = [int(s[n + 1]) for s, n in zip(seqs, lengths)]
    want, got = eager.decode(feed, lengths, targets), static.decode(feed, lengths, targets)
    assert torch.equal(got.argmax_R, want.argmax_R)
    # the bucket adds masked keys (exact zeros after the softmax) to the attention's sums: n = the bucket
    assert_close(got.nll_R, want.nll_R, n=2 * max(lengths) + BUCKET, dtype=torch.float32, scale=10)
    assert [layer.tokens_per_expert for layer in got.workload.layers] == \
        [layer.tokens_per_expert for layer in want.workload.layers]
    assert got.workload.kv_read_tokens == want.workload.kv_read_tokens == sum(lengths)


@pytest.mark.parametrize("build,policy", [(tiny_gpt2_moe, "batch-price:0.05"), (tiny_gpt2_moe, "static-top2"),
                                          (_olmoe, "batch-aware:4"), (_olmoe, "nectar")])
def test_the_static_step_equals_the_eager_decode_through_joins_leaves_and_moves(build, policy):
    model = build()
    install(model, routers_for(model, policy))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, vocab, (60,), generator=gen) for _ in range(4)]
    eager = ServingEngine(model, slots=4, max_tokens=64, policy=policy)
    static = GraphedServingEngine(model, slots=4, max_tokens=64, policy=policy, mode="static", bucket_tokens=BUCKET)
    rows, lengths = [0, 1], [13, 5]
    for engine in (eager, static):
        _prefill(engine, [seqs[0], seqs[1]], lengths, [0, 1])
    for step in range(12):
        if step == 3:                                         # request 2 joins in slot 2
            for engine in (eager, static):
                _prefill(engine, [seqs[2]], [9], [2])
            rows, lengths = rows + [2], lengths + [9]
        if step == 6:                                         # request 0 leaves: the last row moves into slot 0
            for engine in (eager, static):
                engine.move(2, 0)
            rows, lengths = [rows[2], rows[1]], [lengths[2], lengths[1]]
        if step == 8:                                         # request 3 joins with a long prompt (a new bucket)
            for engine in (eager, static):
                _prefill(engine, [seqs[3]], [33], [2])
            rows, lengths = rows + [3], lengths + [33]
        _decode_both(eager, static, [seqs[r] for r in rows], lengths)
        lengths = [n + 1 for n in lengths]
    assert static.graph_summary()["graphs"] is False and static.graph_summary()["eager_fallbacks"] == 0
    assert {bucket for _, bucket in static.steps} == {16, 32, 48}


def test_the_static_step_returns_the_eager_log_probs_only_when_kept():
    """With step_logp the static step's log-probs equal the eager engine's (both with keep_logp);
    without keep_logp, or without step_logp, a step carries none."""
    model = tiny_gpt2_moe()
    install(model, routers_for(model, "static-top2"))
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, model.config.vocab_size, (40,), generator=gen) for _ in range(2)]
    lengths = [11, 6]
    eager = ServingEngine(model, slots=2, max_tokens=64, policy="static-top2")
    static = GraphedServingEngine(model, slots=2, max_tokens=64, policy="static-top2", mode="static",
                                  bucket_tokens=BUCKET, step_logp=True)
    plain = GraphedServingEngine(model, slots=2, max_tokens=64, policy="static-top2", mode="static", bucket_tokens=BUCKET)
    feed = [int(s[n]) for s, n in zip(seqs, lengths)]
    targets = [int(s[n + 1]) for s, n in zip(seqs, lengths)]
    for engine in (eager, static, plain):
        _prefill(engine, seqs, lengths, [0, 1])
        assert engine.decode(feed, lengths, targets).logp_RV is None          # keep_logp is off by default
        engine.keep_logp = True
    want, got = eager.decode(feed, lengths, targets), static.decode(feed, lengths, targets)
    assert_close(got.logp_RV, want.logp_RV, n=2 * max(lengths) + BUCKET, dtype=torch.float32, scale=10)
    assert torch.equal(-got.logp_RV.gather(-1, torch.tensor(targets)[:, None])[:, 0], got.nll_R)
    assert plain.decode(feed, lengths, targets).logp_RV is None               # not captured without step_logp


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """MoE-DistilGPT2's grouped (GPU) dispatch on the CPU, where it is off by default."""
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", {"cpu": {torch.float32}})
    if not grouped_mm_usable(torch.randn(4, 32)):
        pytest.skip("torch._grouped_mm is not usable on this CPU build")


GPT2_POLICIES = ["static-top2", "static-top1", "batch-aware:2", "batch-price:0.1", "top-p:0.5", "fixed-price:0.1",
                 "nectar"]
OLMOE_POLICIES = ["static-top4", "static-top1", "batch-aware:4", "batch-price:0.3", "top-p:0.5", "threshold:0.2",
                  "nectar"]


@pytest.mark.parametrize("family,policy", [("gpt2", p) for p in GPT2_POLICIES] + [("olmoe", p) for p in OLMOE_POLICIES])
def test_the_static_step_reads_nothing_back_inside_its_forward(grouped_on_cpu, family, policy):
    model = tiny_gpt2_moe() if family == "gpt2" else _olmoe()
    for _, layer in model.moe_layers():
        if hasattr(layer, "grouped"):
            layer.grouped = True
    install(model, routers_for(model, policy))
    engine = GraphedServingEngine(model, slots=4, max_tokens=64, policy=policy, mode="static", bucket_tokens=BUCKET)
    engine.prefill(0, [3, 4, 5], 0, 6)
    engine.prefill(1, [7, 8], 0, 9)
    engine.inputs.load([6, 9], [3, 2], [1, 2])
    step = StaticDecodeStep(engine, engine.inputs, rows=2, bucket=BUCKET)
    with torch.no_grad(), count_host_reads() as reads:
        out = step.compute()
    assert dict(reads) == {}
    assert out.nll_R.shape == (2,) and torch.isfinite(out.nll_R).all()


def test_the_price_is_device_data_and_equals_a_float_price():
    layer = tiny_gpt2_moe().moe_layers()[0][1]
    router = serving_router("nectar", layer, top_k=2)
    router.price = 0.3
    assert router.price_t.item() == 0.3 and router.batch_price() is router.price_t
    gen = torch.Generator().manual_seed(0)
    top = torch.topk(torch.softmax(torch.randn(9, 12, generator=gen), -1), 4)
    weights = top.values / top.values.sum(-1, keepdim=True)
    ranks = torch.arange(4).expand(9, 4)
    cost = torch.rand(12, generator=gen)
    for price in (0.0, 0.05, 0.3, 2.0):
        router.price = price
        assert torch.equal(batch_keep(top.indices, ranks, weights, 3, router.batch_price(), cost),
                           batch_keep(top.indices, ranks, weights, 3, price, cost))
    router.price = math.inf
    assert router.batch_price() == math.inf


def test_the_routing_signature_sees_swapped_routers_and_an_infinite_price_not_a_finite_one():
    model = tiny_gpt2_moe()
    routers = routers_for(model, "nectar")
    install(model, routers)
    before = routing_signature(model)
    for router in routers:
        router.price = 0.7
    assert routing_signature(model) == before                  # a finite price is read from the device
    for router in routers:
        router.price = math.inf
    assert routing_signature(model) != before
    install(model, routers_for(model, "nectar"))
    assert routing_signature(model) != before


def test_length_buckets():
    assert length_buckets(130, 64) == [64, 128, 130]
    assert length_buckets(64, 64) == [64]
    assert bucket_of(1, [64, 128]) == 64 and bucket_of(64, [64, 128]) == 64 and bucket_of(65, [64, 128]) == 128
    with pytest.raises(ValueError, match="exceeds"):
        bucket_of(129, [64, 128])


def _cache_bytes(cache) -> list[torch.Tensor]:
    return [buf.clone().view(torch.uint8) for buf in (*cache.keys, *cache.values)]


def _shadow_eager(engine, static_routers, feed, lengths, targets):
    """What `ServingController.wrap_decode` runs on the eager engine for a check."""
    before = [layer.router for _, layer in engine.model.moe_layers()]
    install(engine.model, static_routers)
    engine.cache.read_only = True
    try:
        return engine.decode(feed, lengths, targets)
    finally:
        engine.cache.read_only = False
        install(engine.model, before)


@pytest.mark.parametrize("build", [tiny_gpt2_moe, _olmoe])
def test_the_shadow_step_is_the_eager_shadow_and_leaves_the_cache_as_it_was(build):
    model = build()
    routers = routers_for(model, "nectar")
    static_routers = routers_for(model, f"static-top{model_top_k(model, model.moe_layers()[0][1])}")
    install(model, routers)
    seqs = [torch.randint(0, model.config.vocab_size, (60,), generator=torch.Generator().manual_seed(s))
            for s in range(3)]
    eager = ServingEngine(model, slots=4, max_tokens=64, policy="nectar")
    static = GraphedServingEngine(model, slots=4, max_tokens=64, policy="nectar", mode="static", bucket_tokens=BUCKET,
                                  shadow_routers=static_routers)
    lengths = [13, 5, 20]
    for engine in (eager, static):
        _prefill(engine, seqs, lengths, [0, 1, 2])
    for step in range(5):                                     # a check before every step, as on check steps
        feed = [int(s[n]) for s, n in zip(seqs, lengths)]
        targets = [int(s[n + 1]) for s, n in zip(seqs, lengths)]
        before = _cache_bytes(static.cache)
        with static.shadow():
            got = static.decode(feed, lengths, targets)
        assert all(torch.equal(a, b) for a, b in zip(before, _cache_bytes(static.cache)))
        assert [layer.router for _, layer in model.moe_layers()] == routers and not static.cache.read_only
        want = _shadow_eager(eager, static_routers, feed, lengths, targets)
        assert torch.equal(got.argmax_R, want.argmax_R)
        assert_close(got.nll_R, want.nll_R, n=2 * max(lengths) + BUCKET, dtype=torch.float32, scale=10)
        assert [layer.tokens_per_expert for layer in got.workload.layers] == \
            [layer.tokens_per_expert for layer in want.workload.layers]
        _decode_both(eager, static, seqs, lengths)              # the step itself, on the untouched cache
        lengths = [n + 1 for n in lengths]
    stats = static.graph_summary()
    assert (stats["shadow_eager_steps"], stats["shadow_graph_steps"], stats["eager_fallbacks"]) == (0, 0, 0)
    assert set(static.shadow_steps) == {(3, 32)}                # the static step ran, not the eager engine


def test_a_shadow_step_runs_only_with_the_engine_s_own_shadow_routers():
    model = tiny_gpt2_moe()
    routers, static_routers = routers_for(model, "nectar"), routers_for(model, "static-top2")
    install(model, routers)
    engine = GraphedServingEngine(model, slots=2, max_tokens=64, policy="nectar", mode="static", bucket_tokens=BUCKET,
                                  shadow_routers=static_routers)
    engine.prefill(0, [3, 4, 5], 0, 6)
    engine.cache.read_only = True
    engine.decode([6], [3], [7])                               # the policy's routers on a read-only cache
    install(model, routers_for(model, "static-top2"))          # equal routers, other objects
    engine.decode([6], [3], [7])
    engine.cache.read_only = False
    assert engine.graph_summary()["shadow_eager_steps"] == 2 and not engine.shadow_steps
    with engine.shadow():
        engine.decode([6], [3], [7])
    assert engine.graph_summary()["shadow_eager_steps"] == 2 and set(engine.shadow_steps) == {(1, 16)}
    install(model, routers)
    with pytest.raises(RuntimeError, match="read-only cache"):
        engine._capture(1, 16 * 2, shadow=True)                 # never captured outside the shadow's setting
    plain = GraphedServingEngine(model, slots=2, max_tokens=64, policy="nectar", mode="static", bucket_tokens=BUCKET)
    plain.prefill(0, [3, 4, 5], 0, 6)
    plain.cache.read_only = True
    plain.decode([6], [3], [7])                                # no shadow routers: eager, counted
    assert plain.graph_summary()["shadow_eager_steps"] == 1
    with pytest.raises(ValueError, match="shadow routers"):
        GraphedServingEngine(model, slots=2, max_tokens=64, mode="static", shadow_routers=static_routers[:1])


def test_the_serving_loop_on_the_static_step_serves_what_the_eager_engine_serves():
    model, stream = tiny_gpt2_moe(), torch.randint(0, 211, (4000,), generator=torch.Generator().manual_seed(0))
    runs = {}
    for path in ("eager", "static"):
        cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2", "nectar"), decode_path=path,
                            controller=ServingControllerConfig(window_steps=4, check_every=2))
        runs[path] = serve_policy(model, make_backend("sim", seed=0, price_as="none"), "nectar", cfg, stream)
    eager, static = runs["eager"], runs["static"]
    assert static.nll_tokens == eager.nll_tokens and static.greedy == eager.greedy
    assert static.nll_sum == pytest.approx(eager.nll_sum, rel=1e-5)
    # every check ran the static shadow step (none fell back to the eager engine), and moved the price alike
    assert static.graphs["shadow_eager_steps"] == 0 and static.graphs["eager_fallbacks"] == 0
    history = [(w["step"], w["price"], w["dppl_checked"]) for w in eager.controller["windows"]]
    assert len(history) >= 2 and [w["step"] for w in static.controller["windows"]] == [h[0] for h in history]
    for window, (_, price, dppl) in zip(static.controller["windows"], history):
        assert window["price"] == pytest.approx(price, rel=1e-5)
        assert window["dppl_checked"] == pytest.approx(dppl, rel=1e-3, abs=1e-6)
    assert static.controller["final_price"] == pytest.approx(eager.controller["final_price"], rel=1e-5)
    assert eager.graphs == {"graphs": False, "capture_s": 0.0, "eager_fallbacks": 0}


def test_cuda_graphs_on_without_cuda_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    code = serve_main(["--model", str(tiny_model_dir), "--cuda-graphs", "on", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "x").exists()
    assert err.count("\n") == 0 and "--cuda-graphs on needs a CUDA device" in err


def test_the_report_says_how_decode_steps_ran(tiny_model_dir, tmp_path):
    out = tmp_path / "serve"
    code = serve_main(["--model", str(tiny_model_dir), "--requests", "3", "--rate", "100", "--prompt-median", "8",
                       "--output-median", "4", "--batch-max", "2", "--policies", "static-top2,nectar",
                       "--out", str(out), "--no-progress", "--json"])
    assert code == 0
    rows = {p["name"]: p for p in json.loads((out / "frontier.json").read_text())["policies"]}
    for row in rows.values():                                  # auto on the CPU: the eager path, nothing to say
        assert row["graphs"] is False and row["capture_s"] == 0.0 and row["eager_fallbacks"] == 0
        assert row["graphs_note"] is None
