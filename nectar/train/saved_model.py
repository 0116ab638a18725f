"""A saved experiment model: what `nectar train` writes and `nectar run --model` / `frontier` / `hw-run` load.

A model folder holds the MoE (config.json + weights, save_pretrained), its tokenizer, the mixed
held-out stream `heldout_ids.pt` (int32 on disk), the per-domain held-out streams
`heldout_domains.pt` ({domain: stream}; the frontier's domain-shift workload) and
`nectar_model.json` (strict JSON: recipe, corpus sha256, tokens, seconds, curves, perplexities).
Loading is strict: any missing, truncated or inconsistent part is a one-line ValueError naming the
file (the held-out domains are optional, for models saved before they existed).

This is the one loader of saved models: a folder of a transformers MoE family (Mixtral, Qwen-MoE,
OLMoE, DeepSeek-V3; `nectar.hf.train_small` writes one) loads here too (`load_hf_demo`), its model
through `nectar.hf.load.load_moe` (which imports nothing of training).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from nectar.models.gpt2_moe import MODEL_TYPE, MoEGPT2LMHeadModel
from nectar.train.tokenizer import load_tokenizer, save_tokenizer

DOMAINS_FILE = "heldout_domains.pt"


@dataclass
class DemoModel:
    model: MoEGPT2LMHeadModel
    tokenizer: object
    heldout_ids: torch.Tensor                                  # [N] the mixed held-out token stream
    info: dict
    heldout_domains: dict[str, torch.Tensor] | None = None     # {domain: [N_d]} held-out stream per domain
    dense: GPT2LMHeadModel | None = None                       # the dense parent (not saved with the model)


def json_safe(value):
    """NaN/inf → None, tuples → lists, recursively (nectar_model.json is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_demo_model(demo: DemoModel, directory: Path) -> None:
    """Config + weights, tokenizer, heldout_ids.pt (int32), heldout_domains.pt, nectar_model.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        demo.model.save_pretrained(directory)
    save_tokenizer(demo.tokenizer, directory)
    torch.save(demo.heldout_ids.to(torch.int32).clone(), directory / "heldout_ids.pt")
    if demo.heldout_domains:
        torch.save({k: v.to(torch.int32).clone() for k, v in demo.heldout_domains.items()},
                   directory / "heldout_domains.pt")
    (directory / "nectar_model.json").write_text(json.dumps(json_safe(demo.info), indent=1, allow_nan=False) + "\n")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_model_dir(directory: Path) -> None:
    """ValueError unless `directory` holds a NECTAR MoE checkpoint: a readable config.json of model
    type nectar_moe_gpt2 and a non-empty weights file (the loader checks the rest)."""
    if not directory.exists():
        raise ValueError(f"model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(f"--model {str(directory)!r} is a file; pass the directory that holds config.json")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} holds no saved model (config.json missing)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {found!r} model, not a NECTAR MoE ({MODEL_TYPE!r}); "
                         "write one with `nectar train --recipe cpu-demo --out DIR`")
    weights = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not weights:
        raise ValueError(f"{directory} has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    if weights[0].stat().st_size == 0:
        raise ValueError(f"{weights[0]} is empty (an interrupted copy?)")


@contextmanager
def quiet_transformers():
    """transformers' load report and progress bar off while the loader runs (it raises instead)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_demo_model(directory: Path) -> DemoModel:
    """A saved experiment model (config, weights, tokenizer, held-out streams, info); ValueError with
    one line naming the file when any part is missing, truncated or inconsistent."""
    directory = Path(directory)
    from nectar.hf.load import is_hf_moe_dir

    if is_hf_moe_dir(directory):        # a saved Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 (nectar.hf)
        return load_hf_demo(directory)
    check_model_dir(directory)
    try:
        with quiet_transformers():
            model = MoEGPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()  # committed weights are fp16
    except Exception as exc:  # noqa: BLE001  safetensors/torch/transformers raise their own types for bad files
        raise ValueError(f"cannot load the model in {directory}: {first_line(exc)}") from exc
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001  tokenizers raises its own Exception type for a bad tokenizer.json
        raise ValueError(f"cannot load the tokenizer in {directory}: {first_line(exc)}") from exc
    vocab = model.config.vocab_size
    heldout = load_tokens(directory / "heldout_ids.pt", vocab, required=True)
    domains = load_tokens(directory / "heldout_domains.pt", vocab, required=False)
    info_path = directory / "nectar_model.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{info_path} is not valid JSON: {exc}") from exc
    return DemoModel(model, tokenizer, heldout, info, domains)


def corpus_heldout(tokenizer) -> torch.Tensor:
    """[N] the corpus's held-out split as one stream in `tokenizer`'s ids (for a model saved
    without its own held-out stream)."""
    from nectar.train.corpus import Corpus
    from nectar.train.data import built_documents, corpus_tokenizer, mixed_stream, retokenize

    corpus = Corpus()
    held = retokenize(built_documents(corpus, "test"), corpus_tokenizer(corpus), tokenizer)
    return mixed_stream(held, tokenizer.eos_token_id or 0, 0)


def load_hf_demo(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A `DemoModel` (attached model, tokenizer, held-out stream, info) from a directory written by
    `nectar.hf.train_small`: what `nectar run --model DIR` needs. Per-domain held-out streams
    (`heldout_domains.pt`, {domain: [n] ids}), when saved, become its `heldout_domains` (the
    domain-shift workload's streams)."""
    from nectar.hf.load import load_moe

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


def load_tokens(path: Path, vocab_size: int, required: bool):
    """heldout_ids.pt (one 1-D tensor) or heldout_domains.pt ({name: 1-D tensor}) of integer token
    ids below the vocabulary, as int64; None when an optional file is absent."""
    if not path.exists():
        if required:
            raise ValueError(f"{path} is missing (the held-out stream `nectar train` saves with every model)")
        return None
    try:
        value = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001  truncated zip / pickle: several exception types
        raise ValueError(f"cannot read {path}: {first_line(exc)}") from exc
    tensors = value if isinstance(value, dict) else {"": value}
    if not tensors or (required and isinstance(value, dict)):
        raise ValueError(f"{path} must hold {'a 1-D tensor' if required else 'a dict of 1-D tensors'} of token ids")
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or not t.numel():
            raise ValueError(f"{path} must hold non-empty 1-D integer tensors of token ids")
        if not 0 <= int(t.min()) <= int(t.max()) < vocab_size:
            raise ValueError(f"{path} holds token ids outside the model's vocabulary [0, {vocab_size})")
        out[name] = t.long()
    return out[""] if "" in out and len(out) == 1 and not isinstance(value, dict) else out


