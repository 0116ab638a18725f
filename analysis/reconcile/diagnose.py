"""Why held-out energy misses the goal: each segment's per-chunk error explained by what the traces record.

For every scored chunk of a segment (the windows `analysis.reconcile.score.metrics` counts) the
signed energy error e = (E_sim − E_meas)/E_meas is set against candidate features that the trace
records or the replay knows (FEATURES): the GPU temperature, the measured and the simulated mean
power, the SM clock, the throttle bits, the window's length, tokens per second, the position in the
segment, the idle time before the chunk (pauses under a power budget, host gaps), the run of
same-policy windows before it (back to back versus interleaved) and the routing's FFN slots per
token. A segment's diagnosis reports

- bias (mean e) and scatter (std e), the share of the mean squared error that is bias, the bias of
  each policy (with at least MIN_POLICY_CHUNKS chunks) and the MAPE without the policy that costs most;
- per feature, with `numpy.linalg.lstsq` on standardised features: the share of the scatter it
  explains alone (r², with scipy's Pearson p-value), what the joint fit loses without it
  (drop-one R²), its standardised coefficient and its slope in points of error per unit;
- the sensor-noise floor: the counter and the integrated power measure the same window, so with
  independent errors half the std of their relative difference is the std of their mean's error
  (the default energy source; only independence is assumed, not equal variances), and √(2/π) times
  that is the MAPE a perfect model would still show (Gaussian errors; the mean |difference|/2, which
  assumes identical errors instead, agrees within 0.15 points on the committed traces). A shared
  error of the two readings (one power sensor) would not show: the floor is a lower bound;
- corrections measured/simulated = c0 + c1·x (one feature, or c0 alone: the bias) fitted by least
  squares on the calibration segment only and applied to this one (held out, x clipped to the range
  fitted on: no extrapolation), each with the MAPE it leaves; the best of them (chosen on this
  segment: a diagnosis, not a model), whether it reaches the 3 % goal, and the MAPE that a linear
  correction in every feature at once, fitted on the segment itself, leaves (what no recorded
  quantity explains).

A feature is *named* as the cause when it explains at least NAME_MIN_R2 of the scatter alone with
p < NAME_MAX_P; a circular feature (the measured mean power: the measured energy over the window's
length) is reported but never named or used to correct. The named feature's slope on the
calibration segment says whether the model lacks the dependence (it is there too, so the calibration
could not absorb it) or the segment brings it (not seen there). `stated_reason` turns a diagnosis
into one line. Errors are fractions (0.031 = 3.1 %).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
from scipy import stats

from analysis.reconcile.replay import ReplayRow, segment_starts
from analysis.reconcile.score import GOALS
from nectar.telemetry.trace import TraceRow

NAME_MIN_R2 = 0.2          # a feature explaining less of the scatter alone is not named as the cause
NAME_MAX_P = 0.01
BIAS_DOMINATES = 0.5       # bias² above this share of the mean squared error: the error is mostly a level offset
BY_POLICY_R2 = 0.9         # a feature this much fixed by the policy stands for a per-policy level
MIN_POLICY_CHUNKS = 3      # per-policy biases are stated only for policies with this many scored chunks
MIN_CHUNKS = 4             # fewer scored chunks: nothing to regress


@dataclass(frozen=True)
class Feature:
    """A candidate explanation of the error: what it measures and what the model lacks if it explains it."""

    name: str
    label: str
    unit: str
    lacks: str                 # what the simulator would be missing
    circular: bool = False     # derived from the measured energy itself: reported, never named or used to correct


FEATURES = (
    Feature("temp_C", "GPU temperature", "°C", "a temperature dependence of power (leakage) of another strength"),
    Feature("power_W", "measured mean power", "W", "(circular: the measured energy over the window)", circular=True),
    Feature("sim_power_W", "simulated mean power", "W", "the right power scale between light and heavy chunks"),
    Feature("sm_clock_MHz", "SM clock", "MHz", "clock-dependent power (the simulator runs at one clock)"),
    Feature("throttled", "throttle bits set", "window", "power-cap throttling"),
    Feature("duration_s", "window length", "s",
            "the power of a window's time beyond its kernels (the replay prices it at idle power)"),
    Feature("tokens_per_s", "tokens per second", "tok/s",
            "how busy the window is (a slower window's time beyond its kernels is priced at idle power)"),
    Feature("position", "position in the segment", "segment", "drift within the run (warm-up, a cooling change)"),
    Feature("idle_before_s", "idle time before the chunk", "s",
            "the power after a pause (a chunk after a longer host gap draws less; the replay resumes at full power)"),
    Feature("same_policy_run", "run of same-policy windows before the chunk", "window",
            "schedule-dependent power (a policy run back to back draws more than interleaved)"),
    Feature("ffn_slots_per_token", "FFN expert slots per token", "slot",
            "the measured cost of a kept versus a dropped slot (it prices slots by FLOPs and bytes)"),
)
FFN_KINDS = ("ffn", "lact")   # experts that compute; zero/copy/constant slots are nearly free
BY_NAME = {f.name: f for f in FEATURES}


# ---------------------------------------------------------------------------- per-chunk table
@dataclass
class ChunkTable:
    """The scored chunks of one segment: energies [N], policies, features {name: [N]}, and the
    relative counter-vs-integrated-power difference [N] (NaN where one is missing)."""

    measured_J: np.ndarray
    simulated_J: np.ndarray
    policies: list[str]
    features: dict[str, np.ndarray]
    counter_vs_power: np.ndarray

    @property
    def error(self) -> np.ndarray:
        """Signed relative error (E_sim − E_meas)/E_meas per chunk [N]."""
        return self.simulated_J / self.measured_J - 1.0

    def __len__(self) -> int:
        return len(self.measured_J)


def _idle_before_s(rows: Sequence[TraceRow], breaks: frozenset[int]) -> list[float]:
    """Per row, the time since the previous window with a workload ended (NaN at a recording's start)."""
    starts, out, last_busy_end = set(segment_starts(rows, breaks)), [], math.nan
    for i, row in enumerate(rows):
        if i in starts:
            last_busy_end = math.nan
        out.append(max(0.0, row.window.t_start_s - last_busy_end) if math.isfinite(last_busy_end) else math.nan)
        if row.workload is not None:
            last_busy_end = row.window.t_end_s
    return out


def _base_policy(row: TraceRow) -> str:
    return row.policy.split(":")[0]


def _same_policy_run(rows: Sequence[TraceRow], breaks: frozenset[int]) -> list[int]:
    """Per row, how many windows with a workload of the same policy (guard checks included) came
    right before it in its recording; idle windows do not break a run, another policy's window does."""
    starts, out, run, last = set(segment_starts(rows, breaks)), [], 0, None
    for i, row in enumerate(rows):
        if i in starts:
            run, last = 0, None
        out.append(run if last == _base_policy(row) else 0)
        if row.workload is not None:
            run = run + 1 if last == _base_policy(row) else 1
            last = _base_policy(row)
    return out


def ffn_slots_per_token(workload) -> float:
    """Token-expert assignments to computing experts per token and layer (2 for a top-2 of full experts)."""
    slots = sum(n for layer in workload.layers for n, cost in zip(layer.tokens_per_expert, layer.expert_costs)
                if cost.kind in FFN_KINDS)
    return slots / (workload.tokens * max(1, len(workload.layers)))


def _counter_vs_power(window) -> float:
    counter, power = window.energy_J, window.energy_power_J
    if power is None or window.samples < 2 or not (math.isfinite(counter) and math.isfinite(power)) or counter <= 0:
        return math.nan
    return 2.0 * (counter - power) / (counter + power)


def _fill(values: list[float]) -> np.ndarray:
    """As an array, NaN replaced by the median of the finite values (all NaN stays NaN)."""
    x = np.array(values, dtype=float)
    finite = np.isfinite(x)
    if finite.any() and not finite.all():
        x[~finite] = np.median(x[finite])
    return x


def chunk_table(replayed: Sequence[ReplayRow], rows: Sequence[TraceRow],
                breaks: frozenset[int] = frozenset()) -> ChunkTable:
    """The scored chunks (is_chunk and valid) of a replay of `rows`, with their features."""
    idle, same = _idle_before_s(rows, breaks), _same_policy_run(rows, breaks)
    scored = [r for r in replayed if r.is_chunk and r.valid]
    n = len(scored)
    raw: dict[str, list[float]] = {f.name: [] for f in FEATURES}
    for k, r in enumerate(scored):
        w, load = rows[r.index].window, rows[r.index].workload
        d = r.measured_duration_s
        raw["temp_C"].append(r.measured_temp_C)
        raw["power_W"].append(w.mean_power_W)
        raw["sim_power_W"].append(r.sim_energy_J / d)
        raw["sm_clock_MHz"].append(math.nan if w.sm_clock_MHz is None else w.sm_clock_MHz)
        raw["throttled"].append(float(w.throttle_reasons != 0))
        raw["duration_s"].append(d)
        raw["tokens_per_s"].append(load.tokens / d)
        raw["position"].append(k / (n - 1) if n > 1 else 0.0)
        raw["idle_before_s"].append(idle[r.index])
        raw["same_policy_run"].append(float(same[r.index]))
        raw["ffn_slots_per_token"].append(ffn_slots_per_token(load))
    return ChunkTable(
        measured_J=np.array([r.measured_energy_J for r in scored], dtype=float),
        simulated_J=np.array([r.sim_energy_J for r in scored], dtype=float),
        policies=[r.policy for r in scored],
        features={name: _fill(values) for name, values in raw.items()},
        counter_vs_power=np.array([_counter_vs_power(rows[r.index].window) for r in scored], dtype=float),
    )


# ---------------------------------------------------------------------------- regression
@dataclass(frozen=True)
class FeatureShare:
    """How much of a segment's error scatter one feature explains."""

    feature: str
    r2_alone: float            # squared Pearson correlation with the signed error
    p_value: float
    r2_drop_one: float         # R² the joint fit loses without it
    std_coef: float            # joint fit, error per feature std (fraction)
    slope_per_unit: float      # alone, error per unit (fraction)
    feature_std: float         # in the feature's unit
    circular: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _usable(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)) and np.ptp(x) > 1e-12 * max(1.0, float(np.max(np.abs(x)))))


