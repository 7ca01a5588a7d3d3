"""One request from prompt to prompt ids: its user resolved once, the method chosen, the user's items retrieved and
the prompt built, all before any forward pass.

The user is read once per request (``Jobs.resolve``: the row, item counts, tasks and the newest adapter in one
transaction) and carried down as ``ResolvedUser``; retrieval, the router and serving use it and never read the user
again. ``tests/test_generate.py`` counts the SQL round trips of one ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from personalize.adapters.methods import get_adapter_method
from personalize.data.checks import check_int, check_unicode, short
from personalize.data.items import UserInfo
from personalize.data.naming import validate_user_id
from personalize.errors import AdapterBaseMismatchError, EmptyPromptError, InvalidInputError, UnknownUserError
from personalize.jobs.training_jobs import queue_quietly
from personalize.methods import (
    AUTO,
    SERVED_METHODS,
    ZERO_SHOT,
    adapter_method_of,
    adapter_variant,
    uses_adapter,
    uses_retrieval,
    without_adapter,
)
from personalize.results import GenerationResult, RetrievedRef, Timings
from personalize.retrieval import RetrievedItem, check_retriever
from personalize.serving.backend import AdapterRef, ServingBackend
from personalize.serving.modeling import LoadedModel
from personalize.serving.router import Policy, Router
from personalize.tasks.prompting import BuiltPrompt, build_prompt, encode
from personalize.tasks.registry import Task, get_task

if TYPE_CHECKING:
    from personalize.adapters.task_adapters import TaskAdapterInfo
    from personalize.jobs.store import AdapterInfo
    from personalize.personalizer import Personalizer

METHODS = (AUTO, *SERVED_METHODS)
Method = Literal["auto", "none", "rag", "peft", "rag+peft", "zero-shot"]
MAX_K = 1000
MAX_NEW_TOKENS = 4096  # the bound of Settings.max_new_tokens


def check_max_new_tokens(value: object, default: int) -> int:
    """``None`` means the default; 0 or a negative number is an error, never silently the default."""
    return default if value is None else check_int(value, "max_new_tokens", 1, MAX_NEW_TOKENS)


@dataclass(frozen=True)
class ResolvedUser:
    """A request's user, read once: id, key, info and (when the method may use one) their newest adapter."""

    user_id: str
    key: str
    info: UserInfo
    adapter: AdapterInfo | None


@dataclass
class PreparedRequest:
    """Everything a backend needs for one row, and what the result reports about how it was made."""

    user: ResolvedUser
    requested: str
    chosen: str
    notes: list[str]
    task: Task
    retriever: str | None
    built: BuiltPrompt
    adapter: AdapterRef | None
    timings: Timings
    start: float
    loaded: LoadedModel
    task_adapter: TaskAdapterInfo | None

    @property
    def user_id(self) -> str:
        return self.user.user_id


def check_prompt(prompt: object, max_chars: int, field: str = "prompt") -> str:
    """A non-empty string within ``max_chars`` that SQL and the tokenizer accept; else a clear error."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the {field} must be a string, got {type(prompt).__name__}", field)
    if not prompt.strip():
        if field == "prompt":
            raise EmptyPromptError()
        raise InvalidInputError(f"the {field} is empty: pass some text to search for", field)
    if len(prompt) > max_chars:
        raise InvalidInputError(
            f"the {field} has {len(prompt):,} characters; the limit is {max_chars:,} (PERSONALIZE_MAX_PROMPT_CHARS)",
            field,
        )
    try:
        return check_unicode(prompt, f"the {field}")
    except InvalidInputError as exc:
        exc.field = field
        raise


def task_for(info: UserInfo, task: str | Task | None) -> Task:
    """The task asked for, else the user's only task, else ``generic``."""
    if isinstance(task, Task):
        return task
    if task:
        return get_task(task)
    return get_task(info.tasks[0]) if len(info.tasks) == 1 else get_task("generic")


