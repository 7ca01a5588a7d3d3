"""The fast CPU decoder (issue 7): the same greedy tokens as Hugging Face generate, with and without LoRA adapters,
in mixed batches, and a plain-path fallback that says why."""

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model_dir, movie_items
from peft import LoraConfig, get_peft_model
from tiny_model import make_tiny_loaded

from personalize import Personalizer, Settings
from personalize.fastpath import FastDecoder, unsupported_reason
from personalize.personalizer import generate_text
from personalize.training import private_base_copy

PROMPTS = [[101, 2023, 2003, 1037, 3231], [101, 7592, 2088, 2003, 2023, 1037, 2936, 3231, 6251, 102, 2054], [101]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return make_tiny_loaded(tmp_path_factory.mktemp("tiny-fast"))


def _eos(loaded) -> int:
    return loaded.model.generation_config.eos_token_id


def _plain_tokens(loaded, prompt, n, model=None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = (model or loaded.model).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _random_lora(loaded, seed: int, targets: list[str]):
    """A PeftModel with a LoRA whose B is not zero (peft initialises B to zero: it would change nothing)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(private_base_copy(loaded.model), config, adapter_name=f"a{seed}").eval()


def test_fast_decoder_gives_the_same_tokens_as_generate(loaded):
    decoder = FastDecoder(loaded.model)
    for prompt in PROMPTS:
        [fast] = decoder.generate([prompt], 12, [_eos(loaded)], 0)
        assert fast == _plain_tokens(loaded, prompt, 12)
    assert decoder.generate(PROMPTS, 12, [_eos(loaded)], 0) == [decoder.generate([p], 12, [], 0)[0] for p in PROMPTS]


def test_fast_decoder_stops_at_eos_per_row(loaded):
    decoder = FastDecoder(loaded.model)
    [free] = decoder.generate([PROMPTS[0]], 6, [], 0)
    stop = free[2]  # make the third generated token an eos: that row ends there, inclusive
    rows = decoder.generate([PROMPTS[0], PROMPTS[1]], 6, [stop], 0)
    assert rows[0] == free[:3]
    assert len(rows[1]) == 6 or rows[1][-1] == stop


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]])
def test_lora_on_the_fast_path_matches_peft_and_mixes_in_one_batch(loaded, targets):
    decoder = FastDecoder(loaded.model)
    peft_a, peft_b = _random_lora(loaded, 1, targets), _random_lora(loaded, 2, targets)
    assert decoder.lora_unsupported_reason(peft_a, "a1") is None
    lora_a = decoder.lora_weights(peft_a, "a1", "a")
    lora_b = decoder.lora_weights(peft_b, "a2", "b")
    want_a = [_plain_tokens(loaded, p, 10, model=peft_a) for p in PROMPTS]
    want_b = [_plain_tokens(loaded, p, 10, model=peft_b) for p in PROMPTS]
    base = [_plain_tokens(loaded, p, 10) for p in PROMPTS]
    assert want_a != base and want_a != want_b  # the adapters really change the output
    for p, a, b in zip(PROMPTS, want_a, want_b, strict=True):
        assert decoder.generate([p], 10, [], 0, [lora_a]) == [a]
        assert decoder.generate([p], 10, [], 0, [lora_b]) == [b]
    mixed = decoder.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], 10, [], 0, [lora_a, None, lora_b])
    assert mixed == [want_a[0], base[1], want_b[0]]


def test_unsupported_adapters_and_models_are_reported(loaded, tmp_path):
    decoder = FastDecoder(loaded.model)
    dora = get_peft_model(
        private_base_copy(loaded.model), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="d"
    )
    assert "DoRA" in decoder.lora_unsupported_reason(dora, "d")
    biased = make_tiny_loaded(tmp_path / "biased")
    biased.model.config.attention_bias = True
    assert "biases" in unsupported_reason(biased.model)
    with pytest.raises(ValueError, match="not applicable"):
        FastDecoder(biased.model)


def test_int8_weights_decode_close_to_fp32(loaded):
    fp32, int8 = FastDecoder(loaded.model), FastDecoder(loaded.model, "int8")
    assert int8.layers[0].qkv.packed is not None and fp32.layers[0].qkv.w_t is not None
    [a] = fp32.generate([PROMPTS[1]], 8, [], 0)
    [b] = int8.generate([PROMPTS[1]], 8, [], 0)
    assert len(b) == 8 and a[0] == b[0]  # the first token agrees; later ones may drift a little


def test_personalizer_uses_the_fast_path_and_falls_back_with_a_reason(tmp_path, tiny_model_dir):
    def run(model: Path, decoder: str, home: str):
        settings = Settings(home=tmp_path / home, model=str(model), auto_train=False, decoder=decoder, _env_file=None)
        with Personalizer(settings) as p:
            p.add_items("u", [{**i, "output": "4"} for i in movie_items(6)])
            p.train("u")
            return [p.generate("u", "Pick a film", method=m, max_new_tokens=6) for m in ("none", "rag", "peft")]

    fast, plain = run(tiny_model_dir, "fast", "fast"), run(tiny_model_dir, "plain", "plain")
    assert [r.timings.extra["decoder"] for r in fast] == ["fast-fp32"] * 3
    assert [r.timings.extra["decoder"] for r in plain] == ["plain"] * 3 and "decoder_note" not in plain[0].timings.extra
    assert [r.text for r in fast] == [r.text for r in plain]  # the same answers, with and without the adapter
    biased_dir = make_tiny_model_dir(tmp_path / "biased-model")
    import json

    config = json.loads((biased_dir / "config.json").read_text())
    config["attention_bias"] = True
    (biased_dir / "config.json").write_text(json.dumps(config))
    fallback = run(biased_dir, "fast", "biased")
    assert fallback[0].timings.extra["decoder"] == "plain"
    assert "biases" in fallback[0].timings.extra["decoder_note"]


def test_generate_text_is_still_the_plain_reference(loaded):
    text, n = generate_text(loaded, PROMPTS[0], 5)
    assert n == 5 and isinstance(text, str)
