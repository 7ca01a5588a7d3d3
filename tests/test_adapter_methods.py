"""The adapter-method registry: LoRA is its first entry, its flags drive which training step and decoder may take an
adapter, and an unknown method is refused with the registered ones listed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from peft import LoraConfig, PeftType, TaskType, get_peft_model
from tiny_model import make_tiny_loaded, save_ia3_adapter

import personalize
from personalize.adapters import methods as adapter_methods
from personalize.adapters.methods import (
    ADAPTER_METHODS,
    AdapterMethod,
    get_adapter_method,
    method_for_peft_type,
    method_for_settings,
    register_adapter_method,
    unsupported_peft_type_reason,
)
from personalize.adapters.peft_utils import private_base_copy
from personalize.adapters.training import _lora_config, _trainer
from personalize.errors import InvalidInputError, UnknownAdapterMethodError
from personalize.settings import LoraSettings, Settings, TaskAdapterSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return make_tiny_loaded(tiny_model_dir)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: what a test registers is gone afterwards."""
    monkeypatch.setattr(adapter_methods, "ADAPTER_METHODS", dict(ADAPTER_METHODS))
    return adapter_methods.ADAPTER_METHODS


def _config_before(settings: LoraSettings, is_encoder_decoder: bool) -> LoraConfig:
    """The LoraConfig that training built before the registry (training._lora_config, verbatim)."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
    )


def test_lora_is_registered_first_with_every_capability():
    lora = get_adapter_method("lora")
    assert next(iter(ADAPTER_METHODS)) == "lora" and ADAPTER_METHODS["lora"] is lora
    assert lora.peft_type == "LORA" and lora.settings_class is LoraSettings
    assert (lora.fast_training, lora.fast_decoding, lora.mixed_batches) == (True, True, True)
    assert all(lora.supports(c) for c in adapter_methods.CAPABILITIES)
    assert method_for_peft_type(PeftType.LORA) is lora and method_for_peft_type("LORA") is lora
    # the rest of the family (issue 15) follows LoRA, on the fast decoder only (IA3's scales in its steps, the
    # virtual tokens in its cache), none on the fast trainer, in peft's mixed batches or on vLLM
    assert list(ADAPTER_METHODS)[1:] == ["ia3", "prompt-tuning", "p-tuning", "prefix-tuning", "distill"]
    for name, peft_type in [("ia3", "IA3"), ("prompt-tuning", "PROMPT_TUNING"), ("p-tuning", "P_TUNING")]:
        method = get_adapter_method(name)
        assert method.peft_type == peft_type and method_for_peft_type(peft_type) is method
        assert {c for c in adapter_methods.CAPABILITIES if method.supports(c)} == {"fast_decoding"}
    assert method_for_peft_type("PREFIX_TUNING") is get_adapter_method("prefix-tuning")
    assert [m.prompt_learning for m in ADAPTER_METHODS.values()] == [False, False, True, True, True, False]
    # the settings say which method they configure: Settings.lora and a task adapter's lora are LoRA
    assert method_for_settings(Settings(_env_file=None).lora) is lora
    assert method_for_settings(TaskAdapterSettings().lora) is lora


@pytest.mark.parametrize("is_encoder_decoder", [False, True])
@pytest.mark.parametrize(
    "settings",
    [LoraSettings(), LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])],
)
def test_loras_peft_config_is_what_training_built_before(settings, is_encoder_decoder):
    want = _config_before(settings, is_encoder_decoder)
    for config in (
        get_adapter_method("lora").peft_config(settings, is_encoder_decoder),
        _lora_config(SimpleNamespace(is_encoder_decoder=is_encoder_decoder), settings),
    ):
        assert type(config) is LoraConfig and config.to_dict() == want.to_dict()
        assert config.peft_type == PeftType.LORA and config.bias == "none"
        assert (config.r, config.lora_alpha, config.lora_dropout) == (settings.rank, settings.alpha, settings.dropout)
        assert config.target_modules == set(settings.target_modules)
        assert config.task_type == (TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM)


def test_an_unknown_method_is_refused_with_the_registered_ones_listed(registry):
    family = "lora, ia3, prompt-tuning, p-tuning, prefix-tuning, distill"
    with pytest.raises(
        UnknownAdapterMethodError, match=rf"unknown adapter method 'loha'.*registered methods are {family}"
    ):
        get_adapter_method("loha")
    register_adapter_method(AdapterMethod("toy", "TOY", LoraSettings, adapter_methods.lora_peft_config))
    with pytest.raises(UnknownAdapterMethodError, match=f"registered methods are {family}, toy") as info:
        get_adapter_method("LoRA")
    assert info.value.registered == [*family.split(", "), "toy"] and info.value.method == "LoRA"
    assert isinstance(info.value, InvalidInputError)  # the CLI and the API answer it as a bad input
    assert personalize.UnknownAdapterMethodError is UnknownAdapterMethodError
    with pytest.raises(UnknownAdapterMethodError):
        get_adapter_method(None)  # type: ignore[arg-type]


def test_registration_refuses_clashes_and_writes_peft_types_as_peft_does(registry):
    method = register_adapter_method(AdapterMethod("toy-method", PeftType.LOHA, LoraSettings, lambda s, e: None))
    assert method.peft_type == "LOHA" and method_for_peft_type("loha") is method
    with pytest.raises(InvalidInputError, match="registered already"):
        register_adapter_method(AdapterMethod("toy-method", "OTHER", LoraSettings, lambda s, e: None))
    with pytest.raises(InvalidInputError, match="LOHA belongs to 'toy-method'"):
        register_adapter_method(AdapterMethod("another", "LOHA", LoraSettings, lambda s, e: None))
    with pytest.raises(InvalidInputError, match="IA3 belongs to 'ia3'"):
        register_adapter_method(AdapterMethod("another", "IA3", LoraSettings, lambda s, e: None))
    with pytest.raises(InvalidInputError, match="lowercase"):
        register_adapter_method(AdapterMethod("Bad Name", "BAD", LoraSettings, lambda s, e: None))
    replaced = register_adapter_method(
        AdapterMethod("toy-method", "LOHA", LoraSettings, lambda s, e: None, mixed_batches=True), replace=True
    )
    assert get_adapter_method("toy-method") is replaced and replaced.mixed_batches
    with pytest.raises(InvalidInputError, match="unknown capability"):
        replaced.supports("fast_serving")  # type: ignore[arg-type]


def test_the_allow_list_names_the_peft_type_and_what_is_allowed(registry):
    covered = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    for peft_type in covered:
        assert unsupported_peft_type_reason(peft_type, "fast_decoding", "the fast decoder") is None
    for peft_type in ("SOMETHING_NEW",):
        reason = unsupported_peft_type_reason(peft_type, "fast_decoding", "the fast decoder")
        assert reason.startswith(f"{peft_type} adapters") and f"covers {', '.join(covered)} only" in reason
    for peft_type in ("IA3", "PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"):
        reason = unsupported_peft_type_reason(peft_type, "mixed_batches", "a batch")
        assert reason.startswith(f"{peft_type} adapters") and "covers LORA only" in reason
    assert "unknown adapters" in unsupported_peft_type_reason(None, "fast_decoding", "the fast decoder")
    register_adapter_method(AdapterMethod("toy", "TOY", LoraSettings, lambda s, e: None, mixed_batches=True))
    assert "method 'toy'" in unsupported_peft_type_reason("TOY", "fast_decoding", "the fast decoder")
    assert unsupported_peft_type_reason("TOY", "mixed_batches", "a batch") is None


def test_the_trainer_follows_the_methods_fast_training_flag(loaded, registry):
    fast, note = _trainer(loaded, LoraSettings())
    assert (fast.name, note) == ("fast", None)
    plain, note = _trainer(loaded, LoraSettings(trainer="plain"))
    assert (plain.name, note) == ("plain", None)

    class SlowLoraSettings(LoraSettings):
        """Settings of a method the fast step does not cover (registered without fast_training)."""

    register_adapter_method(AdapterMethod("slow-lora", "SLOW_LORA", SlowLoraSettings, lambda s, e: None))
    trainer, note = _trainer(loaded, SlowLoraSettings())
    assert trainer.name == "plain" and "SLOW_LORA adapters (method 'slow-lora'" in note
    assert "fast training step covers LORA only" in note
    with pytest.raises(UnknownAdapterMethodError, match="UnregisteredSettings"):

        class UnregisteredSettings(SimpleNamespace):
            trainer = "fast"

        _trainer(loaded, UnregisteredSettings())  # type: ignore[arg-type]


def test_the_fast_training_step_refuses_an_adapter_of_another_method(loaded, tmp_path):
    from peft import PeftModel

    from personalize.cpu.fasttrain import FastLoraForward

    ia3 = PeftModel.from_pretrained(private_base_copy(loaded.model), str(save_ia3_adapter(loaded, tmp_path / "ia3")))
    with pytest.raises(ValueError, match=r"fast training step not applicable: IA3 adapters"):
        FastLoraForward(ia3)
    lora = get_peft_model(private_base_copy(loaded.model), _lora_config(loaded, LoraSettings()))
    FastLoraForward(lora)  # LoRA passes the allow-list
    with pytest.raises(ValueError, match="no adapter 'other'"):
        FastLoraForward(lora, adapter="other")


def test_a_registered_trainer_is_picked_by_name_and_falls_back_when_it_does_not_apply(loaded, monkeypatch):
    """Training picks its step from the trainer registry: a new step is one registration."""
    from personalize.adapters import trainers
    from personalize.adapters.trainers import Trainer, register_trainer

    monkeypatch.setattr(trainers, "TRAINERS", dict(trainers.TRAINERS))
    register_trainer(
        Trainer("fast", lambda loaded, settings: "a toy that never applies", lambda model, config: (None, None))
    )
    chosen, note = _trainer(loaded, LoraSettings())
    assert chosen.name == "plain" and note == "fast training step not applicable: a toy that never applies"
    with pytest.raises(InvalidInputError, match="unknown trainer 'nope'; registered: fast, plain"):
        trainers.get_trainer("nope")
