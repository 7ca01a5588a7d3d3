"""Cached readers for the dashboard pages: the same library calls the CLI makes, behind Streamlit's caches.

One ``Personalizer`` per server (``st.cache_resource``), configured by the same ``PERSONALIZE_*`` environment
variables (and ``.env``) as the CLI; the model is loaded once per server. Lists that change while a run or a
worker is going (runs, jobs) are cached for a few seconds; a run's report is cached under its state and progress,
so a finished run is computed once and a running one is recomputed as answers arrive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from personalize.data.items import ProfileItem, UserInfo
from personalize.data.naming import eval_user_id
from personalize.eval.reports import RunReport, build_report, compare_runs, list_runs, per_user_scores, run_user_ids
from personalize.jobs.queue import describe_broker
from personalize.jobs.store import AdapterInfo, JobInfo
from personalize.personalizer import Personalizer
from personalize.serving.modeling import LoadedModel
from personalize.serving.router import Decision, Policy
from personalize.settings import Settings

LIVE_TTL_S = 5  # runs, jobs: what a worker or an evaluation changes while one watches
LIST_TTL_S = 30  # users, policies, a user's items
REPORT_TTL_S = 3600  # keyed by the run's state and progress: only a changed run is recomputed


def settings_key() -> tuple[tuple[str, str], ...]:
    """What the server's configuration depends on: the PERSONALIZE_* variables and the folder of ``.env``."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("PERSONALIZE_"))
    return (("cwd", str(Path.cwd())), *env)


@st.cache_resource(show_spinner="Opening the store ...")
def _personalizer(key: tuple[tuple[str, str], ...]) -> Personalizer:
    # auto_train off: a dashboard read (or a test prompt) must never queue training as a side effect;
    # training is queued only by the explicit button on the Users page.
    return Personalizer(Settings(), auto_train=False)


def personalizer() -> Personalizer:
    return _personalizer(settings_key())


@st.cache_resource(show_spinner="Loading the model (once per server) ...")
def _model(key: tuple[tuple[str, str], ...]) -> LoadedModel:
    return _personalizer(key).model


def model() -> LoadedModel:
    """The generative model, loaded once per server."""
    return _model(settings_key())


def clear() -> None:
    """Forget cached reads (after a write such as a calibration, or on the Refresh button)."""
    st.cache_data.clear()


# -- runs and reports ------------------------------------------------------------------------------------------


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _runs(key: tuple) -> list[dict[str, Any]]:
    return list_runs(_personalizer(key).store)


def runs() -> list[dict[str, Any]]:
    """Evaluation runs, newest first (``personalize eval list``)."""
    return _runs(settings_key())


def run(run_id: str) -> dict[str, Any] | None:
    return next((r for r in runs() if r["run_id"] == run_id), None)


@st.cache_data(ttl=REPORT_TTL_S, show_spinner="Computing the report ...", max_entries=64)
def _report(key: tuple, run_id: str, n_buckets: int, state: str, progress: float, results: int) -> RunReport:
    p = _personalizer(key)
    return build_report(p.store, run_id, n_buckets, p.settings.stats)


def report(run_id: str, n_buckets: int = 4) -> RunReport:
    """The run's report (``personalize eval report``), recomputed only when the run changed."""
    r = run(run_id) or {"state": "", "progress": 0.0, "results": 0}
    return _report(settings_key(), run_id, n_buckets, r["state"], r["progress"], r["results"])


def synthetic_runs() -> set[str]:
    return {r["run_id"] for r in runs() if r["synthetic"]}


@st.cache_data(ttl=REPORT_TTL_S, show_spinner=False)
def _synthetic_users(key: tuple, run_ids: tuple[str, ...]) -> set[str]:
    if not run_ids:
        return set()
    return run_user_ids(_personalizer(key).store, run_ids)


def synthetic_users() -> set[str]:
    """The stored users that were ingested for a SYNTHETIC run (``eval/{task}/{split}/{user}``)."""
    return _synthetic_users(settings_key(), tuple(sorted(synthetic_runs())))


@st.cache_data(ttl=REPORT_TTL_S, show_spinner="Reading per-user results ...", max_entries=32)
def _per_user(key: tuple, run_id: str, task: str, metric: str, state: str, progress: float) -> list[dict[str, Any]]:
    """Per user of a run: profile size, each method's value of ``metric`` and gain over ``none`` (the library's
    ``per_user_scores``, as the correlation uses them)."""
    return per_user_scores(_personalizer(key).store, run_id, metric)


def per_user(run_id: str, task: str, metric: str) -> list[dict[str, Any]]:
    r = run(run_id) or {"state": "", "progress": 0.0}
    return _per_user(settings_key(), run_id, task, metric, r["state"], r["progress"])


@st.cache_data(ttl=REPORT_TTL_S, show_spinner="Reading the adapters of the run's users ...", max_entries=32)
def _run_adapters(key: tuple, task: str, split: str, users: tuple[str, ...]) -> list[dict[str, Any]]:
    p = _personalizer(key)
    out = []
    for user in users:
        uid = eval_user_id(task, split, user)
        if not p.store.has_user(uid):
            continue
        adapters = p.adapters(uid)
        if adapters:
            a = adapters[-1]
            out.append(
                {
                    "user": user,
                    "version": a.version,
                    "n_items": a.n_items,
                    "train_seconds": a.train_seconds,
                    "size_bytes": a.size_bytes,
                    "final_loss": a.final_loss,
                    **_training_config(a.config),
                }
            )
    return out


