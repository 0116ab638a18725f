"""`nectar run` and `nectar frontier` on a saved transformers MoE (a tiny OLMoE the test trains itself)."""

import json
import math

import pytest

from nectar.cli.frontier import main as frontier_main
from nectar.cli.run import main as run_main
from nectar.hf.train_small import SmallMoERecipe, save_small_moe, train_small_moe
from nectar.train.recipes import TrainingData
from nectar.train.tokenizer import encode_documents, train_tokenizer
from tests.tolerance import approx


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    texts = [f"expert {i} reads token {i * 7 % 13} in layer {i % 5} of block {i % 3}." for i in range(400)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    data = TrainingData(tokenizer, encode_documents(tokenizer, texts[:300] * 2), encode_documents(tokenizer, texts[300:] * 6),
                        {}, {"sha256": "test"})
    recipe = SmallMoERecipe(hidden=32, layers=2, heads=4, experts=8, top_k=4, expert_hidden=16, seq_len=32, batch=8,
                            max_epochs=1.0, max_positions=64, eval_tokens=512)
    path = tmp_path_factory.mktemp("olmoe")
    save_small_moe(train_small_moe(recipe, data=data, progress=False), path)
    return path


COMMON = ["--tokens", "2048", "--chunk-tokens", "512", "--seq-len", "64", "--price-as", "none", "--no-progress", "--json"]


def test_run_defaults_to_the_models_own_policies(olmoe_dir, tmp_path, capsys):
    assert run_main(["--model", str(olmoe_dir), "--out", str(tmp_path / "r"), *COMMON]) == 0
    policies = json.loads(capsys.readouterr().out)["policies"]
    assert set(policies) == {"static-top4", "static-top1", "nectar"}
    # ratios of whole counts, averaged over layers and chunks
    assert policies["static-top4"]["routing_agreement"] == approx(1.0, n=16)
    assert policies["static-top1"]["routing_agreement"] == approx(0.25, n=16)
    assert all(math.isfinite(p["perplexity"]) for p in policies.values())


def test_frontier_uses_the_models_top_k_as_its_baseline(olmoe_dir, tmp_path, capsys):
    assert frontier_main(["--model", str(olmoe_dir), "--out", str(tmp_path / "f"), *COMMON]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in report["policies"]}
    assert report["baseline"] == "static-top4" and {"threshold:0.1", "top-p:0.7", "nectar"} <= names
    top4 = next(p for p in report["policies"] if p["name"] == "static-top4")
    assert top4["saved"] == 0.0 and top4["dppl"] == 0.0


def test_cheap_expert_policies_are_refused_clearly(olmoe_dir, tmp_path, capsys):
    assert run_main(["--model", str(olmoe_dir), "--out", str(tmp_path / "c"), "--policies", "static-cheap", *COMMON]) == 2
    assert "unknown policy 'static-cheap' for a transformers MoE model" in capsys.readouterr().err


def test_hw_run_accepts_a_transformers_moe_and_defaults_to_its_own_frontier(olmoe_dir, tmp_path, capsys):
    """The GPU campaign (here on the simulator backend and the CPU) takes a saved transformers MoE:
    its positions come from max_position_embeddings, its policies from its own top-K."""
    from nectar.cli.hw_run import main as hw_run_main

    out = tmp_path / "hw"
    argv = ["--model", str(olmoe_dir), "--backend", "sim", "--device", "cpu", "--out", str(out), "--workloads",
            "stationary", "--repeats", "1", "--workload-seconds", "1", "--warmup-s", "0.2", "--calibration-s", "0.2",
            "--chunk-tokens", "512", "--micro-batch", "8", "--seq-len", "64", "--no-progress"]
    assert hw_run_main(argv) == 0
    report = json.loads((out / "stationary" / "frontier.json").read_text())
    assert report["baseline"] == "static-top4"
    assert {p["name"] for p in report["policies"]} >= {"static-top4", "static-top1", "threshold:0.1", "nectar"}
