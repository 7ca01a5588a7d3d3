"""The adapter-method registry: which PEFT methods a per-user adapter can be, and what each one can do.

peft's own pattern (``register_peft_method``): one settings class per method, a function that turns those settings
into the method's peft config, and the method's ``peft_type`` (``adapter_config.json`` records it, so a loaded
adapter can be traced back to its method). Each method also states what the rest of the library may do with it:

- ``fast_training``: the functional training step of ``personalize.cpu.fasttrain`` trains it;
- ``fast_decoding``: the CPU decoder of ``personalize.cpu.fastpath`` (torch steps and the C step) serves it (LoRA
  as per-row tables; IA3 as scales, ``personalize.cpu.ia3_scales``; prompt-learning methods as virtual tokens,
  ``personalize.cpu.virtual_tokens``);
- ``mixed_batches``: one batched pass may give each row its own adapter of this method (peft's ``adapter_names``);
- ``vllm_serving``: a vLLM server serves it as a LoRA module (``personalize.serving.vllm_backend``).

The fast paths check these flags as an allow-list on the adapter's ``peft_type``: an adapter whose method is not
registered with the flag set (or whose peft type no method has) is never handed to them, so it cannot be served as
if it were the base model. LoRA is the first method; a new one is one ``AdapterMethod`` plus
``register_adapter_method``.

A low-level module: it imports only settings and errors, so training, the fast paths and serving can all ask it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from personalize.errors import InvalidInputError, UnknownAdapterMethodError
from personalize.settings import (
    DistillSettings,
    IA3Settings,
    LoraSettings,
    PrefixTuningSettings,
    PromptTuningSettings,
    PTuningSettings,
)

Capability = Literal["fast_training", "fast_decoding", "mixed_batches", "vllm_serving"]
CAPABILITIES: tuple[Capability, ...] = ("fast_training", "fast_decoding", "mixed_batches", "vllm_serving")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class AdapterMethod:
    """One PEFT method a per-user adapter can be trained with."""

    name: str  # what users and runs call it: "lora", later "ia3", "prompt-tuning", ...
    peft_type: str  # peft's PeftType value, as adapter_config.json records it: "LORA", "IA3", ...
    settings_class: type[BaseModel]  # the method's settings (one field each, with a default and a help text)
    peft_config: Callable[[Any, bool], Any]  # (settings, is_encoder_decoder) -> the method's peft config
    fast_training: bool = False
    fast_decoding: bool = False
    mixed_batches: bool = False
    vllm_serving: bool = False  # vLLM serves LoRA modules only (peft's files as they are)
    prompt_learning: bool = False  # virtual tokens before the prompt: peft serves them one row at a time by forward
    # passes; the fast decoder puts them into its cache once, mixed with other rows
    variant_of: str | None = None  # the method whose adapters this one's are (same peft type, other training data)
    distilled: bool = False  # trained on the model's own rag answers (``adapters.distill``), not on the labels
    description: str = ""

    def supports(self, capability: Capability) -> bool:
        if capability not in CAPABILITIES:
            raise InvalidInputError(f"unknown capability {capability!r}: one of {', '.join(CAPABILITIES)}")
        return bool(getattr(self, capability))


ADAPTER_METHODS: dict[str, AdapterMethod] = {}  # by name, in registration order


def peft_type_name(peft_type: object) -> str:
    """``peft_type`` as the string peft writes (``PeftType.LORA`` -> ``"LORA"``); None becomes ``"unknown"``."""
    value = getattr(peft_type, "value", peft_type)
    return "unknown" if value is None else str(value).upper()


def register_adapter_method(method: AdapterMethod, *, replace: bool = False) -> AdapterMethod:
    """Add ``method`` to the registry and return it (with its peft type as peft writes it). A name registered
    already is refused unless ``replace``; a peft type that another method has is refused (a loaded adapter's peft
    type names its method) unless the new one is a ``variant_of`` it: the same adapters trained on other data,
    with the same capabilities."""
    if not _NAME.match(method.name):
        raise InvalidInputError(f"adapter method name {method.name!r}: use lowercase words joined by '-'")
    peft_type = peft_type_name(method.peft_type)
    method = dataclasses.replace(method, peft_type=peft_type)  # as peft writes it: PeftType.IA3 or "ia3" -> "IA3"
    if method.name in ADAPTER_METHODS and not replace:
        raise InvalidInputError(f"adapter method {method.name!r} is registered already (pass replace=True)")
    clash = method_for_peft_type(peft_type)
    if clash is not None and clash.name not in (method.name, method.variant_of):
        raise InvalidInputError(f"adapter method {method.name!r}: peft type {peft_type} belongs to {clash.name!r}")
    ADAPTER_METHODS[method.name] = method
    return method


def get_adapter_method(name: str) -> AdapterMethod:
    """The registered method called ``name``; an unknown name raises ``UnknownAdapterMethodError`` listing them."""
    method = ADAPTER_METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise UnknownAdapterMethodError(name, list(ADAPTER_METHODS))
    return method


def method_for_peft_type(peft_type: object) -> AdapterMethod | None:
    """The registered method whose adapters have this peft type, or None."""
    wanted = peft_type_name(peft_type)
    return next((m for m in ADAPTER_METHODS.values() if m.peft_type == wanted), None)


def method_for_settings(settings: BaseModel) -> AdapterMethod:
    """The registered method whose settings class ``settings`` is (the settings say which method they configure)."""
    for method in ADAPTER_METHODS.values():
        if type(settings) is method.settings_class:
            return method
    for method in ADAPTER_METHODS.values():
        if isinstance(settings, method.settings_class):
            return method
    raise UnknownAdapterMethodError(type(settings).__name__, list(ADAPTER_METHODS))


def capable_peft_types(capability: Capability) -> list[str]:
    """The peft types whose method has ``capability``, in registration order."""
    return list(dict.fromkeys(m.peft_type for m in ADAPTER_METHODS.values() if m.supports(capability)))


def unsupported_peft_type_reason(peft_type: object, capability: Capability, what: str) -> str | None:
    """Why ``what`` (e.g. "the fast decoder") may not take an adapter of ``peft_type`` (None when it may): the
    allow-list check of the fast paths. The reason names the peft type."""
    name = peft_type_name(peft_type)
    method = method_for_peft_type(name)
    if method is not None and method.supports(capability):
        return None
    allowed = ", ".join(capable_peft_types(capability)) or "no adapters"
    if method is None:
        return f"{name} adapters (no registered adapter method has this peft type; {what} covers {allowed} only)"
    return f"{name} adapters (method {method.name!r}; {what} covers {allowed} only)"


# --- LoRA ---------------------------------------------------------------------------------------------------------


def lora_peft_config(settings: LoraSettings, is_encoder_decoder: bool) -> Any:
    """peft's ``LoraConfig`` for ``settings``."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int, but only divides it by r
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
    )


