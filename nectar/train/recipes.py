"""The experiment model: a DistilGPT2-architecture MoE with energy-cheap experts, trained here.

Recipe (docs/design.md §8): train a dense GPT-2 of the preset's shape on the offline corpus, sparse-
upcycle it (full experts = copies of the dense FFN, a narrow expert = the first hidden units of
the dense FFN, zero and copy experts), then fine-tune the MoE with the Switch balancing loss while
a `MixedTrainingRouter` sends a share of second slots to cheap experts, so that the cheap experts
are useful when NECTAR picks them. The result is cached in a directory (save_pretrained +
tokenizer) and reused; `--model DIR` loads one instead.

Presets: "cpu-demo" (6 layers × 128 wide: DistilGPT2's depth, a width a 2-core CPU trains in a
minute) and "distilgpt2" (6 × 768, 12 heads: the GPU model).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import GPT2LMHeadModel

from nectar.moe.static_routers import MixedTrainingRouter
from nectar.moe.expert_pool import GELUGroup
from nectar.model import MODEL_TYPE, MoEGPT2LMHeadModel, preset_config
from nectar.experiment.policies import cheap_experts
from nectar.train.tokenizer import load_tokenizer, save_tokenizer
from nectar.train.loop import TrainConfig, evaluate_perplexity, moe_aux_loss, prepare_data, train_lm

RECIPE_VERSION = 1


@dataclass
class ModelRecipe:
    preset: str = "cpu-demo"
    dense: dict = field(default_factory=lambda: dict(n_layer=6))    # overrides of the base preset
    base: str = "tiny"
    full_experts: int = 4
    narrow_fraction: float = 0.25
    zero_compute: tuple = ("zero", "copy")
    top_k: int = 2
    dense_steps: int = 1000
    moe_steps: int = 400
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    cheap_prob: float = 0.3
    vocab_size: int = 4096
    moe_lr_scale: float = 1.0

    def expert_specs(self, inner: int) -> list[dict]:
        specs = [{"kind": "gelu", "hidden": inner, "count": self.full_experts},
                 {"kind": "gelu", "hidden": max(8, int(inner * self.narrow_fraction)), "count": 1}]
        return specs + [{"kind": kind, "count": 1} for kind in self.zero_compute]


RECIPES = {
    "cpu-demo": ModelRecipe(),
    "distilgpt2": ModelRecipe(preset="distilgpt2", base="distilgpt2", dense={}, full_experts=6, dense_steps=800,
                              moe_steps=400, batch=32, seq_len=512, lr=1e-3, vocab_size=8192, moe_lr_scale=0.3),
}


@dataclass
class DemoModel:
    model: MoEGPT2LMHeadModel
    tokenizer: object
    heldout_ids: torch.Tensor        # [N] the held-out token stream
    info: dict


@torch.no_grad()
def init_narrow_from_dense(moe: MoEGPT2LMHeadModel, dense: GPT2LMHeadModel) -> None:
    """Narrow GELU experts start as the first `hidden` units of the block's dense FFN."""
    for idx, layer in moe.moe_layers():
        mlp = dense.transformer.h[idx].mlp
        for group in layer.experts.groups:                                  # stacked: [G, D, H], [G, H], ...
            if isinstance(group, GELUGroup) and group.hidden < mlp.c_fc.weight.shape[1]:
                hidden = group.hidden
                for stacked, dense_part in ((group.c_fc, mlp.c_fc.weight[:, :hidden]),       # Conv1D [D, H]
                                            (group.c_fc_bias, mlp.c_fc.bias[:hidden]),
                                            (group.c_proj, mlp.c_proj.weight[:hidden, :]),   # [H, D]
                                            (group.c_proj_bias, mlp.c_proj.bias)):
                    stacked.copy_(dense_part.unsqueeze(0).expand_as(stacked))


