import torch

from editing.facts import Fact, Locality
from editing.records import DeltaRecord, record_notes


def _record() -> DeltaRecord:
    facts = (
        Fact("A", "A is in", "X", "Y", ("Where is A?",), (Locality("B is in", "Y"),), {"k": 1}),
        Fact("C", "C is in", "Z"),
    )
    return DeltaRecord(
        id="r1",
        facts=facts,
        keys={3: torch.randn(2, 6), 4: torch.randn(2, 6)},
        residual=torch.randn(2, 4),
        stats={"nll_after": [0.1, 0.2]},
    )


def test_roundtrip_is_exact() -> None:
    record = _record()
    back = DeltaRecord.from_bytes(record.to_bytes())
    assert back.id == record.id and back.facts == record.facts
    assert back.facts[0].metadata == {"k": 1}
    assert all(torch.equal(back.keys[k], record.keys[k]) for k in record.keys)
    assert torch.equal(back.residual, record.residual)
    assert back.stats == record.stats


def test_notes_travel_with_the_bytes_and_leave_the_record_as_it_was() -> None:
    record = _record()
    plain, noted = record.to_bytes(), record.to_bytes({"weights_digest": "ab12", "version": "7"})
    assert record_notes(plain) == {}
    assert record_notes(noted) == {"weights_digest": "ab12", "version": "7"}
    back = DeltaRecord.from_bytes(noted)
    assert back.facts == record.facts and back.stats == record.stats
    assert torch.equal(back.residual, record.residual)


def test_without_drops_rows_of_superseded_facts() -> None:
    record = _record()
    assert record.without({("Q", "Q")}) is record
    rest = record.without({("A", "A is in")})
    assert rest is not None and [f.subject for f in rest.facts] == ["C"]
    assert torch.equal(rest.keys[3], record.keys[3][1:])
    assert torch.equal(rest.residual, record.residual[1:])
    assert record.without({("A", "A is in"), ("C", "C is in")}) is None
