"""The main job on the embedded defaults (``make demo``): sample users, a small task adapter, every method, and a
small comparison the dashboard opens on.

Steps: load the three sample users (18 ratings each) -> train a task adapter on their pooled items (a few minutes
on 2 cores) -> train each sample user's adapter on top of it -> answer one prompt per user with every method ->
run a small comparison on a SYNTHETIC set (labelled as such) and print its report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from personalize.adapters.task_adapters import TaskAdapterSource
from personalize.data.ingest import read_jsonl
from personalize.eval.datasets.synthetic import synthetic_dataset
from personalize.personalizer import Personalizer
from personalize.settings import LoraSettings, TaskAdapterSettings

SAMPLE_FILE = Path(__file__).resolve().parent / "data" / "sample_users.jsonl"
TASK = "movielens-rating"
DEMO_METHODS = ("zero-shot", "none", "rag", "peft", "rag+peft")
LABELS = ("1", "2", "3", "4", "5")
SAMPLE_PROMPTS = {
    "sci-fi fan": "Star Wars: Episode IV - A New Hope (1977) (Action, Adventure, Sci-Fi)",
    "romance fan": "Notting Hill (1999) (Comedy, Romance)",
    "family viewer": "Toy Story (1995) (Adventure, Animation, Children, Comedy, Fantasy)",
}
# 54 sample items: three epochs over them, half with retrieved context; ~1-3 minutes on 2 cores
DEMO_TASK_ADAPTER = TaskAdapterSettings(
    lora=LoraSettings(
        rank=16, alpha=32, epochs=3, learning_rate=1e-3, batch_size=8, max_length=256, max_tokens=None, seed=0
    ),
    max_pairs=1000,
    max_pairs_per_user=100,
    max_tokens=100_000,
)
DEMO_SYNTHETIC_USERS = 10

Echo = Callable[[str], None]


def rating_prompt(movie: str) -> str:
    return (
        "What score would this user give the following movie on a scale of 1 to 5? Just answer with 1, 2, 3, 4, "
        f"or 5 without further explanation. movie: {movie}"
    )


def load_sample(p: Personalizer, echo: Echo) -> list[str]:
    users = read_jsonl(SAMPLE_FILE)
    for uid, items in users.items():
        report = p.add_items(uid, items)
        echo(f"loaded {uid!r}: {report.added} new, {report.unchanged} unchanged item(s)")
    return list(users)


def ensure_task_adapter(p: Personalizer, echo: Echo) -> str:
    """The sample's task adapter: trained once (the sample users' items, pooled), then reused."""
    from personalize.jobs.task_adapter_jobs import train_now

    current = p.bases.current_task_adapter(TASK)
    if current is not None:
        echo(f"task adapter {current.ref} is already trained ({current.metadata.get('n_pairs')} pairs)")
        return current.ref
    echo(f"training a task adapter for {TASK} on the sample users' pooled items (a few minutes on 2 cores) ...")
    start = time.perf_counter()
    demo = p.settings.model_copy(update={"task_adapter": DEMO_TASK_ADAPTER})
    with Personalizer(demo) as trainer:
        result = train_now(trainer, TaskAdapterSource(task=TASK, data="store", retriever="bm25"), progress=True)
    s = result.info.summary()
    echo(
        f"task adapter {s['ref']}: {s['pairs']} pairs ({s['with_context']} with retrieved context), "
        f"{s['tokens']} tokens, final loss {s['final_loss']:.3f}, {time.perf_counter() - start:.0f} s"
    )
    return result.info.ref


def answer_every_method(p: Personalizer, users: list[str], echo: Echo) -> None:
    """One prompt per sample user, every method: the label the model finds most likely, and its probability."""
    import math

    for uid in users:
        movie = SAMPLE_PROMPTS.get(uid, next(iter(SAMPLE_PROMPTS.values())))
        echo(f"\n{uid!r} -- {movie}")
        for method in DEMO_METHODS:
            result = p.score_labels(uid, rating_prompt(movie), list(LABELS), method, k=4, retriever="bm25")
            scores = result.timings.extra["label_log_likelihoods"]
            total = sum(math.exp(v) for v in scores.values())
            probs = " ".join(f"{label}:{math.exp(scores[label]) / total:.2f}" for label in LABELS)
            used = f" (ran {result.method})" if result.method != method else ""
            echo(f"  {method:<9} -> {result.text}   [{probs}]{used}")


def small_comparison(p: Personalizer, echo: Echo) -> str:
    """A comparison on SYNTHETIC users (planted tastes; not real data) with every method and baseline."""
    from personalize.eval.config import EvalConfig, code_version, default_methods
    from personalize.eval.reports import build_report, format_report
    from personalize.eval.runner import EvaluationRunner

    dataset = synthetic_dataset(n_users=DEMO_SYNTHETIC_USERS, max_items=60)
    config = EvalConfig(
        task=TASK,
        split="test",
        source="SYNTHETIC",
        synthetic=True,
        users=DEMO_SYNTHETIC_USERS,
        methods=default_methods(TASK, p.bases.current_task_adapter(TASK) is not None),
        train_via="inline",
        model=p.settings.model,
        decoder=p.settings.decoder,
        lora=p.settings.lora.model_dump(),
        code_version=code_version(),
    )
    echo(f"\na small comparison on {DEMO_SYNTHETIC_USERS} SYNTHETIC users (planted tastes, not real data) ...")
    run_id = EvaluationRunner(p).run(dataset, config)
    echo(format_report(build_report(p.store, run_id, stats=p.settings.stats)))
    echo(f"\nrun id: {run_id} (the dashboard opens on it)")
    return run_id


def run_demo(p: Personalizer, echo: Echo) -> str:
    users = load_sample(p, echo)
    echo(f"loading the model {p.settings.model} (the first run caches it under {p.settings.models_dir}) ...")
    _ = p.model
    ensure_task_adapter(p, echo)
    for uid in users:
        if not p.adapter_is_current(uid, p.current_adapter(uid)):
            adapter = p.train(uid)
            seconds = adapter.train_seconds
            echo(f"trained {uid!r}'s adapter v{adapter.version} on the task-adapted base ({seconds:.0f} s)")
    answer_every_method(p, users, echo)
    return small_comparison(p, echo)


__all__ = ["run_demo"]
