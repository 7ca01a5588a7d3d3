"""The router: pick ``none``, ``rag``, ``peft`` or ``rag+peft`` for a user from their data volume.

A policy is a list of profile-size bands per task, each with a method. Before any calibration the policy follows the
paper's finding (RAG for cold-start and small profiles, RAG+PEFT once a user has enough data and an adapter).
``calibrate`` replaces it from a run's per-bucket results, and moves only on evidence: a bucket starts at the
cheapest method and moves to a costlier one only when that method's gain over the cheaper one is significant
(a paired within-user permutation test over the bucket's users at ``RouterSettings.alpha``, Holm-adjusted over the
bucket's candidates) and larger than ``tolerance`` (relative). Buckets with too few users to ever reach that level
are merged with a neighbour first. Each band keeps the interval and p-value that chose it. Peft methods need a
current adapter; without one the router steps down to the same method without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from personalize.errors import InvalidInputError
from personalize.methods import MODEL_METHODS, by_cost, uses_adapter, without_adapter
from personalize.schema import RouterCalibration
from personalize.settings import RouterSettings, StatsSettings
from personalize.significance import smallest_pvalue
from personalize.store import Store

if TYPE_CHECKING:
    from personalize.reports import Comparison, RunSamples

COST_ORDER = tuple(by_cost(MODEL_METHODS))  # cheapest first: adapters cost training and memory
DEFAULT_TASK = "*"


@dataclass(frozen=True)
class Band:
    min_items: int
    method: str
    quality: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)  # the test that chose the method (or kept the cheaper)


@dataclass
class Policy:
    task: str
    bands: list[Band]  # ascending min_items; the first band starts at 1
    source_run_id: str | None = None
    created_at: str | None = None
    metric: str | None = None
    tolerance: float | None = None
    alpha: float | None = None

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
            [Band(b["min_items"], b["method"], b.get("quality", {}), b.get("evidence", {})) for b in data["bands"]],
            row.source_run_id,
            row.created_at.isoformat(timespec="seconds"),
            data.get("metric"),
            data.get("tolerance"),
            data.get("alpha"),
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
        if uses_adapter(method) and not has_adapter:
            method = without_adapter(method)
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
            "alpha": policy.alpha,
        }
        with self.store.session() as s:
            s.add(RouterCalibration(task=policy.task, thresholds=thresholds, source_run_id=policy.source_run_id))


@dataclass(frozen=True)
class Bucket:
    """A group of users by profile size, with the per-user samples of the methods it can choose between."""

    min_items: int
    max_items: int
    samples: RunSamples
    run: RunSamples  # the whole run's samples, which merged buckets are cut from


def merge_small_buckets(buckets: list[Bucket], min_users: int) -> list[Bucket]:
    """Merge every bucket with fewer than ``min_users`` users into its smaller neighbour, until none is left."""
    out = list(buckets)
    while len(out) > 1:
        small = [i for i, b in enumerate(out) if len(b.samples.users) < min_users]
        if not small:
            break
        i = small[0]
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(out)]
        j = min(neighbours, key=lambda n: len(out[n].samples.users))
        a, b = sorted((i, j))
        users = set(out[a].samples.users) | set(out[b].samples.users)
        merged = Bucket(out[a].min_items, out[b].max_items, out[a].run.subset(users), out[a].run)
        out[a : b + 1] = [merged]
    return out


def users_needed(alpha: float, stats: StatsSettings) -> int:
    """The fewest users with which a within-user swap test can reach ``alpha`` (and an interval is drawn)."""
    n = 1
    while smallest_pvalue(n) >= alpha:
        n += 1
    return max(n, stats.min_users)


def _choose(bucket: Bucket, metric: str, alpha: float, tolerance: float, stats: StatsSettings) -> Band:
    """Start at the cheapest method; move up only on a significant gain (over the cheapest, Holm-adjusted over the
    candidates, and over the current choice) that is also above ``tolerance``."""
    from personalize.reports import adjust, compare

    samples = bucket.samples
    present = [m for m in COST_ORDER if m in samples.samples]
    values = {m: samples.family.point(samples.samples[m])[metric] for m in present}
    cheapest = present[0]
    tests = {m: compare(samples, m, cheapest, stats)[metric] for m in present[1:]}
    adjust(list(tests.values()), [], alpha)  # Holm over the bucket's candidates

    def moves(test: Comparison) -> bool:
        gain = test.gain.value
        return test.direction() == "better" and gain is not None and gain > tolerance

    chosen, evidence = cheapest, None
    for method in present[1:]:
        if not moves(tests[method]):
            continue
        step = tests[method]
        if chosen != cheapest:  # one further test, against the current choice
            step = compare(samples, method, chosen, stats)[metric]
            adjust([step], [], alpha)
        if moves(step):
            chosen, evidence = method, step
    if evidence is None and tests:  # stayed cheapest: the candidate that came closest (largest gain) is the reason
        evidence = max(tests.values(), key=lambda t: t.gain.value if t.gain.value is not None else -math.inf)
    record: dict[str, Any] = {
        "n_users": len(samples.users),
        "min_items": bucket.min_items,
        "max_items": bucket.max_items,
    }
    if evidence is not None:
        record |= {
            "candidate": evidence.candidate,
            "versus": evidence.reference,
            "gain": evidence.gain.value,
            "ci_low": evidence.gain.ci_low,
            "ci_high": evidence.gain.ci_high,
            "p_value": evidence.p_value,
            "p_holm": evidence.p_holm,
            "moved": chosen != cheapest,
        }
    return Band(bucket.min_items, chosen, {m: float(v) for m, v in values.items()}, record)


def calibrate_bands(
    buckets: list[Bucket], metric: str, alpha: float, tolerance: float, stats: StatsSettings
) -> list[Band]:
    """``buckets`` ascending by size. Merge the ones too small to ever be significant, choose per bucket with
    ``_choose``, and merge neighbouring bands that chose the same method."""
    usable = [b for b in buckets if any(m in b.samples.samples for m in COST_ORDER)]
    bands: list[Band] = []
    for i, bucket in enumerate(merge_small_buckets(usable, users_needed(alpha, stats))):
        band = _choose(bucket, metric, alpha, tolerance, stats)
        band = Band(1 if i == 0 else band.min_items, band.method, band.quality, band.evidence)
        if bands and bands[-1].method == band.method:  # one band; every bucket's test is kept in it
            bands[-1].evidence.setdefault("buckets", [dict(bands[-1].evidence)]).append(band.evidence)
            continue
        bands.append(band)
    if not bands:
        raise InvalidInputError(f"the run has no per-bucket results for {metric}; nothing to calibrate from")
    return bands


def calibrate_from_run(
    store: Store,
    run_id: str,
    tolerance: float | None = None,
    alpha: float | None = None,
    stats: StatsSettings | None = None,
    n_buckets: int = 4,
) -> Policy:
    """Set a task's bands from a run's profile-size buckets on the task's primary metric, and store them."""
    from personalize.reports import _quantile_buckets, load_run_samples

    samples = load_run_samples(store, run_id)
    router = Router(store)
    tolerance = router.settings.tolerance if tolerance is None else tolerance
    alpha = router.settings.alpha if alpha is None else alpha
    stats = stats or StatsSettings()
    metric = samples.family.metrics[0]
    sizes = {u: int(n) for u, n in zip(samples.users, samples.sizes, strict=True)}
    buckets = [Bucket(lo, hi, samples.subset(m), samples) for lo, hi, m in _quantile_buckets(sizes, n_buckets)]
    bands = calibrate_bands(buckets, metric, alpha, tolerance, stats)
    policy = Policy(samples.task, bands, run_id, metric=metric, tolerance=tolerance, alpha=alpha)
    router.save(policy)
    return router.policy(samples.task)
