"""The built-in serving backends (importing this registers them), and the one a client's settings choose."""

from __future__ import annotations

from typing import TYPE_CHECKING

import personalize.serving.fast_backend  # noqa: F401  (registers fast, fast-fp32)
import personalize.serving.hf_backend  # noqa: F401  (registers plain)
import personalize.serving.vllm_backend  # noqa: F401  (registers vllm)
from personalize.serving.backend import ServingBackend, get_backend_factory
from personalize.serving.hf_backend import HFBackend

if TYPE_CHECKING:
    from personalize.settings import Settings


def backend_for(settings: Settings, plain: HFBackend) -> ServingBackend:
    """The backend registered for ``settings.decoder``, sharing the client's ``plain`` backend."""
    return get_backend_factory(settings.decoder)(settings, plain)


__all__ = ["backend_for"]
