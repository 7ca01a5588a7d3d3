"""What every page shares: the page frame with clear errors, the run picker, the empty and partial states."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import data
from personalize.data.store import redact_url
from personalize.errors import (
    BrokerUnavailableError,
    DatabaseUnavailableError,
    ModelLoadError,
    PersonalizeError,
)
from personalize.eval.metrics import LOWER_IS_BETTER
from personalize.eval.reports import Claim, Estimate, MethodRow, RunReport
from personalize.jobs.store import JobInfo
from personalize.methods import METHODS, ordered

SYNTHETIC = "SYNTHETIC"
NO_MODEL = "no model"
METHOD_COLORS = {name: m.colour for name, m in METHODS.items()}  # the registry's (baselines included)
VERDICT_LABELS = {
    "holds": "HOLDS",
    "fails": "FAILS",
    "not significant": "not significant",
    "not measured": "not measured",
}

LOAD_DATA_HELP = """
**Load data and start a run.** From the project folder (same `PERSONALIZE_*` settings as this dashboard):

```bash
personalize demo                                     # the built-in sample users, and a first answer
personalize users import items.jsonl                 # your own users: {"user_id", "id", "text", ...}
personalize eval run --task movielens-rating --data ../shared/data/ml-latest-small --users 20
personalize eval run --task movielens-rating --synthetic 20 --train-via inline   # SYNTHETIC, for a quick look
```

Runs appear here as soon as they start; a run in progress shows partial results.
"""

BASE_HELP = (
    "Every personalization method (none, rag, peft, rag+peft) runs on the base the run was made on: the model "
    "with the task's shared adapter merged in, or the plain model (zero-shot). The zero-shot method is always the "
    "plain model."
)


@contextmanager
def page(title: str, caption: str | None = None) -> Iterator[None]:
    """The page frame: its title, and library errors shown as one clear message instead of a traceback."""
    st.title(title)
    if caption:
        st.caption(caption)
    with guard():
        yield


@contextmanager
def guard() -> Iterator[None]:
    """Library errors as one clear message (also inside fragments, which rerun outside the page frame)."""
    try:
        yield
    except DatabaseUnavailableError as exc:
        url = redact_url(data.personalizer().settings.resolved_database_url)
        st.error(
            f"**The database is unreachable.** {exc}\n\n"
            f"The dashboard reads `{url}` (set by `PERSONALIZE_DATABASE_URL`, or SQLite under `PERSONALIZE_HOME`). "
            "Start the database or fix the URL, then reload this page.",
            icon=":material/error:",
        )
    except BrokerUnavailableError as exc:
        st.error(f"**The broker is unreachable.** {exc}", icon=":material/error:")
    except ModelLoadError as exc:
        st.error(f"**The model could not be loaded.** {exc}", icon=":material/error:")
    except PersonalizeError as exc:
        st.error(str(exc), icon=":material/warning:")


def fmt_pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.2%}"


def finite(value: float | None) -> float | None:
    """The value, or None when missing or not finite (a gain over a zero baseline); never -0.0."""
    return value + 0.0 if value is not None and math.isfinite(value) else None


def run_label(run: dict[str, Any]) -> str:
    parts = [run["run_id"], f"{run['task']}/{run['split']}"]
    if run["state"] != "done":
        parts.append(f"{run['state']} {run['progress']:.0%}")
    parts.append(f"{run['results']} answers")
    if run["synthetic"]:
        parts.append(SYNTHETIC)
    return " · ".join(parts)


def show_load_data_help() -> None:
    st.info("No evaluation runs in this database yet.", icon=":material/info:")
    st.markdown(LOAD_DATA_HELP)


def pick_runs(key: str, max_runs: int = 1, label: str = "Run") -> list[dict[str, Any]]:
    """A run picker over runs that have answers (newest first); shows how to start one when there are none."""
    runs = data.runs()
    usable = [r for r in runs if r["results"]]
    if not usable:
        if runs:
            st.info(
                "Runs exist but none has answers yet: "
                + ", ".join(run_label(r) for r in runs)
                + ". This page fills in as the first answers are stored.",
                icon=":material/hourglass_top:",
            )
        else:
            show_load_data_help()
        st.stop()
    labels = {r["run_id"]: run_label(r) for r in usable}
    done = [r["run_id"] for r in usable if r["state"] == "done"]
    default = done[0] if done else usable[0]["run_id"]
    if max_runs == 1:
        chosen = [st.selectbox(label, list(labels), index=list(labels).index(default), format_func=labels.get, key=key)]
    else:
        chosen = st.multiselect(
            f"{label}s (one, or two to compare)",
            list(labels),
            default=[default],
            format_func=labels.get,
            max_selections=max_runs,
            key=key,
        )
        if not chosen:
            st.info("Pick a run.")
            st.stop()
    by_id = {r["run_id"]: r for r in usable}
    return [by_id[c] for c in chosen]


def task_adapter_of(config: dict[str, Any]) -> str | None:
    """The ref of the task adapter a run's methods ran on; None for a zero-shot run and for runs from before task
    adapters (their config has neither ``base`` nor ``task_adapter``)."""
    return config.get("task_adapter") or None


def base_label(config: dict[str, Any]) -> str:
    """What a run's methods ran on: ``base: task adapter REF``, or ``base: zero-shot`` (the plain base model)."""
    ref = task_adapter_of(config)
    if ref:
        return f"base: task adapter {ref}"
    if config.get("base") == "task":
        return "base: zero-shot (no task adapter when it ran)"
    return "base: zero-shot"


