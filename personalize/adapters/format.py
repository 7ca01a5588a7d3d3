"""The on-disk format of an adapter folder: peft's own files, plus ``personalize.json`` written last.

A folder holding ``personalize.json`` is a complete adapter (training writes into a temporary folder and renames it
into place). A leaf module: serving, training, the consistency check and the error messages all read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_METADATA = "personalize.json"  # written last: a folder holding it is a complete adapter
METADATA_FORMAT = 1


def read_metadata(path: Path) -> dict[str, Any] | None:
    """An adapter folder's ``personalize.json``, or None when the folder is not a complete adapter."""
    try:
        return json.loads((Path(path) / ADAPTER_METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = ["ADAPTER_METADATA", "METADATA_FORMAT", "read_metadata"]
