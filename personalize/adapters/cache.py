"""Serving per-user LoRA adapters: one ``PeftModel`` over the base model, with a bounded LRU of loaded adapters.

Adapters are small (3.7 MB in fp32 at rank 8 on SmolLM2-135M), so loading one on demand is cheap; the LRU bounds
memory. ``generate_batch`` serves several users (each with their adapter, or none) in one left-padded batch with
peft's per-row ``adapter_names``; greedy results are the same tokens as one prompt at a time.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from personalize.adapters.format import read_metadata
from personalize.adapters.methods import is_prompt_learning, peft_type_name, unsupported_peft_type_reason
from personalize.adapters.peft_utils import private_base_copy, strip_tuner_layers
from personalize.errors import AdapterHasNoEffectError, AdapterUnavailableError, InvalidInputError
from personalize.serving.modeling import LoadedModel

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
PROBE_TEXT = "Probe: does this adapter change what the model says next?"
PROBE_ATOL = 1e-5  # fp32 logits of the same forward agree exactly; a trained adapter moves them by far more
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def owned_by(name: str, user_key: str) -> bool:
    """Whether cache name ``name`` is one of ``user_key``'s adapters (``AdapterRef.name``)."""
    return name == user_key or name.startswith(f"{user_key}_")


def validate_adapter_name(name: object) -> str:
    """Adapter names become module keys inside the model: ASCII letters, digits, ``_`` and ``-`` only (peft
    rejects ``.``), not starting with ``_`` (``__base__`` is reserved), and not an attribute of ``nn.ModuleDict``."""
    import torch

    if not isinstance(name, str) or not _NAME.match(name) or hasattr(torch.nn.ModuleDict(), name):
        raise InvalidInputError(
            f"adapter name {name!r} is not usable: use 1-128 of [A-Za-z0-9_-], starting with a letter or digit "
            "(e.g. a hash-derived key such as naming.user_key)"
        )
    return name


def probe_ids(loaded: LoadedModel) -> list[int]:
    """The probe input's token ids: every cache checks a new adapter's effect on the same text."""
    return list(loaded.tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids or [0])


def check_adapter_folder(path: Path, base_name: str) -> None:
    """Refuse a folder that is not a complete adapter (``AdapterUnavailableError``) or was trained on another base
    than ``base_name`` (``InvalidInputError``): what every cache checks before reading an adapter."""
    metadata = read_metadata(path)
    if metadata is None:
        raise AdapterUnavailableError(path)
    if metadata.get("base_model") != base_name:
        raise InvalidInputError(
            f"the adapter at {path} was trained on {metadata.get('base_model')!r}, not on the loaded model "
            f"{base_name!r}: retrain it for this model"
        )


T = TypeVar("T")


