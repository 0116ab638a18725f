"""The small OLMoE-style recipe trains, saves what `load_hf_demo` loads, and the loaded model runs
under NECTAR's chunk forward — a tiny configuration on a tiny text, in seconds on a CPU."""

import json

import pytest
import torch

from nectar.experiment.forward import forward_chunk, install
from nectar.hf.load import is_hf_moe_dir, load_moe
from nectar.hf.train_small import SmallMoERecipe, main, plan_steps, save_small_moe, train_small_moe
from nectar.train.recipes import TrainingData
from nectar.train.saved_model import load_hf_demo
from nectar.train.tokenizer import encode_documents, train_tokenizer

TINY = dict(hidden=32, layers=2, heads=4, experts=8, top_k=2, expert_hidden=16, seq_len=32, batch=8, lr=3e-3,
            warmup_steps=2, max_epochs=2.0, max_positions=64, eval_tokens=512)


@pytest.fixture(scope="module")
def tiny_data():
    texts = [f"expert {i} reads token {i * 7 % 13} in layer {i % 5} of block {i % 3}." for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    held = encode_documents(tokenizer, texts[270:] * 4)
    return TrainingData(tokenizer, encode_documents(tokenizer, texts[:270] * 2), held, {"all": held}, {"sha256": "test"})


def test_tiny_recipe_trains_saves_and_runs_attached(tiny_data, tmp_path):
    domains = {"prose": tiny_data.heldout_ids[:200], "code": tiny_data.heldout_ids[200:]}
    demo = train_small_moe(SmallMoERecipe(**TINY), data=tiny_data, progress=False, heldout_domains=domains)
    info = demo.info
    assert info["steps"] == info["steps_planned"] >= 10 and info["experts_implementation"] in ("grouped_mm", "eager")
    assert info["final_loss"] < info["first_loss"] - 0.5             # it learns (aux loss included in both)
    assert info["heldout_ppl"] < len(tiny_data.tokenizer)
    assert demo.model.config.output_router_logits is False
    save_small_moe(demo, tmp_path)
    assert is_hf_moe_dir(tmp_path) and json.loads((tmp_path / "nectar_model.json").read_text())["steps"] == info["steps"]
    loaded = load_hf_demo(tmp_path)
    assert torch.equal(loaded.heldout_ids, tiny_data.heldout_ids) and loaded.info["seed"] == 0
    assert {k: v.tolist() for k, v in loaded.heldout_domains.items()} == {k: v.tolist() for k, v in domains.items()}
    model = loaded.model
    with torch.no_grad():
        batch = loaded.heldout_ids[: 4 * 32].view(4, 32)
        assert torch.equal(model(input_ids=batch).logits, demo.model(input_ids=batch).logits)
    install(model, [layer.policy_router("static-top1") for _, layer in model.moe_layers()])
    obs = forward_chunk(model, batch)
    assert len(obs.workload.layers) == 2 and obs.agreement == 0.5
    assert [sum(layer.tokens_per_expert) for layer in obs.workload.layers] == [batch.numel()] * 2


def test_budget_and_epochs_bound_the_steps():
    recipe = SmallMoERecipe(batch=10, seq_len=10, max_epochs=2.0)
    assert plan_steps(recipe, 10_000, step_s=0.1, budget_s=None) == 200
    assert plan_steps(recipe, 10_000, step_s=0.1, budget_s=2.3) == 20
    assert plan_steps(recipe, 10_000, step_s=0.1, budget_s=0.0) == 1
    with pytest.raises(ValueError, match="multiple of heads"):
        SmallMoERecipe(hidden=30, heads=4).validate()


def test_cli_refuses_a_bad_recipe(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--hidden", "30", "--heads", "4", "--no-progress"]) == 2
    assert "multiple of heads" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_load_errors_are_clear(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_moe(tmp_path)
    with pytest.raises(ValueError, match="'nectar_moe_gpt2' model"):
        load_moe(tiny_model_dir)
    assert not is_hf_moe_dir(tiny_model_dir) and not is_hf_moe_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model, which has no MoE blocks of a supported family; NECTAR attaches to the transformers MoE families"):
        load_moe(tmp_path)
