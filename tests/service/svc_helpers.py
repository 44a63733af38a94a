"""Helpers for the server tests: free ports, waiting, a redis-server of the tests' own, and a
live in-process server on the shared model."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from editing.models import LoadedModel
from editing.tracing import set_memory
from service.app import create_app
from service.editlog.base import EditLog
from service.runtime import Runtime, open_log
from service.settings import Settings
from service.worker import ModelWorker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def scrape(client: httpx.Client, *names: str) -> dict[str, dict[str, float]]:
    """The samples of ``names`` on ``client``'s ``/metrics``: name -> label values joined by
    commas ("" for none) -> value."""
    found: dict[str, dict[str, float]] = {name: {} for name in names}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name][",".join(sample.labels.values())] = sample.value
    return found


class RedisServer:
    """A redis-server of the tests' own, on a free port (or ``port``); it can be stopped, killed
    and restarted on its files. ``appendonly`` off: it starts from ``dump.rdb`` in ``workdir``
    if there is one (a copy taken with SAVE)."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it)"
        # Snapshots only when asked (SAVE): the append-only file, when on, is the durable copy.
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no"]
        args += ["--appendfsync", self.appendfsync, "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import redis

        # (a server still loading its files answers with an error, which wait_for retries)
        wait_for(lambda: bool(redis.Redis(port=self.port).ping()), 30, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write; what survives is what reached its files."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def start_worker(
    settings: Settings, lm: LoadedModel, c0: dict, edit_log: EditLog | None = None
) -> ModelWorker:
    """A model worker on the shared model (and ``edit_log``, else the settings' own), once it
    is ready or has failed to start."""
    worker = ModelWorker(settings, edit_log or open_log(settings), lm=lm, c0=dict(c0))
    worker.start()
    wait_for(lambda: worker.ready or worker.state.phase == "failed", 120, "the worker")
    return worker


def server_settings(cache: Path, tokens: int, data_dir: Path, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "cache_dir": cache,
        "covariance_tokens": tokens,
        "data_dir": data_dir,
        "device": "cpu",
        "dtype": "float32",
        "max_new_tokens": 64,
        "max_prompt_tokens": 256,
    }
    return Settings(_env_file=None, **{**base, **changes})  # type: ignore[call-arg]


@dataclass
class Live:
    """An in-process server on the shared model."""

    url: str
    runtime: Runtime
    client: httpx.Client


@contextlib.contextmanager
def live_server(settings: Settings, lm: LoadedModel, c0: dict) -> Iterator[Live]:
    """Run the app with uvicorn in a thread; on exit, restore the shared model's weights."""
    log = open_log(settings)
    worker = ModelWorker(settings, log, lm=lm, c0={k: v.clone() for k, v in c0.items()})
    runtime = Runtime(settings=settings, log=log, worker=worker)
    pristine = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    worker.start()
    assert worker.wait_ready(120), worker.state.error
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, runtime), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield Live(url=url, runtime=runtime, client=client)
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop()
        log.close()
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if not torch.equal(p, pristine[name]):
                    p.data = pristine[name]
        set_memory(lm.model, None)  # a keyed memory the server left installed


def wait_status(
    client: httpx.Client, edit_id: str, statuses: set[str], timeout: float = 120
) -> dict:
    """Poll ``GET /edits/{id}`` until its status is one of ``statuses``."""
    found: dict = {}

    def done() -> bool:
        found.update(client.get(f"/edits/{edit_id}").json())
        return found.get("status") in statuses

    wait_for(done, timeout, f"edit {edit_id} to become {statuses} (last: {found.get('status')})")
    return found


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settled_threads(expected: int, timeout: float = 5.0) -> int:
    """The OS thread count once it reaches ``expected`` (or whatever it is at ``timeout``):
    pool threads leave a moment after their thread does."""
    deadline = time.monotonic() + timeout
    while os_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return os_threads()


def steady_threads(quiet: float = 0.5, timeout: float = 10.0) -> int:
    """The OS thread count once it has not changed for ``quiet`` seconds: threads that earlier
    tests left winding down (servers, clients, their pools) would otherwise move it while this
    test counts (the full suite once saw one leave during the count)."""
    deadline = time.monotonic() + timeout
    count, since = os_threads(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.02)
        if (now := os_threads()) != count:
            count, since = now, time.monotonic()
    return count
