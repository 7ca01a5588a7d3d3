"""The fast LoRA training step: the same loss, gradients, dropout masks and adapter as peft's own forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import KERNEL_ISAS, use_kernel_isa
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_model import make_tiny_loaded, make_tiny_t5_loaded

from personalize.adapters.peft_utils import private_base_copy
from personalize.adapters.training import (
    ADAPTER_METADATA,
    LoraSettings,
    _collate,
    _lora_config,
    _loss,
    encode_pair,
    train_adapter,
)
from personalize.cpu import fasttrain
from personalize.cpu.fasttrain import FastLoraForward, dropout_matches_torch, shared_skeleton

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS = [
    ("Rate the film Alien (Sci-Fi, Horror)", "5"),
    ("Rate the film Notting Hill (Romance, Comedy), which a user saw twice last year", "3 stars, fine"),
    ("Summarise: the storm moved east over the plains", "a storm went east"),
    ("Rate the film Heat (Crime)", "4"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return make_tiny_loaded(tiny_model_dir)


@pytest.fixture(params=["c", *(f"c-{isa}" for isa in KERNEL_ISAS), "torch"])
def kernels(request, monkeypatch):
    """Run a test with the C kernels (as built here, then at every instruction-set level the CPU runs) and again
    with their torch fallbacks (as without a C compiler)."""
    if request.param.startswith("c-"):
        use_kernel_isa(fasttrain, request.param[2:], monkeypatch)
        monkeypatch.setattr(fasttrain, "_DROPOUT_CHECK", None)
    elif request.param == "c":
        if fasttrain.KERNEL.unavailable_reason():
            pytest.skip(fasttrain.KERNEL.unavailable_reason())
    else:
        monkeypatch.setattr(fasttrain.KERNEL, "lib", None)
        monkeypatch.setattr(fasttrain.KERNEL, "error", "no C compiler (cc or gcc) to build the training kernels")
        monkeypatch.setattr(fasttrain, "_DROPOUT_CHECK", None)
    return request.param


def batch_of(loaded, pairs=PAIRS):
    examples = [encode_pair(loaded, p, o, 64) for p, o in pairs]
    batch, _ = _collate(examples, loaded.tokenizer.pad_token_id, False)
    return batch


def twin_models(loaded, settings: LoraSettings):
    """peft on a private copy (the plain path) and peft on a weight-sharing skeleton (the fast path), from one seed;
    B is made non-zero (peft starts it at zero) so every gradient is exercised."""
    models = []
    for base in (private_base_copy(loaded.model), shared_skeleton(loaded.model)):
        torch.manual_seed(settings.seed)
        models.append(get_peft_model(base, _lora_config(loaded, settings)).train())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
        for a, b in zip(*trainable, strict=True):
            assert torch.equal(a, b)  # the same initialisation: the skeleton consumed the RNG as the copy did
            noise = torch.randn(a.shape, generator=gen) * 0.05
            a.copy_(noise)
            b.copy_(noise)
    return models, trainable


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL])
def test_fast_step_gives_peft_s_loss_and_gradients(loaded, kernels, targets):
    settings = LoraSettings(target_modules=targets, dropout=0.2, seed=3)
    (plain, fast), (plain_params, fast_params) = twin_models(loaded, settings)
    batch = batch_of(loaded)
    assert int((batch["labels"] != -100).sum(1).max()) > 2  # several output tokens, of different lengths
    torch.manual_seed(11)
    expected = _loss(plain, batch, False, keep_logits=True)
    expected.backward()
    state_plain = torch.random.get_rng_state()
    torch.manual_seed(11)
    got = FastLoraForward(fast).loss(batch)
    got.backward()
    assert torch.equal(torch.random.get_rng_state(), state_plain)  # the same number of draws, in the same order
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for p, f in zip(plain_params, fast_params, strict=True):
        assert f.grad is not None and float(f.grad.abs().max()) > 0
        torch.testing.assert_close(f.grad, p.grad, rtol=1e-3, atol=1e-5)


def test_dropout_masks_are_torch_s_own_for_any_size_and_start():
    if fasttrain.KERNEL.unavailable_reason():
        pytest.skip(fasttrain.KERNEL.unavailable_reason())
    assert dropout_matches_torch()
    module = torch.nn.Dropout(0.1).train()
    lora = fasttrain._Lora(module, torch.zeros(1, 1), torch.zeros(1, 1), 1.0)
    for warmup, shape in [(0, (1,)), (5, (311,)), (623, (2, 700)), (1, (4, 33, 64))]:
        torch.manual_seed(warmup)
        torch.rand(warmup)  # start anywhere inside the generator's 624-word block
        mask, scale = fasttrain.dropout_mask(shape, lora)
        after_ours = torch.random.get_rng_state()
        torch.manual_seed(warmup)
        torch.rand(warmup)
        x = torch.randn(shape).abs() + 1  # no zeros: the kept positions show in the output
        torch.manual_seed(warmup)
        torch.rand(warmup)
        reference = module(x)
        assert torch.equal(torch.random.get_rng_state(), after_ours)
        assert torch.equal(mask.bool(), reference != 0)
        assert torch.equal(x * (mask.float() * scale), reference)  # bit for bit, the scale included


def test_kernels_match_their_torch_definitions(kernels):
    torch.manual_seed(0)
    x = torch.randn(10, 48, requires_grad=True)
    w = torch.randn(48)
    out = fasttrain.rms_norm(x, w, 1e-5)
    ref_x = x.detach().clone().requires_grad_()
    ref = w * (ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-5))
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, ref_x, g)[0])

    q = torch.randn(2, 5, 3, 16, requires_grad=True)
    angles = torch.rand(2, 5, 8) * 5
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    ref_q = q.detach().clone().requires_grad_()
    half = torch.cat((-ref_q[..., 8:], ref_q[..., :8]), -1)
    ref = ref_q * cos.unsqueeze(2) + half * sin.unsqueeze(2)
    out = fasttrain.rotary(q, cos, sin)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, q, g)[0], torch.autograd.grad(ref, ref_q, g)[0])

    gate, up = (torch.randn(7, 37) * 4).requires_grad_(), torch.randn(7, 37, requires_grad=True)  # odd: a tail
    ref_gate, ref_up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out, ref = fasttrain.swiglu(gate, up), torch.nn.functional.silu(ref_gate) * ref_up
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref)
    got, want = torch.autograd.grad(out, (gate, up), g), torch.autograd.grad(ref, (ref_gate, ref_up), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)

    h, weight = torch.randn(6, 40, requires_grad=True), torch.randn(1003, 40)  # vocab not a multiple of 4
    ref_h = h.detach().clone().requires_grad_()
    out, ref = fasttrain.lm_head(h, weight), ref_h @ weight.t()
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    dh, ref_dh = torch.autograd.grad(out, h, g)[0], torch.autograd.grad(ref, ref_h, g)[0]
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-4)  # sums over 1003 rows, in another order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_projection_matches_torch_with_and_without_dropout(kernels, precision):
    """In bf16 the frozen product (forward and the input gradient's share) is torch's bf16 product, returned in
    fp32; LoRA's own products stay fp32."""
    torch.manual_seed(0)
    for rank, mask_on in [(8, True), (3, False), (5, True)]:
        x = torch.randn(9, 40, requires_grad=True)
        weight = torch.randn(24, 40)
        low = weight.to(torch.bfloat16) if precision == "bf16" else None
        a = torch.randn(rank, 40, requires_grad=True)
        b = torch.randn(24, rank, requires_grad=True)
        mask = (torch.rand(9, 40) > 0.3).to(torch.uint8) if mask_on else None
        scale = 1 / 0.7 if mask_on else 1.0
        lora = fasttrain._Lora(torch.nn.Identity(), a, b, 0.5)
        out = lora.project(x, fasttrain.FrozenWeight(weight, low), mask, scale)
        assert out.dtype == torch.float32
        xm = x if mask is None else x * (mask.float() * scale)
        base = x @ weight.t() if low is None else (x.to(torch.bfloat16) @ low.t()).float()
        ref = base + 0.5 * (xm @ a.t()) @ b.t()
        g = torch.randn_like(ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(out, (x, a, b), g)
        want = torch.autograd.grad(ref, (x, a, b), g)
        for p, q in zip(got, want, strict=True):
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4 if low is not None else 1e-5)
    if precision == "bf16":  # and bf16 really ran: the product differs from fp32's by bf16's rounding
        assert not torch.allclose(out, x @ weight.t() + 0.5 * (xm @ a.t()) @ b.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ALL])
