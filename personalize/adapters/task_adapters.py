"""Task adapters: one LoRA per (task, base model), trained on pooled pairs from many users, merged into the base.

Why: zero-shot, a 135M model cannot do our tasks (it scores worse than a constant on movielens-rating), so a
comparison on it measures its inability to do the task, not personalization. LaMP's fine-tuned setting trains the
model on the task first; OPPU trains one shared LoRA on pooled users, merges it, then trains each user's LoRA on top.

- **Pairs.** Each user's profile items give pairs in the task's own template (``training.item_pair``, with the same
  label-free stand-ins as per-user training). About half carry retrieved context: the run's retriever, k and token
  budget, retrieving only from that user's items *earlier* than the item (profile time order: timestamp, then the
  position the builder sorted it to). So the one adapter serves ``none`` prompts and ``rag`` prompts alike.
- **Hygiene.** ``cut="time"`` (default): only the items each user had before their first query of the evaluated
  split (the intersection of their queries' profiles), never a query's own item. ``cut="user"``: only users of the
  split that are not evaluated (the first ``eval_users`` are held out).
- **Merged, not stacked.** Serving merges the adapter into a copy of the base weights (``task_model``), so the fast
  decoder, the fast trainer and peft's mixed batches see one plain Llama and a user's LoRA stays a single peft
  adapter on top; the cost is one more copy of the weights per task in memory.
- **Storage.** ``{adapters_dir}/_tasks/{task}/{model key}/v0001``: peft's format plus ``personalize.json`` (task,
  base model, data hash, the hashed keys of the users, pairs, tokens, seconds, final loss), written atomically.
  ``forget`` finds the adapters a user's items trained and marks them (``forgotten.json``) until a retrain.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from personalize.adapters.format import read_metadata
from personalize.adapters.peft_utils import strip_tuner_layers
from personalize.adapters.training import _stable_fraction
from personalize.data.items import ProfileItem
from personalize.data.naming import eval_user_id, user_key
from personalize.errors import InvalidInputError, PersonalizeError
from personalize.retrieval import BUILTIN_RETRIEVERS, BM25Index, RetrievedItem, check_retriever
from personalize.serving.modeling import LoadedModel, MergedLora
from personalize.settings import TaskAdapterSettings
from personalize.tasks.prompting import build_prompt, count_tokens
from personalize.tasks.registry import Task, get_task

TASKS_FOLDER = "_tasks"  # under the adapter store's root; user folders are named u-..., so never clash
FORGOTTEN = "forgotten.json"
JOBS_FOLDER = "_jobs"
Cut = Literal["time", "user"]
ProgressFn = Callable[[float, float | None], None]


class TaskAdapterSource(BaseModel):
    """What a task adapter is trained on: a dataset (a builder's folder or LaMP files) and the hygiene rule."""

    model_config = ConfigDict(extra="forbid")

    task: str
    data: str = Field(
        description="A raw-data folder a builder reads, a folder of LaMP files, 'store' (the store's users with items "
        "of the task: all their items) or 'SYNTHETIC' (the synthetic rating set, labelled as such)."
    )
    split: str = Field("test", description="The evaluated split: its users' items before their first query.")
    users: int | None = Field(None, ge=1, description="The first N users of the split (None: all).")
    cut: Cut = "time"
    eval_users: int | None = Field(
        None, ge=1, description="cut=user: the first N users of the split are evaluated and held out."
    )
    retriever: str = "bm25"
    k: int = Field(4, ge=1, le=100)
    exclude_user_keys: list[str] = Field(default_factory=list, description="Users forgotten since (hashed keys).")


@dataclass(frozen=True)
class TaskPair:
    """One training pair and where it came from (the hygiene test reads ``item_id`` and ``context_ids``)."""

    user_key: str
    item_id: str
    prompt: str
    output: str
    context_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskAdapterInfo:
    """A stored task adapter."""

    task: str
    base_model: str
    version: int
    path: Path
    metadata: dict[str, Any]
    forgotten: tuple[str, ...] = ()  # hashed keys of users forgotten since it was trained (pending a retrain)

    @property
    def ref(self) -> str:
        """``task@vN#hash``: what user adapters and eval runs record."""
        return f"{self.task}@v{self.version}#{self.metadata.get('data_hash', '')[:12]}"

    def summary(self) -> dict[str, Any]:
        m = self.metadata
        return {
            "ref": self.ref,
            "task": self.task,
            "base_model": self.base_model,
            "version": self.version,
            "path": str(self.path),
            "users": m.get("n_users"),
            "pairs": m.get("n_pairs"),
            "with_context": m.get("n_with_context"),
            "tokens": m.get("n_tokens"),
            "steps": m.get("steps"),
            "seconds": m.get("train_seconds"),
            "final_loss": m.get("final_loss"),
            "cut": (m.get("source") or {}).get("cut"),
            "data_hash": m.get("data_hash"),
            "forgotten_users": len(self.forgotten),
            "created_at": m.get("created_at"),
        }


def model_key(base_model: str) -> str:
    """A folder name for a base model id (any string): a readable slug plus a hash."""
    digest = hashlib.sha256(base_model.encode("utf-8")).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in base_model.lower()).strip("-")[:40]
    return f"{slug}-{digest}" if slug else digest


