"""Load a saved transformers MoE model from a local directory and attach NECTAR to it.

The directory is what `save_pretrained` writes (config.json + weights); the family is read from
config.json's `model_type`; nothing is ever downloaded (`local_files_only=True`). The rest of a
saved experiment model (tokenizer, held-out streams, `nectar_model.json`, as `nectar.hf.train_small`
and `nectar.train.saved_model.save_demo_model` write them) is read by `nectar.train.saved_model`,
the one loader of saved models, which calls `load_moe` here for a transformers MoE directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nectar.hf.adapter import AttachedMoE
from nectar.hf.attach import attach
from nectar.hf.families import SUPPORTED_MODEL_TYPES


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
        raise ValueError(f"{directory} holds a {model_type!r} model, which has no MoE blocks of a supported family; "
                         f"NECTAR attaches to the transformers MoE families {', '.join(SUPPORTED_MODEL_TYPES)}")
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
