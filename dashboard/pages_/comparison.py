"""Comparison: the paper-style table of a run (or two), relative gains over non-personalized, published numbers."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data, ui
from dashboard.published import PUBLISHED_AVERAGE_GAIN, SOURCE, published_for
from personalize.eval.metrics import LOWER_IS_BETTER, relative_gain
from personalize.eval.reports import MethodRow, RunReport


def paper_table(reports: list[RunReport]) -> pd.DataFrame:
    """Rows: run × task × metric; columns: each method's value, its gain over none, and the best method."""
    methods = ui.ordered_methods({r.method for rep in reports for r in rep.table})
    records = []
    for rep in reports:
        by_method = {r.method: r for r in rep.table}
        for metric in rep.metrics:
            rec: dict[str, Any] = {"run": ui.run_title(rep)} if len(reports) > 1 else {}
            rec |= {"task": rep.task, "metric": metric}
            values = {m: by_method[m].metrics.get(metric) if m in by_method else None for m in methods}
            rec.update(values)
            for m in methods:
                row = by_method.get(m)
                rec[f"{m} CI"] = ui.ci_text(row.intervals.get(metric)) if row else "-"
            for m in methods:
                row = by_method.get(m)
                if m != "none" and (row is None or not row.baseline):
                    c = row.vs_none.get(metric) if row else None
                    rec[f"gain {m}"] = ui.finite(row.gains.get(metric)) if row else None
                    rec[f"p {m} (Holm)"] = ui.p_text(c.p_holm, c.significant) if c else "-"
            rec["best"] = ui.best_method(values, metric)
            records.append(rec)
    return pd.DataFrame.from_records(records)


def mark_best(frame: pd.DataFrame, methods: list[str]):  # noqa: ANN201 - a pandas Styler
    def style(row: pd.Series) -> list[str]:
        return [
            "font-weight: bold; background-color: rgba(33, 195, 84, 0.25)" if c == row["best"] else ""
            for c in row.index
        ]

    fmt = {m: "{:.4f}" for m in methods} | {c: "{:+.2%}" for c in frame.columns if c.startswith("gain ")}
    return frame.style.apply(style, axis=1, subset=[*methods, "best"]).format(fmt, na_rep="-")


def published_frame(rep: RunReport) -> tuple[str, pd.DataFrame] | None:
    pub = published_for(rep.task)
    if pub is None:
        return None
    ours = {r.method: r for r in rep.table}
    records = []
    for metric in rep.metrics:
        base = pub.numbers.get("none", {}).get(metric)
        for method in ui.ordered_methods(set(ours) | set(pub.numbers)):
            value = pub.numbers.get(method, {}).get(metric)
            mine = ours.get(method)
            records.append(
                {
                    "metric": metric,
                    "method": method,
                    "ours": mine.metrics.get(metric) if mine else None,
                    "ours gain": ui.finite(mine.gains.get(metric)) if mine and method != "none" else None,
                    "published": value,
                    "published gain": (
                        ui.finite(relative_gain(value, base, metric))
                        if value is not None and base and method != "none"
                        else None
                    ),
                }
            )
    return pub.label, pd.DataFrame.from_records(records)


def quality_chart(rep: RunReport) -> go.Figure:
    """The primary metric of each model method with its 95% interval over users; baselines as reference lines."""
    metric = rep.metrics[0]
    rows = [r for r in rep.table if not r.baseline]
    values = [r.metrics.get(metric) for r in rows]
    fig = go.Figure()
    fig.add_bar(
        x=[r.method for r in rows],
        y=values,
        error_y=ui.error_bars(values, [r.intervals.get(metric) for r in rows]),
        marker_color=[ui.METHOD_COLORS.get(r.method) for r in rows],
        text=[_sig_mark(r, metric) for r in rows],
        textposition="outside",
        name="model methods",
    )
    for r in rep.table:
        if r.baseline:
            fig.add_hline(
                y=r.metrics.get(metric),
                line_dash="dot",
                line_color=ui.METHOD_COLORS.get(r.method, "#444"),
                annotation_text=f"{r.method} ({ui.NO_MODEL})",
                annotation_position="top right",
            )
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    title = f"{metric} with 95% intervals over users · {ui.run_title(rep)} (* significant vs none)"
    fig.update_layout(title=title, yaxis_title=f"{metric} ({better})", showlegend=False)
    return fig


def _sig_mark(row: MethodRow, metric: str) -> str:
    c = row.vs_none.get(metric)
    return "*" if c is not None and c.significant else ""


