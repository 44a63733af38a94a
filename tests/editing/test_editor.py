"""The engine on the real default model: edits stick, revert and replay are exact, bad input
changes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from editing import zstar
from editing.active import ActiveRecords, supersede
from editing.adapters import adapter_for
from editing.editor import Editor, UnknownEditError
from editing.facts import Fact, InvalidFactError, NonFiniteUpdateError
from editing.hparams import EditHparams
from editing.metrics import counterfact_scores, score_answers
from editing.models import LoadedModel
from editing.records import DeltaRecord


@pytest.fixture(autouse=True)
def pristine_model(lm: LoadedModel) -> Iterator[None]:
    """Whatever editors a test makes, the shared model leaves it with its original weights."""
    adapter = adapter_for(lm.model)
    layers = range(adapter.num_layers(lm.model))
    original = {layer: adapter.read(lm.model, layer) for layer in layers}
    yield
    for layer in layers:
        adapter.write(lm.model, layer, original[layer])


@pytest.fixture(scope="module")
def records(lm: LoadedModel, c0: dict, facts: list[Fact]) -> list[DeltaRecord]:
    """facts[0..2], one step each, from one batched z* on W0 with the default settings: the
    tests of exact installs, reverts and replays share them instead of each running z* again."""
    return Editor(lm, EditHparams(), "d4s", c0=c0).compute_many([[f] for f in facts[:3]])


def _weights(editor: Editor) -> dict[int, torch.Tensor]:
    return editor.live_weights()


def _same(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_edit_sticks_and_revert_all_restores_w0_bitwise(
    editor: Editor, facts: list[Fact], records: list[DeltaRecord]
) -> None:
    w0 = _weights(editor)
    digest0 = editor.digest()
    assert counterfact_scores(editor.lm, facts[:2])["efficacy"] == 0.0
    first = editor.apply([facts[0]])
    editor.install(records[1])
    assert counterfact_scores(editor.lm, facts[:2])["efficacy"] == 1.0
    assert not _same(_weights(editor), w0)
    editor.revert(first.record.id)
    editor.revert(records[1].id)
    assert editor.records == []
    assert _same(_weights(editor), w0)
    assert editor.digest() == digest0


def test_replay_rebuilds_identical_weights_without_zstar(
    editor: Editor,
    lm: LoadedModel,
    c0: dict,
    records: list[DeltaRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for record in records:
        editor.install(record)
    edited = _weights(editor)
    digest = editor.digest()
    editor.replay([])

    def no_zstar(*args: object, **kwargs: object) -> None:
        raise AssertionError("replay must not optimise z*")

    monkeypatch.setattr(zstar, "compute_zstar", no_zstar)
    monkeypatch.setattr("editing.editor.compute_zstar", no_zstar)
    fresh = Editor(lm, EditHparams(), "d4s", c0=c0)
    fresh.replay(records)
    assert _same(_weights(fresh), edited)
    assert fresh.digest() == digest


def test_revert_one_of_several_equals_never_applying_it(
    editor: Editor, records: list[DeltaRecord]
) -> None:
    kept, dropped = records[:2]
    editor.install(kept)
    editor.install(dropped)
    editor.revert(dropped.id)
    after_revert = _weights(editor)
    editor.replay([kept])
    assert _same(_weights(editor), after_revert)
    with pytest.raises(UnknownEditError):
        editor.revert(dropped.id)


def test_the_exact_sums_revert_an_old_edit_to_the_bits_of_never_applying_it(
    editor: Editor,
    lm: LoadedModel,
    c0: dict,
    records: list[DeltaRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the full solve forced (no low-rank shortcut), installs and reverts in any order reach
    the weights that replaying the records left active builds, on the real model's C0 and W0."""
    monkeypatch.setattr("editing.methods.LOW_RANK_ROWS", 0)
    fresh = Editor(lm, EditHparams(), "d4s", c0=c0)  # made while the model holds W0
    first, second, third = records
    editor.install(first)
    editor.install(second)
    editor.revert(first.id)  # the oldest, while another is active
    editor.install(third)
    live, digest = _weights(editor), editor.digest()
    fresh.replay([second, third])
    assert _same(_weights(fresh), live) and fresh.digest() == digest
    editor.revert(third.id)
    editor.revert(second.id)
    assert _same(_weights(editor), editor.w0)


def test_same_subject_and_prompt_supersedes(
    editor: Editor, facts: list[Fact], records: list[DeltaRecord]
) -> None:
    first = editor.install(records[0]).record
    other = Fact(facts[0].subject, facts[0].prompt, "London", facts[0].ground_truth)
    result = editor.apply([other])
    assert result.superseded == [first.id]
    assert [r.id for r in editor.records] == [result.record.id]
    london, rome = score_answers(editor.lm, [(other.prompt, " London"), (other.prompt, " Rome")])
    assert london.nll < rome.nll


