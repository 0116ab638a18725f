"""`nectar train`: train a dense parent, upcycle it to an MoE, fine-tune it, evaluate, save the model.

A recipe (nectar.train.recipes, docs/model.md) decides everything; options override its fields.
`--recipe cpu-demo|distilgpt2` picks one (`nectar train --recipe distilgpt2 --device cuda --out DIR`
is the GPU model of `nectar hw-run`, ~6 min on one H200); without --recipe, `--preset tiny|distilgpt2`
trains that shape with --num-experts full GELU experts. `--dense-from DIR` upcycles real GPT-2 /
DistilGPT2 weights from a local directory instead of training the parent (the corpus is re-tokenized
with DIR's tokenizer; nothing is downloaded). Examples:

    nectar train --preset tiny --corpus slice --steps-dense 200 --steps-moe 50 --out runs/tiny
    nectar train --recipe cpu-demo --threads 1 --fp16 --out data/models/cpu-demo --overwrite
    nectar train --recipe distilgpt2 --device cuda --out runs/distilgpt2 --summary-out docs/results/h200/model

--out gets what `nectar run --model` loads: config + weights, tokenizer, heldout_ids.pt,
heldout_domains.pt and nectar_model.json (recipe, corpus sha256, tokens and seconds per stage,
loss curves, held-out perplexity overall and per domain); `--save-dense` adds dense/. Every
argument (and --out) is checked before training starts; the folder appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from nectar.cli.common import RECIPE_NAMES, cli_errors, non_negative_float, non_negative_int, parser, positive_float, positive_int, wrap_note

# Names and defaults of the training code, spelled out so that `nectar train --help` does not import
# torch; tests/cli/test_help.py checks that they agree with nectar.models.gpt2_moe, nectar.train.*.
PRESETS = ("distilgpt2", "tiny")
DTYPES = ("bfloat16", "float32")
BALANCE_LOSSES = ("entropy", "importance", "kl_uniform", "null_aware", "switch")
CORPORA = ("built", "slice")
COMPUTE_COSTS = ("flops", "skip")
MIN_VOCAB_SIZE = 257
RECIPE_DEFAULT = "(default: the recipe's)"

# option -> ModelRecipe field it overrides (None: not given, keep the recipe's)
OVERRIDES = {"steps_dense": "dense_steps", "steps_moe": "moe_steps", "batch": "batch", "seq_len": "seq_len",
             "lr": "lr", "moe_lr_scale": "moe_lr_scale", "vocab_size": "vocab_size", "top_k": "top_k",
             "balance_loss": "balance_loss", "balance_coef": "balance_coef", "aux_free_gamma": "aux_free_gamma",
             "compute_coef": "compute_coef", "compute_costs": "compute_costs",
             "compute_temperature": "compute_temperature", "cheap_prob": "cheap_prob", "single_prob": "single_prob",
             "router_lr_scale": "router_lr_scale", "eval_tokens": "eval_tokens", "corpus": "corpus",
             "dense_share": "dense_share", "warmup_share": "warmup_share"}


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar train", __doc__)
    p.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                   help="train this recipe's model (nectar.train.recipes); without it, --preset's shape with "
                        "--num-experts full experts")
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="dense model shape when no --recipe is given")
    p.add_argument("--dense-from", type=Path, default=None,
                   help="upcycle the GPT-2 / DistilGPT2 in this local directory (HF format, local_files_only) "
                        "instead of training the dense parent; the corpus is re-tokenized with its tokenizer")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder (the saved MoE model)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is deleted only once training is complete)")
    p.add_argument("--summary-out", type=Path, default=None,
                   help="also write summary.json and training_curves.png here (e.g. docs/results/<gpu>/model)")
    p.add_argument("--save-dense", action="store_true", help="also save the dense parent to OUT/dense")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help=f"built: the token shards (data/corpus/built or $NECTAR_DATA); slice: the committed text "
                        f"slice, split by document (tests and quick demos only) {RECIPE_DEFAULT}")
    p.add_argument("--steps-dense", type=positive_int, default=None, help=f"dense training steps {RECIPE_DEFAULT}")
    p.add_argument("--steps-moe", type=positive_int, default=None, help=f"MoE fine-tuning steps {RECIPE_DEFAULT}")
    p.add_argument("--time-budget-s", type=positive_float, default=None,
                   help=f"wall-clock budget of both training stages; the lr schedule follows it {RECIPE_DEFAULT}")
    p.add_argument("--dense-share", type=positive_float, default=None,
                   help=f"share of the time budget for the dense stage, in (0, 1) {RECIPE_DEFAULT}")
    p.add_argument("--warmup-share", type=positive_float, default=None,
                   help="end each stage's warm-up also at this share of the stage's progress (time or steps), "
                        "so that a slower model is not held in a warm-up counted in steps (default: steps only)")
    p.add_argument("--batch", type=positive_int, default=None, help=f"sequences per step {RECIPE_DEFAULT}")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"tokens per sequence, at most the model's positions {RECIPE_DEFAULT}")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate {RECIPE_DEFAULT}")
    p.add_argument("--moe-lr-scale", type=positive_float, default=None,
                   help=f"MoE fine-tuning lr = lr * this {RECIPE_DEFAULT}")
    p.add_argument("--router-lr-scale", type=positive_float, default=None,
                   help=f"the gates' lr = MoE lr * this {RECIPE_DEFAULT}")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="autocast dtype (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the dense stage (falls back to eager)")
    p.add_argument("--lact-compile", choices=("on", "off"), default=None,
                   help="a hybrid LaCT recipe's compiled LaCT branch (default: the recipe's; distilgpt2-lact-attn: on; "
                        "on an H100 compiling costs ~42 s and pays from ~120 s of training)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed")
    p.add_argument("--vocab-size", type=positive_int, default=None,
                   help=f"train a BPE of this many ids on the training text (>= {MIN_VOCAB_SIZE}) instead of using "
                        f"the corpus tokenizer {RECIPE_DEFAULT}")
    p.add_argument("--num-experts", type=positive_int, default=4,
                   help="full GELU experts per MoE layer without --recipe and --expert-specs")
    p.add_argument("--top-k", type=positive_int, default=None, help=f"experts per token {RECIPE_DEFAULT}")
    p.add_argument("--expert-specs", type=str, default=None,
                   help='JSON list, e.g. \'[{"kind": "gelu", "count": 4}, {"kind": "zero", "count": 1}]\' '
                        "(default: the recipe's pool)")
    p.add_argument("--balance-loss", choices=BALANCE_LOSSES, default=None,
                   help=f"MoE stage balancing loss; null_aware balances the full experts only {RECIPE_DEFAULT}")
    p.add_argument("--balance-coef", type=non_negative_float, default=None,
                   help=f"weight of the balancing loss {RECIPE_DEFAULT}")
    p.add_argument("--compute-coef", type=non_negative_float, default=None,
                   help=f"weight of the expected-compute regulariser (moves tokens to cheap experts) {RECIPE_DEFAULT}")
    p.add_argument("--compute-costs", choices=COMPUTE_COSTS, default=None,
                   help=f"costs of that term: flops (every cheap expert is rewarded) or skip (only the zero expert) "
                        f"{RECIPE_DEFAULT}")
    p.add_argument("--compute-temperature", type=positive_float, default=None,
                   help=f"softmax temperature of that term (< 1: it acts mostly on the first choice) {RECIPE_DEFAULT}")
    p.add_argument("--cheap-prob", type=non_negative_float, default=None,
                   help=f"share of fine-tuning tokens routed top-1 + best cheap expert {RECIPE_DEFAULT}")
    p.add_argument("--single-prob", type=non_negative_float, default=None,
                   help=f"share of fine-tuning tokens routed to their top-1 expert alone {RECIPE_DEFAULT}")
    p.add_argument("--aux-free-gamma", type=non_negative_float, default=None,
                   help=f"> 0: auxiliary-loss-free balancing bias step per training step {RECIPE_DEFAULT}")
    p.add_argument("--eval-tokens", type=positive_int, default=None,
                   help=f"held-out tokens evaluated per stream {RECIPE_DEFAULT}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_expert_specs(text: str | None) -> list[dict] | None:
    if text is None:
        return None
    try:
        specs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--expert-specs is not valid JSON: {exc}") from exc
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise ValueError(f"--expert-specs must be a JSON list of objects, got {text!r}")
    return specs


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[dict] | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        expert_specs = parse_expert_specs(args.expert_specs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.vocab_size is not None and args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + eos), got {args.vocab_size}")
    if args.warmup_share is not None and args.warmup_share > 1:
        parser.error(f"--warmup-share must lie in (0, 1], got {args.warmup_share}")
    if args.dense_share is not None and not 0 < args.dense_share < 1:
        parser.error(f"--dense-share must lie in (0, 1), got {args.dense_share}")
    for name in ("cheap_prob", "single_prob"):
        if getattr(args, name) is not None and getattr(args, name) > 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    return args, expert_specs


def make_recipe(args: argparse.Namespace, expert_specs: list[dict] | None):
    """The recipe the options describe: --recipe's (or the generic one of --preset) with overrides."""
    from nectar.train.recipes import RECIPES as TABLE, generic_recipe

    recipe = TABLE[args.recipe] if args.recipe else generic_recipe(args.preset, args.num_experts)
    changes = {field: getattr(args, option) for option, field in OVERRIDES.items() if getattr(args, option) is not None}
    if expert_specs is not None:
        changes["specs"] = expert_specs
    if args.time_budget_s is not None:
        changes["time_budget_s"] = args.time_budget_s
    if args.compile:
        changes["compile"] = True
    if args.lact_compile is not None:
        if recipe.dense.get("attention_type") != "hybrid_lact":
            raise ValueError("--lact-compile applies to a hybrid LaCT recipe only (e.g. distilgpt2-lact-attn)")
        changes["dense"] = {**recipe.dense, "lact_compile": args.lact_compile == "on"}
    return replace(recipe, **changes)


