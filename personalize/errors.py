"""Exceptions raised by personalize: one base class, each subclass named for what went wrong."""

from __future__ import annotations

from pathlib import Path

from personalize.adapters.format import ADAPTER_METADATA


class PersonalizeError(Exception):
    """Base class of every error this library raises on purpose."""


class UnknownUserError(PersonalizeError, KeyError):
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        super().__init__(
            f"unknown user {user_id!r}: add the user first (personalize users add / Personalizer.add_items)"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class InvalidInputError(PersonalizeError, ValueError):
    """A prompt, user id, item or file that cannot be used as given."""


class EmptyPromptError(InvalidInputError):
    def __init__(self) -> None:
        super().__init__("the prompt is empty: pass some text to generate from")


class MalformedFileError(InvalidInputError):
    def __init__(self, path: object, where: str, why: str) -> None:
        super().__init__(f"{path}: {where}: {why}; nothing from this file was stored")


class ImportIncompleteError(PersonalizeError):
    """The backend failed partway through storing a validated import; earlier users were stored."""


class StoreBusyError(PersonalizeError):
    """Another process is writing the embedded Chroma folder."""


class VectorStoreUnavailableError(PersonalizeError):
    """The Chroma server could not be reached (or its answer could not be used)."""


class ModelLoadError(PersonalizeError):
    """The configured model could not be found or loaded."""


class DatabaseUnavailableError(PersonalizeError):
    """The SQL database could not be reached."""


class BrokerUnavailableError(PersonalizeError):
    """The Celery broker could not be reached to queue a training job."""


class TrainingFailedError(PersonalizeError):
    """A training job ended without producing an adapter."""


class AdapterOwnershipError(PersonalizeError):
    """An adapter registered for one user carries another user's stamp: it is never served."""


class AdapterBaseMismatchError(PersonalizeError):
    """A user adapter was trained on another base (another task adapter, or none): serving it on this base would
    answer with weights it was never trained with."""


class AdapterUnavailableError(PersonalizeError, FileNotFoundError):
    def __init__(self, path: Path, why: str | None = None) -> None:
        self.path = path
        why = why or f"no {ADAPTER_METADATA}: missing or still being written"
        super().__init__(f"no usable adapter at {path} ({why}); train it (again)")


class AdapterHasNoEffectError(PersonalizeError):
    """A loaded adapter left the model's logits on a probe input as they were: it targets nothing (or was never
    trained), and serving it would answer as the base model while reporting the adapter. Refused, never served."""

    def __init__(self, name: str, path: Path, max_change: float) -> None:
        self.name, self.path, self.max_change = name, path, max_change
        super().__init__(
            f"adapter {name!r} at {path} does not change the model's output (largest logit change on a probe input "
            f"{max_change:.2e}): it targets no module of this model or was never trained; retrain it"
        )


class AdapterExistsError(PersonalizeError, FileExistsError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} already exists: adapters are never overwritten; train into a new folder")


class UnknownAdapterMethodError(InvalidInputError):
    def __init__(self, method: object, registered: list[str]) -> None:
        self.method = method
        self.registered = list(registered)
        super().__init__(
            f"unknown adapter method {method!r}: the registered methods are {', '.join(registered) or 'none'} "
            "(personalize.adapters.methods.register_adapter_method adds one)"
        )


class TrainingCancelled(PersonalizeError):
    """``should_stop()`` asked training to stop; nothing was written to the adapter folder."""
