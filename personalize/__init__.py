"""personalize: per-user retrieval (RAG) and per-user LoRA adapters (PEFT) for a language model, and which works.

import personalize
personalize.add_items("alice", [{"id": "1", "text": "I loved Alien (1979)"}])
result = personalize.generate("alice", "Recommend me a film for tonight.")
print(result.method, result.text, result.retrieved_ids)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from personalize.data.items import ProfileItem, UserInfo
from personalize.errors import (
    AdapterBaseMismatchError,
    AdapterExistsError,
    AdapterHasNoEffectError,
    AdapterOwnershipError,
    AdapterRefusedError,
    AdapterUnavailableError,
    BrokerUnavailableError,
    DatabaseUnavailableError,
    DirectReadUnsupported,
    EmptyPromptError,
    EngineUnavailableError,
    ForbiddenError,
    ImportIncompleteError,
    InvalidInputError,
    MalformedFileError,
    ModelLoadError,
    PersonalizeError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
    StoreBusyError,
    TrainingCancelled,
    TrainingFailedError,
    UnauthorizedError,
    UnknownAdapterMethodError,
    UnknownJobError,
    UnknownUserError,
    VectorStoreUnavailableError,
)
from personalize.personalizer import Personalizer
from personalize.results import ForgetReport, GenerationResult, RetrievedRef, ServingFacts, Timings
from personalize.settings import Settings

if TYPE_CHECKING:
    from personalize.data.store import UpsertReport
    from personalize.remote import RemoteClient
    from personalize.retrieval.base import RetrievedItem

__version__ = "0.1.0"

_default: Personalizer | None = None
_default_lock = threading.Lock()


def get_default() -> Personalizer:
    """The process-wide ``Personalizer`` built from the environment, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Personalizer()
        return _default


def set_default(personalizer: Personalizer | None) -> None:
    global _default
    with _default_lock:
        _default = personalizer


def generate(
    user_id: str,
    prompt: str,
    method: str = "auto",
    *,
    k: int | None = None,
    max_new_tokens: int | None = None,
    retriever: str | None = None,
    task: str | None = None,
) -> GenerationResult:
    """``Personalizer.generate`` on the default client (built from the environment); with ``PERSONALIZE_SERVER``
    set, on that server (``personalize.remote``)."""
    remote = _remote()
    if remote is not None:
        return remote.generate(
            user_id, prompt, method, k=k, max_new_tokens=max_new_tokens, retriever=retriever, task=task
        )
    return get_default().generate(
        user_id, prompt, method, k=k, max_new_tokens=max_new_tokens, retriever=retriever, task=task
    )


def add_items(user_id: str, items: Iterable[ProfileItem | dict[str, Any]]) -> UpsertReport:
    remote = _remote()
    return remote.add_items(user_id, items) if remote is not None else get_default().add_items(user_id, items)


def retrieve(user_id: str, query: str, *, k: int | None = None, retriever: str | None = None) -> list[RetrievedItem]:
    remote = _remote()
    if remote is not None:
        return remote.retrieve(user_id, query, k, retriever)
    return get_default().retrieve(user_id, query, k, retriever)


def forget(user_id: str) -> ForgetReport:
    remote = _remote()
    return remote.forget(user_id) if remote is not None else get_default().forget(user_id)


def _remote() -> RemoteClient | None:
    """The server client when ``PERSONALIZE_SERVER`` is set (client mode), else None (in-process)."""
    from personalize.remote import configured, default_remote

    return default_remote() if configured() else None


__all__ = [
    "AdapterBaseMismatchError",
    "AdapterRefusedError",
    "DirectReadUnsupported",
    "EngineUnavailableError",
    "AdapterExistsError",
    "AdapterHasNoEffectError",
    "AdapterOwnershipError",
    "AdapterUnavailableError",
    "BrokerUnavailableError",
    "DatabaseUnavailableError",
    "EmptyPromptError",
    "ForbiddenError",
    "ForgetReport",
    "GenerationResult",
    "ImportIncompleteError",
    "InvalidInputError",
    "MalformedFileError",
    "ModelLoadError",
    "PersonalizeError",
    "Personalizer",
    "ProfileItem",
    "RetrievedRef",
    "ServerBusyError",
    "ServerError",
    "ServerUnavailableError",
    "Settings",
    "StoreBusyError",
    "ServingFacts",
    "Timings",
    "TrainingCancelled",
    "TrainingFailedError",
    "UnauthorizedError",
    "UnknownAdapterMethodError",
    "UnknownJobError",
    "UnknownUserError",
    "UserInfo",
    "VectorStoreUnavailableError",
    "add_items",
    "forget",
    "generate",
    "get_default",
    "retrieve",
    "set_default",
]
