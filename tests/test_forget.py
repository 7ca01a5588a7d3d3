import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from personalize import Personalizer, Settings
from personalize.data.crashpoints import CRASH_ENV, FORGET_STEPS
from personalize.data.naming import collection_name, user_dir
from personalize.data.store import upgrade_database
from personalize.errors import StoreBusyError, UnknownUserError, VectorStoreUnavailableError

MARKER = "zebracorn-unique-marker"


def _files_containing(root, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            found.append(str(path))
    return found


def test_forget_removes_rows_collection_and_files(client, home):
    client.add_items("victim/../x", [{"id": str(i), "text": f"{MARKER} item {i}"} for i in range(20)])
    client.add_items("bystander", [{"id": "1", "text": "unrelated text"}])
    folder = user_dir(client.settings.users_dir, "victim/../x")
    folder.mkdir(parents=True)
    (folder / "note.txt").write_text(MARKER)
    report = client.forget("victim/../x")
    assert report.items == 20 and report.collection and str(folder) in report.files
    with pytest.raises(UnknownUserError):
        client.user("victim/../x")
    with pytest.raises(UnknownUserError):
        client.retrieve("victim/../x", MARKER)
    assert client.vectors.count("victim/../x") == 0
    assert client.retrieve("bystander", MARKER, k=5)[0].item.text == "unrelated text"
    client.close()  # flush Chroma and SQLite before reading the bytes on disk
    assert _files_containing(home, MARKER.encode()) == []


def test_forget_unknown_user_raises(client):
    with pytest.raises(UnknownUserError):
        client.forget("nobody")


# -- forget while other processes hold the stores, and crashes in the middle of it ---------------------------------

VICTIM = "victim-zebracorn-user"
NEEDLES = (MARKER.encode(), VICTIM.encode(), b"zebracorn-id-")


def _victim_items(n: int = 40) -> list[dict]:
    return [{"id": f"zebracorn-id-{i}", "text": f"{MARKER} item {i}", "output": f"{MARKER} out"} for i in range(n)]


def _leftovers(root) -> dict[str, list[str]]:
    """Which files under ``root`` still hold any of the victim's id, item ids or texts."""
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [n.decode() for n in NEEDLES if n in data]
            if hits:
                found[str(path)] = hits
    return found


def _holder(code: str) -> subprocess.Popen:
    """Another process (a worker, the dashboard) that holds a store open; it prints "ready" once it does."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_forget_leaves_no_bytes_while_another_process_reads_the_database(client, home):
    client.add_items(VICTIM, _victim_items())
    client.add_items("bystander", [{"id": "1", "text": "unrelated text"}])
    assert _leftovers(home)  # the needles are findable before forget: the grep below could fail
    # the other process is inside a read transaction when forget starts, ends it a moment later, stays connected
    reader = _holder(
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(home / 'personalize.db')!r})\n"
        "c.execute('BEGIN'); c.execute('SELECT count(*) FROM items').fetchall()\n"
        "print('ready', flush=True); time.sleep(1); c.execute('COMMIT')\n"
        "c.execute('SELECT count(*) FROM users').fetchall(); time.sleep(600)\n"
    )
    try:
        report = client.forget(VICTIM)
        assert report.items == 40 and report.collection and report.wal_truncated
        assert _leftovers(home) == {}  # the client is still open and so is the other process
        assert client.retrieve("bystander", "unrelated", k=1)[0].item.text == "unrelated text"
    finally:
        _stop(reader)


def test_forget_while_another_process_writes_chroma_changes_nothing(settings, home):
    with Personalizer(settings) as first:
        first.add_items(VICTIM, _victim_items(20))
    writer = _holder(
        "import time\nfrom personalize.retrieval.vectorstore import VectorStore\n"
        f"VectorStore({str(home / 'chroma')!r}).lock_for_writing()\nprint('ready', flush=True); time.sleep(600)\n"
    )
    try:
        with Personalizer(settings) as p:
            with pytest.raises(StoreBusyError, match="being written by process"):
                p.forget(VICTIM)
            assert p.count_items(VICTIM) == 20 and p.vectors.count(VICTIM) == 20  # nothing was deleted
    finally:
        _stop(writer)
    with Personalizer(settings) as p:
        report = p.forget(VICTIM)
        assert report.items == 20 and report.collection
        assert p.check().problems == 0
    assert _leftovers(home) == {}


@pytest.mark.parametrize("step", FORGET_STEPS)
def test_forget_killed_half_way_is_completed_by_repair(settings, home, step):
    with Personalizer(settings) as p:
        p.add_items(VICTIM, _victim_items(20))
        folder = user_dir(p.settings.users_dir, VICTIM)  # the user's files, removed after Chroma
        folder.mkdir(parents=True)
        (folder / "note.txt").write_text(MARKER)
    env = {**os.environ, "PERSONALIZE_HOME": str(home), CRASH_ENV: step}
    proc = subprocess.run([sys.executable, "-m", "personalize.cli", "users", "forget", VICTIM], env=env)
    assert proc.returncode == -signal.SIGKILL
    with Personalizer(settings) as p:
        with pytest.raises(UnknownUserError):
            p.user(VICTIM)  # the SQL delete had committed
        found = p.check()
        assert found.orphan_collections == ([collection_name(VICTIM)] if step == "forget-sql-deleted" else [])
        assert found.orphan_user_folders == [str(folder)]
        assert p.check(repair=True).problems == found.problems
        assert p.check().problems == 0 and p.vectors.count(VICTIM) == 0
    assert _leftovers(home) == {}


@pytest.mark.postgres
def test_forget_on_postgres_and_a_chroma_server_is_all_or_nothing(
    postgres_url, chroma_server, tiny_model_dir, tmp_path
):
    from test_faults import TcpProxy

    upgrade_database(postgres_url)
    host, port = chroma_server.rsplit(":", 1)[0].split("//")[1], int(chroma_server.rsplit(":", 1)[1])
    proxy = TcpProxy((host, port))
    settings = Settings(
        home=tmp_path / "home",
        database_url=postgres_url,
        chroma=f"http://127.0.0.1:{proxy.port}",
        model=str(tiny_model_dir),
        auto_train=False,
        _env_file=None,
    )
    with Personalizer(settings) as p:
        p.add_items(VICTIM, _victim_items(20))
        p.add_items("bystander", [{"id": "1", "text": "unrelated text"}])
        proxy.down()
        with pytest.raises(VectorStoreUnavailableError, match="nothing was changed"):
            p.forget(VICTIM)
        proxy.restore()
        assert p.count_items(VICTIM) == 20 and p.vectors.count(VICTIM) == 20  # the rows are all still there
        report = p.forget(VICTIM)
        assert report.items == 20 and report.collection
        with pytest.raises(UnknownUserError):
            p.user(VICTIM)
        assert p.vectors.count(VICTIM) == 0 and collection_name(VICTIM) not in p.vectors.collection_names()
        assert p.check().problems == 0 and p.count_items() == 1
        p.vectors.upsert(VICTIM, ["zebracorn-id-0"], np.ones((1, 384), dtype=np.float32))  # as a crash leaves it
        assert p.check().orphan_collections == [collection_name(VICTIM)]
        assert p.check(repair=True).repaired and p.check().problems == 0  # the writers' lock works on PostgreSQL
