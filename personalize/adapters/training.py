"""Per-user LoRA adapters: training pairs from a user's profile items, and training one adapter per user.

Pairs follow ../shared/LAMP.md section 4: an item with a label uses its task's own input template (LaMP-3: review
-> score); tasks whose profile has no labelled pairs use a stand-in (LaMP-7: the first 10-25% of a tweet -> the rest;
reuters-authorship: the first 30 words of an article -> the next 60), and an item without a label continues its own
text. Training never changes the shared base model: it runs on a private copy, and the adapter is written to a
temporary folder that is renamed into place only once complete.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from personalize.adapters.format import ADAPTER_METADATA, METADATA_FORMAT, read_metadata
from personalize.adapters.methods import method_for_settings, unsupported_peft_type_reason
from personalize.adapters.peft_utils import private_base_copy, strip_tuner_layers
from personalize.adapters.store import temp_prefix
from personalize.adapters.trainers import Trainer, get_trainer, register_trainer
from personalize.cpu.precision import training_precision
from personalize.data.items import ProfileItem
from personalize.errors import AdapterExistsError, InvalidInputError, TrainingCancelled
from personalize.serving.modeling import LoadedModel

if TYPE_CHECKING:
    from datetime import datetime
from personalize.settings import AdapterTrainingSettings, LoraSettings
from personalize.tasks.prompting import encode
from personalize.tasks.registry import Defaulting, Task, get_task

CONTINUE_TEMPLATE = "Continue this text: {text}"
MIN_CONTINUATION_WORDS = 4

Pair = tuple[str, str]
ProgressFn = Callable[[float, float | None], None]
StopFn = Callable[[], bool]


@dataclass
class TrainResult:
    """What one training run produced: the adapter folder and how it was made."""

    path: Path
    n_pairs: int
    n_tokens: int  # non-padding tokens the forward passes processed, over all steps
    steps: int
    train_seconds: float
    final_loss: float  # mean loss over the last epoch's steps
    size_bytes: int
    config: dict[str, Any]
    losses: list[float] = field(default_factory=list)  # one per step
    step_tokens: list[int] = field(default_factory=list)  # non-padding tokens of each step's batch
    trainer: str = "plain"  # "fast" (personalize.cpu.fasttrain) or "plain" (peft's own forward)
    trainer_note: str | None = None  # why the fast step did not apply, when it was asked for
    precision: str = "fp32"  # what the frozen base computed in: "fp32" or "bf16" (``cpu.precision``)
    trainable_params: int = 0  # parameters the optimizer updated (a P-tuning encoder's too, though not stored)


# --- training pairs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    """A continuation stand-in: the first words of an item's text are the input, the following words the output."""

    template: str | None  # None: the task's own input_template, with {text} the head
    head_words: Callable[[int, ProfileItem], int]
    max_tail_words: int | None = None


def _stable_fraction(key: str) -> float:
    """A number in [0, 1) derived from ``key`` alone (stable across processes, unlike ``hash``)."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def _tweet_head(n: int, item: ProfileItem) -> int:
    """LaMP-7: the first 10-25% of the words; the share is drawn per item, deterministically from its id."""
    return round((0.10 + 0.15 * _stable_fraction(item.id)) * n)


# Tasks whose profile items carry no label usable as a training output (LAMP.md sections 4 and 5).
_STAND_INS: dict[str, _Split] = {
    "lamp-7": _Split(None, _tweet_head),
    "reuters-authorship": _Split(None, lambda n, item: min(30, n // 2), max_tail_words=60),
}
_CONTINUATION = _Split(CONTINUE_TEMPLATE, lambda n, item: round(0.25 * n))


def _split_pair(task: Task, item: ProfileItem, split: _Split) -> Pair | None:
    words = item.text.split()
    if len(words) < MIN_CONTINUATION_WORDS:
        return None
    head = min(max(1, split.head_words(len(words), item)), len(words) - 1)
    tail = words[head:] if split.max_tail_words is None else words[head : head + split.max_tail_words]
    template = split.template or task.input_template or CONTINUE_TEMPLATE
    return template.format_map(Defaulting(text=" ".join(words[:head]))), " ".join(tail)


def item_pair(task: Task, item: ProfileItem) -> Pair | None:
    """The training pair for one item, or None when the item is too short to make one."""
    split = _STAND_INS.get(task.name)
    if split is not None:
        return _split_pair(task, item, split)
    values = task.item_values(item)
    label = values.get(task.output_field) if task.output_field else None
    if label is not None and str(label).strip():
        prompt = task.input_template.format_map(Defaulting(values)) if task.input_template else item.text
        return prompt, str(label).strip()
    return _split_pair(task, item, _CONTINUATION)


def most_recent(items: Sequence[ProfileItem], n: int | None) -> list[ProfileItem]:
    """The ``n`` most recent items, oldest first; items without a timestamp count as older, ties keep list order."""
    undated = [item for item in items if item.timestamp is None]
    dated = sorted(
        (item for item in items if item.timestamp is not None), key=lambda item: cast("datetime", item.timestamp)
    )
    ordered = undated + dated  # sorted() is stable: equal timestamps keep their list order
    return ordered if n is None else ordered[max(0, len(ordered) - n) :]


def training_pairs(
    items: Sequence[ProfileItem], task_name: str | None = None, *, max_items: int | None = None
) -> list[Pair]:
    """One (input, output) pair per usable item; ``task_name`` None uses each item's own task (generic if none)."""
    pairs: list[Pair] = []
    for item in most_recent(items, max_items):
        pair = item_pair(get_task(task_name or item.task), item)
        if pair is not None:
            pairs.append(pair)
    return pairs


