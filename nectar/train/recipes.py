"""The experiment model: a DistilGPT2-architecture MoE with experts for adaptive compute, trained here.

A recipe (docs/model.md) is the whole path from the corpus to a saved model:
1. data: the corpus's training documents (all, or a seeded subset per domain), interleaved across
   domains into one stream; the held-out split as a mixed stream and one stream per domain; the
   corpus tokenizer, or a smaller BPE trained on the training text, or a given model's tokenizer;
2. dense parent: a GPT-2 of the preset's shape trained from scratch (or real weights from a local
   directory, `dense_from`);
3. sparse upcycling: full GELU experts = copies of the dense FFN, narrow experts = its first hidden
   units, zero / copy / constant experts (MoE++), so a token may use 0, 1 or 2 full experts;
4. MoE fine-tune on fresh data: the `AdaptiveTrainingRouter` (static top-2, with shares of tokens
   on top-1 + best cheap expert and on top-1 alone) + null-aware balancing over the full experts +
   router z-loss + an expected-compute regulariser, so cheap experts take tokens (also as the first
   choice) where they cost little quality;
5. evaluation: held-out perplexity of the parent and the MoE, overall and per domain, and the
   FLOP-priced static frontier (nectar.train.evaluate).
Stages run for a step count (deterministic on CPU) and/or a time budget split between them; the
learning rate follows the stage's progress (nectar.train.schedule), so a budget ends decayed.

Recipes: "cpu-demo" (6 × 128, a 4096-id BPE, a 3 M-token subset: the committed demo model),
"distilgpt2" (6 × 768, 12 heads, the corpus tokenizer, all of the corpus, 330 s on one GPU), and
`generic_recipe` for `nectar train --preset …` without `--recipe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import GPT2LMHeadModel

from nectar.experiment.policies import cheap_experts
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, dense_model, load_dense_gpt2, preset_config
from nectar.moe.expert_pool import GELUGroup
from nectar.moe.static_routers import TopKRouter
from nectar.train import loop
from nectar.train.data import TrainingData, corpus_tokenizer, load_training_data  # noqa: F401
from nectar.train.evaluate import perplexities, routing_report
from nectar.train.routing import AdaptiveTrainingRouter
from nectar.train.saved_model import (WEIGHT_FILES, DemoModel, check_model_dir, first_line, json_safe,  # noqa: F401
                                      load_demo_model, quiet_transformers, save_demo_model)

RECIPE_VERSION = 2
CURVE_POINTS = 250     # per-stage loss curves are stored as at most this many bin means


@dataclass
class ModelRecipe:
    """Everything that decides a trained model (with the seed)."""

    preset: str = "cpu-demo"
    base: str = "tiny"                              # model shape preset (nectar.models.gpt2_moe.PRESETS)
    dense: dict = field(default_factory=lambda: dict(n_layer=6))   # overrides of the base preset
    # data
    corpus: str = "built"                           # "built" (the token shards) or "slice" (tests, demos)
    train_tokens_per_domain: int | None = None      # seeded subset of the training split (corpus tokens)
    heldout_tokens_per_domain: int | None = None    # held-out documents kept (and saved) per domain
    vocab_size: int | None = None                   # None: the corpus tokenizer; N: a BPE trained on the train text
    # experts
    full_experts: int = 4
    narrow_experts: int = 1
    narrow_fraction: float = 0.25
    zero_compute: tuple = ("zero", "copy")          # MoE++ experts: zero, copy, constant
    lact_experts: int = 0                           # LaCT fast-weight experts (Algorithm 1) beside the FFNs
    specs: list | None = None                       # an explicit pool; overrides the four fields above
    top_k: int = 2
    # stages
    dense_steps: int | None = 1000
    moe_steps: int | None = 400
    time_budget_s: float | None = None              # both stages; None: step counts only
    dense_share: float = 0.6                        # of the time budget
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    warmup_share: float | None = None               # both stages' warm-up also ends at this share of the stage
    weight_decay: float = 0.01
    lr_floor: float = 0.1
    moe_lr_scale: float = 1.0
    moe_warmup_steps: int = 20
    router_lr_scale: float = 1.0
    cheap_prob: float = 0.3                         # share of tokens on top-1 + best cheap in the fine-tune
    single_prob: float = 0.0                        # share of tokens on top-1 alone
    balance_loss: str = "switch"
    balance_coef: float = 0.01
    z_coef: float = 1e-3
    compute_coef: float = 0.0
    compute_costs: str = "flops"                    # "flops" or "skip" (nectar.train.aux_losses)
    compute_temperature: float = 1.0
    aux_free_gamma: float = 0.0
    # evaluation and mechanics
    eval_tokens: int | None = 32768                 # per held-out stream
    eval_batch: int = 16
    log_every: int = 20
    compile: bool = False

    def expert_specs(self, inner: int) -> list[dict]:
        """The MoE layer's pool for a dense FFN `inner` units wide."""
        if self.specs is not None:
            return [dict(s) for s in self.specs]
        specs = [{"kind": "gelu", "hidden": inner, "count": self.full_experts}]
        if self.narrow_experts:
            specs.append({"kind": "gelu", "hidden": max(8, int(inner * self.narrow_fraction)),
                          "count": self.narrow_experts})
        if self.lact_experts:
            specs.append({"kind": "lact", "hidden": inner, "count": self.lact_experts})
        return specs + [{"kind": kind, "count": 1} for kind in self.zero_compute]

    def validate(self) -> None:
        if self.corpus not in ("built", "slice"):
            raise ValueError(f"corpus must be 'built' or 'slice', got {self.corpus!r}")
        if self.dense_steps is None and self.moe_steps is None and not self.time_budget_s:
            raise ValueError("a recipe without step counts needs a time budget")
        if not 0.0 < self.dense_share < 1.0:
            raise ValueError(f"dense_share must lie in (0, 1), got {self.dense_share}")
        if self.vocab_size is not None and self.vocab_size < 257:
            raise ValueError(f"vocab_size must be >= 257 (256 bytes + eos), got {self.vocab_size}")