def _check_task_name(task: str) -> str:
    get_task(task)  # unknown tasks raise a clear error
    if not task or "/" in task or task.startswith("."):
        raise InvalidInputError(f"task name {task!r} cannot name a folder")
    return task


def _write_json_atomic(path: Path, value: Any) -> None:
    from personalize.eval.datasets.lamp import _write_atomic

    _write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class TaskAdapterStore:
    """Task adapters in ``{root}/{task}/{model key}/v{NNNN}``, versioned, written only by an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def folder(self, task: str, base_model: str) -> Path:
        return self.root / _check_task_name(task) / model_key(base_model)

    def versions(self, task: str, base_model: str) -> list[TaskAdapterInfo]:
        """Complete adapters of (task, base model), oldest first."""
        folder = self.folder(task, base_model)
        if not folder.is_dir():
            return []
        out = []
        for child in sorted(folder.glob("v[0-9][0-9][0-9][0-9]*")):
            info = self._info(child)
            if info is not None and info.base_model == base_model:
                out.append(info)
        return out

    def _info(self, path: Path) -> TaskAdapterInfo | None:
        metadata = read_metadata(path)
        if metadata is None or metadata.get("kind") != "task":
            return None
        forgotten = _read_json(path / FORGOTTEN) or []
        return TaskAdapterInfo(
            metadata["task"], metadata["base_model"], int(path.name[1:]), path, metadata, tuple(forgotten)
        )

    def current(self, task: str, base_model: str) -> TaskAdapterInfo | None:
        versions = self.versions(task, base_model)
        return versions[-1] if versions else None

    def get(self, task: str, base_model: str, version: int | None = None) -> TaskAdapterInfo:
        versions = self.versions(task, base_model)
        found = [v for v in versions if version is None or v.version == version]
        if not found:
            which = f"v{version}" if version is not None else "any version"
            raise InvalidInputError(
                f"no task adapter for task {task!r} on {base_model!r} ({which}); train one with "
                f"`personalize task-adapter train --task {task} --data ...`"
            )
        return found[-1]

    def all(self) -> list[TaskAdapterInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*/*/v[0-9][0-9][0-9][0-9]*")):
            info = self._info(path)
            if info is not None:
                out.append(info)
        return out

    def next_path(self, task: str, base_model: str) -> Path:
        folder = self.folder(task, base_model)
        numbers = [int(p.name[1:]) for p in folder.glob("v[0-9][0-9][0-9][0-9]") if p.name[1:].isdigit()]
        return folder / f"v{max(numbers, default=0) + 1:04d}"

    def remove(self, task: str, base_model: str, version: int) -> Path:
        info = self.get(task, base_model, version)
        shutil.rmtree(info.path)
        return info.path

    def trained_on(self, key: str) -> list[TaskAdapterInfo]:
        """Every task adapter whose training pairs came from the user with hashed key ``key``."""
        return [info for info in self.all() if key in info.metadata.get("user_keys", [])]

    def mark_forgotten(self, key: str) -> list[TaskAdapterInfo]:
        """Record that the user ``key`` was forgotten in every adapter trained on them (list shows the mark)."""
        marked = []
        for info in self.trained_on(key):
            if key not in info.forgotten:
                _write_json_atomic(info.path / FORGOTTEN, sorted({*info.forgotten, key}))
            marked.append(info)
        return marked

    # -- jobs: a task adapter is trained by a Celery worker; its progress lives in one JSON file per job ------------

    def job_path(self, job_id: str) -> Path:
        if not job_id or any(c not in "0123456789abcdef" for c in job_id):
            raise InvalidInputError(f"task adapter job id {job_id!r} is not a hex id")
        return self.root / JOBS_FOLDER / f"{job_id}.json"

    def new_job(self, source: TaskAdapterSource, base_model: str, reason: str) -> str:
        job_id = uuid.uuid4().hex[:16]
        self.write_job(
            job_id,
            {
                "id": job_id,
                "state": "queued",
                "progress": 0.0,
                "loss": None,
                "source": source.model_dump(),
                "base_model": base_model,
                "reason": reason,
                "created_at": _now(),
            },
        )
        return job_id

    def write_job(self, job_id: str, record: dict[str, Any]) -> None:
        _write_json_atomic(self.job_path(job_id), record)

    def job(self, job_id: str) -> dict[str, Any] | None:
        return _read_json(self.job_path(job_id))

    def jobs(self) -> list[dict[str, Any]]:
        folder = self.root / JOBS_FOLDER
        records = [_read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return sorted((r for r in records if r), key=lambda r: r.get("created_at", ""))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- which items and users: the hygiene rule ----------------------------------------------------------------------


def select_training_users(dataset: Any, source: TaskAdapterSource) -> dict[str, list[ProfileItem]]:
    """Per user id (as the runner stores it: ``eval_user_id``), the items a task adapter may train on.

    time: the split's (first ``users``) users, each with the items of *every* one of their queries' profiles (so
    what they had before their first query) minus any item that is itself a query; user: the split's users after
    the first ``eval_users``, all their profile items."""
    from personalize.data.ingest import lamp_item

    order: list[str] = []
    profiles: dict[str, list[dict[str, dict]]] = {}
    query_ids: set[str] = set()
    for q in dataset.queries:
        if q.user_id not in profiles:
            order.append(q.user_id)
            profiles[q.user_id] = []
        profiles[q.user_id].append({str(raw.get("id")): raw for raw in q.profile})
        query_ids.add(str(q.id))
    if source.cut == "time":
        chosen = order[: source.users] if source.users else order
    else:
        held_out = source.eval_users or source.users
        if not held_out:
            raise InvalidInputError("cut=user needs --eval-users N: the first N users are evaluated and held out")
        chosen = order[held_out:]
        if not chosen:
            raise InvalidInputError(f"cut=user: the split has only {len(order)} user(s), all of them evaluated")
    excluded = set(source.exclude_user_keys)
    out: dict[str, list[ProfileItem]] = {}
    for user in chosen:
        uid = eval_user_id(source.task, source.split, user)
        if user_key(uid) in excluded:
            continue
        per_query = profiles[user]
        common = [i for i in per_query[0] if all(i in p for p in per_query[1:]) and i not in query_ids]
        items = [lamp_item(source.task, per_query[0][i]) for i in common]
        if items:
            out[uid] = items
    return out


def time_order(items: Sequence[ProfileItem]) -> list[ProfileItem]:
    """Oldest first: by timestamp (undated first), ties in their profile order (builders sort by time)."""
    indexed = list(enumerate(items))
    indexed.sort(key=lambda p: (p[1].timestamp is not None, p[1].timestamp or 0, p[0]))
    return [item for _, item in indexed]


# --- pairs --------------------------------------------------------------------------------------------------------


def check_pair_retriever(name: str) -> str:
    """A retriever the context of task-adapter pairs can be ranked with: the built-in ones, which ``top_among``
    mirrors over a user's earlier items (a registered retriever searches stored items, not a prefix of them)."""
    check_retriever(name)
    if name not in BUILTIN_RETRIEVERS:
        raise InvalidInputError(
            f"task-adapter pairs rank earlier items with {', '.join(BUILTIN_RETRIEVERS)}, not with retriever {name!r}"
        )
    return name


