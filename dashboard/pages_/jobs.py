"""Jobs: training jobs and evaluation runs with their live state and progress, and failures with their error."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import streamlit as st

from dashboard import data, ui

REFRESH_S = 5


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


def show_jobs() -> None:
    with ui.guard():
        show_jobs_unguarded()


def show_jobs_unguarded() -> None:
    ok, message = data.broker_status()
    (st.success if ok else st.error)(message, icon=":material/check_circle:" if ok else ":material/error:")

    st.subheader("Evaluation runs")
    runs = data.runs()
    if not runs:
        ui.show_load_data_help()
    else:
        counts = Counter(r["state"] for r in runs)
        cols = st.columns(4)
        for col, state in zip(cols, ("running", "done", "failed", "interrupted"), strict=True):
            col.metric(f"runs {state}", counts.get(state, 0))
        st.dataframe(runs_frame(runs), hide_index=True, width="stretch", column_config={"progress": ui.PROGRESS_COLUMN})
        for r in runs:
            if r["state"] in ("failed", "interrupted") and r["error"]:
                st.error(f"run **{r['run_id']}** {r['state']}: {r['error']}", icon=":material/cancel:")

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


with ui.page("Jobs", "Training jobs and evaluation runs, live"):
    cols = st.columns([1, 1, 4])
    live = cols[0].toggle(f"Live (every {REFRESH_S} s)", value=True, key="jobs_live")
    ui.refresh_button("jobs_refresh")
    st.fragment(run_every=REFRESH_S if live else None)(show_jobs)()