RECIPES = {
    "cpu-demo": ModelRecipe(
        vocab_size=4096, train_tokens_per_domain=1_000_000, heldout_tokens_per_domain=40_000,
        dense_steps=1000, moe_steps=400, lr=3e-3, moe_lr_scale=0.5, router_lr_scale=3.0, cheap_prob=0.3,
        single_prob=0.2, balance_loss="null_aware", compute_coef=0.03, compute_costs="skip", eval_tokens=32768),
    "distilgpt2": ModelRecipe(
        preset="distilgpt2", base="distilgpt2", dense=dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        full_experts=6, zero_compute=("zero", "copy", "constant"), dense_steps=None, moe_steps=None,
        time_budget_s=330.0, dense_share=0.6, batch=64, seq_len=1024, lr=1e-3, warmup_steps=100, weight_decay=0.1,
        moe_lr_scale=0.3, moe_warmup_steps=20, router_lr_scale=3.0, cheap_prob=0.3, single_prob=0.2,
        balance_loss="null_aware", compute_coef=0.03, compute_costs="skip", eval_tokens=262144, eval_batch=32,
        log_every=25),
}
# LaCT in a trained model, at each size: Algorithm 2 (hybrid window attention + a large-chunk fast-weight
# memory in every block; MoE MLPs unchanged) and Algorithm 1 (one LaCT expert in every MoE pool beside
# the GELU experts; the router learns when to use it). Same data, steps and budget as their base.
# The GPU recipe turns on the hybrid layer's speed options (nectar.lact.hybrid_attention): bf16
# q/k/rates and the compiled LaCT branch, 118 k -> 204 k training tokens/s on an H100 (docs/results.md).
LACT_ATTENTION = {"cpu-demo": dict(lact_window=64, lact_chunk_size=128),
                  "distilgpt2": dict(lact_window=256, lact_chunk_size=256, lact_cast_inputs=True, lact_compile=True)}


def lact_recipes(base: ModelRecipe, attention: dict) -> dict[str, ModelRecipe]:
    """`<base>-lact-attn` and `<base>-lact-expert`: `base` with LaCT attention / one LaCT expert."""
    return {f"{base.preset}-lact-attn": replace(base, preset=f"{base.preset}-lact-attn",
                                                dense={**base.dense, "attention_type": "hybrid_lact", **attention}),
            f"{base.preset}-lact-expert": replace(base, preset=f"{base.preset}-lact-expert", lact_experts=1)}


