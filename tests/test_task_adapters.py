"""Task adapters end to end on the tiny model: time-cut pairs, the merged base on every path, provenance and refusal,
forget marking and retraining without the user, and the Celery job."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import FAST_LORA, start_worker, stop_process, wait_for

from personalize import Personalizer, Settings
from personalize.adapters.task_adapters import (
    TaskAdapterSource,
    build_task_pairs,
    select_training_users,
    time_order,
)
from personalize.cpu.fastpath import decoder_for
from personalize.data.naming import eval_user_id, user_key
from personalize.errors import AdapterBaseMismatchError, InvalidInputError
from personalize.eval.config import EvalConfig
from personalize.eval.datasets import Dataset, Query, synthetic_dataset
from personalize.eval.runner import EvaluationRunner
from personalize.jobs.task_adapter_jobs import queue_train, retrain_source, source_users, train_now
from personalize.settings import LoraSettings, TaskAdapterSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = "movielens-rating"
TINY_TASK = TaskAdapterSettings(
    lora=LoraSettings(epochs=1, batch_size=4, max_length=96, learning_rate=5e-3, max_tokens=None, rank=4),
    max_pairs=48,
    max_pairs_per_user=12,
    max_tokens=50_000,
)
PROMPT = (
    "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. movie: Film X (Sci-Fi, Drama)"
)


@pytest.fixture
def ta_settings(home: Path, tiny_model_dir: Path) -> Settings:
    return Settings(
        home=home, model=str(tiny_model_dir), auto_train=False, lora=FAST_LORA, task_adapter=TINY_TASK, _env_file=None
    )


@pytest.fixture
def p(ta_settings: Settings):
    with Personalizer(ta_settings) as client:
        yield client


def _synthetic(users: int = 6) -> TaskAdapterSource:
    return TaskAdapterSource(task=TASK, data="SYNTHETIC", users=users, split="test")


def _rating(i: int, day: int, score: int, title: str | None = None) -> dict:
    text = title or f"Film {i} (Drama)"
    return {
        "id": str(i),
        "text": text,
        "score": str(score),
        "date": (datetime(2020, 1, 1) + timedelta(days=day)).date().isoformat(),
    }


def _time_split_dataset() -> Dataset:
    """LaMP time-based shape: each user has two queries, the later one's profile holds items after the first query
    (and the first query's own item). Only what was there before the first query may train."""
    queries = []
    for u in range(3):
        early = [_rating(100 * u + i, i, 1 + i % 5) for i in range(10)]
        first_query_item = _rating(100 * u + 50, 20, 5, title=f"GOLD-FIRST-{u} (Drama)")
        later = [_rating(100 * u + 60 + i, 30 + i, 2, title=f"LATER-{u}-{i} (Drama)") for i in range(4)]
        queries.append(Query(f"q{u}a", f"user{u}", PROMPT, "5", early))
        queries.append(Query("50" if u == 0 else f"q{u}b", f"user{u}", PROMPT, "2", [*early, first_query_item, *later]))
    return Dataset(TASK, "test", queries)


def test_time_cut_pairs_never_hold_a_query_gold_or_a_later_item(p):
    dataset = _time_split_dataset()
    source = TaskAdapterSource(task=TASK, data="unused", split="test")
    users = select_training_users(dataset, source)
    assert set(users) == {eval_user_id(TASK, "test", f"user{u}") for u in range(3)}
    settings = TINY_TASK.model_copy(update={"max_pairs_per_user": 100, "context_share": 0.5})
    pairs = build_task_pairs(p.model, users, source, settings, 256, 0.6)
    assert pairs
    for pair in pairs:
        assert "GOLD-FIRST" not in pair.prompt and "LATER-" not in pair.prompt
        assert pair.item_id != "50"  # an item that is also a query id never trains
    trained_ids = {pair.item_id for pair in pairs} | {i for pair in pairs for i in pair.context_ids}
    assert trained_ids <= {str(100 * u + i) for u in range(3) for i in range(10)}
    # every context item is strictly earlier in the user's time order than the item its pair was made from
    for uid, items in users.items():
        position = {item.id: n for n, item in enumerate(time_order(items))}
        for pair in pairs:
            if pair.user_key == user_key(uid):
                assert all(position[c] < position[pair.item_id] for c in pair.context_ids)


def test_about_half_the_pairs_carry_retrieved_context(p):
    source = _synthetic(8)
    settings = TINY_TASK.model_copy(update={"max_pairs": 1000, "max_pairs_per_user": 1000})
    pairs = build_task_pairs(p.model, source_users(p, source), source, settings, 256, 0.6)
    share = sum(1 for pair in pairs if pair.context_ids) / len(pairs)
    assert len(pairs) > 100 and 0.35 < share < 0.65
    with_context = next(pair for pair in pairs if pair.context_ids)
    assert "is the score for" in with_context.prompt  # rendered as rag renders items
    assert "is the score for" not in next(pair for pair in pairs if not pair.context_ids).prompt


def test_user_cut_holds_out_the_evaluated_users(p):
    dataset = synthetic_dataset(n_users=6)
    held_out = {q.user_id for q in dataset.queries[:6]}  # 3 queries per user: the first two users
    users = select_training_users(dataset, TaskAdapterSource(task=TASK, data="x", cut="user", eval_users=2))
    assert len(users) == 4
    assert not {eval_user_id(TASK, "test", u) for u in held_out} & set(users)
    with pytest.raises(InvalidInputError, match="eval-users"):
        select_training_users(dataset, TaskAdapterSource(task=TASK, data="x", cut="user"))


def test_a_task_adapter_is_stored_in_peft_format_with_its_provenance(p):
    result = train_now(p, _synthetic())
    info = result.info
    assert (info.path / "adapter_config.json").is_file() and (info.path / "adapter_model.safetensors").is_file()
    meta = json.loads((info.path / "personalize.json").read_text())
    for key in ("task", "base_model", "data_hash", "user_keys", "n_pairs", "n_tokens", "train_seconds", "final_loss"):
        assert meta[key] not in (None, "", [])
    assert meta["kind"] == "task" and meta["n_users"] == 6 and meta["source"]["cut"] == "time"
    assert info.version == 1 and p.bases.current_task_adapter(TASK).ref == info.ref
    again = train_now(p, _synthetic())
    assert again.info.version == 2 and again.info.metadata["data_hash"] == meta["data_hash"]  # same data, same hash
    assert [v.version for v in p.task_adapters.versions(TASK, p.settings.model)] == [1, 2]
    p.task_adapters.remove(TASK, p.settings.model, 1)
    assert [v.version for v in p.task_adapters.versions(TASK, p.settings.model)] == [2]


def _ingest_user(p: Personalizer, uid: str = "rater") -> str:
    items = [{"id": str(i), "text": f"Film {i} (Drama)", "output": str(1 + i % 5), "task": TASK} for i in range(12)]
    p.add_items(uid, items)
    return uid


def test_every_method_runs_on_the_merged_base_and_zero_shot_on_the_plain_one(p):
    uid = _ingest_user(p)
    before = {m: p.generate(uid, PROMPT, m, max_new_tokens=6).text for m in ("none", "zero-shot")}
    assert before["none"] == before["zero-shot"]  # no task adapter yet: none is the plain base
    info = train_now(p, _synthetic()).info
    none = p.generate(uid, PROMPT, "none", max_new_tokens=6)
    zero = p.generate(uid, PROMPT, "zero-shot", max_new_tokens=6)
    assert none.timings.extra["task_adapter"] == info.ref and zero.timings.extra["task_adapter"] is None
    assert zero.text == before["zero-shot"]
    scores_none = p.score_labels(uid, PROMPT, list("12345"), "none").timings.extra["label_log_likelihoods"]
    scores_zero = p.score_labels(uid, PROMPT, list("12345"), "zero-shot").timings.extra["label_log_likelihoods"]
    assert scores_none != scores_zero  # the merged weights answer, not the plain ones
    rag = p.generate(uid, PROMPT, "rag", max_new_tokens=6)
    assert rag.method == "rag" and rag.retrieved and rag.timings.extra["task_adapter"] == info.ref


@pytest.mark.parametrize("fast", ["fast", "fast-fp32"])
def test_the_merged_base_gives_the_same_answers_through_the_fast_and_plain_decoders(ta_settings, fast):
    with Personalizer(ta_settings.model_copy(update={"decoder": "plain"})) as plain:
        uid = _ingest_user(plain)
        train_now(plain, _synthetic())
        plain.train(uid)
        expected = {m: plain.generate(uid, PROMPT, m, max_new_tokens=8) for m in ("none", "peft", "rag+peft")}
    with Personalizer(ta_settings.model_copy(update={"decoder": fast})) as quick:
        got = {m: quick.generate(uid, PROMPT, m, max_new_tokens=8) for m in expected}
        merged, _ = quick.bases.base_for(TASK, "none")
        # 8-bit weights decode the unmerged base plus the task LoRA on every row, not re-quantised merged weights
        assert merged.merged_lora is not None and decoder_for(merged, "q8").resident
        assert decoder_for(merged, "fp32").resident is None
    for method, result in got.items():
        assert result.timings.extra["decoder"].startswith("fast"), result.timings.extra
        assert result.method == expected[method].method == method
        assert result.text == expected[method].text, method


def test_a_user_adapter_records_its_task_adapter_and_is_refused_on_another(p):
    uid = _ingest_user(p)
    first = train_now(p, _synthetic()).info
    adapter = p.train(uid)
    meta = json.loads((Path(adapter.path) / "personalize.json").read_text())
    assert meta["task_adapter"] == first.ref and meta["base_model"].endswith(first.ref)
    assert adapter.config["task_adapter"] == first.ref
    assert p.generate(uid, PROMPT, "peft", max_new_tokens=3).method == "peft"
    second = train_now(p, _synthetic(5)).info
    assert second.ref != first.ref
    with pytest.raises(AdapterBaseMismatchError, match="retrain"):
        p.generate(uid, PROMPT, "peft", max_new_tokens=3)
    with pytest.raises(AdapterBaseMismatchError):
        p.score_labels(uid, PROMPT, list("12345"), "rag+peft")
    auto = p.generate(uid, PROMPT, "auto", max_new_tokens=3)
    assert auto.method in ("none", "rag") and any("another base" in n for n in auto.notes)
    assert not p.adapter_is_current(uid, p.current_adapter(uid))
    assert p.train(uid).config["task_adapter"] == second.ref
    assert p.generate(uid, PROMPT, "peft", max_new_tokens=3).method == "peft"


def test_forget_marks_task_adapters_and_the_retrain_leaves_the_user_out(p):
    info = train_now(p, _synthetic()).info
    forgotten = eval_user_id(TASK, "test", sorted(source_users(p, _synthetic()))[0].rsplit("/", 1)[1])
    _ingest_user(p, forgotten)  # the user exists in the store too (as an eval run would have imported them)
    assert user_key(forgotten) in info.metadata["user_keys"]
    report = p.forget(forgotten)
    assert report.task_adapters == [info.ref]
    assert len(report.task_adapter_retrain) == 1  # queued (embedded broker) or said why not; never a failed forget
    marked = p.task_adapters.current(TASK, p.settings.model)
    assert marked.forgotten == (user_key(forgotten),) and marked.summary()["forgotten_users"] == 1
    retrained = train_now(p, retrain_source(marked))
    assert user_key(forgotten) not in retrained.info.metadata["user_keys"]
    assert not {pair.user_key for pair in retrained.pairs} & {user_key(forgotten)}
    assert retrained.info.metadata["n_users"] == 5
    assert [v.version for v in p.task_adapters.versions(TASK, p.settings.model)] == [2]  # the marked one is gone
    assert not p.task_adapters.current(TASK, p.settings.model).forgotten


def test_an_eval_run_records_its_task_adapter_and_base(p):
    dataset = synthetic_dataset(n_users=3)
    runner = EvaluationRunner(p, show_progress=False)
    info = train_now(p, _synthetic(3)).info
    config = EvalConfig(
        task=TASK, split="test", synthetic=True, users=3, methods=["none", "zero-shot"], train_via="inline"
    )
    run_id = runner.run(dataset, config)
    assert runner.config_of(run_id).task_adapter == info.ref
    zero = EvalConfig(task=TASK, split="test", synthetic=True, users=3, methods=["none"], base="zero-shot")
    assert runner.config_of(runner.run(dataset, zero)).task_adapter is None
    train_now(p, _synthetic(2))
    with pytest.raises(InvalidInputError, match="task adapter"):
        runner.run(dataset, runner.config_of(run_id), run_id=run_id)  # resuming on another adapter is refused


@pytest.mark.slow
def test_a_celery_worker_trains_a_task_adapter_and_reports_progress(ta_settings, tmp_path):
    import os

    env = {
        **os.environ,
        "PERSONALIZE_HOME": str(ta_settings.home),
        "PERSONALIZE_MODEL": ta_settings.model,
        "PERSONALIZE_TASK_ADAPTER": TINY_TASK.model_dump_json(),
        "PERSONALIZE_TORCH_THREADS": "1",
    }
    log = tmp_path / "worker.log"
    with Personalizer(ta_settings) as client:
        job_id = queue_train(client, _synthetic(4))
        assert client.task_adapters.job(job_id)["state"] == "queued"
        worker = start_worker(env, log)
        try:
            record = wait_for(
                lambda: (r := client.task_adapters.job(job_id)) and r["state"] in ("done", "failed") and r,
                240,
                "the task adapter job",
                log,
            )
        finally:
            stop_process(worker)
        assert record["state"] == "done", record
        assert record["progress"] == 1.0 and record["adapter"] == client.bases.current_task_adapter(TASK).ref


def test_authorship_pairs_are_the_choice_task_made_from_profiles(p):
    from personalize.data.ingest import lamp_item
    from personalize.eval.datasets import AUTHORSHIP_INPUT_TEMPLATE

    words = " ".join(f"w{i}" for i in range(80))
    users = {
        f"author{a}": [
            lamp_item("reuters-authorship", {"id": f"a{a}-{i}", "title": f"Lead {a} {i}.", "text": f"A{a} {words}"})
            for i in range(6)
        ]
        for a in range(3)
    }
    source = TaskAdapterSource(task="reuters-authorship", data="x")
    settings = TINY_TASK.model_copy(update={"max_pairs": 1000, "max_pairs_per_user": 100})
    pairs = build_task_pairs(p.model, users, source, settings, 256, 0.6)
    assert len(pairs) == 18 and {pair.output for pair in pairs} == {"[1]", "[2]"}
    head = AUTHORSHIP_INPUT_TEMPLATE.split("[1]")[0]
    for pair in pairs:
        author = next(a for a in range(3) if pair.item_id.startswith(f"a{a}-"))
        assert head in pair.prompt
        own = f'[{pair.output[1]}]: "Lead {author} '
        assert own in pair.prompt  # the labelled passage is the user's own article
        other = "[2]" if pair.output == "[1]" else "[1]"
        assert f'{other}: "Lead {author} ' not in pair.prompt  # the other is another user's


def test_the_per_user_budget_grows_with_data_up_to_the_token_cap(p):
    from personalize.adapters.training import train_adapter, training_pairs

    def steps(n_items: int, tmp: Path) -> int:
        items = [
            p.check_items([{"id": str(i), "text": f"Film {i} (Drama)", "output": "3", "task": TASK}])[0]
            for i in range(n_items)
        ]
        lora = LoraSettings(epochs=2, batch_size=4, max_length=64, max_tokens=2000, rank=2)
        return train_adapter(p.model, training_pairs(items), lora, tmp / f"a{n_items}").steps

    tmp = Path(p.settings.resolved_home) / "budget"
    small, medium, large, huge = (steps(n, tmp) for n in (4, 12, 200, 400))
    assert small == 2 and medium == 6  # two epochs over every item
    assert medium < large == huge  # capped: a huge profile costs what the cap allows


def test_a_store_source_trains_on_the_stores_users_of_the_task(p):
    _ingest_user(p, "rater one")
    _ingest_user(p, "rater two")
    p.add_items("note taker", [{"id": "n1", "text": "a note about gardening tomatoes"}])  # another task: not used
    source = TaskAdapterSource(task=TASK, data="store")
    users = source_users(p, source)
    assert set(users) == {"rater one", "rater two"} and all(len(v) == 12 for v in users.values())
    excluded = source.model_copy(update={"exclude_user_keys": [user_key("rater two")]})
    assert set(source_users(p, excluded)) == {"rater one"}
    assert train_now(p, source).info.metadata["n_users"] == 2
