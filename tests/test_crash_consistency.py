"""kill -9 at each step of an import: SQL and Chroma agree after repair, and retrieval still returns k items.

The import runs in a real subprocess (`personalize users import`) that SIGKILLs itself at a named step
(``PERSONALIZE_TEST_CRASH_AT``); the test then opens the same home as a new process would.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from personalize import Personalizer
from personalize.cli import app
from personalize.data.crashpoints import ADD_ITEMS_STEPS, CRASH_ENV
from personalize.data.ingest import read_jsonl
from personalize.data.naming import collection_name, user_key
from personalize.data.schema import Adapter, User

BASE, NEW, UPDATED = 6, 30, 2  # alice's items before the import; the import's new items; items it rewrites


def _base_items() -> list[dict]:
    return [{"id": f"old-{i}", "text": f"gardening note {i} about tomatoes and basil"} for i in range(BASE)]


def _import_file(path, user_id: str = "alice"):
    rows = [{"id": f"new-{i}", "text": f"space opera film {i} with starships"} for i in range(NEW)]
    rows += [{"id": f"old-{i}", "text": f"rewritten note {i} about starships"} for i in range(UPDATED)]
    path.write_text("".join(json.dumps({"user_id": user_id, **r}) + "\n" for r in rows))
    return path


def _crashed_import(path, home, step: str) -> None:
    env = {**os.environ, "PERSONALIZE_HOME": str(home), "PERSONALIZE_AUTO_TRAIN": "false", CRASH_ENV: step}
    proc = subprocess.run([sys.executable, "-m", "personalize.cli", "users", "import", str(path)], env=env)
    assert proc.returncode == -9, f"the import was to be killed at {step!r}"


def _agree(p: Personalizer, user_id: str) -> None:
    """SQL and Chroma hold the same ids, every vector for the stored version of its item."""
    assert p.check().problems == 0
    assert set(p.vectors.entries(user_id)) == {i.id for i in p.items(user_id)}


@pytest.mark.parametrize("step", ADD_ITEMS_STEPS)
def test_import_killed_at_each_step(settings, home, tmp_path, step):
    with Personalizer(settings) as p:
        p.add_items("alice", _base_items())
    path = _import_file(tmp_path / "import.jsonl")
    _crashed_import(path, home, step)

    committed = step == "committed"
    with Personalizer(settings) as p:
        assert p.count_items("alice") == (BASE + NEW if committed else BASE)  # all of the import, or none of it
        hits = p.retrieve("alice", "space opera film with starships", k=BASE, retriever="dense")
        assert len(hits) == BASE  # vectors without rows are skipped, never returned short
        found = p.check()
        if step == "chroma-written":  # vectors written, SQL rolled back: new ids and the rewritten items' vectors
            assert found.orphan_vectors == {"alice": NEW} and found.unindexed_items == {"alice": UPDATED}
            assert p.vectors.count("alice") == BASE + NEW
        else:
            assert found.problems == 0
        repaired = p.check(repair=True)
        assert repaired.problems == found.problems and repaired.repaired
        _agree(p, "alice")
        assert p.vectors.count("alice") == p.count_items("alice")
        stored = p.store.items("alice", ["old-0"])[0].text  # the rewritten item's vector is for its stored text again
        assert stored.startswith("rewritten" if committed else "gardening")
        assert p.retrieve("alice", stored, k=1, retriever="dense")[0].id == "old-0"

        users = read_jsonl(path)  # importing the same file again completes it
        p.add_items("alice", users["alice"])
        assert p.count_items("alice") == BASE + NEW
        _agree(p, "alice")
        assert len(p.retrieve("alice", "space opera", k=BASE + NEW, retriever="dense")) == BASE + NEW


def test_first_import_of_a_new_user_killed_after_chroma_leaves_a_collection_repair_removes(settings, home, tmp_path):
    path = _import_file(tmp_path / "import.jsonl", user_id="newcomer")
    _crashed_import(path, home, "chroma-written")
    with Personalizer(settings) as p:
        assert p.count_users() == 0
        found = p.check()
        assert found.orphan_collections == [collection_name("newcomer")]
        p.check(repair=True)
        assert p.check().problems == 0 and collection_name("newcomer") not in p.vectors.collection_names()


def test_repair_reconciles_adapter_rows_and_folders(client):
    client.add_items("alice", _base_items())
    root = client.adapter_store.root
    orphan_version = root / user_key("alice") / "v0009"  # renamed into place, its row never inserted
    temp = root / user_key("alice") / ".v0002.tmp-abc123"  # a killed training's temporary folder
    gone_user = root / user_key("forgotten long ago")  # the folder of a user SQL no longer knows
    for folder in (orphan_version, temp, gone_user / "v0001"):
        folder.mkdir(parents=True)
        (folder / "personalize.json").write_text("{}")
    with client.store.session() as s:  # a row whose folder was lost
        pk = s.query(User.id).filter(User.external_id == "alice").scalar()
        s.add(Adapter(user_pk=pk, version=1, path=str(root / user_key("alice") / "v0001"), base_model="m",
                      data_version=1, n_items=BASE, train_seconds=1.0, size_bytes=1))  # fmt: skip
    found = client.check()
    assert found.orphan_adapter_folders == [str(gone_user), str(orphan_version)]
    assert found.stale_temp_folders == [str(temp)] and len(found.missing_adapters) == 1
    client.check(repair=True)
    assert client.check().problems == 0
    assert not orphan_version.exists() and not temp.exists() and not gone_user.exists()
    assert client.adapters("alice") == []


def test_a_job_whose_worker_was_killed_is_shown_as_lost_and_requeued_by_repair(home, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("PERSONALIZE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PERSONALIZE_AUTO_TRAIN", "false")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a worker killed with no other worker running: its pid is gone, its job still says running
    with Personalizer() as p:
        p.add_items("alice", _base_items())
        job = p.jobs.create("alice")
        p.jobs.claim(job.id, worker=f"{socket.gethostname()}:{dead.pid}")
    runner = CliRunner()
    listed = runner.invoke(app, ["jobs"], catch_exceptions=False).output
    assert f"running (worker {socket.gethostname()}:{dead.pid} is gone" in listed
    as_json = json.loads(runner.invoke(app, ["jobs", "--json"], catch_exceptions=False).stdout)
    assert as_json[0]["worker_gone"] is True
    checked = runner.invoke(app, ["db", "check"], catch_exceptions=False)
    assert checked.exit_code == 1 and "running jobs whose worker is gone" in checked.output
    repaired = runner.invoke(app, ["db", "check", "--repair"], catch_exceptions=False)
    assert repaired.exit_code == 0 and f"requeued training jobs [{job.id}]" in repaired.output
    with Personalizer() as p:
        assert p.jobs.get(job.id).state == "queued"
    assert runner.invoke(app, ["db", "check"], catch_exceptions=False).exit_code == 0
