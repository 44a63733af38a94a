"""``POST /edits/preview`` computes an edit and what it would change, and changes nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from svc_helpers import live_server, server_settings, wait_status

from editing.models import LoadedModel

FACT = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "paraphrases": ["Tourists visit the Eiffel Tower, which stands in the city of"],
}


def test_a_preview_matches_the_edit_made_for_real_and_leaves_the_model_alone(
    lm: LoadedModel, c0: dict, server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    settings = server_settings(server_cache, covariance_tokens, tmp_path / "data")
    with live_server(settings, lm, c0) as live:
        c = live.client
        info = c.get("/info").json()
        asked = {**FACT, "prompts": [FACT["prompt"]]}
        r = c.post("/edits/preview", json=asked)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["verdict"] == "pass" and seen["would_supersede"] == []
        assert seen["generations"][0]["before"].startswith(" Paris")
        assert seen["generations"][0]["after"].startswith(" Rome")
        prompts = seen["scores"]["facts"][0]["prompts"]
        assert all(p["p_target_after"] > p["p_target_before"] for p in prompts)
        assert seen["scores"]["probes"]["agreement"] > 0.9
        # Nothing changed: not the weights, not the version, not the log.
        after = c.get("/info").json()
        assert after["weights_digest"] == info["weights_digest"]
        assert after["model_version"] == info["model_version"] == seen["model_version"]
        assert c.get("/edits").json()["edits"] == []
        gen = c.post(
            "/generate", json={"inputs": FACT["prompt"], "parameters": {"max_new_tokens": 3}}
        )
        assert gen.json()["generated_text"].startswith(" Paris")

        # The same edit made for real scores what the preview said it would.
        edit_id = c.post("/edits", json=FACT).json()["id"]
        made = wait_status(c, edit_id, {"applied"})["scores"]["facts"][0]["prompts"]
        for p, q in zip(prompts, made, strict=True):
            assert p["p_target_before"] == pytest.approx(q["p_target_before"], rel=1e-4)
            assert p["p_target_after"] == pytest.approx(q["p_target_after"], rel=1e-3)

        # A fact the server would refuse is refused here too, and so is a prompt past the limit.
        bad = c.post("/edits/preview", json={**FACT, "prompt": "Nothing about it"})
        assert bad.status_code == 422
        assert bad.headers["content-type"] == "application/problem+json"
        long = c.post("/edits/preview", json={**FACT, "prompts": ["word " * 300]})
        assert long.status_code == 422 and long.json()["field"] == "prompts[0]"

        # One preview at a time (max_previews 1): a second one meanwhile gets 429.
        first: list[httpx.Response] = []
        other = {**FACT, "subject": "Louvre", "prompt": "The Louvre is located in the city of"}
        thread = threading.Thread(
            target=lambda: first.append(
                httpx.post(f"{live.url}/edits/preview", json=other, timeout=300)
            )
        )
        thread.start()
        time.sleep(1.0)
        second = c.post("/edits/preview", json=other)
        thread.join(300)
        assert first[0].status_code == 200, first[0].text
        assert second.status_code == 429 and second.headers["retry-after"]
