"""Plots of a frontier run: the static hull with every policy and NECTAR (frontier.png), and
NECTAR's controller per chunk with the stream's domains (timeline.png). matplotlib, Agg backend,
imported only when plots are written."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KIND_COLOURS = {"static": "tab:blue", "fixed-bias": "tab:green", "top-p": "tab:purple", "mix": "tab:olive",
                "pi-share": "tab:orange", "nectar": "tab:red", "clock": "tab:brown", "static@clock": "tab:cyan",
                "nectar@clock": "darkred"}

KIND_LABELS = {"clock": "clock:MHZ (static top-2, locked clock)", "static@clock": "other policies, locked clock",
               "nectar@clock": "nectar, locked clock"}


def _kind(name: str) -> str:
    """The colour group of a policy name; a clock-locked name (POLICY@clock:MHZ) groups by NECTAR or not."""
    if name.startswith("clock:"):
        return "clock"
    if "@clock:" in name:
        return "nectar@clock" if name.startswith("nectar") else "static@clock"
    for kind in KIND_COLOURS:
        if name.startswith(kind):
            return kind
    return "static"


def frontier_plot(report: dict, path: Path) -> None:
    clocked = "clock_figures" in report
    fig, ax = plt.subplots(figsize=(10, 5.5) if clocked else (7.5, 5))
    hull = report.get("hull") or []
    if hull:
        ax.plot([100 * h["dppl"] for h in hull], [100 * h["saved"] for h in hull], color="0.4", lw=1.5,
                label="static hull (time-sharing)")
    seen = set()
    for p in report["policies"]:
        if p["saved"] is None or p["dppl"] is None:
            continue
        kind = _kind(p["name"])
        star = kind in ("nectar", "nectar@clock")
        marker = "*" if star else ("o" if p["limits"]["holds"] else "x")
        ax.scatter(100 * p["dppl"], 100 * p["saved"], s=140 if star else 36, marker=marker,
                   color=KIND_COLOURS[kind], label=None if kind in seen else KIND_LABELS.get(kind, kind), zorder=3)
        seen.add(kind)
        if kind != "static@clock":   # the colour names them; a label each would cover the plot
            ax.annotate(p["name"], (100 * p["dppl"], 100 * p["saved"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.axvline(100 * report["quality_bound"], color="k", ls="--", lw=1, label="quality bound")
    clocks = " — clocks simulated" if clocked else ""
    ax.set(xlabel="perplexity increase vs static-top2 (%)", ylabel="J/token saved vs static-top2 (%)",
           title=f"Static frontier, workload {report['workload']} ({report['backend']}){clocks}")
    if clocked:   # many more points: the legend goes beside the axes
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timeline_plot(report: dict, rows: list[dict], path: Path) -> None:
    records = [r for r in rows if r["policy"] == "nectar"]
    if not records:
        return
    chunks = [r["chunk"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    domains = report.get("chunk_domains") or []
    for ax in axes:
        _shade_domains(ax, domains)
    axes[0].plot(chunks, [r["lam"] for r in records], label="λ (next chunk)")
    axes[0].plot(chunks, [r["price"] for r in records], label="price μ", ls="--")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].plot(chunks, [r["kappa"] for r in records], label="sensitivity κ", color="tab:green")
    axes[1].legend(fontsize=8)
    delta = [(c, r["delta_nll"]) for c, r in zip(chunks, records) if r["delta_nll"] is not None]
    axes[2].plot([c for c, _ in delta], [100 * d for _, d in delta], "o-", ms=3, label="paired ΔNLL ×100 (nats/token)")
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].legend(fontsize=8)
    axes[2].set_xlabel("chunk")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("NECTAR's controller per chunk (shaded: stream domain)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _shade_domains(ax, domains: list[str]) -> None:
    names = sorted(set(domains))
    if len(names) < 2:
        return
    colours = plt.get_cmap("Pastel1")
    for i, name in enumerate(domains):
        ax.axvspan(i - 0.5, i + 0.5, color=colours(names.index(name)), alpha=0.5, lw=0)


def write_frontier_plots(report: dict, rows: list[dict], out: Path) -> None:
    frontier_plot(report, out / "frontier.png")
    timeline_plot(report, rows, out / "timeline.png")
