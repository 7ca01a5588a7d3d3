"""Router: the thresholds per task, where they came from, what it picks for a profile size, and calibration."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui
from personalize.eval.calibration import calibrate_from_run
from personalize.eval.reports import Estimate
from personalize.serving.router import DEFAULT_TASK, Policy
from personalize.tasks.registry import task_names

COLORS = ui.METHOD_COLORS
MAX_AXIS = 10_000


def origin(policy: Policy, synthetic: set[str]) -> str:
    if not policy.source_run_id:
        return "default (paper-shaped)"
    tag = f" ({ui.SYNTHETIC})" if policy.source_run_id in synthetic else ""
    return f"run {policy.source_run_id}{tag}"


def evidence_text(e: dict) -> str:
    """The test that chose a band's method: the candidate's gain over the cheaper one, its interval, moved or not."""
    if e and e.get("buckets"):
        parts = [f"{b.get('min_items', '?')}..{b.get('max_items', '?')}: {evidence_text(b)}" for b in e["buckets"]]
        return "; ".join(parts)
    if not e or "candidate" not in e:
        return "-" if not e else "no costlier method measured"
    verb = "moved (significant)" if e.get("moved") else "stayed (not significant)"
    est = Estimate(e.get("gain"), e.get("ci_low"), e.get("ci_high"))
    gain = "-" if est.value is None else f"{est.value:+.1%}"
    return f"{verb}: {e['candidate']} vs {e['versus']} {gain} {ui.ci_text(est, pct=True)}"


def policy_frame(policies: list[Policy], synthetic: set[str]) -> pd.DataFrame:
    records = []
    for p in policies:
        for i, band in enumerate(p.bands):
            upper = p.bands[i + 1].min_items - 1 if i + 1 < len(p.bands) else None
            records.append(
                {
                    "task": "* (any task)" if p.task == DEFAULT_TASK else p.task,
                    "from items": band.min_items,
                    "to items": upper,
                    "method": band.method,
                    "measured quality": ", ".join(f"{m} {v:.4f}" for m, v in band.quality.items()) or "-",
                    "evidence": evidence_text(band.evidence),
                    "p": band.evidence.get("p_value"),
                    "p (Holm)": band.evidence.get("p_holm"),
                    "users": band.evidence.get("n_users"),
                    "source": origin(p, synthetic),
                    "calibrated at": p.created_at or "-",
                    "metric": p.metric or "-",
                    "tolerance": p.tolerance,
                    "alpha": p.alpha,
                }
            )
    return pd.DataFrame.from_records(records)


def band_figure(policies: list[Policy]) -> go.Figure:
    fig = go.Figure()
    seen: set[str] = set()
    for p in policies:
        label = "* (any task)" if p.task == DEFAULT_TASK else p.task
        for i, band in enumerate(p.bands):
            upper = p.bands[i + 1].min_items if i + 1 < len(p.bands) else MAX_AXIS
            fig.add_bar(
                y=[label],
                textposition="inside",
                insidetextanchor="start",
                x=[upper - band.min_items],
                base=[band.min_items],
                orientation="h",
                name=band.method,
                marker_color=COLORS.get(band.method),
                showlegend=band.method not in seen,
                text=[f"{band.method} from {band.min_items}"],
                hovertext=[f"{label}: {band.method} for {band.min_items}..{upper - 1} items"],
            )
            seen.add(band.method)
    fig.update_layout(
        title="Method by profile size",
        barmode="overlay",
        height=220 + 50 * len(policies),
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        margin={"t": 90},
    )
    fig.update_xaxes(type="log", title_text="profile size (items, log scale)", range=[0, 4])
    return fig


with ui.page("Router", "Which method the router picks from a user's data volume, per task"):
    if flash := st.session_state.pop("router_flash", None):
        st.success(flash, icon=":material/check_circle:")
    policies = data.policies()
    synthetic = data.synthetic_runs()
    if not any(p.source_run_id for p in policies):
        st.info(
            "No calibration yet: the router uses the default policy. Calibrate it from a run below.",
            icon=":material/info:",
        )
    if any(p.source_run_id in synthetic for p in policies):
        st.warning(f"A policy below was calibrated from a **{ui.SYNTHETIC}** run.", icon=":material/science:")

    st.subheader("Current thresholds")
    st.dataframe(policy_frame(policies, synthetic), hide_index=True, width="stretch")
    st.plotly_chart(band_figure(policies), width="stretch")

    st.subheader("What it picks")
    cols = st.columns(3)
    calibrated = [p.task for p in policies if p.task != DEFAULT_TASK]
    first = calibrated + [r["task"] for r in data.runs()]
    options = list(dict.fromkeys(first + task_names()))
    task = cols[0].selectbox("Task", options, key="router_task")
    n_items = cols[1].number_input("Profile size (items)", min_value=0, value=50, step=1, key="router_items")
    has_adapter = cols[2].checkbox("The user has a current adapter", value=True, key="router_adapter")
    decision = data.choose(task, int(n_items), has_adapter)
    st.metric(f"Method for {int(n_items)} items", decision.method)
    st.caption(decision.reason)

    st.subheader("Calibrate from a run")
    st.caption(
        "Per profile-size bucket of the run, on the task's primary metric (`personalize router calibrate`): the "
        "cheapest method, unless a costlier one's gain over it is significant (paired within-user test over the "
        "bucket's users, Holm-adjusted, at alpha) and above the tolerance. Buckets too small to ever be significant "
        "merge with a neighbour. The new thresholds apply to the run's task at once."
    )
    (chosen,) = ui.pick_runs("router_calibrate_run", label="Run to calibrate from")
    if chosen["state"] != "done":
        st.warning(
            f"Run {chosen['run_id']} is {chosen['state']}: calibrating from partial results.",
            icon=":material/hourglass_top:",
        )
    if chosen["synthetic"]:
        st.warning(
            f"Run {chosen['run_id']} is {ui.SYNTHETIC}: its thresholds reflect planted signals.",
            icon=":material/science:",
        )
    tolerance = st.number_input(
        "Tolerance (relative)",
        min_value=0.0,
        max_value=1.0,
        value=float(data.personalizer().settings.router.tolerance),
        step=0.005,
        format="%.3f",
        key="router_tolerance",
    )
    settings = data.personalizer().settings
    alpha = st.number_input(
        "Significance level (alpha)",
        min_value=0.001,
        max_value=0.5,
        value=float(settings.router.alpha),
        step=0.01,
        format="%.3f",
        key="router_alpha",
    )
    if st.button("Calibrate", type="primary", key="router_calibrate"):
        store = data.personalizer().store
        new = calibrate_from_run(store, chosen["run_id"], tolerance, alpha, settings.stats)
        data.clear()
        bands = ", ".join(f"{b.method} from {b.min_items}" for b in new.bands)
        st.session_state["router_flash"] = f"Calibrated {new.task} from run {new.source_run_id}: {bands}"
        st.rerun()
