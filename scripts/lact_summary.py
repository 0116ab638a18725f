#!/usr/bin/env python3
"""Side-by-side summary of trained models (the LaCT recipes against their base) from their nectar_model.json.

    python scripts/lact_summary.py runs/cpu-demo-now runs/lact-attn runs/lact-expert --out docs/results/cpu-demo/lact/summary.json

(the model folders from `nectar train --recipe R --threads 1 --fp16 --out runs/...`, R = cpu-demo,
cpu-demo-lact-attn, cpu-demo-lact-expert; their nectar_model.json are kept beside the summary)

One object per recipe name: held-out perplexity (overall and per domain), perplexity of the first
and second half of each sequence's positions, training seconds and the MoE stage's training tokens/s;
J_per_token is null (nothing here measures energy; a GPU run's hw-run summary does). Written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def summary_of(model_dir: Path) -> tuple[str, dict]:
    info = json.loads((model_dir / "nectar_model.json").read_text())
    moe = info["moe"]
    positions = moe.get("heldout_ppl_by_position")
    if positions is None:
        raise SystemExit(f"lact_summary: {model_dir} has no heldout_ppl_by_position (trained before it existed)")
    first, second = sorted(positions, key=lambda span: int(span.split("-")[0]))
    return info["recipe"]["preset"], {
        "model_dir": str(model_dir), "heldout_ppl": moe["heldout_ppl"]["all"], "heldout_ppl_by_domain": moe["heldout_ppl"],
        f"heldout_ppl_positions_{first.replace('-', '_')}": positions[first],
        f"heldout_ppl_positions_{second.replace('-', '_')}": positions[second],
        "dense_heldout_ppl": info["dense"]["heldout_ppl"]["all"], "train_seconds": info["train_seconds"],
        "tokens_per_s": moe["tokens"] / moe["seconds"], "J_per_token": None,
        "corpus_sha256": info["corpus_sha256"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = dict(summary_of(d) for d in args.model_dirs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    for name, row in rows.items():
        print(f"{name:24s} ppl {row['heldout_ppl']:8.2f}  by position "
              + "  ".join(f"{k[len('heldout_ppl_positions_'):]}: {v:.2f}" for k, v in row.items()
                          if k.startswith("heldout_ppl_positions_"))
              + f"  train {row['train_seconds']:.0f} s  MoE {row['tokens_per_s']:.0f} tok/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
