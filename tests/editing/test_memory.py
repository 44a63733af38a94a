"""Freed matrices are reused, not made again of fresh pages, once an editor's process has asked
glibc to keep freed memory (``editing.memory``). It runs in a process of its own: the setting
lasts for the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# What an update does to memory: 1536 x 1536 float64 matrices (19 MB) made, used and freed, a few
# at a time. First with glibc made to map each such block on its own and give it back when freed
# (its starting thresholds, held fixed), then after ``retain_freed_memory``, warmed up. Prints
# whether the setting took and the page faults per matrix of each.
_UPDATES = """
import ctypes, ctypes.util, resource, torch
from editing.memory import retain_freed_memory
mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def update():
    a = torch.ones(1536, 1536, dtype=torch.float64)
    b = a * 2.0
    return float((a + b)[0, 0])
def per_matrix():
    before = faults()
    for _ in range(20):
        update()
    return (faults() - before) / 60
returned = per_matrix()
took = retain_freed_memory()
for _ in range(10):
    update()
print(took, returned, per_matrix())
"""


def test_retained_memory_makes_no_fresh_pages_for_each_matrix() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _UPDATES],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    took, returned, kept = done.stdout.split()
    assert took == "True"
    # Given back, every matrix faults in its 4,608 fresh pages; kept, it is reused as it is.
    assert float(returned) > 4000
    assert float(kept) * 20 < float(returned)
