"""The dashboard's pages under Streamlit's AppTest, against a seeded database: the tables and metrics each page shows
are the library's (``build_report``, ``Router``, ``Personalizer``), and empty, unreachable, partial and SYNTHETIC
states read as such. No adapter is trained and the real model is never loaded (the prompt box uses the tiny model)."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select

from personalize import Personalizer, Settings
from personalize.adapters.task_adapters import TaskAdapterSource
from personalize.data.naming import eval_user_id
from personalize.data.schema import Adapter, EvalResult, EvalRun, TrainingJob, User
from personalize.eval.config import EvalConfig
from personalize.eval.reports import build_report
from personalize.jobs.task_adapter_jobs import train_now

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_task_adapters import TINY_TASK  # noqa: E402

from dashboard import ui  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TIMEOUT = 120  # the first run of each page imports plotly and pandas on a busy machine

REAL = "movielens-rating-test-real"
SYNTH = "movielens-rating-dev-synthetic"
RUNNING = "reuters-lead-test-running"
FAILED = "reuters-authorship-test-failed"
FAILED_ERROR = "PersonalizeError: 2 adapter(s) failed to train: u1: disk full"
METHODS = ("none", "rag", "peft", "rag+peft")
BASELINE = "user-mean"  # the REAL run also carries a no-model baseline
SIZES = (5, 8, 12, 20, 30, 45, 60, 90, 120, 200, 300, 500)
T0 = datetime(2025, 1, 1, 12, 0, 0)


def _rating_prediction(gold: int, method: str, size: int, q: int) -> str:
    """Deterministic predictions shaped like the paper: RAG helps everyone, PEFT helps more with more data."""
    error = {"none": 2, "rag": 1, "peft": 2 if size < 60 else 0, "rag+peft": 1 if size < 60 else 0}[method]
    if (q + size) % 3 == 0 and method != "none":
        error += 1
    value = gold + error if gold + error <= 5 else gold - error
    return str(min(5, max(1, value)))


def _timings(method: str, size: int) -> dict:
    retrieval = 0.004 if "rag" in method else 0.0
    generation = 0.08 + (0.02 if "peft" in method else 0.0)
    return {"retrieval_s": retrieval, "prompt_s": 0.001, "generation_s": generation, "total_s": retrieval + generation}


def _config(task: str, split: str, synthetic: bool = False, methods: tuple[str, ...] = METHODS) -> dict:
    return EvalConfig(
        task=task,
        split=split,
        source="SYNTHETIC" if synthetic else "/data/seeded",
        synthetic=synthetic,
        methods=list(methods),
        model="tiny",
    ).model_dump()


def seed_home(home: Path, model: str) -> None:
    """Users with items (add_items), four runs (done, SYNTHETIC, running, failed), adapters and training jobs."""
    settings = Settings(home=home, model=model, auto_train=False, retriever="bm25", _env_file=None)
    with Personalizer(settings) as p:
        scores = ["5", "4", "1", "5", "2", "4", "5", "3"]
        p.add_items(
            "alice",
            [
                {"id": f"a{i}", "text": f"Space Film {i} (Sci-Fi, Action)", "output": scores[i % 8]}
                | {"task": "movielens-rating", "timestamp": f"2024-01-{i + 1:02d}"}
                for i in range(12)
            ],
        )
        p.add_items("bob", [{"id": "b1", "text": "Notting Hill (1999) (Comedy, Romance)", "output": "5"}])
        p.add_items("dave", [{"id": "d1", "text": "Alien (1979) (Horror, Sci-Fi)", "output": "5"}])
        p.add_user("carol-no-items")

        with p.store.session() as s:
            s.add_all(
                [
                    _run(REAL, "movielens-rating", "test", 2, "done", 1.0),
                    _run(SYNTH, "movielens-rating", "dev", 1, "done", 1.0, synthetic=True),
                    _run(RUNNING, "reuters-lead", "test", 3, "running", 0.4),
                    _run(FAILED, "reuters-authorship", "test", 4, "failed", 0.1, error=FAILED_ERROR),
                ]
            )
        with p.store.session() as s:
            for u, size in enumerate(SIZES):
                user = f"u{u:02d}"
                for q in range(3):
                    gold = 1 + (u * 3 + q) % 5
                    for method in METHODS:
                        s.add(
                            EvalResult(
                                run_id=REAL,
                                user_external_id=user,
                                query_id=f"{user}-q{q}",
                                method=method,
                                profile_size=size,
                                prediction=_rating_prediction(gold, method, size, q),
                                gold=str(gold),
                                timings=_timings(method, size),
                            )
                        )
                    s.add(
                        EvalResult(
                            run_id=REAL,
                            user_external_id=user,
                            query_id=f"{user}-q{q}",
                            method=BASELINE,
                            profile_size=size,
                            prediction=str(gold if q else min(5, gold + 1)),
                            gold=str(gold),
                            timings={"retrieval_s": 0.0, "total_s": 0.0001, "decoder": "no model"},
                        )
                    )
            for u, size in enumerate((10, 40, 160, 640)):
                user = f"synth-{u:03d}"
                for q in range(3):
                    gold = 1 + (u + q) % 5
                    for method in METHODS:
                        s.add(
                            EvalResult(
                                run_id=SYNTH,
                                user_external_id=user,
                                query_id=f"{user}-q{q}",
                                method=method,
                                profile_size=size,
                                prediction=_rating_prediction(gold, method, size, q + 1),
                                gold=str(gold),
                                timings=_timings(method, size),
                            )
                        )
            heads = ["Oil prices rise on supply fears", "Bank shares fall after report", "Airline posts record profit"]
            for u in range(3):
                for q in range(2):
                    gold = heads[(u + q) % 3]
                    done = METHODS if q == 0 else ("none", "rag")  # the second query is only half answered
                    for method in done:
                        words = gold.split()
                        prediction = " ".join(words[: 2 + METHODS.index(method)]) if method != "none" else "News today"
                        s.add(
                            EvalResult(
                                run_id=RUNNING,
                                user_external_id=f"author{u}",
                                query_id=f"author{u}-q{q}",
                                method=method,
                                profile_size=50,
                                prediction=prediction,
                                gold=gold,
                                timings=_timings(method, 50),
                            )
                        )
        # eval users exist as users (the runner ingests them); their adapters and training history
        for u in range(len(SIZES)):
            p.add_user(eval_user_id("movielens-rating", "test", f"u{u:02d}"))
        for u in range(4):
            p.add_user(eval_user_id("movielens-rating", "dev", f"synth-{u:03d}"))
        with p.store.session() as s:
            for u, size in enumerate(SIZES):
                uid = eval_user_id("movielens-rating", "test", f"u{u:02d}")
                pk = s.scalar(select(User.id).where(User.external_id == uid))
                adapter = Adapter(
                    user_pk=pk,
                    version=1,
                    path=str(home / "adapters" / f"u{u:02d}" / "v1"),
                    base_model=model,
                    data_version=1,
                    n_items=size,
                    train_seconds=2.0 + size * 0.05,
                    final_loss=1.5 - math.log10(size) / 3,
                    size_bytes=3_700_000,
                    created_at=T0,
                )
                s.add(adapter)
                s.flush()
                s.add(
                    TrainingJob(
                        user_pk=pk,
                        state="done",
                        data_version=1,
                        progress=1.0,
                        loss=adapter.final_loss,
                        attempts=1,
                        worker="host:1",
                        adapter_id=adapter.id,
                        created_at=T0,
                        finished_at=T0 + timedelta(seconds=adapter.train_seconds),
                    )
                )
            alice = s.scalar(select(User.id).where(User.external_id == "alice"))
            bob = s.scalar(select(User.id).where(User.external_id == "bob"))
            s.add_all(
                [
                    TrainingJob(user_pk=alice, state="failed", data_version=1, attempts=3, error="OSError: disk full"),
                    TrainingJob(
                        user_pk=alice, state="running", data_version=1, progress=0.5, loss=1.2, worker="host:2"
                    ),
                    TrainingJob(user_pk=bob, state="queued", data_version=1),
                ]
            )


def _run(
    run_id: str, task: str, split: str, hours: int, state: str, progress: float, synthetic: bool = False, error=None
) -> EvalRun:
    """A run row created ``hours`` after T0 (newer runs list first)."""
    return EvalRun(
        id=run_id,
        task=task,
        split=split,
        config=_config(task, split, synthetic),
        state=state,
        progress=progress,
        error=error,
        created_at=T0 + timedelta(hours=hours),
    )


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    home = tmp_path_factory.mktemp("dashboard") / "home"
    seed_home(home, str(tiny_model_dir))
    return home


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: Path, model: Path | str, **extra: str) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("PERSONALIZE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(model))
    monkeypatch.setenv("PERSONALIZE_RETRIEVER", "bm25")
    for key, value in extra.items():
        monkeypatch.setenv(f"PERSONALIZE_{key.upper()}", value)


@pytest.fixture
def app(seeded: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _env(monkeypatch, tmp_path, seeded, tiny_model_dir)
    return open_page


def open_page(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    if page:
        at.switch_page(f"pages_/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success") for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


def frame_with(at: AppTest, column: str):
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column; tables: {[list(d.value.columns) for d in at.dataframe]}")


# -- Comparison --------------------------------------------------------------------------------------------------


def test_comparison_shows_the_paper_table_of_the_newest_done_run(app, seeded):
    at = app()
    assert at.title[0].value == "Comparison"
    report = build_report(Personalizer(Settings(home=seeded, _env_file=None)).store, REAL)
    table = frame_with(at, "best")
    assert list(table["metric"]) == ["mae", "rmse"]
    by_method = {r.method: r for r in report.table}
    for i, metric in enumerate(report.metrics):
        for method in METHODS:
            assert table[method][i] == pytest.approx(by_method[method].metrics[metric])
        assert table[f"gain {method}"][i] == pytest.approx(by_method[method].gains[metric])
        best = min([*METHODS, BASELINE], key=lambda m: by_method[m].metrics[metric])  # MAE/RMSE: lower is better
        assert table["best"][i] == best
    methods = frame_with(at, "avg gain")
    assert list(methods["method"]) == [*METHODS, BASELINE]
    assert list(methods["queries"]) == [36] * 5
    assert list(methods["kind"]) == ["model"] * 4 + ["no model"]
    assert methods["avg gain"][3] == pytest.approx(by_method["rag+peft"].average_gain)
    assert "SYNTHETIC" not in texts(at)


def test_comparison_shows_published_lamp3_beside_movielens_labelled_as_stand_in(app):
    at = app()
    published = frame_with(at, "published")
    none_mae = published[(published["metric"] == "mae") & (published["method"] == "none")]
    assert none_mae["published"].iloc[0] == pytest.approx(0.308)
    peft_mae = published[(published["metric"] == "mae") & (published["method"] == "peft")]
    assert peft_mae["published gain"].iloc[0] == pytest.approx(-(0.301 - 0.308) / 0.308)
    assert "our task stands in for LaMP-3" in texts(at)


def test_comparison_of_two_runs_labels_the_synthetic_one_and_shows_the_difference(app):
    at = app()
    at.multiselect(key="comparison_runs").set_value([REAL, SYNTH]).run()
    assert not at.exception
    assert any("SYNTHETIC" in w.value and SYNTH in w.value for w in at.warning)
    table = frame_with(at, "best")
    assert len(table) == 4  # two runs × (mae, rmse)
    assert any("SYNTHETIC" in run for run in table["run"])
    assert "Difference (second run − first run)" in [h.value for h in at.subheader]


def test_a_run_in_progress_shows_partial_results_marked_as_such(app):
    at = app()
    at.multiselect(key="comparison_runs").set_value([RUNNING]).run()
    assert not at.exception
    assert any("Partial results" in i.value and "40%" in i.value for i in at.info)
    methods = frame_with(at, "avg gain")
    # compared on the queries every method answered: one query per author
    assert list(methods["queries"]) == [3, 3, 3, 3]
    assert "stands in for LaMP-4" in texts(at)


def test_comparison_shows_intervals_significance_claims_and_baselines_as_the_library_computes_them(app, seeded):
    at = app()
    report = build_report(Personalizer(Settings(home=seeded, _env_file=None)).store, REAL)
    methods = frame_with(at, "mae ci low")
    for i, method in enumerate([*METHODS, BASELINE]):
        row = report.row(method)
        assert methods["mae ci low"][i] == pytest.approx(row.intervals["mae"].ci_low)
        assert methods["mae ci high"][i] == pytest.approx(row.intervals["mae"].ci_high)
        assert methods["mae ci low"][i] <= methods["mae"][i] <= methods["mae ci high"][i]
    rag = report.row("rag").vs_none["mae"]
    shown = methods["p mae (Holm)"][1]
    assert shown.startswith(f"{rag.p_holm:.3g}") and shown.endswith("*") == rag.significant
    paper = frame_with(at, "best")
    assert paper[f"{BASELINE} CI"][0] == f"[{report.row(BASELINE).intervals['mae'].ci_low:.4f}, " + (
        f"{report.row(BASELINE).intervals['mae'].ci_high:.4f}]"
    )
    claims = frame_with(at, "verdict")
    assert list(claims["claim"]) == [c.claim for c in report.claims]
    for verdict, claim in zip(claims["verdict"], report.claims, strict=True):
        assert claim.verdict == verdict.lower()
    assert claims["estimate"][0] == pytest.approx(report.claims[0].estimate.value)
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    quality = next(c for c in charts if "95% intervals" in c)
    assert '"arrayminus"' in quality and f"{BASELINE} (no model)" in quality


# -- By data volume ----------------------------------------------------------------------------------------------


def test_volume_page_shows_buckets_with_user_counts_thresholds_and_correlation(app, seeded):
    at = app("volume")
    assert at.title[0].value == "By data volume"
    report = build_report(Personalizer(Settings(home=seeded, _env_file=None)).store, REAL, 4)
    buckets = frame_with(at, "min items")
    assert list(buckets["users"]) == [b.n_users for b in report.buckets]
    assert sum(buckets["users"]) == len(SIZES)
    assert list(buckets["min items"]) == [b.min_items for b in report.buckets]
    first = {r.method: r for r in report.buckets[0].rows}
    assert buckets["peft"][0] == pytest.approx(first["peft"].metrics["mae"])
    assert "router's thresholds" in texts(at) and "default (paper-shaped) policy" in texts(at)
    corr = frame_with(at, "spearman")
    assert list(corr["method"]) == ["rag", "peft", "rag+peft"]
    assert corr["spearman"][1] == pytest.approx(report.correlation["peft"]["spearman"])
    ci = report.correlation["peft"]["spearman_ci"]
    assert corr["spearman CI"][1] == f"[{ci['ci_low']:.4f}, {ci['ci_high']:.4f}]"
    assert corr["spearman p"][1] == pytest.approx(report.correlation["peft"]["spearman_p"])
    assert all("too few users for an interval" in n for n in buckets["note"])  # 3 users per bucket
    assert set(buckets["peft CI"]) == {"-"}
    assert len(at.get("plotly_chart")) == 2

    at.slider(key="volume_buckets").set_value(2).run()
    assert len(frame_with(at, "min items")) == 2


# -- Router ------------------------------------------------------------------------------------------------------


def test_router_page_shows_thresholds_and_the_method_for_a_profile_size(app):
    at = app("router")
    assert at.title[0].value == "Router"
    bands = frame_with(at, "from items")
    assert list(bands["method"]) == ["rag", "rag+peft"]
    assert list(bands["from items"]) == [1, 100]
    assert bands["source"][0].startswith("default")
    at.number_input(key="router_items").set_value(150).run()
    assert at.metric[0].value == "rag+peft"
    at.checkbox(key="router_adapter").uncheck().run()
    assert at.metric[0].value == "rag"
    assert "needs an adapter" in texts(at)
    at.number_input(key="router_items").set_value(20).run()
    assert at.metric[0].value == "rag"


def test_calibrate_button_sets_thresholds_from_the_chosen_run(
    seeded, tiny_model_dir, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    home = tmp_path / "home"
    shutil.copytree(seeded, home)
    _env(monkeypatch, tmp_path, home, tiny_model_dir)
    at = open_page("router")
    at.selectbox(key="router_calibrate_run").set_value(SYNTH).run()
    assert any("SYNTHETIC" in w.value for w in at.warning)
    at.button(key="router_calibrate").click().run()
    assert not at.exception
    assert any(f"from run {SYNTH}" in s.value for s in at.success)
    bands = frame_with(at, "from items")
    assert set(bands["task"]) == {"movielens-rating"}
    assert all(f"run {SYNTH} (SYNTHETIC)" == s for s in bands["source"])
    assert "evidence" in bands.columns and "p (Holm)" in bands.columns
    assert any("calibrated from a **SYNTHETIC** run" in w.value for w in at.warning)


# -- Users -------------------------------------------------------------------------------------------------------


def test_users_page_searches_and_shows_items_adapters_and_history(app):
    at = app("users")
    assert at.title[0].value == "Users"
    at.text_input(key="users_search").input("alice").run()
    users = frame_with(at, "data version")
    assert list(users["user"]) == ["alice"]
    assert users["items"][0] == 12
    assert at.metric[0].value == "12"
    items = frame_with(at, "output")
    assert len(items) == 12 and items["id"][0] == "a11"  # newest first
    jobs = frame_with(at, "attempts")
    assert set(jobs["state"]) == {"failed", "running"}
    assert "OSError: disk full" in set(jobs["error"].dropna())

    at.text_input(key="users_search").input("eval/movielens-rating/test/u11").run()
    adapters = frame_with(at, "train s")
    assert adapters["items"][0] == 500 and adapters["MB"][0] == pytest.approx(3.7)

    at.text_input(key="users_search").input("synth-").run()
    assert any("SYNTHETIC" in w.value for w in at.warning)
    assert set(frame_with(at, "data version")["data"]) == {"SYNTHETIC"}

    at.text_input(key="users_search").input("nobody-has-this-id").run()
    assert any("No user id contains" in i.value for i in at.info)


def test_users_page_lists_the_registered_retrievers_and_offers_them(app):
    from personalize.retrieval import RETRIEVERS, RecencyRetriever, register_retriever, unregister_retriever

    register_retriever("newest", "A test's toy: the latest items", lambda c: RecencyRetriever(c.store))
    try:
        at = app("users")
        at.text_input(key="users_search").input("alice").run()
        listed = frame_with(at, "description")
        assert list(listed["retriever"]) == list(RETRIEVERS) and list(RETRIEVERS)[:3] == ["dense", "bm25", "recency"]
        assert list(listed["description"]) == [spec.description for spec in RETRIEVERS.values()]
        assert "newest" in list(listed["retriever"])
        assert at.selectbox(key="users_ret").options == list(RETRIEVERS)
        assert at.selectbox(key="users_ret").value == "bm25"  # the settings' default (PERSONALIZE_RETRIEVER)
    finally:
        unregister_retriever("newest")


def test_prompt_box_answers_with_the_four_methods_side_by_side(app):
    at = app("users")
    at.text_input(key="users_search").input("alice").run()
    at.text_area(key="users_prompt_text").input("What score would this user give Space Film 3 (Sci-Fi, Action)?")
    at.number_input(key="users_new").set_value(3)
    at.button[-1].click().run()  # the form's submit button
    assert not at.exception, [e.value for e in at.exception]
    headings = [m.value for m in at.markdown if m.value.startswith("#### ")]
    assert headings == [f"#### {m}" for m in METHODS]
    retrieved = [df.value for df in at.dataframe if list(df.value.columns) == ["id", "score", "text"]]
    assert len(retrieved) == 2  # rag and rag+peft (which falls back to rag without an adapter)
    assert all(rid.startswith("a") for df in retrieved for rid in df["id"])
    assert "peft fell back to none" in texts(at)
    assert sum("generation" in c.value and "ms" in c.value for c in at.caption) == 4


# -- Jobs --------------------------------------------------------------------------------------------------------


def test_jobs_page_shows_runs_and_jobs_with_state_progress_and_errors(app):
    at = app("jobs")
    assert at.title[0].value == "Jobs"
    runs = frame_with(at, "answers")
    assert list(runs["run"]) == [FAILED, RUNNING, REAL, SYNTH]
    assert list(runs["state"]) == ["failed", "running", "done", "done"]
    assert runs["progress"][1] == pytest.approx(0.4)
    assert list(runs["data"]) == ["real", "real", "real", "SYNTHETIC"]
    assert any(FAILED in e.value and "disk full" in e.value for e in at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["runs running"] == "1" and metrics["runs failed"] == "1"
    assert metrics["jobs done"] == str(len(SIZES)) and metrics["jobs failed"] == "1"
    assert metrics["jobs queued"] == "1" and metrics["jobs running"] == "1"
    jobs = frame_with(at, "worker")
    assert len(jobs) == len(SIZES) + 3
    assert any("OSError: disk full" in e.value for e in at.error)
    assert any("is reachable" in s.value for s in at.success)
    hints = [c.value for c in at.caption if "personalize task-adapter train --task T --data SRC" in c.value]
    assert [h.split(" (")[0] for h in hints] == ["No task adapters yet", "No task adapter jobs yet"]


# -- Cost --------------------------------------------------------------------------------------------------------


def test_cost_page_shows_training_adapter_size_and_latency_against_quality(app, seeded):
    at = app("cost")
    assert at.title[0].value == "Cost"
    report = build_report(Personalizer(Settings(home=seeded, _env_file=None)).store, REAL)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Adapters"] == str(len(SIZES))
    assert metrics["Training s / user (mean)"] == f"{report.cost['training']['train_seconds_per_user_mean']:.1f}"
    assert metrics["Adapter MB (mean)"] == "3.70"
    latency = frame_with(at, "total ms p50")
    assert list(latency["method"]) == [*METHODS, BASELINE]
    assert latency["kind"].iloc[-1] == "no model"
    for i, method in enumerate(METHODS):
        assert latency["total ms p50"][i] == pytest.approx(report.cost["latency"][method]["total_ms_p50"])
    per_user = frame_with(at, "train seconds")
    assert len(per_user) == len(SIZES)
    assert per_user["peft gain"].notna().all()
    assert per_user["tokens"].isna().all() and per_user["steps"].isna().all()  # adapters from before they were kept
    assert "trained on:** none (zero-shot base)" in texts(at)
    assert len(at.get("plotly_chart")) == 2


# -- States ------------------------------------------------------------------------------------------------------

PAGES = ("comparison", "volume", "router", "users", "jobs", "cost")


def test_an_empty_database_shows_how_to_load_data_on_every_page(tiny_model_dir, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path, tmp_path / "empty-home", tiny_model_dir)
    for page in PAGES:
        at = open_page(page)
        assert not at.exception and not at.error, page
        if page != "router":
            assert "personalize eval run" in texts(at) or "personalize users import" in texts(at), page
    assert at.title[0].value == "Cost"


def test_an_unreachable_database_shows_a_clear_error_on_every_page(tiny_model_dir, monkeypatch, tmp_path):
    url = "postgresql+psycopg://nobody@127.0.0.1:1/personalize"
    _env(monkeypatch, tmp_path, tmp_path / "home", tiny_model_dir, database_url=url)
    for page in PAGES:
        at = open_page(page)
        assert not at.exception, page
        assert any("database is unreachable" in e.value and "127.0.0.1:1" in e.value for e in at.error), page


def test_an_unreachable_broker_shows_a_clear_error(seeded, tiny_model_dir, monkeypatch, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(seeded, home)  # queueing writes a job row
    _env(monkeypatch, tmp_path, home, tiny_model_dir, broker_url="redis://127.0.0.1:1/0")
    at = open_page("jobs")
    assert any("cannot reach the broker redis://127.0.0.1:1/0" in e.value for e in at.error)
    assert frame_with(at, "answers") is not None  # the rest of the page still shows
    at = open_page("users")
    at.text_input(key="users_search").input("dave").run()
    at.button(key="users_train").click().run()
    assert any("broker is unreachable" in e.value for e in at.error)


def test_synthetic_runs_are_labelled_on_every_page_that_shows_them(app):
    for page, key in (("volume", "volume_run"), ("cost", "cost_run")):
        at = app(page)
        at.selectbox(key=key).set_value(SYNTH).run()
        assert not at.exception
        assert any("SYNTHETIC" in w.value for w in at.warning), page
        assert any(SYNTH in o and o.endswith("SYNTHETIC") for o in at.selectbox(key=key).options)


# -- Task adapters -----------------------------------------------------------------------------------------------

TA_RUN = "movielens-rating-val-task-adapted"
ZS_RUN = "movielens-rating-val-zero-shot"
TA_SIZES = (10, 40, 160, 640)
TA_METHODS = (*METHODS, "zero-shot")
TA_JOB_ERROR = "InvalidInputError: no training pairs: the users' items give no (input, output) pair for this task"
JOB_STATES = ("queued", "running", "done", "failed")


def _ta_run(run_id: str, hours: int, ref: str | None, methods: tuple[str, ...]) -> EvalRun:
    """A done run on the val split, on the task adapter ``ref`` or (None) on the zero-shot base."""
    config = EvalConfig(
        task="movielens-rating",
        split="val",
        source="/data/seeded",
        methods=list(methods),
        model="tiny",
        base="task" if ref else "zero-shot",
        task_adapter=ref,
    ).model_dump()
    return EvalRun(
        id=run_id,
        task="movielens-rating",
        split="val",
        config=config,
        state="done",
        progress=1.0,
        created_at=T0 + timedelta(hours=hours),
    )


def _ta_results(run_id: str, methods: tuple[str, ...]) -> list[EvalResult]:
    out = []
    for u, size in enumerate(TA_SIZES):
        for q in range(2):
            gold = 1 + (u + 2 * q) % 5
            for method in methods:
                zero_shot = method == "zero-shot"
                out.append(
                    EvalResult(
                        run_id=run_id,
                        user_external_id=f"v{u:02d}",
                        query_id=f"v{u:02d}-q{q}",
                        method=method,
                        profile_size=size,
                        prediction="3" if zero_shot else _rating_prediction(gold, method, size, q),
                        gold=str(gold),
                        timings=_timings("none" if zero_shot else method, size),
                    )
                )
    return out


def _ta_adapters(p: Personalizer, model: str, ref: str) -> None:
    """The val users' adapters: three trained on the task adapter ``ref`` (tokens and steps recorded), one older."""
    users = [eval_user_id("movielens-rating", "val", f"v{u:02d}") for u in range(len(TA_SIZES))]
    for uid in users:
        p.add_user(uid)
    with p.store.session() as s:
        for u, (uid, size) in enumerate(zip(users, TA_SIZES, strict=True)):
            trained = {"n_pairs": size, "n_tokens": 100 * size, "steps": 2 + u, "trained_on": f"{model}+{ref}"}
            s.add(
                Adapter(
                    user_pk=s.scalar(select(User.id).where(User.external_id == uid)),
                    version=1,
                    path=f"/adapters/v{u:02d}/v1",
                    base_model=model,
                    data_version=1,
                    n_items=size,
                    train_seconds=1.0 + u,
                    final_loss=1.0,
                    size_bytes=3_700_000,
                    config=trained | {"task_adapter": ref} if u < 3 else None,
                    created_at=T0,
                )
            )