def ranking_inputs(
    items: Sequence[ProfileItem], tasks: Sequence[Task], retriever: str, embedder: Any, what: str
) -> tuple[list[str], np.ndarray | None]:
    """What ``top_among`` ranks a user's items by: each item's retrieval text under its task, and their embeddings
    when the retriever is dense (``what`` names the caller in the error when no embedder was given)."""
    docs = [t.doc_text(t.item_values(i)) or i.text for t, i in zip(tasks, items, strict=True)]
    if retriever != "dense":
        return docs, None
    if embedder is None:
        raise InvalidInputError(f"dense retrieval for {what} needs the embedder")
    return docs, embedder.embed(docs)


def top_among(
    items: Sequence[ProfileItem],
    docs: Sequence[str],
    cands: list[int],
    query: str,
    k: int,
    retriever: str,
    vectors: np.ndarray | None = None,
    query_vector: np.ndarray | None = None,
) -> list[RetrievedItem]:
    """The top k of ``items[cands]`` (``cands`` in time order), ranked as the built-in ``retriever`` ranks them
    among those items alone: BM25 over their doc texts, cosine over their ``vectors``, or the newest first."""
    if not cands or k <= 0:
        return []
    if retriever == "recency":
        ranked = [(j, 1.0 / (r + 1)) for r, j in enumerate(reversed(cands[-k:]))]
    elif retriever == "dense":
        assert vectors is not None and query_vector is not None
        ranked = _dense_top(vectors, cands, query_vector, k)
    else:
        index = BM25Index([str(j) for j in cands], [docs[j] for j in cands])
        ranked = [(int(i), s) for i, s in index.top(query, k)]
    return [RetrievedItem(items[j].id, float(s), items[j]) for j, s in ranked[:k]]


