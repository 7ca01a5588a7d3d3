"""Confidence intervals and paired tests over users, for every metric of a run (scipy.stats does the statistics).

A user is the unit of resampling: LaMP-style metrics are corpus-level (macro-F1 over all queries, RMSE over all
errors), and one user's queries are not independent of each other. So each metric is written as a function of
per-user *sufficient statistics* that add up over users (counts, sums of errors, per-label tp/fp/fn): a resample
of users is a sum of their rows, and the corpus-level metric of the resample is computed exactly from that sum.

- ``bootstrap`` (paired when two methods are compared: the same users are drawn for both) gives the intervals;
- ``permutation_test`` with ``permutation_type="samples"`` swaps the two methods' rows within each user (a
  sign flip of the per-user difference, generalised to corpus-level metrics) and gives two-sided p-values;
- Holm's step-down correction (statsmodels) adjusts the p-values of one report's family of comparisons;
- Spearman and Pearson correlations come from scipy, with Pearson's Fisher interval and a bootstrap interval
  for Spearman.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from personalize.errors import InvalidInputError
from personalize.eval.metrics import LOWER_IS_BETTER, rating_pairs, rouge_per_example
from personalize.settings import StatsSettings
from personalize.tasks.registry import Task, get_task


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (``low``/``high`` are ``None`` when there is none)."""

    value: float
    low: float | None
    high: float | None
    method: str = ""

    def covers(self, x: float) -> bool:
        return self.low is not None and self.high is not None and self.low <= x <= self.high

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


# --------------------------------------------------------------------------------------------- sufficient stats