RECIPES.update({name: recipe for size, attention in LACT_ATTENTION.items()
                for name, recipe in lact_recipes(RECIPES[size], attention).items()})


def generic_recipe(preset: str = "tiny", num_experts: int = 4, **overrides) -> ModelRecipe:
    """`nectar train --preset P` without --recipe: P's shape, `num_experts` full GELU experts only."""
    return replace(ModelRecipe(preset=preset, base=preset, dense={}, full_experts=num_experts, narrow_experts=0,
                               zero_compute=(), cheap_prob=0.0, dense_steps=200, moe_steps=50, batch=8, seq_len=128,
                               moe_lr_scale=0.3, moe_warmup_steps=5), **overrides)


# ----- the MoE ------------------------------------------------------------------------------------
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


def upcycle(dense: GPT2LMHeadModel, recipe: ModelRecipe) -> MoEGPT2LMHeadModel:
    """The MoE of the recipe's pool, every weight from `dense` (narrow experts: its first units)."""
    inner = dense.config.n_inner or 4 * dense.config.n_embd
    moe = MoEGPT2LMHeadModel.from_dense(dense, num_experts=0, top_k=recipe.top_k,
                                        expert_specs=recipe.expert_specs(inner))
    init_narrow_from_dense(moe, dense)
    return moe


def install_training_router(moe: MoEGPT2LMHeadModel, recipe: ModelRecipe, seed: int) -> None:
    """The adaptive training router where the pool has cheap experts and the recipe asks for it;
    otherwise the static top-k router the model was built with."""
    if recipe.top_k != 2 or recipe.cheap_prob + recipe.single_prob <= 0:
        return
    for i, (_, layer) in enumerate(moe.moe_layers()):
        cheap = cheap_experts(layer)
        if cheap and len(cheap) < layer.num_experts:
            layer.router = AdaptiveTrainingRouter(layer.num_experts, cheap, recipe.cheap_prob, recipe.single_prob,
                                                  seed=seed + 1000 * i).to(layer.gate.weight.device)


def serving_routers(moe: MoEGPT2LMHeadModel, top_k: int) -> None:
    """Static top-k routers for the saved model, keeping any trained selection bias."""
    for _, layer in moe.moe_layers():
        router = TopKRouter(layer.num_experts, top_k).to(layer.gate.weight.device)
        router.selection_bias.copy_(layer.router.selection_bias)
        layer.router = router


# ----- the recipe ----------------------------------------------------------------------------------
def stage_config(recipe: ModelRecipe, moe: bool, device: str, dtype: str, seed: int, progress: bool,
                 skip_batches: int = 0) -> loop.TrainConfig:
    common = dict(batch=recipe.batch, seq_len=recipe.seq_len, weight_decay=recipe.weight_decay,
                  lr_floor=recipe.lr_floor, device=device, dtype=dtype, seed=seed, progress=progress,
                  log_every=recipe.log_every, warmup_share=recipe.warmup_share)
    if not moe:
        return loop.TrainConfig(steps=recipe.dense_steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                                compile=recipe.compile, **common)
    return loop.TrainConfig(steps=recipe.moe_steps, lr=recipe.lr * recipe.moe_lr_scale,
                            warmup_steps=recipe.moe_warmup_steps, router_lr_scale=recipe.router_lr_scale,
                            balance_loss=recipe.balance_loss, balance_coef=recipe.balance_coef,
                            z_coef=recipe.z_coef, compute_coef=recipe.compute_coef,
                            compute_costs=recipe.compute_costs, compute_temperature=recipe.compute_temperature,
                            aux_free_gamma=recipe.aux_free_gamma, skip_batches=skip_batches, **common)


GPT2_VOCAB_FILES = ("vocab.json", "merges.txt")   # a GPT-2 tokenizer without tokenizer.json


