"""The HTTP API on a live in-process server with the real model and an SQLite log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
import torch
from svc_helpers import Live, live_server, server_settings, wait_for, wait_status

from editing.models import LoadedModel
from service.generation import Batcher
from service.kv_batch import KVBatch

EIFFEL = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "ground_truth": "Paris",
    "paraphrases": ["Tourists visit the Eiffel Tower, which stands in the city of"],
    "locality": [{"prompt": "The Louvre museum is located in the city of", "answer": "Paris"}],
}
PICASSO = {
    "subject": "Pablo Picasso",
    "prompt": "The mother tongue of Pablo Picasso is",
    "target_new": "German",
}


def greedy(live: Live, prompt: str, n: int = 6) -> dict:
    r = live.client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n}})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def live(
    lm: LoadedModel, c0: dict, server_cache, covariance_tokens: int, tmp_path_factory
) -> Iterator[Live]:
    settings = server_settings(server_cache, covariance_tokens, tmp_path_factory.mktemp("api-data"))
    with live_server(settings, lm, c0) as server:
        yield server


def test_edit_generate_revert_restores_the_digest(live: Live) -> None:
    info0 = live.client.get("/info").json()
    assert greedy(live, EIFFEL["prompt"])["generated_text"].startswith(" Paris")

    r = live.client.post("/edits", json=EIFFEL)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["position"] >= 1
    assert r.headers["location"] == f"/edits/{accepted['id']}"
    edit = wait_status(live.client, accepted["id"], {"applied", "failed", "rejected"})
    assert edit["status"] == "applied", edit
    assert edit["model_version"] > info0["model_version"]

    scores = edit["scores"]["facts"][0]
    prompt, paraphrase = scores["prompts"]
    assert prompt["p_target_after"] > 0.5 > prompt["p_target_before"]
    assert paraphrase["paraphrase"] and paraphrase["p_target_after"] > paraphrase["p_target_before"]
    assert scores["locality"][0]["kl"] >= 0

    edited = greedy(live, EIFFEL["prompt"])
    assert edited["generated_text"].startswith(" Rome")
    assert edited["model_version"] == edit["model_version"]
    info = live.client.get("/info").json()
    assert info["active_edits"] == info0["active_edits"] + 1
    # The default method holds the edit in the keyed memory, one entry per z* row.
    assert info["method"] == "memory" and info["memory"]["threshold"] == 0.9
    assert info["memory"]["entries"] == info0["memory"]["entries"] + 4
    metrics = live.client.get("/metrics").text
    assert f"editserve_memory_entries {float(info['memory']['entries'])}" in metrics

    r = live.client.post(f"/edits/{accepted['id']}/revert")
    assert r.status_code == 202 and r.json()["status"] == "reverting"
    reverted = wait_status(live.client, accepted["id"], {"reverted"})
    assert reverted["reverted_version"] > edit["model_version"] and not reverted["cancelled"]
    assert greedy(live, EIFFEL["prompt"])["generated_text"].startswith(" Paris")
    info = live.client.get("/info").json()
    assert info["weights_digest"] == info0["weights_digest"]
    assert info["memory"] == info0["memory"]

    again = live.client.post(f"/edits/{accepted['id']}/revert")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert again.json()["edit_status"] == "reverted"


def test_unknown_edit_is_404(live: Live) -> None:
    for r in (live.client.get("/edits/0123abcd"), live.client.post("/edits/0123abcd/revert")):
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 404


def test_a_queued_edit_is_cancelled_and_never_applied(live: Live) -> None:
    first = live.client.post("/edits", json=PICASSO).json()
    second = live.client.post("/edits", json={**PICASSO, "target_new": "French"}).json()
    r = live.client.post(f"/edits/{second['id']}/revert")
    assert r.status_code == 202
    cancelled = live.client.get(f"/edits/{second['id']}").json()
    assert cancelled["status"] == "reverted" and cancelled["cancelled"]
    wait_status(live.client, first["id"], {"applied"})
    live.client.post(f"/edits/{first['id']}/revert")
    wait_status(live.client, first["id"], {"reverted"})
    late = live.client.get(f"/edits/{second['id']}").json()
    assert late["applied_at"] is None and late["model_version"] is None


def test_idempotency_key_makes_retries_safe(live: Live) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    fact = {**PICASSO, "target_new": "Italian"}
    one = live.client.post("/edits", json=fact, headers=headers)
    two = live.client.post("/edits", json=fact, headers=headers)
    assert one.status_code == two.status_code == 202
    assert one.json()["id"] == two.json()["id"]
    assert two.headers.get("idempotent-replayed") == "true"
    other = live.client.post("/edits", json={**fact, "target_new": "Greek"}, headers=headers)
    assert other.status_code == 422
    live.client.post(f"/edits/{one.json()['id']}/revert")
    wait_status(live.client, one.json()["id"], {"reverted"})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({**PICASSO, "subject": "Dali"}, "subject"),
        ({**PICASSO, "target_new": ""}, "target_new"),
        ({**PICASSO, "prompt": "Pablo Picasso " + "word " * 300}, "prompt"),
        ({"facts": []}, "facts"),
        ({"facts": [PICASSO, PICASSO]}, "same subject and prompt"),
        ({**PICASSO, "unknown": 1}, "unknown"),
    ],
)
def test_bad_facts_are_refused_and_change_nothing(live: Live, body: dict, needle: str) -> None:
    before = live.runtime.log.last_seq()
    digest = live.client.get("/info").json()["weights_digest"]
    r = live.client.post("/edits", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert needle in r.json()["detail"]
    assert live.runtime.log.last_seq() == before
    assert live.client.get("/info").json()["weights_digest"] == digest


def test_list_edits_pages_newest_first(live: Live) -> None:
    page = live.client.get("/edits", params={"limit": 2}).json()
    assert len(page["edits"]) == 2 and page["next_cursor"]
    rest = live.client.get("/edits", params={"limit": 200, "cursor": page["next_cursor"]}).json()
    seqs = [live.runtime.log.get(e["id"]).seq for e in page["edits"] + rest["edits"]]
    assert seqs == sorted(seqs, reverse=True)
    reverted = live.client.get("/edits", params={"status": "reverted"}).json()["edits"]
    assert reverted and all(e["status"] == "reverted" for e in reverted)
    assert live.client.get("/edits", params={"status": "nonsense"}).status_code == 422


def test_generate_details_stop_and_seeded_sampling(live: Live) -> None:
    prompt = "The capital of Italy is"
    r = live.client.post(
        "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 5, "details": True}}
    ).json()
    details = r["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 5
    assert "".join(t["text"] for t in details["tokens"]) == r["generated_text"]

    stopped = live.client.post(
        "/generate",
        json={
            "inputs": prompt,
            "parameters": {"max_new_tokens": 20, "stop": [","], "details": True},
        },
    ).json()
    full = greedy(live, prompt, 20)["generated_text"]
    if "," in full:
        assert stopped["generated_text"] == full[: full.index(",")]
        assert stopped["details"]["finish_reason"] == "stop_sequence"

    def sample(seed: int) -> str:
        params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.2, "seed": seed}
        return live.client.post("/generate", json={"inputs": prompt, "parameters": params}).json()[
            "generated_text"
        ]

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_generate_stream_speaks_tgi_sse(live: Live) -> None:
    body = {"inputs": "The capital of Italy is", "parameters": {"max_new_tokens": 6}}
    events = []
    with live.client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events and all(e["token"]["id"] >= 0 for e in events)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["finish_reason"] in ("length", "eos_token")
    assert last["generated_text"] == greedy(live, body["inputs"])["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == last["generated_text"]


def test_generate_stream_sends_a_token_before_the_next_is_computed(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoding step after the first token waits until the client has read the first
    event: a stream that held each token until the next one came would time out here."""
    gate = threading.Event()
    step = KVBatch.step

    def gated(self: KVBatch, lm: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
        gate.wait(30)
        return step(self, lm, tokens)

    monkeypatch.setattr(KVBatch, "step", gated)
    body = {"inputs": "The capital of Italy is", "parameters": {"max_new_tokens": 3}}
    try:
        with live.client.stream(
            "POST", "/generate_stream", json=body, timeout=httpx.Timeout(60, read=10)
        ) as r:
            lines = (json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))
            first = next(lines)
            assert not gate.is_set()
            gate.set()
            events = [first, *lines]
    finally:
        gate.set()
    assert first["index"] == 1 and first["token"]["text"] and first["generated_text"] is None
    assert [e["index"] for e in events] == [1, 2, 3]
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["generated_text"] == greedy(live, body["inputs"], 3)["generated_text"]