class MetricFamily:
    """A task's metrics as functions of per-user sums: ``rows`` turns one user's answers into a row, ``values``
    turns a sum of rows (any leading shape after the first axis) into every metric."""

    def __init__(self, task: Task | str) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.metrics = list(self.task.metrics)
        if not self.metrics:
            raise InvalidInputError(f"task {self.task.name!r} has no metrics")
        metrics = set(self.metrics)
        if metrics <= {"accuracy", "f1"}:
            self.kind = "label"
            self.labels = list(self.task.labels or ())
            self.width = 2 + 3 * len(self.labels)
        elif metrics <= {"mae", "rmse"}:
            self.kind = "rating"
            self.width = 3
        elif metrics <= {"rouge-1", "rouge-l"}:
            self.kind = "rouge"
            self.width = 3
        else:
            raise InvalidInputError(f"task {self.task.name!r} mixes metric kinds {self.metrics}")

    def rows(self, preds: Sequence[object], golds: Sequence[object]) -> np.ndarray:
        """One user's row: [n, ...sums] (see ``values``)."""
        preds = ["" if p is None else str(p).strip() for p in preds]
        golds = ["" if g is None else str(g).strip() for g in golds]
        row = np.zeros(self.width)
        row[0] = len(preds)
        if self.kind == "label":
            n_labels = len(self.labels)
            for p, g in zip(preds, golds, strict=True):
                row[1] += p == g
                for i, label in enumerate(self.labels):
                    row[2 + i] += p == label and g == label
                    row[2 + n_labels + i] += p == label and g != label
                    row[2 + 2 * n_labels + i] += p != label and g == label
        elif self.kind == "rating":
            for pred, gold in rating_pairs(preds, golds):
                row[1] += abs(pred - gold)
                row[2] += (pred - gold) ** 2
        else:
            r1, rl = rouge_per_example(preds, golds)
            row[1], row[2] = math.fsum(r1), math.fsum(rl)
        return row

    def values(self, summed: np.ndarray) -> np.ndarray:
        """Every metric (first axis, in ``self.metrics`` order) from rows summed over users (first axis)."""
        n = summed[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kind == "label":
                k = len(self.labels)
                tp, fp, fn = summed[2 : 2 + k], summed[2 + k : 2 + 2 * k], summed[2 + 2 * k : 2 + 3 * k]
                f1 = np.where(tp > 0, 2 * tp / np.where(tp > 0, 2 * tp + fp + fn, 1), 0.0).mean(axis=0)
                by_name = {"accuracy": summed[1] / n, "f1": f1}
            elif self.kind == "rating":
                by_name = {"mae": summed[1] / n, "rmse": np.sqrt(summed[2] / n)}
            else:
                by_name = {"rouge-1": summed[1] / n, "rouge-l": summed[2] / n}
        return np.stack([np.asarray(by_name[m], dtype=float) for m in self.metrics])

    def point(self, sample: np.ndarray) -> dict[str, float]:
        """Every metric of all of a sample's users (rows: users)."""
        return dict(zip(self.metrics, (float(v) for v in self.values(sample.sum(axis=0))), strict=True))


def signs(metrics: Sequence[str]) -> np.ndarray:
    """+1 where higher is better, -1 where lower is (MAE, RMSE): multiplies a difference into 'better than'."""
    return np.array([-1.0 if m in LOWER_IS_BETTER else 1.0 for m in metrics])


def _expand(vector: np.ndarray, like: np.ndarray) -> np.ndarray:
    return vector.reshape((-1,) + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------------------------------- intervals


def enough_users(n_users: int, settings: StatsSettings) -> str | None:
    """``None`` when ``n_users`` can carry an interval, else the sentence that says why not."""
    if n_users < settings.min_users:
        return (
            f"too few users for an interval ({n_users}; at least {settings.min_users} are needed, "
            "PERSONALIZE_STATS__MIN_USERS)"
        )
    return None


def _bootstrap(
    samples: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray], settings: StatsSettings
) -> tuple[np.ndarray, np.ndarray, str]:
    """scipy's bootstrap over users (rows), paired across ``samples``; BCa falls back to percentile where BCa is
    undefined (a degenerate resample distribution, e.g. two identical methods)."""
    method: str = settings.ci_method
    kwargs = dict(
        paired=len(samples) > 1,
        vectorized=True,
        axis=0,
        n_resamples=settings.resamples,
        confidence_level=settings.confidence,
        random_state=np.random.default_rng(settings.seed),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap(samples, statistic, method=method, **kwargs)
        low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        if method != "percentile" and (np.isnan(low).any() or np.isnan(high).any()):
            kwargs["random_state"] = np.random.default_rng(settings.seed)
            fallback = stats.bootstrap(samples, statistic, method="percentile", **kwargs)
            f_low = np.atleast_1d(fallback.confidence_interval.low)
            f_high = np.atleast_1d(fallback.confidence_interval.high)
            bad = np.isnan(low) | np.isnan(high)
            low, high = np.where(bad, f_low, low), np.where(bad, f_high, high)
            method = f"{method} (percentile where BCa is undefined)"
    return low, high, method


def _intervals(points: np.ndarray, low: np.ndarray, high: np.ndarray, method: str) -> list[Interval]:
    out = []
    for v, lo, hi in zip(points, low, high, strict=True):
        finite = math.isfinite(lo) and math.isfinite(hi) and math.isfinite(v)
        out.append(Interval(float(v), float(lo) if finite else None, float(hi) if finite else None, method))
    return out


def metric_intervals(sample: np.ndarray, family: MetricFamily, settings: StatsSettings) -> dict[str, Interval]:
    """Each metric of one method with its bootstrap interval over users (rows of ``sample``)."""
    points = family.values(sample.sum(axis=0))
    if enough_users(len(sample), settings):
        return {m: Interval(float(v), None, None) for m, v in zip(family.metrics, points, strict=True)}

    def statistic(a: np.ndarray, axis: int = -1) -> np.ndarray:
        return family.values(a.sum(axis=axis))

    low, high, method = _bootstrap((sample,), statistic, settings)
    return dict(zip(family.metrics, _intervals(points, low, high, method), strict=True))


def _gain(family: MetricFamily, relative: bool):  # noqa: ANN202
    """Candidate over reference, per metric, positive when better: relative (the paper's) or absolute."""
    sign = signs(family.metrics)

    def statistic(cand: np.ndarray, ref: np.ndarray, axis: int = -1) -> np.ndarray:
        c, r = family.values(cand.sum(axis=axis)), family.values(ref.sum(axis=axis))
        s = _expand(sign, c)
        with np.errstate(divide="ignore", invalid="ignore"):
            return s * (c - r) / (np.abs(r) if relative else 1.0)

    return statistic


def gain_intervals(
    candidate: np.ndarray, reference: np.ndarray, family: MetricFamily, settings: StatsSettings, relative: bool = True
) -> dict[str, Interval]:
    """The candidate's gain over the reference (relative by default; sign flipped for lower-is-better), with a
    paired bootstrap interval: each resample draws the same users for both methods."""
    rel, absolute, _ = gain_and_difference(candidate, reference, family, settings)
    return rel if relative else absolute


def gain_and_difference(
    candidate: np.ndarray, reference: np.ndarray, family: MetricFamily, settings: StatsSettings
) -> tuple[dict[str, Interval], dict[str, Interval], Interval]:
    """The relative gain and the absolute difference (both positive when the candidate is better) per metric, and
    the relative gain averaged over the metrics (the paper's headline number), from one paired bootstrap: each
    resample draws the same users for both methods."""
    if candidate.shape != reference.shape:
        raise InvalidInputError("paired samples need the same users in the same order")
    rel, absolute = _gain(family, True), _gain(family, False)

    def statistic(cand: np.ndarray, ref: np.ndarray, axis: int = -1) -> np.ndarray:
        gains = rel(cand, ref, axis)
        return np.concatenate([gains, absolute(cand, ref, axis), gains.mean(axis=0, keepdims=True)])

    with np.errstate(invalid="ignore"):
        points = statistic(candidate.T, reference.T)
    k = len(family.metrics)
    if enough_users(len(candidate), settings):
        out = [Interval(float(v), None, None) for v in points]
    else:
        low, high, method = _bootstrap((candidate, reference), statistic, settings)
        out = _intervals(points, low, high, method)
    by_metric = dict(zip(family.metrics, out[:k], strict=True))
    return by_metric, dict(zip(family.metrics, out[k : 2 * k], strict=True)), out[-1]


def paired_pvalues(
    candidate: np.ndarray, reference: np.ndarray, family: MetricFamily, settings: StatsSettings
) -> dict[str, float | None]:
    """Two-sided p-values of 'no difference' per metric: a permutation test that swaps the two methods' answers
    within each user (exact when 2**users is at most ``settings.permutations``)."""
    if enough_users(len(candidate), settings):
        return dict.fromkeys(family.metrics)
    if np.array_equal(candidate, reference):
        return dict.fromkeys(family.metrics, 1.0)
    # The samples are user indices: a "samples" permutation keeps position i for user i and swaps which method's
    # row it takes, so the candidate's sum is the reference's total plus the swapped-in differences (one matmul).
    sign = signs(family.metrics)
    n = len(candidate)
    delta = candidate - reference
    ref_total, cand_total = reference.sum(axis=0), candidate.sum(axis=0)

    def statistic(cand_idx: np.ndarray, ref_idx: np.ndarray, axis: int = -1) -> np.ndarray:
        keep = (np.asarray(cand_idx) < n).astype(float)  # 1 where the user's candidate row stays the candidate's
        moved = keep @ delta
        c = (ref_total + moved).T
        r = (cand_total - moved).T
        diff = family.values(c) - family.values(r)
        return (_expand(sign, diff) * diff).T  # permutation_test wants the batch axis first

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.permutation_test(
            (np.arange(n), np.arange(n) + n),
            statistic,
            permutation_type="samples",
            vectorized=True,
            n_resamples=settings.permutations,
            alternative="two-sided",
            random_state=np.random.default_rng(settings.seed),
        )
    pvalues = np.atleast_1d(result.pvalue)
    return {m: (float(p) if math.isfinite(p) else None) for m, p in zip(family.metrics, pvalues, strict=True)}


def smallest_pvalue(n_users: int) -> float:
    """The smallest two-sided p-value a within-user swap test can give with ``n_users`` users: 2 / 2**n."""
    return min(1.0, 2.0 / 2.0**n_users)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment over one family (``None`` entries are left out and stay ``None``)."""
    from statsmodels.stats.multitest import multipletests

    present = [i for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    if present:
        adjusted = multipletests([pvalues[i] for i in present], method="holm")[1]
        for i, p in zip(present, adjusted, strict=True):
            out[i] = float(p)
    return out


# --------------------------------------------------------------------------------------------- correlation


@dataclass(frozen=True)
class Correlation:
    n_users: int
    spearman: Interval | None
    spearman_p: float | None
    pearson: Interval | None
    pearson_p: float | None
    pearson_log_size: Interval | None


def _spearman_rows(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))


def _pearson(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[Interval | None, float | None]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    result = stats.pearsonr(x, y)
    ci = result.confidence_interval(confidence_level=confidence)
    return Interval(float(result.statistic), float(ci.low), float(ci.high), "Fisher z"), float(result.pvalue)


def correlation(
    sizes: Sequence[float] | np.ndarray, gains: Sequence[float] | np.ndarray, settings: StatsSettings
) -> Correlation:
    """Profile size against per-user gain: Spearman (scipy's p-value, a paired bootstrap interval) and Pearson
    (scipy's p-value and Fisher interval), on the size and on its log."""
    x, y = np.asarray(sizes, dtype=float), np.asarray(gains, dtype=float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(n, None, None, None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(x, y)
        spearman = Interval(float(rho.statistic), None, None)
        if not enough_users(n, settings):
            low, high, method = _bootstrap((x, y), _spearman_rows, settings)
            spearman = _intervals(np.array([rho.statistic]), low, high, method)[0]
        pearson, pearson_p = _pearson(x, y, settings.confidence)
        log_pearson, _ = _pearson(np.log(x), y, settings.confidence) if x.min() > 0 else (None, None)
    return Correlation(n, spearman, float(rho.pvalue), pearson, pearson_p, log_pearson)


__all__ = [
    "Correlation",
    "Interval",
    "MetricFamily",
    "correlation",
    "enough_users",
    "gain_intervals",
    "holm",
    "metric_intervals",
    "paired_pvalues",
    "signs",
    "smallest_pvalue",
]