def _r2(y: np.ndarray, design: np.ndarray) -> float:
    """R² of the least-squares fit of y [N] on design [N, P] (which holds the intercept column)."""
    fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - fitted) ** 2)) / total if total > 0 else 0.0


def feature_shares(error: np.ndarray, features: dict[str, np.ndarray]) -> tuple[list[FeatureShare], float, list[str]]:
    """Per usable feature its share of the scatter, the joint R² and the features left out (constant)."""
    names = [name for name, x in features.items() if _usable(x)]
    constant = [name for name in features if name not in names]
    if not names or not _usable(error):        # no scatter (beyond rounding) to explain
        return [], 0.0, constant
    z = np.column_stack([(features[n] - features[n].mean()) / features[n].std() for n in names])  # [N, F]
    design = np.column_stack([np.ones(len(error)), z])                                         # [N, 1+F]
    coef = np.linalg.lstsq(design, error, rcond=None)[0]
    r2_all = _r2(error, design)
    shares = []
    for j, name in enumerate(names):
        r, p = stats.pearsonr(features[name], error)
        slope = stats.linregress(features[name], error).slope
        without = _r2(error, np.delete(design, j + 1, axis=1))
        shares.append(FeatureShare(name, float(r * r), float(p), max(0.0, r2_all - without), float(coef[j + 1]),
                                   float(slope), float(features[name].std()),
                                   BY_NAME[name].circular if name in BY_NAME else False))
    return sorted(shares, key=lambda s: -s.r2_alone), r2_all, constant


