"""Which model a request runs on, and which of a user's adapters it may use there.

A method runs on the plain base (``zero-shot``, or when ``Settings.base`` is 'zero-shot') or on the base with the
task's adapter merged in; a user's adapter is usable only when it is complete, the user's own, and trained on the
base its task now runs on. Both the request path (``serving.requests``) and the training path (``jobs``) ask here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from personalize.adapters.store import owned_adapter
from personalize.adapters.task_adapters import TaskAdapterInfo, TaskAdapterStore, task_model
from personalize.data.items import UserInfo
from personalize.data.naming import user_key, validate_user_id
from personalize.jobs.store import AdapterInfo, Jobs
from personalize.methods import ZERO_SHOT
from personalize.serving.modeling import LoadedModel, get_model
from personalize.serving.requests import ResolvedUser, adapter_base, task_for
from personalize.settings import Settings
from personalize.tasks.registry import Task


class Bases:
    """Resolves bases and users' adapters for one client; reads settings on each call (they may be swapped)."""

    def __init__(self, settings: Callable[[], Settings], jobs: Jobs, task_adapters: TaskAdapterStore) -> None:
        self._settings = settings
        self.jobs = jobs
        self.task_adapters = task_adapters

    @property
    def model(self) -> LoadedModel:
        """The base model as loaded (zero-shot): no task adapter."""
        settings = self._settings()
        return get_model(settings.model, settings.models_dir)

    def current_task_adapter(self, task: Task | str) -> TaskAdapterInfo | None:
        """The newest task adapter of ``task`` for the configured model, or None."""
        return self.task_adapters.current(task.name if isinstance(task, Task) else task, self._settings().model)

    def base_for(self, task: Task | str, method: str = "none") -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """The model a method runs on for ``task``: the base with the task's adapter merged in (``Settings.base``
        'task', where one exists), else the plain base; ``zero-shot`` is always the plain base."""
        if method == ZERO_SHOT or self._settings().base == "zero-shot":
            return self.model, None
        info = self.current_task_adapter(task)
        return (task_model(self.model, info), info) if info is not None else (self.model, None)

    def training_base(self, info: UserInfo) -> tuple[LoadedModel, TaskAdapterInfo | None]:
        """What the user's adapter trains on: the base for the user's task."""
        return self.base_for(task_for(info, None), "peft")

    def owned(self, user_id: str, adapter: AdapterInfo | None) -> AdapterInfo | None:
        """``adapter`` if complete and the user's own (``adapters.store.owned_adapter``), else None."""
        what = f"adapter v{adapter.version} of user {user_id!r}" if adapter else ""
        return adapter if adapter and owned_adapter(Path(adapter.path), user_key(user_id), what) else None

    def current_adapter(self, user_id: str, method: str = "lora") -> AdapterInfo | None:
        """The user's newest complete adapter of ``method`` for the configured model, or None."""
        return self.owned(user_id, self.jobs.current_adapter(user_id, self._settings().model, method))

    def adapter_is_current(self, adapter: AdapterInfo | None, info: UserInfo) -> bool:
        """The adapter was trained on the user's current data and on the base their task now runs on."""
        if adapter is None or adapter.data_version != info.data_version:
            return False
        return adapter_base(adapter) == self.training_base(info)[0].name

    def resolve_user(self, user_id: str, *, with_adapter: bool, method: str = "lora") -> ResolvedUser:
        """A request's user, read once (row, counts, tasks and, ``with_adapter``, the newest adapter of ``method``)."""
        validate_user_id(user_id)
        info, adapter = self.jobs.resolve(user_id, self._settings().model, with_adapter, method)
        return ResolvedUser(user_id, user_key(user_id), info, self.owned(user_id, adapter))
