"""Cost: training seconds, tokens and steps per user, adapter bytes, latency per method, against quality."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui
from personalize.eval.metrics import LOWER_IS_BETTER
from personalize.eval.reports import RunReport

COLORS = ui.METHOD_COLORS


def latency_frame(rep: RunReport) -> pd.DataFrame:
    metric = rep.metrics[0]
    rows = {r.method: r for r in rep.table}
    records = []
    for method in ui.ordered_methods(set(rep.cost.get("latency", {}))):
        lat = rep.cost["latency"][method]
        row = rows.get(method)
        records.append(
            {
                "method": method,
                "retrieval ms p50": lat["retrieval_ms_p50"],
                "generation ms p50": lat["generation_ms_p50"],
                "total ms p50": lat["total_ms_p50"],
                "kind": ui.NO_MODEL if row and row.baseline else "model",
                metric: row.metrics.get(metric) if row else None,
                f"{metric} CI": ui.ci_text(row.intervals.get(metric)) if row else "-",
                f"gain {metric}": ui.finite(row.gains.get(metric)) if row and not row.baseline else None,
            }
        )
    return pd.DataFrame.from_records(records)


def latency_figure(rep: RunReport, frame: pd.DataFrame) -> go.Figure:
    metric = rep.metrics[0]
    fig = go.Figure()
    rows = {r.method: r for r in rep.table}
    for rec in frame.to_dict("records"):
        row = rows.get(rec["method"])
        interval = row.intervals.get(metric) if row else None
        label = rec["method"] + (f" ({ui.NO_MODEL})" if row and row.baseline else "")
        fig.add_scatter(
            x=[rec["total ms p50"]],
            y=[rec[metric]],
            error_y=ui.error_bars([rec[metric]], [interval]),
            mode="markers+text",
            text=[label],
            textposition="top center",
            marker={"size": 14, "color": COLORS.get(rec["method"])},
            name=rec["method"],
        )
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    title = f"Quality against latency · {ui.run_title(rep)}"
    fig.update_layout(title=title, xaxis_title="latency per answer, p50 (ms)", yaxis_title=f"{metric} ({better})")
    return fig


def training_figure(rep: RunReport, adapters: pd.DataFrame) -> go.Figure:
    metric = rep.metrics[0]
    fig = go.Figure()
    has_gain = adapters["peft gain"].notna().any()
    fig.add_scatter(
        x=adapters["profile size"],
        y=adapters["train seconds"],
        mode="markers",
        hovertext=adapters["user"],
        marker={
            "size": 8 + 12 * adapters["MB"] / max(adapters["MB"].max(), 1e-9),
            "color": adapters["peft gain"] if has_gain else "#ff7f0e",
            "colorscale": "RdBu",
            "cmid": 0,
            "showscale": bool(has_gain),
            "colorbar": {"title": f"PEFT gain<br>in {metric}"},
        },
        name="adapters",
    )
    title = "Training seconds per user against profile size (colour: PEFT's gain over none; size: adapter MB)"
    if rep.synthetic:
        title += f" · {ui.SYNTHETIC}"
    fig.update_layout(title=title, xaxis_title="profile size (items, log scale)", yaxis_title="training seconds")
    fig.update_xaxes(type="log")
    return fig


def show_task_adapter(rep: RunReport, adapters: list[dict[str, Any]]) -> None:
    """Which task adapter the run's user adapters were trained on, and any that were trained on another base."""
    ref = ui.task_adapter_of(rep.config)
    st.markdown(f"**Task adapter the user adapters were trained on:** {ref or 'none (zero-shot base)'}")
    other = [a["user"] for a in adapters if a["has_config"] and a["task_adapter"] != ref]
    if other:
        st.warning(
            f"{len(other)} of these adapters were trained on another base ({', '.join(other[:5])}"
            f"{', ...' if len(other) > 5 else ''}): likely retrained since the run, so their cost is not the run's.",
            icon=":material/warning:",
        )
    if any(not a["has_config"] for a in adapters):
        st.caption("`tokens` and `steps` are empty for adapters trained before they were recorded.")


