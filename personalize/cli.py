"""The ``personalize`` command line: a thin shell over ``Personalizer``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from personalize.data.ingest import read_jsonl, read_lamp_questions
from personalize.data.store import redact_url, upgrade_database
from personalize.errors import InvalidInputError, PersonalizeError
from personalize.personalizer import Personalizer
from personalize.settings import Settings

app = typer.Typer(
    help="Personalize a language model per user: RAG, per-user LoRA (PEFT), or both.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The SQL database.", no_args_is_help=True)
users_app = typer.Typer(help="Users and their items.", no_args_is_help=True)
eval_app = typer.Typer(help="The LaMP-style comparison: run, resume, report.", no_args_is_help=True)
router_app = typer.Typer(help="The router that picks none / rag / peft / rag+peft per user.", no_args_is_help=True)
data_app = typer.Typer(help="Build or import LaMP-format task files.", no_args_is_help=True)
task_adapter_app = typer.Typer(
    help="Task adapters: one LoRA per task and base model, trained on pooled users, merged into the base.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(eval_app, name="eval")
app.add_typer(router_app, name="router")
app.add_typer(data_app, name="data")
app.add_typer(task_adapter_app, name="task-adapter")


def clear_errors(fn):  # noqa: ANN001, ANN201
    """Turn library errors into one readable line and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalizeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ValidationError as exc:  # a PERSONALIZE_* variable or .env entry that Settings refuses
            typer.echo(f"error: {_setting_error(exc)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _setting_error(exc: ValidationError) -> str:
    """The first refused setting as its environment variable, e.g. ``PERSONALIZE_K: Input should be ...``."""
    first = exc.errors()[0]
    name = "PERSONALIZE_" + "__".join(str(part).upper() for part in first.get("loc", ()))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"setting {name}: {first.get('msg', 'invalid')}{more}"


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


@db_app.command("check")
@clear_errors
def db_check(
    repair: bool = typer.Option(False, "--repair", help="Fix what disagrees (SQL is the truth)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Do SQL, Chroma and the adapter folders agree? Exit 1 when they do not (and --repair was not given)."""
    with _client() as p:
        report = p.check(repair=repair)
    if as_json:
        _print_json(report.to_dict())
    else:
        for line in report.lines():
            typer.echo(line)
    if report.problems and not repair:
        raise typer.Exit(1)


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
    with _client() as p:
        reports = p.import_users(users, show_progress=True)
    added, updated, unchanged = (sum(getattr(r, k) for r in reports) for k in ("added", "updated", "unchanged"))
    typer.echo(f"{len(users)} user(s): {added} item(s) added, {updated} updated, {unchanged} unchanged")


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
    from personalize.data.consistency import lost_jobs

    with _client() as p:
        rows = p.training_jobs(user_id, limit)
        lost = lost_jobs(p, [j.id for j in rows if j.state == "running"])
    if as_json:
        _print_json([{**asdict(r), "worker_gone": r.id in lost} for r in rows])
        return
    for j in rows:
        loss = f"{j.loss:.3f}" if j.loss is not None else "-"
        error = f"  error: {j.error}" if j.error else ""
        state = f"{j.state} (worker {j.worker} is gone: requeued when a worker starts)" if j.id in lost else j.state
        typer.echo(f"job {j.id}\t{j.user_id}\t{state}\t{j.progress:.0%}\tloss {loss}\tattempts {j.attempts}{error}")


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


STDIN = "-"


def _read_prompt(text: str | None, path: Path | None, what: str, max_chars: int) -> str:
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


@app.command("retrieve")
@clear_errors
def retrieve(
    user_id: str,
    query: Annotated[str | None, typer.Argument(help="The query; '-' reads it from stdin")] = None,
    query_file: Path | None = typer.Option(None, "--query-file", "--prompt-file", help="Read the query from a file"),
    k: int | None = None,
    retriever: str | None = None,
) -> None:
    """Show the user's items most relevant to a query."""
    with _client() as p:
        query = _read_prompt(query, query_file, "query", p.settings.max_prompt_chars)
        for hit in p.retrieve(user_id, query, k, retriever):
            typer.echo(f"{hit.score:8.4f}  [{hit.id}] {hit.item.text[:100]}")


@app.command("generate")
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
    with _client() as p:
        prompt = _read_prompt(prompt, prompt_file, "prompt", p.settings.max_prompt_chars)
        result = p.generate(user_id, prompt, method, k=k, max_new_tokens=max_new_tokens, retriever=retriever, task=task)
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
def demo() -> None:
    """The main job on the embedded defaults: the sample users, a small task adapter, every method per user, and a
    small comparison (SYNTHETIC) that the dashboard opens on."""
    from personalize.demo import run_demo

    with _client() as p:
        run_demo(p, typer.echo)


# -- data ----------------------------------------------------------------------------------------------------------


@data_app.command("build")
@clear_errors
def data_build(
    task: str,
    source: Path = typer.Argument(..., help="MovieLens folder (ratings.csv, movies.csv) or Reuters C50 folder"),
    out: Path = typer.Option(Path("data-build"), help="Folder for {split}_questions.json and {split}_outputs.json"),
    split: list[str] = typer.Option(["dev", "test"], help="Splits to build"),
) -> None:
    """Write LaMP-format files for movielens-rating, reuters-lead or reuters-authorship (deterministic)."""
    from personalize.eval.datasets import BUILDERS, write_lamp

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
    from personalize.eval.datasets import synthetic_dataset, write_lamp

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
    from personalize.eval.datasets import read_lamp

    dataset = read_lamp(questions, outputs, task)
    users = {user_id: [lamp_item(task, r) for r in raw] for user_id, raw in dataset.users().items()}
    with _client() as p:
        p.import_users(users, show_progress=True)
    typer.echo(f"imported {len(dataset.users())} users of {task} ({len(dataset.queries)} queries)")


# -- evaluation ----------------------------------------------------------------------------------------------------


def _load_dataset(task: str, split: str, data: Path | None, synthetic_users: int | None):  # noqa: ANN202
    from personalize.eval.datasets import load_dataset

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
    base: str = typer.Option(
        "task",
        "--base",
        help="task: none/rag/peft/rag+peft run on the base with the task adapter merged in (where one exists; "
        "zero-shot is then added as a method); zero-shot: on the plain base model",
    ),
) -> None:
    """Ingest, train (workers), answer every query with every method, and store it all under a run id."""
    from personalize.eval.config import EvalConfig, code_version, default_methods, resolve_methods
    from personalize.eval.reports import build_report, format_report
    from personalize.eval.runner import EvaluationRunner

    with _client() as p:
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
            adapted = base == "task" and p.current_task_adapter(task) is not None
            chosen = resolve_methods(task, _method_list(methods)) if methods else default_methods(task, adapted)
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
                    base=base,
                    code_version=code_version(),
                )
            except ValidationError as exc:  # an option the run's task cannot take
                raise InvalidInputError(str(exc.errors()[0].get("msg", exc))) from None
        run_id = runner.run(dataset, config, run_id=resume, start_workers=workers)
        typer.echo(format_report(build_report(p.store, run_id, stats=p.settings.stats)))
        typer.echo(f"\nrun id: {run_id}")


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

    with _client() as p:
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

    with _client() as p:
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

    with _client() as p:
        for r in list_runs(p.store):
            synthetic = " SYNTHETIC" if r["synthetic"] else ""
            typer.echo(
                f"{r['run_id']}\t{r['task']}/{r['split']}\t{r['state']} {r['progress']:.0%}\t"
                f"{r['results']} answers{synthetic}"
            )


# -- router --------------------------------------------------------------------------------------------------------


@router_app.command("calibrate")
@clear_errors
def router_calibrate(
    run_id: str,
    tolerance: float | None = typer.Option(None, help="Smallest relative gain worth a costlier method"),
    alpha: float | None = typer.Option(None, help="Significance level of a move (default PERSONALIZE_ROUTER__ALPHA)"),
) -> None:
    """Set a task's thresholds from a run: per bucket, the cheapest method unless a costlier one's gain over it is
    significant (paired test over the bucket's users); each band keeps the interval and p-value that chose it."""
    from personalize.eval.calibration import calibrate_from_run

    with _client() as p:
        policy = calibrate_from_run(p.store, run_id, tolerance, alpha, p.settings.stats)
    _print_policy(policy)


@router_app.command("show")
@clear_errors
def router_show(task: str | None = None, items: int | None = None) -> None:
    """The current policy per task (or the default), and the method for a profile size."""
    with _client() as p:
        policies = [p.router.policy(task)] if task else (p.router.policies() or [p.router.policy(None)])
        for policy in policies:
            _print_policy(policy)
            if items is not None:
                typer.echo(f"  {items} items -> {policy.method_for(items).method} (with an adapter)")


def _print_policy(policy) -> None:  # noqa: ANN001
    origin = f"run {policy.source_run_id} at {policy.created_at}" if policy.source_run_id else "default (paper)"
    level = f", alpha {policy.alpha}" if policy.alpha is not None else ""
    typer.echo(f"task {policy.task}: {origin}" + (f", metric {policy.metric}{level}" if policy.metric else ""))
    for band in policy.bands:
        buckets = band.evidence.get("buckets") or [band.evidence]
        typer.echo(
            f"  from {band.min_items} items: {band.method}" + (_evidence(buckets[0]) if len(buckets) == 1 else "")
        )
        if len(buckets) > 1:
            for e in buckets:
                typer.echo(f"    bucket {e.get('min_items', '?')}..{e.get('max_items', '?')} items:" + _evidence(e))


def _evidence(e: dict) -> str:
    """The test that chose a band's method, in one line."""
    if not e or "candidate" not in e:
        return f" ({e['n_users']} users, no costlier method to test)" if e else ""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    verb = "moved: significant" if e.get("moved") else "stayed: not significant"
    p_holm = "" if e.get("p_holm") is None else f", Holm p={e['p_holm']:.3g}"
    p = "-" if e.get("p_value") is None else f"{e['p_value']:.3g}"
    return (
        f"  [{verb}; {e['candidate']} vs {e['versus']} gain {pct(e.get('gain'))} "
        f"CI [{pct(e.get('ci_low'))}, {pct(e.get('ci_high'))}], p={p}{p_holm}; {e['n_users']} users]"
    )


def main() -> None:  # pragma: no cover
    app()


# -- task adapters -------------------------------------------------------------------------------------------------


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
    with _client() as p:
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
    _print_json(info.summary())


@task_adapter_app.command("list")
@clear_errors
def task_adapter_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every stored task adapter; one trained on a forgotten user is marked until it is retrained."""
    with _client() as p:
        rows = [info.summary() for info in p.task_adapters.all()]
    if as_json:
        _print_json(rows)
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
    with _client() as p:
        info = p.task_adapters.get(task, p.settings.model, version)
    metadata = {k: v for k, v in info.metadata.items() if k != "user_keys"}
    _print_json({**info.summary(), "metadata": metadata})


@task_adapter_app.command("remove")
@clear_errors
def task_adapter_remove(task: str, version: int = typer.Option(..., "--version")) -> None:
    """Delete one task adapter version (user adapters trained on it are then refused until retrained)."""
    with _client() as p:
        path = p.task_adapters.remove(task, p.settings.model, version)
    typer.echo(f"removed {path}")


@task_adapter_app.command("jobs")
@clear_errors
def task_adapter_jobs(as_json: bool = typer.Option(False, "--json")) -> None:
    """Task adapter training jobs: state, progress, ETA."""
    with _client() as p:
        rows = p.task_adapters.jobs()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        eta = f"\tETA {r['eta_s']:.0f} s" if r.get("eta_s") else ""
        typer.echo(
            f"{r['id']}\t{r['state']}\t{100 * r.get('progress', 0):.0f}%{eta}\t{r['source']['task']}\t"
            f"{r.get('adapter') or r.get('error') or r.get('reason', '')}"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