def model_positions(args: argparse.Namespace, recipe) -> tuple[int, str]:
    """(n_positions, what it is) of the dense parent: --dense-from's config or the recipe's shape."""
    from nectar.models.gpt2_moe import PRESETS as MODEL_PRESETS

    if args.dense_from is not None:
        config_path = args.dense_from / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--dense-from {str(args.dense_from)!r}: no config.json there (a local directory written "
                             "by save_pretrained; nothing is downloaded)")
        try:
            return int(json.loads(config_path.read_text())["n_positions"]), "--dense-from model's"
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{config_path} is not a GPT-2 config: {exc}") from None
    shape = {**MODEL_PRESETS[recipe.base], **recipe.dense}
    return int(shape["n_positions"]), f"{args.recipe or args.preset} preset's"


def check_args(args: argparse.Namespace, expert_specs: list[dict] | None):
    """The recipe, checked with everything the stages will need before the first step (ValueError)."""
    import torch

    from nectar.models.gpt2_moe import PRESETS as MODEL_PRESETS, MoEGPT2Config

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a torch device: {exc}") from None
    recipe = make_recipe(args, expert_specs)
    recipe.validate()
    positions, what = model_positions(args, recipe)
    if recipe.seq_len < 2 or recipe.seq_len > positions:
        raise ValueError(f"--seq-len {recipe.seq_len} must lie in [2, {positions}] (the {what} positions)")
    shape = {**MODEL_PRESETS[recipe.base], **recipe.dense}
    inner = shape.get("n_inner") or 4 * shape["n_embd"]
    try:
        MoEGPT2Config(n_layer=1, n_positions=positions, vocab_size=recipe.vocab_size or 512, bos_token_id=0,
                      eos_token_id=0, n_embd=shape["n_embd"], n_head=shape["n_head"], n_inner=shape.get("n_inner"),
                      moe_top_k=recipe.top_k, expert_specs=recipe.expert_specs(inner))
    except (ValueError, TypeError) as exc:
        option = "--expert-specs" if expert_specs and "top_k" not in str(exc) else "--top-k / --num-experts"
        raise ValueError(f"{option}: {exc}") from None
    return recipe