with ui.page("Cost", "What each method costs (training, storage, latency) against what it gains"):
    (chosen,) = ui.pick_runs("cost_run")
    rep = data.report(chosen["run_id"])
    ui.report_banner(rep)
    training = rep.cost.get("training") or {}
    m = st.columns(4)
    m[0].metric("Adapters", training.get("adapters", 0))
    m[1].metric("Training s / user (mean)", f"{training['train_seconds_per_user_mean']:.1f}" if training else "-")
    m[2].metric("Training s / user (max)", f"{training['train_seconds_per_user_max']:.1f}" if training else "-")
    m[3].metric("Adapter MB (mean)", f"{training['adapter_bytes_mean'] / 1e6:.2f}" if training else "-")
    per_method = training.get("by_method", {})
    if len(per_method) > 1:  # the PEFT family side by side: what each adapter method costs to train and store
        st.subheader("Training per adapter method")
        st.dataframe(
            [
                {
                    "adapter method": method,
                    "adapters": cost["adapters"],
                    "training s / user (mean)": round(cost["train_seconds_per_user_mean"], 1),
                    "training s / user (max)": round(cost["train_seconds_per_user_max"], 1),
                    "adapter MB (mean)": round(cost["adapter_bytes_mean"] / 1e6, 3),
                    "trainable parameters": cost.get("trainable_params"),
                    "trained in": ", ".join(cost.get("compute_precision") or {}) or None,  # fp32 or bf16
                }
                for method, cost in per_method.items()
            ],
            hide_index=True,
            width="stretch",
        )

    st.subheader("Latency per method")
    lat = latency_frame(rep)
    if lat.empty:
        st.info("No answers yet.")
    else:
        metric = rep.metrics[0]
        st.dataframe(
            lat,
            hide_index=True,
            width="stretch",
            column_config={
                "retrieval ms p50": st.column_config.NumberColumn(format="%.1f"),
                "generation ms p50": st.column_config.NumberColumn(format="%.1f"),
                "total ms p50": st.column_config.NumberColumn(format="%.1f"),
                metric: st.column_config.NumberColumn(format="%.4f"),
                f"gain {metric}": st.column_config.NumberColumn(format="percent"),
            },
        )
        st.plotly_chart(latency_figure(rep, lat), width="stretch")

    st.subheader("Training per user")
    points = data.per_user(rep.run_id, rep.task, rep.metrics[0])
    adapters = data.run_adapters(rep.task, rep.split, [p["user"] for p in points])
    if not adapters:
        st.info("No adapters for this run's users (the run has no PEFT methods, or training has not finished).")
    else:
        by_user = {p["user"]: p for p in points}
        frame = pd.DataFrame.from_records(
            [
                {
                    "user": a["user"],
                    "profile size": by_user[a["user"]]["profile_size"],
                    "adapter version": a["version"],
                    "train seconds": a["train_seconds"],
                    "MB": a["size_bytes"] / 1e6,
                    "final loss": a["final_loss"],
                    "tokens": a["tokens"],
                    "steps": a["steps"],
                    "peft gain": by_user[a["user"]]["gains"].get("peft"),
                }
                for a in adapters
            ]
        )
        show_task_adapter(rep, adapters)
        st.plotly_chart(training_figure(rep, frame), width="stretch")
        st.dataframe(
            frame,
            hide_index=True,
            width="stretch",
            column_config={
                "tokens": st.column_config.NumberColumn(format="%d"),
                "steps": st.column_config.NumberColumn(format="%d"),
            },
        )
        st.caption(
            f"`peft gain`: absolute gain in {rep.metrics[0]} over none for that user (sign flipped for MAE/RMSE)."
        )