def train_demo_model(recipe: ModelRecipe, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                     progress: bool = True, time_budget_s: float | None = None) -> DemoModel:
    """Dense training → upcycling → MoE fine-tune with cheap-slot mixing. Deterministic on CPU."""
    torch.manual_seed(seed)
    start = time.monotonic()
    # the dense stage may use 60 % of the budget, the MoE fine-tune the rest
    dense_deadline = None if time_budget_s is None else start + 0.6 * time_budget_s
    moe_deadline = None if time_budget_s is None else start + time_budget_s
    data = prepare_data(vocab_size=recipe.vocab_size)
    eos = data.tokenizer.eos_token_id or 0
    config = preset_config(recipe.base, vocab_size=len(data.tokenizer), eos_token_id=eos, **recipe.dense)
    dense = GPT2LMHeadModel(config)
    stage = dict(batch=recipe.batch, seq_len=recipe.seq_len, lr=recipe.lr, device=device, dtype=dtype,
                 seed=seed, progress=progress)
    dense_result = train_lm(dense, data.train_ids, TrainConfig(steps=recipe.dense_steps, **stage),
                            deadline=dense_deadline, desc="dense")
    inner = config.n_inner or 4 * config.n_embd
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=0, top_k=recipe.top_k,
                                        expert_specs=recipe.expert_specs(inner))
    init_narrow_from_dense(moe, dense)
    for _, layer in moe.moe_layers():
        layer.router = MixedTrainingRouter(layer.num_experts, cheap_experts(layer), k=recipe.top_k,
                                           cheap_prob=recipe.cheap_prob, seed=seed)
    cfg = TrainConfig(steps=recipe.moe_steps, **{**stage, "lr": recipe.lr * recipe.moe_lr_scale})
    aux = lambda m: moe_aux_loss(m, cfg.balance_coef, cfg.z_coef)  # noqa: E731
    moe_result = train_lm(moe, data.train_ids, cfg, aux_loss=aux, deadline=moe_deadline, desc="moe")
    moe.set_router_by_name("topk", k=recipe.top_k)
    info = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "seed": seed,
            "dense_steps": dense_result.steps, "moe_steps": moe_result.steps,
            "dense_seconds": dense_result.seconds, "moe_seconds": moe_result.seconds,
            "dense_final_loss": dense_result.final_loss, "moe_final_loss": moe_result.final_loss,
            "dense_heldout_ppl": evaluate_perplexity(dense, data.heldout_ids, seq_len=recipe.seq_len,
                                                     max_tokens=32768),
            "corpus_sha256": data.manifest.get("sha256")}
    return DemoModel(moe.eval(), data.tokenizer, data.heldout_ids, info)


