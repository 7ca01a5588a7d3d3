"""Serving per-user adapters: the LRU cache, and mixed-adapter batches that match one-at-a-time generation."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_loaded, make_tiny_t5_loaded, save_ia3_adapter

from personalize.adapters.cache import AdapterCache, AdapterUnavailableError, generate_batch, validate_adapter_name
from personalize.adapters.training import ADAPTER_METADATA, LoraSettings, train_adapter
from personalize.errors import InvalidInputError
from personalize.serving.hf_backend import generate_text
from personalize.tasks.prompting import encode

FAST = {"max_length": 48, "batch_size": 4, "max_steps": 3, "learning_rate": 5e-2}
PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog and keeps running far away", "rate alien (1979)"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return make_tiny_loaded(tiny_model_dir)


def user_pairs(user: int) -> list[tuple[str, str]]:
    words = ["space", "love", "ghosts", "jokes"]
    return [(f"Tell me about {words[(user + i) % 4]} number {i}", f"{words[user % 4]} {i} " * 3) for i in range(8)]


@pytest.fixture(scope="module")
def adapters(loaded, tmp_path_factory):
    """Three users' adapters, trained so that they visibly change the tiny model's outputs."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: train_adapter(loaded, user_pairs(i), LoraSettings(seed=i, **FAST), root / name).path
        for i, name in enumerate(["u-a", "u-b", "u-c"])
    }


def logits(model, loaded, text: str = "a probe about the weather") -> torch.Tensor:
    ids = torch.tensor([encode(loaded, text)])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lru_evicts_the_least_recently_used_adapter(loaded, adapters):
    cache = AdapterCache(loaded, capacity=2)
    assert [cache.activate(n, adapters[n]) for n in ("u-a", "u-b", "u-c")] == [False, False, False]
    assert cache.names() == ["u-b", "u-c"] and cache.evictions == 1
    assert cache.activate("u-b", adapters["u-b"]) is True  # now u-c is the least recently used
    cache.activate("u-a", adapters["u-a"])
    assert cache.names() == ["u-b", "u-a"]
    assert set(cache.model.peft_config) == {"u-a", "u-b"}  # evicted adapters are deleted from the model
    assert cache.evict("u-b") and not cache.evict("u-b") and cache.names() == ["u-a"]


def test_active_adapter_changes_outputs_and_base_disabled_is_the_base(loaded, adapters):
    base = logits(loaded.model, loaded)
    cache = AdapterCache(loaded, capacity=2)
    cache.activate("u-a", adapters["u-a"])
    with_a = logits(cache.model, loaded)
    assert not torch.allclose(with_a, base, atol=1e-4)
    with cache.base_disabled() as model:
        assert torch.equal(logits(model, loaded), base)
    cache.activate("u-b", adapters["u-b"])
    assert not torch.allclose(logits(cache.model, loaded), with_a, atol=1e-4)
    with cache.use("u-a", adapters["u-a"]) as model:
        assert torch.equal(logits(model, loaded), with_a)
    assert torch.equal(logits(loaded.model, loaded), base)  # the shared model never saw an adapter


def test_only_complete_adapter_folders_are_loaded(loaded, adapters, tmp_path):
    half = tmp_path / "half-written"
    shutil.copytree(adapters["u-a"], half)
    (half / ADAPTER_METADATA).unlink()
    cache = AdapterCache(loaded, capacity=2)
    with pytest.raises(AdapterUnavailableError):
        cache.activate("u-a", half)
    with pytest.raises(AdapterUnavailableError):
        cache.activate("u-a", tmp_path / "missing")
    other = tmp_path / "other-base"
    shutil.copytree(adapters["u-a"], other)
    meta = json.loads((other / ADAPTER_METADATA).read_text())
    (other / ADAPTER_METADATA).write_text(json.dumps({**meta, "base_model": "some/other-model"}))
    with pytest.raises(InvalidInputError, match="retrain"):
        cache.activate("u-a", other)
    assert cache.names() == []