def _training_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Tokens, steps and the task adapter an adapter was trained with (None each for an older adapter)."""
    config = config or {}
    return {
        "tokens": config.get("n_tokens"),
        "steps": config.get("steps"),
        "task_adapter": config.get("task_adapter"),
        "has_config": bool(config),
    }


def run_adapters(task: str, split: str, users: list[str]) -> list[dict[str, Any]]:
    """The latest adapter of each of the run's users (``personalize adapters``), for the cost page."""
    return _run_adapters(settings_key(), task, split, tuple(users))


# -- router ----------------------------------------------------------------------------------------------------


@st.cache_data(ttl=LIST_TTL_S, show_spinner=False)
def _policies(key: tuple) -> list[Policy]:
    router = _personalizer(key).router
    return router.policies() or [router.policy(None)]


def policies() -> list[Policy]:
    """Every calibrated task's policy, or the default (``personalize router show``)."""
    return _policies(settings_key())


@st.cache_data(ttl=LIST_TTL_S, show_spinner=False)
def _policy(key: tuple, task: str | None) -> Policy:
    return _personalizer(key).router.policy(task)


def policy(task: str | None) -> Policy:
    return _policy(settings_key(), task)


def choose(task: str | None, n_items: int, has_adapter: bool) -> Decision:
    return personalizer().router.choose(task, n_items, has_adapter)


# -- users, jobs -----------------------------------------------------------------------------------------------


@st.cache_data(ttl=LIST_TTL_S, show_spinner=False)
def _users(key: tuple, search: str | None, limit: int) -> list[UserInfo]:
    return _personalizer(key).users(search or None, limit)


def users(search: str | None = None, limit: int = 200) -> list[UserInfo]:
    return _users(settings_key(), search, limit)


def count_users() -> int:
    return personalizer().count_users()


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _user_detail(key: tuple, user_id: str) -> tuple[UserInfo, list[ProfileItem], list[AdapterInfo], list[JobInfo]]:
    p = _personalizer(key)
    return p.user(user_id), p.items(user_id), p.adapters(user_id), p.training_jobs(user_id, 100)


def user_detail(user_id: str) -> tuple[UserInfo, list[ProfileItem], list[AdapterInfo], list[JobInfo]]:
    """A user, their items, adapter versions and training jobs (``users show``, ``adapters``, ``jobs``)."""
    return _user_detail(settings_key(), user_id)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _training_jobs(key: tuple, limit: int) -> list[JobInfo]:
    return _personalizer(key).training_jobs(None, limit)


def training_jobs(limit: int = 500) -> list[JobInfo]:
    """Training jobs, newest first (``personalize jobs``)."""
    return _training_jobs(settings_key(), limit)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _task_adapters(key: tuple) -> list[dict[str, Any]]:
    return [info.summary() for info in _personalizer(key).task_adapters.all()]


def task_adapters() -> list[dict[str, Any]]:
    """Every stored task adapter's summary, a forgotten user's mark included (``personalize task-adapter list``)."""
    return _task_adapters(settings_key())


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _task_adapter_jobs(key: tuple) -> list[dict[str, Any]]:
    return list(reversed(_personalizer(key).task_adapters.jobs()))


def task_adapter_jobs() -> list[dict[str, Any]]:
    """Task adapter training jobs, newest first (``personalize task-adapter jobs``)."""
    return _task_adapter_jobs(settings_key())


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def _broker_status(key: tuple) -> tuple[bool, str]:
    p = _personalizer(key)
    where = describe_broker(p.settings)
    try:
        with p.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
    except Exception as exc:  # kombu raises its own and the transport's errors
        return False, f"cannot reach the broker {where} ({type(exc).__name__}): training jobs cannot be queued"
    return True, f"broker {where} is reachable"


def broker_status() -> tuple[bool, str]:
    """Whether the Celery broker answers (the library only finds out when it queues a job)."""
    return _broker_status(settings_key())


@st.cache_data(ttl=REPORT_TTL_S, show_spinner="Comparing the runs ...", max_entries=16)
def _run_differences(key: tuple, first: str, second: str, state: tuple) -> pd.DataFrame:
    p = _personalizer(key)
    rows = compare_runs(p.store, first, second, stats=p.settings.stats)
    return pd.DataFrame.from_records(
        [
            {
                "method": r.method,
                "metric": r.metric,
                "first": r.baseline,
                "second": r.candidate,
                "difference": r.difference.value if r.difference else r.candidate - r.baseline,
                "ci low": r.difference.ci_low if r.difference else None,
                "ci high": r.difference.ci_high if r.difference else None,
                "same answers": r.same_predictions,
                "queries": r.n_queries,
            }
            for r in rows
        ]
    )


def run_differences(first: str, second: str) -> pd.DataFrame:
    """Every metric of every method of two runs, second minus first, paired over users (``eval compare``)."""
    state = tuple((r["state"], r["progress"], r["results"]) for r in map(run, (first, second)) if r)
    return _run_differences(settings_key(), first, second, state)
