"""Reports of an evaluation run, computed from its stored predictions: the paper-style table with 95% intervals
over users, gains over ``none`` and over the best no-model baseline with paired tests, the same by profile-size
bucket, the correlation between profile size and each method's per-user gain, the paper's claims checked, and cost
next to quality. The statistics are scipy's (``personalize.eval.significance``); a user is the unit of resampling."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from personalize.data.naming import eval_user_id
from personalize.data.schema import Adapter, EvalResult, EvalRun, User
from personalize.data.store import Store
from personalize.errors import InvalidInputError
from personalize.eval.baselines import is_baseline
from personalize.eval.config import EvalConfig
from personalize.eval.metrics import LOWER_IS_BETTER, relative_gain
from personalize.eval.significance import (
    Interval,
    MetricFamily,
    correlation,
    enough_users,
    gain_and_difference,
    holm,
    metric_intervals,
    paired_pvalues,
    signs,
)
from personalize.methods import ordered
from personalize.settings import StatsSettings
from personalize.tasks.registry import get_task

ordered_methods = ordered  # model methods first, then the baselines (personalize.methods)


@dataclass
class Estimate:
    """A value with its confidence interval (``None`` bounds: no interval, e.g. too few users)."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None

    @classmethod
    def of(cls, interval: Interval) -> Estimate:
        value = interval.value if math.isfinite(interval.value) else None
        return cls(value, interval.low, interval.high)

    def excludes_zero(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


@dataclass
class Comparison:
    """``candidate`` against ``reference`` on one metric, over the same users: the relative gain (the paper's,
    positive when the candidate is better) and the absolute difference, each with a paired bootstrap interval, and
    the two-sided p-value of a within-user permutation test, raw and Holm-adjusted over the report's family."""

    candidate: str
    reference: str
    metric: str
    gain: Estimate
    difference: Estimate
    p_value: float | None
    p_holm: float | None = None
    significant: bool = False
    average_gain: Estimate | None = None  # the relative gain averaged over the task's metrics, same resamples

    def direction(self) -> str:
        """'better' / 'worse' when significant and the interval agrees, else 'not significant' ('' untested)."""
        if self.p_holm is None:
            return ""
        if self.significant and self.difference.excludes_zero():
            return "better" if (self.difference.ci_low or 0) > 0 else "worse"
        return "not significant"


@dataclass
class MethodRow:
    method: str
    n_queries: int
    metrics: dict[str, float]
    gains: dict[str, float]  # relative improvement over none, per metric (sign flipped for lower-is-better)
    average_gain: float | None
    baseline: bool = False  # a no-model baseline
    intervals: dict[str, Estimate] = field(default_factory=dict)
    average_gain_ci: Estimate | None = None  # the average gain over none with its paired interval
    vs_none: dict[str, Comparison] = field(default_factory=dict)
    vs_best_baseline: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class Claim:
    """One of the published claims, checked on this run: holds, fails, not significant, or not measured."""

    claim: str
    verdict: str
    metric: str
    estimate: Estimate  # the relative gain (or, for the size claim, Spearman's rho) that decides it
    p_value: float | None = None
    p_holm: float | None = None
    detail: str = ""


@dataclass
class BucketRow:
    bucket: int
    min_items: int
    max_items: int
    n_users: int
    rows: list[MethodRow]
    comparisons: list[Comparison] = field(default_factory=list)
    best_baseline: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    run_id: str
    task: str
    split: str
    state: str
    progress: float
    config: dict[str, Any]
    synthetic: bool
    scoring: str
    metrics: list[str]
    table: list[MethodRow]
    buckets: list[BucketRow]
    correlation: dict[str, Any]
    cost: dict[str, Any]
    n_users: int
    created_at: str
    partial: bool = False
    notes: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    best_baseline: str | None = None
    baselines: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, method: str) -> MethodRow | None:
        return next((r for r in self.table if r.method == method), None)


# --------------------------------------------------------------------------------------------- per-user samples


@dataclass
class RunSamples:
    """Per method, one row of sufficient statistics per user (``MetricFamily``), on the queries every method of the
    run answered, so that methods are compared on the same queries and the same users."""

    task: str
    family: MetricFamily
    users: list[str]
    sizes: np.ndarray
    samples: dict[str, np.ndarray]
    n_queries: dict[str, int]

    def subset(self, members: set[str]) -> RunSamples:
        keep = [i for i, u in enumerate(self.users) if u in members]
        users = [self.users[i] for i in keep]
        per_user_queries = {m: int(s[keep, 0].sum()) for m, s in self.samples.items()}
        return replace(
            self,
            users=users,
            sizes=self.sizes[keep],
            samples={m: s[keep] for m, s in self.samples.items()},
            n_queries=per_user_queries,
        )

    def per_user(self, method: str, metric: str) -> np.ndarray:
        """Each user's own value of ``metric`` for ``method`` (on that user's queries)."""
        index = self.family.metrics.index(metric)
        return self.family.values(self.samples[method].T)[index]


