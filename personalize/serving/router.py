"""The router: pick ``none``, ``rag``, ``peft``, ``rag+peft`` or an adapter method's variant of the last two
(``peft:ia3``, ``rag+peft:prompt-tuning``, ...) for a user from their data volume.

A policy is a list of profile-size bands per task, each with a method. Before any calibration the policy follows the
paper's finding (RAG for cold-start and small profiles, RAG+PEFT once a user has enough data and an adapter).
``calibrate`` replaces it from a run's per-bucket results, and moves only on evidence: a bucket starts at the
cheapest method and moves to a costlier one only when that method's gain over the cheaper one is significant
(a paired within-user permutation test over the bucket's users at ``RouterSettings.alpha``, Holm-adjusted over the
bucket's candidates) and larger than ``tolerance`` (relative). Buckets with too few users to ever reach that level
are merged with a neighbour first. Each band keeps the interval and p-value that chose it. Peft methods need a
current adapter of their adapter method; without one the router steps down to the same method without it. The
cost order (``cost_order``) ranks the four basic methods as before and, within ``peft`` and within ``rag+peft``,
the adapter methods by what they cost to serve and train here (see ``adapter_cost_key``).

Calibrating from a run (the bridge from evaluation results to policies) lives in ``personalize.eval.calibration``: the
router itself reads and stores policies only, and never imports reports or the evaluation runner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from personalize.adapters.methods import ADAPTER_METHODS, AdapterMethod
from personalize.data.schema import RouterCalibration
from personalize.data.store import Store
from personalize.errors import InvalidInputError
from personalize.methods import (
    DEFAULT_ADAPTER_METHOD,
    METHODS,
    MODEL_METHODS,
    adapter_variant,
    by_cost,
    uses_adapter,
    without_adapter,
)
from personalize.settings import RouterSettings

COST_ORDER = tuple(by_cost(MODEL_METHODS))  # the four basic methods, cheapest first: adapters cost training, memory
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


def adapter_cost_key(method: AdapterMethod) -> tuple[int, int, int, int]:
    """Cheapest first within a tier: served by the fast decoder, then in peft's mixed batches too
    (where the fast decoder does not apply, a prompt-learning method runs one row at a time on the plain path),
    then trained without a teacher (distillation first generates rag answers), then registration order (LoRA, the
    default, first among equals)."""
    order = list(ADAPTER_METHODS).index(method.name) if method.name in ADAPTER_METHODS else len(ADAPTER_METHODS)
    return (not method.fast_decoding, not method.mixed_batches, method.distilled, order)


def is_routable(name: str) -> bool:
    """A method the router may choose: one of the four basic ones, or ``peft:<m>`` / ``rag+peft:<m>`` with a
    registered adapter method ``m``."""
    if name in COST_ORDER:
        return True
    variant = adapter_variant(name)
    return variant is not None and variant[1] in ADAPTER_METHODS


def cost_order(names: Iterable[str]) -> list[str]:
    """The routable methods among ``names``, cheapest first: the basic methods' cost rank (none < rag < peft <
    rag+peft), and within an adapter tier the adapter methods by ``adapter_cost_key`` (plain ``peft`` is LoRA)."""

    def key(name: str) -> tuple[int, tuple[int, int, int, int]]:
        variant = adapter_variant(name)
        base, adapter = variant if variant else (name, DEFAULT_ADAPTER_METHOD)
        method = ADAPTER_METHODS.get(adapter)
        return METHODS[base].cost_rank, adapter_cost_key(method) if method else (0, 0, 0, 0)

    return sorted(dict.fromkeys(n for n in names if is_routable(n)), key=key)


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

    def planned(self, task: str | None, n_items: int, policy: Policy | None = None) -> str:
        """The method the policy's band for ``n_items`` names, before any adapter check (what ``choose`` returns
        for a user who has that method's adapter): serving asks it first to know which adapter to look up, and
        passes the same ``policy`` on to ``choose`` (one read of the calibration per request)."""
        return "none" if n_items <= 0 else (policy or self.policy(task)).method_for(n_items).method

    def choose(self, task: str | None, n_items: int, has_adapter: bool, policy: Policy | None = None) -> Decision:
        """The method for a user with ``n_items`` items; ``has_adapter``: whether the user has a current adapter
        of the planned method's adapter method (``planned``); ``policy``: the task's, if read already."""
        if n_items <= 0:
            return Decision("none", "the user has no items")
        policy = policy or self.policy(task)
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
            if not is_routable(band.method):
                raise InvalidInputError(f"unknown method {band.method!r} in a router band")
        thresholds = {
            "bands": [asdict(b) for b in policy.bands],
            "metric": policy.metric,
            "tolerance": policy.tolerance,
            "alpha": policy.alpha,
        }
        with self.store.session() as s:
            s.add(RouterCalibration(task=policy.task, thresholds=thresholds, source_run_id=policy.source_run_id))
