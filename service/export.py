"""``editserve export``: the edited model, rebuilt from the edit log, for another serving stack.

The log is read as a replica reads it (``service.rebuild.read_log``, without marking anything)
up to a ``model_version``, and the stored records are installed on the original weights with no
z*. Two formats:

- ``hf``: a Hugging Face checkpoint (config, tokenizer, generation config, safetensors) that
  transformers, vLLM and TGI load as any other;
- ``delta``: only the edited matrices' change ``W - W0``, float64 so that ``W0 + dW`` gives the
  edited float32 matrix bit for bit (``apply_delta``).

Both carry ``editserve-manifest.json``: the base model, the version, the active edit ids and the
weights' digest (``Editor.digest`` of the exported weights).

The keyed memory lives outside the weights, and no other stack runs it: a server on the
``memory`` method exports its active records solved into the weights by d4s + RECT (the same
records, no z*), which holds most edits at small N (``docs/results.md``) and says so in the
manifest. Families whose MLP output is normalised (Gemma 2 and 3) have no weight method, and are
refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editing.calibrate import NotCalibratedError, calibration_key, find_calibration
from editing.editor import Editor
from editing.files import write_atomically
from editing.models import LoadedModel, load_model
from service.editlog.base import EditLog
from service.log_settings import SettingsMismatch, check_settings, weight_settings
from service.rebuild import BadRecord, LogState, read_log
from service.runtime import open_log
from service.settings import Settings

MANIFEST = "editserve-manifest.json"
DELTA = "delta.safetensors"
FORMATS = ("hf", "delta")


class ExportError(ValueError):
    """The export cannot be made as asked (the message says why); nothing was written."""


def export(
    settings: Settings,
    out: Path,
    fmt: str,
    version: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the model at ``version`` (None: the newest) to ``out`` in ``fmt``; its manifest."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty")
    log = open_log(settings)
    try:
        newest = _read(log)
        if version is not None and not 0 <= version <= newest.version:
            raise ExportError(
                f"no model version {version}: the log's versions run from 0 to {newest.version}"
            )
        state = newest if version is None else _read(log, until=version)
        stored = log.stored_settings()
    finally:
        log.close()
    say(f"{len(state.records)} active edits at model version {state.version}")

    lm = load_model(
        settings.model, device="cpu", dtype=settings.dtype, cache_dir=settings.cache_dir
    )
    calibration = find_calibration(lm, settings.cache_dir)
    if calibration is None and settings.layers is None:
        raise NotCalibratedError(settings.model, calibration_key(lm))
    hp = settings.hparams(calibration)
    try:
        check_settings(stored, weight_settings(settings, lm, hp))
    except SettingsMismatch as exc:
        raise ExportError(str(exc)) from None
    method = settings.method
    baked = method == "memory"
    if baked:
        method, hp = "d4s", hp.with_(memory_threshold=0.0)
        say("the memory method keeps edits outside the weights: solving them in with d4s")
    editor = Editor(
        lm,
        hp,
        method,
        cache_dir=settings.cache_dir,
        corpus_source=settings.corpus,
        covariance_tokens=settings.covariance_tokens,
    )
    editor.replay(state.records)
    manifest = {
        "base_model": settings.model,
        "calibration_key": calibration_key(lm),
        "format": fmt,
        "model_version": state.version,
        "method": settings.method,
        "weights_from": "d4s solve of the keyed memory's records" if baked else settings.method,
        "edited_layers": list(hp.layers),
        "active_edits": [record.id for record in state.records],
        "weights_digest": editor.digest(),
    }
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        lm.model.save_pretrained(out, safe_serialization=True)
        lm.tokenizer.save_pretrained(out)
    else:
        save_file(_deltas(editor), str(out / DELTA), metadata={"format": "editserve-delta-1"})
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    editor.replay([])  # the model object goes back to W0 for whoever holds it next
    return manifest


def _read(log: EditLog, until: int | None = None) -> LogState:
    try:
        return read_log(log, until=until, mark=False)
    except BadRecord as exc:
        raise ExportError(str(exc)) from None


def _deltas(editor: Editor) -> dict[str, torch.Tensor]:
    names = {id(p): name for name, p in editor.lm.model.named_parameters()}
    found = {}
    for layer in editor.hp.layers:
        weight = editor.adapter.parameter(editor.lm.model, layer)
        change = weight.detach().double() - editor.w0[layer].double()
        found[names[id(weight)]] = change.cpu().contiguous()
    return found


def apply_delta(lm: LoadedModel, folder: Path) -> None:
    """Add a ``delta`` export's changes to ``lm``'s original weights, in place."""
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for name, change in load_file(str(folder / DELTA)).items():
            weight = params[name]
            weight.copy_((weight.double() + change.to(weight.device)).to(weight.dtype))
