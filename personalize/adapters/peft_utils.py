"""peft surgery shared by training, serving (``adapters``), the fast trainer and task adapters.

A low-level module: it imports nothing from the package, so any of them can use it without importing another.
"""

from __future__ import annotations

import copy
from typing import Any


def strip_tuner_layers(model: Any) -> Any:
    """Take every peft layer out of ``model`` in place, putting back the original layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            attached: object = getattr(parent, child, None)
            if attached is module:
                setattr(parent, child, module.get_base_layer())
    if "peft_config" in vars(model):  # peft records its adapters on the model it wraps
        del model.peft_config
    return model


def private_base_copy(model: Any) -> Any:
    """A copy of the base model to train on, without any peft layers (an ``AdapterCache`` may wrap the same model
    in place): the shared model is neither changed nor seen half-changed by other threads."""
    return strip_tuner_layers(copy.deepcopy(model))


__all__ = ["private_base_copy", "strip_tuner_layers"]