def named_feature(shares: Sequence[FeatureShare]) -> FeatureShare | None:
    """The non-circular feature that explains most of the scatter alone, if it explains enough."""
    for s in shares:
        if not s.circular:
            return s if s.r2_alone >= NAME_MIN_R2 and s.p_value < NAME_MAX_P else None
    return None


# ---------------------------------------------------------------------------- corrections
@dataclass(frozen=True)
class Correction:
    """measured/simulated = intercept + slope·feature, fitted on one segment, scored on another."""

    feature: str | None        # None: the bias alone (slope 0)
    intercept: float
    slope: float
    fitted_on: str
    x_min: float               # the range fitted on: applied elsewhere, x is clipped to it (no extrapolation)
    x_max: float
    mape_after: float
    clipped_share: float = 0.0  # of the scored chunks, those whose x lay outside [x_min, x_max]

    def to_dict(self) -> dict:
        return asdict(self)


def fit_ratio(table: ChunkTable, feature: str | None) -> tuple[float, float]:
    """Least-squares (c0, c1) of measured/simulated = c0 + c1·x over the table's chunks."""
    ratio = table.measured_J / table.simulated_J
    if feature is None:
        return float(ratio.mean()), 0.0
    x = table.features[feature]
    design = np.column_stack([np.ones(len(x)), x])
    c0, c1 = np.linalg.lstsq(design, ratio, rcond=None)[0]
    return float(c0), float(c1)


def mape(measured: np.ndarray, simulated: np.ndarray) -> float:
    return float(np.mean(np.abs(simulated - measured) / measured))


