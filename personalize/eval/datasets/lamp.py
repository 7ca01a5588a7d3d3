"""LaMP files and the types every dataset is made of: ``Query``, ``Dataset``, the splits, reading and writing.

A ``Dataset`` is a list of ``Query`` values (id, user, input, gold, profile as raw LaMP item dicts). ``write_lamp``
writes ``{split}_questions.json`` and ``{split}_outputs.json`` exactly as LaMP lays them out (../shared/LAMP.md
section 2); ``read_lamp`` reads them back (or the official LaMP files). The builders (``movielens``, ``reuters``,
``synthetic``) make ``Dataset`` values; this module is the one they and the evaluation share.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.data.checks import check_id, check_json, check_string
from personalize.data.ingest import lamp_item, lamp_user_id, load_json
from personalize.data.naming import MAX_USER_ID_CHARS
from personalize.errors import InvalidInputError, MalformedFileError
from personalize.tasks.registry import get_task

SPLITS = ("dev", "test")


@dataclass
class Query:
    """One question: the user it belongs to, the model input, the gold output and the user's profile (raw dicts)."""

    id: str
    user_id: str
    input: str
    gold: str | None
    profile: list[dict[str, Any]]


@dataclass
class Dataset:
    task: str
    split: str
    queries: list[Query]
    synthetic: bool = False
    source: str = ""

    def users(self) -> dict[str, list[dict[str, Any]]]:
        """Per user id (first-seen order), the union of its queries' profile items by id, in first-seen order."""
        users: dict[str, dict[str, dict[str, Any]]] = {}
        for query in self.queries:
            items = users.setdefault(query.user_id, {})
            for raw in query.profile:
                items.setdefault(str(raw.get("id")), raw)
        return {user: list(items.values()) for user, items in users.items()}

    def __len__(self) -> int:
        return len(self.queries)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=None)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lamp(dataset: Dataset, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``{split}_questions.json`` and ``{split}_outputs.json`` (LaMP layout); returns both paths.

    Questions keep the dataset's order and carry ``user_id`` (as LaMP's time-based files do). ``golds`` lists the
    queries that have a gold, in the same order. The task in the outputs file is the LaMP name (``LaMP_3``) for
    LaMP tasks and our task name otherwise.
    """
    out_dir = Path(out_dir)
    task = get_task(dataset.task)
    questions = [{"id": q.id, "input": q.input, "profile": q.profile, "user_id": q.user_id} for q in dataset.queries]
    outputs = {
        "task": task.lamp_name or task.name,
        "golds": [{"id": q.id, "output": q.gold} for q in dataset.queries if q.gold is not None],
    }
    questions_path = out_dir / f"{dataset.split}_questions.json"
    outputs_path = out_dir / f"{dataset.split}_outputs.json"
    _write_atomic(questions_path, _dumps(questions) + "\n")
    _write_atomic(outputs_path, _dumps(outputs) + "\n")
    return questions_path, outputs_path


def _load_json(path: Path) -> Any:
    return load_json(path)


def _split_name(path: Path) -> str:
    stem = path.stem
    for suffix in ("_questions", "_outputs"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_lamp(questions_path: str | Path, outputs_path: str | Path | None, task: str) -> Dataset:
    """Read LaMP files (official or written by ``write_lamp``) into a ``Dataset``.

    A question without ``user_id`` (LaMP's user-based splits) belongs to a user named by the question id. Profile
    items are kept as the raw dicts, after checking each one as ``personalize.data.ingest.lamp_item`` would store it.
    Without ``outputs_path`` every gold is ``None``; a question the outputs file does not mention also gets ``None``.
    The split is the questions file name without ``_questions`` (``dev_questions.json`` → ``dev``).
    Anything malformed raises ``MalformedFileError`` naming the file and the question.
    """
    questions_path = Path(questions_path)
    task_name = get_task(task).name
    raw_questions = _load_json(questions_path)
    if not isinstance(raw_questions, list):
        raise MalformedFileError(questions_path, "top level", "expected a JSON list of questions")
    queries: list[Query] = []
    seen: set[str] = set()
    for n, question in enumerate(raw_questions):
        where = f"question {n}"
        if not isinstance(question, dict):
            raise MalformedFileError(questions_path, where, "expected an object with 'id', 'input' and 'profile'")
        missing = [k for k in ("id", "input", "profile") if k not in question]
        if missing:
            raise MalformedFileError(questions_path, where, f"missing {', '.join(repr(k) for k in missing)}")
        try:
            qid = check_id(question["id"], "'id'", MAX_USER_ID_CHARS)
            check_string(question["input"], "'input'")
        except InvalidInputError as exc:
            raise MalformedFileError(questions_path, where, str(exc)) from None
        if qid in seen:
            raise MalformedFileError(questions_path, where, f"duplicate question id {qid!r}")
        seen.add(qid)
        profile = question["profile"]
        if not isinstance(profile, list):
            raise MalformedFileError(questions_path, where, "'profile' must be a list of items")
        try:
            user_id = lamp_user_id(question)
            for i, raw in enumerate(profile):
                if not isinstance(raw, dict):
                    raise InvalidInputError(f"profile item {i} must be an object")
                lamp_item(task_name, raw)
        except InvalidInputError as exc:
            raise MalformedFileError(questions_path, where, str(exc)) from None
        queries.append(Query(qid, user_id, question["input"], None, profile))

    if outputs_path is not None:
        outputs_path = Path(outputs_path)
        outputs = _load_json(outputs_path)
        if not isinstance(outputs, dict) or not isinstance(outputs.get("golds"), list):
            raise MalformedFileError(outputs_path, "top level", 'expected {"task": ..., "golds": [...]}')
        golds: dict[str, str] = {}
        for n, gold in enumerate(outputs["golds"]):
            where = f"gold {n}"
            if not isinstance(gold, dict) or "id" not in gold or "output" not in gold:
                raise MalformedFileError(outputs_path, where, "expected an object with 'id' and 'output'")
            if not isinstance(gold["output"], str | int | float) or isinstance(gold["output"], bool):
                raise MalformedFileError(outputs_path, where, "'output' must be a string")
            try:
                gid = check_id(gold["id"], "'id'", MAX_USER_ID_CHARS)
                check_json(gold["output"], "'output'")
            except InvalidInputError as exc:
                raise MalformedFileError(outputs_path, where, str(exc)) from None
            if gid in golds:
                raise MalformedFileError(outputs_path, where, f"duplicate gold id {gid!r}")
            golds[gid] = str(gold["output"])
        for query in queries:
            query.gold = golds.get(query.id)
    return Dataset(task_name, _split_name(questions_path), queries, source=str(questions_path))


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split
