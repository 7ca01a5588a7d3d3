"""``personalize db``: create or migrate the SQL schema, and check that SQL, Chroma and the adapter folders agree."""

from __future__ import annotations

import typer

from personalize.cli.common import clear_errors, client, print_json
from personalize.data.store import redact_url, upgrade_database
from personalize.settings import Settings

db_app = typer.Typer(help="The SQL database.", no_args_is_help=True)


@db_app.command("upgrade")
@clear_errors
def db_upgrade() -> None:
    """Create or migrate the schema (Alembic) in the configured database."""
    url = Settings().resolved_database_url
    upgrade_database(url)
    typer.echo(f"database {redact_url(url)} is at the latest schema")


@db_app.command("check")
@clear_errors
def db_check(
    repair: bool = typer.Option(False, "--repair", help="Fix what disagrees (SQL is the truth)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Do SQL, Chroma and the adapter folders agree? Exit 1 when they do not (and --repair was not given)."""
    with client() as p:
        report = p.check(repair=repair)
    if as_json:
        print_json(report.to_dict())
    else:
        for line in report.lines():
            typer.echo(line)
    if report.problems and not repair:
        raise typer.Exit(1)