def corrected_mape(table: ChunkTable, correction: Correction) -> float:
    """MAPE of the table's chunks with E_sim × (c0 + c1·x), x clipped to the range it was fitted on."""
    if correction.feature is None:
        factor = correction.intercept
    else:
        x = np.clip(table.features[correction.feature], correction.x_min, correction.x_max)
        factor = correction.intercept + correction.slope * x
    return mape(table.measured_J, table.simulated_J * factor)


def fit_correction(train: ChunkTable, feature: str | None, train_name: str) -> Correction:
    """The correction of one feature (None: the bias alone) fitted on `train`, not yet scored."""
    c0, c1 = fit_ratio(train, feature)
    x = train.features[feature] if feature is not None else np.zeros(1)
    return Correction(feature, c0, c1, train_name, float(x.min()), float(x.max()), math.nan)


def corrections(train: ChunkTable, target: ChunkTable, train_name: str) -> list[Correction]:
    """The bias correction and one per usable non-circular feature, fitted on `train`, scored on `target`,
    best first."""
    candidates = [None] + [f.name for f in FEATURES if not f.circular and f.name in train.features
                           and _usable(train.features[f.name]) and np.all(np.isfinite(target.features[f.name]))]
    fitted = [fit_correction(train, feature, train_name) for feature in candidates]
    scored = [replace(c, mape_after=corrected_mape(target, c), clipped_share=_clipped_share(target, c)) for c in fitted]
    return sorted(scored, key=lambda c: c.mape_after)


def _clipped_share(table: ChunkTable, correction: Correction) -> float:
    if correction.feature is None:
        return 0.0
    x = table.features[correction.feature]
    return float(np.mean((x < correction.x_min) | (x > correction.x_max)))


def all_features_in_segment_mape(table: ChunkTable) -> float:
    """MAPE left by measured/simulated linear in every usable non-circular feature, fitted on the table itself."""
    usable = [table.features[f.name] for f in FEATURES if not f.circular and _usable(table.features[f.name])]
    design = np.column_stack([np.ones(len(table)), *usable])
    coef = np.linalg.lstsq(design, table.measured_J / table.simulated_J, rcond=None)[0]
    return mape(table.measured_J, table.simulated_J * (design @ coef))


# ---------------------------------------------------------------------------- diagnosis
@dataclass
class SegmentDiagnosis:
    segment: str
    held_out: bool
    chunks: int
    energy_mape: float
    bias: float                          # mean signed error
    scatter: float                       # std of the signed error
    bias_share_of_mse: float             # bias² / mean(e²)
    r2_all_features: float               # joint fit of the signed error on every usable feature
    features: list[FeatureShare]         # by r2_alone, largest first
    constant_features: list[str]
    named: str | None                    # the feature named as the cause, if any
    named_slope_in_train: float | None   # that feature's slope (error per unit) on the calibration segment
    named_by_policy: bool                # the policy alone explains ≥ BY_POLICY_R2 of that feature's variance
    bias_by_policy: dict[str, float]     # policies with ≥ MIN_POLICY_CHUNKS scored chunks
    train_bias_by_policy: dict[str, float]
    worst_policy: str | None             # the policy whose chunks, left out, lower the MAPE most
    mape_without_worst_policy: float
    counter_vs_power_std: float          # std of the counter's relative difference from the integrated power
    noise_floor_mape: float              # √(2/π)·std/2: the sensor noise a perfect model would still show
    corrections: list[Correction]        # fitted on the calibration segment, best first
    in_segment_all_features_mape: float  # what remains after a correction in every feature fitted here
    train_name: str = ""
    reason: str = ""
    goal: float = field(default=GOALS["energy_mape"])

    @property
    def best(self) -> Correction | None:
        return self.corrections[0] if self.corrections else None

    def share(self, feature: str) -> FeatureShare:
        return next(s for s in self.features if s.feature == feature)

    def to_dict(self) -> dict:
        d = asdict(self)
        best = self.best
        d["best_correction"] = None if best is None else best.to_dict()
        d["best_correction_reaches_goal"] = best is not None and best.mape_after <= self.goal
        return d


def _policy_masks(table: ChunkTable) -> dict[str, np.ndarray]:
    """{policy: boolean mask [N]} for the policies with at least MIN_POLICY_CHUNKS scored chunks."""
    policies = np.array(table.policies)
    masks = {p: policies == p for p in sorted(set(table.policies))}
    return {p: m for p, m in masks.items() if m.sum() >= MIN_POLICY_CHUNKS}


