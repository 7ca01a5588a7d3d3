"""The evaluation runner, reports and router calibration on SYNTHETIC data with a tiny model."""

import json

import pytest
from typer.testing import CliRunner

from personalize import Personalizer
from personalize.cli import app
from personalize.data.schema import EvalResult
from personalize.eval.calibration import calibrate_from_run
from personalize.eval.config import EvalConfig
from personalize.eval.datasets import synthetic_dataset
from personalize.eval.reports import build_report, compare_runs, export, format_comparison, format_report
from personalize.eval.runner import EvaluationRunner, local_worker_threads
from personalize.serving.router import Router


def _config(**kw) -> EvalConfig:
    base = dict(
        task="movielens-rating",
        split="test",
        synthetic=True,
        source="SYNTHETIC",
        train_via="inline",
        methods=["none", "rag", "peft", "rag+peft"],
        retriever="bm25",
        k=2,
    )
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(n_users=6, seed=1, split="test", min_items=6, max_items=40)


def _predictions(p: Personalizer, run_id: str) -> dict:
    with p.store.session() as s:
        rows = s.query(EvalResult).filter(EvalResult.run_id == run_id).all()
        return {(r.query_id, r.method): r.prediction for r in rows}


def test_run_report_and_calibrate(client, dataset, tmp_path):
    run_id = EvaluationRunner(client, show_progress=False).run(dataset, _config())
    preds = _predictions(client, run_id)
    assert len(preds) == len(dataset.queries) * 4
    assert set(preds.values()) <= {"1", "2", "3", "4", "5"}  # likelihood scoring always answers a label
    report = build_report(client.store, run_id, n_buckets=3)
    assert report.synthetic and report.scoring == "likelihood" and not report.partial
    assert [r.method for r in report.table] == ["none", "rag", "peft", "rag+peft"]
    assert report.table[0].gains == {"mae": 0.0, "rmse": 0.0}
    assert sum(b.n_users for b in report.buckets) == 6
    assert report.correlation["peft"]["n_users"] == 6
    assert report.cost["training"]["adapters"] == 6 and report.cost["training"]["adapter_bytes_mean"] > 0
    precisions = report.cost["training"]["compute_precision"]  # which precision each adapter's training ran in
    assert set(precisions) <= {"fp32", "bf16"} and sum(precisions.values()) == 6
    text = format_report(report)
    assert "SYNTHETIC" in text and "bucket 1" in text and "gain mae" in text
    assert f", trained in {next(iter(precisions))}" in text
    data = json.loads(export(report, tmp_path / "r.json").read_text())
    assert data["run_id"] == run_id
    assert "rag+peft" in export(report, tmp_path / "r.csv").read_text()

    policy = calibrate_from_run(client.store, run_id, tolerance=0.5)
    assert policy.source_run_id == run_id and policy.bands[0].min_items == 1
    decision = Router(client.store).choose("movielens-rating", 10, has_adapter=True)
    assert f"calibrated from run {run_id}" in decision.reason
    user = f"eval/movielens-rating/test/{dataset.queries[0].user_id}"
    result = client.generate(user, dataset.queries[0].input, method="auto", max_new_tokens=2)
    assert "calibrated from run" in result.notes[0]


def test_interrupted_run_resumes_to_the_same_result(settings, dataset, tmp_path):
    config = _config(methods=["none", "rag"])
    with Personalizer(settings) as p:
        runner = EvaluationRunner(p, show_progress=False)
        run_id = runner.start(config)
        calls = {"n": 0}
        real = p.score_labels

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(*a, **kw)

        p.score_labels = flaky
        with pytest.raises(KeyboardInterrupt):
            runner.run(dataset, config, run_id=run_id)
        assert build_report(p.store, run_id).partial
        p.score_labels = real
        runner.run(dataset, config, run_id=run_id)
        resumed = _predictions(p, run_id)
    other = settings.model_copy(update={"home": tmp_path / "other-home"})
    with Personalizer(other) as q:
        fresh = _predictions(q, EvaluationRunner(q, show_progress=False).run(dataset, config))
    assert resumed == fresh and len(fresh) == len(dataset.queries) * 2


def test_default_router_follows_the_paper(client):
    router = Router(client.store)
    assert router.choose("x", 0, False).method == "none"
    assert router.choose("x", 5, True).method == "rag"
    assert router.choose("x", 500, True).method == "rag+peft"
    decision = router.choose("x", 500, False)
    assert decision.method == "rag" and "needs an adapter" in decision.reason