def save_demo_model(demo: DemoModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    demo.model.save_pretrained(directory)
    save_tokenizer(demo.tokenizer, directory)
    torch.save(demo.heldout_ids, directory / "heldout_ids.pt")
    (directory / "nectar_model.json").write_text(json.dumps(demo.info, indent=2) + "\n")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Measured: `nectar train --recipe cpu-demo --threads 1` took ~22 min on the 2-core CI machine.
TRAINING_ESTIMATE = {"cpu-demo": "about 20-25 minutes on a 2-core CPU", "distilgpt2": "several minutes on a GPU"}


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_demo_model(directory: Path) -> DemoModel:
    """A saved experiment model (config, weights, tokenizer, held-out ids, info); ValueError with one
    line naming the file when any part is missing, truncated or inconsistent."""
    directory = Path(directory)
    from nectar.hf.load import is_hf_moe_dir, load_hf_demo

    if is_hf_moe_dir(directory):        # a saved Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 (nectar.hf)
        return load_hf_demo(directory)
    check_model_dir(directory)
    try:
        with quiet_transformers():
            model = MoEGPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()  # committed weights are fp16
    except Exception as exc:  # noqa: BLE001  safetensors/torch/transformers raise their own types for bad files
        raise ValueError(f"cannot load the model in {directory}: {_first_line(exc)}") from exc
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001  tokenizers raises its own Exception type for a bad tokenizer.json
        raise ValueError(f"cannot load the tokenizer in {directory}: {_first_line(exc)}") from exc
    heldout = _load_heldout(directory, tokenizer, model.config.vocab_size)
    info_path = directory / "nectar_model.json"
    try:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{info_path} is not valid JSON: {exc}") from exc
    return DemoModel(model, tokenizer, heldout, info)


def _load_heldout(directory: Path, tokenizer, vocab_size: int) -> torch.Tensor:
    """heldout_ids.pt (1-D token ids below the model's vocabulary), else the corpus's held-out split."""
    path = directory / "heldout_ids.pt"
    if not path.exists():
        return prepare_data(tokenizer=tokenizer).heldout_ids
    try:
        heldout = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001  truncated zip / pickle: several exception types
        raise ValueError(f"cannot read {path}: {_first_line(exc)}") from exc
    if not isinstance(heldout, torch.Tensor) or heldout.dim() != 1 or heldout.dtype != torch.long:
        raise ValueError(f"{path} must hold a 1-D tensor of token ids (int64)")
    if heldout.numel() and not 0 <= int(heldout.min()) <= int(heldout.max()) < vocab_size:
        raise ValueError(f"{path} holds token ids outside the model's vocabulary [0, {vocab_size})")
    return heldout


def default_cache(preset: str, seed: int) -> Path:
    """Where `load_or_train` keeps a model it trained (relative to the working directory)."""
    return Path("runs") / "models" / f"{preset}-seed{seed}-v{RECIPE_VERSION}"


def committed_model(preset: str) -> Path:
    """data/models/<preset> in the repository (made by `nectar train --recipe <preset>`)."""
    return Path(__file__).resolve().parents[2] / "data" / "models" / preset


def training_notice(preset: str, seed: int, cache: Path) -> str:
    """What `load_or_train` says before it trains: which model, how long, where it goes."""
    recipe = RECIPES[preset]
    return (f"training the {preset} model with model seed {seed}: {recipe.dense_steps} dense + {recipe.moe_steps} MoE "
            f"steps, {TRAINING_ESTIMATE.get(preset, 'time unknown')}; it is saved to {cache} and reused next time "
            "(Ctrl-C to stop; pass --model DIR to use a saved model instead)")


def load_or_train(model_dir: Path | None, seed: int = 0, progress: bool = True, preset: str = "cpu-demo",
                  guard_tokens: int = 8192, device: str = "cpu", dtype: str = "float32",
                  announce: Callable[[str], None] | None = print,
                  ) -> tuple[MoEGPT2LMHeadModel, torch.Tensor, torch.Tensor]:
    """(model, stream, guard): the model, and the held-out stream split into a guard part (the
    first `guard_tokens`) and the evaluation stream (the rest).

    `seed` is the *model* seed (which model), never an experiment's seed: `model_dir` if given, else
    the committed model for seed 0, else the cached or newly trained model of that seed; training is
    announced through `announce` first (what, how long, where)."""
    if preset not in RECIPES:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(RECIPES)}")
    if model_dir is not None:
        demo = load_demo_model(Path(model_dir))
    elif seed == 0 and (committed_model(preset) / "config.json").exists():
        demo = load_demo_model(committed_model(preset))
    else:
        cache = default_cache(preset, seed)
        if (cache / "config.json").exists():
            demo = load_demo_model(cache)
        else:
            if announce is not None:
                announce(training_notice(preset, seed, cache))
            demo = train_demo_model(RECIPES[preset], seed=seed, device=device, dtype=dtype, progress=progress)
            save_demo_model(demo, cache)
    heldout = demo.heldout_ids
    if heldout.numel() <= guard_tokens:
        raise ValueError(f"held-out stream has {heldout.numel()} tokens, need more than guard_tokens={guard_tokens}")
    return demo.model, heldout[guard_tokens:], heldout[:guard_tokens]
