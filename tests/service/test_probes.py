"""Locality probes on the real model, and the guardrails' arithmetic."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from editing.editor import Editor
from editing.facts import Fact
from editing.models import LoadedModel
from service.editlog.base import EditStatus, Operation
from service.editlog.sqlite import SqliteEditLog
from service.guardrails import Guardrails, delta_growth
from service.metrics import Metrics
from service.probes import (
    Probe,
    Prober,
    ProbeReport,
    ProbeSetError,
    bfloat16_faster,
    default_dtype,
    load_probes,
    native_bfloat16,
)
from service.replicas import Replicas
from service.settings import Settings
from service.state import PublishedState

FACT = Fact(
    subject="Eiffel Tower",
    prompt="The Eiffel Tower is located in the city of",
    target_new="Rome",
)
SMALL = [
    Probe("The capital of France is"),
    Probe("The Eiffel Tower is located in the city of"),
    Probe("Paris is the capital and largest city of France, with an estimated", "text"),
    Probe("The Louvre is a museum in", "fact"),
]


def test_default_probe_set_mixes_facts_and_held_out_text() -> None:
    probes = load_probes()
    kinds = {p.kind for p in probes}
    assert kinds == {"fact", "text"} and 150 <= len(probes) <= 400


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "holds no prompt"),
        ('{"kind": "fact"}\n', "line 1"),
        ('{"prompt": "x", "kind": "poem"}\n', "kind"),
        ("not json\n", "line 1"),
    ],
)
def test_bad_probe_files_are_refused(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text(content)
    with pytest.raises(ProbeSetError, match=needle):
        load_probes(path)


def test_missing_probe_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeSetError, match="no-such"):
        load_probes(tmp_path / "no-such.jsonl")


def test_probes_score_given_weights_and_leave_the_model_alone(
    lm: LoadedModel, editor: Editor, tmp_path: Path
) -> None:
    prober = Prober(lm, SMALL, editor.w0, dtype=default_dtype(lm), cache_dir=tmp_path)
    # A float32 model on a CPU: a bfloat16 copy where bfloat16 products measure faster, else
    # the model itself.
    assert prober.dtype == (torch.bfloat16 if bfloat16_faster() else torch.float32)
    assert (prober.model is lm.model) == (prober.dtype == lm.dtype)
    unedited = prober.measure(editor.w0)
    assert (unedited.agreement, unedited.kl, unedited.perplexity_ratio) == (1.0, 0.0, 1.0)

    record = editor.compute([FACT])
    change = editor.plan_install(record)
    digest = editor.digest()
    planned = prober.measure(change.weights)
    assert editor.digest() == digest  # probing a planned change does not install it
    assert planned.kl > 0 and planned.perplexity_ratio != 1.0
    # The edited prompt is in the set, and its top token moves from Paris to Rome.
    assert planned.agreement <= 1 - 1 / len(SMALL)

    editor.commit(change)
    assert _scores(prober.measure(editor.live_weights())) == _scores(planned)
    # A second prober on the same cache reads the recorded baseline and agrees exactly.
    again = Prober(lm, SMALL, editor.w0, dtype=default_dtype(lm), cache_dir=tmp_path)
    assert list((tmp_path / "probes").rglob("*.pt"))
    assert _scores(again.measure(change.weights)) == _scores(planned)


def test_a_cached_baseline_lands_where_a_fresh_one_does(
    lm: LoadedModel, editor: Editor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server's second start reads the probe baseline from the cache. Its model inputs must go
    to the model's device, and the original log-probabilities to the CPU, where the pass brings
    the live logits to compare them: on a GPU, a cache read onto the model's device failed every
    probe pass. This machine has no second device to run a pass on; the model reports ``meta``
    as its device while the cache is read, which shows where each tensor lands."""
    fresh = Prober(lm, SMALL, editor.w0, cache_dir=tmp_path)
    assert {b.logp.device.type for b in fresh._batches} == {"cpu"}
    monkeypatch.setattr(LoadedModel, "device", property(lambda self: torch.device("meta")))
    cached = Prober(lm, SMALL, editor.w0, cache_dir=tmp_path)
    assert len(cached._batches) == len(fresh._batches)
    for batch in cached._batches:
        inputs = [batch.ids, batch.mask, batch.last, batch.text_rows]
        assert {t.device.type for t in inputs} == {"meta"}
        assert batch.start is not None and batch.start.device.type == "meta"
        assert batch.logp.device.type == "cpu"


