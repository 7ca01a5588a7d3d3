"""The evaluation runner: every query of a task, with every method, for the same users, stored under a run id.

Steps: ingest the users' profiles -> train their adapters (through the Celery workers, or in this process) ->
answer every (query, method) -> store prediction and gold in SQL. Each answer is committed on its own, so a run
interrupted anywhere continues with ``resume`` and, since decoding is greedy and training is seeded, gives the same
result as an uninterrupted run. Reports are computed from the stored rows (``personalize.eval.reports``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from personalize.adapters.methods import ADAPTER_METHODS
from personalize.data.ingest import lamp_item
from personalize.data.naming import eval_user_id
from personalize.data.schema import EvalResult, EvalRun, utcnow
from personalize.errors import InvalidInputError, PersonalizeError
from personalize.eval.baselines import BaselineInput, check_baseline, is_baseline, labels_of, retrieval_mode
from personalize.eval.config import EVAL_METHODS as EVAL_METHODS  # re-exported: the config's old home
from personalize.eval.config import EvalConfig as EvalConfig
from personalize.eval.config import code_version as code_version
from personalize.eval.config import default_methods as default_methods
from personalize.eval.config import resolve_methods as resolve_methods
from personalize.eval.datasets.lamp import Dataset, Query
from personalize.eval.metrics import parse_prediction
from personalize.jobs.worker_process import start_worker, stop_worker
from personalize.methods import adapter_method_of, uses_adapter
from personalize.personalizer import Personalizer
from personalize.serving.scoring import median_label
from personalize.settings import LoraSettings
from personalize.tasks.registry import Task, choice_candidates, get_task


def _bar(iterable: Iterable[Any] | None, total: int, desc: str, show: bool) -> Any:  # a tqdm bar (tqdm is untyped)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not show, dynamic_ncols=True)


def _stored_run(s: Session, run_id: str) -> EvalRun:
    """A run the caller knows exists (it created or read it before); ``Session.get`` is typed as maybe None."""
    return cast(EvalRun, s.get(EvalRun, run_id))


def local_worker_threads(workers: int, cpus: int) -> int:
    """Torch threads for each of ``workers`` local training workers: an equal share of the cores. Why: the eval
    process waits while they train, so ``PERSONALIZE_TORCH_THREADS`` (its own, for answering) would oversubscribe
    the machine ``workers`` times over, or leave cores idle when set low for training's sake."""
    return max(1, cpus // max(1, workers))


def select_queries(dataset: Dataset, users: int | None, per_user: int | None = None) -> list[Query]:
    """The queries of the first ``users`` users in file order, at most ``per_user`` each (None: all)."""
    order: list[str] = []
    for q in dataset.queries:
        if q.user_id not in order:
            order.append(q.user_id)
    keep = set(order[:users] if users else order)
    taken: dict[str, int] = {}
    out = []
    for q in dataset.queries:
        if q.user_id in keep and (per_user is None or taken.get(q.user_id, 0) < per_user):
            taken[q.user_id] = taken.get(q.user_id, 0) + 1
            out.append(q)
    return out


class EvaluationRunner:
    def __init__(self, personalizer: Personalizer, show_progress: bool = True) -> None:
        if personalizer.settings.auto_train:
            personalizer.settings = personalizer.settings.model_copy(update={"auto_train": False})
        self.p = personalizer
        self.show = show_progress

    # -- the run row -------------------------------------------------------------------------------------------

    def start(self, config: EvalConfig, run_id: str | None = None) -> str:
        run_id = run_id or f"{config.task}-{config.split}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with self.p.store.session() as s:
            s.add(EvalRun(id=run_id, task=config.task, split=config.split, config=config.model_dump(), state="running"))
        return run_id

    def add_methods(self, run_id: str, methods: list[str]) -> EvalConfig:
        """Extend a run with more methods (a baseline added to a finished run, say): the next ``run`` answers only
        the (query, method) pairs it lacks. The config records what was added and by which code."""
        config = self.config_of(run_id)
        added = [m for m in resolve_methods(config.task, methods) if m not in config.methods]
        if added:
            config.methods = [*config.methods, *added]
            with self.p.store.session() as s:
                run = _stored_run(s, run_id)
                stored = dict(run.config)
                stored["methods"] = config.methods
                stored["methods_added"] = [*stored.get("methods_added", []), {"methods": added, "code": code_version()}]
                run.config = stored
        return config

    def config_of(self, run_id: str) -> EvalConfig:
        with self.p.store.session() as s:
            run = s.get(EvalRun, run_id)
            if run is None:
                raise InvalidInputError(f"no evaluation run {run_id!r}; list them with `personalize eval list`")
            return EvalConfig(**run.config)

    def _set_state(self, run_id: str, state: str, progress: float | None = None, error: str | None = None) -> None:
        with self.p.store.session() as s:
            run = _stored_run(s, run_id)
            run.state = state
            if progress is not None:
                run.progress = progress
            if error is not None:
                run.error = error
            if state in ("done", "failed"):
                run.finished_at = utcnow()

    def _progress(self, run_id: str, progress: float) -> None:
        with self.p.store.session() as s:
            _stored_run(s, run_id).progress = progress

    # -- the steps ---------------------------------------------------------------------------------------------

    def run(self, dataset: Dataset, config: EvalConfig, run_id: str | None = None, start_workers: int = 1) -> str:
        """Run (or, given the id of an interrupted run, resume) an evaluation; returns the run id."""
        config.methods = resolve_methods(config.task, config.methods)
        if config.lora:  # a resumed run trains exactly as it started, whatever this process's settings say
            self.p.settings = self.p.settings.model_copy(update={"lora": LoraSettings(**config.lora)})
        for name, stored in config.adapter_settings.items():  # the other adapter methods' settings, likewise
            section = name.replace("-", "_")
            kind = type(self.p.settings.adapter_settings(name))
            self.p.settings = self.p.settings.model_copy(update={section: kind(**stored)})
        self._fix_base(config, resumed=run_id is not None)
        if run_id is None:
            run_id = self.start(config)
        else:
            self._set_state(run_id, "running")
        try:
            queries = select_queries(dataset, config.users, config.per_user)
            users = self.ingest(dataset, queries, config)
            if any(uses_adapter(m) for m in config.methods):
                self.train(users, config, start_workers)
            self.answer(run_id, queries, config)
        except BaseException as exc:
            self._set_state(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", error=str(exc))
            raise
        self._set_state(run_id, "done", 1.0)
        return run_id

    def _fix_base(self, config: EvalConfig, resumed: bool) -> None:
        """Pin the base of the run: the task adapter current now is recorded, and a resumed run refuses to go on
        on another one (its answers would mix two models)."""
        self.p.settings = self.p.settings.model_copy(update={"base": config.base})
        info = self.p.bases.current_task_adapter(config.task) if config.base == "task" else None
        ref = info.ref if info is not None else None
        if resumed and ref != config.task_adapter:
            raise InvalidInputError(
                f"the run was made on task adapter {config.task_adapter!r}, the current one is {ref!r}: resume it "
                "where that adapter is current, or start a new run"
            )
        config.task_adapter = ref

    def ingest(self, dataset: Dataset, queries: list[Query], config: EvalConfig) -> list[str]:
        profiles: dict[str, dict[str, dict]] = {}
        for q in queries:
            profile = profiles.setdefault(q.user_id, {})
            for raw in q.profile:
                profile[str(raw.get("id"))] = raw
        users = []
        for user, raw_items in _bar(profiles.items(), len(profiles), "ingest", self.show):
            uid = eval_user_id(config.task, config.split, user)
            self.p.add_items(uid, [lamp_item(config.task, raw) for raw in raw_items.values()])
            users.append(uid)
        return users

    def _needs_adapter(self, uid: str, method: str = "lora") -> bool:
        return not self.p.adapter_is_current(uid, self.p.current_adapter(uid, method))

    def train(self, users: list[str], config: EvalConfig, start_workers: int) -> None:
        """Every user's adapter of every adapter method the run's methods use (``peft``: LoRA, ``peft:ia3``: IA3)."""
        adapter_methods = list(dict.fromkeys(adapter_method_of(m) for m in config.methods if uses_adapter(m)))
        todo = [(u, m) for m in adapter_methods for u in users if self._needs_adapter(u, m)]
        if not todo:
            return
        if config.train_via == "inline":
            for uid, method in _bar(todo, len(todo), "train", self.show):
                self.p.train(uid, method=method)
            return
        threads = local_worker_threads(start_workers, os.cpu_count() or 1)
        workers = [self._start_worker(i, threads) for i in range(start_workers)]
        try:
            jobs = {f"{uid} ({m})": self.p.enqueue_training(uid, method=m).job_id for uid, m in todo}
            self._wait_for_jobs(jobs)
        finally:
            for proc in workers:
                stop_worker(proc)

    def _start_worker(self, index: int, torch_threads: int) -> subprocess.Popen:
        """A local `celery -A workers worker` with this run's settings (same home, database, broker, model) and
        its share of the machine's cores (``torch_threads``)."""
        s = self.p.settings
        sections = {name: name.replace("-", "_").upper() for name in ADAPTER_METHODS}
        prefixes = tuple(f"PERSONALIZE_{section}__" for section in sections.values())
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            {
                "PERSONALIZE_HOME": str(s.resolved_home),
                "PERSONALIZE_MODEL": s.model,
                "PERSONALIZE_DATABASE_URL": s.resolved_database_url,
                "PERSONALIZE_BROKER_URL": s.resolved_broker_url,
                "PERSONALIZE_ADAPTERS_DIR": str(s.resolved_adapters_dir),
                "PERSONALIZE_BASE": s.base,
                "PERSONALIZE_TORCH_THREADS": str(torch_threads),
                # the whole LoRA config as JSON, so a None (no token cap) reaches the worker as None
                "PERSONALIZE_LORA": json.dumps(s.lora.model_dump()),
            }
        )
        for name, section in sections.items():  # every adapter method's settings, likewise
            env[f"PERSONALIZE_{section}"] = json.dumps(s.adapter_settings(name).model_dump())
        log = s.resolved_home / f"eval-worker-{index}.log"
        return start_worker(env, log, name=f"eval{index}@%h", pool="solo", loglevel="WARNING")

    def _wait_for_jobs(self, jobs: dict[str, int | None]) -> None:
        pending = {j: uid for uid, j in jobs.items() if j is not None}
        bar = _bar(None, len(jobs), "train (workers)", self.show)
        bar.update(len(jobs) - len(pending))
        failed: list[str] = []
        while pending:
            time.sleep(2.0)
            states = self.p.jobs.states(list(pending))  # one query per poll, not one per job
            for job_id, uid in list(pending.items()):
                state, error = states.get(job_id, ("gone", "job vanished"))
                if state in ("done", "failed", "cancelled", "gone"):
                    if state != "done":
                        failed.append(f"{uid}: {error}")
                    del pending[job_id]
                    bar.update(1)
        bar.close()
        if failed:
            raise PersonalizeError(f"{len(failed)} adapter(s) failed to train: " + "; ".join(failed[:5]))

    def _done(self, run_id: str) -> set[tuple[str, str]]:
        with self.p.store.session() as s:
            rows = s.execute(select(EvalResult.query_id, EvalResult.method).where(EvalResult.run_id == run_id))
            return {(q, m) for q, m in rows}

    def answer(self, run_id: str, queries: list[Query], config: EvalConfig) -> None:
        task = get_task(config.task)
        done = self._done(run_id)
        total = len(queries) * len(config.methods)
        todo = [(q, m) for q in queries for m in config.methods if (q.id, m) not in done]
        scoring = config.used_scoring()
        likelihood = scoring in ("likelihood", "calibrated")
        finished = total - len(todo)
        label_counts = self._label_counts(task, queries, config) if any(is_baseline(m) for _, m in todo) else None
        for n, (query, method) in enumerate(_bar(todo, len(todo), "answer", self.show)):
            uid = eval_user_id(config.task, config.split, query.user_id)
            if is_baseline(method):
                prediction, timings = self._baseline(task, uid, query, method, config, label_counts or Counter())
                self._store_answer(run_id, query, method, uid, prediction, timings)
                continue
            if likelihood:
                result = self.p.score_labels(
                    uid,
                    query.input,
                    list(cast("tuple[str, ...]", task.labels)),  # likelihood scoring is used only with labels
                    method,
                    k=config.k,
                    retriever=config.retriever,
                    calibrate=scoring == "calibrated",
                )
                scores = result.timings.extra["label_log_likelihoods"]
                prediction = median_label(scores) if config.decision == "median" else result.text
            else:
                result = self.p.generate(
                    uid,
                    query.input,
                    method,
                    k=config.k,
                    max_new_tokens=config.max_new_tokens,
                    retriever=config.retriever,
                    task=config.task,
                )
                prediction = parse_prediction(config.task, result.text)
                scores = None
            timings = {
                "retrieval_s": result.timings.retrieval_s,
                "prompt_s": result.timings.prompt_s,
                "generation_s": result.timings.generation_s,
                "total_s": result.timings.total_s,
                "prompt_tokens": result.prompt_tokens,
                "method_used": result.method,
                "decoder": result.timings.extra.get("decoder", "likelihood"),
                "raw": result.text[:2000],
            }
            self._store_answer(run_id, query, method, uid, prediction, timings, scores)
            if n % 10 == 0:
                self._progress(run_id, (finished + n + 1) / max(total, 1))

    def _store_answer(
        self,
        run_id: str,
        query: Query,
        method: str,
        uid: str,
        prediction: str,
        timings: dict,
        scores: dict[str, float] | None = None,
    ) -> None:
        """One answer; ``scores``: each label's log-likelihood under likelihood scoring (so any decision rule can
        be re-derived from a stored run)."""
        with self.p.store.session() as s:
            s.add(
                EvalResult(
                    run_id=run_id,
                    user_external_id=query.user_id,
                    query_id=query.id,
                    method=method,
                    profile_size=self.p.store.count_items(uid),
                    prediction=prediction,
                    gold=query.gold or "",
                    scores=scores,
                    timings=timings,
                )
            )

    def _label_counts(self, task: Task, queries: list[Query], config: EvalConfig) -> Counter[str]:
        """Labels over the stored profiles of every user of the run (``majority``'s counts)."""
        counts: Counter[str] = Counter()
        if task.labels is None:
            return counts
        for user in dict.fromkeys(q.user_id for q in queries):
            counts.update(labels_of(task, self.p.items(eval_user_id(config.task, config.split, user))))
        return counts

    def _baseline(
        self, task: Task, uid: str, query: Query, method: str, config: EvalConfig, label_counts: Counter[str]
    ) -> tuple[str, dict]:
        """A baseline's answer from the user's stored profile (and the run's retriever and k where it needs them)."""
        baseline = check_baseline(method, task)
        start = time.perf_counter()
        mode = retrieval_mode(method, task)
        retrieved, candidate_scores = [], []
        if mode == "query":
            retrieved = self.p.retrieve(uid, task.query_text(query.input), config.k, config.retriever)
        elif mode == "candidates":
            for candidate in choice_candidates(query.input) or []:
                hits = self.p.retrieve(uid, candidate, 1, config.retriever)
                candidate_scores.append(hits[0].score if hits else float("-inf"))
        retrieval_s = time.perf_counter() - start
        data = BaselineInput(task, query.input, self.p.items(uid), label_counts, retrieved, candidate_scores)
        answer = baseline.predict(data)
        total_s = time.perf_counter() - start
        timings = {
            "retrieval_s": retrieval_s,
            "prompt_s": 0.0,
            "generation_s": 0.0,
            "total_s": total_s,
            "prompt_tokens": 0,
            "method_used": method,
            "decoder": "no model",
            "raw": answer.prediction[:2000],
            "note": answer.note,
        }
        return answer.prediction, timings
