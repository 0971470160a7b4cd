"""Host-memory reuse for XLA:CPU runs (glibc ``mallopt``), opt-in: :func:`reuse_freed_memory`.

XLA:CPU allocates each program's temporaries afresh on every call, from its worker threads. glibc serves
a block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and returns it with ``munmap``
when freed, and a worker thread's block over 64 MiB (its heap's size) is an ``mmap`` whatever the
settings, so every call page-faults its temporaries in again (zeroed by the kernel, 4 KiB at a time).
On the 2-core CI VM a 7.4M-parameter train step (245 MiB of temporaries) took ~60,000 page faults per
step, and a 256x256 VQ-VAE encode ~12,000 per call.

:func:`reuse_freed_memory` makes every thread allocate from the one main heap (``M_ARENA_MAX`` 1),
never by ``mmap`` (``M_MMAP_MAX`` 0), and keeps freed heap memory instead of returning it to the
system (``M_TRIM_THRESHOLD`` 2 GiB): after a few calls the temporaries land in pages the process
already holds, and no page faults remain. The process's resident memory then stays near its peak.
``benchmarks/host_memory.py`` measures the effect. Opt-in, and nothing in the library calls it: memory
freed is kept, so a process whose large blocks come and go at different sizes peaks higher (loading a
7B-shaped checkpoint with ``quantize="int8"`` peaked at 5.48 GiB instead of 4.19).
"""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
_applied = False


def _backend_started() -> bool:
    """Whether a JAX backend (and so XLA's worker threads, each already tied to its own heap) exists."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def reuse_freed_memory() -> bool:
    """Set glibc's allocator so XLA:CPU reuses freed memory instead of page-faulting fresh memory on
    every call (see the module docstring). Call it before the first JAX computation: threads that have
    already allocated keep their own heaps, so a later call would change nothing but the trimming,
    and is refused. Returns True when the settings are in effect (now or from an earlier call), False
    where they cannot be made (not glibc, or JAX already started). Process-wide; no undo."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or _backend_started():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the allocator the process links (glibc's or another libc's)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # glibc returns 1 on success; musl's mallopt is a stub returning 0
    _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
    return _applied
