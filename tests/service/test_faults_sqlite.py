"""Faults of the embedded log, against real SQLite files: records that cannot be used, a data
directory on a full disk, and one that is read-only (a real tmpfs, mounted small, then
read-only)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from svc_helpers import start_worker, wait_status
from test_server_process import BURST_STEPS, burst_facts, serve, server_env

from editing.editor import Editor
from editing.facts import Fact
from editing.models import LoadedModel
from editing.records import DeltaRecord, fact_to_json
from service.editlog.base import IN_FLIGHT, EditStatus
from service.editlog.sqlite import SqliteEditLog
from service.settings import Settings

FACTS = [
    Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome"),
    Fact("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English"),
]


def _other_blocks(record: DeltaRecord) -> bytes:
    """The record with its keys moved one block on: the shapes of another model's record."""
    keys = {layer + 1: k for layer, k in record.keys.items()}
    return DeltaRecord(record.id, record.facts, keys, record.residual, record.row_keys).to_bytes()


@pytest.mark.parametrize(
    "spoil",
    [lambda record: record.to_bytes()[:-100], _other_blocks],
    ids=["bytes-cut-short", "keys-of-other-blocks"],
)
def test_a_bad_record_stops_the_start_naming_the_edit_until_it_is_reverted(
    spoil: Callable[[DeltaRecord], bytes],
    quick_editor: Editor,
    make_settings: Callable[..., Settings],
    lm: LoadedModel,
    c0: dict,
    tmp_path: Path,
) -> None:
    settings = make_settings(probes="off", memory_reference_tokens=512)
    edit_log = SqliteEditLog(tmp_path / "editlog.sqlite3")
    for i, fact in enumerate(FACTS):  # two edits applied, as a server leaves them
        entry, _ = edit_log.append_edit(f"e{i}", [fact_to_json(fact)])
        record = quick_editor.compute([fact], record_id=f"e{i}")
        edit_log.put_record(f"e{i}", spoil(record) if i == 1 else record.to_bytes())
        fields = {"model_version": entry.seq, "applied_at": time.time()}
        edit_log.transition(entry.id, IN_FLIGHT, EditStatus.applied, **fields)

    refused = start_worker(settings, lm, c0, edit_log)
    try:
        assert refused.state.phase == "failed"
        error = refused.state.error or ""
        assert "edit e1 (log seq 2)" in error and "POST /edits/e1/revert" in error, error
        assert edit_log.get("e1").status == EditStatus.applied  # type: ignore[union-attr]
    finally:
        refused.stop()

    # Reverted (the revert only needs the log): the next start serves the other edit alone.
    edit_log.request_revert("e1")
    worker = start_worker(settings, lm, c0, edit_log)
    try:
        assert worker.ready, worker.state.error
        assert worker.editor is not None
        assert [r.id for r in worker.editor.records] == ["e0"]
        assert edit_log.get("e1").status == EditStatus.reverted  # type: ignore[union-attr]
        assert edit_log.get("e0").status == EditStatus.applied  # type: ignore[union-attr]
        assert worker.state.model_version == 3  # the revert's: every replica counts the same
    finally:
        worker.stop()
        edit_log.close()


def test_a_record_that_does_not_fit_is_named_before_it_is_installed(quick_editor: Editor) -> None:
    record = quick_editor.compute(FACTS[:1], record_id="r")
    quick_editor.check_record(record)
    for spoilt, said in [
        (DeltaRecord("r", record.facts, record.keys, record.residual[:, :-1]), "residual is"),
        (DeltaRecord("r", record.facts, record.keys, record.residual * torch.nan), "not finite"),
        (DeltaRecord("r", FACTS, record.keys, record.residual), "the model needs 2x"),
    ]:
        with pytest.raises(ValueError, match=said):
            quick_editor.check_record(spoilt)


# mount and umount need root: CI runs as root, elsewhere sudo without a password.
AS_ROOT = [] if os.geteuid() == 0 else ["sudo", "-n"]


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size``, owned by this user, mounted at ``where`` for the block."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size},uid={os.getuid()},gid={os.getgid()}"
    subprocess.run(
        [*AS_ROOT, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True
    )
    try:
        yield
    finally:
        subprocess.run([*AS_ROOT, "umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until its file system has no room left."""
    with open(path, "wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def test_sqlite_on_a_full_disk_refuses_edits_then_resumes_and_a_read_only_one_is_refused(
    server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    facts = burst_facts(2)
    env = server_env(
        server_cache,
        covariance_tokens,
        data,
        EDITSERVE_V_STEPS=str(BURST_STEPS),
        EDITSERVE_PROBES="off",
    )
    with tmpfs(data, "16m"):
        with serve(env, tmp_path / "server.log") as (_, url), httpx.Client(base_url=url) as c:
            first = c.post("/edits", json=facts[0]).json()["id"]
            assert wait_status(c, first, {"applied", "failed"}, 120)["status"] == "applied"
            before = c.get("/info").json()

            fill(data / "filler")
            r = c.post("/edits", json=facts[1])
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert "full" in r.json()["detail"], r.json()
            body = {"inputs": facts[0]["prompt"], "parameters": {"max_new_tokens": 4}}
            assert c.post("/generate", json=body).status_code == 200
            after = c.get("/info").json()
            assert (after["model_version"], after["weights_digest"]) == (
                before["model_version"],
                before["weights_digest"],
            )
            assert c.get("/edits").json()["edits"][0]["id"] == first  # nothing half-written

            os.remove(data / "filler")
            second = c.post("/edits", json=facts[1])
            assert second.status_code == 202, second.text
            edit = wait_status(c, second.json()["id"], {"applied", "failed"}, 120)
            assert edit["status"] == "applied", edit

        db = sqlite3.connect(data / "editlog.sqlite3")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM ops").fetchone() == (2,)
        db.close()

        # The same directory read-only: a clear refusal at start, before the model is loaded.
        subprocess.run([*AS_ROOT, "mount", "-o", "remount,ro", str(data)], check=True)
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"the edit log in {data} cannot be opened" in done.stderr, done.stderr[-2000:]
        assert "read-only" in done.stderr or "readonly" in done.stderr, done.stderr[-2000:]
