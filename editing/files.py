"""Writing cache and result files so that a killed run never leaves a half-written one."""

from __future__ import annotations

from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a ``.partial`` file renamed into place: a reader sees
    the whole file under the real name or nothing."""
    tmp = path.with_suffix(".partial")
    tmp.write_bytes(data)
    tmp.rename(path)
