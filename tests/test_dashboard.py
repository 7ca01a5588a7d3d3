"""The dashboard's pages under Streamlit's AppTest, against a seeded database: the tables and metrics each page shows
are the library's (``build_report``, ``Router``, ``Personalizer``), and empty, unreachable, partial and SYNTHETIC
states read as such. No adapter is trained and the real model is never loaded (the prompt box uses the tiny model)."""

from __future__ import annotations

import math
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from personalize import Personalizer, Settings
from personalize.evaluation import EvalConfig, eval_user_id
from personalize.reports import build_report
from personalize.schema import Adapter, EvalResult, EvalRun, TrainingJob, User

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

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
