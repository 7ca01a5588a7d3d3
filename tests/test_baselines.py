"""No-model baselines: what each predicts from a real stored profile, and how eval runs take them."""

from __future__ import annotations

from collections import Counter

import pytest
from typer.testing import CliRunner

from personalize.cli import app
from personalize.data.items import ProfileItem
from personalize.data.naming import eval_user_id
from personalize.data.schema import EvalResult
from personalize.errors import InvalidInputError
from personalize.eval.baselines import BASELINES, BaselineInput, baselines_for, check_baseline, round_score
from personalize.eval.config import EvalConfig, default_methods, resolve_methods
from personalize.eval.datasets import Dataset, Query, synthetic_dataset
from personalize.eval.reports import build_report
from personalize.eval.runner import EvaluationRunner
from personalize.tasks.registry import get_task

MOVIES = get_task("movielens-rating")


def _items(*scores: str) -> list[ProfileItem]:
    return [ProfileItem(str(i), f"Film {i}", output=s) for i, s in enumerate(scores)]


def _predict(name: str, task, items, counts=None, retrieved=(), prompt="q", candidate_scores=()) -> str:
    data = BaselineInput(task, prompt, items, Counter(counts or {}), retrieved, candidate_scores)
    return BASELINES[name].predict(data).prediction


def test_which_baselines_apply_to_which_task():
    assert baselines_for(MOVIES) == ["majority", "user-majority", "user-mean", "nearest", "nearest-mean"]
    assert baselines_for(get_task("reuters-lead")) == ["nearest", "input-copy"]
    assert baselines_for(get_task("reuters-authorship")) == ["nearest"]
    assert baselines_for(get_task("lamp-2")) == ["majority", "user-majority", "nearest"]
    assert default_methods("reuters-lead") == ["none", "rag", "peft", "rag+peft", "nearest", "input-copy"]


def test_bad_baselines_get_a_clear_error():
    with pytest.raises(InvalidInputError, match="unknown baseline 'median'"):
        check_baseline("median", MOVIES)
    with pytest.raises(
        InvalidInputError, match="'user-mean' does not apply to reuters-lead.*usable: nearest, input-copy"
    ):
        check_baseline("user-mean", get_task("reuters-lead"))
    with pytest.raises(InvalidInputError, match="unknown method 'gpt'"):
        resolve_methods("movielens-rating", ["none", "gpt"])
    assert resolve_methods("reuters-lead", ["rag", "baselines", "rag"]) == ["rag", "nearest", "input-copy"]


def test_label_baselines_by_hand():
    profile = _items("5", "4", "4", "2", "5", "oops")
    assert _predict("majority", MOVIES, profile, {"3": 9, "4": 9, "5": 1}) == "3"  # tie: the task's label order
    assert _predict("user-majority", MOVIES, profile, {"5": 3, "4": 1}) == "5"  # 4 and 5 tie: the run's counts
    assert _predict("user-mean", MOVIES, profile) == "4"  # (5+4+4+2+5)/5 = 4.0
    assert _predict("user-mean", MOVIES, _items("3", "4")) == "4"  # 3.5 rounds half up, as golds do
    assert round_score(2.5) == "3" and round_score(0.2) == "1"
    empty = _predict("user-mean", MOVIES, [], {"2": 4})
    assert empty == "2"  # nothing to go on: the run's majority


def test_generation_baselines_copy_the_first_sentence_and_the_nearest_lead():
    lead = get_task("reuters-lead")
    prompt = "Write the opening sentence for the following news article: Shares rose 5% on Monday. Traders said so."
    assert _predict("input-copy", lead, [], prompt=prompt) == "Shares rose 5% on Monday."


def test_baselines_answer_from_the_stored_profile_through_the_runner(client):
    dataset = synthetic_dataset(n_users=4, seed=2, split="test", min_items=6, max_items=20)
    config = EvalConfig(
        task="movielens-rating", split="test", synthetic=True, methods=["baselines"], retriever="bm25", k=3
    )
    run_id = EvaluationRunner(client, show_progress=False).run(dataset, config)
    with client.store.session() as s:
        rows = s.query(EvalResult).filter(EvalResult.run_id == run_id).all()
    assert {r.method for r in rows} == set(baselines_for(MOVIES))
    assert all(r.timings["decoder"] == "no model" and r.prediction in {"1", "2", "3", "4", "5"} for r in rows)
    query = dataset.queries[0]
    uid = eval_user_id("movielens-rating", "test", query.user_id)
    top = client.retrieve(uid, MOVIES.query_text(query.input), 3, "bm25")
    mine = {r.method: r.prediction for r in rows if r.query_id == query.id}
    assert mine["nearest"] == top[0].item.output
    scores = [float(h.item.output) for h in top]
    assert mine["nearest-mean"] == round_score(sum(scores) / len(scores))
    profile = [float(i.output) for i in client.items(uid)]
    assert mine["user-mean"] == round_score(sum(profile) / len(profile))
    report = build_report(client.store, run_id)
    assert all(r.baseline for r in report.table) and report.best_baseline in baselines_for(MOVIES)


