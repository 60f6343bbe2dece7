"""Host memory policy of a CPU training process.

A TTT step allocates and frees a few GB of activations and temporaries, mostly in blocks of 1-65 MB.
glibc's malloc handles that pattern badly either way:

* blocks it serves with ``mmap`` go back to the OS when freed, so every new one is page-faulted in
  again (measured: ~630k faults and ~1 s of a 7 s step, Llama draft, vocab 32000, 2 cores);
* blocks it keeps in its heap (its default raises the mmap threshold up to 32 MiB after such frees)
  fragment it: peak RSS grows by about one step's activations (~200 MB on the same step).

tcmalloc (gperftools) keeps freed blocks for reuse and fragments little: no faults after the first
step, ~10% off the step, at a peak RSS 3-5% above the mmap policy's (measured with
``benchmarks/bench_vs_reference.py``). So a CPU training process starts itself again with
tcmalloc preloaded when the system has it (:func:`relaunch_with_tcmalloc`; torch's own CPU launcher,
``torch.backends.xeon.run_cpu``, preloads it by default too). ``TORCHSPEC_HOST_ALLOCATOR=system``
keeps glibc. Without tcmalloc, glibc's mmap threshold is pinned (:func:`pin_malloc_mmap_threshold`)
so that peak RSS stays that of the live tensors. The model library never does either: both are
process-wide, and the trainer owns the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "ALLOCATOR_ENV",
    "find_tcmalloc",
    "loaded_allocator",
    "pin_malloc_mmap_threshold",
    "relaunch_with_tcmalloc",
    "tcmalloc_environment",
]

_M_MMAP_THRESHOLD = -3  # from <malloc.h>
ALLOCATOR_ENV = "TORCHSPEC_HOST_ALLOCATOR"  # "tcmalloc" (the default: used when found) or "system"
_RELAUNCHED_ENV = "TORCHSPEC_HOST_ALLOCATOR_RELAUNCHED"  # set in the relaunched process: never twice
_TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")


def pin_malloc_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with mmap. Returns False where malloc is
    not glibc's (another C library, or tcmalloc/jemalloc preloaded): nothing changes then."""
    if loaded_allocator() != "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def find_tcmalloc(environ: Mapping[str, str] | None = None) -> str | None:
    """A tcmalloc shared library for ``LD_PRELOAD``: the Python environment's own (conda's
    gperftools, as a path), then the system's (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``,
    as its soname). None if there is none."""
    environ = os.environ if environ is None else environ
    prefixes = [environ.get("CONDA_PREFIX"), sys.prefix, sys.base_prefix]
    for prefix in filter(None, prefixes):
        for name in _TCMALLOC_NAMES:
            if (Path(prefix) / "lib" / name).is_file():
                return str(Path(prefix) / "lib" / name)
    for stem in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(stem)  # a soname from the linker's cache, which LD_PRELOAD accepts
        if found:
            return found
    return None


def loaded_allocator() -> str:
    """``"tcmalloc"``, ``"jemalloc"`` or ``"system"``: the malloc this process runs with."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def tcmalloc_environment(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment a process should start with to run on tcmalloc, or None when it should not
    (``TORCHSPEC_HOST_ALLOCATOR=system``, not Linux, no tcmalloc found, or already preloaded)."""
    environ = dict(os.environ if environ is None else environ)
    if _allocator_choice(environ) == "system" or not sys.platform.startswith("linux"):
        return None
    preloaded = [entry for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split() if entry]
    if any("tcmalloc" in Path(entry).name for entry in preloaded):
        return None
    library = find_tcmalloc(environ)
    if library is None:
        return None
    environ["LD_PRELOAD"] = " ".join([library, *preloaded])
    return environ


def _allocator_choice(environ: Mapping[str, str]) -> str:
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        from torchspec.draft_models.errors import UserInputError

        raise UserInputError(f"{ALLOCATOR_ENV}={choice!r}; use tcmalloc (the default) or system")
    return choice


def relaunch_with_tcmalloc() -> None:
    """Replace this process (same pid, arguments and environment, so ``torchrun`` keeps tracking
    it) by one with tcmalloc preloaded, when :func:`tcmalloc_environment` says so. Call it early in
    a command's ``main``, before anything is written. Does nothing when the process already runs
    on tcmalloc or jemalloc, or was relaunched once already. An unknown
    ``TORCHSPEC_HOST_ALLOCATOR`` is a :class:`UserInputError` in every case."""
    _allocator_choice(os.environ)
    if loaded_allocator() != "system" or os.environ.get(_RELAUNCHED_ENV):
        return
    environ = tcmalloc_environment()
    if environ is None:
        return
    environ[_RELAUNCHED_ENV] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