def report_banner(report: RunReport) -> None:
    """SYNTHETIC and partial results are labelled wherever a run is shown, and the base its methods ran on."""
    st.caption(f"Run `{report.run_id}` · {base_label(report.config)}", help=BASE_HELP)
    if report.synthetic:
        st.warning(
            f"**{SYNTHETIC}** run `{report.run_id}`: planted per-user signals, not a real benchmark.",
            icon=":material/science:",
        )
    if report.partial:
        st.info(
            f"**Partial results**: run `{report.run_id}` is {report.state} ({report.progress:.0%}). Methods are "
            "compared on the queries every method has answered so far.",
            icon=":material/hourglass_top:",
        )
    for note in report.notes:
        if not note.startswith(("SYNTHETIC", "run is")):
            st.caption(note)


def run_title(report: RunReport) -> str:
    tags = [f"{report.task}/{report.split}", base_label(report.config)]
    if report.synthetic:
        tags.append(SYNTHETIC)
    if report.partial:
        tags.append(f"partial, {report.progress:.0%}")
    return f"{report.run_id} ({', '.join(tags)})"


def ci_text(e: Estimate | None, pct: bool = False) -> str:
    """``[low, high]`` of an interval, or '-' when there is none (too few users)."""
    if e is None or e.ci_low is None or e.ci_high is None:
        return "-"
    return f"[{e.ci_low:+.1%}, {e.ci_high:+.1%}]" if pct else f"[{e.ci_low:.4f}, {e.ci_high:.4f}]"


def p_text(p: float | None, significant: bool = False) -> str:
    return "-" if p is None else f"{p:.3g}" + (" *" if significant else "")


def method_frame(rows: list[MethodRow], metrics: list[str]) -> pd.DataFrame:
    """The report's method table as a frame: kind, values with 95% intervals over users, gains over none with
    their intervals and Holm-adjusted p-values (* significant), average gain."""
    records = []
    for r in rows:
        rec: dict[str, Any] = {"method": r.method, "kind": NO_MODEL if r.baseline else "model", "queries": r.n_queries}
        for m in metrics:
            e = r.intervals.get(m)
            rec[m] = r.metrics.get(m)
            rec[f"{m} ci low"] = e.ci_low if e else None
            rec[f"{m} ci high"] = e.ci_high if e else None
        for m in metrics:
            c = r.vs_none.get(m)
            rec[f"gain {m}"] = finite(r.gains.get(m)) if not r.baseline else None
            rec[f"gain {m} CI"] = ci_text(c.gain, pct=True) if c else "-"
            rec[f"p {m} (Holm)"] = p_text(c.p_holm, c.significant) if c else "-"
        rec["avg gain"] = finite(r.average_gain) if not r.baseline else None
        rec["avg gain CI"] = ci_text(r.average_gain_ci, pct=True)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def metric_columns(metrics: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for m in metrics:
        config[m] = st.column_config.NumberColumn(m, format="%.4f")
        config[f"{m} ci low"] = st.column_config.NumberColumn(f"{m} ci low", format="%.4f")
        config[f"{m} ci high"] = st.column_config.NumberColumn(f"{m} ci high", format="%.4f")
        config[f"gain {m}"] = st.column_config.NumberColumn(f"gain {m}", format="percent")
    config["avg gain"] = st.column_config.NumberColumn("avg gain", format="percent")
    return config


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    """The paper's claims as checked on a run: verdict, the estimate that decides it, its interval and p-values."""
    return pd.DataFrame.from_records(
        [
            {
                "claim": c.claim,
                "verdict": VERDICT_LABELS.get(c.verdict, c.verdict),
                "metric": c.metric,
                "estimate": c.estimate.value,
                "ci low": c.estimate.ci_low,
                "ci high": c.estimate.ci_high,
                "p": c.p_value,
                "p (Holm)": c.p_holm,
                "detail": c.detail,
            }
            for c in claims
        ]
    )


def error_bars(values: list[float | None], estimates: list[Estimate | None]) -> dict[str, Any]:
    """Plotly's asymmetric ``error_y`` from intervals (no bar where there is no interval)."""
    plus, minus = [], []
    for v, e in zip(values, estimates, strict=True):
        ok = v is not None and e is not None and e.ci_low is not None and e.ci_high is not None
        plus.append(e.ci_high - v if ok else None)
        minus.append(v - e.ci_low if ok else None)
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "visible": True}


def best_method(values: dict[str, float | None], metric: str) -> str | None:
    present = {m: v for m, v in values.items() if v is not None and math.isfinite(v)}
    if not present:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(present, key=present.get)


def ordered_methods(methods: set[str] | list[str]) -> list[str]:
    return ordered(methods)


def refresh_button(key: str) -> None:
    if st.button("Refresh", key=key, help="Read runs, jobs and users again now"):
        data.clear()


def jobs_frame(jobs: list[JobInfo]) -> pd.DataFrame:
    """Training jobs (``personalize jobs``) as a frame."""
    return pd.DataFrame.from_records(
        [
            {
                "job": j.id,
                "user": j.user_id,
                "state": j.state,
                "progress": j.progress,
                "loss": j.loss,
                "attempts": j.attempts,
                "data version": j.data_version,
                "worker": j.worker,
                "created": j.created_at,
                "started": j.started_at,
                "finished": j.finished_at,
                "error": j.error,
            }
            for j in jobs
        ]
    )


PROGRESS_COLUMN = st.column_config.ProgressColumn("progress", min_value=0, max_value=1, format="percent")
