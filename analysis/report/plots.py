"""The figures of `nectar report`: one function per PNG, matplotlib with the Agg backend.

Inputs are plain data (rows of chunks.csv as typed dicts, the summary's policies, replayed rows of
a reconciliation), so each figure can be drawn and tested without the others. Chunk axes have
integer ticks, expert axes name each expert's kind when the run recorded them, and figures are
saved with a tight bounding box so that no label is clipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.reconcile.replay import ReplayRow  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def by_policy(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(str(row["policy"]), []).append(row)
    return out


def temperature_traces(rows: Sequence[dict], path: Path) -> Path:
    """GPU temperature at the end of each chunk, per policy, against time in the policy's run."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for policy, rs in by_policy(rows).items():
        t0 = rs[0]["t_start_s"]
        ax.plot([r["t_end_s"] - t0 for r in rs], [r["temp_C"] for r in rs], marker=".", label=policy)
    ax.set(xlabel="time since the policy's first chunk (s)", ylabel="GPU temperature (°C)",
           title="Temperature during each policy's chunks")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto(points: dict[str, tuple[float, float]], front: Sequence[str], path: Path) -> Path:
    """Energy per token vs perplexity; the Pareto front joined by a line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (mj, ppl) in points.items():
        on_front = name in front
        ax.scatter(mj, ppl, s=60 if on_front else 30, color="C3" if on_front else "C0", zorder=3)
        ax.annotate(name, (mj, ppl), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ordered = sorted((points[n] for n in front), key=lambda p: p[0])
    if len(ordered) > 1:
        ax.plot(*zip(*ordered), color="C3", lw=1, ls="--", label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(xlabel="energy per token (mJ)", ylabel="held-out perplexity",
           title="Energy vs perplexity (lower left is better)")
    return _save(fig, path)


def expert_loads(shares: dict[str, np.ndarray], path: Path, labels: Sequence[str] | None = None) -> Path:
    """One heat map per policy: share of the layer's expert slots each expert received, [L, E];
    `labels` (one per expert, e.g. "full", "narrow (25 %)", "zero") name the expert axis."""
    n = len(shares)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.2, 3.6), squeeze=False, layout="constrained")
    vmax = max(float(s.max()) for s in shares.values())
    image = None
    for ax, (policy, share) in zip(axes[0], shares.items()):
        image = ax.imshow(share, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set(title=policy, xlabel="expert", ylabel="MoE layer", xticks=range(share.shape[1]),
               yticks=range(share.shape[0]))
        if labels is not None and len(labels) == share.shape[1]:
            ax.set_xticklabels([f"{i}: {kind}" for i, kind in enumerate(labels)], rotation=60, ha="right", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the layer's slots", shrink=0.85)
    fig.suptitle("Expert loads over the whole run (even routing = 1/E everywhere)", fontsize=10)
    return _save(fig, path)


def cost_model(residuals: dict[str, list[tuple[int, float]]], measured: np.ndarray, predicted: np.ndarray,
               path: Path) -> Path:
    """Left: the online cost model's a-priori relative error per chunk; right: offline fit, predicted vs measured."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, pairs in residuals.items():
        if pairs:
            left.plot(*zip(*[(c, 100 * r) for c, r in pairs]), marker=".", label=policy)
    left.set(xlabel="chunk", ylabel="|predicted − measured| / measured (%)", title="Online cost model (RLS), before each update")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    if residuals:
        left.legend(fontsize=8)
    right.scatter(measured, predicted, s=12)
    if measured.size:
        lo, hi = float(min(measured.min(), predicted.min())), float(max(measured.max(), predicted.max()))
        right.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="y = x")
        right.legend(fontsize=8)
    right.set(xlabel="measured chunk energy (J)", ylabel="affine model (J)", title="Offline fit E ≈ e0·T + Σ c_i·n_i")
    return _save(fig, path)


def energy_per_chunk(replay: Sequence[ReplayRow], split_row: int, path: Path) -> Path:
    """Measured vs simulated (calibrated) energy of every chunk window, with the train/held-out split."""
    rows = [r for r in replay if r.is_chunk and r.valid]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    x = [r.index for r in rows]
    top.plot(x, [r.measured_energy_J for r in rows], ".", label="measured")
    top.plot(x, [r.sim_energy_J for r in rows], "x", ms=4, label="simulated (calibrated)")
    bottom.plot(x, [100 * (r.sim_energy_J / r.measured_energy_J - 1) for r in rows], ".", color="C2")
    for ax in (top, bottom):
        ax.axvline(split_row - 0.5, color="k", ls="--", lw=1)
    top.set(ylabel="chunk energy (J)", title="Energy per chunk window (left of the dashed line: calibration data)")
    top.legend(fontsize=8)
    bottom.axhline(0, color="k", lw=0.5)
    bottom.set(xlabel="trace row", ylabel="sim error (%)")
    return _save(fig, path)


def temperature_replay(replay: Sequence[ReplayRow], uncalibrated: Sequence[ReplayRow], split_row: int,
                       path: Path) -> Path:
    """Measured temperature and the simulator's, calibrated and not, per window in trace order."""
    fig, ax = plt.subplots(figsize=(9, 4))
    valid = [i for i, r in enumerate(replay) if r.valid]
    ax.plot(valid, [replay[i].measured_temp_C for i in valid], ".", label="measured")
    ax.plot(valid, [replay[i].sim_temp_C for i in valid], "-", label="simulated (calibrated)")
    ax.plot(valid, [uncalibrated[i].sim_temp_C for i in valid], ":", label="simulated (base preset)")
    ax.axvline(split_row - 0.5, color="k", ls="--", lw=1)
    ax.set(xlabel="trace row", ylabel="GPU temperature (°C)", title="Temperature at the end of each window")
    ax.legend(fontsize=8)
    return _save(fig, path)


def segment_temperatures(segments: Sequence, path: Path) -> Path:
    """Measured and simulated (calibrated) temperature of every scored window, one panel per segment
    (`segments`: analysis.reconcile.segments.SegmentScore, with their replays)."""
    n = len(segments)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.6), squeeze=False, sharey=True)
    for ax, seg in zip(axes[0], segments):
        rows = [r for r in seg.replay if r.valid]
        t0 = rows[0].t_measured_s if rows else 0.0
        ax.plot([r.t_measured_s - t0 for r in rows], [r.measured_temp_C for r in rows], ".", ms=3, label="measured")
        ax.plot([r.t_measured_s - t0 for r in rows], [r.sim_temp_C for r in rows], "-", lw=1, label="simulated")
        ax.set(title=f"{seg.name} ({'held out' if seg.held_out else 'calibration'})", xlabel="time in the segment (s)")
    axes[0][0].set_ylabel("GPU temperature (°C)")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)