# --- encoding -----------------------------------------------------------------------------------------------------


@dataclass
class _Example:
    input_ids: list[int]
    labels: list[int]  # causal: -100 on the prompt; seq2seq: the decoder targets


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """Every id that ends a generation (``LoadedModel.eos_ids``)."""
    return loaded.eos_ids


def _fit_prompt(loaded: LoadedModel, prompt: str, ids: list[int], limit: int) -> list[int]:
    """``ids`` (the encoded ``prompt``) in at most ``limit`` tokens: the prompt's text is cut at its end (its
    instruction and the start of its content stay), so a chat template stays whole."""
    if len(ids) <= limit:
        return ids
    tok = loaded.tokenizer
    raw = tok(prompt, add_special_tokens=False).input_ids
    room = limit - (len(ids) - len(raw))
    for _ in range(4):  # decoding and re-encoding can shift token boundaries by a few tokens
        if room <= 0:
            break
        ids = encode(loaded, tok.decode(raw[:room], skip_special_tokens=True))
        if len(ids) <= limit:
            return ids
        room -= len(ids) - limit
    return ids[len(ids) - limit :]  # last resort: keep the end, where a chat template asks for the answer


def encode_pair(loaded: LoadedModel, prompt: str, output: str, max_length: int) -> _Example | None:
    """Token ids and labels for one pair, at most ``max_length`` tokens; the loss falls on the output tokens (and
    the eos) only. A long output keeps at most half of ``max_length``; the prompt is cut to fit the rest."""
    tok = loaded.tokenizer
    prompt_ids = encode(loaded, prompt)
    if loaded.is_encoder_decoder:
        labels = list(tok(output).input_ids)[:max_length]
        return _Example(_fit_prompt(loaded, prompt, prompt_ids, max_length), labels) if labels else None
    if not loaded.uses_chat_template and output[:1] and not output[:1].isspace():
        output = " " + output  # a plain LM continues the prompt text: "...: title" -> " abstract"
    eos = eos_token_ids(loaded)[:1]
    out_ids = list(tok(output, add_special_tokens=False).input_ids) + eos
    out_ids = out_ids[: max(max_length - max_length // 2, max_length - len(prompt_ids))]
    if not out_ids or out_ids == eos:
        return None
    prompt_ids = _fit_prompt(loaded, prompt, prompt_ids, max_length - len(out_ids))
    return _Example(prompt_ids + out_ids, [-100] * len(prompt_ids) + out_ids)


def _pad(rows: Sequence[list[int]], value: int, left: bool) -> list[list[int]]:
    width = max(len(row) for row in rows)
    return [[value] * (width - len(row)) + row if left else row + [value] * (width - len(row)) for row in rows]


def _collate(examples: Sequence[_Example], pad_id: int, is_encoder_decoder: bool) -> tuple[dict[str, Any], int]:
    """A batch as tensors. Causal: left-padded, so every output sits at the end of its row and only the last
    positions need logits; position ids count real tokens only, as in generation. Seq2seq: right-padded."""
    import torch

    left = not is_encoder_decoder
    inputs = [e.input_ids for e in examples]
    mask = torch.tensor(_pad([[1] * len(row) for row in inputs], 0, left))
    batch = {
        "input_ids": torch.tensor(_pad(inputs, pad_id, left)),
        "attention_mask": mask,
        "labels": torch.tensor(_pad([e.labels for e in examples], -100, left)),
    }
    n_tokens = sum(len(row) for row in inputs)
    if is_encoder_decoder:
        n_tokens += sum(len(e.labels) for e in examples)
    else:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch, n_tokens


def _loss(model: Any, batch: dict[str, Any], is_encoder_decoder: bool, keep_logits: bool) -> Any:
    """Mean cross-entropy over the output tokens. For a causal LM, logits are computed for the output positions
    only (``logits_to_keep``): the lm_head over the prompt would cost time and memory for labels that are -100."""
    import torch.nn.functional as F

    if is_encoder_decoder:
        return model(**batch, use_cache=False).loss
    labels = batch["labels"]
    k = int((labels != -100).sum(dim=1).max())  # the outputs are the last k positions (left padding)
    inputs = {name: batch[name] for name in ("input_ids", "attention_mask", "position_ids")}
    if keep_logits:
        inputs["logits_to_keep"] = k + 1
    logits = model(**inputs, use_cache=False).logits[:, -(k + 1) : -1]  # position t predicts token t + 1
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, -k:].reshape(-1), ignore_index=-100)