def test_a_damaged_adapter_fails_cleanly_and_leaves_the_model_as_it_was(tiny_model_dir, adapters, tmp_path):
    loaded = make_tiny_loaded(tiny_model_dir)
    base = logits(loaded.model, loaded)
    broken = tmp_path / "broken"
    shutil.copytree(adapters["u-a"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    cache = AdapterCache(loaded, capacity=2, copy_base=False)
    with pytest.raises(AdapterUnavailableError):
        cache.activate("u-x", broken)  # the first adapter: the model is unwrapped again
    assert torch.equal(logits(loaded.model, loaded), base) and "peft_config" not in vars(loaded.model)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    cache.activate("u-a", adapters["u-a"])
    with_a = logits(loaded.model, loaded)
    with pytest.raises(AdapterUnavailableError):
        cache.activate("u-x", broken)  # a later adapter: deleted again, u-a stays
    assert cache.names() == ["u-a"] and set(cache.model.peft_config) == {"u-a"}
    cache.activate("u-a", adapters["u-a"])
    assert torch.equal(logits(loaded.model, loaded), with_a)


@pytest.mark.parametrize("name", ["a.b", "__base__", "", "training", "x" * 200, "ü", 5])
def test_unsafe_adapter_names_are_refused(name):
    with pytest.raises(InvalidInputError):
        validate_adapter_name(name)


def test_a_retrained_folder_replaces_the_loaded_adapter(loaded, adapters):
    cache = AdapterCache(loaded, capacity=2)
    cache.activate("u-a", adapters["u-a"])
    assert cache.activate("u-a", adapters["u-b"]) is False  # same user, new folder: reloaded
    with cache.use("u-b", adapters["u-b"]) as model:
        expected = logits(model, loaded)
    with cache.use("u-a", adapters["u-b"]) as model:
        assert torch.equal(logits(model, loaded), expected)


def test_in_place_cache_unwraps_the_base_and_training_still_sees_the_plain_base(tiny_model_dir, adapters, tmp_path):
    loaded = make_tiny_loaded(tiny_model_dir)  # its own instance: this cache wraps the model in place
    base = logits(loaded.model, loaded)
    grads = {k: p.requires_grad for k, p in loaded.model.named_parameters()}
    cache = AdapterCache(loaded, capacity=2, copy_base=False)
    cache.activate("u-a", adapters["u-a"])
    assert not torch.allclose(logits(loaded.model, loaded), base, atol=1e-4)  # in place: the adapter applies
    retrained = train_adapter(loaded, user_pairs(0), LoraSettings(seed=0, **FAST), tmp_path / "again").path
    assert sorted(p.name for p in retrained.iterdir()) == sorted(p.name for p in adapters["u-a"].iterdir())
    first = load_file(adapters["u-a"] / "adapter_model.safetensors")
    again = load_file(retrained / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)  # trained on the plain base, not base + u-a
    cache.clear()
    assert torch.equal(logits(loaded.model, loaded), base)
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert {k: p.requires_grad for k, p in loaded.model.named_parameters()} == grads


def test_mixed_adapter_batch_equals_one_prompt_at_a_time(loaded, adapters):
    cache = AdapterCache(loaded, capacity=3)
    for name in ("u-a", "u-b"):
        cache.ensure_loaded(name, adapters[name])
    prompts = [encode(loaded, p) for p in PROMPTS] + [encode(loaded, PROMPTS[0])]
    names = ["u-a", "u-b", None, "u-b"]
    batch = generate_batch(cache, prompts, names, max_new_tokens=10)
    alone = []
    for ids, name in zip(prompts, names, strict=True):
        context = cache.base_disabled() if name is None else cache.use(name, adapters[name])
        with context as model:
            alone.append(generate_text(dataclasses.replace(loaded, model=model), ids, 10))
    assert batch == alone
    assert len({text for text, _ in batch}) > 1 and max(n for _, n in batch) > 1  # not a degenerate comparison


def test_adapters_of_a_method_without_mixed_batches_run_one_pass_each(loaded, tmp_path):
    """peft ignores ``adapter_names`` for IA3 and would apply the active adapter to every row: a batch of adapters
    whose method is not registered with ``mixed_batches`` runs each adapter's rows (and the base rows) apart."""
    cache = AdapterCache(loaded, capacity=3)
    ia3 = {name: save_ia3_adapter(loaded, tmp_path / name, seed=i) for i, name in enumerate(["i-a", "i-b"])}
    for name, path in ia3.items():
        cache.ensure_loaded(name, path)
    assert cache.peft_type("i-a") == "IA3"
    prompts = [encode(loaded, p) for p in PROMPTS] + [encode(loaded, PROMPTS[0]), encode(loaded, PROMPTS[1])]
    names = ["i-a", "i-b", None, "i-b", "i-a"]
    batch = generate_batch(cache, prompts, names, max_new_tokens=10)
    alone = []
    for ids, name in zip(prompts, names, strict=True):
        context = cache.base_disabled() if name is None else cache.use(name, ia3[name])
        with context as model:
            alone.append(generate_text(dataclasses.replace(loaded, model=model), ids, 10))
    assert batch == alone
    base = [generate_text(loaded, ids, 10) for ids in prompts]
    assert batch[2] == base[2] and batch[0] != base[0] and batch[3] != base[3]  # each row got its own adapter
    assert batch[0] != batch[3]  # the same prompt, two users' adapters: not one adapter applied to every row


def test_batch_without_adapters_is_the_base_model_and_unknown_names_are_refused(loaded, adapters):
    cache = AdapterCache(loaded, capacity=2)
    prompts = [encode(loaded, p) for p in PROMPTS]
    expected = [generate_text(loaded, ids, 6) for ids in prompts]
    assert generate_batch(cache, prompts, [None] * 3, max_new_tokens=6) == expected
    with pytest.raises(InvalidInputError, match="not loaded"):
        generate_batch(cache, prompts, ["u-a", None, None], max_new_tokens=6)
    cache.ensure_loaded("u-a", adapters["u-a"])
    assert generate_batch(cache, prompts, [None] * 3, max_new_tokens=6) == expected


def test_encoder_decoder_models_train_and_batch_like_one_at_a_time(tmp_path):
    loaded = make_tiny_t5_loaded()
    pairs = [(f"Rate film {i}", str(i % 5 + 1)) for i in range(8)]
    settings = LoraSettings(target_modules=["q", "k", "v", "o"], epochs=3, learning_rate=5e-2, max_length=32)
    result = train_adapter(loaded, pairs, settings, tmp_path / "t5")
    assert result.final_loss < result.losses[0]
    cache = AdapterCache(loaded, capacity=1)
    cache.ensure_loaded("t5-user", result.path)
    prompts = [encode(loaded, p) for p in ["hello", "a much longer prompt for the model to read", "rate film 3"]]
    names = ["t5-user", None, "t5-user"]
    alone = []
    for ids, name in zip(prompts, names, strict=True):
        context = cache.base_disabled() if name is None else cache.use(name, result.path)
        with context as model:
            alone.append(generate_text(dataclasses.replace(loaded, model=model), ids, 6))
    assert generate_batch(cache, prompts, names, max_new_tokens=6) == alone
