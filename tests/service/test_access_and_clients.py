"""API keys and roles, limits, the official ``openai`` client, the OpenAPI document and a
schemathesis run, on a live server with keys configured."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from svc_helpers import Live, live_server, server_settings

from editing.models import LoadedModel
from service.openapi import render
from service.settings import Settings

EDITOR, READER = "editor-key-123", "reader-key-456"
ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def keyed_server(
    lm: LoadedModel, c0: dict, cache: Path, tokens: int, data: Path, **changes: Any
) -> Iterator[Live]:
    config = server_settings(
        cache,
        tokens,
        data,
        **{
            "api_keys": {EDITOR: "editor", READER: "reader"},
            "max_body_bytes": 20_000,
            "max_queued_edits": 1,
            "v_steps": 2,
            "probes": "off",  # access and schemas only: the edits posted here need no probes
            **changes,
        },
    )
    with live_server(config, lm, c0) as server:
        yield server


@pytest.fixture(scope="module")
def live(
    lm: LoadedModel, c0: dict, server_cache, covariance_tokens: int, tmp_path_factory
) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("access-data")
    with keyed_server(lm, c0, server_cache, covariance_tokens, data, max_new_tokens=16) as server:
        yield server


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


FACT = {
    "subject": "Toyota",
    "prompt": "Toyota was founded in the country of",
    "target_new": "Brazil",
}
GEN = {"inputs": "The capital of Italy is", "parameters": {"max_new_tokens": 4}}


def test_keys_and_roles(live: Live) -> None:
    c = live.client
    missing = c.post("/generate", json=GEN)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"] == "application/problem+json"
    assert c.post("/generate", json=GEN, headers=auth("wrong")).status_code == 401
    assert c.post("/generate", json=GEN, headers=auth(READER)).status_code == 200
    refused = c.post("/edits", json=FACT, headers=auth(READER))
    assert refused.status_code == 403 and "editor" in refused.json()["detail"]
    assert c.get("/health").status_code == 200  # probes need no key
    assert c.get("/info").status_code == 401
    assert c.get("/info", headers=auth(READER)).status_code == 200


def test_metrics_can_require_a_key(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    c = live.client
    assert c.get("/metrics").status_code == 200  # open by default: scraped on the cluster network
    monkeypatch.setattr(live.runtime.settings, "metrics_require_key", True)
    missing = c.get("/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.headers["content-type"] == "application/problem+json"
    assert c.get("/metrics", headers=auth("wrong")).status_code == 401
    scraped = c.get("/metrics", headers=auth(READER))
    assert scraped.status_code == 200 and "editserve_edits_lost_total" in scraped.text


def test_limits(live: Live) -> None:
    c = live.client
    too_big = c.post("/generate", content=b"{" + b" " * 30_000 + b"}", headers=auth(READER))
    assert too_big.status_code == 413
    assert too_big.headers["content-type"] == "application/problem+json"
    too_many = {**GEN, "parameters": {"max_new_tokens": 17}}
    assert c.post("/generate", json=too_many, headers=auth(READER)).status_code == 422
    long_prompt = {"inputs": "word " * 400, "parameters": {"max_new_tokens": 2}}
    r = c.post("/generate", json=long_prompt, headers=auth(READER))
    assert r.status_code == 422 and "tokens" in r.json()["detail"]

    first = c.post("/edits", json=FACT, headers=auth(EDITOR))
    assert first.status_code == 202
    full = c.post("/edits", json={**FACT, "target_new": "Peru"}, headers=auth(EDITOR))
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.headers["content-type"] == "application/problem+json"
    c.post(f"/edits/{first.json()['id']}/revert", headers=auth(EDITOR))


def test_openai_client_works_unchanged(live: Live) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=READER)
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]

    completion = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    tgi = live.client.post(
        "/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}},
        headers=auth(READER),
    ).json()
    assert completion.choices[0].text == tgi["generated_text"]
    assert completion.usage is not None and completion.usage.completion_tokens <= 5
    assert completion.system_fingerprint == f"editserve-v{tgi['model_version']}"

    streamed = client.completions.create(
        model="smollm2-135m",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == tgi["generated_text"]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    answer = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and answer and "Paris" in answer
    chunks = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == answer

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope").models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=1000)


def test_openai_penalties_change_a_repetitive_answer(live: Live) -> None:
    """frequency_penalty and presence_penalty reach the sampler: greedy decoding that repeats
    itself answers otherwise with either."""
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=READER)
    prompt = "one, two, one, two, one, two, one, two,"

    def complete(presence: float = 0.0, frequency: float = 0.0) -> str:
        answer = client.completions.create(
            model="smollm2-135m",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
        return answer.choices[0].text

    plain = complete()
    assert complete(presence=2.0) != plain
    assert complete(frequency=2.0) != plain


def test_openai_requests_name_a_model_that_models_lists(live: Live) -> None:
    """An unknown model is a 404 problem naming it and what /v1/models lists (the official
    client's NotFoundError); the listed name, or none, is served."""
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=READER)
    listed = [m.id for m in client.models.list()]
    messages = [{"role": "user", "content": "Hi"}]
    for path, body in (
        ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
    ):
        r = live.client.post(path, json={**body, "model": "gpt-4o"}, headers=auth(READER))
        assert r.status_code == 404, r.text
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["type"].endswith("/model-not-found") and problem["model"] == "gpt-4o"
        assert "gpt-4o" in problem["detail"] and all(name in problem["detail"] for name in listed)
        for name in (*listed, None):
            named = {**body, "model": name} if name else body
            assert live.client.post(path, json=named, headers=auth(READER)).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)


def test_openapi_yaml_is_generated_from_the_app() -> None:
    committed = (ROOT / "openapi.yaml").read_text()
    assert committed == render(), "openapi.yaml is stale: run `editserve openapi`"


def test_refuses_open_interface_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without API keys"):
        Settings(_env_file=None, host="0.0.0.0").check_exposure()  # type: ignore[call-arg]
    Settings(_env_file=None, host="0.0.0.0", insecure=True).check_exposure()  # type: ignore[call-arg]
    Settings(_env_file=None, host="0.0.0.0", api_keys={"k": "reader"}).check_exposure()  # type: ignore[call-arg]
    Settings(_env_file=None, host="::1").check_exposure()  # type: ignore[call-arg]
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "EDITSERVE_DATA_DIR": str(tmp_path)},
    )
    assert run.returncode == 2 and "--insecure" in run.stderr


def test_schemathesis_finds_no_failure(
    lm: LoadedModel, c0: dict, server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    """Every operation, with generated valid and invalid input: no 5xx, every status and body
    as documented, problem+json errors. The server answers at most two tokens: its coverage
    phase sends about a thousand requests, many of them valid generations at the limit."""
    with keyed_server(
        lm, c0, server_cache, covariance_tokens, tmp_path / "data", max_new_tokens=2
    ) as live:
        # A completion that leaves max_tokens out gets the server's limit when it is under
        # OpenAI's default of 16, not a 422.
        r = live.client.post("/v1/completions", json={"prompt": "Hi"}, headers=auth(EDITOR))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
        run = schemathesis(live.url)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def schemathesis(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {EDITOR}",
            "--checks",
            "all",
            # A schema cannot say "the subject must occur in the prompt" or "at most this
            # server's max_new_tokens": such valid-looking requests are rightly refused (422).
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "6",
            "--request-timeout",
            "120",
            # Each valid preview computes and scores an edit (seconds on a CPU), and its
            # schema is the edits' own: tests/service/test_preview.py covers it.
            "--exclude-path",
            "/edits/preview",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
