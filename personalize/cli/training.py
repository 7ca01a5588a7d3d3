"""The top-level training commands, ``personalize train``, ``jobs`` and ``adapters``: per-user adapters (LoRA, or
another registered adapter method with ``--method``).

Plain functions: ``personalize.cli.root`` registers them on the root app, in help order.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from personalize.cli.common import clear_errors, client, print_json


@clear_errors
def train(
    user_id: Annotated[str | None, typer.Argument(help="The user to train; omit with --all")] = None,
    all_users: bool = typer.Option(False, "--all", help="Every user whose data changed since their adapter"),
    queue: bool = typer.Option(False, "--queue", help="Queue for the Celery workers instead of training here"),
    force: bool = typer.Option(False, "--force", help="Queue even if the adapter is up to date"),
    method: str = typer.Option(
        "lora",
        "--method",
        help="Adapter method: lora, ia3, prompt-tuning, p-tuning or prefix-tuning (served as peft:<method>; "
        "--all trains LoRA)",
    ),
) -> None:
    """Train per-user adapters, here (with a progress bar) or through the workers (--queue)."""
    from personalize.adapters.methods import get_adapter_method

    get_adapter_method(method)
    with client() as p:
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
                typer.echo(f"{uid}: {p.enqueue_training(uid, force=force, method=method).message}")
                continue
            adapter = p.train(uid, progress=True, method=method)
            typer.echo(
                f"{uid}: {adapter.method} adapter v{adapter.version} on {adapter.n_items} items, "
                f"loss {adapter.final_loss:.3f}, {adapter.train_seconds:.1f} s, "
                f"{adapter.size_bytes / 1e6:.1f} MB at {adapter.path}"
            )


@clear_errors
def jobs(user_id: str | None = None, limit: int = 20, as_json: bool = typer.Option(False, "--json")) -> None:
    """Training jobs, newest first, with state, progress, loss and errors."""
    from personalize.data.consistency import lost_jobs

    with client() as p:
        rows = p.training_jobs(user_id, limit)
        lost = lost_jobs(p, [j.id for j in rows if j.state == "running"])
    if as_json:
        print_json([{**asdict(r), "worker_gone": r.id in lost} for r in rows])
        return
    for j in rows:
        loss = f"{j.loss:.3f}" if j.loss is not None else "-"
        error = f"  error: {j.error}" if j.error else ""
        state = f"{j.state} (worker {j.worker} is gone: requeued when a worker starts)" if j.id in lost else j.state
        typer.echo(
            f"job {j.id}\t{j.user_id}\t{j.method}\t{state}\t{j.progress:.0%}\tloss {loss}\tattempts {j.attempts}{error}"
        )


@clear_errors
def adapters(user_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A user's adapter versions."""
    with client() as p:
        rows = p.adapters(user_id)
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    for a in rows:
        typer.echo(
            f"v{a.version}\t{a.method}\tdata v{a.data_version}\t{a.n_items} items\tloss {a.final_loss or 0:.3f}\t"
            f"{a.train_seconds:.1f} s\t{a.size_bytes / 1e6:.1f} MB\t{a.path}"
        )
