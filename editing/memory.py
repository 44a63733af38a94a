"""How much freed memory the C allocator keeps for reuse, which decides what an update costs.

Every D4S update allocates a few dozen float64 matrices of 1536 x 1536 (19 MB): the groups'
products, the system, its factor. PyTorch takes CPU memory from the C library's ``malloc``, and
glibc's gives a freed block this large back to the kernel at once (``munmap``, or a trim of the
heap once its free top passes 32 MB at most), so the next matrix is made of fresh pages: one page
fault each 4 KB, about 4,700 for one matrix, and in a virtual machine each costs more than the
arithmetic on its page. Keeping the freed blocks lets the next update reuse pages already
mapped; the price is that resident memory may stay up to ``RETAINED_BYTES`` higher after a
peak.

``retain_freed_memory`` sets both glibc thresholds (``mallopt``); the environment variables
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` do the same before a process starts.
Elsewhere (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: Freed memory the allocator keeps (bytes): room for an update's transient matrices.
RETAINED_BYTES = 256 << 20

#: Blocks from this size up are mapped on their own and given back when freed: the most glibc's
#: own adaptive threshold reaches on 64-bit hosts, above the update's matrices (19 MB for
#: SmolLM2) and below the model's largest (the embedding).
MMAP_THRESHOLD_BYTES = 32 << 20

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(
    retained: int = RETAINED_BYTES, mmap_threshold: int = MMAP_THRESHOLD_BYTES
) -> bool:
    """Make glibc keep up to ``retained`` bytes freed at the top of its heaps, and serve blocks
    under ``mmap_threshold`` from them, for the rest of the process. Whether it took effect."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library, no search for it
    except (OSError, AttributeError):
        log.info("no glibc mallopt here: freed memory is kept as the allocator decides")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, retained)
    )
