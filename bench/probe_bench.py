"""Locality probes and guardrails, measured against a real ``editserve serve`` process.

1. The probe pass's cost as a share of each edit's time: N CounterFact edits on the default
   settings, each edit's phases read from ``/metrics`` (``editserve_edit_apply_seconds``).
2. A guardrail rejecting an edit made to breach it: a second server whose cap on one edit's
   weight growth is twice the largest growth a single edit caused in phase 1; one more single
   edit (applied), then one step that edits 16 facts at once (it moves the weights far more
   than any single edit), which the guardrail rolls back.

    .venv/bin/python bench/probe_bench.py [--edits 8] [--facts FILE] [--out FILE]

Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from harness import running_server, settled, write_result
from prometheus_client.parser import text_string_to_metric_families

from editing.evaluate import find_dataset

BATCH = 16  # facts in the step made to breach the growth cap
PHASES = ("keys", "zstar", "solve", "swap", "probes", "scores", "total")


def metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def phase_sums(client: httpx.Client) -> dict[str, float]:
    m = metrics(client)
    return {p: m[("editserve_edit_apply_seconds_sum", (("phase", p),))] for p in PHASES}


def apply(client: httpx.Client, fact: dict[str, Any]) -> dict[str, Any]:
    return settled(client, client.post("/edits", json=fact).json()["id"], poll=0.2)


def counterfact(path: Path | None, n: int) -> list[dict[str, Any]]:
    path = path or find_dataset("counterfact", "counterfact-train.json")
    records = json.loads(path.read_text())[:n]
    return [
        {"subject": r["subject"], "prompt": r["prompt"], "target_new": r["target_new"]}
        for r in records
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--facts", type=Path, default=None)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path, default=Path("bench/results/probes.json"))
    args = parser.parse_args()
    facts = counterfact(args.facts, args.edits + 1 + BATCH)
    url = f"http://127.0.0.1:{args.port}"
    result: dict[str, Any] = {}

    # 1. the probe pass's share of each edit
    with running_server(args.port, "--method", "d4s"):
        client = httpx.Client(base_url=url, timeout=300)
        # Before any edit the served weights are W0: their mean |W| is mean |W0|.
        w0_mean = {
            labels[0][1]: v
            for (name, labels), v in metrics(client).items()
            if name == "editserve_layer_weight_mean_abs"
        }
        per_edit = []
        for fact in facts[: args.edits]:
            before = phase_sums(client)
            edit = apply(client, fact)
            after = phase_sums(client)
            seconds = {p: after[p] - before[p] for p in PHASES}
            growth = metrics(client)
            per_edit.append(
                {
                    "status": edit["status"],
                    "seconds": seconds,
                    "probe_share": seconds["probes"] / seconds["total"],
                    "probes": edit["scores"]["probes"] if edit.get("scores") else None,
                    "delta_mean_abs": {
                        labels[0][1]: v
                        for (name, labels), v in growth.items()
                        if name == "editserve_layer_delta_mean_abs"
                    },
                }
            )
        total = sum(e["seconds"]["total"] for e in per_edit)
        probes = sum(e["seconds"]["probes"] for e in per_edit)
        result["probe_cost"] = {
            "edits": len(per_edit),
            "mean_edit_seconds": total / len(per_edit),
            "mean_probe_seconds": probes / len(per_edit),
            "probe_share_of_edit_time": probes / total,
            "max_probe_share": max(e["probe_share"] for e in per_edit),
            "per_edit": per_edit,
        }

    # 2. the guardrail: a growth cap twice the largest single-edit growth of phase 1
    growths, previous = [], {layer: 0.0 for layer in w0_mean}
    for e in per_edit:
        delta = e["delta_mean_abs"]
        growths.append(max((delta[k] - previous[k]) / w0_mean[k] for k in delta))
        previous = delta
    cap = float(f"{2 * max(growths):.2g}")
    with running_server(args.port, "--method", "d4s", "--guard-max-delta-growth", str(cap)):
        client = httpx.Client(base_url=url, timeout=300)
        digest = client.get("/info").json()["weights_digest"]
        ordinary = apply(client, facts[args.edits])
        after_ordinary = client.get("/info").json()["weights_digest"]
        batch = facts[args.edits + 1 : args.edits + 1 + BATCH]
        harmful = apply(client, {"facts": batch})
        after_harmful = client.get("/info").json()["weights_digest"]
        m = metrics(client)
        result["guardrail"] = {
            "single_edit_growth": {"max": max(growths), "mean": sum(growths) / len(growths)},
            "max_delta_growth": cap,
            "ordinary_edit": {
                "status": ordinary["status"],
                "probes": (ordinary.get("scores") or {}).get("probes"),
                "weights_changed": after_ordinary != digest,
            },
            "breaching_edit": {
                "facts": len(batch),
                "status": harmful["status"],
                "error": harmful.get("error"),
                "weights_unchanged": after_harmful == after_ordinary,
            },
            "breaches_total": {
                dict(labels)["guardrail"]: v
                for (name, labels), v in m.items()
                if name == "editserve_guardrail_breaches_total"
                and dict(labels)["action"] == "reject"
            },
        }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
