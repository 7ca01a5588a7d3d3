import json

import pytest
from typer.testing import CliRunner

from personalize.cli import app


@pytest.fixture
def run(home, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def test_import_list_show_count_retrieve_forget(run, tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [{"user_id": "cli user", "id": str(i), "text": f"note {i} about gardening tomatoes"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    result = run("users", "import", str(path))
    assert result.exit_code == 0 and "3 item(s) added" in result.output
    assert "0 item(s) added, 0 updated, 3 unchanged" in run("users", "import", str(path)).output
    assert "cli user\t3 items" in run("users", "list").output
    assert "1 users, 3 items" in run("users", "count").output
    shown = json.loads(run("users", "show", "cli user", "--json").stdout)
    assert shown["user"]["n_items"] == 3 and len(shown["items"]) == 3
    assert "tomatoes" in run("retrieve", "cli user", "tomato garden", "--k", "2").output
    generated = json.loads(run("generate", "cli user", "Any tips?", "--max-new-tokens", "3", "--json").stdout)
    assert generated["method"] == "rag" and len(generated["retrieved"]) == 3
    report = json.loads(run("users", "forget", "cli user").stdout)
    assert report["items"] == 3 and report["collection"] is True
    assert "0 users" in run("users", "count").output


def test_errors_are_one_clear_line(run, tmp_path):
    result = run("users", "show", "nobody")
    assert result.exit_code == 2 and "error: unknown user 'nobody'" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "x", "id": "1"}\n')
    result = run("users", "import", str(bad))
    assert result.exit_code == 2 and "line 1" in result.output and "Traceback" not in result.output
    run("users", "add", "someone")
    result = run("generate", "someone", "")
    assert result.exit_code == 2 and "prompt is empty" in result.output
    for option in (["--scoring", "generate"], ["--scoring", "nonsense"]):  # an eval option the task cannot take
        args = ["eval", "run", "--task", "movielens-rating", "--synthetic", "2", "--decision", "median", *option]
        result = run(*args)
        assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
        assert ("numeric labels" if option[1] == "generate" else "'likelihood'") in result.output


def test_db_upgrade_on_embedded_sqlite(run):
    result = run("db", "upgrade")
    assert result.exit_code == 0 and "latest schema" in result.output


def test_train_jobs_and_adapters_commands(run, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_LORA__EPOCHS", "1")
    monkeypatch.setenv("PERSONALIZE_LORA__MAX_LENGTH", "64")
    monkeypatch.setenv("PERSONALIZE_AUTO_TRAIN", "false")
    path = tmp_path / "items.jsonl"
    rows = [{"user_id": "t", "id": str(i), "text": f"Film {i} (Drama)", "output": str(i % 5 + 1)} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run("users", "import", str(path))
    result = run("train", "t")
    assert result.exit_code == 0 and "t: lora adapter v1 on 6 items" in result.stdout
    assert "up to date" in run("train", "t", "--queue").stdout
    assert "\tt\tlora\tdone\t100%" in run("jobs").stdout
    monkeypatch.setenv("PERSONALIZE_IA3__EPOCHS", "1")
    monkeypatch.setenv("PERSONALIZE_IA3__MAX_LENGTH", "64")
    result = run("train", "t", "--method", "ia3")
    assert result.exit_code == 0 and "t: ia3 adapter v2 on 6 items" in result.stdout
    assert "up to date" in run("train", "t", "--queue", "--method", "ia3").stdout
    adapters = json.loads(run("adapters", "t", "--json").stdout)
    assert [(a["version"], a["method"]) for a in adapters] == [(1, "lora"), (2, "ia3")]
    assert "\tia3\t" in run("adapters", "t").stdout
    served = json.loads(
        run("generate", "t", "A film?", "--method", "peft:ia3", "--max-new-tokens", "2", "--json").stdout
    )
    assert served["method"] == "peft:ia3" and served["timings"]["extra"]["adapter_method"] == "ia3"
    result = run("train", "t", "--method", "nope")
    assert result.exit_code == 2 and "unknown adapter method 'nope'" in result.output
    report = json.loads(run("users", "forget", "t").stdout)
    assert report["adapters"] == 2 and any("adapters" in f for f in report["files"])


def test_task_adapter_train_list_show_remove_and_eval_base(run, monkeypatch):
    monkeypatch.setenv(
        "PERSONALIZE_TASK_ADAPTER",
        json.dumps(
            {
                "lora": {"epochs": 1, "batch_size": 4, "max_length": 64, "rank": 2, "max_tokens": None},
                "max_pairs": 24,
                "max_pairs_per_user": 8,
            }
        ),
    )
    monkeypatch.setenv("PERSONALIZE_TORCH_THREADS", "1")
    assert "no task adapters" in run("task-adapter", "list").output
    args = ("task-adapter", "train", "--task", "movielens-rating", "--data", "SYNTHETIC", "--users", "3")
    trained = json.loads(run(*args).stdout)
    assert trained["ref"].startswith("movielens-rating@v1#") and trained["users"] == 3 and trained["pairs"] == 24
    listed = run("task-adapter", "list").output
    assert trained["ref"] in listed and "3 users" in listed and "FORGOTTEN" not in listed
    shown = json.loads(run("task-adapter", "show", "movielens-rating").stdout)
    assert shown["metadata"]["source"]["cut"] == "time" and "user_keys" not in shown["metadata"]
    report = run(
        "eval",
        "run",
        "--task",
        "movielens-rating",
        "--synthetic",
        "3",
        "--methods",
        "none,zero-shot",
        "--train-via",
        "inline",
    ).output
    assert f"base: task adapter {trained['ref']}" in report and "zero-shot" in report
    bad = run("eval", "run", "--task", "movielens-rating", "--synthetic", "3", "--base", "other")
    assert bad.exit_code == 2 and "--base must be" in bad.output
    assert run("task-adapter", "remove", "movielens-rating", "--version", "1").exit_code == 0
    gone = run("task-adapter", "show", "movielens-rating")
    assert gone.exit_code == 2 and "no task adapter" in gone.output


def test_an_inline_task_adapter_training_leaves_a_job_record_with_its_progress(run, monkeypatch):
    monkeypatch.setenv(
        "PERSONALIZE_TASK_ADAPTER",
        json.dumps(
            {"lora": {"epochs": 1, "batch_size": 4, "max_length": 64, "rank": 2, "max_tokens": None}, "max_pairs": 8}
        ),
    )
    monkeypatch.setenv("PERSONALIZE_TORCH_THREADS", "1")
    trained = json.loads(
        run("task-adapter", "train", "--task", "movielens-rating", "--data", "SYNTHETIC", "--users", "2").stdout
    )
    [job] = json.loads(run("task-adapter", "jobs", "--json").stdout)
    assert job["state"] == "done" and job["progress"] == 1.0 and job["adapter"] == trained["ref"]
    failed = run("task-adapter", "train", "--task", "movielens-rating", "--data", "/nonexistent", "--users", "2")
    assert failed.exit_code == 2 and "error:" in failed.output
    states = sorted(j["state"] for j in json.loads(run("task-adapter", "jobs", "--json").stdout))
    assert states == ["done", "failed"]
