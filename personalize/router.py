"""The router: pick ``none``, ``rag``, ``peft`` or ``rag+peft`` for a user from their data volume.

A policy is a list of profile-size bands per task, each with a method. Before any calibration the policy follows the
paper's finding (RAG for cold-start and small profiles, RAG+PEFT once a user has enough data and an adapter).
``calibrate`` replaces it from a run's per-bucket results: in each bucket, the cheapest method whose measured quality
is within ``tolerance`` (relative) of the best. Peft methods need a current adapter; without one the router steps
down to the same method without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from personalize.errors import InvalidInputError
from personalize.schema import RouterCalibration
from personalize.settings import RouterSettings
from personalize.store import Store

COST_ORDER = ("none", "rag", "peft", "rag+peft")  # cheapest first: adapters cost training and memory
DEFAULT_TASK = "*"


@dataclass(frozen=True)
class Band:
    min_items: int
    method: str
    quality: dict[str, float] = field(default_factory=dict)


@dataclass
class Policy:
    task: str
    bands: list[Band]  # ascending min_items; the first band starts at 1
    source_run_id: str | None = None
    created_at: str | None = None
    metric: str | None = None
    tolerance: float | None = None

    def method_for(self, n_items: int) -> Band:
        chosen = self.bands[0]
        for band in self.bands:
            if n_items >= band.min_items:
                chosen = band
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    method: str
    reason: str


def default_policy(task: str, settings: RouterSettings | None = None) -> Policy:
    settings = settings or RouterSettings()
    return Policy(task, [Band(1, "rag"), Band(settings.rag_peft_min_items, "rag+peft")])


class Router:
    """Reads the newest calibration per task from SQL; falls back to the paper-shaped default."""

    def __init__(self, store: Store, settings: RouterSettings | None = None) -> None:
        self.store = store
        self.settings = settings or RouterSettings()

    def policy(self, task: str | None) -> Policy:
        task = task or DEFAULT_TASK
        with self.store.session() as s:
            row = s.scalar(
                select(RouterCalibration)
                .where(RouterCalibration.task.in_([task, DEFAULT_TASK]))
                .order_by((RouterCalibration.task == task).desc(), RouterCalibration.id.desc())
                .limit(1)
            )
        if row is None:
            return default_policy(task, self.settings)
        data = row.thresholds
        return Policy(
            row.task,
            [Band(b["min_items"], b["method"], b.get("quality", {})) for b in data["bands"]],
            row.source_run_id,
            row.created_at.isoformat(timespec="seconds"),
            data.get("metric"),
            data.get("tolerance"),
        )

    def policies(self) -> list[Policy]:
        with self.store.session() as s:
            tasks = sorted(set(s.scalars(select(RouterCalibration.task))))
        return [self.policy(t) for t in tasks]

    def choose(self, task: str | None, n_items: int, has_adapter: bool) -> Decision:
        if n_items <= 0:
            return Decision("none", "the user has no items")
        policy = self.policy(task)
        band = policy.method_for(n_items)
        origin = f"calibrated from run {policy.source_run_id}" if policy.source_run_id else "default policy"
        reason = f"{n_items} item(s) fall in the band from {band.min_items} ({origin}, task {policy.task})"
        method = band.method
        if method in ("peft", "rag+peft") and not has_adapter:
            method = "rag" if method == "rag+peft" else "none"
            reason += f"; {band.method} needs an adapter the user does not have yet"
        return Decision(method, reason)

    def save(self, policy: Policy) -> None:
        if not policy.bands or policy.bands[0].min_items > 1:
            raise InvalidInputError("a policy needs bands starting at 1 item")
        for band in policy.bands:
            if band.method not in COST_ORDER:
                raise InvalidInputError(f"unknown method {band.method!r} in a router band")
        thresholds = {
            "bands": [asdict(b) for b in policy.bands],
            "metric": policy.metric,
            "tolerance": policy.tolerance,
        }
        with self.store.session() as s:
            s.add(RouterCalibration(task=policy.task, thresholds=thresholds, source_run_id=policy.source_run_id))


def calibrate_bands(buckets: list[dict[str, Any]], metric: str, lower_is_better: bool, tolerance: float) -> list[Band]:
    """``buckets``: ascending by size, each {"min_items", "methods": {method: metric value}}. In each bucket pick the
    cheapest method within ``tolerance`` (relative) of the best; merge neighbouring buckets with the same method."""
    bands: list[Band] = []
    for i, bucket in enumerate(buckets):
        values = {m: v for m, v in bucket["methods"].items() if v is not None}
        if not values:
            continue
        best = min(values.values()) if lower_is_better else max(values.values())
        slack = abs(best) * tolerance
        ok = [
            m
            for m in COST_ORDER
            if m in values and (values[m] <= best + slack if lower_is_better else values[m] >= best - slack)
        ]
        method = ok[0]
        start = 1 if i == 0 else int(bucket["min_items"])
        if bands and bands[-1].method == method:
            continue
        bands.append(Band(start, method, {m: float(v) for m, v in values.items()}))
    if not bands:
        raise InvalidInputError(f"the run has no per-bucket results for {metric}; nothing to calibrate from")
    return bands


def calibrate_from_run(store: Store, run_id: str, tolerance: float | None = None) -> Policy:
    """Set a task's bands from a run's per-bucket results on the task's primary metric, and store them."""
    from personalize.metrics import LOWER_IS_BETTER
    from personalize.reports import build_report, calibration_buckets

    report = build_report(store, run_id)
    router = Router(store)
    tolerance = router.settings.tolerance if tolerance is None else tolerance
    metric = report.metrics[0]
    bands = calibrate_bands(calibration_buckets(report), metric, metric in LOWER_IS_BETTER, tolerance)
    policy = Policy(report.task, bands, run_id, metric=metric, tolerance=tolerance)
    router.save(policy)
    return router.policy(report.task)
