"""The C heap under a node: large blocks in mappings of their own, and a trim after each seal.

Why a node sets its allocator at all: under key churn (a new key, and an eviction, per request)
CPython rebuilds each of the node's 100,000-key dicts every few tens of seconds -- the bucket
table (an ``OrderedDict``), its change-order dict, a replica's own-count dict.  A deleted entry
leaves a dummy behind, and a dict whose entry array is full of them is compacted into a fresh
table: 2**19 slots, about 7.3 MiB (the ``OrderedDict`` adds a 4 MiB node array), allocated while
the old one is still alive and then the old one freed.  glibc first serves such a block with
``mmap``, but the first ``free`` of a mapped block raises its mmap threshold to that block's size
(the dynamic threshold, up to 32 MiB): from then on the tables come from the heap, where a freed
one stays as free memory -- small allocations split it, so the next rebuild takes fresh pages --
until a ``malloc_trim``.  The node's RSS stepped up 7-15 MB between two seals and fell back at
each seal's trim: the 14-21 MB swings of the 30-minute soak, with no growth (see docs/audit.md).

A fixed threshold (:data:`MMAP_THRESHOLD`) turns the dynamic one off: every block of that size or
more gets its own mapping and goes back to the system at its ``free``, so a rebuild costs RSS only
while it runs (and ~2,000 page faults, a few ms every ~30 s).  Nothing here is needed for
correctness: where the C library is not glibc the functions do nothing and say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

__all__ = ["MMAP_THRESHOLD", "pin_mmap_threshold", "release_memory"]

MMAP_THRESHOLD = 256 * 1024  # bytes: blocks this large or larger are mapped on their own
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _libc()


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (which also fixes its trim threshold at the default
    128 KiB instead of twice the dynamic mmap threshold).  Returns whether it was applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(nbytes)))


def release_memory() -> None:
    """Give the C heap's free memory back to the system (after a seal).

    A seal allocates a few MB of buffers (blocks, compressed members, the checkpoint) in a worker
    thread, whose arena glibc trims only from its top; ``malloc_trim`` also returns free pages in
    the middle of every arena.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