def check_method(method: object) -> str:
    """``method`` if it names a method (``peft:<m>`` and ``rag+peft:<m>`` with a registered adapter method ``m``
    too), else ``InvalidInputError`` (``UnknownAdapterMethodError`` for an unknown ``m``)."""
    if isinstance(method, str) and method in METHODS:
        return method
    variant = adapter_variant(method) if isinstance(method, str) else None
    if variant is None:
        raise InvalidInputError(
            f"unknown method {short(method)}; choose one of {', '.join(METHODS)}, or peft:<adapter method> / "
            "rag+peft:<adapter method>",
            "method",
        )
    get_adapter_method(variant[1])
    return str(method)


def choose_method(
    router: Router, info: UserInfo, method: str, has_adapter: bool, policy: Policy | None = None
) -> tuple[str, list[str]]:
    """Resolve ``auto`` (with ``policy`` where the caller read it already) and fall back when the requested method
    cannot run; say why in notes."""
    check_method(method)
    notes: list[str] = []
    if method == AUTO:
        decision = router.choose(task_for(info, None).name, info.n_items, has_adapter, policy)
        method = decision.method
        notes.append(f"auto chose {method}: {decision.reason}")
    if uses_adapter(method) and not has_adapter:
        fallback = without_adapter(method)
        notes.append(f"{method} fell back to {fallback}: the user has no adapter yet")
        method = fallback
    if method == "rag" and info.n_items == 0:
        notes.append("rag fell back to none: the user has no items")
        method = "none"
    return method, notes


def retrieve_checked(
    p: Personalizer, user_id: str, query: str, k: int | None, retriever: str | None
) -> list[RetrievedItem]:
    """``Personalizer.retrieve``: the query and k checked, the user known, then the user's top-k items."""
    validate_user_id(user_id)
    query = check_prompt(query, p.settings.max_prompt_chars, "query")
    k = p.settings.k if k is None else check_int(k, "k", 0, MAX_K)
    if not p.store.has_user(user_id):  # not get_user: its item count scans all the user's rows (~5 ms at 10,000)
        raise UnknownUserError(user_id)
    return p.retrievers.search(user_id, query, k, retriever) if k else []


def prepare_request(
    p: Personalizer,
    user_id: str,
    prompt: str,
    method: str,
    k: int | None,
    max_new_tokens: int,
    retriever: str | None,
    task: str | Task | None,
) -> PreparedRequest:
    """Everything before the forward passes: checks, the user resolved once, method choice, retrieval, prompt."""
    start = time.perf_counter()
    prompt = check_prompt(prompt, p.settings.max_prompt_chars)
    if k is not None:
        check_int(k, "k", 0, MAX_K)
    if retriever is not None:
        check_retriever(retriever)
    adapter_method = adapter_method_of(check_method(method))
    user = p.bases.resolve_user(user_id, with_adapter=uses_adapter(method) or method == AUTO, method=adapter_method)
    the_task = task_for(user.info, task)
    policy = p.router.policy(task_for(user.info, None).name) if method == AUTO and user.info.n_items > 0 else None
    planned = p.router.planned(the_task.name, user.info.n_items, policy) if method == AUTO else method
    if uses_adapter(planned) and adapter_method_of(planned) != adapter_method:  # auto's band: another method's
        user = p.bases.resolve_user(user_id, with_adapter=True, method=adapter_method_of(planned))
    loaded, task_adapter = p.bases.base_for(the_task, method)
    adapter, notes = _usable_adapter(user, loaded, method, the_task)
    chosen, chosen_notes = choose_method(p.router, user.info, method, adapter is not None, policy)
    notes += chosen_notes
    if uses_adapter(method) and adapter is None and p.settings.auto_train and user.info.n_items:
        notes.append(queue_quietly(p, user_id, adapter_method))
    if not uses_adapter(chosen):
        adapter = None
    if chosen == ZERO_SHOT:
        loaded, task_adapter = p.model, None
    timings = Timings()
    retrieved: list[RetrievedItem] = []
    retriever_name = None
    if uses_retrieval(chosen):
        retriever_name = p.retrievers.name(retriever)
        t0 = time.perf_counter()
        k = p.settings.k if k is None else k
        query = the_task.query_text(prompt)
        version = user.info.data_version
        retrieved = p.retrievers.search(user_id, query, k, retriever_name, version) if k else []
        timings.retrieval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = build_prompt(
        loaded, the_task, prompt, retrieved, p.settings.token_budget, p.settings.input_share, max_new_tokens
    )
    timings.prompt_s = time.perf_counter() - t0
    ref = AdapterRef.of(user.key, adapter) if adapter is not None else None
    return PreparedRequest(
        user, method, chosen, notes, the_task, retriever_name, built, ref, timings, start, loaded, task_adapter
    )


