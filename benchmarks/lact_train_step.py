"""Benchmark: one training step of each LaCT recipe's model, and of the hybrid-LaCT speed options.

Issue 28: `distilgpt2-lact-attn` (hybrid window attention + fast-weight memory in every block)
trained at a third of the base recipe's tokens/s on an H100. This times, per recipe (random
weights, no download, the recipe's shape, vocabulary 16384 as the corpus tokenizer's):
  train    forward + backward + AdamW step on a batch of `--seq-len`-token sequences, as
           `nectar.train.loop` does it (its `_step`: autocast, LM loss (+ the MoE auxiliary loss in
           the MoE stage), clip, step), constant learning rate
  forward  the same model's forward alone under no_grad (training mode: same routing)
with `--warmup` calls of each variant, then `--repeats` rounds that time one call of every variant
in turn (so drift of a shared host hits all alike), medians. bf16 autocast on cuda (as the recipes train), fp32 on cpu.

Variants (hybrid-LaCT recipes; the others run `reference` only, the options do not touch them),
set by `nectar.lact.hybrid_attention.set_speed_options`:
  reference          the code before the speed options (lean off, cast off, compile off)
  lean               lean fast-weight ops (`swiglu_fast_weight(..., lean=True)`), the default
  lean_cast          + q, k, learning rates cast once to the compute dtype (bf16 under autocast)
  lean_cast_compile  + the LaCT branch under torch.compile (falls back to eager if that fails)
Before any step, every variant's loss on one fixed batch is computed from the same initial weights
and routing (`loss_diff_vs_reference` in the rows: what the option changes, dtype rounding only);
the hybrid layers' TTT gain is set to 1 (the recipe starts at 0, which would hide the LaCT branch
from that check; the work timed is the same).

Stages: `--stage moe` (default; the upcycled MoE with the recipe's training router and auxiliary
loss: the stage of issue 28's 130 k vs 383 k tokens/s) or `--stage dense` (the dense parent).
`--layer`: also rows of scope "layer" (the others are "model"): forward + backward of the first
hybrid attention layer alone on random hidden states, per variant (what the options change).
`--small`: 2 layers (else the preset's 6), batch 1 (else the recipe's 64): a CPU-sized run with
the recipe's widths, heads, window and chunk. `--profile N`: after timing, the N most expensive
ops of one training step of each hybrid variant (torch.profiler; CUDA kernel time on cuda),
printed and written beside the JSON (`<json-out>.profile.txt`).

  PYTHONPATH=. python benchmarks/lact_train_step.py --device cuda --budget-s 80 --json-out lact_train_step.json
  PYTHONPATH=. python benchmarks/lact_train_step.py --device cpu --small --json-out /tmp/lts.json

The JSON is a list of rows {recipe, variant, scope, stage, train_tokens_per_s, forward_tokens_per_s,
ms_per_step, forward_ms, batch, seq_len, n_layer, dtype, loss, loss_diff_vs_reference, compiled,
rounds, device, torch, cuda}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import check_device_and_sizes, environment, median, synchronize, write_json  # noqa: E402
from nectar.lact import hybrid_attention  # noqa: E402
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, dense_model, preset_config  # noqa: E402
from nectar.train import loop  # noqa: E402
from nectar.train.routing import AdaptiveTrainingRouter  # noqa: E402
from nectar.train.recipes import RECIPES, install_training_router, stage_config, upcycle  # noqa: E402

VOCAB_SIZE = 16384  # the corpus tokenizer's (docs/results/h100/lact/nectar_model.*.json)
DEFAULT_RECIPES = ("distilgpt2", "distilgpt2-lact-expert", "distilgpt2-lact-attn")  # the slowest last
VARIANTS = {  # name -> set_speed_options arguments
    "reference": dict(lean=False, cast_inputs=False, compile_branch=False),
    "lean": dict(lean=True, cast_inputs=False, compile_branch=False),
    "lean_cast": dict(lean=True, cast_inputs=True, compile_branch=False),
    "lean_cast_compile": dict(lean=True, cast_inputs=True, compile_branch=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="2 layers, batch 1 (a CPU-sized run)")
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--stage", choices=("moe", "dense"), default="moe")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 64, --small 1)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=None, help="blocks (default: the preset's, --small 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="after this many seconds of the run, no further timing round starts (each variant "
                             "keeps at least one); rows record the rounds they got")
    parser.add_argument("--layer", action="store_true", help="also time one hybrid layer alone per variant")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest ops per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    args.batch = args.batch or (1 if args.small else 64)
    args.n_layer = args.n_layer or (2 if args.small else None)
    check_device_and_sizes(parser, args, ("batch", "seq_len", "repeats"))
    return args


def build_model(recipe_name: str, args) -> torch.nn.Module:
    """The recipe's model with random weights: the dense parent, or its upcycled MoE with the
    recipe's training router (`--stage moe`)."""
    recipe = RECIPES[recipe_name]
    dense_overrides = dict(recipe.dense, **({"n_layer": args.n_layer} if args.n_layer else {}))
    torch.manual_seed(args.seed)
    config = preset_config(recipe.base, vocab_size=VOCAB_SIZE, eos_token_id=0, **dense_overrides)
    model = dense_model(config)
    if args.stage == "moe":
        model = upcycle(model, recipe)
        install_training_router(model, recipe, args.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, hybrid_attention.HybridLaCTAttention):
                module.ttt_gain.fill_(1.0)  # the recipe's 0 would hide the branch from the loss check
    return model.to(args.device)