def training_notice(args: argparse.Namespace, recipe) -> str:
    budget = f"a time budget of {recipe.time_budget_s:g} s" if recipe.time_budget_s else "no time budget"
    stages = ((None if args.dense_from else recipe.dense_steps, "dense"), (recipe.moe_steps, "MoE"))
    steps = " + ".join(f"{n} {what}" for n, what in stages if n is not None) or "no step limit"
    parent = f"the dense parent from {args.dense_from}" if args.dense_from else f"the {recipe.base} shape"
    return (f"training {args.recipe or args.preset} ({parent}) on {args.device}: {steps} steps of {recipe.batch} × "
            f"{recipe.seq_len} tokens, {budget}; the model goes to {args.out} when it is done")


def print_summary(info: dict, out: Path) -> None:
    dense, moe = info["dense"], info["moe"]
    names = list(moe["heldout_ppl"])
    print("held-out perplexity  " + "  ".join(f"{n:>10}" for n in names))
    for label, stage in (("dense parent", dense), ("MoE, static top-2", moe)):
        print(f"{label:<20} " + "  ".join(f"{stage['heldout_ppl'][n]:>10.2f}" for n in names))
    print(f"MoE right after upcycling: {moe['heldout_ppl_at_upcycle']:.2f}")
    for name, row in (moe.get("routing") or {}).items():
        print(f"  {name:<14} ppl {row['perplexity']:9.2f} ({100 * row['dppl']:+6.2f}%)  "
              f"FLOPs/token saved vs top-2 {100 * row['flops_saved']:5.1f}%")
    for label, stage, seconds in (("dense", dense, info["dense_seconds"]), ("moe", moe, info["moe_seconds"])):
        tokens = stage.get("tokens", 0) or 0
        rate = f", {tokens / seconds:,.0f} tokens/s" if seconds else ""
        print(f"{label}: {stage.get('steps', 0)} steps, {tokens:,} tokens, {seconds:.1f} s{rate}")
    print(f"data {info['data_seconds']:.1f} s, evaluation {info['eval_seconds']:.1f} s, "
          f"wall {info.get('wall_seconds', 0):.1f} s")
    print(f"saved the model to {out}")


