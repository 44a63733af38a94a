"""Observability against the real parts: the real model behind a live server, a real
Prometheus scraping it, and promtool reading its /metrics."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from svc_helpers import Live, free_port, live_server, server_settings, wait_for, wait_status

from editing.models import LoadedModel

sys.path.insert(0, str(Path(__file__).parent.parent / "deploy"))
from test_prometheus_and_grafana import (
    alert_expressions,
    dashboard_expressions,
    metric_names,
)

EIFFEL = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
}
DARRIEUX = {
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
}
LAYERS = {"3", "4", "5", "6", "7"}


def samples(live: Live) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    r = live.client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(live: Live, name: str, **labels: str) -> float:
    return samples(live)[(name, tuple(sorted(labels.items())))]


class Prometheus:
    """A real Prometheus server (Debian's package) scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: editserve\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (.ci/run installs Debian's package)"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: httpx.get(f"{self.url}/-/ready").status_code == 200, 60, "prometheus")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        result: list[dict] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


OBS_STEPS = 4


@pytest.fixture(scope="module")
def live(
    lm: LoadedModel, c0: dict, server_cache, covariance_tokens: int, tmp_path_factory
) -> Iterator[Live]:
    # Few z* steps: these tests watch what an edit publishes, not how well it holds. d4s: the
    # weight method, whose norms and sums these tests follow (the memory leaves the weights).
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path_factory.mktemp("obs"),
        v_steps=OBS_STEPS,
        method="d4s",
    )
    with live_server(settings, lm, c0) as server:
        yield server


def test_prometheus_sees_the_edits_and_the_delta_norms(live: Live, tmp_path: Path) -> None:
    prometheus = Prometheus(tmp_path, live.url.removeprefix("http://"))
    try:
        applied = 'editserve_edits_total{status="applied"}'
        wait_for(lambda: prometheus.scalar(applied) is not None, 60, "a first scrape")
        before = prometheus.scalar(applied)
        assert before is not None
        ids = [live.client.post("/edits", json=fact).json()["id"] for fact in (EIFFEL, DARRIEUX)]
        for edit_id in ids:
            assert wait_status(live.client, edit_id, {"applied", "failed"})["status"] == "applied"
        wait_for(lambda: prometheus.scalar(applied) == before + 2, 60, "the counter to rise by 2")

        deltas = prometheus.query("editserve_layer_delta_mean_abs")
        assert {d["metric"]["layer"] for d in deltas} == LAYERS
        assert all(float(d["value"][1]) > 0 for d in deltas), deltas
        # The scrape carries the rest as well: the version and the probes.
        assert prometheus.scalar("editserve_model_version") >= 2
        agreement = prometheus.scalar("editserve_probe_top1_agreement")
        assert agreement is not None and 0 < agreement <= 1
    finally:
        prometheus.stop()
        for edit_id in ids:
            live.client.post(f"/edits/{edit_id}/revert")
        for edit_id in ids:
            wait_status(live.client, edit_id, {"reverted"})


def test_metrics_pass_promtool(live: Live) -> None:
    text = live.client.get("/metrics").text
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_dashboard_and_alerts_name_only_exported_metrics(live: Live) -> None:
    # An edit with a ground truth, read while in effect: the retention gauge leaves out the
    # checks of reverted edits.
    edit_id = live.client.post("/edits", json={**EIFFEL, "ground_truth": "Paris"}).json()["id"]
    wait_status(live.client, edit_id, {"applied"})
    wait_for(
        lambda: "editserve_edit_retention" in {name for name, _ in samples(live)},
        30,
        "the retention check",
    )
    exported = {name for name, _ in samples(live)}
    live.client.post(f"/edits/{edit_id}/revert")
    wait_status(live.client, edit_id, {"reverted"})
    used = metric_names(dashboard_expressions()) | metric_names(alert_expressions())
    assert used <= exported, sorted(used - exported)


def test_generation_is_counted(live: Live) -> None:
    requests = value(live, "editserve_generation_requests_total", status="ok")
    tokens = value(live, "editserve_generated_tokens_total")
    first = value(live, "editserve_generation_time_to_first_token_seconds_count")
    batches = value(live, "editserve_generation_batch_size_count")
    r = live.client.post(
        "/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}},
    )
    assert r.status_code == 200
    assert value(live, "editserve_generation_requests_total", status="ok") == requests + 1
    assert value(live, "editserve_generated_tokens_total") == tokens + 5
    assert value(live, "editserve_generation_time_to_first_token_seconds_count") == first + 1
    assert value(live, "editserve_generation_batch_size_count") == batches + 1