def gain_chart(reports: list[RunReport]) -> go.Figure:
    fig = go.Figure()
    for rep in reports:
        rows = [r for r in rep.table if r.method != "none" and not r.baseline]
        fig.add_bar(
            name=ui.run_title(rep),
            x=[r.method for r in rows],
            y=[ui.finite(r.average_gain) for r in rows],
            error_y=ui.error_bars([ui.finite(r.average_gain) for r in rows], [r.average_gain_ci for r in rows]),
            text=[ui.fmt_pct(r.average_gain) for r in rows],
        )
    methods = list(PUBLISHED_AVERAGE_GAIN)
    fig.add_bar(
        name="published: LaMP average over 7 datasets (FlanT5-XXL)",
        x=methods,
        y=[PUBLISHED_AVERAGE_GAIN[m] for m in methods],
        text=[ui.fmt_pct(PUBLISHED_AVERAGE_GAIN[m]) for m in methods],
        marker_pattern_shape="/",
        opacity=0.6,
    )
    title = "Average relative gain over non-personalized (ours: 95% paired intervals over users)"
    if any(r.synthetic for r in reports):
        title += f" ({ui.SYNTHETIC} data included)"
    fig.update_layout(
        title=title,
        barmode="group",
        yaxis_tickformat="+.0%",
        yaxis_title="relative gain",
        legend_orientation="h",
        legend_y=-0.2,
    )
    return fig


with ui.page("Comparison", "Every method on the same queries of the same users; relative gain over non-personalized"):
    chosen = ui.pick_runs("comparison_runs", max_runs=2)
    reports = [data.report(r["run_id"]) for r in chosen]
    for rep in reports:
        ui.report_banner(rep)
    if any(rep.partial for rep in reports):
        ui.refresh_button("comparison_refresh")

    cols = st.columns(len(reports) * 2)
    for i, rep in enumerate(reports):
        cols[2 * i].metric(f"users · {rep.task}", rep.n_users)
        cols[2 * i + 1].metric(f"scoring · {rep.task}", rep.scoring)

    st.subheader("Paper-style table")
    st.caption(
        "One row per task and metric; each method's value, its relative gain over `none` (sign flipped for "
        "MAE/RMSE), and the best method of the row, highlighted."
    )
    table = paper_table(reports)
    methods = ui.ordered_methods({r.method for rep in reports for r in rep.table})
    if table.empty:
        st.info("No method has answered the same queries yet.")
    else:
        st.dataframe(mark_best(table, methods), hide_index=True, width="stretch")

    st.plotly_chart(gain_chart(reports), width="stretch")

    for rep in reports:
        st.plotly_chart(quality_chart(rep), width="stretch")
        st.subheader(f"The paper's claims, checked · {ui.run_title(rep)}")
        st.caption(
            "Each published claim on this run's primary metric: holds or fails when the Holm-adjusted paired "
            "test is significant and the 95% interval agrees; otherwise not significant. Estimates are relative gains "
            "(Spearman's rho for the profile-size claim)."
        )
        if rep.claims:
            st.dataframe(
                ui.claims_frame(rep.claims),
                hide_index=True,
                width="stretch",
                column_config={
                    "estimate": st.column_config.NumberColumn(format="%.4f"),
                    "ci low": st.column_config.NumberColumn(format="%.4f"),
                    "ci high": st.column_config.NumberColumn(format="%.4f"),
                    "p": st.column_config.NumberColumn(format="%.4f"),
                    "p (Holm)": st.column_config.NumberColumn(format="%.4f"),
                },
            )
        else:
            st.info("No answers to check the claims on yet.")

    for rep in reports:
        st.subheader(f"Methods · {ui.run_title(rep)}")
        st.dataframe(
            ui.method_frame(rep.table, rep.metrics),
            hide_index=True,
            width="stretch",
            column_config=ui.metric_columns(rep.metrics),
        )
        pub = published_frame(rep)
        if pub is not None:
            label, frame = pub
            st.markdown(f"**Ours beside the {label}**")
            st.caption(SOURCE + ". Numbers from another model and dataset: compare directions, not values.")
            st.dataframe(
                frame,
                hide_index=True,
                width="stretch",
                column_config={
                    "ours": st.column_config.NumberColumn(format="%.4f"),
                    "published": st.column_config.NumberColumn(format="%.3f"),
                    "ours gain": st.column_config.NumberColumn(format="percent"),
                    "published gain": st.column_config.NumberColumn(format="percent"),
                },
            )
        else:
            st.caption(f"{rep.task} is not a LaMP task and stands in for none: no published numbers to show.")

    if len(reports) == 2 and reports[0].task == reports[1].task:
        a, b = reports
        st.subheader("Difference (second run − first run)")
        st.caption(
            "Paired over the users and queries both runs answered (`personalize eval compare`): the difference with "
            "its 95% bootstrap interval, and the share of identical answers."
        )
        if a.split == b.split:
            st.dataframe(data.run_differences(a.run_id, b.run_id), hide_index=True, width="stretch")
        else:
            st.caption(f"Different splits ({a.split}, {b.split}): other queries, so no pairing and no interval.")
            rows_a = {r.method: r for r in a.table}
            diff = [
                {"method": r.method} | {m: r.metrics.get(m, 0) - rows_a[r.method].metrics.get(m, 0) for m in a.metrics}
                for r in b.table
                if r.method in rows_a
            ]
            st.dataframe(pd.DataFrame.from_records(diff), hide_index=True, width="stretch")