def load_dense_from(directory: Path):
    """(dense GPT-2, its tokenizer) from a local HF directory; ValueError when either is missing."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"--dense-from {str(directory)!r}: no config.json there (a local directory written by "
                         "save_pretrained, e.g. a downloaded distilgpt2 or gpt2; nothing is downloaded)")
    try:
        dense = load_dense_gpt2(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--dense-from {directory}: {first_line(exc)}") from exc
    if isinstance(dense, MoEGPT2LMHeadModel) or type(dense).__name__ != "GPT2LMHeadModel":
        raise ValueError(f"--dense-from {directory} holds a {type(dense).__name__}, not a dense GPT-2 LM")
    if not (directory / "tokenizer.json").is_file() and not all((directory / f).is_file() for f in GPT2_VOCAB_FILES):
        raise ValueError(f"--dense-from {directory}: cannot load its tokenizer (no tokenizer.json, nor "
                         f"{' + '.join(GPT2_VOCAB_FILES)})")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001  tokenizers/transformers raise several types for a missing tokenizer
        raise ValueError(f"--dense-from {directory}: cannot load its tokenizer ({first_line(exc)})") from exc
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--dense-from {directory}: its tokenizer has no eos token")
    return dense.float(), tokenizer


def train_demo_model(recipe: ModelRecipe, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                     progress: bool = True, time_budget_s: float | None = None, dense_from: Path | None = None,
                     corpus_dir=None, built_dir=None) -> DemoModel:
    """Data → dense parent (trained, or loaded from `dense_from`) → upcycle → MoE fine-tune → evaluation."""
    recipe.validate()
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dense, given_tokenizer = load_dense_from(dense_from) if dense_from is not None else (None, None)
    data = loop.prepare_data(recipe, seed=seed, tokenizer=given_tokenizer, corpus_dir=corpus_dir, built_dir=built_dir)
    if dense is not None and recipe.seq_len > dense.config.n_positions:
        raise ValueError(f"seq_len {recipe.seq_len} exceeds the --dense-from model's {dense.config.n_positions} positions")
    budget = time_budget_s if time_budget_s is not None else recipe.time_budget_s
    start = time.monotonic()
    dense_deadline = start + recipe.dense_share * budget if budget and dense is None else None
    moe_deadline = start + budget if budget else None
    evaluate = lambda m: perplexities(m, data.heldout_ids, data.heldout_domains, recipe.seq_len,  # noqa: E731
                                      recipe.eval_batch, recipe.eval_tokens, dtype)
    if dense is None:
        eos = data.tokenizer.eos_token_id or 0
        config = preset_config(recipe.base, vocab_size=len(data.tokenizer), eos_token_id=eos, **recipe.dense)
        torch.manual_seed(seed)
        dense = dense_model(config)
        dense_result = loop.train_lm(dense, data.train_ids, stage_config(recipe, False, device, dtype, seed, progress),
                                     deadline=dense_deadline, desc="dense")
    else:
        dense_result = None
        dense.to(device)
    eval_start = time.monotonic()
    dense_ppl = evaluate(dense)
    torch.manual_seed(seed)
    moe = upcycle(dense, recipe)
    at_upcycle = loop.evaluate_perplexity(moe, data.heldout_ids, recipe.seq_len, recipe.eval_batch,
                                          max_tokens=recipe.eval_tokens, dtype=dtype)
    eval_seconds = time.monotonic() - eval_start
    if moe_deadline is not None:
        moe_deadline += eval_seconds            # evaluation does not eat the fine-tune's time
    install_training_router(moe, recipe, seed)
    cfg = stage_config(recipe, True, device, dtype, seed, progress, skip_batches=dense_result.steps if dense_result else 0)
    moe_result = loop.finetune_moe(moe, data.train_ids, cfg, deadline=moe_deadline)
    serving_routers(moe, recipe.top_k)
    eval_start = time.monotonic()
    moe_ppl = evaluate(moe)
    moe_ppl_positions = position_perplexities(moe, data.heldout_ids, recipe, dtype)
    routing = routing_report(moe, data.heldout_ids, recipe.seq_len, recipe.eval_batch, recipe.eval_tokens, dtype)
    eval_seconds += time.monotonic() - eval_start
    info = model_info(recipe, seed, data, dense_result, moe_result, dense_ppl, moe_ppl, at_upcycle, routing,
                      eval_seconds, moe, dense_from)
    info["moe"]["heldout_ppl_by_position"] = moe_ppl_positions
    return DemoModel(moe.eval(), data.tokenizer, data.heldout_ids, info, data.heldout_domains, dense.eval())


def curve(result: loop.TrainResult | None) -> dict | None:
    """The stage's per-step LM loss and lr, as at most CURVE_POINTS bin means (step = bin centre)."""
    if result is None or not result.lm_losses:
        return None
    n = len(result.lm_losses)
    width = max(1, math.ceil(n / CURVE_POINTS))
    bins = range(0, n, width)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"step": [b + (min(b + width, n) - b - 1) / 2 for b in bins],
            "lm_loss": [mean(result.lm_losses[b:b + width]) for b in bins],
            "lr": [mean(result.lrs[b:b + width]) for b in bins], "bin_steps": width}