class TableCache(Generic[T]):
    """Per-user adapters as a decoder's own tables (``fastpath.read_lora_pairs``), no ``PeftModel``: a bounded LRU
    of name -> (folder, tables), least recently used evicted beyond ``capacity``. ``load(name, folder)`` reads one
    (checks included); a name read from another folder (a retrained adapter) is read again."""

    def __init__(self, load: Any, capacity: int = 8) -> None:
        if capacity < 1:
            raise InvalidInputError(f"an adapter cache holds at least 1 adapter, got capacity={capacity}")
        self.capacity = capacity
        self._load = load
        self._entries: OrderedDict[str, tuple[Path, T]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, name: str, path: Path) -> tuple[T, bool]:
        """The tables of adapter ``name`` at ``path``, read if needed; and whether it was a cache hit."""
        path = Path(path)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry[0] == path:
                self._entries.move_to_end(name)
                self.hits += 1
                return entry[1], True
            tables: T = self._load(name, path)
            self._entries.pop(name, None)
            self._entries[name] = (path, tables)
            self.misses += 1
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1
            return tables, False

    def names(self) -> list[str]:
        """Cached adapters, least recently used first."""
        with self._lock:
            return list(self._entries)

    def evict(self, name: str) -> bool:
        """Drop ``name``; False if it was not cached."""
        with self._lock:
            return self._entries.pop(name, None) is not None

    def evict_user(self, user_key: str) -> int:
        """Drop every adapter of the user (``AdapterRef.name``: the key, or ``{key}_{method}``); how many."""
        with self._lock:
            return sum(self._entries.pop(n, None) is not None for n in list(self._entries) if owned_by(n, user_key))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class AdapterCache:
    """Per-user adapters on one shared base model, loaded on demand, least recently used evicted beyond ``capacity``.

    By default the cache wraps a private copy of the base model, so ``loaded.model`` stays the plain base for
    everyone else. ``copy_base=False`` saves that memory by wrapping ``loaded.model`` in place: then the active
    adapter applies to every caller of ``loaded.model``, so route all generation through this cache.
    Every method holds the cache's lock; hold ``cache.lock`` yourself (or use ``use``) around activate-then-generate.
    """

    def __init__(self, loaded: LoadedModel, capacity: int = 8, *, copy_base: bool = True, probe: bool = True) -> None:
        if capacity < 1:
            raise InvalidInputError(f"an adapter cache holds at least 1 adapter, got capacity={capacity}")
        self.loaded = loaded
        self.capacity = capacity
        self.probe = probe  # check that each adapter loaded changes the logits (``Settings.adapter_probe``)
        self._probe: tuple[dict[str, Any], Any] | None = None  # the probe input and the base's logits on it
        self._base = private_base_copy(loaded.model) if copy_base else loaded.model
        self._requires_grad = {name: p.requires_grad for name, p in self._base.named_parameters()}
        self._peft: Any = None
        self._paths: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def lock(self) -> Any:
        """The cache's re-entrant lock."""
        return self._lock

    @property
    def model(self) -> Any:
        """The ``PeftModel`` once an adapter is loaded, else the plain base model."""
        return self._peft if self._peft is not None else self._base

    def names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self._lock:
            return list(self._paths)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._paths

    def ensure_loaded(self, name: str, path: Path) -> bool:
        """Load the adapter at ``path`` as ``name`` unless it is loaded already; True on a cache hit. A name loaded
        from another folder (the user's adapter was retrained) is replaced."""
        validate_adapter_name(name)
        path = Path(path)
        with self._lock:
            if self._paths.get(name) == path:
                self._paths.move_to_end(name)
                self.hits += 1
                return True
            if name in self._paths:
                self._remove(name)
            check_adapter_folder(path, self.loaded.name)
            self._load(name, path)
            self.misses += 1
            while len(self._paths) > self.capacity:
                self._remove(next(iter(self._paths)))
                self.evictions += 1
            return False

    def activate(self, name: str, path: Path) -> bool:
        """Load if needed and make ``name`` the active adapter; True on a cache hit."""
        with self._lock:
            hit = self.ensure_loaded(name, path)
            self._set_active(name)
            return hit

    def peft_type(self, name: str) -> str:
        """The peft type of loaded adapter ``name`` ("LORA", "IA3", ...), as its ``adapter_config.json`` says."""
        with self._lock:
            if name not in self._paths:
                raise InvalidInputError(f"adapter {name!r} is not loaded; call ensure_loaded first")
            return peft_type_name(self._peft.peft_config[name].peft_type)

    def mixes(self, name: str) -> bool:
        """Whether loaded adapter ``name`` can share a forward pass with other adapters' rows (peft's per-row
        ``adapter_names``): its method is registered with ``mixed_batches`` and it is no DoRA (peft refuses those)."""
        with self._lock:
            if unsupported_peft_type_reason(self.peft_type(name), "mixed_batches", "a batch") is not None:
                return False
            return not getattr(self._peft.peft_config[name], "use_dora", False)

    def _set_active(self, name: str) -> None:
        if self._peft.active_adapter != name:  # set_adapter walks every module (~70 ms): skip when active
            self._peft.set_adapter(name)

    def evict(self, name: str) -> bool:
        """Unload ``name``; False if it was not loaded. Evicting the last adapter unwraps the base model."""
        with self._lock:
            if name not in self._paths:
                return False
            self._remove(name)
            return True

    def evict_user(self, user_key: str) -> int:
        """Unload every adapter of the user (the key, or ``{key}_{method}``); how many."""
        with self._lock:
            return sum(self.evict(n) for n in list(self._paths) if owned_by(n, user_key))

    def clear(self) -> None:
        with self._lock:
            for name in list(self._paths):
                self._remove(name)

    @contextmanager
    def use(self, name: str, path: Path) -> Iterator[Any]:
        """Hold the lock with ``name`` active: ``with cache.use(key, path) as model: model.generate(...)``."""
        with self._lock:
            self.activate(name, path)
            yield self._peft

    @contextmanager
    def base_disabled(self) -> Iterator[Any]:
        """Hold the lock with every adapter disabled, to generate with the plain base model."""
        with self._lock:
            if self._peft is None:
                yield self._base
            else:
                with self._peft.disable_adapter():
                    yield self._peft

    def _load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except Exception as exc:  # a damaged folder: leave the model as it was before this load
            if self._peft is None:
                self._unwrapped(strip_tuner_layers(self._base))
            elif name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise AdapterUnavailableError(path, f"{type(exc).__name__}: {exc}") from exc
        self._peft.eval()
        self._paths[name] = path
        if self.probe:
            self._check_changes_output(name, path)

    def _check_changes_output(self, name: str, path: Path) -> None:
        """Refuse (unload, then ``AdapterHasNoEffectError``) an adapter whose logits on a probe input equal the
        base model's: it would be served silently as the base model (vLLM #55193's failure mode). The base's probe
        logits are computed once per cache (the base never changes); a method that mixes adapters in one batch is
        probed through peft's per-row ``adapter_names``, so the active adapter is not switched (~70 ms each way)."""
        import torch

        inputs, base = self._probe_base()
        with torch.inference_mode():
            if self.mixes(name):
                with_adapter = self._peft(**inputs, adapter_names=[name]).logits[0, -1].float()
            else:
                previous = self._peft.active_adapter
                self._set_active(name)
                with_adapter = self._peft(**inputs).logits[0, -1].float()
                if previous in self._paths and previous != name:
                    self._set_active(previous)
        change = float((with_adapter - base).abs().max())
        if not change > PROBE_ATOL:
            self._remove(name)
            raise AdapterHasNoEffectError(name, path, change)

    def _probe_base(self) -> tuple[dict[str, Any], Any]:
        """The probe input and the base model's last logits on it (with every adapter disabled), computed once."""
        import torch

        if self._probe is None:
            ids = torch.tensor([probe_ids(self.loaded)])
            inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if self.loaded.is_encoder_decoder:  # the first decoder step's logits
                start = getattr(self.loaded.model.config, "decoder_start_token_id", None)
                inputs["decoder_input_ids"] = torch.tensor([[self.loaded.pad_id if start is None else start]])
            with torch.inference_mode(), self._peft.disable_adapter():
                self._probe = (inputs, self._peft(**inputs).logits[0, -1].float())
        return self._probe

    def _remove(self, name: str) -> None:
        del self._paths[name]
        if self._paths:
            self._peft.delete_adapter(name)
            return
        # the last adapter: take the LoRA (or IA3) layers out again, so the base model is exactly as it was given;
        # virtual-token methods never changed it
        prompt_learning = self._peft.peft_config[name].is_prompt_learning if name in self._peft.peft_config else False
        self._unwrapped(self._peft.get_base_model() if prompt_learning else self._peft.unload())

    def _unwrapped(self, base: Any) -> None:
        self._base = base
        self._peft = None
        for param_name, param in base.named_parameters():
            param.requires_grad_(self._requires_grad.get(param_name, param.requires_grad))


