"""``personalize eval``: run (or resume) the LaMP-style comparison, report it, compare two runs, list runs."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError

from personalize.cli.common import clear_errors, client
from personalize.errors import InvalidInputError
from personalize.methods import adapter_method_of, uses_adapter
from personalize.personalizer import Personalizer
from personalize.settings import Settings

eval_app = typer.Typer(help="The LaMP-style comparison: run, resume, report.", no_args_is_help=True)


def _load_dataset(task: str, split: str, data: Path | None, synthetic_users: int | None):  # noqa: ANN202
    from personalize.eval.datasets.loading import load_dataset

    return load_dataset(task, split, data, synthetic_users)


def _method_list(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise InvalidInputError("--methods is empty; give model methods and/or baselines, comma-separated")
    return names


@eval_app.command("run")
@clear_errors
def eval_run(
    task: str | None = typer.Option(None, "--task", help="Required unless --resume"),
    split: str = typer.Option("test", "--split"),
    data: Path | None = typer.Option(None, "--data", help="Source folder (raw data with a builder, or LaMP files)"),
    users: int | None = typer.Option(None, "--users", help="First N users"),
    per_user: int | None = typer.Option(None, "--per-user", help="At most N queries per user (the first ones)"),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Comma-separated model methods (none,rag,peft,rag+peft) and baselines (majority, user-majority, "
        "user-mean, nearest, nearest-mean, input-copy; 'baselines' for all that apply). Default: all that apply. "
        "With --resume: methods to add to the run.",
    ),
    retriever: str = typer.Option("bm25", "--retriever"),
    k: int = typer.Option(4, "--k"),
    scoring: str = typer.Option("auto", "--scoring", help="auto|likelihood|calibrated|generate (label tasks)"),
    decision: str = typer.Option(
        "argmax",
        "--decision",
        help="argmax|median: under likelihood scoring, the most likely label, or the median of the label "
        "distribution (numeric labels; minimises expected absolute error)",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    train_via: str = typer.Option("workers", "--train-via", help="workers (Celery) or inline"),
    workers: int = typer.Option(1, "--workers", help="Local workers to start for training (0: use running ones)"),
    synthetic_users: int | None = typer.Option(None, "--synthetic", help="Use N SYNTHETIC users instead of data"),
    resume: str | None = typer.Option(None, "--resume", help="Continue this interrupted run id"),
    peft_methods: str | None = typer.Option(
        None,
        "--peft-methods",
        help="Adapter methods to compare, comma-separated (lora, ia3, prompt-tuning, p-tuning, prefix-tuning): each "
        "adds peft:<method> and rag+peft:<method> (lora is plain peft and rag+peft)",
    ),
    base: str = typer.Option(
        "task",
        "--base",
        help="task: none/rag/peft/rag+peft run on the base with the task adapter merged in (where one exists; "
        "zero-shot is then added as a method); zero-shot: on the plain base model",
    ),
) -> None:
    """Ingest, train (workers), answer every query with every method, and store it all under a run id."""
    from personalize.eval.config import EvalConfig, code_version, default_methods, resolve_methods, with_peft_methods
    from personalize.eval.reports import build_report, format_report
    from personalize.eval.runner import EvaluationRunner

    with client() as p:
        runner = EvaluationRunner(p)
        if resume:
            config = runner.add_methods(resume, _method_list(methods)) if methods else runner.config_of(resume)
            if config.decoder and config.decoder != p.settings.decoder:
                raise InvalidInputError(
                    f"run {resume} was made with decoder {config.decoder!r}: resume it with "
                    f"PERSONALIZE_DECODER={config.decoder} so every answer comes from the same path"
                )
            dataset, _ = _load_dataset(
                config.task,
                config.split,
                Path(config.source) if not config.synthetic else None,
                config.users if config.synthetic else None,
            )
        else:
            if not task:
                raise InvalidInputError("give --task (or --resume RUN_ID)")
            if base not in ("task", "zero-shot"):
                raise InvalidInputError(f"--base must be task or zero-shot, got {base!r}")
            adapted = base == "task" and p.bases.current_task_adapter(task) is not None
            chosen = resolve_methods(task, _method_list(methods)) if methods else default_methods(task, adapted)
            if peft_methods:
                chosen = with_peft_methods(chosen, _method_list(peft_methods))
            trained = {adapter_method_of(m) for m in chosen if uses_adapter(m)} - {"lora"}
            dataset, source = _load_dataset(task, split, data, synthetic_users)
            try:
                config = EvalConfig(
                    task=task,
                    split=split,
                    source=source,
                    synthetic=dataset.synthetic,
                    users=synthetic_users or users,  # a SYNTHETIC run of N users resumes with the same N
                    per_user=per_user,
                    methods=chosen,
                    retriever=retriever,
                    k=k,
                    scoring=scoring,
                    decision=decision,
                    max_new_tokens=max_new_tokens,
                    train_via=train_via,
                    model=p.settings.model,
                    decoder=p.settings.decoder,
                    lora=p.settings.lora.model_dump(),
                    adapter_settings={m: _run_adapter_settings(p, m, retriever, k, decision) for m in sorted(trained)},
                    base=base,
                    code_version=code_version(),
                )
            except ValidationError as exc:  # an option the run's task cannot take
                raise InvalidInputError(str(exc.errors()[0].get("msg", exc))) from None
        run_id = runner.run(dataset, config, run_id=resume, start_workers=workers)
        typer.echo(format_report(build_report(p.store, run_id, stats=p.settings.stats)))
        typer.echo(f"\nrun id: {run_id}")


def _run_adapter_settings(p: Personalizer, method: str, retriever: str, k: int, decision: str) -> dict:
    """An adapter method's settings as the run stores them; a distilled adapter's teacher retrieves and decides as
    the run's rag does (its first stage, for a +rerank retriever), unless its own section says otherwise."""
    stored = p.settings.adapter_settings(method).model_dump()
    if method == "distill":
        stored["retriever"] = stored.get("retriever") or retriever.split("+")[0]
        stored["k"] = stored.get("k") or k
        stored["decision"] = decision
    return stored