def _bias_by_policy(table: ChunkTable) -> dict[str, float]:
    return {p: float(table.error[m].mean()) for p, m in _policy_masks(table).items()}


def _without_worst_policy(table: ChunkTable) -> tuple[str | None, float]:
    """The policy whose chunks, left out, lower the MAPE most, and the MAPE without them."""
    best: tuple[str | None, float] = (None, math.nan)
    for policy, mask in _policy_masks(table).items():
        if mask.all():
            continue
        left = mape(table.measured_J[~mask], table.simulated_J[~mask])
        if best[0] is None or left < best[1]:
            best = (policy, left)
    return best


def _noise(table: ChunkTable) -> tuple[float, float]:
    d = table.counter_vs_power[np.isfinite(table.counter_vs_power)]
    if len(d) < 2:
        return math.nan, math.nan
    std = float(np.std(d, ddof=1))
    return std, math.sqrt(2.0 / math.pi) * std / 2.0


def _slope(table: ChunkTable, feature: str) -> float | None:
    x = table.features[feature]
    return float(stats.linregress(x, table.error).slope) if _usable(x) and _usable(table.error) else None


def _policy_r2(table: ChunkTable, feature: str) -> float:
    """Share of the feature's variance that the policy (one mean per policy) explains."""
    x = table.features[feature]
    total = float(np.sum((x - x.mean()) ** 2))
    if total == 0:
        return 1.0
    policies = np.array(table.policies)
    within = sum(float(np.sum((x[policies == p] - x[policies == p].mean()) ** 2)) for p in set(table.policies))
    return 1.0 - within / total


def diagnose(name: str, table: ChunkTable, train: ChunkTable, train_name: str, held_out: bool = True) -> SegmentDiagnosis:
    """The diagnosis of one segment's chunks, corrections fitted on `train` (the calibration segment)."""
    if len(table) < MIN_CHUNKS or len(train) < MIN_CHUNKS:
        raise ValueError(f"segment {name!r}: diagnosis needs at least {MIN_CHUNKS} scored chunks here and in "
                         f"{train_name!r}, got {len(table)} and {len(train)}")
    error = table.error
    shares, r2_all, constant = feature_shares(error, table.features)
    named = named_feature(shares)
    std, floor = _noise(table)
    worst, without = _without_worst_policy(table)
    mse = float(np.mean(error ** 2))
    result = SegmentDiagnosis(
        segment=name, held_out=held_out, chunks=len(table), energy_mape=mape(table.measured_J, table.simulated_J),
        bias=float(error.mean()), scatter=float(error.std()),
        bias_share_of_mse=float(error.mean() ** 2 / mse) if mse > 0 else 0.0, r2_all_features=r2_all,
        features=shares, constant_features=constant, named=None if named is None else named.feature,
        named_slope_in_train=None if named is None else _slope(train, named.feature),
        named_by_policy=named is not None and _policy_r2(table, named.feature) >= BY_POLICY_R2,
        bias_by_policy=_bias_by_policy(table), train_bias_by_policy=_bias_by_policy(train),
        worst_policy=worst, mape_without_worst_policy=without,
        counter_vs_power_std=std, noise_floor_mape=floor, corrections=corrections(train, table, train_name),
        in_segment_all_features_mape=all_features_in_segment_mape(table), train_name=train_name)
    result.reason = stated_reason(result)
    return result


# ---------------------------------------------------------------------------- words
POLICY_SPREAD = 0.02       # per-policy biases further apart than this are stated
WORST_POLICY_DROP = 0.005  # and the MAPE without the worst policy when that lowers it this much


def _pct(x: float, sign: bool = False) -> str:
    return "n/a" if not math.isfinite(x) else (f"{100 * x:+.1f} %" if sign else f"{100 * x:.1f} %")


def _per_std(slope: float, std: float, unit: str) -> str:
    return f"{100 * slope * std:+.1f} points per {std:.2g} {unit}"


def _policies(d: SegmentDiagnosis) -> str:
    """'by policy −6.3 % (static-top2) to +4.1 % (nectar) [… in main]; without X: M; ' when they spread."""
    biases = d.bias_by_policy
    if len(biases) < 2:
        return ""
    low, high = min(biases, key=biases.get), max(biases, key=biases.get)
    if biases[high] - biases[low] < POLICY_SPREAD:
        return ""
    text = f"by policy {_pct(biases[low], True)} ({low}) to {_pct(biases[high], True)} ({high})"
    same = [p for p in (low, high) if p in d.train_bias_by_policy]
    if d.held_out and same:
        text += " [" + ", ".join(f"{p} {_pct(d.train_bias_by_policy[p], True)}" for p in same) + f" in {d.train_name}]"
    if d.worst_policy is not None and d.energy_mape - d.mape_without_worst_policy >= WORST_POLICY_DROP:
        text += f", without {d.worst_policy}'s chunks MAPE {_pct(d.mape_without_worst_policy)}"
    return text + "; "


