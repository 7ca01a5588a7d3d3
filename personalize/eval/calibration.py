"""Calibrating the router from an evaluation run: the bridge from a run's per-bucket results to a ``Policy``.

``calibrate_from_run`` cuts a run's users into profile-size buckets, merges the buckets too small to ever be
significant, and per bucket starts at the cheapest method, moving to a costlier one only on a significant gain
(see ``personalize.serving.router``). It reads runs through ``personalize.eval.reports`` and stores the policy with
``Router.save``; the router itself never imports reports or evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from personalize.data.store import Store
from personalize.errors import InvalidInputError
from personalize.eval.reports import Comparison, RunSamples, _quantile_buckets, adjust, compare, load_run_samples
from personalize.eval.significance import smallest_pvalue
from personalize.serving.router import Band, Policy, Router, cost_order
from personalize.settings import StatsSettings


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
    samples = bucket.samples
    present = cost_order(samples.samples)
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
    usable = [b for b in buckets if cost_order(b.samples.samples)]
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


__all__ = ["Bucket", "calibrate_bands", "calibrate_from_run", "merge_small_buckets", "users_needed"]