@eval_app.command("report")
@clear_errors
def eval_report(
    run_id: str,
    buckets: int = 4,
    csv_out: Path | None = typer.Option(None, "--csv"),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """The paper-style table, the by-profile-size buckets, the correlation and the cost of a run."""
    from personalize.eval.reports import build_report, export, format_report

    with client() as p:
        report = build_report(p.store, run_id, buckets, p.settings.stats)
    typer.echo(format_report(report))
    for path in (csv_out, json_out):
        if path is not None:
            typer.echo(f"wrote {export(report, path)}")


@eval_app.command("compare")
@clear_errors
def eval_compare(
    baseline: str,
    candidate: str,
    tolerance: float = typer.Option(0.01, help="Largest relative change of any metric that counts as unchanged"),
    candidate_home: Path | None = typer.Option(
        None, help="The candidate run's home, when it is not this one (a run that trained its own adapters)"
    ),
) -> None:
    """Every metric of two runs side by side (e.g. the fast decoder against the plain path); exit 1 when any
    metric moved more than the tolerance."""
    from personalize.eval.reports import compare_runs, format_comparison

    with client() as p:
        if candidate_home is None:
            rows = compare_runs(p.store, baseline, candidate)
        else:
            with Personalizer(Settings(home=candidate_home)) as other:
                rows = compare_runs(p.store, baseline, candidate, other.store)
    typer.echo(format_comparison(rows, baseline, candidate, tolerance))
    if any(abs(r.relative_change) > tolerance for r in rows):
        raise typer.Exit(1)


@eval_app.command("list")
@clear_errors
def eval_list() -> None:
    """Evaluation runs, newest first."""
    from personalize.eval.reports import list_runs

    with client() as p:
        for r in list_runs(p.store):
            synthetic = " SYNTHETIC" if r["synthetic"] else ""
            typer.echo(
                f"{r['run_id']}\t{r['task']}/{r['split']}\t{r['state']} {r['progress']:.0%}\t"
                f"{r['results']} answers{synthetic}"
            )
