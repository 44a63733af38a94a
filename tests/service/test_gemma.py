"""The second real model family, Gemma 3 270M (``gemma3_text``: a norm after the MLP output,
sliding-window attention, a 262k vocabulary), through the whole service: an edit served by
``/generate``, a restart that replays it from the log without z*, and a revert to the digest
the server started with."""

from __future__ import annotations

from pathlib import Path

import pytest
from svc_helpers import Live, live_server, server_settings, wait_status

from editing.models import LoadedModel, load_model

pytestmark = pytest.mark.model

EIFFEL = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "paraphrases": ["Tourists visit the Eiffel Tower, which stands in the city of"],
}


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    # Converted once to the same cache as the default model (``make setup`` installs its packages).
    return load_model("gemma3-270m", device="cpu", dtype="float32")


def _greedy(live: Live, prompt: str) -> str:
    r = live.client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    text: str = r.json()["generated_text"]
    return text


def test_gemma3_edit_is_served_replayed_and_reverted(
    gemma: LoadedModel, server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    # The calibration's 50 z* steps buy nothing this test checks (25 flip the fact), and the
    # memory's reference sample need not be the default's size to set its entries' floors.
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path / "data",
        model="gemma3-270m",
        v_steps=25,
        memory_reference_tokens=4096,
    )
    with live_server(settings, gemma, {}) as live:
        start = live.client.get("/info").json()
        assert start["method"] == "memory"
        assert _greedy(live, EIFFEL["prompt"]).startswith(" Paris")
        accepted = live.client.post("/edits", json=EIFFEL).json()
        edit = wait_status(live.client, accepted["id"], {"applied", "failed", "rejected"}, 300)
        assert edit["status"] == "applied", edit
        prompt_score = edit["scores"]["facts"][0]["prompts"][0]
        assert prompt_score["p_target_after"] > 0.5 > prompt_score["p_target_before"]
        assert _greedy(live, EIFFEL["prompt"]).startswith(" Rome")
        assert _greedy(live, EIFFEL["paraphrases"][0]).startswith(" Rome")
        edited = live.client.get("/info").json()
        assert edited["weights_digest"] != start["weights_digest"]
        assert edited["memory"]["entries"] == 4
        assert edited["probes"] is not None, edited  # the locality probes ran on Gemma

    # A restart on the same log replays the record: the same served model, no z* run again.
    # (The probes ran on Gemma above; a pass over its 262k-token vocabulary adds nothing here.)
    with live_server(settings.model_copy(update={"probes": "off"}), gemma, {}) as live:
        replayed = live.client.get("/info").json()
        assert replayed["weights_digest"] == edited["weights_digest"]
        assert _greedy(live, EIFFEL["prompt"]).startswith(" Rome")
        r = live.client.post(f"/edits/{accepted['id']}/revert")
        assert r.status_code == 202, r.text
        wait_status(live.client, accepted["id"], {"reverted"})
        assert live.client.get("/info").json()["weights_digest"] == start["weights_digest"]
        assert _greedy(live, EIFFEL["prompt"]).startswith(" Paris")