def load_samples(task: str, results: list[EvalResult]) -> RunSamples:
    family = MetricFamily(task)
    by_method: dict[str, set[str]] = defaultdict(set)
    for r in results:
        by_method[r.method].add(r.query_id)
    common = set.intersection(*by_method.values()) if by_method else set()
    answers: dict[str, dict[str, tuple[list[str], list[str]]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    sizes: dict[str, int] = {}
    for r in sorted(results, key=lambda x: (x.user_external_id, x.query_id)):
        sizes[r.user_external_id] = max(sizes.get(r.user_external_id, 0), r.profile_size)
        if r.query_id in common:
            preds, golds = answers[r.method][r.user_external_id]
            preds.append(r.prediction)
            golds.append(r.gold)
    users = sorted({u for per in answers.values() for u in per})
    samples = {
        m: np.array([family.rows(*per[u]) if u in per else np.zeros(family.width) for u in users]).reshape(
            len(users), family.width
        )
        for m, per in answers.items()
    }
    n_queries = {m: int(s[:, 0].sum()) for m, s in samples.items()}
    return RunSamples(task, family, users, np.array([sizes[u] for u in users]), samples, n_queries)


def _run_results(store: Store, run_id: str) -> tuple[EvalRun, list[EvalResult]]:
    with store.session() as s:
        run = s.get(EvalRun, run_id)
        if run is None:
            raise InvalidInputError(f"no evaluation run {run_id!r}; list them with `personalize eval list`")
        return run, list(s.scalars(select(EvalResult).where(EvalResult.run_id == run_id)))


def load_run_samples(store: Store, run_id: str) -> RunSamples:
    """A stored run's per-user samples (``load_samples``)."""
    run, results = _run_results(store, run_id)
    if not results:
        raise InvalidInputError(f"run {run_id!r} has no answers yet")
    return load_samples(run.task, results)


def profile_sizes(results: list[EvalResult]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for r in results:
        sizes[r.user_external_id] = max(sizes.get(r.user_external_id, 0), r.profile_size)
    return sizes


def _quantile_buckets(sizes: dict[str, int], n_buckets: int) -> list[tuple[int, int, set[str]]]:
    if not sizes:
        return []
    values = np.array(sorted(sizes.values()))
    edges = sorted(set(int(round(x)) for x in np.quantile(values, np.linspace(0, 1, n_buckets + 1))))
    if len(edges) < 2:
        edges = [int(values[0]), int(values[-1])]
    buckets = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        last = i == len(edges) - 2
        members = {u for u, n in sizes.items() if lo <= n < hi or (last and n == hi)}
        if members:
            buckets.append((min(sizes[u] for u in members), max(sizes[u] for u in members), members))
    return buckets


# --------------------------------------------------------------------------------------------- tables


def best_method(samples: RunSamples, methods: Iterable[str]) -> str | None:
    """The method with the best primary-metric value among ``methods`` (first in order on a tie)."""
    metric = samples.family.metrics[0]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    present = [m for m in ordered_methods(methods) if m in samples.samples and samples.n_queries.get(m)]
    if not present:
        return None
    return max(present, key=lambda m: (sign * samples.family.point(samples.samples[m])[metric], -present.index(m)))


def compare(
    samples: RunSamples, candidate: str, reference: str, settings: StatsSettings, test: bool = True
) -> dict[str, Comparison]:
    """``candidate`` against ``reference``, every metric, paired over the sample's users (``test=False``: intervals
    only, for a comparison outside the report's family of tests)."""
    cand, ref = samples.samples[candidate], samples.samples[reference]
    relative, absolute, average = gain_and_difference(cand, ref, samples.family, settings)
    pvalues = paired_pvalues(cand, ref, samples.family, settings) if test else dict.fromkeys(samples.family.metrics)
    avg = Estimate.of(average)
    return {
        m: Comparison(
            candidate, reference, m, Estimate.of(relative[m]), Estimate.of(absolute[m]), pvalues[m], average_gain=avg
        )
        for m in samples.family.metrics
    }


def _rows(samples: RunSamples, settings: StatsSettings) -> tuple[list[MethodRow], list[Comparison], str | None]:
    """The method table of one group of users, its comparisons, and the best baseline it was compared with."""
    metrics = samples.family.metrics
    methods = [m for m in ordered_methods(samples.samples) if samples.n_queries.get(m)]
    baselines = [m for m in methods if is_baseline(m)]
    best_baseline = best_method(samples, baselines)
    points = {m: samples.family.point(samples.samples[m]) for m in methods}
    base = points.get("none")
    comparisons: list[Comparison] = []
    rows = []
    for method in methods:
        values = points[method]
        gains = {m: relative_gain(values[m], base[m], m) for m in metrics} if base else {}
        finite = [g for g in gains.values() if g is not None and math.isfinite(g)]
        row = MethodRow(
            method,
            samples.n_queries[method],
            values,
            gains,
            sum(finite) / len(finite) if finite else None,
            baseline=is_baseline(method),
            intervals={
                m: Estimate.of(i)
                for m, i in metric_intervals(samples.samples[method], samples.family, settings).items()
            },
        )
        if not row.baseline and method != "none" and base is not None:
            row.vs_none = compare(samples, method, "none", settings)
            row.average_gain_ci = next(iter(row.vs_none.values())).average_gain
            comparisons += row.vs_none.values()
        rows.append(row)
    best_model = best_method(samples, [m for m in methods if not is_baseline(m)])
    for row in rows:
        if not row.baseline and best_baseline is not None:  # tested only for the best model method (the claim)
            row.vs_best_baseline = compare(samples, row.method, best_baseline, settings, test=row.method == best_model)
    for candidate, reference in (("rag", "peft"), ("rag+peft", "rag")):
        if candidate in points and reference in points:
            comparisons += compare(samples, candidate, reference, settings).values()
    if best_model is not None and best_baseline is not None:
        by_name = {r.method: r for r in rows}
        comparisons += by_name[best_model].vs_best_baseline.values()
    return rows, comparisons, best_baseline


def adjust(comparisons: list[Comparison], extra: list[float | None], alpha: float) -> list[float | None]:
    """Holm over one family: the comparisons (each object once) and ``extra`` p-values; returns extra's adjusted."""
    unique = list({id(c): c for c in comparisons}.values())
    adjusted = holm([c.p_value for c in unique] + list(extra))
    for c, p in zip(unique, adjusted[: len(unique)], strict=True):
        c.p_holm = p
        c.significant = p is not None and p < alpha
    return adjusted[len(unique) :]


# --------------------------------------------------------------------------------------------- correlation


def _estimate(interval: Interval | None) -> dict[str, float | None]:
    if interval is None:
        return {"value": None, "ci_low": None, "ci_high": None}
    return {"value": interval.value, "ci_low": interval.low, "ci_high": interval.high}


def _correlation(samples: RunSamples, settings: StatsSettings) -> dict[str, Any]:
    """Per user: each model method's absolute gain over none on the primary metric, against profile size
    (absolute: relative gains explode where a user's none is near zero)."""
    metric = samples.family.metrics[0]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    out: dict[str, Any] = {"metric": metric}
    if "none" not in samples.samples:
        return out
    base = samples.per_user("none", metric)
    for method in ("rag", "peft", "rag+peft"):
        if method not in samples.samples:
            continue
        gains = sign * (samples.per_user(method, metric) - base)
        c = correlation(samples.sizes, gains, settings)
        out[method] = {
            "n_users": c.n_users,
            "spearman": c.spearman.value if c.spearman else None,
            "spearman_ci": _estimate(c.spearman),
            "spearman_p": c.spearman_p,
            "pearson": c.pearson.value if c.pearson else None,
            "pearson_ci": _estimate(c.pearson),
            "pearson_p": c.pearson_p,
            "pearson_log_size": c.pearson_log_size.value if c.pearson_log_size else None,
        }
    return out


# --------------------------------------------------------------------------------------------- the paper's claims

CLAIMS = (
    ("RAG beats none", "rag", "none"),
    ("PEFT beats none", "peft", "none"),
    ("RAG+PEFT is at least as good as RAG", "rag+peft", "rag"),
    ("RAG beats PEFT", "rag", "peft"),
)


def _find(comparisons: list[Comparison], candidate: str, reference: str, metric: str) -> Comparison | None:
    return next(
        (c for c in comparisons if (c.candidate, c.reference, c.metric) == (candidate, reference, metric)), None
    )


def _verdict(c: Comparison, at_least: bool = False) -> tuple[str, str]:
    direction = c.direction()
    if direction == "better":
        return "holds", ""
    if direction == "worse":
        return "fails", f"{c.candidate} is significantly worse than {c.reference}"
    if at_least:
        return "not significant", "no significant difference: consistent with 'at least as good', not evidence of it"
    return "not significant", "the interval covers 0 or the Holm-adjusted p is above the level"


def _claims(report: RunReport, samples: RunSamples, settings: StatsSettings, size_p_holm: float | None) -> list[Claim]:
    alpha = settings.alpha
    metric = report.metrics[0]
    claims = []
    for text, candidate, reference in CLAIMS:
        c = _find(report.comparisons, candidate, reference, metric)
        if c is None:
            missing = [m for m in (candidate, reference) if m not in samples.samples]
            claims.append(Claim(text, "not measured", metric, Estimate(None), detail=f"the run has no {missing}"))
            continue
        if c.p_holm is None:
            why = enough_users(len(samples.users), settings) or "no test"
            claims.append(Claim(text, "not measured", metric, c.gain, detail=why))
            continue
        verdict, detail = _verdict(c, at_least=candidate == "rag+peft")
        claims.append(Claim(text, verdict, metric, c.gain, c.p_value, c.p_holm, detail))
    peft = report.correlation.get("peft")
    text = "PEFT's gain rises with profile size (Spearman, per-user gain over none)"
    if not peft or peft.get("spearman") is None:
        why = "no peft and none answers per user"
        if peft and peft.get("n_users", 0) >= 3:
            why = "profile sizes or per-user gains do not vary, so there is no correlation to measure"
        claims.append(Claim(text, "not measured", metric, Estimate(None), detail=why))
    else:
        ci = peft["spearman_ci"]
        rho = Estimate(ci["value"], ci["ci_low"], ci["ci_high"])
        if size_p_holm is None or rho.ci_low is None:
            verdict, detail = "not measured", "too few users for an interval"
        elif size_p_holm < alpha and rho.excludes_zero():
            # rho.value is None only for a non-finite estimate; a None check here would change what that case does
            verdict, detail = ("holds", "") if rho.value > 0 else ("fails", "the gain falls with profile size")  # type: ignore[operator]
        else:
            verdict, detail = (
                "not significant",
                "the interval of rho covers 0 or the Holm-adjusted p is above the level",
            )
        claims.append(Claim(text, verdict, metric, rho, peft["spearman_p"], size_p_holm, detail))
    text = "The best model method beats the best baseline"
    model = best_method(samples, [m for m in samples.samples if not is_baseline(m)])
    if model is None or report.best_baseline is None:
        claims.append(
            Claim(text, "not measured", metric, Estimate(None), detail="the run has no baseline or no model method")
        )
    else:
        c = _find(report.comparisons, model, report.best_baseline, metric)
        verdict, detail = _verdict(c) if c and c.p_holm is not None else ("not measured", "too few users")
        detail = f"{model} vs {report.best_baseline}" + (f": {detail}" if detail else "")
        claims.append(
            Claim(
                text,
                verdict,
                metric,
                c.gain if c else Estimate(None),
                c.p_value if c else None,
                c.p_holm if c else None,
                detail,
            )
        )
    return claims


def _cost(store: Store, run: EvalRun, results: list[EvalResult]) -> dict[str, Any]:
    latency: dict[str, dict[str, float]] = {}
    by_method: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    for method, rows in by_method.items():
        t = [r.timings or {} for r in rows]
        latency[method] = {
            "retrieval_ms_p50": 1000 * statistics.median([x.get("retrieval_s", 0.0) for x in t]),
            "generation_ms_p50": 1000 * statistics.median([x.get("generation_s", 0.0) for x in t]),
            "total_ms_p50": 1000 * statistics.median([x.get("total_s", 0.0) for x in t]),
        }
    prefix = f"eval/{run.task}/{run.split}/"
    users = {r.user_external_id for r in results}
    with store.session() as s:
        latest = (  # each user's newest adapter of each adapter method
            select(Adapter.user_pk, Adapter.method, func.max(Adapter.version).label("v"))
            .group_by(Adapter.user_pk, Adapter.method)
            .subquery()
        )
        adapter_rows = s.execute(
            select(User.external_id, Adapter.train_seconds, Adapter.size_bytes, Adapter.method, Adapter.config)
            .join(Adapter, Adapter.user_pk == User.id)
            .join(latest, (latest.c.user_pk == Adapter.user_pk) & (latest.c.v == Adapter.version))
            .where(User.external_id.startswith(prefix, autoescape=True))
        ).all()
    mine = [r for r in adapter_rows if r[0][len(prefix) :] in users]
    training: dict[str, Any] = {}
    if mine:
        training = _training_cost(mine)
        per_method: dict[str, list[Any]] = defaultdict(list)
        for row in mine:
            per_method[row[3]].append(row)
        training["by_method"] = {m: _training_cost(rows) for m, rows in sorted(per_method.items())}
    return {"latency": latency, "training": training}


def _params_text(params: int | None) -> str:
    return "" if params is None else f", {params:,} trainable parameters"


def _precision_text(counts: dict[str, int] | None) -> str:
    """The text after a method's training cost: ", trained in fp32" (", trained in bf16 x3, fp32 x1" when its
    adapters differ); "" where none recorded it."""
    if not counts:
        return ""
    if len(counts) == 1:
        return f", trained in {next(iter(counts))}"
    return ", trained in " + ", ".join(f"{p} x{n}" for p, n in counts.items())


def _training_cost(rows: list[Any]) -> dict[str, Any]:
    """Adapters, training seconds per user, bytes and trainable parameters of (user, train_seconds, size_bytes,
    method, config) rows; the parameters are None where no adapter recorded them (trained before they were), and
    ``compute_precision`` counts the adapters by the precision their training ran in (fp32 or bf16)."""
    configs = [r[4] or {} for r in rows]
    params = [c["trainable_params"] for c in configs if isinstance(c.get("trainable_params"), int)]
    precisions = Counter(str(c["compute_precision"]) for c in configs if c.get("compute_precision"))
    return {
        "adapters": len(rows),
        "compute_precision": dict(sorted(precisions.items())),  # what the frozen base computed in while training
        "train_seconds_per_user_mean": statistics.mean(r[1] for r in rows),
        "train_seconds_per_user_max": max(r[1] for r in rows),
        "adapter_bytes_mean": statistics.mean(r[2] for r in rows),
        "trainable_params": round(statistics.mean(params)) if params else None,
    }


# --------------------------------------------------------------------------------------------- the report


def build_report(store: Store, run_id: str, n_buckets: int = 4, stats: StatsSettings | None = None) -> RunReport:
    settings = stats or StatsSettings()
    run, results = _run_results(store, run_id)
    task = get_task(run.task)
    metrics = list(task.metrics)
    sizes = profile_sizes(results)
    samples = load_samples(run.task, results)
    table, comparisons, best_baseline = _rows(samples, settings) if results else ([], [], None)
    notes = []
    config = EvalConfig(**run.config)
    if config.synthetic:
        notes.append("SYNTHETIC data: planted per-user signals, not a real benchmark")
    partial = run.state != "done"
    if partial:
        notes.append(f"run is {run.state} ({run.progress:.0%}): partial results")
    too_few = enough_users(len(samples.users), settings)
    if results and too_few:
        notes.append(too_few + ": values without intervals or tests")
    buckets, bucket_family = [], []
    for i, (lo, hi, members) in enumerate(_quantile_buckets(sizes, n_buckets)):
        sub = samples.subset(members)
        rows, bucket_comparisons, bucket_baseline = _rows(sub, settings)
        bucket_notes = [why] if (why := enough_users(len(sub.users), settings)) else []
        buckets.append(BucketRow(i + 1, lo, hi, len(members), rows, bucket_comparisons, bucket_baseline, bucket_notes))
        bucket_family += bucket_comparisons
    adjust(bucket_family, [], settings.alpha)
    report = RunReport(
        run_id=run.id,
        task=run.task,
        split=run.split,
        state=run.state,
        progress=run.progress,
        config=run.config,
        synthetic=config.synthetic,
        scoring=config.scoring_label(),
        metrics=metrics,
        table=table,
        buckets=buckets,
        correlation=_correlation(samples, settings) if results else {},
        cost=_cost(store, run, results) if results else {},
        n_users=len(sizes),
        created_at=run.created_at.isoformat(timespec="seconds"),
        partial=partial,
        notes=notes,
        comparisons=comparisons,
        best_baseline=best_baseline,
        baselines=[r.method for r in table if r.baseline],
        stats={
            "unit": "user",
            "confidence": settings.confidence,
            "resamples": settings.resamples,
            "ci_method": settings.ci_method,
            "test": "paired permutation (within-user swap), two-sided",
            "permutations": settings.permutations,
            "correction": "Holm over the report's comparisons (and the size correlation); buckets: one family",
            "alpha": settings.alpha,
            "seed": settings.seed,
            "min_users": settings.min_users,
        },
    )
    peft_size = report.correlation.get("peft", {}).get("spearman_p") if results else None
    (size_p_holm,) = adjust(comparisons, [peft_size], settings.alpha)
    report.claims = _claims(report, samples, settings, size_p_holm) if results else []
    return report


def run_user_ids(store: Store, run_ids: Iterable[str]) -> set[str]:
    """The stored user ids (``eval/{task}/{split}/{user}``) that the given runs evaluated."""
    run_ids = list(run_ids)
    if not run_ids:
        return set()
    with store.session() as s:
        rows = s.execute(
            select(EvalRun.task, EvalRun.split, EvalResult.user_external_id)
            .join(EvalRun, EvalRun.id == EvalResult.run_id)
            .where(EvalResult.run_id.in_(run_ids))
            .distinct()
        ).all()
    return {eval_user_id(task, split, user) for task, split, user in rows}


def per_user_scores(store: Store, run_id: str, metric: str) -> list[dict[str, Any]]:
    """Per user of a run: profile size, each method's value of ``metric`` on the user's queries, and each method's
    absolute gain over ``none`` (sign flipped for lower-is-better), as the correlation uses them."""
    samples = load_run_samples(store, run_id)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    values = {m: samples.per_user(m, metric) for m in samples.samples}
    out = []
    for i, user in enumerate(samples.users):
        mine = {m: float(v[i]) for m, v in values.items()}
        gains = {m: sign * (v - mine["none"]) for m, v in mine.items() if m != "none"} if "none" in mine else {}
        out.append({"user": user, "profile_size": int(samples.sizes[i]), "values": mine, "gains": gains})
    return sorted(out, key=lambda r: r["profile_size"])


# --------------------------------------------------------------------------------------------- text


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.2%}" if pct else f"{value:.4f}"


def _fmt_ci(e: Estimate | None, pct: bool = False) -> str:
    if e is None or e.value is None:
        return "-"
    if e.ci_low is None or e.ci_high is None:
        return _fmt(e.value, pct)
    if pct:
        return f"{e.value:+.1%} [{e.ci_low:+.1%}, {e.ci_high:+.1%}]"
    return f"{e.value:.4f} [{e.ci_low:.4f}, {e.ci_high:.4f}]"


def _fmt_p(c: Comparison | None) -> str:
    if c is None or c.p_value is None:
        return "-"
    holm_p = "" if c.p_holm is None else f" (Holm {c.p_holm:.3g})"
    return f"p={c.p_value:.3g}{holm_p}" + (" *" if c.significant else "")


def _grid(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def format_table(rows: list[MethodRow], metrics: list[str]) -> str:
    """Each method's metrics with 95% intervals over users; baselines marked 'no model'."""
    lines = [["method", "kind", "n"] + metrics]
    for r in rows:
        kind = "no model" if r.baseline else "model"
        lines.append(
            [r.method, kind, str(r.n_queries)]
            + [_fmt_ci(r.intervals.get(m)) or _fmt(r.metrics.get(m)) for m in metrics]
        )
    return _grid(lines)


def format_gains(rows: list[MethodRow], metrics: list[str], attr: str = "vs_none") -> str:
    """Relative gains of the model methods (over none, or over the best baseline), with intervals and p-values."""
    lines = [["method"] + [x for m in metrics for x in (f"gain {m}", f"p {m}")] + ["avg gain"]]
    for r in rows:
        found: dict[str, Comparison] = getattr(r, attr)
        if r.baseline or not found:
            continue
        cells = [x for m in metrics for x in (_fmt_ci(found[m].gain, pct=True), _fmt_p(found[m]))]
        lines.append([r.method, *cells, _fmt_ci(found[metrics[0]].average_gain, pct=True)])
    return _grid(lines) if len(lines) > 1 else "(none)"


def format_comparisons(comparisons: list[Comparison], metric: str) -> str:
    lines = [["comparison", f"gain {metric}", f"difference {metric}", "p", "verdict"]]
    for c in comparisons:
        if c.metric != metric or c.reference == "none":
            continue
        lines.append(
            [
                f"{c.candidate} vs {c.reference}",
                _fmt_ci(c.gain, pct=True),
                _fmt_ci(c.difference),
                _fmt_p(c),
                c.direction() or "-",
            ]
        )
    return _grid(lines) if len(lines) > 1 else "(none)"


def _format_group(
    rows: list[MethodRow], comparisons: list[Comparison], metrics: list[str], best: str | None
) -> list[str]:
    out = [format_table(rows, metrics), "", "gain over none (relative, sign flipped for lower-is-better):"]
    out.append(format_gains(rows, metrics))
    if best:
        out += ["", f"gain over the best baseline ({best}, no model):", format_gains(rows, metrics, "vs_best_baseline")]
    pairs = format_comparisons(comparisons, metrics[0])
    if pairs != "(none)":
        out += ["", "other comparisons:", pairs]
    return out


def run_base(config: dict[str, Any]) -> str:
    """What a run's none/rag/peft/rag+peft ran on, in words (runs from before task adapters: the plain base)."""
    ref = config.get("task_adapter")
    if ref:
        return f"task adapter {ref} merged into {config.get('model') or 'the base model'} (zero-shot: the plain base)"
    return f"zero-shot: the plain base model {config.get('model') or ''}".rstrip()


def format_report(report: RunReport) -> str:
    st = report.stats
    out = [
        f"run {report.run_id}: task {report.task}, split {report.split}, {report.n_users} users, "
        f"state {report.state}, scoring {report.scoring}"
    ]
    out.append(f"base: {run_base(report.config)}")
    out += [f"NOTE: {n}" for n in report.notes]
    if st:
        out.append(
            f"intervals: {st['confidence']:.0%} {st['ci_method']} bootstrap over users ({st['resamples']} resamples, "
            f"seed {st['seed']}); p: {st['test']} ({st['permutations']} permutations), {st['correction']}; "
            f"* = significant at {st['alpha']}"
        )
    out += ["", "== methods ==", *_format_group(report.table, report.comparisons, report.metrics, report.best_baseline)]
    for b in report.buckets:
        out += ["", f"== bucket {b.bucket}: profile size {b.min_items}..{b.max_items}, {b.n_users} users =="]
        out += [f"NOTE: {n}" for n in b.notes]
        out += _format_group(b.rows, b.comparisons, report.metrics, b.best_baseline)
    if report.correlation:
        out += ["", f"== profile size vs per-user gain over none ({report.correlation['metric']}) =="]
        for method in ("rag", "peft", "rag+peft"):
            c = report.correlation.get(method)
            if c and c["n_users"]:
                rho = Estimate(**c["spearman_ci"])
                out.append(
                    f"{method}: n={c['n_users']} spearman={_fmt_ci(rho)} (p={_fmt(c['spearman_p'])}) "
                    f"pearson={_fmt(c['pearson'])} pearson(log size)={_fmt(c['pearson_log_size'])}"
                )
    if report.cost:
        out += ["", "== cost =="]
        for method, lat in report.cost.get("latency", {}).items():
            out.append(
                f"{method}: retrieval p50 {lat['retrieval_ms_p50']:.1f} ms, generation p50 "
                f"{lat['generation_ms_p50']:.1f} ms, total p50 {lat['total_ms_p50']:.1f} ms"
            )
        tr = report.cost.get("training")
        if tr:
            per_method = tr.get("by_method", {})
            for method, cost in per_method.items() if len(per_method) > 1 else [("", tr)]:
                out.append(
                    f"training{f' ({method})' if method else ''}: {cost['adapters']} adapters, "
                    f"{cost['train_seconds_per_user_mean']:.1f} s/user mean "
                    f"(max {cost['train_seconds_per_user_max']:.1f}), {cost['adapter_bytes_mean'] / 1e6:.2f} MB each"
                    + _params_text(cost.get("trainable_params"))
                    + _precision_text(cost.get("compute_precision"))
                )
    if report.claims:
        out += ["", f"== the paper's claims, checked ({report.metrics[0]}) =="]
        for c in report.claims:
            pct = not c.claim.startswith("PEFT's gain rises")
            p = (
                ""
                if c.p_value is None
                else f", p={c.p_value:.3g}" + ("" if c.p_holm is None else f" (Holm {c.p_holm:.3g})")
            )
            detail = f" ({c.detail})" if c.detail else ""
            out.append(f"{c.verdict.upper():<16} {c.claim}: {_fmt_ci(c.estimate, pct=pct)}{p}{detail}")
    return "\n".join(out)


@dataclass
class MetricComparison:
    method: str
    metric: str
    baseline: float
    candidate: float
    relative_change: float  # (candidate - baseline) / |baseline|; 0 when both are 0
    same_predictions: float  # share of the method's queries answered identically by both runs
    n_queries: int
    difference: Estimate | None = None  # candidate - baseline, paired over the users and queries both answered


def _paired_across_runs(
    task: str, base: list[EvalResult], cand: list[EvalResult], method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user rows of one method in two runs, on the (user, query) pairs both runs answered."""
    family = MetricFamily(task)
    mine = {(r.user_external_id, r.query_id): r for r in base if r.method == method}
    theirs = {(r.user_external_id, r.query_id): r for r in cand if r.method == method}
    shared = sorted(set(mine) & set(theirs))
    users = sorted({u for u, _ in shared})
    rows_a, rows_b = [], []
    for user in users:
        keys = [k for k in shared if k[0] == user]
        rows_a.append(family.rows([mine[k].prediction for k in keys], [mine[k].gold for k in keys]))
        rows_b.append(family.rows([theirs[k].prediction for k in keys], [theirs[k].gold for k in keys]))
    width = family.width
    return np.array(rows_a).reshape(-1, width), np.array(rows_b).reshape(-1, width)


def compare_runs(
    store: Store,
    baseline_id: str,
    candidate_id: str,
    candidate_store: Store | None = None,
    stats: StatsSettings | None = None,
) -> list[MetricComparison]:
    """Every metric of every method of two runs of the same task and queries, side by side: how far the candidate
    (e.g. the fast decoder) moved from the baseline (the plain path), and how many answers are identical. The
    candidate may live in another store (``candidate_store``: a run that had to train its own adapters)."""
    other_store = candidate_store or store
    base, cand = build_report(store, baseline_id), build_report(other_store, candidate_id)
    if (base.task, base.split) != (cand.task, cand.split):
        raise InvalidInputError(
            f"runs of different tasks or splits: {base.task}/{base.split} vs {cand.task}/{cand.split}"
        )
    answers: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    results: dict[str, list[EvalResult]] = {}
    for source, run_id in ((store, baseline_id), (other_store, candidate_id)):
        results[run_id] = _run_results(source, run_id)[1]
        for r in results[run_id]:
            answers[(r.method, r.query_id)][r.run_id] = r.prediction
    family = MetricFamily(base.task)
    settings = stats or StatsSettings()
    out = []
    cand_rows = {r.method: r for r in cand.table}
    for row in base.table:
        other = cand_rows.get(row.method)
        if other is None:
            continue
        pairs = [v for (m, _), v in answers.items() if m == row.method and len(v) == 2]
        same = sum(1 for v in pairs if v[baseline_id] == v[candidate_id]) / len(pairs) if pairs else float("nan")
        a_rows, b_rows = _paired_across_runs(base.task, results[baseline_id], results[candidate_id], row.method)
        differences: dict[str, Interval] = {}
        if len(a_rows):
            _, differences, _ = gain_and_difference(b_rows, a_rows, family, settings)
        sign = signs(family.metrics)
        for i, metric in enumerate(base.metrics):
            a, b = row.metrics.get(metric), other.metrics.get(metric)
            if a is None or b is None:
                continue
            change = 0.0 if a == b else (b - a) / abs(a) if a else float("inf")
            diff = differences.get(metric)
            raw = None
            if diff is not None:  # gain_and_difference is signed 'better'; report candidate - baseline as is
                lo, hi = (diff.low, diff.high) if sign[i] > 0 else (_neg(diff.high), _neg(diff.low))
                raw = Estimate(sign[i] * diff.value, lo, hi)
            out.append(MetricComparison(row.method, metric, a, b, change, same, len(pairs), raw))
    return out


def _neg(x: float | None) -> float | None:
    return None if x is None else -x


def format_comparison(rows: list[MetricComparison], baseline_id: str, candidate_id: str, tolerance: float) -> str:
    lines = [["method", "metric", "baseline", "candidate", "difference [95% CI]", "relative change", "within"]]
    lines[0] += ["same answers", "n"]
    for r in rows:
        d = r.difference
        diff = "-" if d is None or d.value is None else f"{d.value:+.4f}"
        if d is not None and d.ci_low is not None and d.ci_high is not None:
            diff += f" [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
        lines.append(
            [
                r.method,
                r.metric,
                f"{r.baseline:.4f}",
                f"{r.candidate:.4f}",
                diff,
                f"{r.relative_change:+.2%}",
                "yes" if abs(r.relative_change) <= tolerance else "NO",
                f"{r.same_predictions:.1%}",
                str(r.n_queries),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return f"baseline {baseline_id} vs candidate {candidate_id} (tolerance {tolerance:.1%} relative)\n{table}"


def export_dict(report: RunReport) -> dict[str, Any]:
    """The report as JSON for other tools: everything in ``RunReport``, plus ``methods.<name>.metrics.<metric>``
    (value, ci_low, ci_high), ``methods.<name>.gain_vs_none`` (the primary metric's value, ci_low, ci_high, p_value,
    p_holm, and ``by_metric``) and ``gain_vs_best_baseline`` for model methods, ``baselines`` and ``claims``."""
    data = report.to_dict()
    methods: dict[str, Any] = {}
    primary = report.metrics[0] if report.metrics else None

    def gain_block(found: dict[str, Comparison]) -> dict[str, Any]:
        by_metric = {
            m: {
                "value": c.gain.value,
                "ci_low": c.gain.ci_low,
                "ci_high": c.gain.ci_high,
                "p_value": c.p_value,
                "p_holm": c.p_holm,
                "significant": c.significant,
            }
            for m, c in found.items()
        }
        first = next(iter(found.values()), None)
        average = asdict(first.average_gain) if first is not None and first.average_gain is not None else None
        return {
            "metric": primary,
            **(by_metric.get(primary, {}) if primary is not None else {}),
            "by_metric": by_metric,
            "average_gain": average,
        }

    for r in report.table:
        entry: dict[str, Any] = {
            "kind": "no model" if r.baseline else "model",
            "n_queries": r.n_queries,
            "metrics": {
                m: {"value": r.metrics.get(m), "ci_low": e.ci_low, "ci_high": e.ci_high} for m, e in r.intervals.items()
            },
        }
        if r.vs_none:
            entry["gain_vs_none"] = gain_block(r.vs_none)
        if r.vs_best_baseline:
            entry["gain_vs_best_baseline"] = {"baseline": report.best_baseline, **gain_block(r.vs_best_baseline)}
        methods[r.method] = entry
    data["methods"] = methods
    data["claims"] = [asdict(c) for c in report.claims]
    data["baselines"] = list(report.baselines)
    return data


_CSV_COLUMNS = [
    "run_id",
    "task",
    "bucket",
    "min_items",
    "max_items",
    "n_users",
    "method",
    "kind",
    "n_queries",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "gain",
    "gain_ci_low",
    "gain_ci_high",
    "p_value",
    "p_holm",
]


def export(report: RunReport, path: Path) -> Path:
    """``.json``: ``export_dict``; anything else: CSV, one row per bucket x method x metric, with intervals."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(export_dict(report), indent=2, default=str))
        return path
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_CSV_COLUMNS)
        groups: list[tuple[int, int | None, int | None, int, list[MethodRow]]] = [
            (0, None, None, report.n_users, report.table)
        ]
        groups += [(b.bucket, b.min_items, b.max_items, b.n_users, b.rows) for b in report.buckets]
        for bucket, lo, hi, n_users, rows in groups:
            for r in rows:
                for m in report.metrics:
                    e = r.intervals.get(m) or Estimate(r.metrics.get(m))
                    c = r.vs_none.get(m)
                    writer.writerow(
                        [
                            report.run_id,
                            report.task,
                            bucket or "all",
                            lo,
                            hi,
                            n_users,
                            r.method,
                            "no model" if r.baseline else "model",
                            r.n_queries,
                            m,
                            r.metrics.get(m),
                            e.ci_low,
                            e.ci_high,
                            r.gains.get(m),
                            c.gain.ci_low if c else None,
                            c.gain.ci_high if c else None,
                            c.p_value if c else None,
                            c.p_holm if c else None,
                        ]
                    )
    return path


def list_runs(store: Store) -> list[dict[str, Any]]:
    with store.session() as s:
        runs = s.scalars(select(EvalRun).order_by(EvalRun.created_at.desc())).all()
        counts = dict(s.execute(select(EvalResult.run_id, func.count(EvalResult.id)).group_by(EvalResult.run_id)).all())
        return [
            {
                "run_id": r.id,
                "task": r.task,
                "split": r.split,
                "state": r.state,
                "progress": r.progress,
                "results": counts.get(r.id, 0),
                "created_at": r.created_at.isoformat(timespec="seconds"),
                "synthetic": bool(r.config.get("synthetic")),
                "error": r.error,
            }
            for r in runs
        ]
