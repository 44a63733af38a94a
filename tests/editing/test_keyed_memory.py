"""The keyed memory (``editing.keyed_memory``) on the real model: an edit held in the memory alone,
other text untouched bit for bit, exact revert, and the editing passes never seeing it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editing import corpus, metrics
from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.keyed_memory import Entries
from editing.models import LoadedModel
from editing.records import DeltaRecord
from editing.tracing import Trace, installed_memory
from editing.zstar import compute_row_keys

OTHER = "The weather in the mountains was cold and clear that morning."


@pytest.fixture
def memory_editor(lm: LoadedModel, c0: dict) -> Iterator[Editor]:
    ed = Editor(lm, EditHparams(), "memory", c0=c0)
    yield ed
    ed.replay([])


@pytest.fixture(scope="module")
def records(lm: LoadedModel, c0: dict, facts: list[Fact]) -> list[DeltaRecord]:
    """Three facts' records from one batched z* (the memory method's records are d4s's)."""
    chosen = _with_truth(facts, 3)
    editor = Editor(lm, EditHparams(), "memory", c0=c0)
    return editor.compute_many([[f] for f in chosen], [f"m{i}" for i in range(3)])


def _logits(lm: LoadedModel, text: str) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def _held(lm: LoadedModel, fact: Fact) -> bool:
    return bool(metrics.counterfact_outcomes(lm, [fact])[0]["efficacy"][0][0])


def _with_truth(facts: list[Fact], n: int) -> list[Fact]:
    return [f for f in facts if f.ground_truth is not None][:n]


def test_the_memory_alone_holds_an_edit_and_leaves_other_text_bitwise(
    memory_editor: Editor, lm: LoadedModel, records: list[DeltaRecord]
) -> None:
    record = records[0]
    fact = record.facts[0]
    start, before_other = memory_editor.digest(), _logits(lm, OTHER)
    w0 = {k: w.clone() for k, w in memory_editor.live_weights().items()}
    assert not _held(lm, fact)

    memory_editor.install(record)
    assert record.row_keys is not None
    assert record.row_keys.shape[:2] == (1, len(memory_editor.hp.context_prefixes))
    memory = memory_editor.memory
    assert memory is not None and len(memory) == len(memory_editor.hp.context_prefixes)
    assert installed_memory(lm.model) is memory
    assert _held(lm, fact)
    assert all(torch.equal(w, w0[k]) for k, w in memory_editor.live_weights().items())
    assert torch.equal(_logits(lm, OTHER), before_other)  # no key there matches
    assert memory_editor.digest() != start

    memory_editor.revert(record.id)
    assert memory_editor.memory is None and installed_memory(lm.model) is None
    assert memory_editor.digest() == start
    assert not _held(lm, fact)


def test_the_memory_is_a_pure_function_of_the_records(
    memory_editor: Editor, lm: LoadedModel, c0: dict, records: list[DeltaRecord]
) -> None:
    """Replay, another editor, and a revert of one of three all give the same memory digest as
    installing the same records in one go; records written without row keys get them back."""
    for record in records:
        memory_editor.install(record)
    assert memory_editor.memory is not None
    three = memory_editor.memory
    # The entries kept for the next plan are the memory's own rows, not a second copy.
    storage = three.keys.untyped_storage().data_ptr()
    kept = [e for _, e in memory_editor._entries.values()]
    assert all(e.keys.untyped_storage().data_ptr() == storage for e in kept)
    memory_editor.revert("m1")
    two = memory_editor.digest()

    other = Editor(lm, EditHparams(), "memory", c0=c0)
    other.replay([records[0], records[2]])
    assert other.digest() == two
    # Records from before the memory carry no row keys: they are computed from the facts, in
    # a pass of their own, which gives the batch's keys to rounding (not bit for bit: batches
    # of other widths round differently), so the memories match, not their digests. Row keys
    # are stored in float16, so a rounding that lands on the other side of a float16 step moves
    # a key by one float16 step: compare at that precision.
    bare = [replace(r, row_keys=None) for r in records]
    other.replay(bare)
    assert other.memory is not None
    torch.testing.assert_close(other.memory.keys, three.keys, rtol=1e-3, atol=1e-4)
    assert torch.equal(other.memory.values, three.values)
    other.replay([])


