"""A bounded loopback load test against a real ``editserve serve`` process.

Each phase sends a fixed number of requests and stops by itself. ``idle``: one client, no
edits, the baseline. Then, for each ``--clients`` count: that many concurrent clients mixing
``/generate``, ``/generate_stream``, ``/v1/chat/completions`` and reads of ``/edits``, while
edits are posted and reverted, a slow client reads a stream one byte a second and other clients
drop their streams after the first token. Reported per phase and endpoint: requests per second,
p50/p99 latency, time to first token (streams), 429s and 5xx (the target is none). After each
phase: the generation queue is empty and an edit still applies (nothing holds the weights lock).

    .venv/bin/python bench/load.py [--clients 8 32] [--requests 240] \\
        [--out bench/results/load-epyc.json]

Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import PROMPTS, free_port, running_server, write_result
from speed import hardware

KINDS = ("generate", "stream", "chat", "read_edits")
CITIES = ["Rome", "Tokyo", "Cairo", "Lima", "Oslo", "Quito", "Dakar", "Hanoi"]


@dataclass
class Sample:
    kind: str
    status: int
    seconds: float
    first_token: float | None = None


async def request(client: httpx.AsyncClient, kind: str, n: int) -> Sample:
    prompt = random.choice(PROMPTS)
    body: dict[str, Any]
    started = time.perf_counter()
    if kind == "generate":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
        r = await client.post("/generate", json=body)
        return Sample(kind, r.status_code, time.perf_counter() - started)
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n}
        r = await client.post("/v1/chat/completions", json=body)
        return Sample(kind, r.status_code, time.perf_counter() - started)
    if kind == "read_edits":
        r = await client.get("/edits", params={"limit": 20})
        return Sample(kind, r.status_code, time.perf_counter() - started)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    first = None
    async with client.stream("POST", "/generate_stream", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and first is None:
                first = time.perf_counter() - started
    return Sample(kind, r.status_code, time.perf_counter() - started, first)


async def user(client: httpx.AsyncClient, k: int, count: int, n: int, out: list[Sample]) -> None:
    for i in range(count):
        kind = KINDS[(k + i) % len(KINDS)]
        try:
            out.append(await request(client, kind, n))
        except httpx.HTTPError as exc:  # a dropped connection is a failure too
            out.append(Sample(kind, 599, 0.0))
            print(f"{kind}: {type(exc).__name__}: {exc}", file=sys.stderr)


async def slow_reader(url: str, seconds: float, n: int) -> int:
    """A stream read one byte a second for ``seconds``, then dropped; the bytes it read."""
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": n}}
    got = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as client,
        client.stream("POST", "/generate_stream", json=body) as r,
    ):
        deadline = time.monotonic() + seconds
        async for chunk in r.aiter_raw(1):
            got += len(chunk)
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
    return got


async def dropper(url: str, times: int, n: int) -> int:
    """Streams dropped after their first event; how many were dropped."""
    dropped = 0
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": n}}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for _ in range(times):
            async with client.stream("POST", "/generate_stream", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        dropped += 1
                        break
    return dropped


async def editor(url: str, phase: str, edits: int) -> dict[str, Any]:
    """Post ``edits`` facts one after another, revert each once applied; what happened."""
    statuses: dict[str, int] = {}
    seconds = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i in range(edits):
            fact = {
                "subject": f"Load Landmark {phase}-{i}",
                "prompt": f"The monument called Load Landmark {phase}-{i} is in the city of",
                "target_new": CITIES[i % len(CITIES)],
            }
            started = time.perf_counter()
            r = await client.post("/edits", json=fact)
            statuses[f"post {r.status_code}"] = statuses.get(f"post {r.status_code}", 0) + 1
            if r.status_code != 202:
                continue
            edit_id = r.json()["id"]
            edit = await settle(client, edit_id)
            seconds.append(time.perf_counter() - started)
            statuses[edit["status"]] = statuses.get(edit["status"], 0) + 1
            r = await client.post(f"/edits/{edit_id}/revert")
            statuses[f"revert {r.status_code}"] = statuses.get(f"revert {r.status_code}", 0) + 1
            if r.status_code == 202:
                await settle(client, edit_id)
    return {"statuses": statuses, "apply_seconds": seconds}


async def settle(client: httpx.AsyncClient, edit_id: str) -> dict[str, Any]:
    while True:
        edit: dict[str, Any] = (await client.get(f"/edits/{edit_id}")).json()
        if edit["status"] not in ("queued", "applying", "reverting"):
            return edit
        await asyncio.sleep(0.2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples: list[Sample], wall: float) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        mine = [s for s in samples if s.kind == kind]
        ok = [s.seconds for s in mine if s.status == 200]
        firsts = [s.first_token for s in mine if s.first_token is not None and s.status == 200]
        by_kind[kind] = {
            "requests": len(mine),
            "ok": len(ok),
            "p50_s": percentile(ok, 0.5),
            "p99_s": percentile(ok, 0.99),
            "mean_s": statistics.fmean(ok) if ok else None,
            "ttft_p50_s": percentile(firsts, 0.5),
            "ttft_p99_s": percentile(firsts, 0.99),
            "429": sum(s.status == 429 for s in mine),
            "5xx": sum(s.status >= 500 for s in mine),
        }
    return {
        "requests": len(samples),
        "seconds": wall,
        "requests_per_s": len(samples) / wall,
        "429": sum(s.status == 429 for s in samples),
        "5xx": sum(s.status >= 500 for s in samples),
        "by_endpoint": by_kind,
    }


async def phase(
    url: str, name: str, clients: int, requests: int, n: int, edits: int
) -> dict[str, Any]:
    samples: list[Sample] = []
    per_client = max(1, requests // clients)
    limits = httpx.Limits(max_connections=clients + 4)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        side = []
        if edits:
            side = [
                asyncio.create_task(editor(url, name, edits)),
                asyncio.create_task(slow_reader(url, 20.0, n)),
                asyncio.create_task(dropper(url, 4, n)),
            ]
        await asyncio.gather(*(user(client, k, per_client, n, samples) for k in range(clients)))
        wall = time.perf_counter() - started
        done = await asyncio.gather(*side)
    result = {"clients": clients, **summary(samples, wall)}
    if edits:
        result |= {"edits": done[0], "slow_reader_bytes": done[1], "dropped_streams": done[2]}
    result["after"] = await after_phase(url, name)
    return result


async def after_phase(url: str, name: str) -> dict[str, Any]:
    """Nothing left behind: the generation queue empties, and an edit still applies promptly."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        deadline = time.monotonic() + 30
        depth = None
        while time.monotonic() < deadline:
            metrics = (await client.get("/metrics")).text
            depth = next(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("editserve_generation_queue_depth ")
            )
            if depth == 0:
                break
            await asyncio.sleep(0.5)
        fact = {
            "subject": f"Load Check {name}",
            "prompt": f"The monument called Load Check {name} is located in the city of",
            "target_new": "Oslo",
        }
        started = time.perf_counter()
        edit_id = (await client.post("/edits", json=fact)).json()["id"]
        edit = await settle(client, edit_id)
        took = time.perf_counter() - started
        await client.post(f"/edits/{edit_id}/revert")
        await settle(client, edit_id)
    return {"generation_queue_depth": depth, "edit_status": edit["status"], "edit_seconds": took}


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    phases = {"idle": await phase(url, "idle", 1, args.idle_requests, args.max_new_tokens, edits=0)}
    for clients in args.clients:
        name = f"{clients}-clients"
        phases[name] = await phase(
            url, name, clients, args.requests, args.max_new_tokens, edits=args.edits
        )
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--requests", type=int, default=240, help="per loaded phase")
    parser.add_argument("--idle-requests", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--edits", type=int, default=3, help="posted (and reverted) per phase")
    parser.add_argument("--url", help="a running server instead of one started here")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    random.seed(0)
    if args.url:
        phases = asyncio.run(run(args.url, args))
    else:
        port = free_port()
        with running_server(port):
            phases = asyncio.run(run(f"http://127.0.0.1:{port}", args))
    result = {
        "hardware": hardware(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "url")},
        "phases": phases,
    }
    write_result(args.out, result, shown=table(phases))
    return 0 if all(p["5xx"] == 0 for p in phases.values()) else 1


def table(phases: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "rps": round(p["requests_per_s"], 2),
            "429": p["429"],
            "5xx": p["5xx"],
            **{
                kind: [
                    round(v["p50_s"] or 0, 3),
                    round(v["p99_s"] or 0, 3),
                    round(v["ttft_p50_s"], 3) if v["ttft_p50_s"] else None,
                ]
                for kind, v in p["by_endpoint"].items()
            },
            "after": p["after"],
        }
        for name, p in phases.items()
    }


if __name__ == "__main__":
    sys.exit(main())