def test_nearest_on_a_choice_task_picks_the_candidate_closer_to_the_profile(client):
    task = "reuters-authorship"
    profile = [
        {"id": "1", "title": "Rates rose.", "text": "central bank interest rates inflation policy"},
        {"id": "2", "title": "Yields fell.", "text": "bond yields and the central bank"},
    ]
    prompts = [
        'which passage did they write? [1]: "football match goals striker" [2]: "the central bank raised rates"',
        'which passage did they write? [1]: "the central bank cut interest rates" [2]: "a striker scored two goals"',
    ]
    queries = [Query(f"q{n}", "a", p, g, profile) for n, (p, g) in enumerate(zip(prompts, ["[2]", "[1]"], strict=True))]
    config = EvalConfig(task=task, split="test", synthetic=True, methods=["nearest"], retriever="bm25", k=2)
    run_id = EvaluationRunner(client, show_progress=False).run(Dataset(task, "test", queries, synthetic=True), config)
    with client.store.session() as s:
        rows = s.query(EvalResult).filter(EvalResult.run_id == run_id).order_by(EvalResult.query_id).all()
    assert [r.prediction for r in rows] == ["[2]", "[1]"]


def test_eval_cli_refuses_unknown_and_inapplicable_baselines_and_adds_baselines_to_a_run(
    home, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    runner = CliRunner()
    bad = runner.invoke(
        app, ["eval", "run", "--task", "movielens-rating", "--synthetic", "3", "--methods", "none,median"]
    )
    assert bad.exit_code == 2 and "unknown method 'median'" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["eval", "run", "--task", "reuters-lead", "--synthetic", "3", "--methods", "user-mean"])
    assert bad.exit_code == 2 and "does not apply" in bad.output
    first = runner.invoke(app, ["eval", "run", "--task", "movielens-rating", "--synthetic", "3", "--methods", "none"])
    assert first.exit_code == 0, first.output
    assert "too few users for an interval" in first.output
    run_id = first.stdout.strip().splitlines()[-1].split()[-1]
    more = runner.invoke(app, ["eval", "run", "--resume", run_id, "--methods", "user-mean,majority"])
    assert more.exit_code == 0, more.output
    assert "user-mean" in more.output and "no model" in more.output


def test_forgetting_an_evaluation_user_removes_their_answers_from_every_run(client):
    dataset = synthetic_dataset(n_users=3, seed=4, split="test", min_items=6, max_items=12)
    config = EvalConfig(task="movielens-rating", split="test", synthetic=True, methods=["user-mean", "majority"])
    run_id = EvaluationRunner(client, show_progress=False).run(dataset, config)
    user = dataset.queries[0].user_id
    report = client.forget(eval_user_id("movielens-rating", "test", user))
    assert report.eval_answers == 2 * sum(1 for q in dataset.queries if q.user_id == user)
    with client.store.session() as s:
        left = {r.user_external_id for r in s.query(EvalResult).filter(EvalResult.run_id == run_id)}
    assert user not in left and len(left) == 2
    client.add_user("never-evaluated")
    assert client.forget("never-evaluated").eval_answers == 0


def test_one_method_vocabulary_holds_model_methods_and_baselines():
    from personalize.methods import METHODS, MODEL_METHODS, by_cost, ordered, without_adapter
    from personalize.serving.router import COST_ORDER

    assert MODEL_METHODS == ("none", "rag", "peft", "rag+peft") == COST_ORDER == tuple(by_cost(MODEL_METHODS))
    assert [without_adapter(m) for m in MODEL_METHODS] == ["none", "rag", "none", "rag"]
    assert all(METHODS[b].baseline and not METHODS[b].uses_adapter for b in BASELINES)
    assert METHODS["nearest"].uses_retrieval and not METHODS["user-mean"].uses_retrieval
    assert ordered(["user-mean", "zzz", "rag", "none"]) == ["none", "rag", "user-mean", "zzz"]
