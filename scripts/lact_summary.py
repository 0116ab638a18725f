#!/usr/bin/env python3
"""Side-by-side summary of trained models (the LaCT recipes against their base), with their measured energy.

    python scripts/lact_summary.py DIR/nectar_model.*.json --out DIR/summary.json      (DIR = docs/results/cpu-demo/lact)
    python scripts/lact_summary.py OUT/nectar_model.*.json --energy OUT/energy.json --out OUT/summary.json

Inputs are model folders (their nectar_model.json is read) or nectar_model JSON files themselves
(the GPU suite, benchmarks/run_lact_suite.sh, keeps those beside the summary; the CPU demo's
models came from `nectar train --recipe R --threads 1 --fp16 --out runs/...`, R = cpu-demo,
cpu-demo-lact-attn, cpu-demo-lact-expert).

One object per recipe name: held-out perplexity (overall and per domain), perplexity of the first
and the second half of each sequence's positions (`heldout_ppl_positions_1_512` and
`heldout_ppl_positions_512_1024` at seq_len 1024), the dense parent's, training seconds and the MoE
stage's training tokens/s (`train_tokens_per_s`). With `--energy` (the JSON of
benchmarks/lact_energy.py, matched by recipe name): `tokens_per_s` and `J_per_token` of the model's
own static forward as measured, its mean power, the perplexity of the measured sequences in the
measured dtype (`forward_ppl`), the GPU's name and the backend; without it (or for a recipe it
lacks) these are null. Written atomically; errors are one line `lact_summary: error: …`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ENERGY_FIELDS = ("tokens_per_s", "J_per_token", "mean_power_W", "forward_ppl", "gpu", "energy_backend")


def fail(message: str) -> SystemExit:
    return SystemExit(f"lact_summary: error: {message}")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise fail(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def summary_of(source: Path) -> tuple[str, dict]:
    """(recipe name, its row) from a model folder or a nectar_model JSON file."""
    info = read_json(source / "nectar_model.json" if source.is_dir() else source)
    try:
        moe, name = info["moe"], info["recipe"]["preset"]
        positions = moe.get("heldout_ppl_by_position")
        if positions is None:
            raise fail(f"{source} has no heldout_ppl_by_position (trained before it existed)")
        first, second = sorted(positions, key=lambda span: int(span.split("-")[0]))
        return name, {
            "source": str(source), "heldout_ppl": moe["heldout_ppl"]["all"],
            "heldout_ppl_by_domain": moe["heldout_ppl"],
            f"heldout_ppl_positions_{first.replace('-', '_')}": positions[first],
            f"heldout_ppl_positions_{second.replace('-', '_')}": positions[second],
            "dense_heldout_ppl": info["dense"]["heldout_ppl"]["all"], "train_seconds": info["train_seconds"],
            "train_tokens_per_s": moe["tokens"] / moe["seconds"] if moe["seconds"] else None,
            **dict.fromkeys(ENERGY_FIELDS),
            "corpus_sha256": info["corpus_sha256"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise fail(f"{source} is not a nectar_model.json of `nectar train` ({type(exc).__name__}: {exc})") from None


def energy_rows(path: Path) -> dict[str, dict]:
    """{recipe name: the energy fields of a summary row} from benchmarks/lact_energy.py's JSON."""
    energy = read_json(path)
    try:
        return {m["name"]: {"tokens_per_s": m["tokens_per_s"], "J_per_token": m["J_per_token"],
                            "mean_power_W": m["mean_power_W"], "forward_ppl": m["measured_ppl"],
                            "gpu": energy["gpu"], "energy_backend": energy["backend"]}
                for m in energy["models"]}
    except (KeyError, TypeError) as exc:
        raise fail(f"{path} is not a benchmarks/lact_energy.py result ({type(exc).__name__}: {exc})") from None


def merge_energy(rows: dict[str, dict], energy: dict[str, dict]) -> list[str]:
    """Put each recipe's measured energy into its row; returns notes on rows without a match."""
    for name, fields in energy.items():
        if name in rows:
            rows[name].update(fields)
    notes = [f"no energy measurement for {name}" for name in rows if name not in energy]
    return notes + [f"energy measured for {name}, which has no model here" for name in energy if name not in rows]


def build(sources: list[Path], energy: Path | None) -> tuple[dict[str, dict], list[str]]:
    rows: dict[str, dict] = {}
    for source in sources:
        name, row = summary_of(source)
        if name in rows:
            raise fail(f"two inputs are recipe {name!r}: {rows[name]['source']} and {source}")
        rows[name] = row
    return rows, merge_energy(rows, energy_rows(energy)) if energy is not None else []


def write_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def line(name: str, row: dict) -> str:
    spans = "  ".join(f"{k[len('heldout_ppl_positions_'):]}: {v:.2f}" for k, v in row.items()
                      if k.startswith("heldout_ppl_positions_"))
    measured = (f"  forward {row['tokens_per_s']:.0f} tok/s, {row['J_per_token'] * 1e3:.4f} mJ/token"
                if row["tokens_per_s"] is not None and row["J_per_token"] is not None else "  energy n/a")
    rate = f"{row['train_tokens_per_s']:.0f} tok/s" if row["train_tokens_per_s"] is not None else "no MoE steps"
    return (f"{name:24s} ppl {row['heldout_ppl']:8.2f}  by position {spans}  "
            f"train {row['train_seconds']:.0f} s ({rate}){measured}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", type=Path, nargs="+", help="model folders or nectar_model JSON files")
    p.add_argument("--energy", type=Path, default=None, help="benchmarks/lact_energy.py's JSON")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows, notes = build(args.sources, args.energy)
    for note in notes:
        print(f"lact_summary: {note}", file=sys.stderr)
    write_atomically(args.out, rows)
    gpus = {row["gpu"] for row in rows.values() if row["gpu"]}
    for name, row in rows.items():
        print(line(name, row))
    print(f"wrote {args.out}" + (f" (measured on {', '.join(sorted(gpus))})" if gpus else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