def train_config(recipe_name: str, args) -> loop.TrainConfig:
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return stage_config(RECIPES[recipe_name], args.stage == "moe", args.device, dtype, args.seed, progress=False)


def aux_loss_of(model, cfg: loop.TrainConfig):
    """The MoE stage's auxiliary loss (`loop.finetune_moe`), None for a dense model."""
    if not isinstance(model, MoEGPT2LMHeadModel) or not model.moe_layers():
        return None
    return loop.MoEAuxLoss(model, cfg.balance_coef, cfg.z_coef, cfg.balance_loss, cfg.compute_coef,
                           cfg.compute_costs, cfg.compute_temperature)


def variants_for(model, args) -> list[str]:
    hybrid = any(isinstance(m, hybrid_attention.HybridLaCTAttention) for m in model.modules())
    return list(args.variants) if hybrid else ["reference"]


def batch_ids(args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed + 1)
    return torch.randint(0, VOCAB_SIZE, (args.batch, args.seq_len), generator=gen).to(args.device)  # [B, T]


def reset_routing_streams(model) -> None:
    """Restart every training router's seeded random stream (same routing in every variant's check)."""
    for module in model.modules():
        if isinstance(module, AdaptiveTrainingRouter):
            module._generators.clear()


@torch.no_grad()
def variant_losses(model, variants: list[str], ids: torch.Tensor, cfg: loop.TrainConfig) -> dict[str, float]:
    """LM loss of the fixed batch under each variant, from the same weights (before any step)."""
    losses = {}
    for variant in variants:
        reset_routing_streams(model)
        hybrid_attention.set_speed_options(model, **VARIANTS[variant])
        with loop.autocast(cfg.device, cfg.dtype):
            losses[variant] = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    return losses


def step_functions(model, ids: torch.Tensor, cfg: loop.TrainConfig, aux, optimizer):
    """(one training step, one no-grad forward) as callables."""
    def train_step():
        model.train()
        loop._step(model, model, ids, cfg, aux, optimizer)

    @torch.no_grad()
    def forward():
        with loop.autocast(cfg.device, cfg.dtype):
            model(input_ids=ids, use_cache=False)

    return train_step, forward


def timed(fn, device: str) -> float:
    """Seconds of one call, between two device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_variants(model, variants: list[str], functions, args) -> dict[str, tuple[float, float, int]]:
    """variant -> (median s per training step, median s per forward, rounds): `--warmup` calls of
    each, then `--repeats` rounds (fewer past `--budget-s`, at least one) that time one call of
    every variant in turn (drift hits all alike)."""
    samples = {variant: ([], []) for variant in variants}
    for variant in variants:
        hybrid_attention.set_speed_options(model, **VARIANTS[variant])
        for _ in range(args.warmup):
            for fn in functions:
                fn()
    for round_index in range(args.repeats):
        if round_index and args.budget_s is not None and time.perf_counter() - args.start_s > args.budget_s:
            print(f"  --budget-s {args.budget_s:g} reached: {round_index} round(s)", flush=True)
            break
        for variant in variants:
            hybrid_attention.set_speed_options(model, **VARIANTS[variant])
            for fn, times in zip(functions, samples[variant]):
                times.append(timed(fn, args.device))
    return {variant: (median(train), median(forward), len(train)) for variant, (train, forward) in samples.items()}


def profile_step(model, ids, cfg, aux, optimizer, args, label: str) -> str:
    """The `--profile` costliest ops of one training step, as a printed table (also returned)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    loop._step(model, model, ids, cfg, aux, optimizer)
    with profile(activities=activities) as prof:
        loop._step(model, model, ids, cfg, aux, optimizer)
        synchronize(args.device)
    averages = prof.key_averages()
    table = None
    for sort in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = averages.table(sort_by=sort, row_limit=args.profile)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    text = f"--- profile {label}\n{table or averages.table(row_limit=args.profile)}\n"
    print(text, flush=True)
    return text


