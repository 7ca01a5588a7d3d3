"""peft:distill (issue 15, part 3): a per-user LoRA trained to answer, without retrieval, what the model answers with
the user's retrieved items. Its targets must be the teacher's rag answers (scored labels on label tasks, greedy text
elsewhere), never the item's own gold through its own context; it trains, serves without retrieval and is its own
method beside LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personalize import Personalizer, Settings
from personalize.adapters.distill import distill_pairs, teacher_retrieval
from personalize.adapters.methods import get_adapter_method, method_for_peft_type
from personalize.serving.hf_backend import generate_text
from personalize.serving.scoring import candidate_log_likelihoods
from personalize.settings import DistillSettings
from personalize.tasks.prompting import encode
from personalize.tasks.registry import get_task

SMALL = {"epochs": 1, "batch_size": 4, "max_length": 96}
GENRES = ["space opera", "romance", "horror", "cartoon"]


def _ratings(n: int) -> list[dict]:
    """A user who rates by genre: the teacher sees the same genre's ratings in its context."""
    return [
        {
            "id": f"m{i}",
            "text": f"Film {i}, a {GENRES[i % 4]}",
            "fields": {"score": str(5 if i % 4 == 0 else 1 + i % 3)},
            "timestamp": f"2020-01-{1 + i:02d}T00:00:00",
            "task": "movielens-rating",
        }
        for i in range(n)
    ]


def _articles(n: int) -> list[dict]:
    return [
        {
            "id": f"a{i}",
            "text": f"Markets in city {i} rose as traders bought shares of steel and grain firms again",
            "fields": {"title": f"Markets rise in city {i}"},
            "timestamp": f"2020-02-{1 + i:02d}T00:00:00",
            "task": "reuters-lead",
        }
        for i in range(n)
    ]


@pytest.fixture
def distill_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"distill": DistillSettings(retriever="bm25", k=3, **SMALL)})


def test_distill_is_a_lora_variant_with_loras_capabilities():
    distill, lora = get_adapter_method("distill"), get_adapter_method("lora")
    assert distill.peft_type == "LORA" and distill.variant_of == "lora" and distill.distilled
    assert method_for_peft_type("LORA") is lora  # a loaded LoRA folder still names LoRA for the fast paths
    assert all(distill.supports(c) == lora.supports(c) for c in ("fast_training", "fast_decoding", "mixed_batches"))


def test_label_targets_are_the_teachers_rag_scores_with_leave_one_out_context(distill_settings):
    with Personalizer(distill_settings) as p:
        p.add_items("alice", _ratings(12))
        items = p.store.items("alice")
        made = distill_pairs(
            p.model, items, distill_settings.distill, teacher_retrieval(distill_settings, distill_settings.distill)
        )
        task = get_task("movielens-rating")
        assert len(made) == 12 and all(d.scored for d in made)
        for d in made:
            assert d.item_id not in d.context and len(d.context) == 3  # never its own item, always k others
            assert "Film" in d.teacher_prompt and d.teacher_prompt != d.prompt and d.pair == (d.prompt, d.target)
            assert d.prompt == task.input_template.format(text=next(i.text for i in items if i.id == d.item_id))
            scores = candidate_log_likelihoods(p.model, encode(p.model, d.teacher_prompt), list(task.labels))
            assert d.target == task.labels[max(range(5), key=lambda j: scores[j])]  # the teacher's own argmax
        plain = candidate_log_likelihoods(p.model, encode(p.model, made[0].prompt), list(task.labels))
        with_context = candidate_log_likelihoods(p.model, encode(p.model, made[0].teacher_prompt), list(task.labels))
        assert plain != with_context  # the context is what the student is taught to do without


