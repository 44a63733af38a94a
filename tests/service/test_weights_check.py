"""Replicas on one log check that they stay identical: the replica that computes an edit notes
its weights' digest in the record's bytes, and a replica that installs the record compares its
own digest at the same log position (``editserve_weights_checks_total``, ``/info``'s
``weights_mismatch``, the ``editserve_weights_diverged`` gauge). Real model, real SQLite logs;
the other replicas are this editor before a reset, and an editor with another RECT share."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.records import DeltaRecord, fact_to_json, record_notes
from service.editlog.base import Operation
from service.editlog.sqlite import SqliteEditLog
from service.settings import Settings
from service.worker import ModelWorker

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome")


def replica(editor: Editor, edit_log: SqliteEditLog, tmp_path: Path, name: str) -> ModelWorker:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=tmp_path, cache_dir=tmp_path, probes="off", replica_id=name
    )
    worker = ModelWorker(settings, edit_log, lm=editor.lm)
    worker._serve(editor)
    worker.metrics.watch(worker.snapshot, edit_log, queue_limit=settings.max_queued_edits)
    return worker


def checks(worker: ModelWorker) -> dict[str, float | None]:
    registry = worker.metrics.registry
    return {
        result: registry.get_sample_value("editserve_weights_checks_total", {"result": result})
        for result in ("match", "mismatch")
    } | {"diverged": registry.get_sample_value("editserve_weights_diverged")}


def one_edit_log(path: Path, blob: bytes | None = None) -> tuple[SqliteEditLog, Operation]:
    edit_log = SqliteEditLog(path)
    entry, _ = edit_log.append_edit("e1", [fact_to_json(FACT)])
    if blob is not None:
        edit_log.put_record("e1", blob)
    return edit_log, Operation(seq=entry.seq, kind="apply", edit_id="e1")


def test_the_computing_replica_notes_its_digest_and_an_installing_one_compares(
    quick_editor: Editor, tmp_path: Path
) -> None:
    edit_log, op = one_edit_log(tmp_path / "editlog.sqlite3")
    replica(quick_editor, edit_log, tmp_path, "r1")._handle(op)
    edited = quick_editor.digest()
    blob = edit_log.get_record("e1")
    assert blob is not None
    assert record_notes(blob) == {
        "weights_digest": edited,
        "model_version": str(op.seq),
        "computed_by": "r1",
    }

    quick_editor.replay([])  # now a replica that has not installed e1 yet
    assert quick_editor.digest() != edited
    follower = replica(quick_editor, edit_log, tmp_path, "r2")
    assert follower.replicas.await_turn(op).stored == blob, "it would compute a stored edit"
    follower._handle(op)
    assert quick_editor.digest() == edited
    assert checks(follower) == {"match": 1.0, "mismatch": 0.0, "diverged": 0.0}
    assert follower.info()["weights_mismatch"] is None
    assert follower.info()["weights_digest"] == edited

    # A record without notes (an edit of a batch before its last) is installed unchecked.
    quick_editor.replay([])
    plain_log, _ = one_edit_log(tmp_path / "plain.sqlite3", DeltaRecord.from_bytes(blob).to_bytes())
    unchecked = replica(quick_editor, plain_log, tmp_path, "r3")
    unchecked._handle(op)
    assert quick_editor.digest() == edited
    assert checks(unchecked) == {"match": 0.0, "mismatch": 0.0, "diverged": 0.0}
    edit_log.close()
    plain_log.close()


def test_a_replica_with_other_weight_settings_reports_that_it_diverged(
    quick_editor: Editor, c0: dict, tmp_path: Path
) -> None:
    record = quick_editor.compute([FACT], record_id="e1")
    # The computing replica keeps RECT's top 60% of the update, this one 40% (the default).
    other = Editor(quick_editor.lm, EditHparams(v_steps=3, rect_keep=0.6), "d4s", c0=c0)
    other.commit(other.plan_install(record))
    theirs = other.digest()
    other.replay([])
    edit_log, op = one_edit_log(tmp_path / "editlog.sqlite3")
    notes = {"weights_digest": theirs, "model_version": str(op.seq), "computed_by": "r-other"}
    edit_log.put_record("e1", record.to_bytes(notes))

    follower = replica(quick_editor, edit_log, tmp_path, "r1")
    follower._handle(op)
    ours = quick_editor.digest()
    assert ours != theirs
    assert checks(follower) == {"match": 0.0, "mismatch": 1.0, "diverged": 1.0}
    assert follower.info()["weights_mismatch"] == {
        "edit_id": "e1",
        "model_version": op.seq,
        "computed_by": "r-other",
        "theirs": theirs,
        "ours": ours,
    }
    edit_log.close()


def test_info_reads_the_digest_of_the_last_swap_without_the_lock(
    quick_editor: Editor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/info`` (``ModelWorker.info``) used to hash every edited matrix under the weights lock
    on every call, so it waited for a whole generation batch and copied the matrices off the
    GPU each time. The digest is now made once per swap; ``info`` takes no lock and hashes
    nothing, and still follows the weights: an edit changes it, its revert brings W0's back."""
    edit_log, op = one_edit_log(tmp_path / "editlog.sqlite3")
    worker = replica(quick_editor, edit_log, tmp_path, "r1")
    worker._replay()  # the start-up rebuild: W0
    w0 = quick_editor.digest()

    hashed: list[str] = []
    digest = quick_editor.digest

    def counted() -> str:
        hashed.append(digest())
        return hashed[-1]

    monkeypatch.setattr(quick_editor, "digest", counted)
    answer: list[dict] = []
    with worker.weights_lock:  # a generation batch in flight
        reader = threading.Thread(target=lambda: answer.append(worker.info()), daemon=True)
        reader.start()
        reader.join(timeout=10)
    assert answer, "info waited for the weights lock"
    assert answer[0]["weights_digest"] == w0
    assert hashed == [], "info hashed the weights"
    monkeypatch.undo()

    worker._handle(op)
    edited = worker.info()["weights_digest"]
    assert edited == quick_editor.digest() != w0
    assert worker.info()["active_edits"] == 1

    edit_log.request_revert("e1")
    worker._handle(Operation(seq=edit_log.last_seq(), kind="revert", edit_id="e1"))
    info = worker.info()
    assert info["weights_digest"] == quick_editor.digest() == w0
    assert (info["model_version"], info["active_edits"]) == (edit_log.last_seq(), 0)
    edit_log.close()