def _cause(d: SegmentDiagnosis) -> str:
    if d.named is None:
        top = next((s for s in d.features if not s.circular), None)
        most = f" (at most {100 * top.r2_alone:.0f} %, {BY_NAME[top.feature].label})" if top else ""
        return f"no recorded quantity explains the scatter{most}"
    share, f = d.share(d.named), BY_NAME[d.named]
    text = (f"{100 * share.r2_alone:.0f} % of the scatter follows {f.label} "
            f"({_per_std(share.slope_per_unit, share.feature_std, f.unit)}")
    if d.held_out and d.named_slope_in_train is not None:
        text += f"; {d.train_name}: {_per_std(d.named_slope_in_train, share.feature_std, f.unit)}"
        if not (d.named_slope_in_train * share.slope_per_unit > 0
                and abs(d.named_slope_in_train) >= 0.5 * abs(share.slope_per_unit)):
            return text + (f", not seen there): it comes with this segment's schedule or session, so no fit on "
                           f"{d.train_name} learns it{_confounded(d)}")
    return text + f"): the model lacks {f.lacks}{_confounded(d)}"


def _confounded(d: SegmentDiagnosis) -> str:
    """' (here X is one value per policy: a per-policy level)' when the policy fixes the named feature."""
    return f" ({BY_NAME[d.named].label} is one value per policy here: a per-policy level)" if d.named_by_policy else ""


def _fix(d: SegmentDiagnosis) -> str:
    best = d.best
    if best is None:
        return "no correction could be fitted"
    what = "a bias correction" if best.feature is None else f"a correction linear in {BY_NAME[best.feature].label}"
    where = f"fitted on {best.fitted_on}" + ("" if d.held_out else " (in-sample)")
    if best.clipped_share > 0:
        where += f" ({100 * best.clipped_share:.0f} % of the chunks beyond its range there, clipped)"
    reach = "reaches" if best.mape_after <= d.goal else "misses"
    return (f"{what}, {where}, brings it to {_pct(best.mape_after)} ({reach} {_pct(d.goal)}); "
            f"every feature fitted on the segment itself leaves {_pct(d.in_segment_all_features_mape)}")


def stated_reason(d: SegmentDiagnosis) -> str:
    """One line: the segment's MAPE, bias and scatter, what explains them, and what a correction reaches."""
    side = "sim high" if d.bias > 0 else "sim low"
    level = "mostly a level offset; " if d.bias_share_of_mse >= BIAS_DOMINATES else ""
    noise = f"sensor noise alone ≈ {_pct(d.noise_floor_mape)} MAPE"
    if d.noise_floor_mape >= d.goal:
        noise += f", above the {_pct(d.goal)} goal: no model reaches it per chunk with these readings"
    return (f"{d.segment}: MAPE {_pct(d.energy_mape)}, bias {_pct(d.bias, sign=True)} ({side}), scatter "
            f"{_pct(d.scatter)}; {level}{_policies(d)}{_cause(d)}; {noise}; {_fix(d)}")


def diagnose_segments(tables: dict[str, ChunkTable], train_name: str) -> dict[str, SegmentDiagnosis]:
    """Every segment's diagnosis, corrections fitted on `tables[train_name]`."""
    if train_name not in tables:
        raise ValueError(f"no segment {train_name!r} to fit corrections on; have {sorted(tables)}")
    train = tables[train_name]
    return {name: diagnose(name, table, train, train_name, held_out=name != train_name)
            for name, table in tables.items()}


def diagnose_reconciliation(result, traces: dict) -> dict[str, SegmentDiagnosis]:
    """Diagnose every segment of a `SegmentReconciliation` (from its calibrated replays of `traces`,
    {segment: MeasuredTrace}) and attach each diagnosis to its SegmentScore."""
    tables = {s.name: chunk_table(s.replay, traces[s.name].rows, traces[s.name].breaks) for s in result.segments}
    diagnoses = diagnose_segments(tables, result.calibrate_on)
    for score in result.segments:
        score.diagnosis = diagnoses[score.name]
    return diagnoses
