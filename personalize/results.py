"""Typed results returned to applications."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict


@dataclass(frozen=True)
class RetrievedRef:
    id: str
    score: float


class ServingFacts(TypedDict, total=False):
    """What serving records about one answer beside its timings (``Timings.extra``): which decoder ran and why,
    the adapter it used and whether it was cached, the batch it ran in, and label scores under likelihood scoring."""

    backend: str  # the serving backend that answered (``personalize.serving.backend``)
    decoder: str  # fast-q8, fast-fp32 or plain
    decoder_note: str  # why the decoder is not the fastest one
    engine: str  # the remote engine that decoded, as ``vllm <version> at URL`` (the vllm backend)
    engine_model: str  # the model the engine answered with: the base's name there, or the adapter's LoRA name
    adapter_version: int
    adapter_cache_hit: bool
    adapter_load_s: float
    adapter_method: str  # the adapter's method: lora, ia3, prompt-tuning, p-tuning, prefix-tuning
    adapter_batching: str  # how its rows shared forward passes: single, mixed, grouped, one-at-a-time, by method
    task_adapter: str | None  # the task adapter merged into the base, as ``task@vN#hash``
    batch_size: int
    label_log_likelihoods: dict[str, float]


@dataclass
class Timings:
    """Seconds spent in each stage of one ``generate`` call."""

    retrieval_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    total_s: float = 0.0
    extra: ServingFacts = field(default_factory=lambda: ServingFacts())


@dataclass
class GenerationResult:
    user_id: str
    text: str
    method: str
    requested_method: str
    task: str
    retriever: str | None
    retrieved: list[RetrievedRef]
    prompt: str
    prompt_tokens: int
    new_tokens: int
    timings: Timings
    notes: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def retrieved_ids(self) -> list[str]:
        return [r.id for r in self.retrieved]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ForgetReport:
    """What ``forget`` removed."""

    user_id: str
    items: int = 0
    adapters: int = 0
    jobs: int = 0
    eval_answers: int = 0  # an evaluation user's stored answers in evaluation runs
    collection: bool = False
    files: list[str] = field(default_factory=list)
    task_adapters: list[str] = field(default_factory=list)  # task adapters trained on the user's items (now marked)
    task_adapter_retrain: list[str] = field(default_factory=list)  # what happened to their retrain, one line each
    wal_truncated: bool = True  # SQLite: no copy of the deleted rows is left in the WAL (False: a reader held it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
