"""Who changed what, when, why and from where: named API keys, the audit fields of an edit and
``GET /audit``, on SQLite and Redis, across a restart."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from svc_helpers import RedisServer, live_server, server_settings, wait_status

from editing.models import LoadedModel

OPS, DATA, OLD, READER = "ops-key-1111", "data-key-2222", "old-form-key-3333", "reader-key-4444"
KEYS = {
    OPS: {"name": "ops-team", "role": "editor"},
    DATA: {"name": "data-team", "role": "editor"},
    OLD: "editor",  # the earlier form: a role alone
    READER: {"name": "dashboards", "role": "reader"},
}
PARIS = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
}
PICASSO = {
    "subject": "Pablo Picasso",
    "prompt": "The mother tongue of Pablo Picasso is",
    "target_new": "German",
}


def _as(key: str, agent: str = "audit-test/1.0") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "User-Agent": agent}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_named_keys_are_audited_across_a_restart(
    backend: str,
    lm: LoadedModel,
    c0: dict,
    server_cache: Path,
    covariance_tokens: int,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    extra: dict[str, Any] = (
        {"redis_url": redis_server.url, "redis_prefix": f"audit-{uuid.uuid4().hex[:8]}"}
        if backend == "redis"
        else {}
    )
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path / "data",
        api_keys=KEYS,
        v_steps=2,
        probes="off",
        **extra,
    )
    with live_server(settings, lm, c0) as live:
        c = live.client
        c.headers.update(_as(READER))  # for the status polls; each write names its own key
        paris = c.post("/edits", json={**PARIS, "reason": "ticket 7"}, headers=_as(OPS)).json()
        picasso = c.post(
            "/edits", json={"facts": [PICASSO], "reason": "bulk fix"}, headers=_as(DATA, "cli/2")
        ).json()
        legacy = c.post("/edits", json={**PARIS, "target_new": "Oslo"}, headers=_as(OLD)).json()
        for edit in (paris, picasso, legacy):
            wait_status(c, edit["id"], {"applied", "superseded", "failed"})
        reverted = c.post(
            f"/edits/{picasso['id']}/revert", json={"reason": "wrong"}, headers=_as(OPS)
        )
        assert reverted.status_code == 202
        wait_status(c, picasso["id"], {"reverted"})
        # A reader may read the trail, and may not write.
        assert c.post("/edits", json=PARIS, headers=_as(READER)).status_code == 403
        assert c.get("/audit", headers=_as(READER)).status_code == 200

    with live_server(settings, lm, c0) as live:  # a restart on the same log
        c = live.client
        got = c.get(f"/edits/{paris['id']}", headers=_as(READER)).json()
        assert (got["submitted_by"], got["reason"], got["user_agent"]) == (
            "ops-team",
            "ticket 7",
            "audit-test/1.0",
        )
        # The later edit of the same subject and prompt replaced it, by the server's hand.
        assert [h["action"] for h in got["history"]] == ["apply", "supersede"]
        assert got["history"][1]["by"] == "editserve"
        assert legacy["id"] in got["history"][1]["reason"]
        got = c.get(f"/edits/{picasso['id']}", headers=_as(READER)).json()
        assert [(h["action"], h["by"], h["reason"]) for h in got["history"]] == [
            ("apply", "data-team", "bulk fix"),
            ("revert", "ops-team", "wrong"),
        ]
        assert got["history"][0]["user_agent"] == "cli/2"
        old_name = f"key-{hashlib.sha256(OLD.encode()).hexdigest()[:8]}"
        got = c.get(f"/edits/{legacy['id']}", headers=_as(READER)).json()
        assert got["submitted_by"] == old_name and OLD not in str(got)

        trail = c.get("/audit", headers=_as(READER)).json()["events"]
        assert [e["at"] for e in trail] == sorted((e["at"] for e in trail), reverse=True)
        assert [(e["action"], e["by"]) for e in trail] == [
            ("revert", "ops-team"),
            ("supersede", "editserve"),
            ("apply", old_name),
            ("apply", "data-team"),
            ("apply", "ops-team"),
        ]
        page = c.get("/audit", params={"limit": 2}, headers=_as(READER)).json()
        rest = c.get("/audit", params={"cursor": page["next_cursor"]}, headers=_as(READER)).json()
        assert page["events"] + rest["events"] == trail and rest["next_cursor"] is None
        by_ops = c.get("/audit", params={"by": "ops-team"}, headers=_as(READER)).json()
        assert [e["action"] for e in by_ops["events"]] == ["revert", "apply"]
        picasso_only = c.get(
            "/audit", params={"subject": "pablo picasso"}, headers=_as(READER)
        ).json()
        assert {e["edit_id"] for e in picasso_only["events"]} == {picasso["id"]}
        listed = c.get("/edits", params={"submitted_by": "data-team"}, headers=_as(READER))
        assert [e["id"] for e in listed.json()["edits"]] == [picasso["id"]]
        listed = c.get(
            "/edits", params={"subject": "Eiffel Tower", "status": "applied"}, headers=_as(OPS)
        )
        assert [e["id"] for e in listed.json()["edits"]] == [legacy["id"]]
        since = c.get("/edits", params={"since": got["created_at"]}, headers=_as(OPS))
        assert since.status_code == 200, since.text
        assert [e["id"] for e in since.json()["edits"]] == [legacy["id"]]


def test_a_server_that_requires_a_reason_refuses_changes_without_one(
    lm: LoadedModel, c0: dict, server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path / "data",
        api_keys=KEYS,
        require_reason=True,
        v_steps=2,
        probes="off",
    )
    with live_server(settings, lm, c0) as live:
        c = live.client
        c.headers.update(_as(READER))
        refused = c.post("/edits", json=PARIS, headers=_as(OPS))
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/problem+json"
        assert "reason" in refused.json()["detail"]
        assert c.get("/edits", headers=_as(OPS)).json()["edits"] == []  # nothing was logged
        edit = c.post("/edits", json={**PARIS, "reason": "ticket 9"}, headers=_as(OPS)).json()
        wait_status(c, edit["id"], {"applied"})
        assert c.post(f"/edits/{edit['id']}/revert", headers=_as(OPS)).status_code == 422
        assert c.get(f"/edits/{edit['id']}", headers=_as(OPS)).json()["status"] == "applied"
        ok = c.post(f"/edits/{edit['id']}/revert", json={"reason": "done"}, headers=_as(OPS))
        assert ok.status_code == 202
        bad = httpx.post(f"{live.url}/edits", json={**PARIS, "reason": ""}, headers=_as(OPS))
        assert bad.status_code == 422  # an empty reason is no reason
