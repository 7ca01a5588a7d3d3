"""By data volume: each method per profile-size bucket, the router's thresholds on the same axis, the correlation."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from dashboard import data, ui
from personalize.eval.metrics import LOWER_IS_BETTER
from personalize.eval.reports import Estimate, RunReport
from personalize.serving.router import Policy

COLORS = ui.METHOD_COLORS


def bucket_x(lo: int, hi: int) -> float:
    return math.sqrt(max(lo, 1) * max(hi, 1))  # the middle of the bucket on the log axis


def draw_thresholds(fig: go.Figure, policy: Policy, rows: list[int]) -> None:
    origin = f"run {policy.source_run_id}" if policy.source_run_id else "default"
    for i, band in enumerate(policy.bands):
        for row in rows:
            if i > 0:
                fig.add_vline(x=band.min_items, line_dash="dash", line_color="#d62728", row=row, col=1)
        fig.add_annotation(
            x=math.log10(max(band.min_items, 1)),
            y=1.0,
            xref="x",
            yref="paper",
            text=f"router: {band.method} from {band.min_items}",
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            font={"color": "#d62728", "size": 11},
        )
    fig.add_annotation(
        x=1.0,
        y=1.08,
        xref="paper",
        yref="paper",
        text=f"router thresholds ({origin})",
        showarrow=False,
        xanchor="right",
    )


def bucket_figure(rep: RunReport, metric: str, as_gain: bool, policy: Policy) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    methods = ui.ordered_methods({r.method for b in rep.buckets for r in b.rows})
    xs = [bucket_x(b.min_items, b.max_items) for b in rep.buckets]
    for method in methods:
        if as_gain and method == "none":
            continue
        ys, hover, intervals = [], [], []
        baseline = False
        for b in rep.buckets:
            row = next((r for r in b.rows if r.method == method), None)
            baseline = baseline or bool(row and row.baseline)
            value, interval = None, None
            if row is not None and as_gain and not row.baseline:
                c = row.vs_none.get(metric)
                value, interval = row.gains.get(metric), (c.gain if c else None)
            elif row is not None and not as_gain:
                value, interval = row.metrics.get(metric), row.intervals.get(metric)
            ys.append(ui.finite(value))
            intervals.append(interval)
            hover.append(f"bucket {b.bucket}: {b.min_items}..{b.max_items} items, {b.n_users} users")
        if all(y is None for y in ys):
            continue
        fig.add_scatter(
            x=xs,
            y=ys,
            name=f"{method} ({ui.NO_MODEL})" if baseline else method,
            mode="lines+markers",
            line={"color": COLORS.get(method), "dash": "dot" if baseline else "solid"},
            error_y=None if baseline else ui.error_bars(ys, intervals),
            hovertext=hover,
            row=1,
            col=1,
        )
    # each bucket as a segment over its profile-size range, at the height of its user count
    seg_x: list[float | None] = []
    seg_y: list[int | None] = []
    for b in rep.buckets:
        seg_x += [max(b.min_items, 1), max(b.max_items, 1), None]
        seg_y += [b.n_users, b.n_users, None]
    fig.add_scatter(
        x=seg_x,
        y=seg_y,
        mode="lines+markers",
        line={"color": "#9e9ac8", "width": 6},
        name="users per bucket (over its size range)",
        hoverinfo="skip",
        row=2,
        col=1,
    )
    fig.add_scatter(
        x=xs,
        y=[b.n_users for b in rep.buckets],
        mode="text",
        text=[f"{b.n_users} users" for b in rep.buckets],
        textposition="top center",
        hovertext=[f"bucket {b.bucket}: {b.min_items}..{b.max_items} items" for b in rep.buckets],
        showlegend=False,
        row=2,
        col=1,
    )
    draw_thresholds(fig, policy, [1, 2])
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    ytitle = f"relative gain in {metric} over none" if as_gain else f"{metric} ({better})"
    title = f"{metric} by profile size · {ui.run_title(rep)}"
    fig.update_layout(title=title, legend_orientation="h", legend_y=-0.15, height=560)
    fig.update_xaxes(type="log", title_text="profile size (items, log scale)", row=2, col=1)
    fig.update_xaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text=ytitle, tickformat="+.0%" if as_gain else None, row=1, col=1)
    fig.update_yaxes(title_text="users", range=[0, max(b.n_users for b in rep.buckets) * 1.6], row=2, col=1)
    return fig


def bucket_frame(rep: RunReport, metric: str) -> pd.DataFrame:
    methods = ui.ordered_methods({r.method for b in rep.buckets for r in b.rows})
    records = []
    for b in rep.buckets:
        rows = {r.method: r for r in b.rows}
        rec = {"bucket": b.bucket, "min items": b.min_items, "max items": b.max_items, "users": b.n_users}
        rec |= {m: rows[m].metrics.get(metric) if m in rows else None for m in methods}
        rec |= {f"{m} CI": ui.ci_text(rows[m].intervals.get(metric)) if m in rows else "-" for m in methods}
        for m in methods:
            row = rows.get(m)
            if m == "none" or (row is not None and row.baseline):
                continue
            c = row.vs_none.get(metric) if row else None
            rec[f"gain {m}"] = ui.finite(row.gains.get(metric)) if row else None
            rec[f"p {m} (Holm)"] = ui.p_text(c.p_holm, c.significant) if c else "-"
        rec["best"] = ui.best_method({m: rec[m] for m in methods}, metric)
        rec["note"] = "; ".join(b.notes)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def correlation_frame(rep: RunReport) -> pd.DataFrame:
    records = []
    for method in ("rag", "peft", "rag+peft"):
        c = rep.correlation.get(method)
        if c:
            records.append(
                {
                    "method": method,
                    "users": c["n_users"],
                    "pearson": c["pearson"],
                    "pearson CI": ui.ci_text(Estimate(**c["pearson_ci"])),
                    "pearson p": c["pearson_p"],
                    "spearman": c["spearman"],
                    "spearman CI": ui.ci_text(Estimate(**c["spearman_ci"])),
                    "spearman p": c["spearman_p"],
                    "pearson (log size)": c["pearson_log_size"],
                }
            )
    return pd.DataFrame.from_records(records)


def correlation_figure(rep: RunReport, points: list[dict], policy: Policy) -> go.Figure:
    metric = rep.correlation.get("metric", rep.metrics[0])
    fig = go.Figure()
    for method in ("rag", "peft", "rag+peft"):
        pts = [p for p in points if method in p["gains"]]
        if not pts:
            continue
        c = rep.correlation.get(method) or {}
        rho = c.get("spearman")
        name = f"{method} (spearman {rho:+.2f})" if rho is not None else method
        fig.add_scatter(
            x=[p["profile_size"] for p in pts],
            y=[p["gains"][method] for p in pts],
            mode="markers",
            name=name,
            marker_color=COLORS.get(method),
            hovertext=[p["user"] for p in pts],
        )
    fig.add_hline(y=0, line_color="#999")
    for band in policy.bands[1:]:
        fig.add_vline(x=band.min_items, line_dash="dash", line_color="#d62728")
    title = f"Per-user gain over none in {metric} (absolute) vs profile size"
    if rep.synthetic:
        title += f" · {ui.SYNTHETIC}"
    fig.update_layout(title=title, legend_orientation="h", legend_y=-0.2, height=460)
    fig.update_xaxes(type="log", title_text="profile size (items, log scale)")
    fig.update_yaxes(title_text=f"gain in {metric} (sign flipped for lower-is-better)")
    return fig


with ui.page(
    "By data volume", "Does personalization pay more for users with more data? (profile-size quantile buckets)"
):
    controls = st.columns([3, 1, 1, 1])
    with controls[0]:
        (chosen,) = ui.pick_runs("volume_run")
    n_buckets = controls[1].slider("Buckets", 2, 8, 4, key="volume_buckets")
    rep = data.report(chosen["run_id"], n_buckets)
    metric = controls[2].selectbox("Metric", rep.metrics, key="volume_metric")
    as_gain = controls[3].radio("Show", ["value", "gain over none"], key="volume_show") == "gain over none"
    ui.report_banner(rep)
    if not rep.buckets:
        st.info("No answers yet to put in buckets.")
        st.stop()
    policy = data.policy(rep.task)
    st.plotly_chart(bucket_figure(rep, metric, as_gain, policy), width="stretch")
    origin = (
        f"calibrated from run `{policy.source_run_id}` at {policy.created_at}"
        if policy.source_run_id
        else "the default (paper-shaped) policy"
    )
    if policy.source_run_id and policy.source_run_id in data.synthetic_runs():
        origin += f" ({ui.SYNTHETIC} run)"
    st.caption(f"Dashed red lines: the router's thresholds for {policy.task}, {origin}.")
    buckets = bucket_frame(rep, metric)
    gain_format = {c: st.column_config.NumberColumn(format="percent") for c in buckets if c.startswith("gain")}
    st.dataframe(buckets, hide_index=True, width="stretch", column_config=gain_format)

    st.subheader("Correlation: profile size vs per-user gain")
    corr = correlation_frame(rep)
    if corr.empty:
        st.info("Needs `none` and at least one other method per user.")
    else:
        st.dataframe(corr, hide_index=True, width="stretch")
        points = data.per_user(rep.run_id, rep.task, rep.correlation.get("metric", rep.metrics[0]))
        st.plotly_chart(correlation_figure(rep, points, policy), width="stretch")
