"""Redis faults against real processes: two ``editserve serve`` replicas on a redis-server of
the test's own (``appendonly yes``, ``appendfsync always``).

1. Redis is killed (SIGKILL) in the middle of a burst of edits and stays down for 30 s: the
   replicas go on generating at their last version, refuse new edits with 503 and Retry-After,
   and say on ``/ready`` why they are not ready. Redis comes back on its files: the replicas
   reconnect by themselves, every acknowledged edit is applied once, and they end on one digest.
2. Redis comes back from a copy that lags (a failover to a replica that had not received the
   last writes): the replicas notice the log lost operations they had handled, rebuild from what
   it holds, and report what was lost (``/info`` ``log_lost``, ``editserve_edits_lost_total``)
   instead of serving edits the log no longer has.

What each step took is printed (``pytest -s``) for the fault table in docs/operations.md.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis
from svc_helpers import RedisServer, scrape, wait_for, wait_status
from test_replicas import converged
from test_server_process import BURST_STEPS, burst_facts, serve_many, server_env

OUTAGE_SECONDS = 30.0


def test_redis_killed_down_and_back_then_a_failover_that_lost_writes(
    server_cache: Path, covariance_tokens: int, tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    store_server = RedisServer(tmp_path / "redis", appendfsync="always")
    store_server.start()
    prefix = "faults"

    def env(name: str) -> dict[str, str]:
        return server_env(
            server_cache,
            covariance_tokens,
            tmp_path / name,
            EDITSERVE_REDIS_URL=store_server.url,
            EDITSERVE_REDIS_PREFIX=prefix,
            EDITSERVE_V_STEPS=str(BURST_STEPS),
            EDITSERVE_EDIT_BATCH="1",
            EDITSERVE_REPLICA_ID=name,
            EDITSERVE_LEASE_SECONDS="3",
            EDITSERVE_PROBES="off",
            OMP_NUM_THREADS="1",  # two replicas on two cores (as in test_replicas)
        )

    facts = burst_facts(8)
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        stack.callback(lambda: lagging.kill() if lagging is not None else None)
        lagging: RedisServer | None = None
        stack.callback(store_server.kill)
        servers = stack.enter_context(
            serve_many([(env(n), tmp_path / f"{n}.log") for n in ("r1", "r2")])
        )
        clients = {
            name: stack.enter_context(httpx.Client(base_url=url, timeout=60))
            for name, (_, url) in zip(("r1", "r2"), servers, strict=True)
        }
        c1, c2 = clients["r1"], clients["r2"]

        def post(i: int) -> httpx.Response:
            client = (c1, c2)[i % 2]
            return client.post("/edits", json=facts[i], headers={"Idempotency-Key": f"k-{i}"})

        # 1. Killed mid-burst, down for 30 s, back on its files.
        accepted = {}
        for i in range(6):
            r = post(i)
            assert r.status_code == 202, r.text
            accepted[i] = r.json()["id"]
        wait_for(lambda: c1.get(f"/edits/{accepted[1]}").json()["status"] == "applied", 120, "2")
        store_server.kill()
        down = time.monotonic()
        served_version = None
        while time.monotonic() - down < OUTAGE_SECONDS:
            for client in (c1, c2):
                body = {"inputs": facts[0]["prompt"], "parameters": {"max_new_tokens": 4}}
                r = client.post("/generate", json=body)
                assert r.status_code == 200, r.text
                served_version = r.json()["model_version"]
                r = client.post("/edits", json=facts[7])
                assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert "edit log" in r.json()["detail"]
                r = client.get("/ready")
                assert r.status_code == 503 and not r.json()["log_reachable"], r.text
                assert "redis log" in r.json()["detail"], r.json()
            time.sleep(3)
        assert served_version is not None
        store_server.start()
        back = time.monotonic()
        for edit_id in accepted.values():
            edit = wait_status(c1, edit_id, {"applied", "failed", "rejected"}, 300)
            assert edit["status"] == "applied", edit
        state = converged(clients)
        timings["redis_restart_recovery_seconds"] = time.monotonic() - back
        wait_for(lambda: all(c.get("/ready").status_code == 200 for c in (c1, c2)), 60, "ready")

        # Nothing lost, nothing applied twice: one apply operation per accepted edit, each at
        # its own version, and the client's retries (same keys) name the same edits.
        store = redis.Redis.from_url(store_server.url)
        ops = store.xrange(f"{prefix}:ops")
        applies = Counter(f[b"id"].decode() for _, f in ops if f[b"kind"] == b"apply")
        assert applies == Counter(accepted.values()), applies
        for i, edit_id in accepted.items():
            assert post(i).json()["id"] == edit_id
        versions = [c1.get(f"/edits/{e}").json()["model_version"] for e in accepted.values()]
        assert len(set(versions)) == len(versions)
        info = c1.get("/info").json()
        assert info["active_edits"] == 6 and info["log_lost"] is None

        # 2. A copy taken now, two more edits, then Redis fails over to that copy.
        store.save()
        (tmp_path / "lagging").mkdir()
        shutil.copy(tmp_path / "redis" / "dump.rdb", tmp_path / "lagging" / "dump.rdb")
        for i in (6, 7):
            accepted[i] = post(i).json()["id"]
            assert wait_status(c1, accepted[i], {"applied", "failed"}, 300)["status"] == "applied"
        converged(clients)
        store_server.kill()
        lagging = RedisServer(tmp_path / "lagging", port=store_server.port, appendonly=False)
        lagging.start()
        failed_over = time.monotonic()
        for client in (c1, c2):
            wait_for(lambda c=client: c.get("/info").json()["log_lost"] is not None, 60, "loss")
            lost = client.get("/info").json()
            assert lost["log_lost"]["lost_applies"] == sorted([accepted[6], accepted[7]]), lost
            assert lost["log_lost"]["lost_reverts"] == []
            # Served: what the log holds, as before the two lost edits.
            assert (lost["model_version"], lost["weights_digest"]) == next(iter(state.values()))
            lost_counts = scrape(client, "editserve_edits_lost_total")["editserve_edits_lost_total"]
            assert lost_counts == {"apply": 2.0, "revert": 0.0}
            assert client.get(f"/edits/{accepted[6]}").status_code == 404
        timings["failover_detection_seconds"] = time.monotonic() - failed_over

        # The client sends the lost edits again: their keys went with them, so they are new.
        for i in (6, 7):
            r = post(i)
            assert r.status_code == 202 and r.json()["id"] != accepted[i], r.text
            edit = wait_status(c1, r.json()["id"], {"applied", "failed"}, 300)
            assert edit["status"] == "applied", edit
        after = converged(clients)
        assert next(iter(after.values()))[1] != next(iter(state.values()))[1]
    print(f"\nfault timings: {timings}")
