"""Adapter swaps on the fast decoder without peft's module walk (issue 17, target 4): an adapter folder read straight
into the decoder's LoRA tables gives the tables peft gives and the same greedy tokens, is probed like the peft cache
probes (an adapter that changes nothing is refused, named), and falls back to peft where the reader does not apply."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_model import make_tiny_loaded

from personalize.adapters.cache import AdapterCache, TableCache
from personalize.adapters.format import ADAPTER_METADATA, METADATA_FORMAT
from personalize.adapters.peft_utils import private_base_copy
from personalize.cpu.fastpath import ADAPTER_WEIGHTS, DirectReadUnsupported, lora_pairs, read_lora_pairs
from personalize.cpu.quantization import kernel_unavailable_reason
from personalize.errors import AdapterHasNoEffectError
from personalize.results import ServingFacts
from personalize.serving.backend import AdapterRef, DecodeRow
from personalize.serving.fast_backend import FastBackend
from personalize.serving.hf_backend import HFBackend

PROMPTS = [[101, 2023, 2003, 1037, 3231], [101, 7592, 2088, 2003, 2023, 1037, 2936, 3231, 6251, 102, 2054], [101]]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return make_tiny_loaded(tmp_path_factory.mktemp("tiny-swap"))


def save_lora(loaded, folder: Path, seed: int, scale_b: float = 1.0, **config) -> Path:
    """A peft LoRA folder as training writes it (peft's files and ``personalize.json``), with random A and B (peft
    starts B at zero: it would change nothing), B multiplied by ``scale_b``."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(private_base_copy(loaded.model), LoraConfig(**options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale_b)
    model.save_pretrained(str(folder))
    record = {"format": METADATA_FORMAT, "base_model": loaded.name}
    (folder / ADAPTER_METADATA).write_text(json.dumps(record), encoding="utf-8")
    return folder


def peft_tables(loaded, folder: Path):
    cache = AdapterCache(loaded, probe=False)
    cache.ensure_loaded("x", folder)
    return lora_pairs(cache.model, "x")


@pytest.mark.parametrize(
    "config",
    [{}, {"use_rslora": True, "r": 2}, {"layers_to_transform": [1], "target_modules": ["v_proj", "down_proj"]}],
    ids=["all-projections", "rslora", "one-layer"],
)
def test_reading_the_folder_gives_the_tables_peft_gives(loaded, tmp_path, config):
    folder = save_lora(loaded, tmp_path / "a", seed=1, **config)
    want = peft_tables(loaded, folder)
    got = read_lora_pairs(folder, len(loaded.model.model.layers))
    assert got.keys() == want.keys() and len(got) > 0
    for key, pair in want.items():
        assert torch.equal(got[key].a_t, pair.a_t) and torch.equal(got[key].b_t, pair.b_t), key


