"""Training curves and the model summary of a trained model, from its `nectar_model.json` info.

- `model_summary(info)`: the figures docs/results/<gpu>/model/summary.json records — corpus size,
  held-out perplexity of the dense parent and of the MoE (overall and per domain), tokens and
  seconds per stage, the FLOP-priced static frontier of the MoE;
- `plot_training_curves(info, path)`: training loss and learning rate against tokens seen (the dense
  stage, then the MoE fine-tune), and held-out perplexity per domain of the parent and the MoE;
- `write_model_summary(info, out)`: both into `out/summary.json` and `out/training_curves.png`
  (`nectar train --summary-out OUT` calls it; for a model saved earlier, e.g. by
  `nectar hw-run --save-model DIR`: `python -m nectar.train.curves DIR OUT [--device NAME]`).
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from nectar.train.saved_model import json_safe

SUMMARY_FILE = "summary.json"
CURVES_FILE = "training_curves.png"


def _domains(ppl: dict | None) -> dict:
    return {k: v for k, v in (ppl or {}).items() if k != "all"}


def model_summary(info: dict, **extra) -> dict:
    """The summary record of a trained model (`extra`, e.g. gpu=…, command=…, is added as given)."""
    dense, moe = info.get("dense", {}), info.get("moe", {})
    return json_safe({
        **extra,
        "recipe": (info.get("recipe") or {}).get("preset"), "seed": info.get("seed"),
        "dense_from": info.get("dense_from"),
        "corpus_tokens": info.get("corpus_tokens"), "corpus_sha256": info.get("corpus_sha256"),
        "train_tokens": (info.get("corpus") or {}).get("train_tokens"),
        "heldout_tokens": (info.get("corpus") or {}).get("heldout_tokens"),
        "vocab_size": (info.get("corpus") or {}).get("vocab_size"),
        "dense_heldout_ppl": info.get("dense_heldout_ppl"), "moe_heldout_ppl": info.get("moe_heldout_ppl"),
        "dense_heldout_ppl_by_domain": _domains(dense.get("heldout_ppl")),
        "moe_heldout_ppl_by_domain": _domains(moe.get("heldout_ppl")),
        "moe_heldout_ppl_at_upcycle": moe.get("heldout_ppl_at_upcycle"),
        "train_seconds": info.get("train_seconds"), "dense_seconds": info.get("dense_seconds"),
        "moe_seconds": info.get("moe_seconds"), "eval_seconds": info.get("eval_seconds"),
        "data_seconds": info.get("data_seconds"),
        "dense_steps": info.get("dense_steps"), "moe_steps": info.get("moe_steps"),
        "dense_tokens": dense.get("tokens"), "moe_tokens": moe.get("tokens"),
        "experts": moe.get("expert_specs"), "flop_frontier": moe.get("routing"),
    })


def _stage_xy(stage: dict, tokens_before: float) -> tuple[list[float], list[float], list[float]]:
    """(tokens seen, loss, lr) of a stage's stored curve, tokens counted from the first stage."""
    curve = stage.get("curve") or {}
    steps = stage.get("steps") or 0
    per_step = (stage.get("tokens") or 0) / steps if steps else 0.0
    x = [tokens_before + (s + 1) * per_step for s in curve.get("step", [])]
    return x, curve.get("lm_loss", []), curve.get("lr", [])


def plot_training_curves(info: dict, path: Path) -> Path:
    """Draw the three panels into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense, moe = info.get("dense", {}), info.get("moe", {})
    fig, (ax_loss, ax_lr, ax_ppl) = plt.subplots(1, 3, figsize=(15, 4.2))
    offset = float(dense.get("tokens") or 0)
    for stage, label, start in ((dense, "dense parent", 0.0), (moe, "MoE fine-tune", offset)):
        x, loss, lr = _stage_xy(stage, start)
        if x:
            ax_loss.plot([v / 1e6 for v in x], loss, label=label)
            ax_lr.plot([v / 1e6 for v in x], lr, label=label)
    ax_loss.set(xlabel="tokens seen (M)", ylabel="training LM loss (nats)", title="training loss")
    ax_lr.set(xlabel="tokens seen (M)", ylabel="learning rate", title="schedule")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    names = list(dense.get("heldout_ppl") or moe.get("heldout_ppl") or {})
    width = 0.4
    for i, (stage, label) in enumerate(((dense, "dense parent"), (moe, "MoE (static top-2)"))):
        values = [(stage.get("heldout_ppl") or {}).get(n) or 0.0 for n in names]
        ax_ppl.bar([k + (i - 0.5) * width for k in range(len(names))], values, width, label=label)
    ax_ppl.set_xticks(range(len(names)), names)
    ax_ppl.set(ylabel="held-out perplexity", title="held-out perplexity by domain")
    ax_ppl.legend(loc="lower center")
    corpus = info.get("corpus") or {}
    fig.suptitle(f"{(info.get('recipe') or {}).get('preset', '?')}: corpus {info.get('corpus_tokens') or 0:,} tokens, "
                 f"trained on {corpus.get('train_tokens') or 0:,} tokens of its {corpus.get('source', '?')} form")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_model_summary(info: dict, out: Path, **extra) -> dict:
    """out/summary.json and out/training_curves.png; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = model_summary(info, **extra)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    plot_training_curves(info, out / CURVES_FILE)
    return summary


def main(argv: list[str] | None = None) -> int:
    """python -m nectar.train.curves MODEL_DIR OUT [--device NAME]: the summary of a saved model."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m nectar.train.curves", description=main.__doc__)
    parser.add_argument("model", type=Path, help="a saved model folder (holding nectar_model.json)")
    parser.add_argument("out", type=Path, help="folder for summary.json and training_curves.png")
    parser.add_argument("--device", default=None, help="the device the model was trained on, recorded as given")
    args = parser.parse_args(argv)
    path = args.model / "nectar_model.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    extra = {"device": args.device} if args.device else {}
    summary = write_model_summary(info, args.out, model_dir=str(args.model), **extra)
    print(json.dumps({k: summary[k] for k in ("corpus_tokens", "dense_heldout_ppl", "moe_heldout_ppl",
                                              "train_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
