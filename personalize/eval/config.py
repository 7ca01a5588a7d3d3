"""What determines an evaluation run's results (``EvalConfig``, stored with the run) and which methods it runs.

Kept apart from the runner (``personalize.eval.runner``, which needs ``Personalizer``) so that reports, the router's
calibration and the dashboard can read a run's config without importing the serving stack.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from personalize.errors import InvalidInputError, PersonalizeError
from personalize.eval.baselines import baselines_for, check_baseline, is_baseline
from personalize.methods import DEFAULT_ADAPTER_METHOD, SERVED_METHODS, ZERO_SHOT, adapter_variant
from personalize.tasks.registry import get_task

EVAL_METHODS = SERVED_METHODS  # the model methods and zero-shot; baselines come from personalize.eval.baselines


def default_methods(task: str, task_adapted: bool = False) -> list[str]:
    """Every model method (and ``zero-shot`` when the run is on a task-adapted base: without one it is ``none``),
    then every baseline that applies to the task (they cost milliseconds)."""
    models = [m for m in EVAL_METHODS if m != ZERO_SHOT or task_adapted]
    return [*models, *baselines_for(get_task(task))]


def resolve_methods(task: str, methods: list[str]) -> list[str]:
    """Check a method list for a task; ``baselines`` stands for every baseline that applies. Unknown names and
    baselines that do not apply are refused with the reason."""
    the_task = get_task(task)
    out: list[str] = []
    for name in methods:
        names = baselines_for(the_task) if name == "baselines" else [name]
        for method in names:
            if (variant := adapter_variant(method)) is not None:
                from personalize.adapters.methods import get_adapter_method

                get_adapter_method(variant[1])  # peft:<m> and rag+peft:<m> for a registered adapter method m
            elif method not in EVAL_METHODS:
                if not is_baseline(method):
                    raise InvalidInputError(
                        f"unknown method {method!r}; model methods: {', '.join(EVAL_METHODS)}; baselines for "
                        f"{task}: {', '.join(baselines_for(the_task))} (or 'baselines' for all of them)"
                    )
                check_baseline(method, the_task)
            if method not in out:
                out.append(method)
    if not out:
        raise InvalidInputError("no methods to run")
    return out


def with_peft_methods(methods: list[str], peft_methods: list[str]) -> list[str]:
    """``methods`` with ``peft:<m>`` and ``rag+peft:<m>`` for each adapter method ``m`` (``eval run
    --peft-methods lora,ia3``; LoRA is plain ``peft`` / ``rag+peft``), each variant right after its plain method
    (or before zero-shot and the baselines when the plain one is not run)."""
    from personalize.adapters.methods import get_adapter_method

    out = list(methods)
    for base in ("peft", "rag+peft"):
        names = [base if m == DEFAULT_ADAPTER_METHOD else f"{base}:{get_adapter_method(m).name}" for m in peft_methods]
        new = [n for n in dict.fromkeys(names) if n not in out]
        if base in out:
            at = out.index(base) + 1
        else:
            at = next((i for i, m in enumerate(out) if m == ZERO_SHOT or is_baseline(m)), len(out))
        out[at:at] = new
    return out


ROOT = Path(__file__).resolve().parents[2]


class EvalConfig(BaseModel):
    """Everything that determines a run's results; stored with the run."""

    task: str
    split: str
    source: str = Field("", description="Where the data came from (a folder, LaMP files, or SYNTHETIC).")
    synthetic: bool = False
    users: int | None = Field(None, ge=1, description="The first N users of the split (None: all).")
    per_user: int | None = Field(None, ge=1, description="At most N queries per user, the first in file order.")
    methods: list[str] = Field(
        default_factory=list, description="Model methods and baselines; empty: every one that applies to the task."
    )
    retriever: str = "bm25"
    k: int = Field(4, ge=1)
    scoring: Literal["auto", "generate", "likelihood", "calibrated"] = Field(
        "auto",
        description="Label tasks: likelihood of each label (auto), likelihood minus the label's content-free "
        "prior (calibrated), or free generation; other tasks generate.",
    )
    decision: Literal["argmax", "median"] = Field(
        "argmax",
        description="Likelihood scoring: answer the most likely label (argmax), or the median of the label "
        "distribution (median: numeric labels only; it minimises the expected absolute error, MAE's loss).",
    )
    max_new_tokens: int = 32
    train_via: Literal["workers", "inline"] = "workers"
    model: str = ""
    decoder: str = Field("", description="Settings.decoder of the run (fast, fast-fp32, plain); '' before it existed.")
    lora: dict = Field(default_factory=dict)
    adapter_settings: dict[str, dict] = Field(
        default_factory=dict, description="The training settings of each other adapter method the run trains."
    )
    base: Literal["task", "zero-shot"] = Field(
        "task",
        description="What none/rag/peft/rag+peft run on: the task-adapted base where a task adapter exists (task), "
        "or the plain base model (zero-shot).",
    )
    task_adapter: str | None = Field(None, description="The task adapter the run used (its ref), None: none.")
    seed: int = 0
    code_version: str = ""

    @model_validator(mode="after")
    def _default_methods(self) -> EvalConfig:
        # checking names is ``resolve_methods``' job (the runner calls it), so its error stays a PersonalizeError
        if not self.methods:
            with contextlib.suppress(PersonalizeError):
                self.methods = default_methods(self.task)
        return self

    @model_validator(mode="after")
    def _check_decision(self) -> EvalConfig:
        if self.decision == "median":
            labels = get_task(self.task).labels
            if self.used_scoring() == "generate" or not labels or not all(_is_number(x) for x in labels):
                raise ValueError(
                    f"decision 'median' needs likelihood scoring of numeric labels; task {self.task!r} "
                    f"with scoring {self.used_scoring()!r} has labels {labels}"
                )
        return self

    def scoring_label(self) -> str:
        """How answers were chosen, as reports print it."""
        scoring = self.used_scoring()
        return f"{scoring}, median decision" if self.decision == "median" else scoring

    def used_scoring(self) -> str:
        has_labels = get_task(self.task).labels is not None
        if not has_labels:
            return "generate"
        if self.scoring in ("generate", "calibrated"):
            return self.scoring
        return "likelihood"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        version = out.stdout.strip() or "unknown"
        return version + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


__all__ = ["EVAL_METHODS", "EvalConfig", "code_version", "default_methods", "resolve_methods", "with_peft_methods"]
