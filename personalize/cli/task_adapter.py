"""``personalize task-adapter``: train, list, show and remove task adapters, and their training jobs."""

from __future__ import annotations

from pathlib import Path

import typer

from personalize.cli.common import clear_errors, client, print_json
from personalize.errors import InvalidInputError, PersonalizeError

task_adapter_app = typer.Typer(
    help="Task adapters: one LoRA per task and base model, trained on pooled users, merged into the base.",
    no_args_is_help=True,
)


@task_adapter_app.command("train")
@clear_errors
def task_adapter_train(
    task: str = typer.Option(..., "--task"),
    data: str = typer.Option(
        ..., "--data", help="A raw-data folder (builder), LaMP files, 'store' (the store's users) or SYNTHETIC"
    ),
    split: str = typer.Option("test", "--split", help="The evaluated split (time cut: before its first queries)"),
    users: int | None = typer.Option(None, "--users", help="The first N users of the split (time cut)"),
    cut: str = typer.Option("time", "--cut", help="time (default) or user"),
    eval_users: int | None = typer.Option(None, "--eval-users", help="cut=user: hold out the first N users"),
    retriever: str = typer.Option("bm25", "--retriever", help="Retriever for the context pairs (as rag's)"),
    k: int = typer.Option(4, "--k"),
    via: str = typer.Option("inline", "--via", help="inline (this process, a bar with an ETA) or workers (Celery)"),
) -> None:
    """Train a task adapter on pooled pairs of many users (about half with retrieved context)."""
    from personalize.adapters.task_adapters import TaskAdapterSource, check_pair_retriever
    from personalize.jobs.task_adapter_jobs import queue_train, run_job

    if cut not in ("time", "user"):
        raise InvalidInputError(f"--cut must be time or user, got {cut!r}")
    source = TaskAdapterSource(
        task=task,
        data=data if data in ("store", "SYNTHETIC") else str(Path(data).resolve()),
        split=split,
        users=users,
        cut=cut,
        eval_users=eval_users,
        retriever=check_pair_retriever(retriever),
        k=k,
    )
    with client() as p:
        if via == "workers":
            typer.echo(f"queued task adapter job {queue_train(p, source)}; `personalize task-adapter jobs` shows it")
            return
        if via != "inline":
            raise InvalidInputError(f"--via must be inline or workers, got {via!r}")
        job_id = p.task_adapters.new_job(source, p.settings.model, "inline (personalize task-adapter train)")
        outcome = run_job(p, job_id, progress=True)  # the job record carries progress and ETA for the dashboard
        record = p.task_adapters.job(job_id) or {}
        if outcome != "done":
            raise PersonalizeError(f"task adapter training {outcome}: {record.get('error', 'no record')}")
        info = p.task_adapters.get(task, p.settings.model)
    print_json(info.summary())


@task_adapter_app.command("list")
@clear_errors
def task_adapter_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every stored task adapter; one trained on a forgotten user is marked until it is retrained."""
    with client() as p:
        rows = [info.summary() for info in p.task_adapters.all()]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no task adapters; train one with `personalize task-adapter train --task T --data SRC`")
    for r in rows:
        mark = f"\tFORGOTTEN USERS: {r['forgotten_users']} (retrain pending)" if r["forgotten_users"] else ""
        typer.echo(
            f"{r['ref']}\t{r['base_model']}\t{r['users']} users\t{r['pairs']} pairs ({r['with_context']} with "
            f"context)\t{r['tokens']} tokens\tloss {r['final_loss']:.3f}\t{r['seconds']:.0f} s{mark}"
        )


@task_adapter_app.command("show")
@clear_errors
def task_adapter_show(task: str, version: int | None = typer.Option(None, "--version")) -> None:
    """One task adapter's metadata (the newest unless --version)."""
    with client() as p:
        info = p.task_adapters.get(task, p.settings.model, version)
    metadata = {k: v for k, v in info.metadata.items() if k != "user_keys"}
    print_json({**info.summary(), "metadata": metadata})


@task_adapter_app.command("remove")
@clear_errors
def task_adapter_remove(task: str, version: int = typer.Option(..., "--version")) -> None:
    """Delete one task adapter version (user adapters trained on it are then refused until retrained)."""
    with client() as p:
        path = p.task_adapters.remove(task, p.settings.model, version)
    typer.echo(f"removed {path}")


@task_adapter_app.command("jobs")
@clear_errors
def task_adapter_jobs(as_json: bool = typer.Option(False, "--json")) -> None:
    """Task adapter training jobs: state, progress, ETA."""
    with client() as p:
        rows = p.task_adapters.jobs()
    if as_json:
        print_json(rows)
        return
    for r in rows:
        eta = f"\tETA {r['eta_s']:.0f} s" if r.get("eta_s") else ""
        typer.echo(
            f"{r['id']}\t{r['state']}\t{100 * r.get('progress', 0):.0f}%{eta}\t{r['source']['task']}\t"
            f"{r.get('adapter') or r.get('error') or r.get('reason', '')}"
        )
