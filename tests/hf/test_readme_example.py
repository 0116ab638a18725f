"""The README's transformers MoE examples run as written: each fenced python block after a
`<!-- readme-example: NAME -->` marker is read from README.md and executed, so README and test
cannot drift. The first builds a tiny random OLMoE (offline, seconds); the second makes a
`--model DIR` folder from a `save_pretrained` folder, which `nectar run` then loads and runs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from nectar.cli.experiment_args import check_model_option
from nectar.train.saved_model import load_hf_demo
from nectar.train.tokenizer import train_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    """The fenced python block right after `<!-- readme-example: name -->` in README.md."""
    found = re.search(rf"<!-- readme-example: {re.escape(name)} -->\n```python\n(.*?)\n```\n", README.read_text(), re.S)
    assert found, f"README.md has no python block after <!-- readme-example: {name} -->"
    return found.group(1)


def test_the_hf_example_runs_as_written():
    code = readme_example("hf")
    assert len(code.splitlines()) <= 20                        # a short example, not a program
    namespace: dict = {"__name__": "readme_example"}
    started = time.perf_counter()
    exec(compile(code, "README.md <!-- readme-example: hf -->", "exec"), namespace)
    assert time.perf_counter() - started < 30                  # seconds, offline (no hub access exists here)
    assert namespace["tokens"].shape == (2, 10)
    assert "generate" not in namespace["model"].__dict__       # detached: nothing of NECTAR is left


def test_the_model_dir_recipe_makes_a_folder_nectar_run_accepts(tmp_path, monkeypatch, capsys):
    texts = [f"expert {i} reads token {i * 7 % 13} in layer {i % 5} of block {i % 3}." for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    src, out = tmp_path / "src", tmp_path / "dir"
    OlmoeForCausalLM(config).save_pretrained(src)            # what a user has: a save_pretrained folder
    tokenizer.save_pretrained(src)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heldout.txt").write_text(" ".join(texts) * 4)
    exec(compile(readme_example("hf-model-dir"), "README.md <!-- readme-example: hf-model-dir -->", "exec"),
         {"SRC": str(src), "DIR": str(out)})
    check_model_option(out)                                  # nothing missing
    demo = load_hf_demo(out)
    assert demo.heldout_ids.numel() > 8192 and int(demo.heldout_ids.max()) < len(tokenizer)
    from nectar.cli.run import main as run_main

    assert run_main(["--model", str(out), "--tokens", "2048", "--chunk-tokens", "2048", "--seq-len", "64",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for policy in ("static-top2", "static-top1", "nectar"):   # the README's promise: own top-K, top-1, NECTAR
        assert re.search(rf"^{policy} ", printed, re.M)
