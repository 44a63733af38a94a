"""``editserve export`` and ``GET /export/edits``: the edited model leaves editserve as a
checkpoint plain transformers loads, or as a delta that rebuilds the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from svc_helpers import live_server, server_settings, wait_status

from editing.adapters import adapter_for
from editing.fingerprint import fingerprint
from editing.models import LoadedModel
from service.export import MANIFEST, ExportError, apply_delta, export

FACTS = [
    {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in the city of",
        "target_new": "Rome",
        "reason": "ticket 1",
    },
    {
        "subject": "Pablo Picasso",
        "prompt": "The mother tongue of Pablo Picasso is",
        "target_new": "German",
    },
]

# A fresh interpreter with nothing of editserve's: what a user of the checkpoint runs.
GENERATE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
out = []
for prompt in prompts:
    enc = tok(prompt, return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=4, do_sample=False)
    out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps(out))
"""


def _export(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "export", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_export_rebuilds_the_edited_model_for_transformers_and_as_a_delta(
    lm: LoadedModel, c0: dict, server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    settings = server_settings(server_cache, covariance_tokens, data, probes="off")
    with live_server(settings, lm, c0) as live:
        ids = [live.client.post("/edits", json=fact).json()["id"] for fact in FACTS]
        versions = [wait_status(live.client, i, {"applied"})["model_version"] for i in ids]
        lines = live.client.get("/export/edits")
        assert lines.headers["content-type"].startswith("application/x-ndjson")
        exported = [json.loads(line) for line in lines.text.splitlines()]
    # Oldest first, in the shape POST /edits takes, with who, why and the version beside it.
    assert [e["edit"]["id"] for e in exported] == ids
    assert exported[0]["reason"] == "ticket 1" and exported[0]["edit"]["submitted_by"] == "local"
    assert exported[1]["facts"][0]["target_new"] == "German"
    assert [e["edit"]["model_version"] for e in exported] == versions

    env = {
        "EDITSERVE_CACHE_DIR": str(server_cache),
        "EDITSERVE_COVARIANCE_TOKENS": str(covariance_tokens),
        "EDITSERVE_DATA_DIR": str(data),
        "EDITSERVE_DTYPE": "float32",
    }
    hf = tmp_path / "hf"
    done = _export(env, str(hf), "--format", "hf")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((hf / MANIFEST).read_text())
    assert manifest["active_edits"] == ids and manifest["model_version"] == versions[-1]
    assert manifest["weights_from"].startswith("d4s")  # the memory, solved into the weights
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()
    prompts = [fact["prompt"] for fact in FACTS] + ["The capital of France is"]
    answered = subprocess.run(
        [sys.executable, "-c", GENERATE, str(hf), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rome, german, paris = json.loads(answered.stdout)
    assert rome.startswith(" Rome") and german.startswith(" German"), (rome, german)
    assert paris.startswith(" Paris"), paris

    # The delta of the first version, added to the original weights, is the same model (made
    # in this process: the command's own path is the one above).
    delta = tmp_path / "delta"
    export(settings, delta, "delta", versions[0], say=lambda _: None)
    first = json.loads((delta / MANIFEST).read_text())
    assert (
        first["active_edits"] == ids[:1] and first["weights_digest"] != manifest["weights_digest"]
    )
    adapter = adapter_for(lm.model)
    pristine = {layer: adapter.read(lm.model, layer).clone() for layer in first["edited_layers"]}
    try:
        apply_delta(lm, delta)
        digest = _digest(lm, first["edited_layers"])
    finally:
        for layer, weight in pristine.items():
            adapter.write(lm.model, layer, weight)
    assert digest == first["weights_digest"]

    # A version the log never reached, or a folder in use: a clear error, nothing written.
    with pytest.raises(ExportError, match="no model version"):
        export(settings, tmp_path / "later", "hf", versions[-1] + 100)
    assert not (tmp_path / "later").exists()
    done = _export(env, str(hf))
    assert done.returncode == 2 and "not empty" in done.stderr


def _digest(lm: LoadedModel, layers: list[int]) -> str:
    """The weights digest (``Editor.digest``) of ``lm`` as it is, with no keyed memory."""
    adapter = adapter_for(lm.model)
    return fingerprint(
        [adapter.parameter(lm.model, layer).detach() for layer in layers]
    ).hexdigest()
