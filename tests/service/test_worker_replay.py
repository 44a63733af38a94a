"""The worker's start-up rebuild after a crash (``service.rebuild``): records that were stored
but whose statuses were never marked are installed and marked, a later edit of the same fact
supersedes the earlier, a requested revert is carried out, and the first edit still to compute
stops the rebuild. The statuses go to the SQLite log in one commit (one sync to disk) a page of
operations, not one each. Real model, real SQLite log."""

from __future__ import annotations

from pathlib import Path

import pytest

from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.records import DeltaRecord, fact_to_json
from service import rebuild
from service.editlog.base import EditStatus
from service.editlog.sqlite import SqliteEditLog
from service.settings import Settings
from service.worker import ModelWorker

PROMPT = "The Eiffel Tower is located in the city of"
FACTS = {
    "e1": Fact("Eiffel Tower", PROMPT, "Rome"),
    "e2": Fact("Colosseum", "The Colosseum is located in the city of", "Oslo"),
    "e3": Fact("Eiffel Tower", PROMPT, "Berlin"),  # the same fact as e1, a new target
    "e4": Fact("Big Ben", "Big Ben is located in the city of", "Lima"),
}


@pytest.fixture(scope="module")
def records(lm: LoadedModel, c0: dict) -> dict[str, DeltaRecord]:
    editor = Editor(lm, EditHparams(v_steps=3), "d4s", c0=c0)
    return {i: editor.compute([FACTS[i]], record_id=i) for i in ("e1", "e2", "e3")}


@pytest.mark.parametrize(("page", "commits"), [(500, 1), (2, 2)])
def test_the_start_up_rebuild_marks_what_a_crash_left_a_commit_a_page(
    quick_editor: Editor,
    records: dict[str, DeltaRecord],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    page: int,
    commits: int,
) -> None:
    edit_log = SqliteEditLog(tmp_path / "editlog.sqlite3")
    # The log: e1, e2, e3, a revert of e2, e4. The crash: e1 stored its record while
    # applying, e3 before it was even marked applying; e2 was marked applied before its revert
    # was asked for; e4 has no record yet.
    seq = {i: edit_log.append_edit(i, [fact_to_json(FACTS[i])])[0].seq for i in records}
    for i, record in records.items():
        edit_log.put_record(i, record.to_bytes())
    edit_log.transition("e1", {EditStatus.queued}, EditStatus.applying)
    edit_log.transition("e2", {EditStatus.queued}, EditStatus.applied, model_version=seq["e2"])
    edit_log.request_revert("e2")
    revert_seq = edit_log.last_seq()
    edit_log.append_edit("e4", [fact_to_json(FACTS["e4"])])

    settings = Settings(_env_file=None, data_dir=tmp_path, cache_dir=tmp_path, probes="off")  # type: ignore[call-arg]
    worker = ModelWorker(settings, edit_log, lm=quick_editor.lm)
    worker._serve(quick_editor)
    # Pages of 2: [e1, e2] marks e1 applied; [e3, revert] marks e3 applied, e1 superseded and
    # e2 reverted; [e4] stops with nothing to mark.
    monkeypatch.setattr(rebuild, "PAGE", page)
    statements: list[str] = []
    edit_log._db.set_trace_callback(statements.append)
    worker._replay()
    edit_log._db.set_trace_callback(None)

    assert [s for s in statements if s.strip().upper() == "COMMIT"] == ["COMMIT"] * commits
    entries = {i: edit_log.get(i) for i in FACTS}
    e1, e2, e3, e4 = (entries[i] for i in ("e1", "e2", "e3", "e4"))
    assert e1 is not None and e2 is not None and e3 is not None and e4 is not None
    assert (e1.status, e1.superseded_by) == (EditStatus.superseded, "e3")
    assert (e2.status, e2.reverted_version) == (EditStatus.reverted, revert_seq)
    assert (e3.status, e3.model_version) == (EditStatus.applied, seq["e3"])
    assert e4.status == EditStatus.queued
    assert [r.id for r in quick_editor.records] == ["e3"]
    assert worker.state.model_version == revert_seq  # the last operation that changed weights
    assert worker.state.processed == revert_seq  # e4 is the normal loop's to compute
    digest = quick_editor.digest()
    quick_editor.replay([records["e3"]])
    assert quick_editor.digest() == digest
    edit_log.close()
