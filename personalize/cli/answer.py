"""The top-level commands that answer a user, ``personalize retrieve`` and ``generate``, and how they read a
prompt (argument, stdin or file).

Plain functions: ``personalize.cli.root`` registers them on the root app, in help order.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from personalize.cli.common import clear_errors, client, print_json
from personalize.errors import InvalidInputError

STDIN = "-"


def read_prompt(text: str | None, path: Path | None, what: str, max_chars: int) -> str:
    """The prompt (or query) from the argument, from stdin (``-``) or from a file; a long prompt breaks a shell.

    At most what ``max_chars`` characters can take in UTF-8 is read, so a huge file is refused without loading it."""
    if (text is None) == (path is None):
        raise InvalidInputError(
            f"give the {what} once: as an argument, '-' to read it from stdin, or --{what}-file PATH"
            + ("" if text is None else ", not both")
        )
    if text is not None and text != STDIN:
        return text
    limit = 4 * max_chars + 4
    source = "stdin" if path is None or str(path) == STDIN else str(path)
    try:
        if path is None or source == "stdin":  # source is "stdin" whenever path is None
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise InvalidInputError(f"cannot read the {what} from {source}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InvalidInputError(
            f"the {what} in {source} is longer than {max_chars:,} characters (PERSONALIZE_MAX_PROMPT_CHARS)"
        )
    try:
        value = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"the {what} in {source} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value


@clear_errors
def retrieve(
    user_id: str,
    query: Annotated[str | None, typer.Argument(help="The query; '-' reads it from stdin")] = None,
    query_file: Path | None = typer.Option(None, "--query-file", "--prompt-file", help="Read the query from a file"),
    k: int | None = None,
    retriever: str | None = None,
) -> None:
    """Show the user's items most relevant to a query."""
    with client() as p:
        query = read_prompt(query, query_file, "query", p.settings.max_prompt_chars)
        for hit in p.retrieve(user_id, query, k, retriever):
            typer.echo(f"{hit.score:8.4f}  [{hit.id}] {hit.item.text[:100]}")


@clear_errors
def generate(
    user_id: str,
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' reads it from stdin")] = None,
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="Read the prompt from a file ('-': stdin)"),
    method: str = "auto",
    k: int | None = None,
    retriever: str | None = None,
    max_new_tokens: int | None = None,
    task: str | None = None,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate an answer for a user."""
    with client() as p:
        prompt = read_prompt(prompt, prompt_file, "prompt", p.settings.max_prompt_chars)
        result = p.generate(user_id, prompt, method, k=k, max_new_tokens=max_new_tokens, retriever=retriever, task=task)
    if as_json:
        print_json(result.to_dict())
    else:
        print_result(result)


def print_result(result) -> None:  # noqa: ANN001
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