@cli_errors("train")
def main(argv: list[str] | None = None) -> int:
    args, expert_specs = parse_args(argv)
    recipe = check_args(args, expert_specs)
    from nectar.experiment.outputs import prepare_out

    inputs = [args.dense_from] if args.dense_from is not None else []
    output = prepare_out(args.out, args.overwrite, "--out", inputs)
    summary_out = (prepare_out(args.summary_out, args.overwrite, "--summary-out", inputs)
                   if args.summary_out is not None else None)
    import torch

    from nectar.train.recipes import quiet_transformers, save_demo_model, train_demo_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    command = "nectar train " + " ".join(argv if argv is not None else sys.argv[2:])
    print(wrap_note(f"nectar train: {training_notice(args, recipe)}"), file=sys.stderr, flush=True)
    started = time.monotonic()
    with output as tmp:
        demo = train_demo_model(recipe, seed=args.seed, device=args.device, dtype=dtype,
                                progress=not args.no_progress, dense_from=args.dense_from)
        demo.info.update(command=command, wall_seconds=time.monotonic() - started,
                         weights_dtype="float16" if args.fp16 else "float32")
        if args.fp16:
            demo.model = demo.model.to(torch.float16)
        save_demo_model(demo, tmp)
        if args.save_dense and demo.dense is not None:
            with quiet_transformers():
                demo.dense.save_pretrained(str(tmp / "dense"))
    if summary_out is not None:
        from nectar.train.curves import write_model_summary

        device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
        with summary_out as tmp:
            write_model_summary(demo.info, tmp, device=device, command=command)
    print_summary(demo.info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
