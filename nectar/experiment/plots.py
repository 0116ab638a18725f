"""Plots of a `nectar run`: energy per token, temperature, expert loads, energy vs perplexity.

matplotlib with the Agg backend (no display needed). Every function takes the per-chunk rows of
`chunks.csv` (dicts) or the summary, and writes one PNG. Chunk axes have integer ticks, expert
legends name each expert's kind ("full", "narrow (25 %)", "zero", "copy"), and figures are saved
with a tight bounding box so that no label is clipped.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (this module is imported lazily, when plots are written)
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _integer_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _by_policy(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["policy"], []).append(row)
    return out


def energy_per_token(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, rs in _by_policy(rows).items():
        ax.plot([r["chunk"] for r in rs],
                [1e3 * (r["energy_J"] + r["guard_energy_J"] + r["pause_energy_J"]) / r["tokens"] for r in rs],
                label=policy)
    ax.set(xlabel="chunk", ylabel="mJ / token", title="Energy per token (chunk + guard checks + pauses)")
    _integer_x(ax)
    ax.legend()
    _save(fig, path)


def temperature(rows: list[dict], path: Path, temp_cap: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, rs in _by_policy(rows).items():
        t0 = rs[0]["t_start_s"]
        ax.plot([r["t_end_s"] - t0 for r in rs], [r["temp_C"] for r in rs], label=policy)
    if temp_cap is not None:
        ax.axhline(temp_cap, color="k", ls="--", lw=1, label="cap")
    ax.set(xlabel="time in the policy's run (s)", ylabel="GPU temperature (°C)", title="Temperature")
    ax.legend()
    _save(fig, path)


def expert_loads(rows: list[dict], policy: str, path: Path, labels: list[str] | None = None) -> None:
    """Stacked share of (token, slot) pairs per expert, summed over layers, for one policy;
    `labels` name each expert's kind."""
    rs = _by_policy(rows).get(policy, [])
    if not rs:
        return
    shares = []
    for r in rs:
        totals = [sum(col) for col in zip(*r["expert_counts"])]
        s = sum(totals) or 1
        shares.append([t / s for t in totals])
    n = len(shares[0])
    kinds = labels if labels is not None and len(labels) == n else [""] * n
    names = [f"expert {i}" + (f": {kind}" if kind else "") for i, kind in enumerate(kinds)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot([r["chunk"] for r in rs], list(zip(*shares)), labels=names)
    ax.set(xlabel="chunk", ylabel="share of expert slots", title=f"Expert loads over time ({policy})", ylim=(0, 1))
    _integer_x(ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def energy_vs_perplexity(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, p in summary["policies"].items():
        ax.scatter(1e3 * p["J_per_token"], p["perplexity"], s=40)
        ax.annotate(name, (1e3 * p["J_per_token"], p["perplexity"]), textcoords="offset points", xytext=(5, 4))
    ax.set(xlabel="mJ / token", ylabel="held-out perplexity", title="Energy vs perplexity (lower-left is better)")
    _save(fig, path)


def write_all(rows: list[dict], summary: dict, out_dir: Path, temp_cap: float | None = None,
              expert_labels: list[str] | None = None) -> list[Path]:
    paths = {
        "energy_per_token.png": lambda p: energy_per_token(rows, p),
        "temperature.png": lambda p: temperature(rows, p, temp_cap),
        "expert_loads_nectar.png": lambda p: expert_loads(rows, "nectar", p, expert_labels),
        "energy_vs_perplexity.png": lambda p: energy_vs_perplexity(summary, p),
    }
    written = []
    for name, draw in paths.items():
        draw(out_dir / name)
        if (out_dir / name).exists():
            written.append(out_dir / name)
    return written
