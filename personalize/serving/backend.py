"""The serving seam: given rows of (prompt ids, adapter), decode them or score labels; the personalizer never
knows how.

A backend is chosen once per client from settings (``Settings.decoder``: ``plain`` is Hugging Face ``generate``
through peft, ``fast``/``fast-fp32`` is the CPU fast decoder with the plain path as its fallback). Backends
register themselves by name, so another engine (a remote server, a GPU runtime) is one module plus a
``register_backend`` call. Every backend records what ran in the answer's ``ServingFacts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from personalize.errors import InvalidInputError
from personalize.results import ServingFacts
from personalize.serving.modeling import LoadedModel

if TYPE_CHECKING:
    from personalize.jobs.store import AdapterInfo
    from personalize.serving.hf_backend import HFBackend
    from personalize.settings import Settings


@dataclass(frozen=True)
class AdapterRef:
    """A user's adapter as serving needs it: its name in the model (the user's key), folder, version, peft type
    and the task adapter it was trained on."""

    user_key: str
    path: Path
    version: int
    peft_type: str = "LORA"
    task_adapter: str | None = None
    method: str = "lora"  # the adapter method: a user may hold adapters of several methods at once
    dora: bool = False  # a DoRA LoRA (``LoraSettings.use_dora``): peft type LORA, but no engine of plain LoRA runs it

    @property
    def name(self) -> str:
        """The adapter's name in the caches: the user key for LoRA, ``{key}_{method}`` for another method. A user's
        LoRA and distill adapters (both peft type LORA, one cache) would otherwise replace each other on every
        request. User keys hold no ``_``, so ``evict_user`` can tell a user's names apart from any other user's."""
        return self.user_key if self.method == "lora" else f"{self.user_key}_{self.method}"

    @classmethod
    def of(cls, user_key: str, adapter: AdapterInfo) -> AdapterRef:
        config = adapter.config or {}
        task_adapter = config.get("task_adapter")
        return cls(
            user_key,
            Path(adapter.path),
            adapter.version,
            str(config.get("peft_type", "LORA")),
            task_adapter if isinstance(task_adapter, str) else None,
            adapter.method,
            config.get("use_dora") is True,
        )


@dataclass(frozen=True)
class DecodeRow:
    """One row of a batch: the encoded prompt and the adapter it runs with (None: the base)."""

    prompt_ids: Sequence[int]
    adapter: AdapterRef | None = None


class Generated(NamedTuple):
    """A decoded answer: its text and how many tokens were generated (unpacks as ``text, new_tokens``)."""

    text: str
    new_tokens: int


class ServingBackend(Protocol):
    """Decode rows greedily, or score a label set; each call runs on one base (``loaded``)."""

    name: str

    def generate(
        self, loaded: LoadedModel, rows: Sequence[DecodeRow], max_new_tokens: int, facts: ServingFacts
    ) -> list[Generated]: ...

    def score_labels(
        self, loaded: LoadedModel, prompts: Sequence[Sequence[int]], labels: Sequence[str], adapter: AdapterRef | None
    ) -> list[list[float]]:
        """log p(label | prompt) for every label, one list per prompt."""
        ...

    def adapters_per_batch(self, loaded: LoadedModel) -> int:
        """How many distinct adapters one batch may hold."""
        ...

    def evict(self, user_key: str) -> None:
        """Drop a user's adapter from every cache (the user was forgotten or retrained)."""
        ...


# settings, and the client's plain backend: the reference and fallback any backend may share (its adapter cache)
BackendFactory = Callable[["Settings", "HFBackend"], ServingBackend]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(decoder: str, factory: BackendFactory) -> None:
    """Serve ``Settings.decoder == decoder`` with the backend ``factory`` builds."""
    BACKENDS[decoder] = factory


def get_backend_factory(decoder: str) -> BackendFactory:
    try:
        return BACKENDS[decoder]
    except KeyError:
        raise InvalidInputError(
            f"no serving backend for decoder {decoder!r}; registered: {', '.join(sorted(BACKENDS))}"
        ) from None


__all__ = [
    "BACKENDS",
    "AdapterRef",
    "DecodeRow",
    "Generated",
    "ServingBackend",
    "get_backend_factory",
    "register_backend",
]
