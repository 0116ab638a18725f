"""`--model DIR` for a transformers MoE: a folder that lacks a file the run needs is refused before
anything runs, with one line naming the file and how to make it; a model of any other type (a
dense one) is told it has no MoE blocks of a supported family, and which families are."""

from __future__ import annotations

import json

import pytest
import torch

from nectar.cli.experiment_args import check_model_option
from nectar.cli.run import main as run_main
from nectar.hf.families import SUPPORTED_MODEL_TYPES
from nectar.train import corpus
from nectar.train.tokenizer import train_tokenizer
from tests.hf.models import tiny


@pytest.fixture
def hf_dir(tmp_path):
    """A complete transformers MoE folder: save_pretrained, tokenizer.json and heldout_ids.pt."""
    directory = tmp_path / "moe"
    tiny("olmoe").save_pretrained(directory)
    train_tokenizer([f"word {i} and word {i * 3}" for i in range(100)], vocab_size=300).save_pretrained(directory)
    torch.save(torch.arange(9000, dtype=torch.int32) % 97, directory / "heldout_ids.pt")
    return directory


def test_a_complete_folder_passes(hf_dir):
    check_model_option(hf_dir)
    check_model_option(None)


def test_missing_weights_are_named_with_how_to_make_them(hf_dir):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has config.json but no weights .*save_pretrained\(DIR\)"):
        check_model_option(hf_dir)


def test_a_missing_tokenizer_is_named_with_how_to_make_it(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"has no tokenizer.json: .*save_pretrained\(DIR\)"):
        check_model_option(hf_dir)


def test_a_missing_heldout_stream_is_named_unless_the_built_corpus_stands_in(hf_dir, monkeypatch):
    (hf_dir / "heldout_ids.pt").unlink()

    def not_built(*args):
        raise corpus.CorpusError("not built")

    monkeypatch.setattr(corpus, "find_built_dir", not_built)
    with pytest.raises(ValueError, match=r"has no heldout_ids.pt, .*torch.save\(.*build_corpus.py"):
        check_model_option(hf_dir)
    monkeypatch.setattr(corpus, "find_built_dir", lambda *args: hf_dir)
    check_model_option(hf_dir)                                    # the corpus's held-out split stands in


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "dbrx"])
def test_a_model_without_supported_moe_blocks_lists_the_families(tmp_path, model_type, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ValueError, match=f"describes a '{model_type}' model, which has no MoE blocks") as info:
        check_model_option(tmp_path)
    assert all(family in str(info.value) for family in SUPPORTED_MODEL_TYPES)
    assert run_main(["--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2   # refused before any run
    err = capsys.readouterr().err
    assert "no MoE blocks of a transformers family NECTAR supports" in err and not (tmp_path / "out").exists()


def test_a_nectar_checkpoint_and_unreadable_folders_are_left_to_the_loader(tmp_path, tiny_model_dir):
    check_model_option(tiny_model_dir)                            # NECTAR's own format: the loader checks it
    check_model_option(tmp_path / "nowhere")                      # the loader says it does not exist
    (tmp_path / "config.json").write_text("{not json")
    check_model_option(tmp_path)                                  # the loader says it is not valid JSON
