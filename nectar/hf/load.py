"""Load a saved transformers MoE model from a local directory and attach NECTAR to it.

The directory is what `save_pretrained` writes (config.json + weights), optionally with the
project's tokenizer, `heldout_ids.pt` and `nectar_model.json` (as `nectar.hf.train_small` and
`nectar.train.recipes.save_demo_model` write them). The family is read from config.json's
`model_type`; nothing is ever downloaded (`local_files_only=True`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nectar.hf.adapter import AttachedMoE
from nectar.hf.attach import attach
from nectar.hf.families import SUPPORTED_MODEL_TYPES

DOMAINS_FILE = "heldout_domains.pt"


def model_type_of(directory: str | os.PathLike) -> str | None:
    """config.json's model_type, or None when the directory holds no config.json."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from exc


def is_hf_moe_dir(directory: str | os.PathLike) -> bool:
    """True iff the directory holds a saved model of a supported transformers MoE family."""
    return model_type_of(directory) in SUPPORTED_MODEL_TYPES


def _check_dir(directory: Path) -> str:
    model_type = model_type_of(directory)
    if model_type is None:
        raise FileNotFoundError(f"{directory} holds no saved model (config.json missing)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{directory} holds a {model_type!r} model; NECTAR attaches to the transformers MoE "
                         f"families {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def load_moe(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             routers=None, drop: str = "auto", experts_implementation: str | None = None) -> AttachedMoE:
    """The saved model in eval mode on `device` in `dtype`, with NECTAR attached (`nectar.hf.attach`).

    `experts_implementation` defaults to the model's own, except fp64 on a CPU, where grouped_mm
    has no kernel and "eager" is used."""
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    _check_dir(directory)
    if experts_implementation is None and dtype == torch.float64 and torch.device(device).type == "cpu":
        experts_implementation = "eager"
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype, **kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load the model in {directory}: {exc}") from exc
    model = model.to(device).eval()
    return attach(model, routers=routers, drop=drop)


def corpus_heldout(tokenizer) -> torch.Tensor:
    """[N] the corpus's held-out split as one stream in `tokenizer`'s ids (for a model saved
    without its own held-out stream)."""
    from nectar.train.corpus import Corpus
    from nectar.train.data import built_documents, mixed_stream, retokenize
    from nectar.train.recipes import corpus_tokenizer

    corpus = Corpus()
    held = retokenize(built_documents(corpus, "test"), corpus_tokenizer(corpus), tokenizer)
    return mixed_stream(held, tokenizer.eos_token_id or 0, 0)


def load_hf_demo(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A `nectar.train.recipes.DemoModel` (attached model, tokenizer, held-out stream, info) from a
    directory written by `nectar.hf.train_small`: what `nectar run --model DIR` needs. Per-domain
    held-out streams (`heldout_domains.pt`, {domain: [n] ids}), when saved, become its
    `heldout_domains` (the domain-shift workload's streams)."""
    from nectar.train.saved_model import DemoModel, load_tokens
    from nectar.train.tokenizer import load_tokenizer

    directory = Path(directory)
    model = load_moe(directory, dtype=dtype, device=device)
    tokenizer = load_tokenizer(directory)
    vocab = int(model.config.vocab_size)
    heldout = load_tokens(directory / "heldout_ids.pt", vocab, required=False)
    heldout = heldout if heldout is not None else corpus_heldout(tokenizer)
    info_path = directory / "nectar_model.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    demo = DemoModel(model, tokenizer, heldout, info)
    demo.heldout_domains = load_tokens(directory / DOMAINS_FILE, vocab, required=False)
    return demo