@pytest.mark.slow
def test_cli_eval_trains_through_a_worker_and_reports(home, tiny_model_dir, monkeypatch):
    for key, value in {
        "PERSONALIZE_HOME": str(home),
        "PERSONALIZE_MODEL": str(tiny_model_dir),
        "PERSONALIZE_LORA__EPOCHS": "1",
        "PERSONALIZE_LORA__MAX_LENGTH": "64",
    }.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "eval",
            "run",
            "--task",
            "movielens-rating",
            "--synthetic",
            "3",
            "--methods",
            "none,peft",
            "--train-via",
            "workers",
            "--workers",
            "1",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.stdout and "peft" in result.stdout
    run_id = result.stdout.strip().splitlines()[-1].split()[-1]
    listed = runner.invoke(app, ["eval", "list"]).stdout
    assert run_id in listed and "done" in listed
    shown = runner.invoke(app, ["router", "calibrate", run_id]).stdout
    assert f"run {run_id}" in shown


def test_calibrated_scoring_subtracts_the_content_free_prior(client, dataset):
    query = dataset.queries[0]
    user = "calib-user"
    client.add_items(user, [{"id": "1", "text": "Film (Drama)", "output": "5", "task": "movielens-rating"}])
    labels = ["1", "2", "3", "4", "5"]
    plain = client.score_labels(user, query.input, labels, "none")
    calibrated = client.score_labels(user, query.input, labels, "none", calibrate=True)
    raw = plain.timings.extra["label_log_likelihoods"]
    adjusted = calibrated.timings.extra["label_log_likelihoods"]
    assert raw != adjusted and calibrated.text in labels
    assert calibrated.text == max(adjusted, key=adjusted.get)
    config = _config(scoring="calibrated", methods=["none"])
    assert config.used_scoring() == "calibrated"


def test_fast_and_plain_decoders_give_the_same_run_and_compare_says_so(client, dataset):
    config = _config(scoring="generate", methods=["none", "rag", "peft"], max_new_tokens=3)
    runner = EvaluationRunner(client, show_progress=False)
    # fp32 weights: the tiny model's random weights are not exactly 8-bit codes, as the bundled GGUF's are
    client.settings = client.settings.model_copy(update={"decoder": "fast-fp32"})
    fast_id = runner.run(dataset, config.model_copy(update={"decoder": "fast-fp32"}))
    client.settings = client.settings.model_copy(update={"decoder": "plain"})
    plain_id = runner.run(dataset, config.model_copy(update={"decoder": "plain"}))
    with client.store.session() as s:
        rows = s.query(EvalResult).filter(EvalResult.run_id.in_([fast_id, plain_id])).all()
        decoders = {r.run_id: r.timings["decoder"] for r in rows}
    assert decoders == {fast_id: "fast-fp32", plain_id: "plain"}
    rows = compare_runs(client.store, plain_id, fast_id)
    assert {r.method for r in rows} == {"none", "rag", "peft"} and {r.metric for r in rows} == {"mae", "rmse"}
    assert all(r.relative_change == 0 and r.same_predictions == 1.0 for r in rows)
    text = format_comparison(rows, plain_id, fast_id, 0.01)
    assert "NO" not in text and "100.0%" in text


def test_select_queries_takes_the_first_users_and_at_most_n_queries_each(dataset):
    from personalize.eval.runner import select_queries

    first_two = select_queries(dataset, users=2)
    users = list(dict.fromkeys(q.user_id for q in first_two))
    assert len(users) == 2 and len(first_two) > 2
    one_each = select_queries(dataset, users=2, per_user=1)
    assert [q.user_id for q in one_each] == users
    assert one_each == [next(q for q in first_two if q.user_id == u) for u in users]


def test_the_median_decision_answers_the_median_of_the_stored_label_distribution(client, dataset):
    """``decision=median``: every answer is the median label of its stored log-likelihoods (minimum expected
    absolute error); the argmax answer of the same query is recorded beside it, and the report says which rule."""
    from personalize.serving.scoring import median_label

    run_id = EvaluationRunner(client, show_progress=False).run(dataset, _config(methods=["none"], decision="median"))
    with client.store.session() as s:
        rows = s.query(EvalResult).filter(EvalResult.run_id == run_id).all()
    assert len(rows) == len(dataset.queries)
    for row in rows:
        assert set(row.scores) == {"1", "2", "3", "4", "5"}
        assert row.prediction == median_label(row.scores)
        assert row.timings["raw"] == max(row.scores, key=row.scores.get)  # what argmax would have answered
    assert build_report(client.store, run_id).scoring == "likelihood, median decision"
    with pytest.raises(ValueError, match="numeric labels"):
        _config(task="reuters-lead", methods=["none"], decision="median")
    with pytest.raises(ValueError, match="numeric labels"):
        _config(methods=["none"], decision="median", scoring="generate")


def test_local_training_workers_share_the_cores_instead_of_each_taking_the_answering_threads() -> None:
    assert local_worker_threads(2, 2) == 1
    assert local_worker_threads(1, 2) == 2
    assert local_worker_threads(3, 16) == 5
    assert local_worker_threads(4, 2) == 1  # never zero threads
    assert local_worker_threads(0, 2) == 2