def _usable_adapter(
    user: ResolvedUser, loaded: LoadedModel, method: str, task: Task
) -> tuple[AdapterInfo | None, list[str]]:
    """The user's adapter if it was trained on the base this request runs on; a mismatch is an error for an
    explicit adapter method and a note (no adapter) for ``auto``."""
    adapter = user.adapter
    if adapter is None or (trained_on := adapter_base(adapter)) == loaded.name:
        return adapter, []
    if method != AUTO:
        raise AdapterBaseMismatchError(
            f"adapter v{adapter.version} of user {user.user_id!r} was trained on {trained_on!r}, but {method} for "
            f"task {task.name!r} runs on {loaded.name!r}: retrain it (`personalize train {user.user_id}`)"
        )
    return None, [f"adapter v{adapter.version} was trained on another base ({trained_on}); not used"]


def adapter_base(adapter: AdapterInfo) -> str:
    """The model a user adapter was trained on: ``{base}+{task adapter}`` on a task-adapted base, else the base
    model (adapters from before task adapters were all trained on the plain base)."""
    trained_on = (adapter.config or {}).get("trained_on")
    return trained_on if isinstance(trained_on, str) else adapter.base_model


def label_scores(
    backend: ServingBackend, prep: PreparedRequest, prompt: str, labels: Sequence[str], calibrate: bool
) -> list[float]:
    """log p(label | prompt) of every label through ``backend``, with the prepared prompt and adapter.

    ``calibrate`` subtracts each label's log-likelihood under the same prompt with the query's content replaced
    by "N/A" (contextual calibration, Zhao et al. 2021): small models put most mass on one label whatever the
    input, and this removes that prior while keeping what the user's context and the query add."""
    prompts = [prep.built.input_ids]
    if calibrate:
        content = prep.task.query_text(prompt)
        blank = prep.built.text.replace(content, "N/A") if content and content != prompt else "N/A"
        prompts.append(encode(prep.loaded, blank))
    rows = backend.score_labels(prep.loaded, prompts, labels, prep.adapter)
    return rows[0] if not calibrate else [a - b for a, b in zip(rows[0], rows[1], strict=True)]


def request_result(prep: PreparedRequest, text: str, n_new: int) -> GenerationResult:
    """The typed result of a prepared request once its text is decoded."""
    prep.timings.total_s = time.perf_counter() - prep.start
    if prep.adapter is not None:
        prep.timings.extra["adapter_version"] = prep.adapter.version
        prep.timings.extra["adapter_method"] = adapter_method_of(prep.chosen)
    prep.timings.extra["task_adapter"] = prep.task_adapter.ref if prep.task_adapter is not None else None
    return GenerationResult(
        user_id=prep.user_id,
        text=text,
        method=prep.chosen,
        requested_method=prep.requested,
        task=prep.task.name,
        retriever=prep.retriever,
        retrieved=[RetrievedRef(h.id, h.score) for h in prep.built.used],
        prompt=prep.built.text,
        prompt_tokens=len(prep.built.input_ids),
        new_tokens=n_new,
        timings=prep.timings,
        notes=prep.notes + prep.built.notes,
        truncated=prep.built.truncated,
    )


__all__ = [
    "MAX_K",
    "METHODS",
    "check_method",
    "PreparedRequest",
    "ResolvedUser",
    "adapter_base",
    "check_prompt",
    "choose_method",
    "label_scores",
    "prepare_request",
    "request_result",
]
