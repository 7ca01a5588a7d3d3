"""Jobs: evaluation runs, training jobs, task adapters and their jobs, with live state, progress and errors."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data, ui

REFRESH_S = 5
TRAIN_HINT = "personalize task-adapter train --task T --data SRC"


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(
        [
            {
                "run": r["run_id"],
                "task": r["task"],
                "split": r["split"],
                "state": r["state"],
                "progress": r["progress"],
                "answers": r["results"],
                "data": ui.SYNTHETIC if r["synthetic"] else "real",
                "created": r["created_at"],
                "error": r["error"],
            }
            for r in runs
        ]
    )


def task_adapters_frame(adapters: list[dict[str, Any]]) -> pd.DataFrame:
    """Task adapters (``personalize task-adapter list``) as a frame; one trained on a forgotten user is marked, and
    the newest version of each (task, base model), the one runs use, says so."""
    newest: dict[tuple[str, str], int] = {}
    for a in adapters:
        key = (a["task"], a["base_model"])
        newest[key] = max(newest.get(key, 0), a["version"])
    return pd.DataFrame.from_records(
        [
            {
                "ref": a["ref"],
                "task": a["task"],
                "base model": a["base_model"],
                "users": a["users"],
                "pairs": a["pairs"],
                "with context": a["with_context"],
                "tokens": a["tokens"],
                "seconds": a["seconds"],
                "final loss": a["final_loss"],
                "cut": a["cut"],
                "created": a["created_at"],
                "status": forgotten_mark(a)
                or ("current" if a["version"] == newest[(a["task"], a["base_model"])] else "older version"),
            }
            for a in adapters
        ]
    )


def forgotten_mark(adapter: dict[str, Any]) -> str | None:
    n = adapter.get("forgotten_users") or 0
    return f"forgotten users: {n} — retrain pending" if n else None


def fmt_eta(job: dict[str, Any]) -> str | None:
    eta = job.get("eta_s")
    if job.get("state") not in ("queued", "running") or eta is None:
        return None
    return f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min"


def task_adapter_jobs_frame(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    """Task adapter jobs (``personalize task-adapter jobs``) as a frame: the new adapter's ref, or the error."""
    return pd.DataFrame.from_records(
        [
            {
                "job": j.get("id"),
                "state": j.get("state"),
                "progress": j.get("progress") or 0.0,
                "ETA": fmt_eta(j),
                "loss": j.get("loss"),
                "task": (j.get("source") or {}).get("task"),
                "data": (j.get("source") or {}).get("data"),
                "base model": j.get("base_model"),
                "reason": j.get("reason"),
                "result": j.get("adapter") or j.get("error"),
                "created": j.get("created_at"),
                "started": j.get("started_at"),
                "finished": j.get("finished_at"),
            }
            for j in jobs
        ]
    )


def show_jobs() -> None:
    with ui.guard():
        show_jobs_unguarded()


def show_jobs_unguarded() -> None:
    ok, message = data.broker_status()
    (st.success if ok else st.error)(message, icon=":material/check_circle:" if ok else ":material/error:")
    show_runs()
    show_training_jobs()
    show_task_adapters()
    show_task_adapter_jobs()


def show_runs() -> None:
    st.subheader("Evaluation runs")
    runs = data.runs()
    if not runs:
        ui.show_load_data_help()
        return
    counts = Counter(r["state"] for r in runs)
    cols = st.columns(4)
    for col, state in zip(cols, ("running", "done", "failed", "interrupted"), strict=True):
        col.metric(f"runs {state}", counts.get(state, 0))
    st.dataframe(runs_frame(runs), hide_index=True, width="stretch", column_config={"progress": ui.PROGRESS_COLUMN})
    for r in runs:
        if r["state"] in ("failed", "interrupted") and r["error"]:
            st.error(f"run **{r['run_id']}** {r['state']}: {r['error']}", icon=":material/cancel:")


def show_training_jobs() -> None:
    st.subheader("Training jobs")
    jobs = data.training_jobs()
    if not jobs:
        st.caption("No training jobs yet (`personalize train --all --queue`, or an evaluation with PEFT methods).")
        return
    counts = Counter(j.state for j in jobs)
    cols = st.columns(5)
    for col, state in zip(cols, ("queued", "running", "done", "failed", "cancelled"), strict=True):
        col.metric(f"jobs {state}", counts.get(state, 0))
    states = sorted(counts)
    shown = st.multiselect("States", states, default=states, key="jobs_states")
    frame = ui.jobs_frame([j for j in jobs if j.state in shown])
    st.dataframe(frame, hide_index=True, width="stretch", column_config={"progress": ui.PROGRESS_COLUMN})
    failed = [j for j in jobs if j.state == "failed"]
    if failed:
        st.markdown(f"**Failures** ({len(failed)})")
        for j in failed[:50]:
            st.error(
                f"job {j.id} · {j.user_id} · attempts {j.attempts}: {j.error or 'no error recorded'}",
                icon=":material/cancel:",
            )


def show_task_adapters() -> None:
    st.subheader("Task adapters")
    adapters = data.task_adapters()
    if not adapters:
        st.caption(f"No task adapters yet (`{TRAIN_HINT}`).")
        return
    st.dataframe(
        task_adapters_frame(adapters),
        hide_index=True,
        width="stretch",
        column_config={
            "seconds": st.column_config.NumberColumn(format="%.1f"),
            "final loss": st.column_config.NumberColumn(format="%.4f"),
        },
    )
    for a in adapters:
        mark = forgotten_mark(a)
        if mark:
            st.warning(
                f"task adapter **{a['ref']}** · {mark}: it was trained on items of users forgotten since, and stays "
                "marked until a retrain without them replaces it (`personalize forget` queues one: see the task "
                "adapter jobs below).",
                icon=":material/person_remove:",
            )


def show_task_adapter_jobs() -> None:
    st.subheader("Task adapter jobs")
    jobs = data.task_adapter_jobs()
    if not jobs:
        st.caption(f"No task adapter jobs yet (`{TRAIN_HINT} --via workers`).")
        return
    counts = Counter(j.get("state") for j in jobs)
    cols = st.columns(4)
    for col, state in zip(cols, ("queued", "running", "done", "failed"), strict=True):
        col.metric(f"task adapter jobs {state}", counts.get(state, 0))
    st.dataframe(
        task_adapter_jobs_frame(jobs),
        hide_index=True,
        width="stretch",
        column_config={"progress": ui.PROGRESS_COLUMN},
    )
    for j in jobs:
        if j.get("state") == "failed":
            task = (j.get("source") or {}).get("task")
            st.error(
                f"task adapter job {j.get('id')} · {task}: {j.get('error') or 'no error recorded'}",
                icon=":material/cancel:",
            )


with ui.page("Jobs", "Evaluation runs, training jobs and task adapters, live"):
    cols = st.columns([1, 1, 4])
    live = cols[0].toggle(f"Live (every {REFRESH_S} s)", value=True, key="jobs_live")
    ui.refresh_button("jobs_refresh")
    st.fragment(run_every=REFRESH_S if live else None)(show_jobs)()