def stage_info(result: loop.TrainResult | None, ppl: dict) -> dict:
    base = {"heldout_ppl": ppl}
    if result is None:
        return base
    return {**base, "steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
            "final_loss": result.final_loss, "stopped_early": result.stopped_early, "compiled": result.compiled,
            "curve": curve(result)}


def position_perplexities(model, ids: torch.Tensor, recipe: ModelRecipe, dtype: str) -> dict[str, float]:
    """Held-out perplexity of the first and the second half of each sequence's positions
    ({"1-T/2": …, "T/2-T": …}): test-time training (LaCT) should help the later positions most."""
    half = recipe.seq_len // 2
    return {f"{lo}-{hi}": loop.evaluate_perplexity(model, ids, recipe.seq_len, recipe.eval_batch, max_tokens=recipe.eval_tokens,
                                                   dtype=dtype, positions=(lo, hi))
            for lo, hi in ((1, half), (half, recipe.seq_len))}


def model_info(recipe, seed, data, dense_result, moe_result, dense_ppl, moe_ppl, at_upcycle, routing,
               eval_seconds, moe, dense_from) -> dict:
    """nectar_model.json: what was trained, on what, how long, and how good (JSON-safe)."""
    seconds = (dense_result.seconds if dense_result else 0.0) + moe_result.seconds
    return {
        "recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "seed": seed,
        "dense_from": str(dense_from) if dense_from is not None else None,
        "corpus": data.info, "corpus_sha256": data.info["sha256"], "corpus_tokens": data.info["corpus_tokens"],
        "dense": stage_info(dense_result, dense_ppl),
        "moe": {**stage_info(moe_result, moe_ppl), "heldout_ppl_at_upcycle": at_upcycle,
                "expert_specs": moe.config.expert_specs, "num_experts": moe.config.num_experts(),
                "routing": routing},
        "dense_heldout_ppl": dense_ppl["all"], "moe_heldout_ppl": moe_ppl["all"],
        "dense_steps": dense_result.steps if dense_result else 0, "moe_steps": moe_result.steps,
        "dense_seconds": dense_result.seconds if dense_result else 0.0, "moe_seconds": moe_result.seconds,
        "train_seconds": seconds, "eval_seconds": eval_seconds, "data_seconds": data.info["seconds"],
    }


# Measured on the shared 2-core machine, `nectar train --recipe cpu-demo --threads 1` (docs/model.md).
TRAINING_ESTIMATE = {"cpu-demo": "about 20-25 minutes on a 2-core CPU",
                     "distilgpt2": "about 6 minutes on one H200 (330 s training + evaluation)"}


def default_cache(preset: str, seed: int) -> Path:
    """Where `load_or_train` keeps a model it trained (relative to the working directory)."""
    return Path("runs") / "models" / f"{preset}-seed{seed}-v{RECIPE_VERSION}"


def committed_model(preset: str) -> Path:
    """data/models/<preset> in the repository (made by `nectar train --recipe <preset>`)."""
    return Path(__file__).resolve().parents[2] / "data" / "models" / preset


def training_notice(preset: str, seed: int, cache: Path) -> str:
    """What `load_or_train` says before it trains: which model, how long, where it goes."""
    recipe = RECIPES[preset]
    steps = (f"{recipe.dense_steps} dense + {recipe.moe_steps} MoE steps" if recipe.dense_steps and recipe.moe_steps
             else f"a {recipe.time_budget_s:g} s training budget")
    return (f"training the {preset} model with model seed {seed}: {steps}, "
            f"{TRAINING_ESTIMATE.get(preset, 'time unknown')}; it is saved to {cache} and reused next time "
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
