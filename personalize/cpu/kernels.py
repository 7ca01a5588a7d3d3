"""Small C kernels built at first use with the machine's own C compiler, cached per machine, called through ctypes.

Why: a few hot loops (8-bit matrix-vector products, a whole decoding step, the elementwise parts of a training step)
run several times faster in one C pass than as a chain of torch ops. Each kernel is one source file in ``csrc/``,
compiled with ``-O3 -march=native -fopenmp`` against the OpenMP runtime torch already loaded (so both share one
thread pool), cached under ``~/.cache/personalize/cpu/kernels`` keyed by source, flags, compiler and CPU, and renamed
into place so a half-written library is never loaded. ctypes releases the GIL during each call. Without a compiler
(or on another platform) ``unavailable_reason`` says why, and every caller has a torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "personalize" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (a cache shared by two machines must not mix them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def build(source_path: Path, compiler: str) -> Path:
    """Compile ``source_path`` once per (source, flags, compiler, CPU); the .so appears atomically (rename)."""
    source = source_path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()]))
    target = cache_dir() / f"{source_path.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(source_path), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class KernelLibrary:
    """One ``csrc/`` source file as a ctypes library: built and loaded on first use, or the reason it cannot be."""

    def __init__(self, source: str, what: str, declare: Callable[[ctypes.CDLL], None]) -> None:
        self.source = CSRC / source
        self.what = what  # how error messages name it: "the weight-only kernel"
        self.declare = declare  # sets argtypes/restype of every function the library exports
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        """The library, built on first use; None (and ``error`` set) when it cannot be built here."""
        with self._lock:
            if self.lib is not None or self.error is not None:
                return self.lib
            import torch  # noqa: F401  (loads torch's OpenMP runtime first, so the kernel shares its thread pool)

            if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
                self.error = f"{self.what} is built for Linux on x86-64 or arm64, not {sys.platform}"
                return None
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if compiler is None:
                self.error = f"no C compiler (cc or gcc) to build {self.what}"
                return None
            try:
                lib = ctypes.CDLL(str(build(self.source, compiler)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                self.error = f"{self.what} did not build: {exc}"
                return None
            self.declare(lib)
            self.lib = lib
            return lib

    def unavailable_reason(self) -> str | None:
        """Why the library cannot run here (None when it can); builds it on first call."""
        self.load()
        return self.error

    def require(self) -> ctypes.CDLL:
        lib = self.load()
        if lib is None:
            raise RuntimeError(self.error or f"{self.what} is unavailable")
        return lib
