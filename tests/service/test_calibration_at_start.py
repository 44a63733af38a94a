"""A server takes its edited blocks from the model's calibration, and refuses a model without
one unless the blocks are given."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from svc_helpers import start_worker

from editing.calibrate import find_calibration
from editing.models import LoadedModel
from service.settings import Settings


def test_an_uncalibrated_model_is_refused_unless_its_blocks_are_given(
    make_settings: Callable[..., Settings], lm: LoadedModel, c0: dict
) -> None:
    # The default model's weights under another name: a model editserve has no calibration for.
    other = dataclasses.replace(lm, spec="/models/an-uncalibrated-copy")
    refused = start_worker(make_settings(), other, c0)
    try:
        assert not refused.ready and refused.state.phase == "failed"
        assert "editserve calibrate --model" in (refused.state.error or "")
        assert "EDITSERVE_LAYERS" in (refused.state.error or "")
    finally:
        refused.stop()
    given = start_worker(
        make_settings(layers="4-6", probes="off", memory_reference_tokens=512), other, c0
    )
    try:
        assert given.ready, given.state.error
        assert given.editor is not None and given.editor.hp.layers == (4, 5, 6)
    finally:
        given.stop()


def test_the_calibration_sets_what_the_settings_leave_unset(
    make_settings: Callable[..., Settings], lm: LoadedModel, c0: dict
) -> None:
    worker = start_worker(make_settings(probes="off", v_steps=7), lm, c0)
    try:
        assert worker.ready, worker.state.error
        assert worker.editor is not None
        hp, shipped = worker.editor.hp, find_calibration(lm, None)
        assert shipped is not None
        assert (hp.layers, hp.mom2_lambda) == (shipped.layers, shipped.mom2_lambda)
        assert hp.v_steps == 7 != shipped.v_steps  # the setting's
    finally:
        worker.stop()
