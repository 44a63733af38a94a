"""The settings that define a log's weights, kept in the log itself.

The live weights are a pure function of the log's records *and* of the settings that install
them: the model, the method, the edited blocks, lambda, RECT's share, the memory's thresholds,
the covariance sample. A replica started with other values would serve other weights from the
same log. The first process to serve a log stores these settings in it
(``EditLog.adopt_settings``); every later one compares its own and refuses to start on a
difference, naming the setting. Changing them means a new log (another data directory or Redis
prefix) into which the active edits are imported (``editserve edits export`` then ``import``):
the records were computed for the old values.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from editing.calibrate import calibration_key
from editing.hparams import EditHparams
from editing.methods import METHODS
from editing.models import LoadedModel
from service.editlog.base import EditLog
from service.settings import Settings, env_var

# Editing parameters that are also server settings: a difference in one of these is named by
# its environment variable too.
_SETTINGS = frozenset(
    {
        "layers",
        "mom2_lambda",
        "v_steps",
        "rect_keep",
        "solve_dtype",
        "memory_threshold",
        "memory_reference_tokens",
        "covariance_tokens",
        "corpus",
        "method",
        "model",
        "dtype",
    }
)


class SettingsMismatch(Exception):
    """This process's weight settings differ from those stored in the log it would serve."""

    def __init__(self, differences: dict[str, tuple[str, str]]) -> None:
        self.differences = differences
        said = "; ".join(
            f"{name}{_where(name)} is {theirs} in the log and {ours} here"
            for name, (theirs, ours) in sorted(differences.items())
        )
        super().__init__(
            f"this log's edits were made with other settings that define the weights: {said}. "
            "Start with the log's settings, or serve a new log (another EDITSERVE_DATA_DIR or "
            "EDITSERVE_REDIS_PREFIX) and import the active edits into it (editserve edits "
            "export, then editserve edits import)"
        )


def _where(name: str) -> str:
    return f" ({env_var(name)})" if name in _SETTINGS else ""


def weight_settings(settings: Settings, lm: LoadedModel, hp: EditHparams) -> dict[str, str]:
    """What defines the weights served from a log with ``settings`` on ``lm`` with ``hp``, each
    value as JSON text: the model (with its fingerprint), the dtype edits are computed in, the
    method with its parameters as resolved, and the covariance sample."""
    hparams = asdict(hp)
    del hparams["state_device"]  # where the solve runs: a setting of the machine, like device
    if hp.memory_threshold is None and settings.method in METHODS:  # the method's own
        hparams["memory_threshold"] = METHODS[settings.method].memory_threshold
    values = {
        "model": f"{settings.model} (fingerprint {calibration_key(lm)})",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "method": settings.method,
        "covariance_tokens": settings.covariance_tokens,
        "corpus": settings.corpus,
        **hparams,
    }
    return {name: json.dumps(value, sort_keys=True) for name, value in values.items()}


def check_settings(stored: dict[str, str] | None, ours: dict[str, str]) -> None:
    """Raise :class:`SettingsMismatch` when the log's ``stored`` settings differ from ``ours``.
    A setting only one side has (an older or newer editserve) is not a difference."""
    if stored is None:
        return
    differences = {
        name: (stored[name], value)
        for name, value in ours.items()
        if name in stored and stored[name] != value
    }
    if differences:
        raise SettingsMismatch(differences)


def settle_settings(edit_log: EditLog, ours: dict[str, str]) -> None:
    """Store ``ours`` in ``edit_log`` if it has no settings yet, else raise
    :class:`SettingsMismatch` if it has others."""
    check_settings(edit_log.adopt_settings(ours), ours)
