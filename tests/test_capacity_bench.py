"""The capacity study's variants (``bench/capacity_variants.py``): names, and the memory tier on
the real model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from editing import metrics
from editing.editor import Editor
from editing.facts import Fact
from editing.hparams import EditHparams
from editing.models import LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from capacity_variants import MemoryTier, variant


def test_variant_names_combine_tokens() -> None:
    spec = variant("lam8000+rect0.2+mem0.85+nas")
    assert spec.hp_changes == {"mom2_lambda": 8000.0, "rect_keep": 0.2}
    assert spec.memory == 0.85 and spec.nas and spec.weights
    assert not variant("w0+mem0.9").weights
    with pytest.raises(ValueError, match="unknown variant token"):
        variant("base+bogus")


def _logits(lm: LoadedModel, text: str) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def test_the_memory_alone_makes_an_edit_hold_and_leaves_other_text_alone(
    lm: LoadedModel, c0: dict, facts: list[Fact]
) -> None:
    fact = next(f for f in facts if f.ground_truth is not None)
    editor = Editor(lm, EditHparams(), "d4s", c0=c0)
    record = editor.compute([fact])
    other = "The weather in the mountains was cold and clear that morning."
    before_prompt, before_other = _logits(lm, fact.prompt), _logits(lm, other)
    assert not metrics.counterfact_outcomes(lm, [fact])[0]["efficacy"][0][0]
    with MemoryTier(editor, [record], 0.9) as tier:
        assert metrics.counterfact_outcomes(lm, [fact])[0]["efficacy"][0][0]
        assert torch.equal(_logits(lm, other), before_other)  # no key there matches
        assert tier.fired > 0
    # The hooks leave with the context: the model answers as before.
    assert torch.equal(_logits(lm, fact.prompt), before_prompt)
