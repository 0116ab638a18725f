"""Plots of a `nectar run`: energy per token, temperature, expert loads, energy vs perplexity.

matplotlib with the Agg backend (no display needed). Every function takes the per-chunk rows of
`chunks.csv` (dicts) or the summary, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (this module is imported lazily, when plots are written)


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
    ax.set(xlabel="chunk", ylabel="mJ / token", title="Energy per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def temperature(rows: list[dict], path: Path, temp_cap: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, rs in _by_policy(rows).items():
        t0 = rs[0]["t_start_s"]
        ax.plot([r["t_end_s"] - t0 for r in rs], [r["temp_C"] for r in rs], label=policy)
    if temp_cap is not None:
        ax.axhline(temp_cap, color="k", ls="--", lw=1, label="cap")
    ax.set(xlabel="time in the policy's run (s)", ylabel="GPU temperature (°C)", title="Temperature")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expert_loads(rows: list[dict], policy: str, path: Path) -> None:
    """Stacked share of (token, slot) pairs per expert, summed over layers, for one policy."""
    rs = _by_policy(rows).get(policy, [])
    if not rs:
        return
    shares = []
    for r in rs:
        totals = [sum(col) for col in zip(*r["expert_counts"])]
        s = sum(totals) or 1
        shares.append([t / s for t in totals])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot([r["chunk"] for r in rs], list(zip(*shares)), labels=[f"expert {i}" for i in range(len(shares[0]))])
    ax.set(xlabel="chunk", ylabel="share of expert slots", title=f"Expert loads over time ({policy})", ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def energy_vs_perplexity(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, p in summary["policies"].items():
        ax.scatter(1e3 * p["J_per_token"], p["perplexity"], s=40)
        ax.annotate(name, (1e3 * p["J_per_token"], p["perplexity"]), textcoords="offset points", xytext=(5, 4))
    ax.set(xlabel="mJ / token", ylabel="held-out perplexity", title="Energy vs perplexity (lower-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(rows: list[dict], summary: dict, out_dir: Path, temp_cap: float | None = None) -> list[Path]:
    paths = {
        "energy_per_token.png": lambda p: energy_per_token(rows, p),
        "temperature.png": lambda p: temperature(rows, p, temp_cap),
        "expert_loads_nectar.png": lambda p: expert_loads(rows, "nectar", p),
        "energy_vs_perplexity.png": lambda p: energy_vs_perplexity(summary, p),
    }
    written = []
    for name, draw in paths.items():
        draw(out_dir / name)
        if (out_dir / name).exists():
            written.append(out_dir / name)
    return written
