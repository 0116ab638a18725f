"""Train a small fine-grained OLMoE-style MoE from scratch on the project's corpus, within a budget.

OLMoE's recipe at a small scale: many narrow SwiGLU experts (default 64 of width 128 at
hidden 512, top-8, no shared expert, softmax router without top-k renormalisation), the
family's own load-balancing loss (`router_aux_loss_coef`, included in the transformers loss) plus
a router z-loss (the OLMoE paper's; transformers lacks it, so gate hooks collect the logits).
Training is `nectar.train.loop.train_lm` (AdamW, warmup + cosine, clipping, bf16 autocast on a GPU)
on the project's corpus (`nectar.train.data.load_training_data`: the built token shards, or the
committed slice with `--corpus slice`). The step count is set from the time
budget (measured fwd+bwd time of the first steps) and capped at `max_epochs` of the training text.

On a GPU host (torch, transformers only):
    PYTHONPATH=. python -m nectar.hf.train_small --out runs/olmoe-small --device cuda --budget-s 240
writes DIR/{config.json, model.safetensors, tokenizer.json, heldout_ids.pt, nectar_model.json} (plus
heldout_domains.pt when per-domain held-out streams are given),
which `nectar.train.saved_model.load_hf_demo(DIR)` (and so `nectar run|frontier|hw-run --model DIR`) loads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from nectar.hf.families import find_moe_blocks
from nectar.train.loop import DTYPES, TrainConfig, evaluate_perplexity, train_lm
from nectar.train.tokenizer import iter_batches

IMPLEMENTATIONS = ("grouped_mm", "eager")  # tried in this order; batched_mm gathers [N·K, 2H, D] weights


@dataclass
class SmallMoERecipe:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    experts: int = 64
    top_k: int = 8
    expert_hidden: int = 128
    corpus: str = "built"            # "built" (the token shards) or "slice" (the committed slice)
    vocab_size: int = 0              # 0: the corpus BPE (16 384 ids); N: a BPE of N ids trained on the text
    seq_len: int = 256
    batch: int = 64
    lr: float = 2e-3
    warmup_steps: int = 30
    max_epochs: float = 5.0
    aux_coef: float = 0.01           # OLMoE's load-balancing weight
    z_coef: float = 1e-3             # router z-loss weight (0: off)
    norm_topk_prob: bool = False
    max_positions: int = 2048
    eval_tokens: int = 32768

    def validate(self) -> None:
        ints = ("hidden", "layers", "heads", "experts", "top_k", "expert_hidden", "seq_len", "batch", "max_positions")
        for name in ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads or self.top_k > self.experts:
            raise ValueError("hidden must be a multiple of heads and top_k <= experts")
        if self.corpus not in ("built", "slice") or self.vocab_size < 0:
            raise ValueError(f"corpus must be 'built' or 'slice' (got {self.corpus!r}) and vocab_size >= 0")
        if not (self.lr > 0 and self.max_epochs > 0 and self.aux_coef >= 0 and self.z_coef >= 0):
            raise ValueError("lr and max_epochs must be > 0; aux_coef and z_coef >= 0")


def olmoe_config(recipe: SmallMoERecipe, vocab_size: int, eos_token_id: int) -> OlmoeConfig:
    """The OLMoE config of a recipe (`intermediate_size` is OLMoE's per-expert width)."""
    return OlmoeConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden, intermediate_size=recipe.expert_hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions, num_experts=recipe.experts,
        num_experts_per_tok=recipe.top_k, norm_topk_prob=recipe.norm_topk_prob,
        router_aux_loss_coef=recipe.aux_coef, output_router_logits=recipe.aux_coef > 0,
        pad_token_id=eos_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False)


class RouterZLoss:
    """z_coef · mean over layers and tokens of logsumexp(router logits)², from gate hooks."""

    def __init__(self, model: torch.nn.Module, z_coef: float):
        self.z_coef, self.logits = z_coef, []
        self.handles = [f.block.gate.register_forward_hook(lambda _m, _a, out: self.logits.append(out[0]))
                        for f in find_moe_blocks(model)]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        logits_TE = torch.cat([logits.float() for logits in self.logits])     # T = layers · tokens
        self.logits.clear()
        return self.z_coef * torch.logsumexp(logits_TE, dim=-1).square().mean()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.logits.clear()


def _autocast(device: str, dtype: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype], enabled=dtype != "float32")