def _ta_jobs(p: Personalizer, ref: str) -> dict[str, str]:
    """Task adapter job records in each state, written as the worker writes them; the job id per state."""
    source = TaskAdapterSource(task="movielens-rating", data="SYNTHETIC", users=4, split="test")
    jobs = {state: p.task_adapters.new_job(source, p.settings.model, "requested") for state in JOB_STATES}
    updates = {
        "running": {"state": "running", "progress": 0.5, "loss": 1.1, "eta_s": 42.0, "started_at": "2025-01-01"},
        "done": {"state": "done", "progress": 1.0, "loss": 0.9, "eta_s": 0, "adapter": ref},
        "failed": {"state": "failed", "progress": 0.0, "error": TA_JOB_ERROR},
    }
    for state, changes in updates.items():
        p.task_adapters.write_job(jobs[state], p.task_adapters.job(jobs[state]) | changes)
    return jobs


@pytest.fixture(scope="session")
def task_adapted(seeded: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The seeded home plus two real task adapters trained on the tiny model (the newer one marked as trained on a
    forgotten user), task adapter jobs in every state, and two runs on the val split: one on the older task adapter
    (with zero-shot among its methods), one on the zero-shot base."""
    home = tmp_path_factory.mktemp("dashboard-ta") / "home"
    shutil.copytree(seeded, home)
    model = str(tiny_model_dir)
    settings = Settings(home=home, model=model, auto_train=False, task_adapter=TINY_TASK, _env_file=None)
    with Personalizer(settings) as p:
        source = TaskAdapterSource(task="movielens-rating", data="SYNTHETIC", users=3, split="test")
        first = train_now(p, source).info
        second = train_now(p, source.model_copy(update={"users": 4})).info
        (extra,) = set(second.metadata["user_keys"]) - set(first.metadata["user_keys"])
        p.task_adapters.mark_forgotten(extra)  # only the newer one was trained on that user
        jobs = _ta_jobs(p, second.ref)
        _ta_adapters(p, model, first.ref)
        with p.store.session() as s:
            s.add_all([_ta_run(ZS_RUN, 5, None, ("none", "rag")), _ta_run(TA_RUN, 6, first.ref, TA_METHODS)])
        with p.store.session() as s:
            s.add_all([*_ta_results(ZS_RUN, ("none", "rag")), *_ta_results(TA_RUN, TA_METHODS)])
        adapters = p.task_adapters.all()
    return home, adapters, jobs


@pytest.fixture
def ta_app(task_adapted, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    _env(monkeypatch, tmp_path, task_adapted[0], tiny_model_dir)
    return open_page


def test_jobs_page_lists_task_adapters_and_marks_one_trained_on_a_forgotten_user(ta_app, task_adapted):
    first, second = (a.summary() for a in task_adapted[1])
    at = ta_app("jobs")
    assert "Task adapters" in [h.value for h in at.subheader]
    table = frame_with(at, "with context")
    assert list(table["ref"]) == [first["ref"], second["ref"]]
    for i, summary in enumerate((first, second)):
        for column, key in (("users", "users"), ("pairs", "pairs"), ("with context", "with_context")):
            assert table[column][i] == summary[key]
        assert table["tokens"][i] == summary["tokens"] and table["cut"][i] == "time"
        assert table["final loss"][i] == pytest.approx(summary["final_loss"])
    assert (first["users"], second["users"]) == (3, 4)
    assert list(table["status"]) == ["older version", "forgotten users: 1 — retrain pending"]
    (warning,) = [w.value for w in at.warning if "retrain pending" in w.value]
    assert second["ref"] in warning and first["ref"] not in warning


def test_jobs_page_shows_task_adapter_jobs_with_progress_eta_and_errors(ta_app, task_adapted):
    _, adapters, jobs = task_adapted
    at = ta_app("jobs")
    table = frame_with(at, "ETA").set_index("job")
    assert sorted(table.index) == sorted(jobs.values())
    for state, job in jobs.items():
        assert table.loc[job, "state"] == state and table.loc[job, "task"] == "movielens-rating"
    assert table.loc[jobs["running"], "progress"] == pytest.approx(0.5)
    assert table.loc[jobs["running"], "ETA"] == "42 s"
    assert table.loc[jobs["done"], "progress"] == pytest.approx(1.0) and pd.isna(table.loc[jobs["done"], "ETA"])
    assert table.loc[jobs["done"], "result"] == adapters[1].ref
    assert table.loc[jobs["failed"], "result"] == TA_JOB_ERROR
    shown = next(d for d in at.dataframe if "ETA" in d.value.columns)
    assert json.loads(shown.proto.columns)["progress"]["type_config"]["type"] == "progress"  # a bar, not a number
    assert any(jobs["failed"] in e.value and TA_JOB_ERROR in e.value for e in at.error)
    metrics = {m.label: m.value for m in at.metric}
    assert [metrics[f"task adapter jobs {s}"] for s in JOB_STATES] == ["1", "1", "1", "1"]


def test_cost_page_shows_tokens_steps_and_the_task_adapter_the_adapters_were_trained_on(ta_app, task_adapted):
    ref = task_adapted[1][0].ref
    at = ta_app("cost")
    per_user = frame_with(at, "tokens").set_index("user")
    assert list(per_user.index) == [f"v{u:02d}" for u in range(len(TA_SIZES))]
    for u, size in enumerate(TA_SIZES[:3]):
        assert per_user.loc[f"v{u:02d}", "tokens"] == 100 * size and per_user.loc[f"v{u:02d}", "steps"] == 2 + u
    assert math.isnan(per_user.loc["v03", "tokens"]) and math.isnan(per_user.loc["v03", "steps"])  # an older one
    assert f"trained on:** {ref}" in texts(at)
    assert not any("another base" in w.value for w in at.warning)

    at.selectbox(key="cost_run").set_value(ZS_RUN).run()
    assert "trained on:** none (zero-shot base)" in texts(at)
    (warning,) = [w.value for w in at.warning if "another base" in w.value]
    assert warning.startswith("3 of these adapters")


def test_every_run_banner_and_title_show_the_base(ta_app, task_adapted):
    ref = task_adapted[1][0].ref
    at = ta_app()
    assert f"Run `{TA_RUN}` · base: task adapter {ref}" in texts(at)
    assert any(f"base: task adapter {ref}" in h.value for h in at.subheader)  # run_title
    at.multiselect(key="comparison_runs").set_value([TA_RUN, ZS_RUN]).run()
    assert not at.exception
    assert f"Run `{ZS_RUN}` · base: zero-shot" in texts(at)
    runs = set(frame_with(at, "best")["run"])
    assert runs == {
        f"{TA_RUN} (movielens-rating/val, base: task adapter {ref})",
        f"{ZS_RUN} (movielens-rating/val, base: zero-shot)",
    }
    for page, key in (("volume", "volume_run"), ("cost", "cost_run")):
        at = ta_app(page)
        assert f"base: task adapter {ref}" in texts(at), page
        at.selectbox(key=key).set_value(ZS_RUN).run()
        assert f"Run `{ZS_RUN}` · base: zero-shot" in texts(at), page


def test_a_run_from_before_task_adapters_reads_as_the_zero_shot_base():
    old = EvalConfig(task="movielens-rating", split="test").model_dump(exclude={"base", "task_adapter"})
    assert ui.base_label(old) == "base: zero-shot" and ui.task_adapter_of(old) is None
    assert ui.base_label({"base": "zero-shot", "task_adapter": None}) == "base: zero-shot"
    assert ui.base_label({"base": "task", "task_adapter": None}) == "base: zero-shot (no task adapter when it ran)"
    assert ui.base_label({"base": "task", "task_adapter": "t@v2#ab"}) == "base: task adapter t@v2#ab"


def test_zero_shot_shows_wherever_methods_are_listed(ta_app):
    at = ta_app()
    assert list(frame_with(at, "avg gain")["method"]) == list(TA_METHODS)
    assert "zero-shot" in frame_with(at, "best").columns
    quality = next(c.proto.spec for c in at.get("plotly_chart") if "95% intervals" in c.proto.spec)
    assert '"zero-shot"' in quality
    at = ta_app("volume")
    assert "zero-shot" in frame_with(at, "min items").columns
    at = ta_app("cost")
    assert list(frame_with(at, "total ms p50")["method"]) == list(TA_METHODS)
    at = ta_app("users")
    assert "zero-shot" in at.multiselect(key="users_methods").options
