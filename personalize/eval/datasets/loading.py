"""Where a task's split comes from: LaMP files in a folder, a raw-data builder (``BUILDERS``), or SYNTHETIC.

``personalize eval run``, ``data build`` and the task adapter jobs all load data through ``load_dataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from personalize.errors import InvalidInputError
from personalize.eval.datasets.lamp import Dataset, read_lamp
from personalize.eval.datasets.movielens import build_movielens_rating
from personalize.eval.datasets.reuters import build_reuters_authorship, build_reuters_lead
from personalize.eval.datasets.synthetic import synthetic_dataset

BUILDERS: dict[str, Callable[..., Dataset]] = {
    "movielens-rating": build_movielens_rating,
    "reuters-lead": build_reuters_lead,
    "reuters-authorship": build_reuters_authorship,
}


def load_dataset(
    task: str, split: str, data: str | Path | None, synthetic_users: int | None = None
) -> tuple[Dataset, str]:
    """A task's split from LaMP files in ``data``, or built from raw data by the task's builder, or SYNTHETIC;
    returns it with the source to record."""
    if synthetic_users:
        return synthetic_dataset(n_users=synthetic_users, split=split), "SYNTHETIC"
    if data is None:
        raise InvalidInputError("give --data: a MovieLens/Reuters folder, or a folder with LaMP json files")
    data = Path(data)
    questions = data / f"{split}_questions.json"
    if questions.is_file():
        outputs = data / f"{split}_outputs.json"
        return read_lamp(questions, outputs if outputs.is_file() else None, task), str(data)
    if task in BUILDERS:
        return BUILDERS[task](data, split), str(data)
    raise InvalidInputError(f"{data} holds no {split}_questions.json and {task!r} has no builder")
