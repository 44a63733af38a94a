"""What the server benchmarks share: an ``editserve serve`` process of their own, and waiting
for its edits."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

# Prompts the serving benchmarks generate from: plain text, no facts that are edited.
PROMPTS = [
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "In the middle of the ocean there is",
    "The theory of relativity explains",
    "A good breakfast should contain",
    "The city of Paris is famous for",
    "Computers store information using",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    port: int, *flags: str, data_dir: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``editserve serve`` on ``port`` with the SQLite log in ``data_dir`` (default: a
    fresh one) and ``env`` added to this process's environment; return once it is ready."""
    data = data_dir or tempfile.mkdtemp(prefix="editserve-bench-")
    env = {**os.environ, **(env or {}), "EDITSERVE_DATA_DIR": str(data)}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    server = subprocess.Popen([*command, "--log-level", "warning", *flags], env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise TimeoutError("the server did not become ready")


@contextlib.contextmanager
def running_server(
    port: int, *flags: str, data_dir: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``start_server``'s process for the ``with`` block, terminated when the block ends."""
    server = start_server(port, *flags, data_dir=data_dir, env=env)
    try:
        yield server
    finally:
        server.terminate()
        server.wait(30)


def write_result(path: Path, result: dict[str, Any], shown: dict[str, Any] | None = None) -> None:
    """Write ``result`` as JSON to ``path`` and print ``shown`` (default: all of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result if shown is None else shown, indent=2))


#: An edit's statuses while the server still has work to do for it.
PENDING = ("queued", "applying", "reverting")


def settled(client: httpx.Client, edit_id: str, poll: float = 0.05) -> dict[str, Any]:
    """The edit (its JSON) once it is no longer pending, asked after once a ``poll``."""
    while True:
        edit: dict[str, Any] = client.get(f"/edits/{edit_id}").json()
        if edit["status"] not in PENDING:
            return edit
        time.sleep(poll)


def wait_done(client: httpx.Client, ids: list[str], poll: float = 0.05) -> dict[str, str]:
    """Every edit's final status, once none of ``ids`` is pending.

    Asks after the oldest pending edit only, one request a poll: the server settles a log's
    edits in order, so the later ones are seldom done before it. (Asking after every pending
    edit each poll cost a burst of 100 about 500 requests a second, served on the same two
    cores as the edits it timed.)
    """
    return {edit_id: settled(client, edit_id, poll)["status"] for edit_id in ids}