def test_row_keys_from_the_facts_equal_those_z_star_records(
    lm: LoadedModel, records: list[DeltaRecord]
) -> None:
    batch = [r.facts[0] for r in records]
    stored = torch.cat([r.row_keys for r in records if r.row_keys is not None])
    assert torch.equal(compute_row_keys(lm, batch, EditHparams()), stored)
    # And they survive the record's bytes and a record's slicing.
    record = records[0]
    restored = DeltaRecord.from_bytes(record.to_bytes())
    assert restored.row_keys is not None and torch.equal(restored.row_keys, stored[:1])
    sliced = record.rows([0]).row_keys
    assert sliced is not None and torch.equal(sliced, stored[:1])


def test_editing_passes_never_see_the_installed_memory(
    memory_editor: Editor, records: list[DeltaRecord]
) -> None:
    """z* and keys are computed with no memory, so a record is the same whatever is installed:
    the memory stays a function of records computed on W0."""
    second = records[1].facts[0]
    alone = memory_editor.compute([second], record_id="x")
    memory_editor.install(records[0])
    assert memory_editor.memory is not None
    with_memory = memory_editor.compute([second], record_id="x")
    assert torch.equal(alone.residual, with_memory.residual)
    for layer, keys in alone.keys.items():
        assert torch.equal(keys, with_memory.keys[layer])


def test_a_trace_consults_the_memory_it_names(
    memory_editor: Editor, lm: LoadedModel, records: list[DeltaRecord]
) -> None:
    """A planned change's memory can be scored before it is installed (the probes do)."""
    fact = records[1].facts[0]
    change = memory_editor.plan_install(records[1])
    assert installed_memory(lm.model) is None
    plain = _logits(lm, fact.prompt)
    with Trace(memory=change.memory):
        planned = _logits(lm, fact.prompt)
    memory_editor.commit(change)
    assert torch.equal(_logits(lm, fact.prompt), planned)
    assert not torch.equal(planned, plain)


def test_the_memory_with_a_weight_method_and_turned_off(
    lm: LoadedModel, c0: dict, records: list[DeltaRecord]
) -> None:
    both = Editor(lm, EditHparams(memory_threshold=0.9), "d4s", c0=c0)
    try:
        both.install(records[2])
        assert both.memory is not None and both.memory.threshold == 0.9
        assert any(not torch.equal(w, both.w0[k]) for k, w in both.live_weights().items())
    finally:
        both.replay([])
    assert Editor(lm, EditHparams(), "d4s", c0=c0).memory_threshold == 0.0
    with pytest.raises(ValueError, match="memory threshold must be above 0"):
        Editor(lm, EditHparams(memory_threshold=0.0), "memory", c0=c0)
    with pytest.raises(ValueError, match="memory_threshold"):
        EditHparams(memory_threshold=1.5)


