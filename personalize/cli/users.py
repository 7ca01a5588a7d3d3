"""``personalize users``: add, import, list, count, show and forget users and their items."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from personalize.cli.common import clear_errors, client, print_json
from personalize.data.ingest import read_jsonl, read_lamp_questions

users_app = typer.Typer(help="Users and their items.", no_args_is_help=True)


@users_app.command("add")
@clear_errors
def users_add(user_id: str) -> None:
    """Create a user with no items."""
    with client() as p:
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
    with client() as p:
        reports = p.import_users(users, show_progress=True)
    added, updated, unchanged = (sum(getattr(r, k) for r in reports) for k in ("added", "updated", "unchanged"))
    typer.echo(f"{len(users)} user(s): {added} item(s) added, {updated} updated, {unchanged} unchanged")


@users_app.command("list")
@clear_errors
def users_list(search: str | None = None, limit: int = 100, as_json: bool = typer.Option(False, "--json")) -> None:
    """List users with their item counts."""
    with client() as p:
        rows = p.users(search, limit)
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    for row in rows:
        typer.echo(f"{row.user_id}\t{row.n_items} items\tversion {row.data_version}")


@users_app.command("count")
@clear_errors
def users_count() -> None:
    """How many users and items there are."""
    with client() as p:
        typer.echo(f"{p.count_users()} users, {p.count_items()} items")


@users_app.command("show")
@clear_errors
def users_show(user_id: str, items: int = 10, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a user and their latest items."""
    with client() as p:
        info = p.user(user_id)
        latest = p.items(user_id)[-items:] if items else []
    if as_json:
        print_json({"user": asdict(info), "items": [asdict(i) for i in latest]})
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
    with client() as p:
        report = p.forget(user_id)
    print_json(report.to_dict())
