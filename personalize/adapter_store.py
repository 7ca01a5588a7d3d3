"""Where adapters live on disk, behind a small interface.

``LocalAdapterStore`` keeps ``{root}/{user_key}/v{version}`` folders in peft's own format (``adapter_config.json``,
``adapter_model.safetensors``) plus ``personalize.json``, so LoRAX or vLLM can serve them unchanged. Point ``root``
at a shared mount (NFS, EFS, a CSI volume) for several machines: a folder appears there only by an atomic rename,
after it is complete, so a reader on another machine never loads a half-written adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from personalize.naming import user_dir


class AdapterStore(Protocol):
    root: Path

    def path_for(self, user_id: str, version: int) -> Path: ...

    def delete_user(self, user_id: str) -> list[str]: ...


class LocalAdapterStore:
    """Adapters in a folder tree (local disk or a shared mount)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def user_root(self, user_id: str) -> Path:
        return user_dir(self.root, user_id)

    def path_for(self, user_id: str, version: int) -> Path:
        if version < 1:
            raise ValueError(f"adapter versions start at 1, got {version}")
        return self.user_root(user_id) / f"v{version:04d}"

    def discard_incomplete(self, path: Path) -> None:
        """Remove a folder left by a crashed attempt (never registered in SQL) before training into it again."""
        path = Path(path).resolve()
        if path.parent.parent == self.root and path.exists():
            shutil.rmtree(path)

    def delete_user(self, user_id: str) -> list[str]:
        folder = self.user_root(user_id)
        if not folder.exists():
            return []
        shutil.rmtree(folder)
        return [str(folder)]
