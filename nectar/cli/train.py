"""`nectar train`: train the dense model, upcycle it to MoE, fine-tune, report held-out perplexity.

Writes to --out DIR: tokenizer/, dense/, moe/ (save_pretrained directories) and summary.json
(settings, per-stage losses summary, held-out perplexities, timings). Example (CPU, ~2 min):

    nectar train --preset tiny --steps-dense 200 --steps-moe 50 --out runs/tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from nectar.model import PRESETS, MoEGPT2LMHeadModel, preset_config
from nectar.train.tokenizer import DEFAULT_VOCAB_SIZE, save_tokenizer
from nectar.train.loop import (BALANCE_LOSSES, DTYPES, PreparedData, TrainConfig, TrainResult, evaluate_perplexity, finetune_moe,
                             prepare_data, train_dense)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nectar train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--steps-dense", type=int, default=200)
    p.add_argument("--steps-moe", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 (tiny), 6e-4 (distilgpt2)")
    p.add_argument("--moe-lr-scale", type=float, default=0.3, help="MoE fine-tuning lr = lr * this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-specs", type=str, default=None,
                   help='JSON list, e.g. \'[{"kind": "gelu", "count": 4}, {"kind": "zero", "count": 1}]\'')
    p.add_argument("--balance-loss", choices=sorted(BALANCE_LOSSES), default="switch",
                   help="MoE stage balancing loss (default: switch)")
    p.add_argument("--balance-coef", type=float, default=TrainConfig.balance_coef,
                   help="weight of the balancing loss (default: %(default)s)")
    p.add_argument("--aux-free-gamma", type=float, default=0.0,
                   help="> 0: auxiliary-loss-free balancing bias step size per training step (DeepSeek-V3)")
    p.add_argument("--eval-tokens", type=int, default=None, help="cap on held-out tokens evaluated")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="wall-clock budget for both training stages (split in proportion to their steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--recipe", default=None,
                   help="train an experiment model instead (nectar.train.recipes recipe: cpu-demo | distilgpt2): "
                        "dense → upcycle with narrow/zero/copy experts → fine-tune with cheap-slot mixing; "
                        "saves what `nectar run --model` loads (fp16 weights with --fp16)")
    p.add_argument("--fp16", action="store_true", help="with --recipe: store the weights in float16")
    p.add_argument("--no-progress", action="store_true")
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
    return args, expert_specs


def deadlines(args: argparse.Namespace, start: float) -> tuple[float | None, float | None]:
    """The time budget split between the stages in proportion to their step counts."""
    if not args.time_budget_s:
        return None, None
    share = args.steps_dense / max(1, args.steps_dense + args.steps_moe)
    return start + args.time_budget_s * share, start + args.time_budget_s


def run_dense_stage(args: argparse.Namespace, data: PreparedData, deadline: float | None, ppl) -> StageOutcome:
    lr = args.lr if args.lr is not None else (3e-3 if args.preset == "tiny" else 6e-4)
    cfg = TrainConfig(steps=args.steps_dense, batch=args.batch, seq_len=args.seq_len, lr=lr, device=args.device,
                      dtype=args.dtype, seed=args.seed, progress=not args.no_progress)
    config = preset_config(args.preset, vocab_size=len(data.tokenizer), eos_token_id=data.tokenizer.eos_token_id)
    if args.seq_len > config.n_positions:
        build_parser().error(f"--seq-len {args.seq_len} exceeds the preset's n_positions {config.n_positions}")
    torch.manual_seed(args.seed)
    dense = GPT2LMHeadModel(config)
    result = train_dense(dense, data.train_ids, cfg, deadline=deadline)
    return StageOutcome(dense, result, ppl(dense), cfg)


def run_moe_stage(args: argparse.Namespace, data: PreparedData, dense: StageOutcome, expert_specs,
                  deadline: float | None, ppl) -> StageOutcome:
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
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(data.tokenizer, out / "tokenizer")
    dense.model.save_pretrained(str(out / "dense"))
    moe.model.save_pretrained(str(out / "moe"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


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


def train_recipe(args) -> int:
    """`nectar train --recipe NAME`: the experiment model of `nectar run` (data/models/cpu-demo was
    made with `nectar train --recipe cpu-demo --threads 1 --fp16 --out data/models/cpu-demo`)."""
    from nectar.train.recipes import RECIPES, save_demo_model, train_demo_model

    if args.recipe not in RECIPES:
        print(f"nectar train: error: unknown recipe {args.recipe!r}; choose one of {sorted(RECIPES)}", file=sys.stderr)
        return 2
    demo = train_demo_model(RECIPES[args.recipe], seed=args.seed, device=args.device, dtype=args.dtype,
                            progress=not args.no_progress, time_budget_s=args.time_budget_s)
    if args.fp16:
        demo.model = demo.model.to(torch.float16)
    save_demo_model(demo, args.out)
    print(json.dumps(demo.info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args, expert_specs = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.recipe is not None:
        return train_recipe(args)
    start = time.monotonic()
    dense_deadline, moe_deadline = deadlines(args, start)
    data = prepare_data(vocab_size=args.vocab_size)
    ppl = lambda m: evaluate_perplexity(m, data.heldout_ids, args.seq_len, args.batch,  # noqa: E731
                                        max_tokens=args.eval_tokens)
    dense = run_dense_stage(args, data, dense_deadline, ppl)
    moe = run_moe_stage(args, data, dense, expert_specs, moe_deadline, ppl)
    summary = make_summary(args, data, dense, moe, expert_specs, time.monotonic() - start)
    save_outputs(args.out, data, dense, moe, summary)
    print(f"dense: {dense.result.steps} steps in {dense.result.seconds:.1f}s, held-out perplexity "
          f"{dense.heldout_perplexity:.2f} (uniform {len(data.tokenizer)})")
    print(f"moe:   {moe.result.steps} steps in {moe.result.seconds:.1f}s, held-out perplexity "
          f"{moe.heldout_perplexity:.2f} ({moe.model.config.num_experts()} experts, top-{args.top_k}; "
          f"{moe.perplexity_at_upcycle:.2f} right after upcycling)")
    print(f"saved tokenizer/, dense/, moe/, summary.json to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
