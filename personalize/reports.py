"""Reports of an evaluation run, computed from its stored predictions: the paper-style table, the same by
profile-size bucket, the correlation between profile size and PEFT's gain, and cost next to quality."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from personalize.errors import InvalidInputError
from personalize.metrics import LOWER_IS_BETTER, relative_gain, score
from personalize.schema import Adapter, EvalResult, EvalRun, User
from personalize.store import Store
from personalize.tasks import get_task

METHOD_ORDER = ("none", "rag", "peft", "rag+peft")


@dataclass
class MethodRow:
    method: str
    n_queries: int
    metrics: dict[str, float]
    gains: dict[str, float]  # relative improvement over none, per metric (sign flipped for lower-is-better)
    average_gain: float | None


@dataclass
class BucketRow:
    bucket: int
    min_items: int
    max_items: int
    n_users: int
    rows: list[MethodRow]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _method_rows(task: str, results: list[EvalResult], metrics: list[str]) -> list[MethodRow]:
    by_method: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    # compare methods on the queries every method answered (a partial run may have gaps)
    common = set.intersection(*({r.query_id for r in rs} for rs in by_method.values())) if by_method else set()
    values: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for method, rows in by_method.items():
        rows = [r for r in rows if r.query_id in common]
        if not rows:
            continue
        values[method] = score(task, [r.prediction for r in rows], [r.gold for r in rows])
        counts[method] = len(rows)
    out = []
    base = values.get("none")
    for method in [m for m in METHOD_ORDER if m in values]:
        gains = {m: relative_gain(values[method][m], base[m], m) for m in metrics} if base else {}
        finite = [g for g in gains.values() if g is not None and math.isfinite(g)]
        out.append(
            MethodRow(method, counts[method], values[method], gains, sum(finite) / len(finite) if finite else None)
        )
    return out


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


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _correlation(task: str, results: list[EvalResult], sizes: dict[str, int], metric: str) -> dict[str, Any]:
    """Per user: PEFT's (and RAG+PEFT's) gain over none on the primary metric, against profile size."""
    out: dict[str, Any] = {"metric": metric}
    per_user: dict[str, dict[str, list[EvalResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        per_user[r.user_external_id][r.method].append(r)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    for method in ("peft", "rag+peft", "rag"):
        xs, ys = [], []
        for user, methods in per_user.items():
            if method not in methods or "none" not in methods:
                continue
            mine = score(task, [r.prediction for r in methods[method]], [r.gold for r in methods[method]])[metric]
            base = score(task, [r.prediction for r in methods["none"]], [r.gold for r in methods["none"]])[metric]
            xs.append(float(sizes[user]))
            ys.append(sign * (mine - base))  # absolute gain per user: relative gains explode near zero
        out[method] = {
            "n_users": len(xs),
            "pearson": _pearson(xs, ys),
            "spearman": _pearson(_rank(xs), _rank(ys)) if len(xs) >= 3 else None,
            "pearson_log_size": _pearson([math.log(x) for x in xs], ys) if xs and min(xs) > 0 else None,
        }
    return out


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
        latest = select(Adapter.user_pk, func.max(Adapter.version).label("v")).group_by(Adapter.user_pk).subquery()
        rows = s.execute(
            select(User.external_id, Adapter.train_seconds, Adapter.size_bytes)
            .join(Adapter, Adapter.user_pk == User.id)
            .join(latest, (latest.c.user_pk == Adapter.user_pk) & (latest.c.v == Adapter.version))
            .where(User.external_id.startswith(prefix, autoescape=True))
        ).all()
    rows = [r for r in rows if r[0][len(prefix) :] in users]
    training = {}
    if rows:
        training = {
            "adapters": len(rows),
            "train_seconds_per_user_mean": statistics.mean(r[1] for r in rows),
            "train_seconds_per_user_max": max(r[1] for r in rows),
            "adapter_bytes_mean": statistics.mean(r[2] for r in rows),
        }
    return {"latency": latency, "training": training}


def build_report(store: Store, run_id: str, n_buckets: int = 4) -> RunReport:
    with store.session() as s:
        run = s.get(EvalRun, run_id)
        if run is None:
            raise InvalidInputError(f"no evaluation run {run_id!r}")
        results = list(s.scalars(select(EvalResult).where(EvalResult.run_id == run_id)))
    task = get_task(run.task)
    metrics = list(task.metrics)
    sizes: dict[str, int] = {}
    for r in results:
        sizes[r.user_external_id] = max(sizes.get(r.user_external_id, 0), r.profile_size)
    table = _method_rows(run.task, results, metrics) if results else []
    buckets = []
    for i, (lo, hi, members) in enumerate(_quantile_buckets(sizes, n_buckets)):
        rows = _method_rows(run.task, [r for r in results if r.user_external_id in members], metrics)
        buckets.append(BucketRow(i + 1, lo, hi, len(members), rows))
    from personalize.evaluation import EvalConfig

    config = EvalConfig(**run.config)
    notes = []
    if config.synthetic:
        notes.append("SYNTHETIC data: planted per-user signals, not a real benchmark")
    partial = run.state != "done"
    if partial:
        notes.append(f"run is {run.state} ({run.progress:.0%}): partial results")
    return RunReport(
        run_id=run.id,
        task=run.task,
        split=run.split,
        state=run.state,
        progress=run.progress,
        config=run.config,
        synthetic=config.synthetic,
        scoring=config.used_scoring(),
        metrics=metrics,
        table=table,
        buckets=buckets,
        correlation=_correlation(run.task, results, sizes, metrics[0]) if results else {},
        cost=_cost(store, run, results) if results else {},
        n_users=len(sizes),
        created_at=run.created_at.isoformat(timespec="seconds"),
        partial=partial,
        notes=notes,
    )


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.2%}" if pct else f"{value:.4f}"


def format_table(rows: list[MethodRow], metrics: list[str]) -> str:
    header = ["method", "n"] + metrics + [f"gain {m}" for m in metrics] + ["avg gain"]
    lines = [header]
    for r in rows:
        lines.append(
            [r.method, str(r.n_queries)]
            + [_fmt(r.metrics.get(m)) for m in metrics]
            + [_fmt(r.gains.get(m), pct=True) for m in metrics]
            + [_fmt(r.average_gain, pct=True)]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def format_report(report: RunReport) -> str:
    out = [
        f"run {report.run_id}: task {report.task}, split {report.split}, {report.n_users} users, "
        f"state {report.state}, scoring {report.scoring}"
    ]
    out += [f"NOTE: {n}" for n in report.notes]
    out += [
        "",
        "== methods (relative gain over none; sign flipped for lower-is-better) ==",
        format_table(report.table, report.metrics),
    ]
    for b in report.buckets:
        out += [
            "",
            f"== bucket {b.bucket}: profile size {b.min_items}..{b.max_items}, {b.n_users} users ==",
            format_table(b.rows, report.metrics),
        ]
    if report.correlation:
        out += ["", f"== profile size vs per-user gain over none ({report.correlation['metric']}) =="]
        for method in ("rag", "peft", "rag+peft"):
            c = report.correlation.get(method)
            if c and c["n_users"]:
                out.append(
                    f"{method}: n={c['n_users']} pearson={_fmt(c['pearson'])} spearman={_fmt(c['spearman'])} "
                    f"pearson(log size)={_fmt(c['pearson_log_size'])}"
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
            out.append(
                f"training: {tr['adapters']} adapters, {tr['train_seconds_per_user_mean']:.1f} s/user mean "
                f"(max {tr['train_seconds_per_user_max']:.1f}), {tr['adapter_bytes_mean'] / 1e6:.2f} MB each"
            )
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


def compare_runs(
    store: Store, baseline_id: str, candidate_id: str, candidate_store: Store | None = None
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
    for source, run_id in ((store, baseline_id), (other_store, candidate_id)):
        with source.session() as s:
            for r in s.scalars(select(EvalResult).where(EvalResult.run_id == run_id)):
                answers[(r.method, r.query_id)][r.run_id] = r.prediction
    out = []
    cand_rows = {r.method: r for r in cand.table}
    for row in base.table:
        other = cand_rows.get(row.method)
        if other is None:
            continue
        pairs = [v for (m, _), v in answers.items() if m == row.method and len(v) == 2]
        same = sum(1 for v in pairs if v[baseline_id] == v[candidate_id]) / len(pairs) if pairs else float("nan")
        for metric in base.metrics:
            a, b = row.metrics.get(metric), other.metrics.get(metric)
            if a is None or b is None:
                continue
            change = 0.0 if a == b else (b - a) / abs(a) if a else float("inf")
            out.append(MetricComparison(row.method, metric, a, b, change, same, len(pairs)))
    return out


def format_comparison(rows: list[MetricComparison], baseline_id: str, candidate_id: str, tolerance: float) -> str:
    lines = [["method", "metric", "baseline", "candidate", "relative change", "within", "same answers", "n"]]
    for r in rows:
        lines.append(
            [
                r.method,
                r.metric,
                f"{r.baseline:.4f}",
                f"{r.candidate:.4f}",
                f"{r.relative_change:+.2%}",
                "yes" if abs(r.relative_change) <= tolerance else "NO",
                f"{r.same_predictions:.1%}",
                str(r.n_queries),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
    return f"baseline {baseline_id} vs candidate {candidate_id} (tolerance {tolerance:.1%} relative)\n{table}"


def export(report: RunReport, path: Path) -> Path:
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(report.to_dict(), indent=2, default=str))
        return path
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "run_id",
                "task",
                "bucket",
                "min_items",
                "max_items",
                "n_users",
                "method",
                "n_queries",
                "metric",
                "value",
                "gain",
            ]
        )
        groups = [(0, None, None, report.n_users, report.table)]
        groups += [(b.bucket, b.min_items, b.max_items, b.n_users, b.rows) for b in report.buckets]
        for bucket, lo, hi, n_users, rows in groups:
            for r in rows:
                for m in report.metrics:
                    writer.writerow(
                        [
                            report.run_id,
                            report.task,
                            bucket or "all",
                            lo,
                            hi,
                            n_users,
                            r.method,
                            r.n_queries,
                            m,
                            r.metrics.get(m),
                            r.gains.get(m),
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


def calibration_buckets(report: RunReport) -> list[dict[str, Any]]:
    metric = report.metrics[0]
    return [
        {
            "min_items": b.min_items,
            "max_items": b.max_items,
            "methods": {r.method: r.metrics.get(metric) for r in b.rows},
        }
        for b in report.buckets
    ]