def layer_functions(layer, args, dtype: str):
    """(forward + backward, no-grad forward) of one hybrid attention layer on random hidden states
    [B, T, D] under the recipe's autocast: the part the speed options change, without the rest."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    hidden = torch.randn(args.batch, args.seq_len, layer.embed_dim, generator=gen).to(args.device)  # [B, T, D]
    hidden.requires_grad_(True)
    probe = torch.randn(hidden.shape, generator=gen).to(args.device)  # [B, T, D]

    def train_step():
        layer.train()
        with loop.autocast(args.device, dtype):
            out, _ = layer(hidden)
        (out.float() * probe).sum().backward()

    @torch.no_grad()
    def forward():
        with loop.autocast(args.device, dtype):
            layer(hidden)

    return train_step, forward


def layer_rows(model, recipe_name: str, variants: list[str], cfg, args, env: dict) -> list[dict]:
    """`--layer`: rows (scope "layer") of the first hybrid layer alone, per variant."""
    layer = next(m for m in model.modules() if isinstance(m, hybrid_attention.HybridLaCTAttention))
    timings = time_variants(model, variants, layer_functions(layer, args, cfg.dtype), args)
    tokens, rows = args.batch * args.seq_len, []
    for variant in variants:
        step_s, forward_s, rounds = timings[variant]
        rows.append(dict(recipe=recipe_name, variant=variant, scope="layer", stage=args.stage,
                         train_tokens_per_s=tokens / step_s, forward_tokens_per_s=tokens / forward_s,
                         ms_per_step=step_s * 1e3, forward_ms=forward_s * 1e3, batch=args.batch,
                         seq_len=args.seq_len, dtype=cfg.dtype, rounds=rounds, **env))
        print(f"{recipe_name + ' (1 layer)':24s} {variant:18s} fwd+bwd {rows[-1]['train_tokens_per_s']:10.0f} tok/s "
              f"({rows[-1]['ms_per_step']:8.1f} ms)  forward {rows[-1]['forward_tokens_per_s']:10.0f} tok/s",
              flush=True)
    return rows


def run_recipe(recipe_name: str, args, env: dict) -> list[dict]:
    model = build_model(recipe_name, args)
    cfg = train_config(recipe_name, args)
    aux = aux_loss_of(model, cfg)
    ids = batch_ids(args)
    variants = variants_for(model, args)
    losses = variant_losses(model, variants, ids, cfg)
    optimizer = loop.make_optimizer(model, cfg)
    functions = step_functions(model, ids, cfg, aux, optimizer)
    timings = time_variants(model, variants, functions, args)
    tokens = ids.numel()
    rows = []
    for variant in variants:
        step_s, forward_s, rounds = timings[variant]
        compiled = VARIANTS[variant]["compile_branch"] and hybrid_attention._COMPILED.get("fn") is not None
        row = dict(recipe=recipe_name, variant=variant, scope="model", stage=args.stage, train_tokens_per_s=tokens / step_s,
                   forward_tokens_per_s=tokens / forward_s, ms_per_step=step_s * 1e3, forward_ms=forward_s * 1e3,
                   batch=args.batch, seq_len=args.seq_len, n_layer=model.config.n_layer, dtype=cfg.dtype,
                   loss=losses[variant], loss_diff_vs_reference=losses[variant] - losses[variants[0]],
                   compiled=bool(compiled), rounds=rounds, **env)
        print(f"{recipe_name:24s} {variant:18s} train {row['train_tokens_per_s']:10.0f} tok/s "
              f"({row['ms_per_step']:8.1f} ms/step)  forward {row['forward_tokens_per_s']:10.0f} tok/s  "
              f"loss {row['loss']:.5f} (Δ {row['loss_diff_vs_reference']:+.1e})", flush=True)
        rows.append(row)
    for variant in variants if args.profile and len(variants) > 1 else ():
        hybrid_attention.set_speed_options(model, **VARIANTS[variant])
        args.profiles.append(profile_step(model, ids, cfg, aux, optimizer, args, f"{recipe_name} {variant}"))
    if args.layer and len(variants) > 1:
        rows.extend(layer_rows(model, recipe_name, variants, cfg, args, env))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as nectar.train.recipes.train_demo_model
        torch.backends.cudnn.allow_tf32 = True
    env = environment(args.device)
    start = args.start_s = time.perf_counter()
    rows, args.profiles = [], []
    for recipe_name in args.recipes:
        rows.extend(run_recipe(recipe_name, args, env))
        write_json(args.json_out, rows)
    if args.json_out and args.profiles:
        Path(str(args.json_out) + ".profile.txt").write_text("".join(args.profiles))
    print(f"lact_train_step: {time.perf_counter() - start:.1f} s on {env['device']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
