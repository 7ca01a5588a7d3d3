"""peft's adapter files as the fast decoder's readers open them: one place for their names and for the refusal of a
folder they cannot read (``DirectReadUnsupported``, so the caller falls back to peft's own load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personalize.errors import DirectReadUnsupported

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's save_pretrained files
ADAPTER_CONFIG = "adapter_config.json"


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_config.json`` as a dict."""
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DirectReadUnsupported(f"no readable {ADAPTER_CONFIG} ({type(exc).__name__})") from exc
    if not isinstance(config, dict):
        raise DirectReadUnsupported(f"{ADAPTER_CONFIG} is not an object")
    return config


def read_adapter_tensors(folder: Path) -> dict[str, Any]:
    """The folder's ``adapter_model.safetensors`` tensors by key."""
    from safetensors.torch import load_file

    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise DirectReadUnsupported(f"no {ADAPTER_WEIGHTS}")
    return load_file(str(weights))


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "read_adapter_config", "read_adapter_tensors"]
