"""LaMP's evaluation rules (../shared/LAMP.md section 3), and the paper's relative improvement.

- Classification (``accuracy``, ``f1``): predictions and golds are stripped and compared as strings; a prediction
  outside the label set counts as wrong; macro-F1 is the mean over the task's fixed label list of each label's F1,
  which is 0 where it is undefined (no gold and no prediction of that label), as scikit-learn computes it.
- Rating (``mae``, ``rmse``): a prediction is a number when ``float(text.strip())`` accepts it and the value is
  finite, so ``" 4 "``, ``"4."``, ``"4.0"`` and ``"3.5"`` are numbers (used as they are, neither rounded nor
  clipped), while ``"four"``, ``"4/5"``, ``""``, ``"nan"`` and ``"inf"`` are not. A non-number is replaced by
  whichever of 1 or 5 is farther from the gold; for a gold of exactly 3 (a tie) that is 5, as in LaMP's script.
  RMSE is the square root of the mean squared error.
- Generation (``rouge-1``, ``rouge-l``): the F-measure of ``rouge_score``'s ROUGE-1 and ROUGE-L without stemming,
  averaged with a plain mean over examples.

Every metric of an empty list is ``nan``; lists of different lengths raise ``InvalidInputError``.
Turning free model output into a prediction is ``parse_prediction``'s job; the metrics only strip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from personalize.errors import InvalidInputError
from personalize.tasks.registry import get_task

LOWER_IS_BETTER = frozenset({"mae", "rmse"})
METRICS = ("accuracy", "f1", "mae", "rmse", "rouge-1", "rouge-l")
RATING_RANGE = (1.0, 5.0)


def _pairs(preds: Sequence[object], golds: Sequence[object]) -> list[tuple[str, str]]:
    if len(preds) != len(golds):
        raise InvalidInputError(f"{len(preds)} predictions for {len(golds)} golds")
    return [
        ("" if p is None else str(p).strip(), "" if g is None else str(g).strip())
        for p, g in zip(preds, golds, strict=True)
    ]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------- classification


def accuracy(preds: Sequence[object], golds: Sequence[object]) -> float:
    """Fraction of stripped predictions equal to the stripped gold."""
    return _mean(1.0 if p == g else 0.0 for p, g in _pairs(preds, golds))


def macro_f1(preds: Sequence[object], golds: Sequence[object], labels: Sequence[str]) -> float:
    """Mean over ``labels`` of each label's F1 (0 when undefined); a prediction outside ``labels`` is wrong."""
    pairs = _pairs(preds, golds)
    if not pairs:
        return float("nan")
    if not labels:
        raise InvalidInputError("macro-F1 needs a label list")
    scores = []
    for label in labels:
        tp = sum(1 for p, g in pairs if p == label and g == label)
        fp = sum(1 for p, g in pairs if p == label and g != label)
        fn = sum(1 for p, g in pairs if p != label and g == label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return _mean(scores)


# --------------------------------------------------------------------------------------------- rating


def as_number(text: object) -> float | None:
    """``float(text.strip())`` when that is a finite number, else ``None``."""
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def rating_pairs(preds: Sequence[object], golds: Sequence[object]) -> list[tuple[float, float]]:
    low, high = RATING_RANGE
    out = []
    for n, (p, g) in enumerate(_pairs(preds, golds)):
        gold = as_number(g)
        if gold is None:
            raise InvalidInputError(f"gold {n} is not a number: {g!r}")
        pred = as_number(p)
        if pred is None:
            pred = low if abs(low - gold) > abs(high - gold) else high
        out.append((pred, gold))
    return out


def mae(preds: Sequence[object], golds: Sequence[object]) -> float:
    return _mean(abs(p - g) for p, g in rating_pairs(preds, golds))


def rmse(preds: Sequence[object], golds: Sequence[object]) -> float:
    return math.sqrt(_mean((p - g) ** 2 for p, g in rating_pairs(preds, golds)))


# --------------------------------------------------------------------------------------------- generation


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_per_example(preds: Sequence[object], golds: Sequence[object]) -> tuple[list[float], list[float]]:
    """ROUGE-1 and ROUGE-L F-measure of each example (``rouge_score``, no stemming), gold as the target."""
    scorer = _scorer()
    r1, rl = [], []
    for p, g in _pairs(preds, golds):
        result = scorer.score(g, p)
        r1.append(result["rouge1"].fmeasure)
        rl.append(result["rougeL"].fmeasure)
    return r1, rl


def rouge(preds: Sequence[object], golds: Sequence[object]) -> dict[str, float]:
    """Plain means of ROUGE-1 and ROUGE-L F-measure over examples."""
    r1, rl = rouge_per_example(preds, golds)
    return {"rouge-1": _mean(r1), "rouge-l": _mean(rl)}


# --------------------------------------------------------------------------------------------- per task


def score(task_name: str, preds: Sequence[object], golds: Sequence[object]) -> dict[str, float]:
    """The task's metrics (``Task.metrics``), in the task's order, e.g. ``{"mae": ..., "rmse": ...}``."""
    task = get_task(task_name)
    if not task.metrics:
        raise InvalidInputError(f"task {task.name!r} has no metrics")
    out: dict[str, float] = {}
    rouge_scores: dict[str, float] | None = None
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = accuracy(preds, golds)
        elif metric == "f1":
            if not task.labels:
                raise InvalidInputError(f"task {task.name!r} has no labels for macro-F1")
            out[metric] = macro_f1(preds, golds, task.labels)
        elif metric == "mae":
            out[metric] = mae(preds, golds)
        elif metric == "rmse":
            out[metric] = rmse(preds, golds)
        elif metric in ("rouge-1", "rouge-l"):
            if rouge_scores is None:
                rouge_scores = rouge(preds, golds)
            out[metric] = rouge_scores[metric]
        else:
            raise InvalidInputError(f"unknown metric {metric!r}")
    return out


# --------------------------------------------------------------------------------------------- relative gains


def relative_gain(value: float, baseline: float, metric: str) -> float:
    """The paper's relative improvement ``(value - baseline) / baseline``, sign flipped for MAE/RMSE.

    Undefined (``nan``) when the baseline is 0 or either number is ``nan``.
    """
    if baseline == 0 or math.isnan(value) or math.isnan(baseline):
        return float("nan")
    gain = (value - baseline) / baseline
    return -gain if metric in LOWER_IS_BETTER else gain


def average_gain(values: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Mean of ``relative_gain`` over the metrics both hold (``nan`` if none is shared or any gain is ``nan``)."""
    shared = [m for m in values if m in baseline]
    return _mean(relative_gain(values[m], baseline[m], m) for m in shared)


# --------------------------------------------------------------------------------------------- parsing answers

_SCALE_PHRASES = re.compile(r"\b(?:out of|of)\s*5\b|/\s*5\b|\b1\s*(?:-|to)\s*5\b", re.IGNORECASE)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _labels_in(text: str, labels: Sequence[str]) -> list[str]:
    """Distinct labels found in ``text`` as whole tokens (case-insensitive), ignoring one nested in a longer match."""
    spans = []
    for label in labels:
        pattern = r"(?<![\w\[])(?<!\d\.)" + re.escape(label) + r"(?![\w\]])(?!\.\d)"
        for m in re.finditer(pattern, text, re.IGNORECASE):
            spans.append((m.start(), m.end(), label))
    kept = {
        label
        for start, end, label in spans
        if not any(s <= start and end <= e and (e - s) > (end - start) for s, e, _ in spans)
    }
    return [label for label in labels if label in kept]


def parse_prediction(task_name: str, text: object) -> str:
    """Read a generated answer as the task's prediction.

    Label tasks: the stripped text if it is a label (case-insensitive match returns the label's spelling); for
    rating tasks (MAE/RMSE) also any stripped text that is already a number (``"3.5"`` stays ``"3.5"``). Otherwise
    the one label the text clearly contains, as a whole token, after dropping rating-scale phrases ("out of 5",
    "/5", "1 to 5"); bracketed labels such as ``[2]`` also match a bare ``2``, when no bracketed label is present.
    If no label or more than one is found, the stripped text is returned (it then counts as wrong or non-numeric).
    Generation tasks: the first non-empty line, stripped.
    """
    raw = "" if text is None else str(text)
    task = get_task(task_name)
    stripped = raw.strip()
    if not task.labels:
        return _first_line(raw)
    labels = list(task.labels)
    lowered = {label.lower(): label for label in labels}
    if stripped.lower() in lowered:
        return lowered[stripped.lower()]
    rating = "mae" in task.metrics or "rmse" in task.metrics
    if rating and as_number(stripped) is not None:
        return stripped
    haystack = _SCALE_PHRASES.sub(" ", stripped) if rating else stripped
    found = _labels_in(haystack, labels)
    if len(found) == 1:
        return found[0]
    if not found:
        bare = {label.strip("[]"): label for label in labels if label.startswith("[") and label.endswith("]")}
        if bare:
            hits = _labels_in(haystack, list(bare))
            if len(hits) == 1:
                return bare[hits[0]]
    return stripped
