"""The ``personalize`` command line: a thin shell over ``Personalizer``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from personalize.errors import PersonalizeError
from personalize.ingest import read_jsonl, read_lamp_questions
from personalize.personalizer import Personalizer
from personalize.settings import Settings
from personalize.store import redact_url, upgrade_database

app = typer.Typer(
    help="Personalize a language model per user: RAG, per-user LoRA (PEFT), or both.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The SQL database.", no_args_is_help=True)
users_app = typer.Typer(help="Users and their items.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")

SAMPLE_FILE = "sample_users.jsonl"
SAMPLE_USER = "sci-fi fan"
SAMPLE_PROMPT = (
    "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, 4, or 5 "
    "without further explanation. movie: Star Wars: Episode IV - A New Hope (1977) (Action, Adventure, Sci-Fi)"
)


def clear_errors(fn):  # noqa: ANN001, ANN201
    """Turn library errors into one readable line and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalizeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _client() -> Personalizer:
    return Personalizer(Settings())


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


@db_app.command("upgrade")
@clear_errors
def db_upgrade() -> None:
    """Create or migrate the schema (Alembic) in the configured database."""
    url = Settings().resolved_database_url
    upgrade_database(url)
    typer.echo(f"database {redact_url(url)} is at the latest schema")


@users_app.command("add")
@clear_errors
def users_add(user_id: str) -> None:
    """Create a user with no items."""
    with _client() as p:
        created = p.add_user(user_id)
    typer.echo(f"user {user_id!r} {'created' if created else 'already exists'}")


@users_app.command("import")
@clear_errors
def users_import(
    path: Path,
    lamp_task: Annotated[
        str | None, typer.Option("--lamp-task", help="Read a LaMP *_questions.json for this task")
    ] = None,
) -> None:
    """Add users and items from a JSONL file, or the profiles of a LaMP questions file."""
    users = read_lamp_questions(path, lamp_task) if lamp_task else read_jsonl(path)
    added = updated = unchanged = 0
    with _client() as p:
        for user_id, items in _progress(users.items(), "users"):
            report = p.add_items(user_id, items)
            added, updated, unchanged = added + report.added, updated + report.updated, unchanged + report.unchanged
    typer.echo(f"{len(users)} user(s): {added} item(s) added, {updated} updated, {unchanged} unchanged")


def _progress(iterable, unit: str):  # noqa: ANN001, ANN202
    from tqdm import tqdm

    items = list(iterable)
    return tqdm(items, unit=unit, disable=len(items) < 2 or not sys.stderr.isatty())


@users_app.command("list")
@clear_errors
def users_list(search: str | None = None, limit: int = 100, as_json: bool = typer.Option(False, "--json")) -> None:
    """List users with their item counts."""
    with _client() as p:
        rows = p.users(search, limit)
    if as_json:
        _print_json([asdict(r) for r in rows])
        return
    for row in rows:
        typer.echo(f"{row.user_id}\t{row.n_items} items\tversion {row.data_version}")


@users_app.command("count")
@clear_errors
def users_count() -> None:
    """How many users and items there are."""
    with _client() as p:
        typer.echo(f"{p.count_users()} users, {p.count_items()} items")


