"""How much freed memory the C allocator keeps for reuse, which decides what an update costs.

Every D4S update allocates a few dozen float64 matrices of 1536 x 1536 (19 MB): the groups'
products, the system, its factor. PyTorch takes CPU memory from the C library's ``malloc``, and
glibc's gives a freed block this large back to the kernel at once (``munmap``, or a trim of the
heap once its free top passes 32 MB at most), so the next matrix is made of fresh pages: one page
fault each 4 KB, about 4,700 for one matrix, which in a virtual machine cost more than the
arithmetic that fills it. A revert's plan with 1,000 edits active took 0.69 s that way on a
2-core EPYC, 0.44 s with the allocator keeping 256 MB (``bench/results``, the README's speed
study); the process's resident memory stays that much higher after a peak instead of falling.

``retain_freed_memory`` sets both glibc thresholds (``mallopt``); the environment variables
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` do the same before a process starts.
Elsewhere (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no glibc mallopt here: freed memory is kept as the allocator decides")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, retained)
    )
