"""The unedited model's measurements in a study: each fact scored once for every prefix, and the
whole measurement kept on disk for the next method of the study."""

from __future__ import annotations

from pathlib import Path

import pytest

from editing import metrics
from editing.evaluate import measure_unedited
from editing.facts import Fact
from editing.models import LoadedModel


def test_a_prefix_of_outcomes_summarises_to_scoring_that_prefix(
    lm: LoadedModel, facts: list[Fact]
) -> None:
    outcomes = metrics.counterfact_outcomes(lm, facts)
    assert len(outcomes) == len(facts)
    for n in (1, 3, len(facts)):
        summary = metrics.summarise_outcomes(outcomes[:n])
        assert summary == pytest.approx(metrics.counterfact_scores(lm, facts[:n]), rel=1e-5)


def test_unedited_measurements_are_kept_and_keyed_by_every_input(
    lm: LoadedModel, facts: list[Fact], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heldout = [f"{f.prompt} {f.target_new}." for f in facts]
    fluency = [facts[0].prompt]
    stored = measure_unedited(lm, facts, [2, 4], heldout, 64, fluency, cache=tmp_path)
    assert stored == measure_unedited(lm, facts, [2, 4], heldout, 64, fluency)
    before, _ = stored
    assert before[2]["locality"] == metrics.locality_argmax(lm, facts[:2])
    # Scored in one batch with all the facts, padded to another length than the prefix alone:
    # float32 products then differ in the sixth digit (1.8e-6 relative seen on a 2-core Xeon).
    assert before[2]["scores"] == pytest.approx(metrics.counterfact_scores(lm, facts[:2]), rel=1e-5)

    def measured_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again")

    for name in ("counterfact_outcomes", "locality_argmax", "perplexity", "fluency"):
        monkeypatch.setattr(metrics, name, measured_again)
    assert measure_unedited(lm, facts, [2, 4], heldout, 64, fluency, cache=tmp_path) == stored
    # Another input is another measurement: fewer held-out tokens, other marks.
    for changed in (
        (lm, facts, [2, 4], heldout, 32, fluency),
        (lm, facts, [1, 4], heldout, 64, fluency),
    ):
        with pytest.raises(AssertionError, match="measured again"):
            measure_unedited(*changed, cache=tmp_path)
