"""Several replicas on one Redis log (real ``editserve serve`` processes and a real
redis-server): one replica computes each edit under a lease, all install the records in log
order and serve identical weights; a replica killed mid-edit loses its lease to another; a
replica started late catches up before it is ready; ``min_version`` reads your own writes; each
replica checks its weights against the digest that the computing replica noted; one with
another memory threshold is refused at start (``service.log_settings``)."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis
from svc_helpers import RedisServer, scrape, wait_for, wait_status
from test_server_process import BURST_STEPS, burst_facts, serve_many, server_env, spawn

# Edits in the whole run: enough that a late replica has a log to catch up on.
EDITS = 12


def converged(clients: dict[str, httpx.Client]) -> dict[str, tuple[int, str]]:
    """Each replica's (model_version, weights digest) once they all agree."""
    seen: dict[str, tuple[int, str]] = {}

    def agree() -> bool:
        for name, client in clients.items():
            info = client.get("/info").json()
            seen[name] = (info["model_version"], info["weights_digest"])
        return len(set(seen.values())) == 1

    wait_for(agree, 180, "the replicas to converge")
    return seen


def weights_checks(client: httpx.Client) -> dict[str, float]:
    """A replica's weights checks by result, and its ``diverged`` gauge."""
    found = scrape(client, "editserve_weights_checks_total", "editserve_weights_diverged")
    return {
        **found["editserve_weights_checks_total"],
        "diverged": found["editserve_weights_diverged"][""],
    }


def test_replicas_compute_each_edit_once_and_converge(
    server_cache: Path, covariance_tokens: int, tmp_path: Path, redis_server: RedisServer
) -> None:
    prefix = f"replicas-{tmp_path.name}"

    def env(name: str, **changes: str) -> dict[str, str]:
        return server_env(
            server_cache,
            covariance_tokens,
            tmp_path / name,
            EDITSERVE_REDIS_URL=redis_server.url,
            EDITSERVE_REDIS_PREFIX=prefix,
            EDITSERVE_V_STEPS=str(BURST_STEPS),
            EDITSERVE_REPLICA_ID=name,
            EDITSERVE_LEASE_SECONDS="3",
            # r2 gives up on a min_version quickly, the others wait as long as a loaded
            # machine may need to install a record
            EDITSERVE_MIN_VERSION_WAIT_SECONDS="1" if name == "r2" else "60",
            EDITSERVE_PROBES="off",
            # Replicas have machines of their own; here they share two cores, where two torch
            # threads each only make them wait on one another.
            OMP_NUM_THREADS="1",
            **changes,
        )

    facts = burst_facts(EDITS)
    store = redis.Redis.from_url(redis_server.url)
    with ExitStack() as stack:
        procs, clients = {}, {}
        first = ("r1", "r2", "r3")
        servers = stack.enter_context(
            serve_many([(env(name), tmp_path / f"{name}.log") for name in first])
        )
        for name, (proc, url) in zip(first, servers, strict=True):
            procs[name] = proc
            clients[name] = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        names = list(clients)

        # Edits posted to different replicas: each computed once, applied everywhere.
        ids = [
            clients[names[i % 3]].post("/edits", json=fact).json()["id"]
            for i, fact in enumerate(facts[:6])
        ]
        edits = [wait_status(clients["r2"], i, {"applied", "failed", "rejected"}, 300) for i in ids]
        assert all(e["status"] == "applied" for e in edits), edits
        assert all(e["computed_by"] in names for e in edits)
        converged(clients)

        # Read your own writes: an edit applied where it was posted is visible on another
        # replica with min_version; a version the log does not hold yet is a 503 at once.
        edit_id = clients["r1"].post("/edits", json=facts[6]).json()["id"]
        version = wait_status(clients["r1"], edit_id, {"applied"}, 300)["model_version"]
        body = {"inputs": facts[6]["prompt"], "parameters": {"max_new_tokens": 4}}
        r = clients["r3"].post("/generate", json={**body, "min_version": version})
        assert r.status_code == 200 and r.json()["model_version"] >= version, r.text
        started = time.monotonic()
        r = clients["r3"].post("/generate", json={**body, "min_version": version + 10_000})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/problem+json"
        assert time.monotonic() - started < 30, "waited for a version that does not exist"
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        r = clients["r3"].post("/v1/chat/completions", json={**chat, "min_version": version})
        assert r.status_code == 200, r.text

        # Kill the replica that is computing an edit: another takes the lease over. The edit
        # carries a dozen facts, so that its z* runs long enough to be interrupted.
        heavy = {"facts": [facts[7], *burst_facts(EDITS + 12)[EDITS:]]}
        edit_id = clients["r1"].post("/edits", json=heavy).json()["id"]
        lease = f"{prefix}:lease:{edit_id}"
        # A version in the log that r2 has not reached within its wait: 503 with Retry-After.
        r = clients["r2"].post("/generate", json={**body, "min_version": version + 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "behind the requested min_version" in r.json()["detail"]

        def leased() -> bool:
            return store.get(lease) is not None

        deadline = time.monotonic() + 120
        while not leased() and time.monotonic() < deadline:
            time.sleep(0.01)
        owner = store.get(lease).decode()
        procs[owner].send_signal(signal.SIGKILL)
        procs[owner].wait(10)
        assert store.get(f"{prefix}:record:{edit_id}") is None, "killed after it finished"
        survivors = {n: c for n, c in clients.items() if n != owner}
        witness = next(iter(survivors.values()))
        taken_over = wait_status(witness, edit_id, {"applied", "failed"}, 300)
        assert taken_over["status"] == "applied" and taken_over["computed_by"] != owner
        converged(survivors)

        # EDITS edits in all, then a fourth replica: ready only once caught up, and identical.
        rest = [
            list(survivors.values())[i % 2].post("/edits", json=fact).json()["id"]
            for i, fact in enumerate(facts[8:])
        ]
        for edit_id in rest:
            assert wait_status(witness, edit_id, {"applied", "failed"}, 600)["status"] == "applied"
        state = converged(survivors)
        # The late replica and one with another memory threshold (a setting that defines the
        # served model) start together: the first is ready once caught up, and identical; the
        # other is refused, naming the setting.
        odd, odd_url = spawn(env("odd", EDITSERVE_MEMORY_THRESHOLD="0.85"), tmp_path / "odd.log")
        stack.callback(odd.kill)
        [(_, url)] = stack.enter_context(serve_many([(env("r4"), tmp_path / "r4.log")]))
        late = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        info = late.get("/info").json()  # ready means caught up: no wait here
        assert (info["model_version"], info["weights_digest"]) == next(iter(state.values()))
        assert info["active_edits"] == EDITS

        # Every installed record whose computing replica noted a digest was checked, and agreed.
        found = {name: weights_checks(client) for name, client in survivors.items()}
        assert all(f["mismatch"] == 0 and f["diverged"] == 0 for f in found.values()), found
        # (a record is noted when it ends a swap: a single edit, or the last of a batch)
        assert sum(f["match"] for f in found.values()) >= 1, found

        refused: dict = {}

        def failed() -> bool:
            refused.update(httpx.get(f"{odd_url}/ready", timeout=5).json())
            return refused["phase"] == "failed"

        wait_for(failed, 180, "the odd replica's refusal")
        assert "EDITSERVE_MEMORY_THRESHOLD" in refused["detail"], refused
        assert "0.85 here" in refused["detail"] and not refused["ready"], refused
        assert late.get("/info").json()["weights_digest"] == info["weights_digest"]
