"""`nectar train`: train the dense model, upcycle it to MoE, fine-tune, report held-out perplexity.

Writes to --out DIR: tokenizer/, dense/, moe/ (save_pretrained directories) and summary.json
(settings, per-stage losses summary, held-out perplexities, timings). Example (CPU, ~2 min):

    nectar train --preset tiny --steps-dense 200 --steps-moe 50 --out runs/tiny

Every argument (and --out) is checked before training starts, and the command says what it trains
and for how long before it does; the output folder appears only when training is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from nectar.cli.common import (cli_errors, non_negative_float, non_negative_int, parser, positive_float, positive_int,
                               strict_json)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPT2LMHeadModel

    from nectar.train.loop import PreparedData, TrainConfig, TrainResult

# Names and defaults of the training code, spelled out so that `nectar train --help` does not import
# torch; tests/cli/test_help.py checks that they agree with nectar.model, nectar.train.*.
PRESETS = ("distilgpt2", "tiny")
RECIPES = ("cpu-demo", "distilgpt2")
DTYPES = ("bfloat16", "float32")
BALANCE_LOSSES = ("entropy", "importance", "kl_uniform", "switch")
DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 257
BALANCE_COEF = 0.01


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar train", __doc__)
    p.add_argument("--preset", choices=PRESETS, default="tiny", help="dense model shape")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (the old folder is deleted only once training is complete)")
    p.add_argument("--steps-dense", type=positive_int, default=200, help="dense training steps")
    p.add_argument("--steps-moe", type=positive_int, default=50, help="MoE fine-tuning steps")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence (at most the preset's positions)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: 3e-3 for tiny, 6e-4 for distilgpt2)")
    p.add_argument("--moe-lr-scale", type=positive_float, default=0.3, help="MoE fine-tuning lr = lr * this")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed")
    p.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE, help=f"BPE vocabulary (>= {MIN_VOCAB_SIZE})")
    p.add_argument("--num-experts", type=positive_int, default=4, help="GELU experts per MoE layer (without --expert-specs)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token (at most the number of experts)")
    p.add_argument("--expert-specs", type=str, default=None,
                   help='JSON list, e.g. \'[{"kind": "gelu", "count": 4}, {"kind": "zero", "count": 1}]\' '
                        "(default: --num-experts GELU experts)")
    p.add_argument("--balance-loss", choices=BALANCE_LOSSES, default="switch", help="MoE stage balancing loss")
    p.add_argument("--balance-coef", type=non_negative_float, default=BALANCE_COEF, help="weight of the balancing loss")
    p.add_argument("--aux-free-gamma", type=non_negative_float, default=0.0,
                   help="> 0: auxiliary-loss-free balancing bias step size per training step (DeepSeek-V3)")
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="cap on held-out tokens evaluated (default: all)")
    p.add_argument("--time-budget-s", type=positive_float, default=None,
                   help="wall-clock budget for both training stages, split in proportion to their steps (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="train an experiment model instead (nectar.train.recipes): dense → upcycle with "
                        "narrow/zero/copy experts → fine-tune with cheap-slot mixing; saves what `nectar run "
                        "--model` loads (fp16 weights with --fp16)")
    p.add_argument("--fp16", action="store_true", help="with --recipe: store the weights in float16")
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


def stage_summary(result: TrainResult) -> dict:
    head = result.lm_losses[: max(1, len(result.lm_losses) // 10)]
    tail = result.lm_losses[-max(1, len(result.lm_losses) // 10):]
    return {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "stopped_early": result.stopped_early,
            "first_loss": sum(head) / len(head) if head else None,
            "last_loss": sum(tail) / len(tail) if tail else None}


@dataclass
class StageOutcome:
    model: GPT2LMHeadModel
    result: TrainResult
    heldout_perplexity: float
    config: TrainConfig
    perplexity_at_upcycle: float | None = None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[dict] | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        expert_specs = parse_expert_specs(args.expert_specs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 bytes + eos), got {args.vocab_size}")
    return args, expert_specs


def check_args(args: argparse.Namespace, expert_specs: list[dict] | None) -> None:
    """Everything the two stages will need, checked before the first step (ValueError)."""
    import torch

    from nectar.model import PRESETS as MODEL_PRESETS, MoEGPT2Config

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device {args.device!r} is not a torch device: {exc}") from None
    positions = MODEL_PRESETS[args.preset]["n_positions"]
    if args.seq_len < 2 or args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len} must lie in [2, {positions}] (the {args.preset} preset's positions)")
    shape = {k: MODEL_PRESETS[args.preset][k] for k in ("n_embd", "n_head", "n_inner")}
    try:
        MoEGPT2Config(n_layer=1, n_positions=positions, vocab_size=args.vocab_size, bos_token_id=0, eos_token_id=0, n_experts=args.num_experts,
                      moe_top_k=args.top_k, **({"expert_specs": expert_specs} if expert_specs else {}), **shape)
    except (ValueError, TypeError) as exc:
        option = "--expert-specs" if expert_specs and "top_k" not in str(exc) else "--top-k / --num-experts"
        raise ValueError(f"{option}: {exc}") from None


def training_notice(args: argparse.Namespace) -> str:
    budget = f"a time budget of {args.time_budget_s:g} s" if args.time_budget_s else "no time budget"
    return (f"training the {args.preset} preset on {args.device}: {args.steps_dense} dense + {args.steps_moe} MoE steps "
            f"of {args.batch} × {args.seq_len} tokens, {budget}; results go to {args.out} when it is done")


def deadlines(args: argparse.Namespace, start: float) -> tuple[float | None, float | None]:
    """The time budget split between the stages in proportion to their step counts."""
    if not args.time_budget_s:
        return None, None
    share = args.steps_dense / max(1, args.steps_dense + args.steps_moe)
    return start + args.time_budget_s * share, start + args.time_budget_s


def run_dense_stage(args: argparse.Namespace, data: PreparedData, deadline: float | None, ppl) -> StageOutcome:
    import torch
    from transformers import GPT2LMHeadModel

    from nectar.model import preset_config
    from nectar.train.loop import TrainConfig, train_dense

    lr = args.lr if args.lr is not None else (3e-3 if args.preset == "tiny" else 6e-4)
    cfg = TrainConfig(steps=args.steps_dense, batch=args.batch, seq_len=args.seq_len, lr=lr, device=args.device,
                      dtype=args.dtype, seed=args.seed, progress=not args.no_progress)
    config = preset_config(args.preset, vocab_size=len(data.tokenizer), eos_token_id=data.tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    dense = GPT2LMHeadModel(config)
    result = train_dense(dense, data.train_ids, cfg, deadline=deadline)
    return StageOutcome(dense, result, ppl(dense), cfg)


def run_moe_stage(args: argparse.Namespace, data: PreparedData, dense: StageOutcome, expert_specs,
                  deadline: float | None, ppl) -> StageOutcome:
    import torch

    from nectar.model import MoEGPT2LMHeadModel
    from nectar.train.loop import finetune_moe

    cfg = replace(dense.config, steps=args.steps_moe, lr=dense.config.lr * args.moe_lr_scale, warmup_steps=5,
                  skip_batches=dense.result.steps, balance_loss=args.balance_loss, balance_coef=args.balance_coef,
                  aux_free_gamma=args.aux_free_gamma)  # fine-tune on data the dense stage did not see
    torch.manual_seed(args.seed)
    moe = MoEGPT2LMHeadModel.from_dense(dense.model, num_experts=args.num_experts, top_k=args.top_k,
                                        **({"expert_specs": expert_specs} if expert_specs else {}))
    at_upcycle = ppl(moe)  # equals the dense perplexity when every expert is a copy of the dense MLP
    result = finetune_moe(moe, data.train_ids, cfg, deadline=deadline)
    return StageOutcome(moe, result, ppl(moe), cfg, at_upcycle)


def save_outputs(out: Path, data: PreparedData, dense: StageOutcome, moe: StageOutcome, summary: dict) -> None:
    from nectar.train.tokenizer import save_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(data.tokenizer, out / "tokenizer")
    dense.model.save_pretrained(str(out / "dense"))
    moe.model.save_pretrained(str(out / "moe"))
    (out / "summary.json").write_text(strict_json(summary, indent=2) + "\n")


def make_summary(args, data: PreparedData, dense: StageOutcome, moe: StageOutcome, expert_specs, seconds) -> dict:
    return {
        "preset": args.preset, "vocab_size": len(data.tokenizer), "uniform_perplexity": float(len(data.tokenizer)),
        "train_tokens": int(data.train_ids.numel()), "heldout_tokens": int(data.heldout_ids.numel()),
        "eval_tokens_cap": args.eval_tokens, "corpus_sha256": data.manifest.get("sha256_text"),
        "dense": {**stage_summary(dense.result), "heldout_perplexity": dense.heldout_perplexity,
                  "config": asdict(dense.config)},
        "moe": {**stage_summary(moe.result), "heldout_perplexity": moe.heldout_perplexity,
                "heldout_perplexity_at_upcycle": moe.perplexity_at_upcycle, "config": asdict(moe.config),
                "num_experts": moe.model.config.num_experts(), "top_k": args.top_k, "expert_specs": expert_specs},
        "seconds_total": round(seconds, 2),
    }


def train_recipe(args, out: Path) -> int:
    """`nectar train --recipe NAME`: the experiment model of `nectar run` (data/models/cpu-demo was
    made with `nectar train --recipe cpu-demo --threads 1 --fp16 --out data/models/cpu-demo`)."""
    import torch

    from nectar.train.recipes import RECIPES as RECIPE_TABLE, TRAINING_ESTIMATE, save_demo_model, train_demo_model

    recipe = RECIPE_TABLE[args.recipe]
    print(f"nectar train: training the {args.recipe} recipe with seed {args.seed}: {recipe.dense_steps} dense + "
          f"{recipe.moe_steps} MoE steps, {TRAINING_ESTIMATE.get(args.recipe, 'time unknown')}"
          + (f" (time budget {args.time_budget_s:g} s)" if args.time_budget_s else "")
          + f"; the model goes to {args.out} when it is done", file=sys.stderr, flush=True)
    demo = train_demo_model(recipe, seed=args.seed, device=args.device, dtype=args.dtype,
                            progress=not args.no_progress, time_budget_s=args.time_budget_s)
    if args.fp16:
        demo.model = demo.model.to(torch.float16)
    save_demo_model(demo, out)
    print(strict_json(demo.info, indent=2))
    return 0


@cli_errors("train")
def main(argv: list[str] | None = None) -> int:
    args, expert_specs = parse_args(argv)
    check_args(args, expert_specs)
    from nectar.experiment.outputs import prepare_out

    output = prepare_out(args.out, args.overwrite)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with output as tmp:
        if args.recipe is not None:
            return train_recipe(args, tmp)
        summary, data, dense, moe = train_stages(args, expert_specs)
        save_outputs(tmp, data, dense, moe, summary)
    print(f"dense: {dense.result.steps} steps in {dense.result.seconds:.1f}s, held-out perplexity "
          f"{dense.heldout_perplexity:.2f} (uniform {len(data.tokenizer)})")
    print(f"moe:   {moe.result.steps} steps in {moe.result.seconds:.1f}s, held-out perplexity "
          f"{moe.heldout_perplexity:.2f} ({moe.model.config.num_experts()} experts, top-{args.top_k}; "
          f"{moe.perplexity_at_upcycle:.2f} right after upcycling)")
    print(f"saved tokenizer/, dense/, moe/, summary.json to {args.out}")
    return 0


def train_stages(args, expert_specs):
    from nectar.train.loop import evaluate_perplexity, prepare_data

    print(f"nectar train: {training_notice(args)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    dense_deadline, moe_deadline = deadlines(args, start)
    data = prepare_data(vocab_size=args.vocab_size)
    ppl = lambda m: evaluate_perplexity(m, data.heldout_ids, args.seq_len, args.batch,  # noqa: E731
                                        max_tokens=args.eval_tokens)
    dense = run_dense_stage(args, data, dense_deadline, ppl)
    moe = run_moe_stage(args, data, dense, expert_specs, moe_deadline, ppl)
    return make_summary(args, data, dense, moe, expert_specs, time.monotonic() - start), data, dense, moe


if __name__ == "__main__":
    raise SystemExit(main())