def batching_of(peft_type: str, dora: bool = False) -> str:
    """How rows with adapters of ``peft_type`` share forward passes: 'mixed' (every row its own adapter in one
    pass), 'grouped' (one pass per adapter: a method without mixed batches, or DoRA, as ``AdapterCache.mixes``
    decides) or 'one-at-a-time' (virtual-token methods)."""
    if is_prompt_learning(peft_type):
        return "one-at-a-time"
    mixed = unsupported_peft_type_reason(peft_type, "mixed_batches", "a batch") is None and not dora
    return "mixed" if mixed else "grouped"


def generate_batch(
    cache: AdapterCache,
    encoded_prompts: Sequence[Sequence[int]],
    adapter_names: Sequence[str | None],
    max_new_tokens: int,
) -> list[tuple[str, int]]:
    """Greedy generation for several prompts in one left-padded batch, each row with its own adapter (None: the
    base model). The adapters must be loaded (``ensure_loaded``). Returns (text, new tokens) per prompt, the same
    as ``serving.hf_backend.generate_text`` one prompt at a time. Rows mix in one pass where every adapter's method is
    registered with ``mixed_batches`` (``adapter_methods``: LoRA); otherwise each adapter's rows run in a pass of
    their own."""
    if len(encoded_prompts) != len(adapter_names):
        raise InvalidInputError(f"{len(encoded_prompts)} prompts but {len(adapter_names)} adapter names")
    if not encoded_prompts:
        return []
    if any(len(ids) == 0 for ids in encoded_prompts):
        raise InvalidInputError("every prompt needs at least one token")
    loaded = cache.loaded
    with cache.lock:
        missing = sorted({n for n in adapter_names if n is not None and n not in cache})
        if missing:
            raise InvalidInputError(f"adapters not loaded: {', '.join(missing)}; call cache.ensure_loaded first")
        if not cache.names():  # with no adapter loaded, the model is the plain base
            return _greedy(loaded, cache.model, encoded_prompts, max_new_tokens)
        named = {n for n in adapter_names if n is not None}
        if all(cache.mixes(n) for n in named):
            # a PeftModel: each row names its adapter
            names = [BASE if n is None else n for n in adapter_names]
            return _greedy(loaded, cache.model, encoded_prompts, max_new_tokens, names)
        # Another method (peft applies the *active* adapter to every row and ignores adapter_names): one pass per
        # adapter, its rows together, the base rows with every adapter disabled; virtual-token methods one row at a
        # time by forward passes (``greedy_by_forward``).
        results: list[tuple[str, int]] = [("", 0)] * len(encoded_prompts)
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            prompts = [encoded_prompts[i] for i in rows]
            if name is None:
                with cache.base_disabled() as model:
                    outputs = _greedy(loaded, model, prompts, max_new_tokens)
            else:
                cache._set_active(name)
                if is_prompt_learning(cache.peft_type(name)):
                    outputs = [greedy_by_forward(loaded, cache.model, ids, max_new_tokens) for ids in prompts]
                else:
                    outputs = _greedy(loaded, cache.model, prompts, max_new_tokens)
            for i, output in zip(rows, outputs, strict=True):
                results[i] = output
        return results


