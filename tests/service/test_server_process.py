"""The server as a user runs it: ``editserve serve`` in its own process, on SQLite and on Redis
Streams (a real redis-server), and killed with SIGKILL in the middle of a burst of edits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from svc_helpers import RedisServer, free_port, wait_for, wait_status

from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel

FACT = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
}
# z* steps for the burst: enough to move the weights, few enough to keep the test short.
BURST_STEPS = 3


@contextmanager
def serve(
    env: dict[str, str], log_path: Path, seen: list[dict] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """``editserve serve`` in its own process, once ready; ``seen`` collects every /ready body
    read while it started."""
    with serve_many([(env, log_path)], seen) as [server]:
        yield server


@contextmanager
def serve_many(
    servers: list[tuple[dict[str, str], Path]], seen: list[dict] | None = None
) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """Several ``editserve serve`` processes, started at once (their start-ups overlap), once
    all are ready."""
    started: list[tuple[subprocess.Popen, str, Path]] = []
    try:
        for env, log_path in servers:
            started.append((*spawn(env, log_path), log_path))
        for proc, url, log_path in started:

            def ready(url: str = url) -> bool:
                r = httpx.get(f"{url}/ready", timeout=2)
                if seen is not None:
                    seen.append(r.json())
                return r.status_code == 200

            wait_for(lambda p=proc, r=ready: p.poll() is not None or r(), 180, "the server ready")
            assert proc.poll() is None, log_path.read_text()[-3000:]
        yield [(proc, url) for proc, url, _ in started]
    finally:
        for proc, _, _ in started:
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def spawn(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """``editserve serve`` started in its own process on a free port, its output appended to
    ``log_path``; the process and its URL, at once (not waiting for it to be ready)."""
    port = free_port()
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


def server_env(server_cache: Path, tokens: int, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "EDITSERVE_CACHE_DIR": str(server_cache),
        "EDITSERVE_COVARIANCE_TOKENS": str(tokens),
        "EDITSERVE_DATA_DIR": str(data_dir),
        "EDITSERVE_DEVICE": "cpu",
        "EDITSERVE_DTYPE": "float32",
        **extra,
    }


def generate(client: httpx.Client, prompt: str) -> str:
    r = client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    text: str = r.json()["generated_text"]
    return text


def new_user_flow(url: str) -> None:
    """POST a fact, poll until applied, generate, revert, generate, compare digests."""
    with httpx.Client(base_url=url, timeout=120) as client:
        digest = client.get("/info").json()["weights_digest"]
        assert generate(client, FACT["prompt"]).startswith(" Paris")
        edit = client.post("/edits", json=FACT).json()
        assert wait_status(client, edit["id"], {"applied", "failed"})["status"] == "applied"
        assert generate(client, FACT["prompt"]).startswith(" Rome")
        assert client.get("/info").json()["weights_digest"] != digest
        assert client.post(f"/edits/{edit['id']}/revert").status_code == 202
        wait_status(client, edit["id"], {"reverted"})
        assert generate(client, FACT["prompt"]).startswith(" Paris")
        assert client.get("/info").json()["weights_digest"] == digest


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_new_user_flow(
    backend: str,
    server_cache: Path,
    covariance_tokens: int,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    extra = (
        {"EDITSERVE_REDIS_URL": redis_server.url, "EDITSERVE_REDIS_PREFIX": f"flow-{tmp_path.name}"}
        if backend == "redis"
        else {}
    )
    # On SQLite the server collects reference keys of its own (a count no other test caches), so
    # that its start-up reports progress as a first start does.
    tokens = 3000
    if backend == "sqlite":
        extra["EDITSERVE_MEMORY_REFERENCE_TOKENS"] = str(tokens)
    env = server_env(server_cache, covariance_tokens, tmp_path / "data", **extra)
    seen: list[dict] = []
    with serve(env, tmp_path / "server.log", seen) as (_, url):
        assert httpx.get(f"{url}/info").json()["log"] == backend
        new_user_flow(url)
    if backend == "sqlite":
        assert (tmp_path / "data" / "editlog.sqlite3").exists()
        said = (tmp_path / "server.log").read_text()
        # The start-up says what it does, its progress included, and /ready says so too.
        assert (
            f"computing the memory's reference keys: {tokens:,} of {tokens:,} tokens: 100%" in said
        )
        assert "rebuilding the weights from the edit log" in said
        assert "ready at model version 0" in said
        steps = [body["detail"] for body in seen if not body["ready"] and body["detail"]]
        assert any("reference keys" in step and "% done" in step for step in steps), steps
        shares = [body["progress"] for body in seen if body["progress"] is not None]
        assert shares and all(0 <= share <= 1 for share in shares)
        # The access log keeps the API's lines and leaves out the readiness polls.
        assert "POST /edits" in said and "GET /ready" not in said


def burst_facts(n: int) -> list[dict]:
    cities = ["Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Seoul"]
    return [
        {
            "subject": f"Landmark {i}",
            "prompt": f"The monument called Landmark {i} is located in the city of",
            "target_new": cities[i % len(cities)],
        }
        for i in range(n)
    ]


def test_sigkill_mid_burst_loses_nothing_and_applies_nothing_twice(
    server_cache: Path,
    covariance_tokens: int,
    tmp_path: Path,
    redis_server: RedisServer,
    lm: LoadedModel,
    c0: dict,
) -> None:
    facts = burst_facts(12)
    env = server_env(
        server_cache,
        covariance_tokens,
        tmp_path / "data",
        EDITSERVE_REDIS_URL=redis_server.url,
        EDITSERVE_REDIS_PREFIX=f"kill-{tmp_path.name}",
        EDITSERVE_V_STEPS=str(BURST_STEPS),
        # One edit per z*: a batch's float rounding differs from a lone edit's, and the
        # uninterrupted run below computes each edit alone.
        EDITSERVE_EDIT_BATCH="1",
        # What is measured here is the log's exactly-once delivery; the probe pass (about half
        # of each edit's time) would only lengthen the test.
        EDITSERVE_PROBES="off",
    )
    accepted: dict[int, str] = {}
    with serve(env, tmp_path / "server.log") as (proc, url), httpx.Client(base_url=url) as c:
        for i, fact in enumerate(facts[:8]):
            r = c.post("/edits", json=fact, headers={"Idempotency-Key": f"burst-{i}"})
            assert r.status_code == 202
            accepted[i] = r.json()["id"]
        # Kill once a few edits are in but others are still queued or being applied.
        wait_for(lambda: c.get(f"/edits/{accepted[2]}").json()["status"] == "applied", 120, "3")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    statuses = {}
    with serve(env, tmp_path / "server.log") as (_, url), httpx.Client(base_url=url) as c:
        # The client retries everything it sent (its last replies may have been lost), then
        # sends the rest of the burst.
        for i, fact in enumerate(facts):
            r = c.post("/edits", json=fact, headers={"Idempotency-Key": f"burst-{i}"})
            assert r.status_code == 202
            if i in accepted:
                assert r.json()["id"] == accepted[i]
            accepted[i] = r.json()["id"]
        for i in range(len(facts)):
            statuses[i] = wait_status(c, accepted[i], {"applied", "failed", "rejected"}, 300)
        info = c.get("/info").json()
    assert all(s["status"] == "applied" for s in statuses.values()), statuses
    assert info["active_edits"] == len(facts)
    versions = [statuses[i]["model_version"] for i in range(len(facts))]
    assert versions == sorted(versions) and len(set(versions)) == len(facts)

    # The same burst, uninterrupted, in this process: the digest must match.
    editor = Editor(lm, EditHparams(v_steps=BURST_STEPS), c0=c0)  # the server's default method
    try:
        for fact in facts:
            editor.apply([Fact(**fact)])
        assert editor.digest() == info["weights_digest"]
    finally:
        editor.replay([])