def test_folders_the_reader_does_not_cover_say_why(loaded, tmp_path):
    patterned = save_lora(loaded, tmp_path / "patterned", seed=1, alpha_pattern={"v_proj": 32})
    with pytest.raises(DirectReadUnsupported, match="alpha patterns"):
        read_lora_pairs(patterned, 2)
    dora = save_lora(loaded, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(DirectReadUnsupported, match="DoRA"):
        read_lora_pairs(dora, 2)
    renamed = save_lora(loaded, tmp_path / "renamed", seed=1)
    tensors = load_file(str(renamed / ADAPTER_WEIGHTS))
    save_file({k.replace(".layers.", ".blocks."): v for k, v in tensors.items()}, str(renamed / ADAPTER_WEIGHTS))
    with pytest.raises(DirectReadUnsupported, match="does not place: .*blocks"):
        read_lora_pairs(renamed, 2)


def _serve(backend, loaded, refs, prompts=PROMPTS, n=8):
    facts = ServingFacts()
    rows = [DecodeRow(p, r) for p, r in zip(prompts, refs, strict=True)]
    return [g.text for g in backend.generate(loaded, rows, n, facts)], facts


@pytest.mark.parametrize("fp32_only", [True, False], ids=["fast-fp32", "fast-q8"])
def test_the_fast_backend_reads_adapters_without_peft_and_answers_as_the_peft_path(loaded, tmp_path, fp32_only):
    if not fp32_only and kernel_unavailable_reason():
        pytest.skip(f"no q8 kernel here: {kernel_unavailable_reason()}")
    folders = [save_lora(loaded, tmp_path / f"u{i}", seed=10 + i) for i in range(3)]
    refs = [AdapterRef(f"user{i}", f, 1) for i, f in enumerate(folders)]
    mixed = [refs[0], None, refs[2]]
    direct = FastBackend(HFBackend(), fp32_only=fp32_only)
    texts, facts = _serve(direct, loaded, mixed)
    assert direct.plain._caches == {}  # no PeftModel was built: the tables came from the folders
    assert facts["decoder"] == ("fast-fp32" if fp32_only else "fast-q8") and facts["adapter_cache_hit"] is False
    # the peft route of the same backend (load into a PeftModel, copy the matrices out): the same tokens
    via_peft = FastBackend(HFBackend(), fp32_only=fp32_only)
    via_peft.tables_for = lambda loaded, decoder: _Unsupported()  # type: ignore[method-assign]
    assert _serve(via_peft, loaded, mixed)[0] == texts and via_peft.plain._caches != {}
    if fp32_only:  # and the plain path itself (peft's generate) on fp32 weights
        assert _serve(HFBackend(), loaded, mixed)[0] == texts
    base = _serve(direct, loaded, [None] * 3)[0]
    assert texts[0] != base[0] and texts[2] != base[2] and texts[1] == base[1]  # the adapters change the answers
    again, facts = _serve(direct, loaded, mixed)
    assert again == texts and facts["adapter_cache_hit"] is True


class _Unsupported:
    def get(self, name, path):
        raise DirectReadUnsupported("forced: the peft route")


def test_an_adapter_that_changes_nothing_is_refused_on_the_direct_path(loaded, tmp_path):
    backend = FastBackend(HFBackend(), fp32_only=True)
    untrained = save_lora(loaded, tmp_path / "untrained", seed=3, scale_b=0.0)
    with pytest.raises(AdapterHasNoEffectError, match=r"adapter 'nothing' at .*untrained does not change the model"):
        _serve(backend, loaded, [AdapterRef("nothing", untrained, 1)], PROMPTS[:1])
    # one whose effect is tiny but not zero: the probe's full forward decides, as the peft cache's probe does
    tiny = save_lora(loaded, tmp_path / "tiny", seed=3, scale_b=1e-9)
    with pytest.raises(AdapterHasNoEffectError, match="'faint'"):
        _serve(backend, loaded, [AdapterRef("faint", tiny, 1)], PROMPTS[:1])
    with pytest.raises(AdapterHasNoEffectError):
        AdapterCache(loaded).ensure_loaded("faint", tiny)
    [table] = backend._tables.values()
    assert table.names() == []  # nothing refused was kept
    # keys that name no module of this model: peft reads it (and loads nothing), and its probe refuses it by name
    renamed = save_lora(loaded, tmp_path / "renamed", seed=4)
    tensors = load_file(str(renamed / ADAPTER_WEIGHTS))
    save_file({k.replace(".layers.", ".blocks."): v for k, v in tensors.items()}, str(renamed / ADAPTER_WEIGHTS))
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))  # as trained
    with pytest.raises(AdapterHasNoEffectError, match="'elsewhere'"):
        _serve(backend, loaded, [AdapterRef("elsewhere", renamed, 1)], PROMPTS[:1])
    # a trained adapter passes, without the probe's forward pass
    trained = save_lora(loaded, tmp_path / "trained", seed=5)
    assert _serve(backend, loaded, [AdapterRef("real", trained, 1)], PROMPTS[:1])[0][0] is not None
    assert table.names() == ["real"]


def test_the_table_cache_is_a_bounded_lru_and_rereads_a_retrained_adapter(tmp_path):
    reads: list[tuple[str, Path]] = []

    def load(name: str, path: Path) -> str:
        reads.append((name, path))
        return f"{name}@{path.name}"

    cache: TableCache[str] = TableCache(load, capacity=2)
    assert cache.get("a", tmp_path / "v1") == ("a@v1", False)
    assert cache.get("a", tmp_path / "v1") == ("a@v1", True)
    cache.get("b", tmp_path / "v1")
    cache.get("a", tmp_path / "v1")  # a is now the most recently used
    cache.get("c", tmp_path / "v1")
    assert cache.names() == ["a", "c"] and cache.evictions == 1
    assert cache.get("a", tmp_path / "v2") == ("a@v2", False)  # retrained: read again
    assert cache.evict("a") and not cache.evict("a") and cache.names() == ["c"]
    assert len(reads) == 4 and (cache.hits, cache.misses) == (2, 4)


def test_evicting_a_user_drops_their_tables(loaded, tmp_path):
    backend = FastBackend(HFBackend(), fp32_only=True)
    folder = save_lora(loaded, tmp_path / "a", seed=7)
    _serve(backend, loaded, [AdapterRef("gone", folder, 1)], PROMPTS[:1])
    [table] = backend._tables.values()
    assert table.names() == ["gone"]
    backend.evict("gone")
    assert table.names() == []
