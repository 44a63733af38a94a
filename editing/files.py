"""Writing cache and result files so that a killed run never leaves a half-written one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: a reader sees
    the whole file under the real name or nothing. The temporary name is the writer's own, so
    that replicas filling one shared cache at once each rename a whole file (the last wins)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
