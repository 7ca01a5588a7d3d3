"""``personalize data``: build LaMP-format task files from raw data, write a SYNTHETIC task, import LaMP files."""

from __future__ import annotations

from pathlib import Path

import typer

from personalize.cli.common import clear_errors, client
from personalize.errors import InvalidInputError

data_app = typer.Typer(help="Build or import LaMP-format task files.", no_args_is_help=True)


@data_app.command("build")
@clear_errors
def data_build(
    task: str,
    source: Path = typer.Argument(..., help="MovieLens folder (ratings.csv, movies.csv) or Reuters C50 folder"),
    out: Path = typer.Option(Path("data-build"), help="Folder for {split}_questions.json and {split}_outputs.json"),
    split: list[str] = typer.Option(["dev", "test"], help="Splits to build"),
) -> None:
    """Write LaMP-format files for movielens-rating, reuters-lead or reuters-authorship (deterministic)."""
    from personalize.eval.datasets.lamp import write_lamp
    from personalize.eval.datasets.loading import BUILDERS

    if task not in BUILDERS:
        raise InvalidInputError(f"no builder for {task!r}; builders: {', '.join(sorted(BUILDERS))}")
    for name in split:
        dataset = BUILDERS[task](source, name)
        questions, outputs = write_lamp(dataset, out / task)
        typer.echo(f"{task} {name}: {len(dataset.queries)} queries -> {questions}, {outputs}")


@data_app.command("synthetic")
@clear_errors
def data_synthetic(
    out: Path = typer.Option(Path("data-build"), help="Output folder"),
    users: int = 20,
    seed: int = 0,
    split: str = "test",
) -> None:
    """Write a SYNTHETIC movielens-rating-style task with planted per-user signals (for tests and demos)."""
    from personalize.eval.datasets.lamp import write_lamp
    from personalize.eval.datasets.synthetic import synthetic_dataset

    dataset = synthetic_dataset(n_users=users, seed=seed, split=split)
    questions, outputs = write_lamp(dataset, out / "synthetic")
    typer.echo(f"SYNTHETIC {dataset.task} {split}: {len(dataset.queries)} queries -> {questions}, {outputs}")


@data_app.command("import-lamp")
@clear_errors
def data_import_lamp(
    task: str = typer.Argument(..., help="lamp-1 .. lamp-7 (or one of our tasks)"),
    questions: Path = typer.Argument(..., help="{split}_questions.json"),
    outputs: Path | None = typer.Argument(None, help="{split}_outputs.json (golds), optional"),
) -> None:
    """Import the users' profiles of an official LaMP questions file (user-based or time-based)."""
    from personalize.data.ingest import lamp_item
    from personalize.eval.datasets.lamp import read_lamp

    dataset = read_lamp(questions, outputs, task)
    users = {user_id: [lamp_item(task, r) for r in raw] for user_id, raw in dataset.users().items()}
    with client() as p:
        p.import_users(users, show_progress=True)
    typer.echo(f"imported {len(dataset.users())} users of {task} ({len(dataset.queries)} queries)")
