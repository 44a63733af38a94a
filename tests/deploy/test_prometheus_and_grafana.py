"""The deploy files checked offline with Prometheus' own tool: alert rules and their unit
tests, and every dashboard expression as PromQL. (That they name only metrics the service
exports is checked against a live server in ``tests/service/test_observability.py``.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "editserve.json"
# What Grafana substitutes before it sends an expression.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (.ci/run installs Debian's prometheus package)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def dashboard_expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    out = []
    for expr in exprs:
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        out.append(expr)
    return out


def alert_expressions() -> list[str]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def metric_names(expressions: list[str]) -> set[str]:
    return {m for e in expressions for m in re.findall(r"\beditserve_[a-z0-9_]+", e)}


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "tests" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_promtool_catches_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail: a dashboard typo is caught."""
    rules = {"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum(rate(a[5m])"}]}]}
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_dashboard_covers_what_operators_watch() -> None:
    names = metric_names(dashboard_expressions())
    for needed in (
        "editserve_edits_total",
        "editserve_active_edits",
        "editserve_edit_queue_depth",
        "editserve_edit_apply_seconds_sum",
        "editserve_layer_weight_mean_abs",
        "editserve_layer_delta_mean_abs",
        "editserve_probe_top1_agreement",
        "editserve_probe_kl_mean",
        "editserve_generation_seconds_bucket",
        "editserve_generation_time_to_first_token_seconds_bucket",
        "editserve_generated_tokens_total",
        "editserve_generation_batch_size_sum",
        "editserve_log_lag_operations",
        "editserve_model_version",
    ):
        assert needed in names, needed


def test_dashboard_file_is_generated_from_its_script() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert DASHBOARD.read_text() == build_dashboard.render(), (
        "deploy/grafana/dashboards/editserve.json is stale: python scripts/build_dashboard.py"
    )


@pytest.mark.parametrize(
    "path",
    [
        ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
        ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "editserve.yml",
    ],
)
def test_grafana_provisioning_files_are_well_formed(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == 1
    entries = doc.get("datasources") or doc.get("providers")
    assert entries and all("name" in e and "type" in e for e in entries)
    if "datasources" in doc:
        # The dashboard's default data source variable points at this uid.
        dashboard = json.loads(DASHBOARD.read_text())
        current = dashboard["templating"]["list"][0]["current"]["value"]
        assert entries[0]["uid"] == current
