"""The model worker's hand-over between replicas at its narrowest: a record stored by another
replica in the instant between this replica's look for it and its claim of the lease (storing a
record frees its lease, so the claim succeeds). Driven on a real SQLite log with the real
model; the other replica is simulated by storing its record from inside ``claim``."""

from __future__ import annotations

from pathlib import Path

from editing.editor import Editor
from editing.facts import Fact
from editing.records import fact_to_json
from service.editlog.base import EditStatus, Operation
from service.editlog.sqlite import SqliteEditLog
from service.settings import Settings
from service.worker import ModelWorker

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome")


class RacedLog(SqliteEditLog):
    """Another replica stores ``blob`` as the edit's record and marks it applied just before
    this replica's first claim goes through."""

    blob: bytes | None = None

    def claim(self, edit_id: str, owner: str, seconds: float) -> bool:
        if self.blob is not None:
            self.put_record(edit_id, self.blob)
            self.transition(edit_id, {EditStatus.applying}, EditStatus.applied, model_version=1)
            self.blob = None
        return super().claim(edit_id, owner, seconds)


def test_a_record_stored_just_before_the_claim_is_installed_not_skipped(
    editor: Editor, tmp_path: Path
) -> None:
    record = editor.compute([FACT], record_id="e1")
    settings = Settings(_env_file=None, data_dir=tmp_path, cache_dir=tmp_path, probes="off")  # type: ignore[call-arg]
    edit_log = RacedLog(tmp_path / "editlog.sqlite3")
    entry, _ = edit_log.append_edit("e1", [fact_to_json(FACT)])
    edit_log.transition("e1", {EditStatus.queued}, EditStatus.applying)
    worker = ModelWorker(settings, edit_log, lm=editor.lm)
    worker._serve(editor)
    blob = edit_log.blob = record.to_bytes()
    op = Operation(seq=entry.seq, kind="apply", edit_id="e1")

    turn = worker.replicas.await_turn(op)

    assert not turn.compute, "it would compute an edit whose record is already stored"
    assert turn.stored == blob, "it would skip the stored record"
    assert worker.pipeline is not None
    worker.pipeline.install(op, turn.stored)
    assert [r.id for r in editor.records] == ["e1"], "the stored record was not installed"
    assert worker.state.model_version == entry.seq
    edit_log.close()