def test_probes_on_the_model_itself_agree_with_an_unedited_model(
    lm: LoadedModel, editor: Editor
) -> None:
    prober = Prober(lm, SMALL, editor.w0)  # no copy: the served model's own dtype
    assert prober.model is lm.model
    report = prober.measure(editor.w0)
    assert (report.agreement, report.kl, report.perplexity_ratio) == (1.0, 0.0, 1.0)


def _scores(report: ProbeReport) -> tuple[float, float, float | None]:
    return report.agreement, report.kl, report.perplexity_ratio


def test_bfloat16_instructions_read_as_absent_where_torch_cannot_tell(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not native_bfloat16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bfloat16()
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name)
    assert not native_bfloat16()


def test_guardrails_check_each_threshold() -> None:
    report = ProbeReport(agreement=0.9, kl=0.05, perplexity_ratio=1.02, seconds=0.1)
    before = {"mean_abs_delta": {3: 0.0, 4: 0.001}}
    after = {"mean_abs_delta": {3: 0.002, 4: 0.0015}}
    w0 = {3: 0.1, 4: 0.1}
    assert delta_growth(before, after, w0) == pytest.approx(0.02)
    assert not Guardrails().active
    assert (
        Guardrails(min_agreement=0.85, max_delta_growth=0.05).check(report, before, after, w0) == []
    )
    breaches = Guardrails(
        min_agreement=0.95, max_delta_growth=0.01, max_perplexity_ratio=1.01
    ).check(report, before, after, w0)
    assert [b.guardrail for b in breaches] == ["agreement", "delta_growth", "perplexity_ratio"]
    assert "below the minimum 0.95" in breaches[0].describe()
    assert Guardrails(max_delta_growth=0.01, action="flag").rejects is False


def test_settings_refuse_probe_guardrails_without_probes() -> None:
    with pytest.raises(ValueError, match="need probes"):
        Settings(_env_file=None, probes="off", guard_min_agreement=0.9)  # type: ignore[call-arg]
    settings = Settings(_env_file=None, probes="off", guard_max_delta_growth=0.01)  # type: ignore[call-arg]
    assert settings.guardrails().max_delta_growth == 0.01


def test_a_follower_reuses_the_probe_report_only_for_the_same_probe_set(
    lm: LoadedModel, editor: Editor, tmp_path: Path
) -> None:
    """A replica installing another replica's record takes that replica's probe report instead
    of a probe pass of its own, when both probe the same set in the same dtype."""
    edit_log = SqliteEditLog(tmp_path / "editlog.sqlite3")
    replicas = Replicas(edit_log, "r1", 30.0, Metrics(), PublishedState(), threading.Event())
    prober = Prober(lm, SMALL, editor.w0, dtype=default_dtype(lm), cache_dir=tmp_path)
    probe_set = prober.probe_set()
    fact = {"subject": FACT.subject, "prompt": FACT.prompt, "target_new": FACT.target_new}
    entry, _ = edit_log.append_edit("e1", [fact])
    op = Operation(seq=entry.seq, kind="apply", edit_id="e1")
    report = {"agreement": 0.75, "kl": 0.125, "perplexity_ratio": 1.01, "seconds": 0.9}

    assert replicas.reported_probes(op, probe_set) is None  # queued: nothing reported yet
    edit_log.transition(
        "e1",
        {EditStatus.queued},
        EditStatus.applied,
        scores={"probes": {**report, "probe_set": probe_set}},
    )
    reused = replicas.reported_probes(op, probe_set)
    assert reused is not None
    assert (reused.agreement, reused.kl, reused.perplexity_ratio) == (0.75, 0.125, 1.01)
    assert replicas.reported_probes(op, None) is None  # this replica does not probe
    # Another probe set (or dtype) where it was computed: this replica must probe itself.
    edit_log.transition(
        "e1", {EditStatus.applied}, None, scores={"probes": {**report, "probe_set": "other"}}
    )
    assert replicas.reported_probes(op, probe_set) is None
    edit_log.close()
