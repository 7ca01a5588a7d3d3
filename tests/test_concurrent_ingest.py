"""Chroma must never be written by two processes through one embedded folder: guard it, or use a server."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import movie_items

from personalize import Personalizer, Settings

pytestmark = pytest.mark.slow


def _write_jsonl(path, user_id: str, n: int) -> None:
    with path.open("w") as fh:
        for item in movie_items(n, prefix=f"{user_id}-"):
            fh.write(json.dumps({"user_id": user_id, **item}) + "\n")


def _import(path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "personalize.cli", "users", "import", str(path)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_embedded_writer_gets_a_clear_error_and_stores_nothing(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    env = {"PERSONALIZE_HOME": str(home)}
    data = tmp_path / "b.jsonl"
    _write_jsonl(data, "b", 5)
    with Personalizer(Settings(home=home, model=str(tiny_model_dir), _env_file=None)) as holder:
        holder.add_items("a", movie_items(3))  # this process now writes the embedded folder
        proc = _import(data, env)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, out + err
        assert "being written by process" in err and "chroma run" in err and "PERSONALIZE_CHROMA" in err
        assert "Traceback" not in err
        assert [u.user_id for u in holder.users()] == ["a"]  # the failed import left nothing in SQL
    proc = _import(data, env)  # once the first writer is gone, the same import works
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    with Personalizer(Settings(home=home, model=str(tiny_model_dir), _env_file=None)) as p:
        assert p.count_items("b") == 5 and p.vectors.count("b") == 5


def test_two_processes_ingest_2000_items_each_through_a_chroma_server(tmp_path, chroma_server, tiny_model_dir):
    home = tmp_path / "home"
    env = {"PERSONALIZE_HOME": str(home), "PERSONALIZE_CHROMA": chroma_server}
    files = {}
    for user_id in ("writer-1", "writer-2"):
        files[user_id] = tmp_path / f"{user_id}.jsonl"
        _write_jsonl(files[user_id], user_id, 2000)
    procs = [_import(path, env) for path in files.values()]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    settings = Settings(home=home, chroma=chroma_server, model=str(tiny_model_dir), _env_file=None)
    with Personalizer(settings) as p:
        for user_id in files:
            expected = {f"{user_id}-{i}" for i in range(2000)}
            assert {i.id for i in p.items(user_id)} == expected
            collection = p.vectors._collection(user_id, create=False)
            stored = collection.get(ids=sorted(expected), include=["embeddings"])
            assert set(stored["ids"]) == expected
            # every item is found by a query with its own embedding (a sample of them, to keep this quick)
            rng = np.random.default_rng(0)
            for n in rng.choice(2000, size=25, replace=False):
                item_id = f"{user_id}-{n}"
                text = p.store.items(user_id, [item_id])[0]
                hits = p.retrieve(user_id, text.text, k=3, retriever="dense")
                assert item_id in [h.id for h in hits]