def test_fast_step_in_bf16_stays_near_fp32(loaded, kernels, targets):
    """The bf16 step (frozen projections on bf16 copies) against the fp32 step on the same model, batch and
    dropout draws: the loss within 1% and every LoRA gradient pointing the same way (cosine > 0.99)."""
    settings = LoraSettings(target_modules=targets, dropout=0.2, seed=3)
    (_, fast), (_, params) = twin_models(loaded, settings)
    batch = batch_of(loaded)
    results = []
    for copies in (None, {}):
        torch.manual_seed(11)
        loss = FastLoraForward(fast, bf16_copies=copies).loss(batch)
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (fp32_loss, fp32_grads), (bf16_loss, bf16_grads) = results
    assert bf16_loss != fp32_loss and abs(bf16_loss - fp32_loss) <= 0.01 * fp32_loss
    for g32, g16 in zip(fp32_grads, bf16_grads, strict=True):
        assert g16.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)) > 0.99


def test_bf16_copies_are_made_once_per_model_and_renewed_when_a_weight_changes(loaded):
    """Every user's bf16 step shares the loaded model's copies (one per frozen projection); a weight changed in
    place (a merge) gets a fresh copy, never a stale one."""
    copies: dict = {}
    settings = LoraSettings(target_modules=["q_proj"])
    first = FastLoraForward(
        get_peft_model(shared_skeleton(loaded.model), _lora_config(loaded, settings)), "default", copies
    )
    second = FastLoraForward(
        get_peft_model(shared_skeleton(loaded.model), _lora_config(loaded, settings)), "default", copies
    )
    assert first.precision == second.precision == "bf16"
    n_layers = len(first.layers)
    assert len(copies) == n_layers * len(fasttrain.PROJECTIONS)
    q_first, q_second = first.layers[0].weights["q_proj"], second.layers[0].weights["q_proj"]
    assert q_first.bf16 is q_second.bf16 and q_first.bf16.dtype == torch.bfloat16
    torch.testing.assert_close(q_first.bf16.float(), q_first.fp32, rtol=1e-2, atol=1e-3)
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1.0)
        renewed = fasttrain.bf16_copy(weight.detach(), copies)
        assert renewed is not q_first.bf16
        torch.testing.assert_close(renewed.float(), weight.detach(), rtol=1e-2, atol=1e-2)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_train_adapter_fast_and_plain_make_the_same_adapter(loaded, tmp_path):
    settings = {"max_length": 64, "batch_size": 2, "epochs": 2, "target_modules": ALL, "learning_rate": 5e-3}
    fast = train_adapter(loaded, PAIRS * 2, LoraSettings(**settings), tmp_path / "fast")
    plain = train_adapter(loaded, PAIRS * 2, LoraSettings(trainer="plain", **settings), tmp_path / "plain")
    assert (fast.trainer, fast.trainer_note) == ("fast", None) and plain.trainer == "plain"
    assert json.loads((fast.path / ADAPTER_METADATA).read_text())["trainer"] == "fast"
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)
    a, b = load_file(fast.path / "adapter_model.safetensors"), load_file(plain.path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * len(ALL) * 2  # A and B, every projection, both layers
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
    assert (fast.path / "adapter_config.json").read_text() == (plain.path / "adapter_config.json").read_text()


def test_train_adapter_runs_bf16_on_the_fast_step(loaded, tmp_path):
    """bf16 asked for stays on the fast step (no fallback), trains near fp32, records its precision, keeps the
    adapter fp32, and leaves its bf16 copies on the loaded model for the next user."""
    settings = {"max_length": 64, "batch_size": 2, "epochs": 2, "target_modules": ALL, "learning_rate": 5e-3}
    loaded.bf16_weights.clear()
    fp32 = train_adapter(loaded, PAIRS * 2, LoraSettings(precision="fp32", **settings), tmp_path / "fp32")
    assert not loaded.bf16_weights
    bf16 = train_adapter(loaded, PAIRS * 2, LoraSettings(precision="bf16", **settings), tmp_path / "bf16")
    assert (bf16.trainer, bf16.trainer_note, bf16.precision) == ("fast", None, "bf16")
    meta = json.loads((bf16.path / ADAPTER_METADATA).read_text())
    assert (meta["trainer"], meta["precision"]) == ("fast", "bf16")
    assert bf16.losses != fp32.losses and bf16.losses == pytest.approx(fp32.losses, rel=0.02)
    weights = load_file(bf16.path / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert len(loaded.bf16_weights) == len(fasttrain.PROJECTIONS) * loaded.model.config.num_hidden_layers


def test_fast_trainer_falls_back_to_peft_and_says_why(loaded, tmp_path):
    embed = train_adapter(
        loaded, PAIRS, LoraSettings(max_length=64, max_steps=1, target_modules=["q_proj", "lm_head"]), tmp_path / "e"
    )
    assert embed.trainer == "plain" and "lm_head" in embed.trainer_note
    t5 = make_tiny_t5_loaded()
    t5_settings = LoraSettings(max_length=32, max_steps=1, target_modules=["q", "v"])
    seq2seq = train_adapter(t5, PAIRS, t5_settings, tmp_path / "t")
    assert seq2seq.trainer == "plain" and "encoder-decoder" in seq2seq.trainer_note


def test_skeleton_shares_weights_and_leaves_the_shared_model_alone(loaded):
    before = {k: p.requires_grad for k, p in loaded.model.named_parameters()}
    skeleton = shared_skeleton(loaded.model)
    model = get_peft_model(skeleton, _lora_config(loaded, LoraSettings()))
    ours = dict(loaded.model.named_parameters())
    for name, param in skeleton.named_parameters():
        if "lora_" not in name:
            base_name = name.replace(".base_layer", "")
            assert param.data_ptr() == ours[base_name].data_ptr()  # the same storage: nothing copied
    assert {k: p.requires_grad for k, p in loaded.model.named_parameters()} == before
    assert not any("lora" in name for name, _ in loaded.model.named_modules())
    assert model.get_base_model() is skeleton


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_attention_kernel_matches_torch_with_padding_groups_and_an_offset(isa, monkeypatch):
    use_kernel_isa(fasttrain, isa, monkeypatch)
    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 3, 37, 6, 2, 64  # 37: keys beyond one block of 32
    real = torch.ones(batch, length, dtype=torch.uint8)
    real[0, :9], real[2, :36] = 0, 0  # left padding; the last row has a single token
    mask = torch.ones(length, length, dtype=torch.bool).tril().unsqueeze(0) & real.bool().unsqueeze(1)
    mask = (mask | torch.eye(length, dtype=torch.bool)).unsqueeze(1)
    for offset in (0, length - 4):  # every query, and the last layer's few loss positions
        lq = length - offset
        q = torch.randn(batch, lq, heads, dim, requires_grad=True)
        k = torch.randn(batch, length, kv_heads, dim, requires_grad=True)
        v = torch.randn(batch, length, kv_heads, dim, requires_grad=True)
        out = fasttrain._Functions.get().attention.apply(q, k, v, real, offset)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, :, offset:],
            enable_gqa=True,
        ).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(ref)
        for got, want in zip(
            torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
