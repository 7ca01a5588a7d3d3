"""``personalize router``: calibrate a task's routing thresholds from a run, and show the policies."""

from __future__ import annotations

import typer

from personalize.cli.common import clear_errors, client

router_app = typer.Typer(help="The router that picks none / rag / peft / rag+peft per user.", no_args_is_help=True)


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

    with client() as p:
        policy = calibrate_from_run(p.store, run_id, tolerance, alpha, p.settings.stats)
    _print_policy(policy)


@router_app.command("show")
@clear_errors
def router_show(task: str | None = None, items: int | None = None) -> None:
    """The current policy per task (or the default), and the method for a profile size."""
    with client() as p:
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