def _fwd_bwd_seconds(model, batch: torch.Tensor, device: str, dtype: str, repeats: int = 3) -> float:
    """Mean seconds of one training forward + backward (gradients discarded; weights untouched)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with _autocast(device, dtype):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        sync()
        model.zero_grad(set_to_none=True)
        if i:                                                       # the first call warms up
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def pick_implementation(model, batch: torch.Tensor, device: str, dtype: str) -> tuple[str, float]:
    """The first experts implementation that trains here, and its fwd+bwd seconds per batch."""
    errors = []
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        try:
            return impl, _fwd_bwd_seconds(model, batch, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a probe: any failure means "try the next one"
            errors.append(f"{impl}: {str(exc).splitlines()[0]}")
            model.zero_grad(set_to_none=True)
    raise RuntimeError("no experts implementation trains on this device: " + "; ".join(errors))


def corpus_data(recipe: SmallMoERecipe, seed: int = 0):
    """The project's corpus as the recipe asks for it (the recipes' one data path)."""
    from nectar.train.recipes import ModelRecipe, load_training_data

    return load_training_data(ModelRecipe(corpus=recipe.corpus, vocab_size=recipe.vocab_size or None), seed)


def plan_steps(recipe: SmallMoERecipe, train_tokens: int, step_s: float, budget_s: float | None) -> int:
    """Steps within `max_epochs` of the text and (with a budget) the time left for training."""
    by_epochs = max(1, int(recipe.max_epochs * train_tokens / (recipe.batch * recipe.seq_len)))
    if budget_s is None:
        return by_epochs
    return max(1, min(by_epochs, int(budget_s / (1.15 * step_s))))  # 15 %: optimizer step and logging


def train_small_moe(recipe: SmallMoERecipe, device: str = "cpu", dtype: str = "float32", budget_s: float | None = None,
                    seed: int = 0, data=None, progress: bool = True,
                    heldout_domains: dict[str, torch.Tensor] | None = None):
    """Build and train the recipe's OLMoE model; returns a `nectar.train.recipes.DemoModel`.

    `data` defaults to the recipe's corpus (`corpus_data`); another comes in as a
    `nectar.train.recipes.TrainingData` (tokenizer, train and held-out streams, per-domain held-out
    streams for the domain-shift workload, info). `heldout_domains` overrides the data's per-domain
    streams (kept on the result and saved by `save_small_moe`)."""
    from nectar.train.recipes import DemoModel

    recipe.validate()
    start = time.monotonic()
    data = data if data is not None else corpus_data(recipe, seed)
    heldout_domains = heldout_domains if heldout_domains is not None else data.heldout_domains
    eos = data.tokenizer.eos_token_id or 0
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(olmoe_config(recipe, len(data.tokenizer), eos)).to(device).train()
    probe = next(iter_batches(data.train_ids, recipe.batch, recipe.seq_len, seed=seed)).to(device)
    impl, step_s = pick_implementation(model, probe, device, dtype)
    left_s = None if budget_s is None else max(0.0, budget_s - (time.monotonic() - start))
    steps = plan_steps(recipe, data.train_ids.numel(), step_s, left_s)
    cfg = TrainConfig(steps=steps, batch=recipe.batch, seq_len=recipe.seq_len, lr=recipe.lr,
                      warmup_steps=min(recipe.warmup_steps, steps // 5), weight_decay=0.1, device=device,
                      dtype=dtype, seed=seed, progress=progress)
    z_loss = RouterZLoss(model, recipe.z_coef) if recipe.z_coef > 0 else None
    deadline = None if budget_s is None else start + budget_s
    try:
        result = train_lm(model, data.train_ids, cfg, aux_loss=z_loss, deadline=deadline, desc="olmoe")
    finally:
        if z_loss is not None:
            z_loss.close()
    model.config.output_router_logits = False          # inference: no aux loss on every forward
    model.eval()
    ppl = evaluate_perplexity(model, data.heldout_ids, seq_len=recipe.seq_len, max_tokens=recipe.eval_tokens)
    info = {"family": "olmoe", "recipe": asdict(recipe), "seed": seed, "device": device, "dtype": dtype,
            "experts_implementation": impl, "fwd_bwd_s_per_step": step_s, "steps_planned": steps,
            "steps": result.steps, "stopped_early": result.stopped_early, "train_seconds": result.seconds,
            "total_seconds": time.monotonic() - start, "tokens": result.tokens,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
            "first_loss": result.total_losses[0] if result.total_losses else math.nan,
            "final_loss": result.final_loss, "loss_includes": "LM + aux_coef·load balancing (transformers)",
            "heldout_ppl": ppl, "parameters": sum(p.numel() for p in model.parameters()),
            "corpus_sha256": data.info.get("sha256"),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    demo = DemoModel(model, data.tokenizer, data.heldout_ids, info)
    if heldout_domains is not None:
        demo.heldout_domains = {name: ids.cpu() for name, ids in heldout_domains.items()}
    return demo


def save_small_moe(demo, directory: Path, save_dtype: torch.dtype = torch.float32) -> None:
    """save_pretrained (weights cast to `save_dtype`, in place) + tokenizer + held-out stream(s) + info:
    what `load_hf_demo` reads."""
    from nectar.train.recipes import save_demo_model
    from nectar.train.saved_model import DOMAINS_FILE

    demo.model.to(save_dtype)
    save_demo_model(demo, Path(directory))
    if getattr(demo, "heldout_domains", None):
        torch.save(demo.heldout_domains, Path(directory) / DOMAINS_FILE)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nectar.hf.train_small", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget for data, probe and training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-progress", action="store_true")
    for name, default in asdict(SmallMoERecipe()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = SmallMoERecipe(**{k: getattr(args, k) for k in asdict(SmallMoERecipe())})
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        demo = train_small_moe(recipe, device=args.device, dtype=dtype, budget_s=args.budget_s, seed=args.seed,
                               progress=not args.no_progress)
    except (ValueError, RuntimeError) as exc:
        print(f"train_small: error: {exc}", file=sys.stderr)
        return 2
    save_small_moe(demo, args.out, getattr(torch, args.save_dtype))
    print(json.dumps({k: v for k, v in demo.info.items() if k != "recipe"}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
