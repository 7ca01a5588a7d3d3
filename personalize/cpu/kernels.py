"""Small C kernels built at first use with the machine's own C compiler, cached per machine, called through ctypes.

Why: a few hot loops (8-bit matrix-vector products, a whole decoding step, the elementwise parts of a training step)
run several times faster in one C pass than as a chain of torch ops. Each kernel is one source file in ``csrc/``,
compiled with ``-O3 -fopenmp`` against the OpenMP runtime torch already loaded (so both share one thread pool).

Our machines differ (some have AVX-512, some AVX2 only), so each kernel is built for an instruction-set level picked
at run time from the CPU's flags: ``avx512`` (x86-64-v4: AVX-512 F/BW/DQ/VL, the loops vectorised 16 wide),
``avx2`` (x86-64-v3: the AVX2/FMA intrinsics of the sources) or ``scalar`` (baseline x86-64: the plain C paths);
``PERSONALIZE_KERNEL_ISA`` forces a lower level, and the tests run every level the CPU can against torch. Builds are
cached under ``~/.cache/personalize/kernels`` keyed by source, flags and compiler, and renamed into place so a
half-written library is never loaded. ctypes releases the GIL during each call. Without a compiler
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
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11")
# instruction-set levels, best first: the compiler flags of each and the CPU flags it needs
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("-march=x86-64-v4", "-mtune=native"),
    "avx2": ("-march=x86-64-v3", "-mtune=native"),
    "scalar": ("-march=x86-64", "-mtune=native"),
}
ISA_NEEDS: dict[str, frozenset[str]] = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"}),
    "avx2": frozenset({"avx2", "fma", "bmi2", "f16c"}),
    "scalar": frozenset(),
}
NATIVE = "native"  # not x86-64 (arm64): the compiler's own choice for this CPU


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas() -> list[str]:
    """The instruction-set levels this CPU runs, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [NATIVE]
    flags = cpu_flags()
    return [isa for isa, needs in ISA_NEEDS.items() if needs <= flags]


def chosen_isa() -> str:
    """The best level the CPU runs, or ``PERSONALIZE_KERNEL_ISA`` when it names one the CPU runs."""
    supported = supported_isas()
    wanted = os.environ.get("PERSONALIZE_KERNEL_ISA")
    if wanted and wanted not in supported:
        raise RuntimeError(f"PERSONALIZE_KERNEL_ISA={wanted!r}: this CPU runs {', '.join(supported)}")
    return wanted or supported[0]


def isa_flags(isa: str) -> tuple[str, ...]:
    return ("-march=native",) if isa == NATIVE else ISA_FLAGS[isa]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "personalize" / "kernels"


def build(source_path: Path, compiler: str, isa: str) -> Path:
    """Compile ``source_path`` once per (source, flags, compiler, level); the .so appears atomically (rename)."""
    source = source_path.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = (*FLAGS, *isa_flags(isa))
    tuned = platform.processor() or platform.machine()  # -mtune=native: same code, scheduled for this CPU
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), tuned.encode()]))
    target = cache_dir() / f"{source_path.stem}-{isa}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, str(source_path), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
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

    def __init__(self, source: str, what: str, declare: Callable[[ctypes.CDLL], None], isa: str | None = None) -> None:
        self.source = CSRC / source
        self.isa = isa  # None: ``chosen_isa()`` at first load
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
                self.isa = self.isa or chosen_isa()
                lib = ctypes.CDLL(str(build(self.source, compiler, self.isa)))
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