def greedy_by_forward(
    loaded: LoadedModel, model: Any, prompt_ids: Sequence[int], max_new_tokens: int
) -> tuple[str, int]:
    """Greedy decoding of one prompt by full forward passes (no KV cache): how adapters with virtual tokens are
    served. peft's ``generate`` drops prefix tuning's prefix under transformers 5 (it answers as the base model) and
    misplaces virtual tokens in left-padded batches; its forward, the one training optimised, is right for all of
    them. A forward pass per new token: fine for short answers, slow for long ones."""
    import torch

    eos = set(loaded.eos_ids)
    ids = list(prompt_ids)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            row = torch.tensor([ids + new])
            logits = model(input_ids=row, attention_mask=torch.ones_like(row), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def _greedy(
    loaded: LoadedModel,
    model: Any,
    encoded_prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    adapter_names: list[str] | None = None,
) -> list[tuple[str, int]]:
    """One left-padded greedy pass of ``model`` (with peft's per-row ``adapter_names`` where given)."""
    import torch

    tok = loaded.tokenizer
    eos = set(loaded.eos_ids)
    pad_id = loaded.pad_id
    width = max(len(ids) for ids in encoded_prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in encoded_prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded_prompts], dtype=torch.long)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, **loaded.greedy(max_new_tokens)}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    with torch.inference_mode():
        out = model.generate(**kwargs)
    results: list[tuple[str, int]] = []
    for row in out:
        new = row.tolist() if loaded.is_encoder_decoder else row[width:].tolist()
        start = 1 if loaded.is_encoder_decoder else 0  # the decoder start token
        end = next((i + 1 for i in range(start, len(new)) if new[i] in eos), len(new))
        new = new[:end]  # a finished row is padded to the longest; one prompt alone stops at its eos
        results.append((tok.decode(new, skip_special_tokens=True).strip(), len(new)))
    return results


__all__ = [
    "BASE",
    "AdapterCache",
    "AdapterUnavailableError",
    "TableCache",
    "batching_of",
    "check_adapter_folder",
    "probe_ids",
    "generate_batch",
    "greedy_by_forward",
    "validate_adapter_name",
]
