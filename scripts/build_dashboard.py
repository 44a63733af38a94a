"""Write the Grafana dashboard, ``deploy/grafana/dashboards/editserve.json``.

The dashboard is generated so that every panel has the same shape and every expression lives
in one readable list; ``tests/deploy`` checks that the file is up to date, that every
expression is valid PromQL and that it names only metrics the service exports.

    python scripts/build_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent.parent / "deploy" / "grafana" / "dashboards" / "editserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'  # every expression is filtered by the instance variable
RATE = "$__rate_interval"


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""),
        )
        for q in (0.5, 0.99)
    ]


# (title, unit, [(expression, legend)], width, kind)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int, str]]]] = [
    (
        "Edits",
        [
            (
                "Edits finished, by outcome",
                "short",
                [
                    (
                        f"sum by (status) (increase(editserve_edits_total{{{SEL}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                6,
                "bars",
            ),
            (
                "Active edits",
                "short",
                [(f"editserve_active_edits{{{SEL}}}", "{{instance}}")],
                6,
                "line",
            ),
            (
                "Queue depth",
                "short",
                [
                    (f"max(editserve_edit_queue_depth{{{SEL}}})", "edits waiting"),
                    (f"max(editserve_edit_queue_limit{{{SEL}}})", "limit (429 beyond)"),
                    (f"sum(editserve_generation_queue_depth{{{SEL}}})", "generation requests"),
                ],
                6,
                "line",
            ),
            (
                "D4S sums: share of their exact range in use",
                "percentunit",
                [(f"editserve_d4s_sums_room_used{{{SEL}}}", "{{instance}}")],
                6,
                "line",
            ),
            (
                "Edit apply time by phase (mean)",
                "s",
                [
                    (
                        f"sum by (phase) (rate(editserve_edit_apply_seconds_sum{{{SEL}}}[{RATE}]))"
                        f" / sum by (phase) (rate(editserve_edit_apply_seconds_count{{{SEL}}}"
                        f"[{RATE}]))",
                        "{{phase}}",
                    )
                ],
                12,
                "line",
            ),
            (
                "Last edit: P(target_new) on its prompt",
                "percentunit",
                [(f"editserve_last_edit_target_probability{{{SEL}}}", "{{when}} {{instance}}")],
                6,
                "line",
            ),
            (
                "Guardrail breaches",
                "short",
                [
                    (
                        "sum by (guardrail, action) "
                        f"(increase(editserve_guardrail_breaches_total{{{SEL}}}[{RATE}]))",
                        "{{guardrail}} ({{action}})",
                    )
                ],
                6,
                "bars",
            ),
        ],
    ),
    (
        "Model health",
        [
            (
                "Mean |W| per edited layer",
                "none",
                [(f"avg by (layer) (editserve_layer_weight_mean_abs{{{SEL}}})", "layer {{layer}}")],
                12,
                "line",
            ),
            (
                "Mean |W - W0| per edited layer",
                "none",
                [(f"avg by (layer) (editserve_layer_delta_mean_abs{{{SEL}}})", "layer {{layer}}")],
                12,
                "line",
            ),
            (
                "Locality probes: top-1 agreement with the original model",
                "percentunit",
                [(f"editserve_probe_top1_agreement{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Locality probes: mean KL from the original model",
                "none",
                [(f"editserve_probe_kl_mean{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Held-out perplexity / original",
                "none",
                [(f"editserve_probe_perplexity_ratio{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Edit retention: share of re-checked facts that still hold (last 64 checks)",
                "percentunit",
                [(f"editserve_edit_retention{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Retention checks by result",
                "short",
                [
                    (
                        "sum by (result) "
                        f"(increase(editserve_edits_checked_total{{{SEL}}}[{RATE}]))",
                        "{{result}}",
                    )
                ],
                8,
                "bars",
            ),
            (
                "Keyed memory: entries in effect (4 a fact) and MiB",
                "short",
                [
                    (f"editserve_memory_entries{{{SEL}}}", "entries {{instance}}"),
                    (f"editserve_memory_bytes{{{SEL}}} / 2^20", "MiB {{instance}}"),
                ],
                8,
                "line",
            ),
        ],
    ),
    (
        "Generation",
        [
            (
                "Generation latency",
                "s",
                quantiles("editserve_generation_seconds"),
                8,
                "line",
            ),
            (
                "Time to first token",
                "s",
                quantiles("editserve_generation_time_to_first_token_seconds"),
                8,
                "line",
            ),
            (
                "Tokens per second",
                "short",
                [
                    (f"sum(rate(editserve_generated_tokens_total{{{SEL}}}[{RATE}]))", "generated"),
                    (f"sum(rate(editserve_prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt"),
                ],
                8,
                "line",
            ),
            (
                "Batch size (mean)",
                "short",
                [
                    (
                        f"sum(rate(editserve_generation_batch_size_sum{{{SEL}}}[{RATE}]))"
                        f" / sum(rate(editserve_generation_batch_size_count{{{SEL}}}[{RATE}]))",
                        "requests per batch",
                    )
                ],
                8,
                "line",
            ),
            (
                "Generation requests by outcome",
                "reqps",
                [
                    (
                        "sum by (status) "
                        f"(rate(editserve_generation_requests_total{{{SEL}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                8,
                "line",
            ),
        ],
    ),
    (
        "Replicas",
        [
            (
                "Log lag (operations behind the head)",
                "short",
                [(f"editserve_log_lag_operations{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Model version",
                "none",
                [(f"editserve_model_version{{{SEL}}}", "{{instance}}")],
                8,
                "line",
            ),
            (
                "Up (model ready, log reachable) and diverged (weights unlike their peers')",
                "short",
                [
                    (f"editserve_up{{{SEL}}}", "ready {{instance}}"),
                    (f"editserve_log_up{{{SEL}}}", "log {{instance}}"),
                    (f"editserve_weights_diverged{{{SEL}}}", "diverged {{instance}}"),
                ],
                8,
                "line",
            ),
        ],
    ),
]


def panel(
    pid: int,
    title: str,
    unit: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    w: int,
    kind: str,
) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": kind, "lineWidth": 1, "fillOpacity": 10}
    if kind == "bars":
        custom.update(stacking={"mode": "normal", "group": "A"}, fillOpacity=80)
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    pid = 1
    for row_title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        x = 0
        for title, unit, targets, width, kind in row:
            if x + width > 24:
                x, y = 0, y + 8
            panels.append(panel(pid, title, unit, targets, x, y, width, kind))
            pid += 1
            x += width
        y += 8
    return {
        "uid": "editserve",
        "title": "editserve",
        "description": "Edits, model health (weight norms, locality probes), serving, replicas",
        "tags": ["editserve"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
                },
                {
                    "name": "instance",
                    "label": "Replica",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(editserve_up, instance)", "refId": "A"},
                    "definition": "label_values(editserve_up, instance)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
