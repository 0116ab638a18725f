"""Recipe pieces that touch the expert layout: narrow experts start as the first hidden units of
the dense FFN (checked against a slice of HF's GPT2MLP), full experts stay copies of it."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nectar.models.gpt2_moe import MoEGPT2LMHeadModel
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
            for i in (2, 3):  # float32: c_fc over 16, the GELU, c_proj over ≤ 64
                assert_close(layer.experts[i](x), narrow, n=16 + 64 + 4)
            for i in (0, 1):
                assert_close(layer.experts[i](x), mlp(x), n=16 + 64 + 4)


# ----- the recipe's code path, at a tiny size, on the committed slice ------------------------------
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from nectar.cli.train import main as train_main  # noqa: E402
from nectar.train import loop  # noqa: E402
from nectar.train.corpus import Corpus, load_slice  # noqa: E402
from nectar.train.recipes import (RECIPES, DemoModel, load_demo_model, load_training_data, save_demo_model,  # noqa: E402
                                  train_demo_model)
from nectar.train.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from tests.tolerance import approx, assert_close

TINY = dict(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64)


def tiny_gpu_recipe(**changes):
    """The distilgpt2 recipe (same experts, losses, routers, schedule) at a size a CPU runs in seconds."""
    return replace(RECIPES["distilgpt2"], **{**dict(corpus="slice", dense=TINY, dense_steps=6, moe_steps=4,
                   time_budget_s=None, batch=2, seq_len=32, warmup_steps=2, moe_warmup_steps=1, eval_tokens=512,
                   eval_batch=4, log_every=3), **changes})


@pytest.fixture(scope="module")
def tiny_demo():
    torch.set_num_threads(1)
    return train_demo_model(tiny_gpu_recipe(), seed=0, progress=False)


def test_gpu_recipe_path_runs_on_cpu_and_is_deterministic(tiny_demo):
    info = tiny_demo.info
    assert info["dense_steps"] == 6 and info["moe_steps"] == 4 and info["moe"]["num_experts"] == 10
    kinds = [s["kind"] for s in info["moe"]["expert_specs"]]
    assert kinds == ["gelu", "gelu", "zero", "copy", "constant"]
    assert set(info["dense"]["heldout_ppl"]) == {"all", "prose", "reference", "code"}
    assert set(info["moe"]["routing"]) == {"static-top2", "static-top1", "static-cheap"}
    assert info["moe"]["routing"]["static-top1"]["flops_saved"] > 0
    assert info["corpus_sha256"] == Corpus().sha256 and info["corpus_tokens"] >= 30_000_000
    assert len(info["dense"]["curve"]["lm_loss"]) == 6 and info["dense"]["tokens"] == 6 * 2 * 32
    again = train_demo_model(tiny_gpu_recipe(), seed=0, progress=False)
    assert again.info["moe"]["curve"] == info["moe"]["curve"] and again.info["moe_heldout_ppl"] == info["moe_heldout_ppl"]
    for (name, a), (_, b) in zip(tiny_demo.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_saved_model_round_trips_with_its_domain_streams(tiny_demo, tmp_path):
    save_demo_model(tiny_demo, tmp_path / "m")
    json.loads((tmp_path / "m" / "nectar_model.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    loaded = load_demo_model(tmp_path / "m")
    assert torch.equal(loaded.heldout_ids, tiny_demo.heldout_ids) and loaded.heldout_ids.dtype == torch.long
    assert set(loaded.heldout_domains) == {"prose", "reference", "code"}
    for name, stream in tiny_demo.heldout_domains.items():
        assert torch.equal(loaded.heldout_domains[name], stream)
    ids = tiny_demo.heldout_ids[:64].view(2, 32)
    with torch.no_grad():
        # the same weights through the same operations on the same shapes: at most a rounding apart
        assert_close(loaded.model(ids).logits, tiny_demo.model(ids).logits, n=1)
    torch.save({"prose": torch.tensor([1, 10**6])}, tmp_path / "m" / "heldout_domains.pt")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        load_demo_model(tmp_path / "m")
    (tmp_path / "m" / "heldout_domains.pt").write_bytes(b"broken")
    with pytest.raises(ValueError, match="cannot read .*heldout_domains.pt"):
        load_demo_model(tmp_path / "m")
    (tmp_path / "m" / "heldout_domains.pt").unlink()
    assert load_demo_model(tmp_path / "m").heldout_domains is None     # optional (older models)
    (tmp_path / "m" / "heldout_ids.pt").unlink()
    with pytest.raises(ValueError, match="heldout_ids.pt is missing"):
        load_demo_model(tmp_path / "m")


def test_a_time_budget_ends_each_stage_with_a_decayed_learning_rate():
    data = load_training_data(tiny_gpu_recipe(), seed=0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(data.tokenizer), **TINY))
    cfg = loop.TrainConfig(steps=None, batch=2, seq_len=32, lr=1e-3, warmup_steps=2, lr_floor=0.1, progress=False,
                           log_every=5)
    start = time.monotonic()
    result = loop.train_lm(model, data.train_ids, cfg, deadline=start + 1.5)
    assert 1.5 <= time.monotonic() - start < 10 and result.steps > 5 and not result.stopped_early
    assert result.lrs[-1] < 0.15 * cfg.lr and max(result.lrs) > 0.8 * cfg.lr
    assert all(a >= b for a, b in zip(result.lrs[2:], result.lrs[3:]))  # decays after warm-up
    assert len(result.lm_losses) == result.steps


def test_upcycling_real_gpt2_weights_from_a_local_directory(tmp_path, capsys):
    torch.manual_seed(0)
    texts = [d.text for d in load_slice()]
    tokenizer = train_tokenizer(texts[::3], vocab_size=700)       # a GPT-2-style byte-level BPE of its own
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **TINY)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    save_tokenizer(tokenizer, tmp_path / "gpt2")
    argv = ["--preset", "tiny", "--corpus", "slice", "--dense-from", str(tmp_path / "gpt2"), "--steps-moe", "2",
            "--batch", "2", "--seq-len", "32", "--eval-tokens", "512", "--num-experts", "2", "--out",
            str(tmp_path / "moe"), "--no-progress"]
    assert train_main(argv) == 0
    demo = load_demo_model(tmp_path / "moe")
    info = demo.info
    assert info["dense_from"] == str(tmp_path / "gpt2") and info["dense_steps"] == 0 and info["moe_steps"] == 2
    assert info["corpus"]["tokenizer"] == "given" and demo.model.config.vocab_size == len(tokenizer)
    reference = load_training_data(replace(RECIPES["cpu-demo"], corpus="slice", vocab_size=None), tokenizer=tokenizer)
    assert torch.equal(demo.heldout_ids, reference.heldout_ids)          # the corpus in the model's own ids
    first = demo.tokenizer.decode(demo.heldout_domains["prose"][:200].tolist())
    corpus_tok = AutoTokenizer.from_pretrained(str(tmp_path / "gpt2"), local_files_only=True)
    assert first == corpus_tok.decode(reference.heldout_domains["prose"][:200].tolist())
    expected = loop.evaluate_perplexity(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), reference.heldout_ids,
                                        seq_len=32, batch=16, max_tokens=512)
    # the same model and evaluation (saved, reloaded): a rounding of the mean NLL at most, which exp
    # turns into a relative error of the perplexity times its log
    assert info["dense_heldout_ppl"] == approx(expected, n=1, dtype=torch.float32, scale=expected * math.log(expected))
    assert math.isfinite(info["moe_heldout_ppl"])
    (tmp_path / "empty").mkdir()
    bad = [str(tmp_path / "empty") if a == str(tmp_path / "gpt2") else str(tmp_path / "x") if a == str(tmp_path / "moe")
           else a for a in argv]
    assert train_main(bad) == 2
    assert "no config.json there" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_dense_from_needs_a_tokenizer(tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=300, **TINY)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="cannot load its tokenizer"):
        train_demo_model(tiny_gpu_recipe(), dense_from=tmp_path / "gpt2", progress=False)


@pytest.mark.parametrize("size", ["cpu-demo", "distilgpt2"])
def test_the_lact_recipes_are_their_base_with_lact_added(size):
    base, attn, expert = RECIPES[size], RECIPES[f"{size}-lact-attn"], RECIPES[f"{size}-lact-expert"]
    assert attn.dense["attention_type"] == "hybrid_lact" and expert.lact_experts == 1
    for recipe in (attn, expert):            # same data, steps, budget and optimiser as the base
        for name in ("corpus", "train_tokens_per_domain", "dense_steps", "moe_steps", "time_budget_s", "batch",
                     "seq_len", "lr", "full_experts", "zero_compute"):
            assert getattr(recipe, name) == getattr(base, name), name
    kinds = [s["kind"] for s in expert.expert_specs(64)]
    assert kinds.count("lact") == 1 and [k for k in kinds if k != "lact"] == [s["kind"] for s in base.expert_specs(64)]


@pytest.mark.parametrize("variant", ["lact-attn", "lact-expert"])
def test_the_lact_recipes_train_end_to_end_on_cpu(variant):
    """The recipes' own paths (dense parent, upcycle, MoE fine-tune, evaluation) at a size a CPU runs
    in seconds: the trained model holds the LaCT parts and its held-out perplexity is finite."""
    from nectar.lact.expert import LaCTMoEExpert
    from nectar.lact.hybrid_attention import HybridLaCTAttention

    torch.set_num_threads(1)
    lact = RECIPES[f"distilgpt2-{variant}"]
    dense = {**TINY, **{k: v for k, v in lact.dense.items() if k.startswith(("attention_type", "lact_"))}}
    if "lact_window" in dense:
        dense.update(lact_window=8, lact_chunk_size=16)          # several chunks in a 32-token sequence
    demo = train_demo_model(tiny_gpu_recipe(dense=dense, lact_experts=lact.lact_experts), seed=0, progress=False)
    modules = list(demo.model.modules())
    if variant == "lact-attn":                # the dense parent trained its fast-weight memory too
        assert sum(isinstance(m, HybridLaCTAttention) for m in modules) == TINY["n_layer"]
        assert sum(isinstance(m, HybridLaCTAttention) for m in demo.dense.modules()) == TINY["n_layer"]
    else:
        assert sum(isinstance(m, LaCTMoEExpert) for m in modules) == TINY["n_layer"]
    assert all(math.isfinite(v) for v in demo.info["moe"]["heldout_ppl"].values())
    by_position = demo.info["moe"]["heldout_ppl_by_position"]                 # halves of the 32 positions
    assert set(by_position) == {"1-16", "16-32"} and all(math.isfinite(v) for v in by_position.values())


def test_lact_compile_option_sets_the_hybrid_recipes_branch_and_refuses_others():
    from nectar.cli.train import make_recipe, parse_args

    args, specs = parse_args(["--recipe", "distilgpt2-lact-attn", "--lact-compile", "off"])
    assert make_recipe(args, specs).dense["lact_compile"] is False
    args, specs = parse_args(["--recipe", "distilgpt2-lact-attn"])
    assert make_recipe(args, specs).dense["lact_compile"] is True          # the recipe's own setting
    args, specs = parse_args(["--recipe", "cpu-demo-lact-attn", "--lact-compile", "on"])
    assert make_recipe(args, specs).dense["lact_compile"] is True
    args, specs = parse_args(["--recipe", "distilgpt2", "--lact-compile", "on"])
    with pytest.raises(ValueError, match="hybrid LaCT recipe only"):
        make_recipe(args, specs)


def test_warmup_share_option_reaches_both_stages_configs():
    from nectar.cli.train import make_recipe, parse_args
    from nectar.train.recipes import stage_config

    args, specs = parse_args(["--recipe", "distilgpt2-lact-attn", "--warmup-share", "0.1"])
    recipe = make_recipe(args, specs)
    assert recipe.warmup_share == 0.1
    assert {stage_config(recipe, moe=m, device="cpu", dtype="float32", seed=0, progress=False).warmup_share for m in (False, True)} == {0.1}
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "distilgpt2", "--warmup-share", "1.5"])
