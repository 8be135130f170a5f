"""deploy/grafana/score-ingest.json: a dashboard Grafana can load, reading metrics that exist.

Checked offline: its structure (a Prometheus datasource variable every panel uses, targets
with expressions, unique ids, panels on the 24-column grid without overlaps), every
expression parsed by promtool, and every metric named one the code exports or RabbitMQ's
plugin does (tests/deploy/test_alert_rules.py keeps both lists).
"""

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_alert_rules import metrics_named, run_promtool, unknown_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "score-ingest.json"
GRID_COLUMNS = 24
PANEL_TYPES = frozenset({"row", "stat", "timeseries"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables, as a range Prometheus understands, for parsing the expressions.
GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# What the issue asks the dashboard to show, each by a metric some panel reads.
MUST_SHOW = {
    "accept rate": "score_ingest_scores_accepted_total",
    "4xx/5xx/429/503": "score_ingest_http_requests_total",
    "quota rejections": "score_ingest_quota_rejections_total",
    "publish failures": "score_ingest_publish_failures_total",
    "publish-confirm latency": "score_ingest_publish_confirm_seconds_bucket",
    "queue depth per queue": "rabbitmq_queue_messages_ready",
    "consumer count": "rabbitmq_queue_consumers",
    "persist rate": "score_ingest_scores_persisted_total",
    "accept-to-stored latency": "score_ingest_accept_to_stored_seconds_bucket",
    "dead letters": "score_ingest_dead_lettered_total",
    "database retries": "score_ingest_database_retries_total",
}


def dashboard() -> dict[str, Any]:
    """The dashboard, parsed."""
    parsed = json.loads(DASHBOARD.read_text())
    assert isinstance(parsed, dict)
    return parsed


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def graphs(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query (all but rows)."""
    return [panel for panel in panels(board) if panel["type"] != "row"]


def expressions(board: dict[str, Any]) -> list[str]:
    """Every query expression of the dashboard."""
    return [target["expr"] for panel in graphs(board) for target in panel["targets"]]


def test_the_dashboard_has_a_prometheus_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "score-ingest"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_queries_the_variable_with_expressions() -> None:
    for panel in graphs(dashboard()):
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert panel["datasource"] == DATASOURCE, title
        assert panel.get("description"), title
        assert panel["targets"], title
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
            assert metrics_named(target["expr"]), (title, target["expr"])


def test_panel_ids_are_unique_and_panels_tile_the_grid() -> None:
    every = panels(dashboard())
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), ids
    boxes = []
    for panel in every:
        grid = panel["gridPos"]
        x, y, w, h = (grid[key] for key in ("x", "y", "w", "h"))
        assert all(isinstance(v, int) and v >= 0 for v in (x, y)), panel["title"]
        assert w > 0, panel["title"]
        assert h > 0, panel["title"]
        assert x + w <= GRID_COLUMNS, panel["title"]
        boxes.append((panel["title"], x, y, w, h))
    for (a, ax, ay, aw, ah), (b, bx, by, bw, bh) in combinations(boxes, 2):
        overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
        assert not overlap, f"panels {a!r} and {b!r} overlap"


def test_every_metric_the_dashboard_reads_exists() -> None:
    assert unknown_metrics(expressions(dashboard())) == {}


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    read = set().union(*(metrics_named(expr) for expr in expressions(dashboard())))
    missing = {what: metric for what, metric in MUST_SHOW.items() if metric not in read}
    assert missing == {}
    statuses = " ".join(expressions(dashboard()))
    for status in ("4..|5..", '"429"', '"503"'):
        assert status in statuses, status


def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule, Grafana's variables made ranges."""
    rules = []
    for number, expr in enumerate(expressions(dashboard())):
        for variable, value in GRAFANA_RANGES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:expression_{number}", "expr": expr})
    as_rules = tmp_path / "dashboard-expressions.yaml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    checked = run_promtool("check", "rules", str(as_rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    "expr", ["sum(rate(score_ingest_scores_accepted_total[5m])", "score_ingest_queue_depth{"]
)
def test_the_expression_check_refuses_what_does_not_parse(tmp_path: Path, expr: str) -> None:
    as_rules = tmp_path / "broken.yaml"
    rule = {"record": "dashboard:broken", "expr": expr}
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [rule]}]}))

    assert run_promtool("check", "rules", str(as_rules)).returncode != 0
