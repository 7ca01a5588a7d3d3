"""Where adapters live on disk, behind a small interface.

``LocalAdapterStore`` keeps ``{root}/{user_key}/v{version}`` folders in peft's own format (``adapter_config.json``,
``adapter_model.safetensors``) plus ``personalize.json``, so LoRAX or vLLM can serve them unchanged. Point ``root``
at a shared mount (NFS, EFS, a CSI volume) for several machines: a folder appears there only by an atomic rename,
after it is complete, so a reader on another machine never loads a half-written adapter.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Protocol

from personalize.adapters.format import read_metadata
from personalize.data.naming import user_dir
from personalize.errors import AdapterOwnershipError
from personalize.jobs.process_ids import local_pid_alive

TEMP_MARK = ".tmp-"


def temp_prefix(name: str) -> str:
    """``.v0001.tmp-{host}-{pid}-``: a save's temporary folder names the process writing it, so a clean-up can tell
    a crashed save (its process is gone) from one still under way."""
    return f".{name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-"


def _temp_writer(name: str) -> str | None:
    """``host:pid`` of the process that made a temporary folder, or None for a name without them (older saves)."""
    _, mark, rest = name.partition(TEMP_MARK)
    parts = rest.rsplit("-", 2) if mark else []
    return f"{parts[0]}:{parts[1]}" if len(parts) == 3 and parts[1].isdigit() else None


class AdapterStore(Protocol):
    root: Path

    def path_for(self, user_id: str, version: int) -> Path: ...

    def remove_stale_temp(self, older_than_s: float, user_id: str | None = None) -> list[str]: ...

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

    def remove_stale_temp(self, older_than_s: float, user_id: str | None = None) -> list[str]:
        """Remove temporary folders of saves that will never finish (a worker killed mid-save): those whose writer
        process on this host is gone, and any older than ``older_than_s`` (writers on other hosts, older names)."""
        if user_id is not None:
            base, pattern = self.user_root(user_id), f".v*{TEMP_MARK}*"
        else:
            base, pattern = self.root, f"*/.v*{TEMP_MARK}*"
        removed: list[str] = []
        for folder in base.glob(pattern):
            alive = local_pid_alive(_temp_writer(folder.name))
            try:
                old = time.time() - folder.stat().st_mtime > older_than_s
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            if folder.is_dir() and (alive is False or (alive is None and old)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(str(folder))
        return removed

    def delete_user(self, user_id: str) -> list[str]:
        folder = self.user_root(user_id)
        if not folder.exists():
            return []
        shutil.rmtree(folder)
        return [str(folder)]


def owned_adapter(path: Path, owner_key: str, what: str = "the adapter") -> bool:
    """Whether the folder holds a complete adapter that is ``owner_key``'s (or stamped for nobody); raises
    ``AdapterOwnershipError`` for one stamped for another user: a mixed-up row or a copied folder on a shared
    store must never answer for the wrong person."""
    metadata = read_metadata(path)
    if metadata is None:
        return False
    owner = metadata.get("owner")
    if owner is not None and owner != owner_key:
        raise AdapterOwnershipError(f"{what} at {path} was trained for another user ({owner}); refusing to serve it")
    return True
