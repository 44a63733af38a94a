"""Replicas on one Redis log, measured with real ``editserve serve`` processes and a
redis-server of this benchmark's own:

- convergence: 50 edits, each posted to one of 3 replicas in turn; the time from the edit being
  applied where it was computed to every replica serving it (model_version), p50/p99;
- catch-up: a replica started on a log that already holds 1,000 edits, time to ready, against
  a start on an empty log.

    .venv/bin/python bench/replica_bench.py [--edits 50] [--late-edits 1000]

Run it on a quiet machine: it is a timing. Three replicas share this machine's cores, so each
server runs torch on one thread (``--threads``); on their own machines replicas would not
compete, and an edit's z* would be faster, but the convergence lag (installing a stored record:
a solve, and a probe pass unless the computing replica's report can be reused) is what this
measures. For the same reason the convergence servers run z* for ``--v-steps`` steps only: the
lag starts once the record is stored, so z* time does not enter it, and 50 edits at the default
25 steps on one thread each would take over half an hour here.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, running_server, settled, write_result
from serve_bench import percentile
from speed import _records, counterfact_facts, fill_log, hardware, metric_sums

from editing.editor import Editor
from editing.models import default_cache_dir, load_model
from service.editlog.redis import RedisEditLog


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--late-edits", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--v-steps", type=int, default=5, help="z* steps per edit")
    parser.add_argument("--out", type=Path, default=Path("bench/results/replicas.json"))
    args = parser.parse_args()
    url = f"redis://127.0.0.1:{(port := free_port())}/0"
    result: dict[str, Any] = {
        "hardware": hardware(),
        "threads_per_server": args.threads,
        "v_steps": args.v_steps,
    }
    env = {"OMP_NUM_THREADS": str(args.threads), "EDITSERVE_V_STEPS": str(args.v_steps)}
    with redis_server(port):
        result["convergence"] = convergence(url, args.edits, env)
        result["catch_up"] = catch_up(url, args.late_edits)
    write_result(args.out, result)
    return 0


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[None]:
    """A redis-server of this benchmark's own on ``port``, keeping nothing on disk, for the
    ``with`` block."""
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", tempfile.mkdtemp()],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.1)
        yield
    finally:
        redis.terminate()
        redis.wait(10)


def convergence(url: str, edits: int, env: dict[str, str]) -> dict[str, Any]:
    """``edits`` edits posted to 3 replicas in turn; how long each takes to reach them all."""
    with contextlib.ExitStack() as stack:
        ports = [free_port() for _ in range(3)]
        for p in ports:  # one at a time: three cold starts at once would fight for 2 cores
            flags = ("--redis-url", url, "--redis-prefix", "conv")
            stack.enter_context(running_server(p, *flags, env=env))
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=600) for p in ports]
        facts = counterfact_facts(edits, offset=2000)
        lags, totals = [], []
        for i, fact in enumerate(facts):
            posted = time.perf_counter()
            edit_id = clients[i % 3].post("/edits", json=fact).json()["id"]
            edit = settled(clients[i % 3], edit_id)
            applied = time.perf_counter()
            version = edit["model_version"]
            pending = set(range(3))
            while pending:
                for k in list(pending):
                    # /ready's `processed`, not /info, whose weights digest costs CPU
                    if clients[k].get("/ready").json()["processed"] >= version:
                        pending.discard(k)
                if pending:
                    time.sleep(0.05)
            done = time.perf_counter()
            lags.append(done - applied)
            totals.append(done - posted)
            print(f"edit {i + 1}: applied +{lags[-1]:.2f} s later everywhere", file=sys.stderr)
        infos = [c.get("/info").json() for c in clients]
        digests = {info["weights_digest"] for info in infos}
        return {
            "replicas": 3,
            "edits": len(lags),
            "applied_to_all_replicas_s": {"p50": percentile(lags, 50), "p99": percentile(lags, 99)},
            "posted_to_all_replicas_s": {
                "p50": percentile(totals, 50),
                "p99": percentile(totals, 99),
            },
            "identical_digests": len(digests) == 1,
            "replicas_at": [
                {k: info[k] for k in ("model_version", "active_edits", "weights_digest")}
                for info in infos
            ],
        }


def catch_up(url: str, late_edits: int) -> dict[str, Any]:
    """A replica started on a log that already holds ``late_edits`` edits: its time to ready,
    against a start on an empty log."""
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    editor = Editor(lm, method="d4s", cache_dir=default_cache_dir(), progress=False)
    records, origin = _records(editor, late_edits)
    del editor, lm
    fill_log(RedisEditLog(url, "late"), records)
    timings, rebuilds = {}, {}
    for prefix in ("empty", "late"):
        start = time.perf_counter()
        port = free_port()
        with running_server(port, "--redis-url", url, "--redis-prefix", prefix):
            timings[prefix] = time.perf_counter() - start
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                rebuilds[prefix] = metric_sums(client, "editserve_startup_replay_seconds")[""]
    return {
        "edits_in_log": len(records),
        "records": origin,
        "ready_s_empty_log": timings["empty"],
        "ready_s_with_log": timings["late"],
        # The difference of two cold starts, whose own spread is seconds on a 2-core VM; the
        # server's rebuild time is the catch-up itself.
        "catch_up_s": timings["late"] - timings["empty"],
        "startup_replay_s_empty_log": rebuilds["empty"],
        "startup_replay_s_with_log": rebuilds["late"],
    }


if __name__ == "__main__":
    sys.exit(main())