def _dense_top(vectors: np.ndarray, cands: list[int], query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
    scores = vectors[cands] @ query_vector
    top = np.argsort(-scores, kind="stable")[:k]
    return [(cands[int(t)], float(scores[int(t)])) for t in top]


def build_task_pairs(
    loaded: LoadedModel,
    users: dict[str, list[ProfileItem]],
    source: TaskAdapterSource,
    settings: TaskAdapterSettings,
    token_budget: int,
    input_share: float,
    embedder: Any = None,
) -> list[TaskPair]:
    """Pooled pairs: per user the ``max_pairs_per_user`` most recent usable items, about ``context_share`` of them
    with the top-k of that user's earlier items rendered as ``rag`` renders them; then shuffled (seeded) and cut to
    ``max_pairs`` and to ``max_tokens``."""
    from personalize.adapters.training import item_pair

    check_pair_retriever(source.retriever)
    task = get_task(source.task)
    pairs: list[TaskPair] = []
    for uid, raw_items in users.items():
        key = user_key(uid)
        items = time_order(raw_items)
        docs, vectors = ranking_inputs(items, [task] * len(items), source.retriever, embedder, "task-adapter pairs")
        make_pair = _choice_pairs(task, key, users) if task.name in CHOICE_PAIRS else partial(item_pair, task)
        usable = [(pos, p) for pos in range(len(items)) if (p := make_pair(items[pos])) is not None]
        for pos, (prompt, output) in usable[-settings.max_pairs_per_user :]:
            with_context = _stable_fraction(f"{key}/{items[pos].id}/context") < settings.context_share
            used: list[RetrievedItem] = []
            if with_context:
                query = task.query_text(prompt)
                qv = embedder.embed_one(query) if vectors is not None else None
                earlier = _earlier_candidates(items, pos)  # never an item dated after this one
                used = top_among(items, docs, earlier, query, source.k, source.retriever, vectors, qv)
            if used:
                built = build_prompt(loaded, task, prompt, used, token_budget, input_share, 1)
                prompt_text, context = built.text, tuple(h.id for h in built.used)
            else:
                prompt_text, context = prompt, ()
            pairs.append(TaskPair(key, items[pos].id, prompt_text, output, context))
    order = sorted(range(len(pairs)), key=lambda i: _stable_fraction(f"{settings.lora.seed}/{i}/{pairs[i].item_id}"))
    shuffled = [pairs[i] for i in order][: settings.max_pairs]
    kept, tokens = [], 0
    for pair in shuffled:
        # what training will see: the pair cut to max_length, plus the chat template and the eos
        n = min(count_tokens(loaded, pair.prompt) + count_tokens(loaded, pair.output) + 24, settings.lora.max_length)
        if tokens + n > settings.max_tokens:
            break
        kept.append(pair)
        tokens += n
    return kept


CHOICE_PAIRS = ("reuters-authorship",)
PAIR_OVERHEAD = 96  # tokens of a pair beyond the rag prompt's budget: chat template, output, eos


def _full_text(item: ProfileItem) -> str:
    fields = item.fields or {}
    return " ".join(str(fields.get(f, "")).strip() for f in ("title", "text")).strip() or item.text


def _choice_pairs(task: Task, key: str, users: dict[str, list[ProfileItem]]) -> Callable[[ProfileItem], Any]:
    """reuters-authorship pairs in the task's own format, made from profiles alone: the user's article against
    another user's profile article (drawn by a stable hash), each cut to its first 60 words, in a drawn order; the
    label says which one the user wrote. Pooled over users this teaches the choice format; with retrieved context
    it teaches comparing a passage to the user's earlier articles. (Per-user training keeps LaMP's continuation
    stand-in.)"""
    from personalize.eval.datasets.reuters import AUTHORSHIP_INPUT_TEMPLATE, first_words

    others = sorted(u for u in users if user_key(u) != key)

    def pair(item: ProfileItem) -> tuple[str, str] | None:
        if not others:
            return None
        pick = _stable_fraction(f"{key}/{item.id}/distractor")
        pool = users[others[int(pick * len(others))]]
        distractor = pool[int(_stable_fraction(f"{key}/{item.id}/article") * len(pool))]
        own, other = first_words(_full_text(item)), first_words(_full_text(distractor))
        own_first = _stable_fraction(f"{key}/{item.id}/order") < 0.5
        first, second = (own, other) if own_first else (other, own)
        return AUTHORSHIP_INPUT_TEMPLATE.format(passage1=first, passage2=second), "[1]" if own_first else "[2]"

    return pair


def _earlier_candidates(items: Sequence[ProfileItem], position: int) -> list[int]:
    item = items[position]
    return [
        j
        for j in range(position)
        if item.timestamp is None or (earlier := items[j].timestamp) is None or earlier <= item.timestamp
    ]


def data_hash(pairs: Sequence[TaskPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.user_key, p.item_id, p.prompt, p.output], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


# --- training -----------------------------------------------------------------------------------------------------


@dataclass
class TaskTrainResult:
    info: TaskAdapterInfo
    pairs: list[TaskPair] = field(default_factory=list)


def train_task_adapter(
    loaded: LoadedModel,
    store: TaskAdapterStore,
    source: TaskAdapterSource,
    settings: TaskAdapterSettings,
    users: dict[str, list[ProfileItem]],
    *,
    token_budget: int,
    input_share: float,
    embedder: Any = None,
    progress: ProgressFn | None = None,
) -> TaskTrainResult:
    """Build the pooled pairs and train one LoRA on them into the next version folder of (task, base model)."""
    from personalize.adapters.training import train_adapter

    if not users:
        raise InvalidInputError(f"no users with items to train a task adapter for {source.task!r} on")
    # a context pair must fit max_length whole (question at its end included): the rag budget, or what fits
    budget = max(32, min(token_budget, settings.lora.max_length - PAIR_OVERHEAD))
    pairs = build_task_pairs(loaded, users, source, settings, budget, input_share, embedder)
    if not pairs:
        raise InvalidInputError("no training pairs: the users' items give no (input, output) pair for this task")
    digest = data_hash(pairs)
    extra = {
        "kind": "task",
        "task": source.task,
        "data_hash": digest,
        "source": source.model_dump(),
        "user_keys": sorted({p.user_key for p in pairs}),
        "n_users": len({p.user_key for p in pairs}),
        "n_with_context": sum(1 for p in pairs if p.context_ids),
        "context_token_budget": budget,
        "task_settings": settings.model_dump(exclude={"lora"}),
    }
    out = store.next_path(source.task, loaded.name)
    result = train_adapter(loaded, [(p.prompt, p.output) for p in pairs], settings.lora, out, progress, extra=extra)
    info = store.get(source.task, loaded.name, int(result.path.name[1:]))
    return TaskTrainResult(info, pairs)


# --- serving: the base model with the task adapter merged in --------------------------------------------------------

_MERGED: dict[tuple[int, str], LoadedModel] = {}
_MERGED_LOCK = threading.Lock()


def task_model(base: LoadedModel, info: TaskAdapterInfo) -> LoadedModel:
    """The base model with ``info``'s LoRA merged into a copy of its weights, built once per process. Its name
    (``{base}+{ref}``) is what user adapters trained on it record as their base model, so serving refuses a user
    adapter trained on another task adapter."""
    key = (id(base.model), str(info.path))
    with _MERGED_LOCK:
        if key not in _MERGED:
            _MERGED[key] = _merge(base, info)
        return _MERGED[key]


def _merge(base: LoadedModel, info: TaskAdapterInfo) -> LoadedModel:
    from peft import PeftModel

    if info.base_model != base.name:
        raise InvalidInputError(f"task adapter {info.ref} was trained on {info.base_model!r}, not on {base.name!r}")
    start = time.perf_counter()
    try:
        peft_model = PeftModel.from_pretrained(strip_tuner_layers(copy.deepcopy(base.model)), str(info.path))
        unmerged = _unmerged_lora(base, peft_model, info)
        merged = peft_model.merge_and_unload()
    except Exception as exc:
        raise PersonalizeError(
            f"cannot load task adapter {info.ref} at {info.path}: {type(exc).__name__}: {exc}"
        ) from exc
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        name=f"{base.name}+{info.ref}",
        model=merged,
        tokenizer=base.tokenizer,
        is_encoder_decoder=base.is_encoder_decoder,
        context_length=base.context_length,
        load_seconds=time.perf_counter() - start,
        source=f"{base.source} + {info.path}",
        merged_lora=unmerged,
    )


def _unmerged_lora(base: LoadedModel, peft_model: Any, info: TaskAdapterInfo) -> MergedLora | None:
    """The task LoRA's pairs, read before merging, for the fast decoder's exact 8-bit path; None where the fast
    decoder could not run the LoRA unmerged (it then decodes the merged weights, as the plain path does)."""
    from personalize.cpu.fastpath import lora_config_unsupported_reason, lora_pairs, unsupported_reason

    config = peft_model.peft_config["default"]
    if unsupported_reason(base.model) or lora_config_unsupported_reason(config):
        return None
    return MergedLora(base=base, key=str(info.path), pairs=lora_pairs(peft_model, "default"))


__all__ = [
    "TaskAdapterInfo",
    "TaskAdapterSettings",
    "TaskAdapterSource",
    "TaskAdapterStore",
    "TaskPair",
    "build_task_pairs",
    "model_key",
    "select_training_users",
    "task_model",
    "train_task_adapter",
]
