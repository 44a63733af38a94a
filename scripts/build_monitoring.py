"""Copy the alert rules and the Grafana dashboard into the kustomize monitoring component.

kustomize reads no file outside a kustomization's folder, so ``components/monitoring`` keeps
its own copies: ``prometheusrule.yaml`` wraps the groups of ``deploy/prometheus/alerts.yml`` in
a PrometheusRule, ``editserve.json`` is ``deploy/grafana/dashboards/editserve.json`` unchanged.
``tests/deploy/test_images_and_k8s.py`` fails when either copy is stale.

    python scripts/build_monitoring.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "editserve.json"
COMPONENT = DEPLOY / "k8s" / "components" / "monitoring"
RULE_OUT = COMPONENT / "prometheusrule.yaml"
DASHBOARD_OUT = COMPONENT / "editserve.json"

HEADER = """\
# Generated from deploy/prometheus/alerts.yml by scripts/build_monitoring.py; do not edit.
# kube-prometheus-stack selects PrometheusRules by its release label by default: add
# `release: <your release name>` to the labels, or configure ruleSelector.
"""


def render_prometheus_rule() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "editserve",
            "labels": {
                "app.kubernetes.io/name": "editserve",
                "app.kubernetes.io/component": "server",
            },
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=100, allow_unicode=True)


def render_dashboard() -> str:
    return DASHBOARD.read_text()


def main() -> None:
    RULE_OUT.write_text(render_prometheus_rule())
    DASHBOARD_OUT.write_text(render_dashboard())
    for path in (RULE_OUT, DASHBOARD_OUT):
        print(f"wrote {path.relative_to(DEPLOY.parent)}")


if __name__ == "__main__":
    main()