LORA = register_adapter_method(
    AdapterMethod(
        name="lora",
        peft_type="LORA",
        settings_class=LoraSettings,
        peft_config=lora_peft_config,
        fast_training=True,
        fast_decoding=True,
        mixed_batches=True,
        vllm_serving=True,
        description="Low-rank updates of the chosen projections (Hu et al. 2021).",
    )
)


# --- the rest of the family (issue 15): peft's own configs, the plain paths serve and train them -------------------


def _task_type(is_encoder_decoder: bool) -> Any:
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM


def ia3_peft_config(settings: IA3Settings, is_encoder_decoder: bool) -> Any:
    from peft import IA3Config

    return IA3Config(
        target_modules=list(settings.target_modules),
        feedforward_modules=list(settings.feedforward_modules),
        task_type=_task_type(is_encoder_decoder),
    )


def prompt_tuning_peft_config(settings: PromptTuningSettings, is_encoder_decoder: bool) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type=_task_type(is_encoder_decoder))


def p_tuning_peft_config(settings: PTuningSettings, is_encoder_decoder: bool) -> Any:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_hidden_size=settings.encoder_hidden_size,
        task_type=_task_type(is_encoder_decoder),
    )


def prefix_tuning_peft_config(settings: PrefixTuningSettings, is_encoder_decoder: bool) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.prefix_projection,
        task_type=_task_type(is_encoder_decoder),
    )


IA3 = register_adapter_method(
    AdapterMethod(
        "ia3",
        "IA3",
        IA3Settings,
        ia3_peft_config,
        fast_decoding=True,
        description="Learned rescaling of keys, values and MLP inputs.",
    )
)
PROMPT_TUNING = register_adapter_method(
    AdapterMethod(
        "prompt-tuning",
        "PROMPT_TUNING",
        PromptTuningSettings,
        prompt_tuning_peft_config,
        fast_decoding=True,
        prompt_learning=True,
        description="Learned embeddings of virtual tokens before the prompt (Lester et al. 2021).",
    )
)
P_TUNING = register_adapter_method(
    AdapterMethod(
        "p-tuning",
        "P_TUNING",
        PTuningSettings,
        p_tuning_peft_config,
        fast_decoding=True,
        prompt_learning=True,
        description="Virtual tokens produced by a small MLP encoder (Liu et al. 2021).",
    )
)
PREFIX_TUNING = register_adapter_method(
    AdapterMethod(
        "prefix-tuning",
        "PREFIX_TUNING",
        PrefixTuningSettings,
        prefix_tuning_peft_config,
        fast_decoding=True,
        prompt_learning=True,
        description="Learned keys and values prepended at every layer (Li & Liang 2021).",
    )
)


DISTILL = register_adapter_method(
    AdapterMethod(
        "distill",
        "LORA",
        DistillSettings,
        lora_peft_config,
        fast_training=True,
        fast_decoding=True,
        mixed_batches=True,
        vllm_serving=True,
        variant_of="lora",
        distilled=True,
        description="A LoRA trained to answer without retrieval what the model answers with the user's retrieved "
        "items (context distillation): serving needs no retrieval.",
    )
)


def is_prompt_learning(peft_type: object) -> bool:
    """Adapters of this peft type put virtual tokens before the prompt (served one row at a time)."""
    method = method_for_peft_type(peft_type)
    return bool(method and method.prompt_learning)


__all__ = [
    "ADAPTER_METHODS",
    "CAPABILITIES",
    "DISTILL",
    "IA3",
    "LORA",
    "PREFIX_TUNING",
    "PROMPT_TUNING",
    "P_TUNING",
    "AdapterMethod",
    "Capability",
    "capable_peft_types",
    "get_adapter_method",
    "is_prompt_learning",
    "lora_peft_config",
    "method_for_peft_type",
    "method_for_settings",
    "peft_type_name",
    "register_adapter_method",
    "unsupported_peft_type_reason",
]