def test_edit_phases_and_probes_are_published(live: Live) -> None:
    counts = {
        phase: value(live, "editserve_edit_apply_seconds_count", phase=phase)
        for phase in ("keys", "zstar", "solve", "swap", "probes", "total")
    }
    edit_id = live.client.post("/edits", json=DARRIEUX).json()["id"]
    edit = wait_status(live.client, edit_id, {"applied", "failed"})
    assert edit["status"] == "applied", edit
    for phase, count in counts.items():
        assert value(live, "editserve_edit_apply_seconds_count", phase=phase) == count + 1, phase
    probes = edit["scores"]["probes"]
    assert 0 < probes["agreement"] <= 1 and probes["kl"] >= 0 and probes["perplexity_ratio"] > 0
    assert value(live, "editserve_probe_top1_agreement") == probes["agreement"]
    before = value(live, "editserve_last_edit_target_probability", when="before")
    after = value(live, "editserve_last_edit_target_probability", when="after")
    assert after > before
    assert value(live, "editserve_active_edits") >= 1
    assert 0 < value(live, "editserve_d4s_sums_room_used") < 1e-3
    live.client.post(f"/edits/{edit_id}/revert")
    wait_status(live.client, edit_id, {"reverted"})
    assert value(live, "editserve_d4s_sums_room_used") == 0
    # The norms are published with the status; the probe pass follows it.
    assert all(value(live, "editserve_layer_delta_mean_abs", layer=layer) == 0 for layer in LAYERS)
    # Back to the original weights: the probes agree with the original model again. Waiting on
    # the KL, not the agreement: an edit can leave every probe's top token alone, and then the
    # edit's own report, still published until the revert's pass ends, already shows 1.0.
    wait_for(
        lambda: value(live, "editserve_probe_kl_mean") == 0.0,
        60,
        "the probe pass after the revert",
    )
    assert value(live, "editserve_probe_top1_agreement") == 1.0


@pytest.mark.parametrize("action", ["reject", "flag"])
def test_guardrail_rejects_or_flags_a_breaching_edit(
    lm: LoadedModel, c0: dict, server_cache, covariance_tokens: int, tmp_path: Path, action: str
) -> None:
    # Any real edit moves some layer by more than a millionth of its mean |W0|.
    settings = server_settings(
        server_cache,
        covariance_tokens,
        tmp_path / "data",
        guard_max_delta_growth=1e-6,
        guard_min_agreement=0.5,  # kept: an edit keeps far more than half the probes
        guard_action=action,
        v_steps=OBS_STEPS,
        method="d4s",
    )
    with live_server(settings, lm, c0) as live:
        digest = live.client.get("/info").json()["weights_digest"]
        edit_id = live.client.post("/edits", json=EIFFEL).json()["id"]
        edit = wait_status(live.client, edit_id, {"applied", "rejected", "failed"})
        info = live.client.get("/info").json()
        breached = value(
            live, "editserve_guardrail_breaches_total", guardrail="delta_growth", action=action
        )
        agreement_breaches = value(
            live, "editserve_guardrail_breaches_total", guardrail="agreement", action=action
        )
        assert breached == 1 and agreement_breaches == 0
        if action == "reject":
            assert edit["status"] == "rejected", edit
            assert edit["error"]["type"].endswith("/guardrail")
            assert "mean |W - W0| grew by" in edit["error"]["detail"]
            [breach] = edit["error"]["breaches"]
            assert breach["guardrail"] == "delta_growth" and breach["value"] > 1e-6
            # Rolled back before anyone saw it: the very same weights, no new version.
            assert info["weights_digest"] == digest and info["model_version"] == 0
            assert value(live, "editserve_edits_total", status="rejected") == 1
            assert value(live, "editserve_edits_total", status="applied") == 0
            r = live.client.post(
                "/generate",
                json={"inputs": EIFFEL["prompt"], "parameters": {"max_new_tokens": 2}},
            )
            assert r.json()["generated_text"].startswith(" Paris")
        else:
            assert edit["status"] == "applied", edit
            assert edit["scores"]["guardrail"]["action"] == "flag"
            assert edit["scores"]["guardrail"]["breaches"][0]["guardrail"] == "delta_growth"
            assert info["weights_digest"] != digest
            assert value(live, "editserve_edits_total", status="applied") == 1
