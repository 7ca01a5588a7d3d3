"""Exceptions raised by personalize: one base class, each subclass named for what went wrong."""

from __future__ import annotations

from pathlib import Path

from personalize.adapters.format import ADAPTER_METADATA


class PersonalizeError(Exception):
    """Base class of every error this library raises on purpose.

    ``code`` is stable (the HTTP server's error bodies carry it, and the client maps it back to the class);
    ``field`` names the input at fault, where one is."""

    code = "error"
    field: str | None = None


class UnknownUserError(PersonalizeError, KeyError):
    code = "unknown_user"

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(
            f"unknown user {user_id!r}: add the user first (personalize users add / Personalizer.add_items)"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class InvalidInputError(PersonalizeError, ValueError):
    """A prompt, user id, item or file that cannot be used as given; ``field`` names it where known."""

    code = "invalid_input"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EmptyPromptError(InvalidInputError):
    code = "empty_prompt"

    def __init__(self) -> None:
        super().__init__("the prompt is empty: pass some text to generate from", "prompt")


class MalformedFileError(InvalidInputError):
    code = "malformed_file"

    def __init__(self, path: object, where: str, why: str) -> None:
        super().__init__(f"{path}: {where}: {why}; nothing from this file was stored")


class ImportIncompleteError(PersonalizeError):
    """The backend failed partway through storing a validated import; earlier users were stored."""

    code = "import_incomplete"


class StoreBusyError(PersonalizeError):
    """Another process is writing the embedded Chroma folder."""

    code = "store_busy"


class VectorStoreUnavailableError(PersonalizeError):
    """The Chroma server could not be reached (or its answer could not be used)."""

    code = "vector_store_unavailable"


class ModelLoadError(PersonalizeError):
    """The configured model could not be found or loaded."""

    code = "model_load_failed"


class DatabaseUnavailableError(PersonalizeError):
    """The SQL database could not be reached."""

    code = "database_unavailable"


class BrokerUnavailableError(PersonalizeError):
    """The Celery broker could not be reached to queue a training job."""

    code = "broker_unavailable"


class TrainingFailedError(PersonalizeError):
    """A training job ended without producing an adapter."""

    code = "training_failed"


class AdapterOwnershipError(PersonalizeError):
    """An adapter registered for one user carries another user's stamp: it is never served."""

    code = "adapter_ownership"


class AdapterBaseMismatchError(PersonalizeError):
    """A user adapter was trained on another base (another task adapter, or none): serving it on this base would
    answer with weights it was never trained with."""

    code = "adapter_base_mismatch"


class AdapterUnavailableError(PersonalizeError, FileNotFoundError):
    code = "adapter_unavailable"

    def __init__(self, path: Path, why: str | None = None) -> None:
        self.path = path
        why = why or f"no {ADAPTER_METADATA}: missing or still being written"
        super().__init__(f"no usable adapter at {path} ({why}); train it (again)")


class AdapterHasNoEffectError(PersonalizeError):
    """A loaded adapter left the model's logits on a probe input as they were: it targets nothing (or was never
    trained), and serving it would answer as the base model while reporting the adapter. Refused, never served."""

    code = "adapter_has_no_effect"

    def __init__(self, name: str, path: Path, max_change: float) -> None:
        self.name, self.path, self.max_change = name, path, max_change
        super().__init__(
            f"adapter {name!r} at {path} does not change the model's output (largest logit change on a probe input "
            f"{max_change:.2e}): it targets no module of this model or was never trained; retrain it"
        )


class AdapterExistsError(PersonalizeError, FileExistsError):
    code = "adapter_exists"

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} already exists: adapters are never overwritten; train into a new folder")


class UnknownAdapterMethodError(InvalidInputError):
    code = "unknown_adapter_method"

    def __init__(self, method: object, registered: list[str]) -> None:
        self.method = method
        self.registered = list(registered)
        super().__init__(
            f"unknown adapter method {method!r}: the registered methods are {', '.join(registered) or 'none'} "
            "(personalize.adapters.methods.register_adapter_method adds one)",
            "method",
        )


class TrainingCancelled(PersonalizeError):
    """``should_stop()`` asked training to stop; nothing was written to the adapter folder."""

    code = "training_cancelled"


class UnknownJobError(PersonalizeError, KeyError):
    code = "unknown_job"

    def __init__(self, job_id: object) -> None:
        self.job_id = job_id
        super().__init__(f"unknown training job {job_id!r}: `personalize jobs` lists them")

    def __str__(self) -> str:
        return self.args[0]


class ServerBusyError(PersonalizeError):
    """The server is at its limit of concurrent generations; retry after ``retry_after_s``."""

    code = "server_busy"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthorizedError(PersonalizeError):
    """No API key, or one the server does not know: send ``Authorization: Bearer KEY``."""

    code = "unauthorized"


class ForbiddenError(PersonalizeError):
    """The API key is valid but not scoped to this user (or to this operation)."""

    code = "forbidden"


class ServerUnavailableError(PersonalizeError):
    """The personalize server (``PERSONALIZE_SERVER``) could not be reached, or is not ready."""

    code = "server_unavailable"


class EngineUnavailableError(PersonalizeError):
    """The generation engine a serving backend sends to (a vLLM server, ``Settings.vllm``) could not be reached, or
    answered with an error that is not the request's fault."""

    code = "engine_unavailable"


class DirectReadUnsupported(PersonalizeError, ValueError):
    """An adapter folder the fast decoder's direct read does not cover (the caller loads it through peft instead)."""

    code = "direct_read_unsupported"


class AdapterRefusedError(PersonalizeError):
    """A generation engine (vLLM) would not load an adapter (its rank, its modules): served locally instead."""

    code = "adapter_refused"


class ServerError(PersonalizeError):
    """The server failed unexpectedly; its log has the details (the response never carries a traceback)."""

    code = "server_error"


def error_classes() -> dict[str, type[PersonalizeError]]:
    """Every error class of this module by its ``code`` (what the client maps a server's error back to)."""
    found: dict[str, type[PersonalizeError]] = {}
    todo: list[type[PersonalizeError]] = [PersonalizeError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == __name__:
            found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found
