"""Baselines: methods that need no language model, computed from the same per-user profile the model sees.

A comparison that cannot say whether the model beats "predict the user's usual rating" cannot say whether
personalization through the model works. Each baseline is one entry of ``BASELINES``: a name other tools read
(``majority``, ``user-majority``, ``user-mean``, ``nearest``, ``nearest-mean``, ``input-copy``), when it applies to a
task, and how it predicts from a ``BaselineInput``. The evaluation runner stores their answers like any method's.

- ``majority``: the most frequent label over the profiles of all users of the run (ties: the task's label order);
- ``user-majority``: the most frequent label of the user's own profile (ties: the run's counts, then label order);
- ``user-mean`` (rating tasks): the mean of the user's profile scores, rounded half up like the golds;
- ``nearest``: the output of the top retrieved item (run's retriever and k); for choice tasks such as LaMP-1 /
  reuters-authorship, whose profile items carry no label, the candidate whose best match in the profile scores
  higher; for generation tasks the most similar item's output (reuters-lead: its lead);
- ``nearest-mean`` (rating tasks): the mean score of the top k retrieved items, rounded half up;
- ``input-copy`` (generation tasks): the first sentence of the input's content (the lead baseline of news).

A baseline with nothing to go on (a user without labelled items) answers ``majority``'s label, and says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import fmean

from personalize.data.items import ProfileItem
from personalize.errors import InvalidInputError
from personalize.eval.metrics import LOWER_IS_BETTER, as_number
from personalize.methods import Method
from personalize.methods import register as register_method
from personalize.retrieval import RetrievedItem
from personalize.tasks.registry import Task


@dataclass(frozen=True)
class BaselineInput:
    """What a baseline may look at for one query: the user's profile, what retrieval found, the run's counts."""

    task: Task
    prompt: str
    profile: Sequence[ProfileItem]
    label_counts: Counter[str]  # labels over the profiles of every user of the run
    retrieved: Sequence[RetrievedItem] = ()
    candidate_scores: Sequence[float] = ()  # choice tasks: each candidate's best retrieval score in the profile


@dataclass(frozen=True)
class BaselineAnswer:
    prediction: str
    note: str = ""


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    applies: Callable[[Task], str | None]  # None when it applies, else why not
    predict: Callable[[BaselineInput], BaselineAnswer]
    retrieval: str = ""  # "" (none), "query" (top k for the query) or "candidates" (each choice, top 1)
    colour: str = "#444444"
    kind: str = field(default="no model")


def _is_rating(task: Task) -> bool:
    return bool(LOWER_IS_BETTER & set(task.metrics))


def _labelled_profile(task: Task) -> str | None:
    if task.labels is None:
        return f"{task.name} is a generation task (no label set)"
    if task.choice:
        return f"{task.name}'s profile items carry no label (the label picks one of the input's candidates)"
    return None


def _rating_only(task: Task) -> str | None:
    return None if _is_rating(task) else f"{task.name} is not a rating task"


def _generation_only(task: Task) -> str | None:
    return None if task.labels is None else f"{task.name} is a label task"


def _nearest_applies(task: Task) -> str | None:
    return None


def labels_of(task: Task, items: Sequence[ProfileItem]) -> list[str]:
    """The profile outputs that are labels of the task (stripped), in item order."""
    valid = set(task.labels or ())
    return [o for o in ((i.output or "").strip() for i in items) if o in valid]


def round_score(value: float) -> str:
    """A mean score rounded the way golds are (half up, clipped to 1..5)."""
    from personalize.eval.datasets.movielens import rating_score

    return str(rating_score(repr(value)))


def _majority_of(task: Task, counts: Counter[str], tie_break: Counter[str] | None = None) -> str | None:
    order = list(task.labels or ())
    present = [label for label in order if counts.get(label)]
    if not present:
        return None
    return min(present, key=lambda x: (-counts[x], -(tie_break or Counter())[x], order.index(x)))


def _run_majority(data: BaselineInput) -> BaselineAnswer:
    label = _majority_of(data.task, data.label_counts)
    if label is None:
        first = (data.task.labels or ("",))[0]
        return BaselineAnswer(first, "no labelled item in any profile of the run: the first label")
    return BaselineAnswer(label)


def _fallback(data: BaselineInput, why: str) -> BaselineAnswer:
    answer = _run_majority(data)
    return BaselineAnswer(answer.prediction, f"{why}: the run's majority label")


def _user_majority(data: BaselineInput) -> BaselineAnswer:
    label = _majority_of(data.task, Counter(labels_of(data.task, data.profile)), data.label_counts)
    return BaselineAnswer(label) if label is not None else _fallback(data, "no labelled item in the profile")


def _user_mean(data: BaselineInput) -> BaselineAnswer:
    scores = [v for v in (as_number(i.output) for i in data.profile if i.output is not None) if v is not None]
    return BaselineAnswer(round_score(fmean(scores))) if scores else _fallback(data, "no score in the profile")


def _nearest(data: BaselineInput) -> BaselineAnswer:
    task = data.task
    if task.choice:
        scores = list(data.candidate_scores)
        labels = list(task.labels or ())
        if len(scores) != len(labels) or not scores:
            return _fallback(data, "the input has no candidates to compare")
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return BaselineAnswer(labels[best])
    if task.labels is None:
        for hit in data.retrieved:
            output = (hit.item.output or "").strip()
            if output:
                return BaselineAnswer(output)
        return BaselineAnswer("", "nothing retrieved")
    found = labels_of(task, [hit.item for hit in data.retrieved])
    return BaselineAnswer(found[0]) if found else _fallback(data, "no labelled item retrieved")


def _nearest_mean(data: BaselineInput) -> BaselineAnswer:
    scores = [v for v in (as_number(h.item.output) for h in data.retrieved if h.item.output) if v is not None]
    return BaselineAnswer(round_score(fmean(scores))) if scores else _fallback(data, "no scored item retrieved")


def _input_copy(data: BaselineInput) -> BaselineAnswer:
    from personalize.eval.datasets.reuters import first_sentence

    return BaselineAnswer(first_sentence(data.task.query_text(data.prompt)))


BASELINES: dict[str, Baseline] = {}


def register(baseline: Baseline) -> Baseline:
    """A baseline is also a method of the vocabulary (``personalize.methods``), marked as needing no model."""
    BASELINES[baseline.name] = baseline
    register_method(
        Method(
            baseline.name,
            baseline.description,
            uses_retrieval=bool(baseline.retrieval),
            colour=baseline.colour,
            baseline=True,
        )
    )
    return baseline


register(
    Baseline(
        "majority",
        "the most frequent label over the run's profiles",
        _labelled_profile,
        _run_majority,
        colour="#8c564b",
    )
)
register(
    Baseline(
        "user-majority",
        "the most frequent label of the user's own profile",
        _labelled_profile,
        _user_majority,
        colour="#e377c2",
    )
)
register(
    Baseline("user-mean", "the mean of the user's profile scores, rounded", _rating_only, _user_mean, colour="#bcbd22")
)
register(
    Baseline(
        "nearest",
        "the output of the top retrieved item (choice tasks: the candidate nearest to the profile)",
        _nearest_applies,
        _nearest,
        retrieval="query",
        colour="#17becf",
    )
)
register(
    Baseline(
        "nearest-mean",
        "the mean score of the top k retrieved, rounded",
        _rating_only,
        _nearest_mean,
        "query",
        colour="#9467bd",
    )
)
register(Baseline("input-copy", "the first sentence of the input", _generation_only, _input_copy, colour="#d62728"))


def is_baseline(method: str) -> bool:
    return method in BASELINES


def baselines_for(task: Task) -> list[str]:
    """Every baseline that applies to the task, in registry order."""
    return [name for name, b in BASELINES.items() if b.applies(task) is None]


def check_baseline(name: str, task: Task) -> Baseline:
    """The baseline, or a clear error: an unknown name, or one that does not apply to the task."""
    baseline = BASELINES.get(name)
    if baseline is None:
        raise InvalidInputError(f"unknown baseline {name!r}; baselines: {', '.join(BASELINES)}")
    why = baseline.applies(task)
    if why is not None:
        usable = ", ".join(baselines_for(task)) or "none"
        raise InvalidInputError(f"baseline {name!r} does not apply to {task.name}: {why} (usable: {usable})")
    return baseline


def retrieval_mode(name: str, task: Task) -> str:
    """What retrieval the baseline needs for this task: '', 'query' or 'candidates'."""
    baseline = BASELINES[name]
    if baseline.retrieval == "query" and task.choice:
        return "candidates"
    return baseline.retrieval
