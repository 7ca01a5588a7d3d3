"""LaMP-style RAG prompts inside a token budget, and fitting the whole prompt into the model's context.

Budget (LaMP, LAMP.md section 4): the input reserves at most ``input_share`` of ``token_budget``; the rest is shared
across the k items in rank order, and what one item leaves unused passes to the next. An item longer than its share
has its long field cut. Then, if the chat-formatted prompt plus ``max_new_tokens`` still exceeds the model's context,
retrieved items are dropped first (lowest ranked first) and only then is the prompt cut from the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from personalize.errors import InvalidInputError
from personalize.retrieval import RetrievedItem
from personalize.serving.modeling import LoadedModel
from personalize.tasks.registry import Task


@dataclass
class BuiltPrompt:
    text: str
    input_ids: list[int]
    used: list[RetrievedItem]
    notes: list[str] = field(default_factory=list)
    truncated: bool = False


def count_tokens(loaded: LoadedModel, text: str) -> int:
    return len(loaded.tokenizer(text, add_special_tokens=False).input_ids)


def _cut_tokens(loaded: LoadedModel, text: str, max_tokens: int, from_left: bool = False) -> str:
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    kept = ids[len(ids) - max_tokens :] if from_left else ids[:max_tokens]
    return loaded.tokenizer.decode(kept, skip_special_tokens=True)


_TOKEN_CHARS: dict[int, tuple[Any, int]] = {}  # id(tokenizer) -> (tokenizer, bound); the ref keeps the id unique


def max_token_chars(loaded: LoadedModel) -> int:
    """An upper bound on the characters one token covers: the longest vocabulary entry (a byte-level entry is at
    least as long as the text it stands for), at least 16. ``share`` tokens never need more than ``share`` times it."""
    tok = loaded.tokenizer
    cached = _TOKEN_CHARS.get(id(tok))
    if cached is None:
        longest = max((len(t) for t in tok.get_vocab()), default=0)
        cached = _TOKEN_CHARS[id(tok)] = (tok, max(16, longest))
    return cached[1]


def clip_values(values: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """Each string value cut to ``max_chars`` characters before anything tokenizes it: an item is cut to its token
    share anyway, and tokenizing a whole 50 MB item for a 100-token share took minutes and gigabytes."""
    return {k: v[:max_chars] if isinstance(v, str) and len(v) > max_chars else v for k, v in values.items()}


def encode(loaded: LoadedModel, text: str) -> list[int]:
    """Token ids fed to the model: the chat template for chat models, the plain tokenizer otherwise."""
    tok = loaded.tokenizer
    if loaded.uses_chat_template:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return list(tok(chat, add_special_tokens=False).input_ids)
    return list(tok(text).input_ids)


def render_items(
    loaded: LoadedModel, task: Task, retrieved: Sequence[RetrievedItem], item_budget: int
) -> list[tuple[RetrievedItem, str]]:
    """Render items in rank order, each inside its share of what is left of ``item_budget``."""
    out: list[tuple[RetrievedItem, str]] = []
    remaining = item_budget
    for position, hit in enumerate(retrieved):
        share = remaining // (len(retrieved) - position)
        values = clip_values(task.item_values(hit.item), (share + 1) * max_token_chars(loaded))
        rendered = task.render_item(values)
        n = count_tokens(loaded, rendered)
        if n > share:
            overhead = count_tokens(loaded, task.render_item({**values, task.trunc_field: ""}))
            room = share - overhead
            if room <= 0:
                continue  # this item cannot fit its share; its budget passes on
            values[task.trunc_field] = _cut_tokens(loaded, str(values.get(task.trunc_field, "")), room)
            rendered = task.render_item(values)
            n = count_tokens(loaded, rendered)
        remaining -= n
        out.append((hit, rendered))
    return out


def build_prompt(
    loaded: LoadedModel,
    task: Task,
    prompt: str,
    retrieved: Sequence[RetrievedItem],
    token_budget: int,
    input_share: float,
    max_new_tokens: int,
) -> BuiltPrompt:
    notes: list[str] = []
    n_input = count_tokens(loaded, prompt)
    item_budget = token_budget - min(n_input, int(input_share * token_budget))
    rendered = render_items(loaded, task, retrieved, item_budget) if retrieved else []
    if len(rendered) < len(retrieved):
        notes.append(f"{len(retrieved) - len(rendered)} retrieved item(s) did not fit the token budget")

    limit = loaded.context_length - (0 if loaded.is_encoder_decoder else max_new_tokens)
    text = task.build_prompt(prompt, [r for _, r in rendered])
    ids = encode(loaded, text)
    truncated = False
    n_found = len(rendered)
    while len(ids) > limit and rendered:  # cut the retrieved context first, lowest-ranked item first
        rendered.pop()
        text = task.build_prompt(prompt, [r for _, r in rendered])
        ids = encode(loaded, text)
        truncated = True
    if truncated:
        notes.append(
            f"retrieved context cut to fit the model's context of {loaded.context_length} tokens: "
            f"kept {len(rendered)} of {n_found} item(s)"
        )
    if len(ids) > limit:  # then cut the prompt from the left, keeping its end (where the question usually is)
        overhead = len(ids) - n_input
        room = limit - overhead
        if room <= 0:
            raise InvalidInputError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of "
                f"{loaded.context_length} tokens; lower max_new_tokens"
            )
        cut = prompt
        for _ in range(4):  # decoding and re-encoding can shift token boundaries by a few tokens
            cut = _cut_tokens(loaded, cut, room, from_left=True)
            text = cut
            ids = encode(loaded, text)
            if len(ids) <= limit:
                break
            room -= len(ids) - limit
        ids = ids[len(ids) - limit :] if len(ids) > limit else ids
        truncated = True
        notes.append(
            f"prompt cut from the left to fit the model's context: kept the last {count_tokens(loaded, text)} "
            f"of {n_input} tokens"
        )
    return BuiltPrompt(text, ids, [hit for hit, _ in rendered], notes, truncated)
