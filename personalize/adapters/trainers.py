"""The training-step registry: which implementation runs one LoRA training step, and where it applies.

``plain`` is peft's own forward on a private copy of the base (registered by ``adapters.training``, it applies
everywhere); ``fast`` is the functional step of ``personalize.cpu.fasttrain`` (registered there, Llama-family models
only). Training asks the registry for ``LoraSettings.trainer`` and falls back to ``plain``, saying why, where the
chosen one does not apply. A new step is one module and a ``register_trainer`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from personalize.errors import InvalidInputError

if TYPE_CHECKING:
    from personalize.serving.modeling import LoadedModel
    from personalize.settings import AdapterTrainingSettings

LossFn = Callable[[dict[str, Any]], Any]  # a collated batch -> the scalar loss (backward-able)


@dataclass(frozen=True)
class Trainer:
    """One training step: why it cannot run a model (None: it can), and how to set it up for a peft config and
    the precision the frozen base computes in ("fp32" or "bf16")."""

    name: str
    unsupported_reason: Callable[[LoadedModel, AdapterTrainingSettings], str | None]
    # (loaded, peft config, precision) -> the peft model, and its loss (None: peft's own forward)
    prepare: Callable[[LoadedModel, Any, str], tuple[Any, LossFn | None]]
    autocast: bool = True  # bf16 by running the step under torch's autocast; False: ``prepare`` takes it itself


TRAINERS: dict[str, Trainer] = {}


def register_trainer(trainer: Trainer) -> Trainer:
    TRAINERS[trainer.name] = trainer
    return trainer


def get_trainer(name: str) -> Trainer:
    try:
        return TRAINERS[name]
    except KeyError:
        raise InvalidInputError(f"unknown trainer {name!r}; registered: {', '.join(sorted(TRAINERS))}") from None


__all__ = ["TRAINERS", "LossFn", "Trainer", "get_trainer", "register_trainer"]
