"""The capacity study's variant names (``bench/capacity_variants.py``) and what they build: the
engine's own methods and keyed memory (tested in tests/editing/test_keyed_memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from editing.hparams import EditHparams
from editing.models import LoadedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from capacity_variants import variant


def test_variant_names_combine_tokens() -> None:
    spec = variant("lam8000+rect0.2+mem0.85+nas")
    assert spec.hp_changes == {"mom2_lambda": 8000.0, "rect_keep": 0.2}
    assert spec.memory == 0.85 and spec.nas and spec.weights
    assert not variant("w0+mem0.9").weights
    with pytest.raises(ValueError, match="unknown variant token"):
        variant("base+bogus")


def test_variants_build_the_engines_methods_and_memory(lm: LoadedModel, c0: dict) -> None:
    hp = EditHparams()
    alone = variant("w0").editor(lm, hp, c0)
    assert alone.method.name == "memory" and alone.memory_threshold == 0.9
    both = variant("lam8000+mem0.8").editor(lm, hp, c0)
    assert both.method.name == "d4s" and both.memory_threshold == 0.8
    assert both.hp.mom2_lambda == 8000.0
    assert variant("base").editor(lm, hp, c0).memory_threshold == 0.0