# --- training -----------------------------------------------------------------------------------------------------


def _lora_config(loaded: LoadedModel, settings: AdapterTrainingSettings) -> Any:
    """The peft config of the adapter ``settings`` describe, from its method in the registry (``adapter_methods``)."""
    return method_for_settings(settings).peft_config(settings, loaded.is_encoder_decoder)


def train_adapter(
    loaded: LoadedModel,
    pairs: Sequence[Pair],
    settings: AdapterTrainingSettings | None,
    out_dir: Path,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    owner: str | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train an adapter on ``pairs`` and write it to ``out_dir`` (peft format plus ``personalize.json``); the
    method is the one ``settings`` configure (``LoraSettings``: LoRA, ``IA3Settings``: IA3, ...).

    ``progress(fraction_done, loss)`` is called after each step; ``should_stop()`` is asked before each step and,
    when true, ends training with ``TrainingCancelled``. ``out_dir`` must not exist; it appears only complete.
    ``owner`` (the user's hash-derived key, never the raw id) is stamped into the metadata so serving can check
    that an adapter answers only for the user it was trained for. ``extra`` is merged into the metadata (a task
    adapter's provenance, the task adapter a user adapter was trained on).
    """
    import torch

    settings = settings or LoraSettings()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise AdapterExistsError(out_dir)
    limit = min(settings.max_length, loaded.context_length)
    examples = [e for e in (encode_pair(loaded, p, o, limit) for p, o in pairs) if e is not None]
    if not examples:
        raise InvalidInputError("no training pairs: the user needs items with a label or with at least a few words")
    pad_id = loaded.pad_id

    per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = settings.epochs * per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    total = min(total, token_capped_steps(examples, settings))
    losses: list[float] = []
    step_tokens: list[int] = []
    trainer, note = _trainer(loaded, settings)
    precision = training_precision(settings.precision)[0]  # probed under auto; every step runs both
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16" and trainer.autocast)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeds LoRA init and dropout without touching the caller's RNG
        torch.manual_seed(settings.seed)
        shuffle = torch.Generator().manual_seed(settings.seed)
        model, step_loss = trainer.prepare(loaded, _lora_config(loaded, settings), precision)
        model.train()
        keep_logits = "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        while len(losses) < total:
            order = torch.randperm(len(examples), generator=shuffle).tolist()
            if settings.group_by_length:
                order = group_by_length(order, [len(e.input_ids) for e in examples], settings.batch_size, shuffle)
            for first in range(0, len(order), settings.batch_size):
                if len(losses) >= total:
                    break
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(f"training stopped after {len(losses)} of {total} steps")
                batch, n = _collate(
                    [examples[i] for i in order[first : first + settings.batch_size]],
                    pad_id,
                    loaded.is_encoder_decoder,
                )
                with autocast:
                    if step_loss is not None:
                        loss = step_loss(batch)
                    else:
                        loss = _loss(model, batch, loaded.is_encoder_decoder, keep_logits)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                step_tokens.append(n)
                if progress is not None:
                    progress(len(losses) / total, losses[-1])
    train_seconds = time.perf_counter() - start
    n_tokens = sum(step_tokens)
    trainable_params = sum(p.numel() for p in params)
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"training stopped after all {total} steps, before the adapter was written")
    model.eval()
    final_loss = sum(losses[-per_epoch:]) / len(losses[-per_epoch:])
    config = settings.model_dump()
    metadata = {
        "format": METADATA_FORMAT,
        "base_model": loaded.name,
        "method": method_for_settings(settings).name,
        "n_pairs": len(examples),
        "n_tokens": n_tokens,
        "steps": len(losses),
        "trainable_params": trainable_params,
        "final_loss": final_loss,
        "train_seconds": train_seconds,
        "seed": settings.seed,
        "trainer": trainer.name,
        "trainer_note": note,  # why the step asked for did not run it (None when it did)
        "precision": precision,
        "owner": owner,
        "config": config,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    _write_atomically(model, out_dir, metadata)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return TrainResult(
        out_dir,
        len(examples),
        n_tokens,
        len(losses),
        train_seconds,
        final_loss,
        size,
        config,
        losses,
        step_tokens,
        trainer.name,
        note,
        precision,
        trainable_params,
    )


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int, generator: Any) -> list[int]:
    """``order`` with similar lengths side by side: each window of 16 batches is sorted by length and cut into
    batches, and the batches are shuffled. A left-padded batch costs its longest row times its size, so mixing a
    60-token pair with a 600-token one wastes most of the step; the shuffle keeps the steps' order random."""
    import torch

    window = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def token_capped_steps(examples: Sequence[_Example], settings: AdapterTrainingSettings) -> int:
    """Steps that keep the tokens seen (all epochs together) within ``settings.max_tokens``, at least one: the
    per-user budget grows with the user's data (epochs over every item) up to this cap."""
    if settings.max_tokens is None or not examples:
        return 2**31
    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    return max(1, int(settings.max_tokens // (mean * settings.batch_size)))


def _plain_step(loaded: LoadedModel, peft_config: Any, precision: str) -> tuple[Any, None]:
    """peft's own forward on a private copy of the base (the caller's model never gains LoRA layers); bf16 comes
    from the autocast the step runs under."""
    from peft import get_peft_model

    return get_peft_model(private_base_copy(loaded.model), peft_config), None


PLAIN_TRAINER = register_trainer(Trainer("plain", lambda loaded, settings: None, _plain_step))


def _trainer(loaded: LoadedModel, settings: AdapterTrainingSettings) -> tuple[Trainer, str | None]:
    """Which training step runs (the registry's ``settings.trainer``): the one asked for where the method is
    registered with ``fast_training`` and the step covers the model, else ``plain``, with why."""
    if settings.trainer == PLAIN_TRAINER.name:
        return PLAIN_TRAINER, None
    import personalize.cpu.fasttrain  # noqa: F401  (registers the fast step)

    chosen = get_trainer(settings.trainer)
    method = method_for_settings(settings)
    reason = unsupported_peft_type_reason(method.peft_type, "fast_training", f"the {chosen.name} training step")
    reason = reason or chosen.unsupported_reason(loaded, settings)
    if reason:
        return PLAIN_TRAINER, f"{chosen.name} training step not applicable: {reason}"
    return chosen, None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(model: Any, out_dir: Path, metadata: dict[str, Any]) -> None:
    """Save into a temporary folder beside ``out_dir``, metadata last, fsync, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        (tmp / ADAPTER_METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8")
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(tmp)
        if out_dir.exists():
            raise AdapterExistsError(out_dir)
        os.rename(tmp, out_dir)
        _fsync(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "ADAPTER_METADATA",
    "AdapterExistsError",
    "LoraSettings",
    "Pair",
    "TrainResult",
    "TrainingCancelled",
    "encode_pair",
    "item_pair",
    "most_recent",
    "private_base_copy",
    "read_metadata",
    "strip_tuner_layers",
    "train_adapter",
    "training_pairs",
]
