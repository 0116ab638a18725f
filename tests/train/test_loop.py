"""Training tests: perplexity against HF's own loss and a closed form, loss goes down,
determinism for a seed, the MoE auxiliary loss against a hand computation, and the CLI end to end."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from nectar.models.gpt2_moe import MoEGPT2LMHeadModel
from nectar.train.tokenizer import load_tokenizer
from nectar.train.loop import TrainConfig, evaluate_perplexity, moe_aux_loss, train_dense, upcycle_and_finetune
from nectar.cli.train import main as train_main, parse_args
from tests.tolerance import approx, assert_close

VOCAB = 48


def small_dense(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_layer=2, n_embd=32, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def patterned_stream(n=6000, seed=0):
    """A learnable stream: each token is a fixed function of the previous one, with 10% noise."""
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB, generator=generator)
    ids = [0]
    noise = torch.rand(n, generator=generator) < 0.1
    random_tokens = torch.randint(0, VOCAB, (n,), generator=generator)
    for i in range(1, n):
        ids.append(int(random_tokens[i]) if noise[i] else int(successor[ids[-1]]))
    return torch.tensor(ids)


def quick_config(**overrides):
    return TrainConfig(**{**dict(steps=25, batch=4, seq_len=16, lr=3e-3, warmup_steps=3, progress=False), **overrides})


def test_perplexity_matches_hf_loss_and_uniform_closed_form():
    model = small_dense().eval()
    ids = torch.randint(0, VOCAB, (16 * 7 + 5,), generator=torch.Generator().manual_seed(2))
    windows = ids[: 16 * 7].view(7, 16)
    with torch.no_grad():
        per_window = [model(input_ids=w[None], labels=w[None]).loss for w in windows]  # equal token counts
    reference = math.exp(float(torch.stack(per_window).mean()))
    # float32, batches of 3 windows vs 1: every matmul of the path blocked differently (2 layers of
    # width 32: two layer norms, c_attn, attention over 16 keys, c_proj, the MLP over 32 and 128;
    # the head and log-softmax over VOCAB), then a mean over the 7·15 tokens; exp turns the mean
    # NLL's error into a relative one times log(perplexity)
    model_n = 2 * (9 * 32 + 8 + 2 * 16 + 128) + 2 * 32 + 2 * VOCAB + 7 * 15
    ppl = dict(dtype=torch.float32, n=model_n, scale=reference * math.log(reference))
    assert evaluate_perplexity(model, ids, seq_len=16, batch=3) == approx(reference, **ppl)
    # by position: the per-token NLLs of HF's loss (reduction none), averaged over positions 9..15 only
    with torch.no_grad():
        logits = model(input_ids=windows).logits                                     # [7, 16, V]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    late = math.exp(float(nll[:, 8:].mean()))                                       # targets at positions 9..15
    assert evaluate_perplexity(model, ids, seq_len=16, batch=3, positions=(9, 16)) == approx(late, **ppl)
    with pytest.raises(ValueError, match="positions"):
        evaluate_perplexity(model, ids, seq_len=16, positions=(0, 8))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied LM head -> all logits 0 -> uniform prediction
    uniform = dict(dtype=torch.float32, n=model_n, scale=VOCAB * math.log(VOCAB))
    assert evaluate_perplexity(model, ids, seq_len=16, batch=4) == approx(VOCAB, **uniform)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate_perplexity(model, ids[:10], seq_len=16)


def test_dense_training_lowers_loss_and_is_deterministic():
    stream = patterned_stream()
    train_ids, heldout_ids = stream[:5000], stream[5000:]
    model = small_dense()
    before = evaluate_perplexity(model, heldout_ids, seq_len=16)
    result = train_dense(model, train_ids, quick_config(steps=40))
    after = evaluate_perplexity(model, heldout_ids, seq_len=16)
    assert result.steps == 40 and result.tokens == 40 * 4 * 16 and not result.stopped_early
    assert sum(result.lm_losses[-5:]) / 5 < sum(result.lm_losses[:5]) / 5 - 0.5
    assert after < 0.5 * before
    again = small_dense()
    assert train_dense(again, train_ids, quick_config(steps=40)).lm_losses == result.lm_losses
    other_seed = train_dense(small_dense(), train_ids, quick_config(steps=40, seed=1)).lm_losses
    assert other_seed != result.lm_losses


def test_skip_batches_continues_the_seeded_stream():
    stream = patterned_stream()
    seen = []
    model = small_dense()
    original_forward = model.forward
    def recording_forward(input_ids=None, **kwargs):
        seen.append(input_ids.clone())
        return original_forward(input_ids=input_ids, **kwargs)

    model.forward = recording_forward
    train_dense(model, stream, quick_config(steps=5))
    first_stage, seen[:] = list(seen), []
    train_dense(model, stream, quick_config(steps=3, skip_batches=2))
    assert all(torch.equal(a, b) for a, b in zip(seen, first_stage[2:5]))


def test_moe_aux_loss_matches_hand_computation():
    moe = MoEGPT2LMHeadModel.from_dense(small_dense(), num_experts=4, top_k=2)
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            layer.gate.weight.normal_(0, 1.0)
    moe(torch.randint(0, VOCAB, (3, 10)))
    expected = []
    for _, layer in moe.moe_layers():
        logits = layer.last_decision.logits
        probs = torch.softmax(logits, -1)
        fraction = torch.stack([(probs.argmax(-1) == e).float().mean() for e in range(4)])
        switch = 4 * (fraction * probs.mean(0)).sum()
        z = (torch.logsumexp(logits, -1) ** 2).mean()
        expected.append(0.01 * switch + 0.001 * z)
    # float32 means over the 30 tokens of softmaxes over 4 experts, a mean over the 2 layers
    assert_close(moe_aux_loss(moe, 0.01, 0.001), torch.stack(expected).mean(), n=2 * 30 + 2 * 4 + 4)


def test_upcycle_and_finetune_trains_gates_and_experts():
    stream = patterned_stream()
    dense = small_dense()
    train_dense(dense, stream, quick_config(steps=10))
    dense_mlp_weight = dense.transformer.h[0].mlp.c_fc.weight.clone()
    moe, result = upcycle_and_finetune(dense, stream, quick_config(steps=8, balance_coef=0.1), num_experts=3, top_k=1)
    assert isinstance(moe, MoEGPT2LMHeadModel) and result.steps == 8
    assert all(math.isfinite(x) for x in result.total_losses)
    assert all(t > l for t, l in zip(result.total_losses, result.lm_losses))  # aux terms are positive
    layer = moe.transformer.h[0].mlp.moe
    assert layer.gate.weight.abs().max() > 10 * moe.config.router_init_std  # the gate learned
    experts_moved = [not torch.equal(e.c_fc.weight, dense_mlp_weight) for e in layer.experts]
    assert any(experts_moved) and torch.equal(dense.transformer.h[0].mlp.c_fc.weight, dense_mlp_weight)


def test_deadline_and_config_validation():
    result = train_dense(small_dense(), patterned_stream(2000), quick_config(), deadline=time.monotonic() - 1)
    assert result.stopped_early and result.steps == 0
    for bad in (dict(steps=0), dict(seq_len=1), dict(dtype="float16"), dict(lr=0.0), dict(skip_batches=-1)):
        with pytest.raises(ValueError):
            quick_config(**bad).validate()


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--corpus", "slice", "--steps-dense", "3", "--steps-moe", "2", "--batch", "2",
            "--seq-len", "32", "--vocab-size", "400", "--eval-tokens", "640", "--num-experts", "3", "--top-k", "2",
            "--out", str(out), "--no-progress", "--save-dense", "--summary-out", str(tmp_path / "summary")]
    assert train_main(argv) == 0
    info = json.loads((out / "nectar_model.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert info["corpus"]["vocab_size"] == 400 and info["dense_steps"] == 3 and info["moe_steps"] == 2
    assert info["moe"]["num_experts"] == 3 and info["recipe"]["moe_steps"] == 2
    assert info["command"].startswith("nectar train --preset tiny")
    dense_ppl = info["dense_heldout_ppl"]
    assert 1 < dense_ppl < 2 * 400
    # exact upcycling: the MoE differs from the dense model only in its experts (the same MLP on
    # gathered tokens, blocked differently: sums over 128 and 512) and the gate mixing (2 of 3):
    # n per layer, 4 layers of the tiny preset; exp: a relative error times log(perplexity)
    upcycle_n = 4 * (128 + 512 + 2 * 3 + 2)
    assert info["moe"]["heldout_ppl_at_upcycle"] == approx(dense_ppl, dtype=torch.float32, n=upcycle_n,
                                                           scale=dense_ppl * math.log(dense_ppl))
    assert set(info["moe"]["heldout_ppl"]) == {"all", "prose", "reference", "code"}
    tokenizer = load_tokenizer(out)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(moe, MoEGPT2LMHeadModel) and moe.config.vocab_size == len(tokenizer)
    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "dense"), GPT2LMHeadModel)
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert summary["dense_heldout_ppl"] == dense_ppl and (tmp_path / "summary" / "training_curves.png").stat().st_size
    assert "held-out perplexity" in capsys.readouterr().out


def test_cli_argument_checks(tmp_path):
    args, specs = parse_args(["--expert-specs", '[{"kind": "gelu", "count": 2}, {"kind": "zero"}]'])
    assert specs == [{"kind": "gelu", "count": 2}, {"kind": "zero"}] and args.preset == "tiny"
    for bad in (["--expert-specs", "{not json"], ["--expert-specs", '{"kind": "gelu"}'], ["--threads", "0"],
                ["--preset", "gpt5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def null_aware_all_full(d):
    """The null-aware loss with every expert full: Switch over all active slots, by hand."""
    probs, experts = d.probs, d.experts[d.active]
    fraction = torch.stack([(experts == e).float().mean() for e in range(probs.shape[1])])
    return probs.shape[1] * (fraction * probs.mean(0)).sum()


@pytest.mark.parametrize("loss", ["switch", "importance", "kl_uniform", "entropy", "null_aware"])
def test_every_balancing_loss_is_reachable_from_training(loss):
    from nectar.moe.balancing import entropy_regularizer, importance_loss, kl_to_uniform, switch_load_balancing_loss

    moe = MoEGPT2LMHeadModel.from_dense(small_dense(), num_experts=4, top_k=2)
    with torch.no_grad():
        for _, layer in moe.moe_layers():
            layer.gate.weight.normal_(0, 1.0)
    moe(torch.randint(0, VOCAB, (3, 10)))
    reference = {"switch": switch_load_balancing_loss, "importance": lambda d: importance_loss(d.probs),
                 "kl_uniform": lambda d: kl_to_uniform(d.probs),
                 "entropy": lambda d: entropy_regularizer(d.probs, token_coef=1.0, marginal_coef=1.0),
                 "null_aware": null_aware_all_full}[loss]
    expected = torch.stack([0.5 * reference(layer.last_decision) for _, layer in moe.moe_layers()]).mean()
    assert_close(moe_aux_loss(moe, 0.5, 0.0, loss), expected, n=2 * 30 + 2 * 4 + 4)  # as above
    _, result = upcycle_and_finetune(small_dense(), patterned_stream(600), quick_config(steps=3, balance_loss=loss),
                                     num_experts=3, top_k=1)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.total_losses)


def test_aux_free_bias_step_runs_in_training_and_balances():
    moe, _ = upcycle_and_finetune(small_dense(), patterned_stream(600), quick_config(steps=3, aux_free_gamma=0.05),
                                  num_experts=4, top_k=1)
    biases = [layer.router.selection_bias for _, layer in moe.moe_layers()]
    assert any(b.abs().sum() > 0 for b in biases)                      # the bias moved
    for b in biases:  # centred, as the update keeps it: float32, 3 centring steps over 4 experts
        # whose terms are steps of size γ = 0.05: Σ|terms| ≤ 3 · 4 · 0.05
        assert_close(b.sum(), 0.0, n=3 * 2 * 4, scale=3 * 4 * 0.05)
    with pytest.raises(ValueError, match="balance_loss"):
        quick_config(balance_loss="gini").validate()


def test_spelled_out_choices_of_the_cli_agree_with_the_code():
    from nectar.cli import train as cli
    from nectar.train import aux_losses, recipes

    assert set(cli.COMPUTE_COSTS) == set(aux_losses.COMPUTE_COSTS)
    assert set(cli.OVERRIDES.values()) <= set(recipes.ModelRecipe.__dataclass_fields__)
