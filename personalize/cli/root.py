"""The root ``personalize`` app: the top-level commands and the sub-apps, registered here in help order.

Each sub-app (``db``, ``users``, ``eval``, ``router``, ``data``, ``task-adapter``, ``vllm``) is its own module with
its own ``typer.Typer``; the top-level commands are plain functions in ``training`` and ``answer`` (and ``demo``
here), so this module is the one place that shows the whole command tree.
"""

from __future__ import annotations

import typer

from personalize.cli.answer import generate, retrieve
from personalize.cli.common import clear_errors, client
from personalize.cli.data import data_app
from personalize.cli.db import db_app
from personalize.cli.eval import eval_app
from personalize.cli.router import router_app
from personalize.cli.serve import serve
from personalize.cli.task_adapter import task_adapter_app
from personalize.cli.training import adapters, jobs, train
from personalize.cli.users import users_app
from personalize.cli.vllm import vllm_app

app = typer.Typer(
    help="Personalize a language model per user: RAG, per-user LoRA (PEFT), or both.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(eval_app, name="eval")
app.add_typer(router_app, name="router")
app.add_typer(data_app, name="data")
app.add_typer(task_adapter_app, name="task-adapter")
app.add_typer(vllm_app, name="vllm")


@clear_errors
def demo() -> None:
    """The main job on the embedded defaults: the sample users, a small task adapter, every method per user, and a
    small comparison (SYNTHETIC) that the dashboard opens on."""
    from personalize.demo import run_demo

    with client() as p:
        run_demo(p, typer.echo)


app.command("train")(train)
app.command("jobs")(jobs)
app.command("adapters")(adapters)
app.command("retrieve")(retrieve)
app.command("generate")(generate)
app.command("demo")(demo)
app.command("serve")(serve)


def main() -> None:  # pragma: no cover
    app()
