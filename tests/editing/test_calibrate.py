"""``editserve calibrate``: the choice rules, a short calibration on the real model, and what
happens to a model that has none."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editing.calibrate import (
    FACTS,
    Calibration,
    calibrate,
    calibration_key,
    find_calibration,
    nice,
    save_calibration,
    windows,
)
from editing.facts import load_facts
from editing.hparams import EditHparams
from editing.models import LoadedModel, default_cache_dir


@pytest.mark.parametrize(
    ("value", "rounded"),
    [(2038.0, 2000.0), (1215.0, 1000.0), (1300.0, 1500.0), (7.0, 5.0), (0.042, 0.05), (9.9, 10.0)],
)
def test_lambda_rounds_to_one_of_five_steps_a_decade(value: float, rounded: float) -> None:
    assert nice(value) == pytest.approx(rounded)


def test_windows_rank_by_their_worst_block_and_stay_inside_the_measured_blocks() -> None:
    conditions = {
        1: 9000.0,
        2: 80000.0,
        3: 170.0,
        4: 250.0,
        5: 280.0,
        6: 280.0,
        7: 500.0,
        8: 1400.0,
    }
    ranked = windows(conditions, width=5)
    assert ranked[0] == (3, 4, 5, 6, 7)
    assert ranked[1] == (4, 5, 6, 7, 8)
    assert {w[0] for w in ranked} == {1, 2, 3, 4}  # 5-9 would reach past the measured blocks
    assert ranked[-1] in {(1, 2, 3, 4, 5), (2, 3, 4, 5, 6)}


def test_the_default_model_ships_a_calibration_that_is_found_in_any_dtype(
    lm: LoadedModel, tmp_path: Path
) -> None:
    shipped = find_calibration(lm, tmp_path)
    assert shipped is not None and shipped.fingerprint == calibration_key(lm)
    # The same weights in bfloat16 are the same model.
    half = dataclasses.replace(lm, model=_Bf16First(lm))
    assert calibration_key(half) == calibration_key(lm)
    # Another spec (the same weights from another folder) is another model: no calibration.
    elsewhere = dataclasses.replace(lm, spec="/models/some-other-copy")
    assert find_calibration(elsewhere, tmp_path) is None
    # A calibration in the cache wins over the shipped one.
    own = dataclasses.replace(shipped, layers=(4, 5, 6, 7, 8), evidence={})
    save_calibration(own, tmp_path)
    found = find_calibration(lm, tmp_path)
    assert found is not None and found.layers == (4, 5, 6, 7, 8)
    assert found.hparams().layers == (4, 5, 6, 7, 8)
    assert found.hparams(EditHparams(rect_keep=0.2)).rect_keep == 0.2


class _Bf16First(torch.nn.Module):
    """Stands in for the model where only its config and first parameter are read."""

    def __init__(self, lm: LoadedModel) -> None:
        super().__init__()
        self.config = lm.model.config
        first = next(lm.model.parameters()).detach()
        self.first = torch.nn.Parameter(first.to(torch.bfloat16), requires_grad=False)


def test_a_short_calibration_measures_chooses_and_leaves_the_weights(
    lm: LoadedModel, cache_dir: Path
) -> None:
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    said: list[str] = []
    found = calibrate(
        lm,
        method="d4s",  # edits the weights, so that putting them back is checked
        cache_dir=cache_dir,
        facts=load_facts(FACTS, 2),
        tokens=2000,
        candidates=2,
        heldout_tokens=256,
        blocks=list(range(3, 9)),
        max_steps=4,
        say=said.append,
    )
    after = dict(lm.model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    tried = found.evidence["windows"]
    assert len(tried) == 2 and tuple(tried[0]["layers"]) != tuple(tried[1]["layers"])
    assert list(found.layers) in [row["layers"] for row in tried]
    chosen = next(row for row in tried if row["layers"] == list(found.layers))
    # The rules of the module doc, applied to what was measured.
    assert found.mom2_lambda == nice(chosen["median_key_spread"] / 1.3)
    assert found.v_steps >= 25 and found.v_steps % 5 == 0
    assert any("condition number" in line for line in said)
    assert any(line.startswith("chose mom2_lambda") for line in said)
    # It round-trips through its file.
    path = save_calibration(found, cache_dir / "own")
    assert Calibration.read(path) == found


FILE = ["--facts", str(Path(__file__).parents[1] / "data" / "facts.json")]


def test_eval_refuses_a_model_without_calibration_and_names_the_command(lm: LoadedModel) -> None:
    folder = default_cache_dir() / "models" / "smollm2-135m"  # the default, loaded by path
    assert folder.is_dir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "eval",
            "--model",
            str(folder),
            "--limit",
            "1",
            *FILE,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert f"editserve calibrate --model {folder}" in done.stderr
    assert "--layers" in done.stderr  # the other way out