def test_entries_repeat_each_fact_value_for_its_rows() -> None:
    """Pure logic: a fact's P rows share its residual, and keys are unit rows."""
    from editing.facts import Fact as F

    record = DeltaRecord(
        id="r",
        facts=(F("a", "a is", "x"), F("b", "b is", "y")),
        keys={3: torch.zeros(2, 4)},
        residual=torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    )
    row_keys = torch.arange(2 * 3 * 4, dtype=torch.float16).reshape(2, 3, 4) + 1
    entries = Entries.of(record, row_keys, torch.device("cpu"))
    assert entries.values.tolist() == [[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3
    assert torch.allclose(entries.keys.norm(dim=1), torch.ones(6))


def test_an_entry_near_ordinary_text_needs_more_to_match() -> None:
    """Pure logic: an entry's threshold rises above its nearest reference key by the margin, so
    ordinary text never matches it; an entry far from every reference key keeps the global one."""
    from editing.facts import Fact as F
    from editing.keyed_memory import KeyedMemory

    record = DeltaRecord(
        id="r",
        facts=(F("a", "a is", "x"), F("b", "b is", "y")),
        keys={3: torch.zeros(2, 3)},
        residual=torch.tensor([[1.0], [2.0]]),
    )
    # Fact a's key is ordinary text's first key, slightly turned; fact b's is far from both.
    row_keys = torch.tensor([[[1.0, 0.05, 0.0]], [[0.0, 0.0, 1.0]]], dtype=torch.float16)
    reference = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]))
    entries = Entries.of(record, row_keys, torch.device("cpu"), reference)
    plain = Entries.of(record, row_keys, torch.device("cpu"))
    assert entries.floors[0] > 0.99 and entries.floors[1] == pytest.approx(0.0, abs=1e-6)
    assert plain.floors.tolist() == [-1.0, -1.0] and plain.digest != entries.digest

    memory = KeyedMemory.of([entries], threshold=0.9, key_layer=3, value_layer=7, margin=0.02)
    assert memory is not None
    assert memory.thresholds[0] == pytest.approx(float(entries.floors[0]) + 0.02)
    assert memory.thresholds[1] == pytest.approx(0.9)
    assert not memory.match(reference).hit.any()  # ordinary text: no match at all
    own = memory.match(torch.nn.functional.normalize(row_keys.reshape(2, 3).float()))
    assert own.hit.tolist() == [False, True]  # a's key is too near ordinary text to trust
    near_b = memory.match(torch.tensor([[0.0, 0.3, 1.0]]))  # cosine 0.96 to b's key
    assert near_b.hit.tolist() == [True] and near_b.index.tolist() == [1]
    unguarded = KeyedMemory.of([plain], threshold=0.9, key_layer=3, value_layer=7, margin=0.02)
    assert unguarded is not None and unguarded.match(reference[:1]).hit.tolist() == [True]


def test_reference_keys_are_ordinary_texts_first_layer_inputs(
    lm: LoadedModel, cache_dir: Path
) -> None:
    """The reference is unit rows of covariance text at the first edited layer, cached on disk."""
    from editing.covariance import _REFERENCE, reference_keys

    layer = EditHparams().layers[0]
    keys = reference_keys(lm, layer, 512, cache_dir=cache_dir)
    assert keys.shape == (512, lm.model.config.intermediate_size)
    assert torch.allclose(keys.float().norm(dim=1), torch.ones(512), atol=2e-3)
    forget = [memo for memo in _REFERENCE if memo[2] == 512]  # (the others serve later tests)
    for memo in forget:
        del _REFERENCE[memo]  # the next call reads the file
    assert torch.equal(reference_keys(lm, layer, 512, cache_dir=cache_dir), keys)
    # Found in the process, the keys are still left in another cache asked for, where other
    # processes (replicas started on that cache) would otherwise compute them again.
    elsewhere = cache_dir / "elsewhere"
    assert torch.equal(reference_keys(lm, layer, 512, cache_dir=elsewhere), keys)
    stored = list(elsewhere.rglob(f"reference-layer{layer}-512.safetensors"))
    assert len(stored) == 1 and torch.equal(load_file(stored[0])["keys"], keys)


def test_ordinary_text_runs_unchanged_under_installed_entries(
    memory_editor: Editor, lm: LoadedModel, records: list[DeltaRecord]
) -> None:
    """Text from the reference sample matches no entry: its logits stay bit-identical."""
    text = corpus.split(corpus.load_texts(corpus.WIKI))[0][0]
    ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
        for record in records:
            memory_editor.install(record)
        assert memory_editor.reference is not None and memory_editor.memory is not None
        assert torch.equal(lm.model(input_ids=ids).logits, before)
        assert _held(lm, records[0].facts[0])
