"""The Python client (sync and async) and ``editserve edits`` / ``editserve generate`` against a
live server with keys."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from svc_helpers import Live, live_server, server_settings

from editing.models import LoadedModel
from service import cli as service_cli
from service.client import ApiError, AsyncClient, Client
from service.edits_cli import read_import

EDITOR, READER = "client-editor-key", "client-reader-key"
KEYS = {EDITOR: {"name": "ops", "role": "editor"}, READER: {"name": "viewer", "role": "reader"}}


@pytest.fixture(scope="module")
def live(
    lm: LoadedModel, c0: dict, server_cache: Path, covariance_tokens: int, tmp_path_factory
) -> Iterator[Live]:
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path_factory.mktemp("client-data"),
        api_keys=KEYS,
        v_steps=2,
        probes="off",
    )
    with live_server(settings, lm, c0) as server:
        yield server


def test_the_client_edits_waits_generates_reverts_and_reads_the_trail(live: Live) -> None:
    fact = {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in the city of",
        "target_new": "Rome",
    }
    with Client(live.url, EDITOR) as es, Client(live.url, READER) as viewer:
        accepted = es.add(fact, reason="ticket 3")
        edit = es.wait(accepted["id"])
        assert edit["status"] == "applied" and edit["submitted_by"] == "ops"
        out = viewer.generate(fact["prompt"], max_new_tokens=3, min_version=edit["model_version"])
        assert out["model_version"] >= edit["model_version"] and out["generated_text"]
        with pytest.raises(ApiError) as refused:
            viewer.add(fact)
        assert refused.value.status == 403 and "editor" in refused.value.problem["detail"]
        es.revert(accepted["id"], reason="done")
        assert es.wait(accepted["id"])["status"] == "reverted"
        trail = [e for e in viewer.audit() if e["edit_id"] == accepted["id"]]
        assert [(e["action"], e["reason"]) for e in trail] == [
            ("revert", "done"),
            ("apply", "ticket 3"),
        ]
        assert trail[0]["user_agent"] == "editserve-client/1"

    async def asynchronously() -> None:
        async with AsyncClient(live.url, EDITOR) as es:
            accepted = await es.add_batch([{**fact, "target_new": "Oslo"}], reason="async")
            edit = await es.wait(accepted["id"])
            assert edit["status"] == "applied" and edit["reason"] == "async"
            assert (await es.get(accepted["id"]))["facts"][0]["target_new"] == "Oslo"
            assert [e["id"] async for e in es.edits(submitted_by="ops", status="applied")] == [
                accepted["id"]
            ]
            await es.revert(accepted["id"])
            await es.wait(accepted["id"])

    asyncio.run(asynchronously())


def test_importing_a_file_twice_adds_its_edits_once(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {
            "subject": f"Harbour {i}",
            "prompt": f"The port called Harbour {i} is located in the city of",
            "target_new": ["Lima", "Oslo", "Cairo", "Seoul"][i % 4],
            "reason": "quarterly fixes",
        }
        for i in range(20)
    ]
    path = tmp_path / "fixes.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    connection = ["--url", live.url, "--key", EDITOR]
    with Client(live.url, READER) as viewer:
        before = {e["id"] for e in viewer.edits()}
        assert service_cli.main(["edits", "import", str(path), *connection]) == 0
        assert "20 new, 0 known already" in capsys.readouterr().out
        assert service_cli.main(["edits", "import", str(path), *connection]) == 0
        assert "0 new, 20 known already" in capsys.readouterr().out
        added = [e for e in viewer.edits() if e["id"] not in before]
        assert len(added) == 20 and {e["reason"] for e in added} == {"quarterly fixes"}

        # A malformed line: its number in the error, and nothing sent.
        bad = tmp_path / "bad.jsonl"
        lines = [json.dumps({k: v for k, v in row.items() if k != "reason"}) for row in rows[:4]]
        lines[2] = json.dumps(
            {"subject": "Nowhere", "prompt": "A prompt without it", "target_new": "X"}
        )
        bad.write_text("\n".join(lines) + "\n")
        assert service_cli.main(["edits", "import", str(bad), *connection]) == 2
        said = capsys.readouterr().err
        assert f"{bad}:3:" in said and "subject must occur in prompt" in said
        assert len([e for e in viewer.edits() if e["id"] not in before]) == 20

        # What export writes is what import reads (for another server).
        assert service_cli.main(["edits", "export", *connection]) == 0
        exported = tmp_path / "active.jsonl"
        exported.write_text(capsys.readouterr().out)
        active = {e["id"] for e in viewer.edits(status="applied")}
        bodies = read_import(exported)
        assert len(bodies) == len(active) and all("facts" in body for body in bodies)
        assert service_cli.main(["edits", "list", "--submitted-by", "ops", *connection]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert len(listed) >= 20 and all(" ops " in line for line in listed)
        assert service_cli.main(["generate", "The capital of Italy is", *connection]) == 0
        assert capsys.readouterr().out.startswith("The capital of Italy is")