def test_generation_targets_are_the_teachers_greedy_text(distill_settings):
    with Personalizer(distill_settings) as p:
        p.add_items("bob", _articles(5))
        settings = distill_settings.distill.model_copy(update={"teacher_max_new_tokens": 6})
        made = distill_pairs(p.model, p.store.items("bob"), settings, teacher_retrieval(distill_settings, settings))
        assert made and not any(d.scored for d in made)
        for d in made:
            assert d.target == generate_text(p.model, encode(p.model, d.teacher_prompt), 6).text
            assert d.item_id not in d.context


def test_a_distilled_adapter_trains_through_a_job_and_serves_without_retrieval(distill_settings):
    with Personalizer(distill_settings) as p:
        p.add_items("alice", _ratings(12))
        adapter = p.train("alice", method="distill")
        assert adapter.method == "distill" and p.current_adapter("alice") is None  # plain peft (LoRA) untouched
        metadata = json.loads((Path(adapter.path) / "personalize.json").read_text())
        assert metadata["method"] == "distill" and metadata["distill"]["retriever"] == "bm25"
        assert metadata["distill"]["pairs"] == 12 and metadata["distill"]["scored"] == 12
        assert json.loads((Path(adapter.path) / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert adapter.config is not None and adapter.config["distill"]["k"] == 3
        result = p.generate("alice", "Film 99, a space opera", method="peft:distill", max_new_tokens=2)
        assert result.method == "peft:distill" and result.retrieved == []  # no retrieval at serving time
        assert result.timings.extra["adapter_method"] == "distill"
        both = p.generate("alice", "Film 99, a space opera", method="rag+peft:distill", max_new_tokens=2)
        assert len(both.retrieved) == 4
        report = p.forget("alice")
        assert not Path(adapter.path).exists() and report is not None


@pytest.mark.parametrize("decoder", ["fast", "plain"])
def test_a_users_lora_and_distill_adapters_stay_cached_side_by_side(distill_settings, decoder):
    """Both are peft type LORA in one cache: named by the user alone they replaced each other on every request."""
    with Personalizer(distill_settings.model_copy(update={"decoder": decoder})) as p:
        p.add_items("alice", _ratings(12))
        p.train("alice")
        p.train("alice", method="distill")
        prompt = "Film 99, a space opera"
        order = ["peft", "peft:distill", "peft", "peft:distill"]
        results = [p.generate("alice", prompt, method=m, max_new_tokens=2) for m in order]
        assert [r.timings.extra["adapter_cache_hit"] for r in results] == [False, False, True, True]
        assert results[2].text == results[0].text and results[3].text == results[1].text
        p.forget("alice")
        caches = [*p.serving.plain._caches.values(), *getattr(p.serving.backend, "_tables", {}).values()]
        assert caches and all(c.names() == [] for c in caches)  # every one of alice's adapters unloaded with her


def test_an_eval_run_reports_peft_distill_with_the_runs_retrieval_as_teacher(home, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from personalize.cli import app
    from personalize.eval.reports import build_report
    from personalize.eval.runner import EvaluationRunner

    for key, value in {
        "PERSONALIZE_HOME": str(home),
        "PERSONALIZE_MODEL": str(tiny_model_dir),
        "PERSONALIZE_DISTILL__EPOCHS": "1",
        "PERSONALIZE_DISTILL__MAX_LENGTH": "96",
        "PERSONALIZE_DISTILL__MAX_ITEMS": "6",
    }.items():
        monkeypatch.setenv(key, value)
    args = ["eval", "run", "--task", "movielens-rating", "--synthetic", "2", "--methods", "none,rag"]
    args += ["--peft-methods", "distill", "--retriever", "bm25", "--k", "2"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1].split()[-1]
    with Personalizer() as client:
        report = build_report(client.store, run_id)
        assert [r.method for r in report.table][:4] == ["none", "rag", "peft:distill", "rag+peft:distill"]
        stored = EvaluationRunner(client).config_of(run_id).adapter_settings["distill"]
        assert stored["retriever"] == "bm25" and stored["k"] == 2  # the teacher is the run's rag
        assert report.cost["training"]["by_method"]["distill"]["adapters"] == 2