def test_a_batch_is_one_record_with_a_row_per_fact(editor: Editor, facts: list[Fact]) -> None:
    result = editor.apply(facts[:2])
    assert len(editor.records) == 1
    assert result.record.residual.shape == (2, 576)
    assert all(k.shape == (2, 1536) for k in result.record.keys.values())
    assert counterfact_scores(editor.lm, facts[:2])["efficacy"] == 1.0


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (Fact("Colosseum", "The Eiffel Tower is located in the city of", "Rome"), InvalidFactError),
        (Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", ""), InvalidFactError),
        (
            Fact("Eiffel Tower", "word " * 9000 + "The Eiffel Tower is in", "Rome"),
            InvalidFactError,
        ),
    ],
    ids=["subject-not-in-prompt", "empty-target", "longer-than-context"],
)
def test_bad_input_changes_nothing(
    editor: Editor, records: list[DeltaRecord], bad: Fact, error: type[Exception]
) -> None:
    editor.install(records[2])
    weights, records, version = _weights(editor), editor.records, editor.version
    with pytest.raises(error):
        editor.apply([bad])
    assert _same(_weights(editor), weights)
    assert editor.records == records and editor.version == version


def test_non_finite_update_changes_nothing(lm: LoadedModel, c0: dict, facts: list[Fact]) -> None:
    # Two steps: the first already makes z* infinite.
    editor = Editor(lm, EditHparams(v_lr=float("inf"), v_steps=2), "d4s", c0=c0)
    weights = _weights(editor)
    with pytest.raises(NonFiniteUpdateError):
        editor.apply([facts[0]])
    assert _same(_weights(editor), weights) and editor.records == []


@pytest.mark.parametrize("method", ["memit-seq", "alphaedit"])
def test_baselines_edit_and_revert(
    lm: LoadedModel, c0: dict, facts: list[Fact], method: str
) -> None:
    editor = Editor(lm, EditHparams(), method, c0=c0)
    w0 = _weights(editor)
    result = editor.apply([facts[0]])
    assert counterfact_scores(lm, facts[:1])["efficacy"] == 1.0
    editor.revert(result.record.id)
    assert _same(_weights(editor), w0)


def test_batched_zstar_gives_each_step_its_own_record(
    lm: LoadedModel, c0: dict, facts: list[Fact]
) -> None:
    # Few z* steps: the batch and the step alone must agree at every step, not only at the end.
    editor = Editor(lm, EditHparams(v_steps=4), "d4s", c0=c0)
    steps = [[facts[0]], [facts[1], facts[2]]]
    batched = editor.compute_many(steps, ["one", "two"])
    assert [r.id for r in batched] == ["one", "two"]
    assert [r.facts for r in batched] == [tuple(s) for s in steps]
    for step, record in zip(steps, batched, strict=True):
        alone = editor.compute(step)
        # The same optimisation per fact; only the padding of the batch differs. Adam's first steps
        # move each entry by about the learning rate in its gradient's sign, so an entry whose
        # gradient is within rounding of zero may step the other way when the padding changes the
        # order of a sum: nearly all entries agree, and so does the loss each fact reached.
        close = torch.isclose(record.residual, alone.residual, rtol=1e-3, atol=1e-4)
        assert close.float().mean().item() >= 0.99
        assert record.stats["nll_after"] == pytest.approx(alone.stats["nll_after"], rel=1e-3)
        for layer in record.layers:
            assert torch.allclose(record.keys[layer], alone.keys[layer], rtol=1e-4, atol=1e-5)
    assert editor.records == [] and _same(_weights(editor), editor.w0)


def test_installing_many_at_once_equals_installing_one_by_one(
    editor: Editor, facts: list[Fact], records: list[DeltaRecord]
) -> None:
    first, second, third = records
    # A re-edit of facts[0]: what matters here is its fact's key, not how its rows were made.
    again = dataclasses.replace(
        third, id="again", facts=(dataclasses.replace(facts[0], target_new=facts[2].target_new),)
    )
    editor.install(first)
    editor.install(second)
    editor.install(again)  # re-edits facts[0]: supersedes ``first``
    one_by_one = editor.digest()
    editor.replay([second, again])  # the supersede remade only its groups: a rebuild's bits
    assert editor.digest() == one_by_one
    editor.replay([])
    change = editor.plan_install_many([first, second, again])
    assert change.superseded_by == {first.id: again.id}
    editor.commit(change)
    assert editor.digest() == one_by_one
    assert [r.id for r in editor.records] == [second.id, again.id]


def test_the_indexed_active_set_supersedes_as_the_scan_does() -> None:
    """Records of one to three facts over a few subjects, so that later ones shorten and drop
    earlier ones, with reverts among them: the index keeps what ``supersede`` keeps, in order,
    and names the same superseded records."""
    g = torch.Generator().manual_seed(0)
    active, indexed = [], ActiveRecords()
    for i in range(300):
        picks = torch.randperm(12, generator=g)[: 1 + i % 3].tolist()
        facts = tuple(Fact(f"s{p}", f"s{p} lives in", f" T{i}") for p in picks)
        record = DeltaRecord(
            id=f"r{i}",
            facts=facts,
            keys={3: torch.randn(len(facts), 4, generator=g)},
            residual=torch.randn(len(facts), 2, generator=g),
        )
        kept, gone, _ = supersede(active, record)
        active = [*kept, record]
        assert indexed.add(record) == gone
        if i % 7 == 6 and active:  # a revert of a record still active
            victim = active[int(torch.randint(len(active), (1,), generator=g))]
            active = [r for r in active if r.id != victim.id]
            indexed.remove(victim.id)
        assert [(r.id, r.facts) for r in indexed.records] == [(r.id, r.facts) for r in active]
    assert any(len(r.facts) < 3 for r in active)  # some records were shortened, not dropped
