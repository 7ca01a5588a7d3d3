"""Retrievers over one user's items: dense (Chroma + MiniLM), BM25 (LaMP's baseline) and recency.

``base`` holds the ``Retriever`` protocol and the ``RETRIEVERS`` registry; each retriever is one module here that
registers itself, and importing this package registers all of them. A new retriever is one more module (a class
with ``name``, ``search`` and, if it keeps per-user state, ``forget``) plus its ``register_retriever`` call, imported
below (or anywhere before use: the registry is read at use time).
"""

from __future__ import annotations

from personalize.retrieval.base import (
    RETRIEVERS,
    ForgetsUsers,
    RetrievedItem,
    Retriever,
    RetrieverContext,
    RetrieverSpec,
    check_retriever,
    get_retriever_spec,
    register_retriever,
    retriever_names,
    unregister_retriever,
)

# isort: off
# registration order is the order retrievers are listed in (dense, the default, first)
from personalize.retrieval.dense import DenseRetriever
from personalize.retrieval.bm25 import BM25Index, BM25Retriever, tokenize
from personalize.retrieval.recency import RecencyRetriever
from personalize.retrieval.rerank import LikelihoodReranker

# isort: on

BUILTIN_RETRIEVERS = ("dense", "bm25", "recency")
RETRIEVER_NAMES = BUILTIN_RETRIEVERS  # the built-in names, as before the registry; ``retriever_names()`` is live

__all__ = [
    "BUILTIN_RETRIEVERS",
    "LikelihoodReranker",
    "RETRIEVERS",
    "RETRIEVER_NAMES",
    "BM25Index",
    "BM25Retriever",
    "DenseRetriever",
    "ForgetsUsers",
    "RecencyRetriever",
    "RetrievedItem",
    "Retriever",
    "RetrieverContext",
    "RetrieverSpec",
    "check_retriever",
    "get_retriever_spec",
    "register_retriever",
    "retriever_names",
    "tokenize",
    "unregister_retriever",
]