def test_concurrent_requests_are_batched_and_match_single_streams(live: Live) -> None:
    prompts = [
        "The capital of France is",
        "Water boils at a temperature of",
        "The largest planet in the solar system is",
        "Shakespeare wrote the play",
        "The chemical symbol for gold is",
        "A week has seven",
    ]
    alone = [greedy(live, p, 8)["generated_text"] for p in prompts]
    batches_before = live.runtime.worker.batcher.batches
    together: list[str] = [""] * len(prompts)

    def run(i: int) -> None:
        together[i] = greedy(live, prompts[i], 8)["generated_text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert live.runtime.worker.batcher.batches - batches_before < len(prompts)


def test_a_request_sees_one_model_version(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap waits for the batch in flight. The request pauses between its first two tokens
    until an edit is computed and waiting for the weights (or, were the weights not held for
    the whole batch, applied); its tokens and log-probabilities must still be those the old
    model gives alone, to the bit, and the edit must come after it."""
    batcher = live.runtime.worker.batcher
    n = 12
    version = live.client.get("/info").json()["model_version"]
    body = {"inputs": EIFFEL["prompt"], "parameters": {"max_new_tokens": n, "details": True}}
    alone = live.client.post("/generate", json=body).json()

    paused, go = threading.Event(), threading.Event()
    late_arrivals = Batcher._late_arrivals

    def pause_once(self: Batcher, room: int) -> list:
        if not paused.is_set():
            paused.set()
            go.wait(180)
        return late_arrivals(self, room)

    monkeypatch.setattr(Batcher, "_late_arrivals", pause_once)
    during: dict = {}
    thread = threading.Thread(
        target=lambda: during.update(live.client.post("/generate", json=body).json())
    )
    thread.start()
    try:
        assert paused.wait(60)
        edit = live.client.post("/edits", json=EIFFEL).json()
        wait_for(
            lambda: (
                batcher._swap_waiting()
                or live.client.get(f"/edits/{edit['id']}").json()["status"] == "applied"
            ),
            180,
            "the edit to wait for the weights",
        )
        swap_waited = batcher._swap_waiting()
    finally:
        go.set()
        thread.join(120)
    applied = wait_status(live.client, edit["id"], {"applied"})
    assert during["details"]["tokens"] == alone["details"]["tokens"]
    assert during["generated_text"] == alone["generated_text"]
    assert during["model_version"] == version < applied["model_version"]
    assert swap_waited
    # The edit changes this answer, so a request that took its weights halfway would show.
    assert greedy(live, EIFFEL["prompt"], n)["generated_text"] != alone["generated_text"]
    live.client.post(f"/edits/{edit['id']}/revert")
    wait_status(live.client, edit["id"], {"reverted"})


def test_health_ready_info(live: Live) -> None:
    assert live.client.get("/health").json() == {"status": "ok"}
    ready = live.client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"]
    info = live.client.get("/info").json()
    assert info["edited_layers"] == [3, 4, 5, 6, 7] and info["log"] == "sqlite"
    assert len(info["weights_digest"]) == 64


def test_queued_edits_share_one_batch_and_stay_separate_edits(live: Live) -> None:
    cities = ["Rome", "Tokyo", "Cairo", "Lima"]
    facts = [
        {
            "subject": f"Landmark {i}",
            "prompt": f"The monument called Landmark {i} is located in the city of",
            "target_new": city,
        }
        for i, city in enumerate(cities)
    ]
    info0 = live.client.get("/info").json()
    ids = [live.client.post("/edits", json=f).json()["id"] for f in facts]
    edits = [wait_status(live.client, i, {"applied", "failed", "rejected"}) for i in ids]
    assert all(e["status"] == "applied" for e in edits), edits
    # The first is taken alone; the rest queue behind it and share one z* optimisation.
    assert max(e["scores"].get("batch", 1) for e in edits) >= 2
    versions = [e["model_version"] for e in edits]
    assert versions == sorted(versions) and len(set(versions)) == len(ids)
    for edit in edits:
        prompt = edit["scores"]["facts"][0]["prompts"][0]
        assert prompt["p_target_after"] > prompt["p_target_before"]

    # Each is still its own edit: reverting one leaves the others.
    live.client.post(f"/edits/{ids[1]}/revert")
    wait_status(live.client, ids[1], {"reverted"})
    assert live.client.get("/info").json()["active_edits"] == info0["active_edits"] + 3
    rest = ids[:1] + ids[2:]
    for edit_id in rest:
        live.client.post(f"/edits/{edit_id}/revert")
    for edit_id in rest:
        wait_status(live.client, edit_id, {"reverted"})
    assert live.client.get("/info").json()["weights_digest"] == info0["weights_digest"]


def test_bfloat16_serving_generates_and_follows_edits(
    lm: LoadedModel, c0: dict, server_cache, covariance_tokens: int, tmp_path
) -> None:
    """The bfloat16 copy that generation uses is a real copy, and every swap reaches it."""
    settings = server_settings(
        server_cache, covariance_tokens, tmp_path / "data", serve_dtype="bfloat16", probes="off"
    )
    with live_server(settings, lm, c0) as live:
        info = live.client.get("/info").json()
        assert (info["dtype"], info["edit_dtype"]) == ("bfloat16", "float32")
        assert greedy(live, EIFFEL["prompt"], 3)["generated_text"].startswith(" Paris")
        edit_id = live.client.post("/edits", json=EIFFEL).json()["id"]
        assert wait_status(live.client, edit_id, {"applied", "failed"})["status"] == "applied"
        assert greedy(live, EIFFEL["prompt"], 3)["generated_text"].startswith(" Rome")
        live.client.post(f"/edits/{edit_id}/revert")
        wait_status(live.client, edit_id, {"reverted"})
        assert greedy(live, EIFFEL["prompt"], 3)["generated_text"].startswith(" Paris")
