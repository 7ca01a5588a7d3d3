"""peft:distill: context distillation per user. The user's adapter learns to answer, from the prompt *without*
retrieved items, what the model answers *with* them, so serving it needs no retrieval (a shorter prompt, no search).

- **Teacher.** The base that serves ``rag`` for the user (the task-adapted base where there is one, no user
  adapter), the rag prompt rendered by ``build_prompt`` exactly as ``rag`` renders it.
- **Context.** rag's retriever and k over the user's *other* items of the same task (leave-one-out): at query time
  rag sees the whole profile, so the teacher does too, except the item itself, whose own label in the context
  would make the teacher copy the gold.
- **Targets.** Label tasks (the pair's output is one of the task's labels): the label the teacher's label
  log-likelihoods choose (argmax, or the median for MAE-judged ratings, as the run decides). Generation tasks and
  label-free stand-ins: the teacher's greedy text (``teacher_max_new_tokens``).
- **Student.** The pair (prompt without context, teacher's answer), trained as any LoRA (``train_adapter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from personalize.adapters.task_adapters import check_pair_retriever, ranking_inputs, time_order, top_among
from personalize.adapters.training import item_pair, most_recent
from personalize.data.items import ProfileItem
from personalize.serving.hf_backend import generate_text
from personalize.serving.modeling import LoadedModel
from personalize.serving.scoring import candidate_log_likelihoods, median_label
from personalize.settings import DistillSettings
from personalize.tasks.prompting import build_prompt
from personalize.tasks.registry import Task, get_task

ProgressFn = Callable[[float, float | None], None]


@dataclass(frozen=True)
class TeacherRetrieval:
    """How the teacher retrieves: rag's retriever, k and token budget (``DistillSettings`` may override the first
    two)."""

    retriever: str
    k: int
    token_budget: int
    input_share: float


@dataclass(frozen=True)
class DistillPair:
    """One training pair and where its target came from."""

    item_id: str
    prompt: str  # the student's input: the item's prompt, no retrieved items
    teacher_prompt: str  # the same prompt with the user's other items, as rag renders it
    context: tuple[str, ...]  # ids of the items in the teacher's prompt
    target: str  # the teacher's answer: the student's output
    gold: str  # the item's own output (never a target unless the teacher answered it)
    scored: bool  # True: the target is a label chosen by log-likelihood; False: greedy text

    @property
    def pair(self) -> tuple[str, str]:
        return self.prompt, self.target


def teacher_retrieval(settings: Any, distill: DistillSettings) -> TeacherRetrieval:
    """rag's retrieval from ``settings`` (a ``Settings``), with the distill section's overrides."""
    retriever = check_pair_retriever(distill.retriever or settings.retriever)
    return TeacherRetrieval(retriever, distill.k or settings.k, settings.token_budget, settings.input_share)


def is_label(task: Task, gold: str) -> bool:
    """A pair whose output is one of the task's labels is scored over them; any other output is generated."""
    return gold in (task.labels or ())


def teacher_answer(
    loaded: LoadedModel, task: Task, prompt_ids: list[int], gold: str, distill: DistillSettings
) -> tuple[str, bool]:
    """The teacher's answer to an encoded rag prompt, and whether it was scored over the task's labels."""
    if is_label(task, gold):
        labels = task.labels or ()
        scores = dict(zip(labels, candidate_log_likelihoods(loaded, prompt_ids, labels), strict=True))
        if distill.decision == "median":
            return median_label(scores), True
        return max(labels, key=lambda label: scores[label]), True
    return generate_text(loaded, prompt_ids, distill.teacher_max_new_tokens).text, False


def distill_pairs(
    loaded: LoadedModel,
    items: Sequence[ProfileItem],
    distill: DistillSettings,
    retrieval: TeacherRetrieval,
    embedder: Any = None,
    progress: ProgressFn | None = None,
) -> list[DistillPair]:
    """The user's distillation pairs: one per usable item among the ``max_items`` most recent, its target the
    teacher's answer with the user's other items retrieved. Items whose teacher answer is empty are left out."""
    chosen = {item.id for item in most_recent(items, distill.max_items)}
    ordered = time_order(items)
    tasks = [get_task(item.task) for item in ordered]
    docs, vectors = ranking_inputs(ordered, tasks, retrieval.retriever, embedder, "the distill teacher")
    positions = [pos for pos, item in enumerate(ordered) if item.id in chosen]
    out: list[DistillPair] = []
    for done, pos in enumerate(positions):
        task, item = tasks[pos], ordered[pos]
        made = item_pair(task, item)
        if made is not None:
            pair = _distill_one(loaded, ordered, docs, tasks, pos, made, distill, retrieval, vectors, embedder)
            if pair is not None:
                out.append(pair)
        if progress is not None:
            progress((done + 1) / len(positions), None)
    return out


def _distill_one(
    loaded: LoadedModel,
    items: Sequence[ProfileItem],
    docs: Sequence[str],
    tasks: Sequence[Task],
    pos: int,
    made: tuple[str, str],
    distill: DistillSettings,
    retrieval: TeacherRetrieval,
    vectors: Any,
    embedder: Any,
) -> DistillPair | None:
    prompt, gold = made
    task = tasks[pos]
    others = [j for j in range(len(items)) if j != pos and tasks[j].name == task.name]
    query = task.query_text(prompt)
    query_vector = embedder.embed_one(query) if vectors is not None else None
    used = top_among(items, docs, others, query, retrieval.k, retrieval.retriever, vectors, query_vector)
    max_new = 1 if is_label(task, gold) else distill.teacher_max_new_tokens
    built = build_prompt(loaded, task, prompt, used, retrieval.token_budget, retrieval.input_share, max_new)
    target, scored = teacher_answer(loaded, task, built.input_ids, gold, distill)
    if not target.strip():
        return None
    return DistillPair(items[pos].id, prompt, built.text, tuple(h.id for h in built.used), target, gold, scored)


def distill_summary(pairs: Sequence[DistillPair], retrieval: TeacherRetrieval) -> dict[str, Any]:
    """What the adapter's metadata records of its targets: the teacher's retrieval and how often it agreed with
    the gold (a distilled adapter learns the teacher's answers, right or wrong)."""
    n = len(pairs)
    return {
        "retriever": retrieval.retriever,
        "k": retrieval.k,
        "token_budget": retrieval.token_budget,
        "pairs": n,
        "scored": sum(p.scored for p in pairs),
        "with_context": sum(bool(p.context) for p in pairs),
        "target_is_gold": (sum(p.target == p.gold for p in pairs) / n) if n else None,
    }