@users_app.command("show")
@clear_errors
def users_show(user_id: str, items: int = 10, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a user and their latest items."""
    with _client() as p:
        info = p.user(user_id)
        latest = p.items(user_id)[-items:] if items else []
    if as_json:
        _print_json({"user": asdict(info), "items": [asdict(i) for i in latest]})
        return
    typer.echo(f"user {info.user_id!r}: {info.n_items} items, data version {info.data_version}, tasks {info.tasks}")
    for item in latest:
        typer.echo(
            f"  [{item.id}] {item.timestamp or ''} {item.text[:100]}" + (f" -> {item.output}" if item.output else "")
        )


@users_app.command("forget")
@clear_errors
def users_forget(user_id: str) -> None:
    """Remove every trace of a user: rows, retrieval collection, adapters and files."""
    with _client() as p:
        report = p.forget(user_id)
    _print_json(report.to_dict())


@app.command("train")
@clear_errors
def train(
    user_id: Annotated[str | None, typer.Argument(help="The user to train; omit with --all")] = None,
    all_users: bool = typer.Option(False, "--all", help="Every user whose data changed since their adapter"),
    queue: bool = typer.Option(False, "--queue", help="Queue for the Celery workers instead of training here"),
    force: bool = typer.Option(False, "--force", help="Queue even if the adapter is up to date"),
) -> None:
    """Train per-user LoRA adapters, here (with a progress bar) or through the workers (--queue)."""
    with _client() as p:
        if all_users and queue:
            p.recover_jobs()
            for result in p.enqueue_all():
                typer.echo(f"{result.user_id}: {result.message}")
            return
        users = p.jobs.users_needing_training(p.settings.train_min_items, p.settings.model) if all_users else []
        if user_id is not None:
            users = [user_id]
        if not users:
            typer.echo("nothing to train: name a user, or --all finds users with changed data")
            return
        for uid in users:
            if queue:
                typer.echo(f"{uid}: {p.enqueue_training(uid, force=force).message}")
                continue
            adapter = p.train(uid, progress=True)
            typer.echo(
                f"{uid}: adapter v{adapter.version} on {adapter.n_items} items, loss {adapter.final_loss:.3f}, "
                f"{adapter.train_seconds:.1f} s, {adapter.size_bytes / 1e6:.1f} MB at {adapter.path}"
            )


@app.command("jobs")
@clear_errors
def jobs(user_id: str | None = None, limit: int = 20, as_json: bool = typer.Option(False, "--json")) -> None:
    """Training jobs, newest first, with state, progress, loss and errors."""
    with _client() as p:
        rows = p.training_jobs(user_id, limit)
    if as_json:
        _print_json([asdict(r) for r in rows])
        return
    for j in rows:
        loss = f"{j.loss:.3f}" if j.loss is not None else "-"
        error = f"  error: {j.error}" if j.error else ""
        typer.echo(f"job {j.id}\t{j.user_id}\t{j.state}\t{j.progress:.0%}\tloss {loss}\tattempts {j.attempts}{error}")


@app.command("adapters")
@clear_errors
def adapters(user_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A user's adapter versions."""
    with _client() as p:
        rows = p.adapters(user_id)
    if as_json:
        _print_json([asdict(r) for r in rows])
        return
    for a in rows:
        typer.echo(
            f"v{a.version}\tdata v{a.data_version}\t{a.n_items} items\tloss {a.final_loss or 0:.3f}\t"
            f"{a.train_seconds:.1f} s\t{a.size_bytes / 1e6:.1f} MB\t{a.path}"
        )


@app.command("retrieve")
@clear_errors
def retrieve(user_id: str, query: str, k: int | None = None, retriever: str | None = None) -> None:
    """Show the user's items most relevant to a query."""
    with _client() as p:
        for hit in p.retrieve(user_id, query, k, retriever):
            typer.echo(f"{hit.score:8.4f}  [{hit.id}] {hit.item.text[:100]}")


@app.command("generate")
@clear_errors
def generate(
    user_id: str,
    prompt: str,
    method: str = "auto",
    k: int | None = None,
    retriever: str | None = None,
    max_new_tokens: int | None = None,
    task: str | None = None,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate an answer for a user."""
    with _client() as p:
        result = p.generate(user_id, prompt, method, k, max_new_tokens, retriever, task)
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_result(result)


def _print_result(result) -> None:  # noqa: ANN001
    t = result.timings
    typer.echo(f"method: {result.method} (asked {result.requested_method}); task {result.task}")
    if result.retrieved:
        typer.echo("retrieved: " + ", ".join(f"{r.id} ({r.score:.3f})" for r in result.retrieved))
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(
        f"timings: retrieval {t.retrieval_s * 1000:.0f} ms, prompt {t.prompt_s * 1000:.0f} ms, "
        f"generation {t.generation_s * 1000:.0f} ms ({result.prompt_tokens} prompt + {result.new_tokens} new tokens)"
    )
    typer.echo(f"answer: {result.text}")


@app.command("demo")
@clear_errors
def demo(
    user_id: str = SAMPLE_USER,
    prompt: str = SAMPLE_PROMPT,
    max_new_tokens: int = 16,
) -> None:
    """The main job on the embedded defaults: load the sample users, generate with and without retrieval."""
    users = read_jsonl(Path(__file__).resolve().parent / "data" / SAMPLE_FILE)
    with _client() as p:
        for uid, items in users.items():
            report = p.add_items(uid, items)
            typer.echo(f"loaded {uid!r}: {report.added} new, {report.unchanged} unchanged item(s)")
        typer.echo(f"loading the model {p.settings.model} (the first run caches it under {p.settings.models_dir}) ...")
        _ = p.model
        typer.echo(f"\nprompt for {user_id!r}: {prompt}\n")
        for method in ("none", "rag"):
            typer.echo(f"--- {method} ---")
            _print_result(p.generate(user_id, prompt, method, max_new_tokens=max_new_tokens))
            typer.echo("")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
