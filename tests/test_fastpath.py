"""The fast CPU decoder (issue 7): the same greedy tokens as Hugging Face generate, with and without LoRA adapters,
in mixed batches, and a plain-path fallback that says why. With 8-bit weights (q8) the reference is Hugging Face
generate on a copy of the model holding the dequantised weights: the C decoding step must reproduce it exactly."""

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST_LORA, KERNEL_ISAS, make_tiny_model_dir, movie_items, use_kernel_isa
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_model import make_tiny_loaded, save_ia3_adapter

from personalize import Personalizer, Settings
from personalize.adapters.peft_utils import private_base_copy
from personalize.cpu.fastpath import FastDecoder, fast_weights, lora_pairs, unsupported_reason
from personalize.cpu.quantization import kernel_unavailable_reason, quantize
from personalize.serving.hf_backend import generate_text
from personalize.tasks.prompting import build_prompt
from personalize.tasks.registry import get_task

PROMPTS = [[101, 2023, 2003, 1037, 3231], [101, 7592, 2088, 2003, 2023, 1037, 2936, 3231, 6251, 102, 2054], [101]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return make_tiny_loaded(tmp_path_factory.mktemp("tiny-fast"))


@pytest.fixture(scope="module", params=["fp32", "q8"])
def fmt(request):
    if request.param == "q8" and kernel_unavailable_reason():
        pytest.skip(f"no q8 kernel here: {kernel_unavailable_reason()}")
    return request.param


@pytest.fixture(scope="module")
def reference(loaded, fmt):
    """The Hugging Face model whose weights are exactly those the decoder holds in ``fmt``."""
    if fmt == "fp32":
        return loaded.model
    model = copy.deepcopy(loaded.model)
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                linear = getattr(module, name, None)
                if linear is not None:
                    linear.weight.data = quantize(linear.weight).dequantize()
    # a new Parameter unties the output layer from the embedding, which the decoder keeps in fp32
    model.lm_head.weight = torch.nn.Parameter(quantize(model.lm_head.weight).dequantize())
    return model.eval()


def _eos(loaded) -> int:
    return loaded.model.generation_config.eos_token_id


def _plain_tokens(loaded, prompt, n, model=None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = (model or loaded.model).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _random_lora(model, seed: int, targets: list[str]):
    """A PeftModel with a LoRA whose B is not zero (peft initialises B to zero: it would change nothing)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(private_base_copy(model), config, adapter_name=f"a{seed}").eval()


def test_fast_decoder_gives_the_same_tokens_as_generate(loaded, fmt, reference):
    decoder = FastDecoder(loaded.model, fmt)
    long_prompt = [101 + (7 * i) % 900 for i in range(40)]  # over PREFILL_ROWS: the prefill dequantises into a GEMM
    for prompt in [*PROMPTS, long_prompt]:
        [fast] = decoder.generate([prompt], 12, [_eos(loaded)], 0)
        assert fast == _plain_tokens(loaded, prompt, 12, model=reference)
    assert decoder.generate(PROMPTS, 12, [_eos(loaded)], 0) == [decoder.generate([p], 12, [], 0)[0] for p in PROMPTS]


def test_q8_weights_are_not_the_fp32_weights(loaded, fmt, reference):
    """Guards the q8 reference above: on this random model 8-bit codes do change the weights a little."""
    if fmt == "q8":
        diff = reference.model.layers[0].mlp.down_proj.weight - loaded.model.model.layers[0].mlp.down_proj.weight
        assert 0 < float(diff.detach().abs().max()) < 0.01


def test_fast_decoder_stops_at_eos_per_row(loaded, fmt):
    decoder = FastDecoder(loaded.model, fmt)
    [free] = decoder.generate([PROMPTS[0]], 6, [], 0)
    stop = free[2]  # make the third generated token an eos: that row ends there, inclusive
    rows = decoder.generate([PROMPTS[0], PROMPTS[1]], 6, [stop], 0)
    assert rows[0] == free[:3]
    assert len(rows[1]) == 6 or rows[1][-1] == stop


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]])
def test_lora_on_the_fast_path_matches_peft_and_mixes_in_one_batch(loaded, fmt, reference, targets):
    decoder = FastDecoder(loaded.model, fmt)
    peft_a, peft_b = _random_lora(reference, 1, targets), _random_lora(reference, 2, targets)
    assert decoder.lora_unsupported_reason(peft_a, "a1") is None
    lora_a = decoder.lora_weights(peft_a, "a1", "a")
    lora_b = decoder.lora_weights(peft_b, "a2", "b")
    want_a = [_plain_tokens(loaded, p, 10, model=peft_a) for p in PROMPTS]
    want_b = [_plain_tokens(loaded, p, 10, model=peft_b) for p in PROMPTS]
    base = [_plain_tokens(loaded, p, 10, model=reference) for p in PROMPTS]
    assert want_a != base and want_a != want_b  # the adapters really change the output
    for p, a, b in zip(PROMPTS, want_a, want_b, strict=True):
        assert decoder.generate([p], 10, [], 0, [lora_a]) == [a]
        assert decoder.generate([p], 10, [], 0, [lora_b]) == [b]
    mixed = decoder.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], 10, [], 0, [lora_a, None, lora_b])
    assert mixed == [want_a[0], base[1], want_b[0]]


def test_a_resident_lora_decodes_as_the_merged_model_with_and_without_a_user_adapter(loaded, fmt, reference):
    """A task LoRA merged into the weights (the plain path) against the unmerged base plus that LoRA on every row
    (the fast decoder's resident adapter): the same greedy tokens, alone, joined with a user's adapter trained on
    the merged model, and in a mixed batch."""
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    task = _random_lora(reference, 7, every)
    resident = lora_pairs(task, "a7")  # read before merging, as task_adapters does
    merged = task.merge_and_unload().eval()
    user = _random_lora(merged, 8, ["q_proj", "v_proj", "down_proj"])
    decoder = FastDecoder(loaded.model, fmt, resident=resident)
    joined = decoder.lora_weights(user, "a8", "user")
    assert joined[(0, "q_proj")].a_t.shape[1] == 4 + 4 and joined[(0, "o_proj")] is resident[(0, "o_proj")]
    want_task = [_plain_tokens(loaded, p, 10, model=merged) for p in PROMPTS]
    want_user = [_plain_tokens(loaded, p, 10, model=user) for p in PROMPTS]
    base = [_plain_tokens(loaded, p, 10, model=reference) for p in PROMPTS]
    assert want_task != base and want_user != want_task  # both adapters really change the output
    for p, t, u in zip(PROMPTS, want_task, want_user, strict=True):
        assert decoder.generate([p], 10, [], 0) == [t]
        assert decoder.generate([p], 10, [], 0, [joined]) == [u]
    mixed = decoder.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], 10, [], 0, [joined, None, joined])
    assert mixed == [want_user[0], want_task[1], want_user[2]]


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


def test_only_adapters_of_a_fast_decoding_method_reach_the_fast_decoder(loaded, fmt, tmp_path):
    """An allow-list on the adapter's peft type, for the torch steps and the C step alike: an adapter of another
    method has no lora_A/lora_B, so its (empty) LoRA table would decode as the base model."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    decoder = FastDecoder(loaded.model, fmt)
    ia3_dir = save_ia3_adapter(loaded, tmp_path / "ia3")
    ia3 = PeftModel.from_pretrained(private_base_copy(loaded.model), str(ia3_dir), adapter_name="i").eval()
    reason = decoder.lora_unsupported_reason(ia3, "i")
    assert reason == "IA3 adapters are not LoRA tables"  # the decoder takes them as scales (ia3_scales), never here
    with pytest.raises(ValueError, match="not applicable: IA3 adapters"):
        decoder.lora_weights(ia3, "i", str(ia3_dir))  # never an empty table, whoever asks
    others = {
        "PROMPT_TUNING": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "PREFIX_TUNING": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "P_TUNING": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        "SOMETHING_NEW": SimpleNamespace(peft_type="SOMETHING_NEW", target_modules=["q_proj"]),
        "unknown": SimpleNamespace(target_modules=["q_proj"]),  # no peft type at all
    }
    for peft_type, config in others.items():
        holder = SimpleNamespace(peft_config={"x": config})
        assert decoder.lora_unsupported_reason(holder, "x").startswith(f"{peft_type} adapters")
        with pytest.raises(ValueError, match=f"{peft_type} adapters"):
            decoder.lora_weights(holder, "x", "somewhere")
    lora = _random_lora(loaded.model, 3, ["q_proj"])
    assert decoder.lora_unsupported_reason(lora, "a3") is None and decoder.lora_weights(lora, "a3", "l")
    # after the allow-list, the LoRA-specific checks still apply
    dora = get_peft_model(
        private_base_copy(loaded.model), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="d"
    )
    assert "DoRA" in decoder.lora_unsupported_reason(dora, "d")


@pytest.mark.parametrize("decoder", ["fast-fp32", "fast"])
def test_an_ia3_adapter_is_served_by_peft_never_as_the_base_model(tmp_path, tiny_model_dir, decoder):
    """A user's LoRA whose folder holds a real peft IA3 adapter instead: the fast decoder's LoRA path refuses it
    naming its peft type, and the answer is peft's own generate with that adapter active, not the base model's."""
    if decoder == "fast" and kernel_unavailable_reason():
        pytest.skip(f"no q8 kernel here: {kernel_unavailable_reason()}")
    settings = Settings(
        home=tmp_path / "home",
        model=str(tiny_model_dir),
        auto_train=False,
        decoder=decoder,
        lora=FAST_LORA,
        _env_file=None,
    )
    prompt, n = "Pick a film for tonight", 8
    with Personalizer(settings) as p:
        p.add_items("u", [{**i, "output": "4"} for i in movie_items(6)])
        folder = Path(p.train("u").path)
        ia3_dir = save_ia3_adapter(p.model, tmp_path / "ia3")
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # the store's record and metadata stay
            shutil.copy(ia3_dir / name, folder / name)
        served = p.generate("u", prompt, method="peft", max_new_tokens=n)
        base = p.generate("u", prompt, method="none", max_new_tokens=n)
        built = build_prompt(p.model, get_task(served.task), prompt, [], settings.token_budget, settings.input_share, n)
        reference = PeftModel.from_pretrained(private_base_copy(p.model.model), str(folder)).eval()
        with_ia3 = generate_text(p.model, built.input_ids, n, model=reference)
        plain_base = generate_text(p.model, built.input_ids, n)
    assert served.method == "peft" and served.prompt == built.text == base.prompt
    assert served.timings.extra["decoder"] == "plain"
    note = served.timings.extra["decoder_note"]
    assert note == "fast path not used: IA3 adapters are not LoRA tables"
    assert base.timings.extra["decoder"] == ("fast-fp32" if decoder == "fast-fp32" else "fast-q8")
    assert (served.text, served.new_tokens) == with_ia3  # peft's plain generate with the IA3 adapter active
    assert with_ia3 != plain_base and served.text != base.text  # so it was not served as the base model


def test_quantize_reproduces_gguf_style_weights_exactly():
    """Q4_1 (4-bit code, scale and minimum per 32) and Q8_0 (signed 8-bit code and scale per 32) weights, as the
    bundled GGUF holds them, come back from their 8-bit codes within fp32 rounding."""
    torch.manual_seed(0)
    scale = (torch.rand(64, 6, 1) * 0.02 + 0.001).half().float()  # GGUF keeps scales and minimums in fp16
    low = (-torch.rand(64, 6, 1) * 0.1).half().float()
    codes = torch.randint(0, 16, (64, 6, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 puts the group's minimum at 0 and its maximum at 15
    q4_1 = (scale * codes + low).reshape(64, 192)
    q = quantize(q4_1)
    assert not q.signed and q.max_error < 1e-6 * float(q4_1.abs().max())
    signed = torch.randint(-127, 128, (64, 6, 32)).float()
    signed[..., 0] = 127  # Q8_0's scale is the group's largest magnitude / 127
    q8_0 = (scale * signed).reshape(64, 192)
    q = quantize(q8_0)
    assert q.signed and q.max_error == 0.0
    assert torch.equal(q.dequantize(), q8_0)
    noise = torch.randn(64, 192)
    assert quantize(noise).max_error > 1e-4  # arbitrary weights are not exact, but close:
    assert quantize(noise).max_error <= float(noise.abs().max()) / 100


@pytest.mark.parametrize("isa", [None, *KERNEL_ISAS])
def test_q8_kernel_matches_its_dequantised_weights_for_any_row_count(isa, monkeypatch):
    """As built here (None), then at every instruction-set level this CPU runs; a row's products are the same bits
    alone as in any batch (what makes batched texts identical to one-at-a-time ones)."""
    from personalize.cpu import quantization

    if isa is not None:
        use_kernel_isa(quantization, isa, monkeypatch)
    if kernel_unavailable_reason():
        pytest.skip(kernel_unavailable_reason())
    torch.manual_seed(1)
    unsigned = quantize(torch.rand(96, 160) + 0.5)  # all positive: a per-group minimum fits better
    codes = torch.randint(-127, 128, (96, 5, 32)).float()
    codes[..., 0] = 127  # Q8_0-like: the group's largest magnitude is 127 codes, so signed codes fit exactly
    signed = quantize((codes * 0.01).reshape(96, 160))
    assert (unsigned.signed, signed.signed) == (False, True)
    for q in (unsigned, signed):
        for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 40):  # C in blocks of 4 (AVX2) or 8 (AVX-512); GEMM > 16
            x = torch.randn(rows, 160)
            torch.testing.assert_close(q(x), x @ q.dequantize().t(), rtol=1e-5, atol=1e-4)
            if rows <= 16:
                assert torch.equal(q(x), torch.cat([q(x[i : i + 1]) for i in range(rows)]))
            base = torch.randn(rows, 96)
            out = base.clone()
            q(x, out=out, accumulate=True)
            torch.testing.assert_close(out, base + x @ q.dequantize().t(), rtol=1e-5, atol=1e-4)


def test_fast_weights_falls_back_to_fp32_and_says_why(loaded, monkeypatch):
    from personalize.cpu import quantization

    monkeypatch.setattr(quantization.KERNEL, "lib", None)
    monkeypatch.setattr(quantization.KERNEL, "error", "no C compiler (cc or gcc) to build the weight-only kernel")
    weights, note = fast_weights(loaded.model)
    assert weights == "fp32" and "no C compiler" in note


def test_personalizer_uses_the_fast_path_and_falls_back_with_a_reason(tmp_path, tiny_model_dir):
    def run(model: Path, decoder: str, home: str):
        settings = Settings(home=tmp_path / home, model=str(model), auto_train=False, decoder=decoder, _env_file=None)
        with Personalizer(settings) as p:
            p.add_items("u", [{**i, "output": "4"} for i in movie_items(6)])
            p.train("u")
            return [p.generate("u", "Pick a film", method=m, max_new_tokens=6) for m in ("none", "rag", "peft")]

    fast, plain = run(tiny_model_dir, "fast-fp32", "fast"), run(tiny_model_dir, "plain", "plain")
    assert [r.timings.extra["decoder"] for r in fast] == ["fast-fp32"] * 3
    assert [r.timings.extra["decoder"] for r in plain] == ["plain"] * 3 and "decoder_note" not in plain[0].timings.extra
    assert [r.text for r in fast] == [r.text for r in plain]  # the same answers, with and without the adapter
    if kernel_unavailable_reason() is None:  # the default: 8-bit weights, decoded in C, with the adapter too
        q8 = run(tiny_model_dir, "fast", "q8")
        assert [r.timings.extra["decoder"] for r in q8] == ["fast-q8"] * 3
        assert all(r.new_tokens > 0 for r in q8) and "decoder_note" not in q8[0].timings.extra
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
