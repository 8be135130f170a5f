"""deploy/prometheus and deploy/k8s/monitoring: the alerting rules, checked offline.

promtool (Debian's package `prometheus`) parses the rules and runs unit tests of alerts
firing and staying quiet on made-up series; every metric an expression names must be one
the code exports or one RabbitMQ's rabbitmq_prometheus plugin does; every alert says how
bad it is, what it means and which section of docs/operations.md to read.
"""

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, Metric

import api.app
import worker.worker

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "score-ingest-rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "monitoring" / "score-ingest-rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

# RabbitMQ's own metrics the rules and the dashboard may use: the per-queue ones of the
# rabbitmq_prometheus plugin (labels vhost and queue on /metrics/per-object), as listed in
# rabbitmq-server's deps/rabbitmq_prometheus/metrics.md, section "Queues".
RABBITMQ_PLUGIN_METRICS = frozenset(
    {
        "rabbitmq_queue_consumer_utilisation",
        "rabbitmq_queue_consumers",
        "rabbitmq_queue_messages",
        "rabbitmq_queue_messages_bytes",
        "rabbitmq_queue_messages_published_total",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_ready_bytes",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_messages_unacked_bytes",
    }
)
# Alerts the issue asks for (a growing backlog, dead letters, no consumers, publish
# failures, visibility lag), and the two an on-call engineer wants beside them.
EXPECTED_ALERTS = frozenset(
    {
        "ScoreIngestBacklogGrowing",
        "ScoreIngestBacklogNearlyFull",
        "ScoreIngestDeadLetters",
        "ScoreIngestNoConsumers",
        "ScoreIngestPublishFailures",
        "ScoreIngestVisibilityLag",
        "ScoreIngestDatabaseRetries",
    }
)
SEVERITIES = frozenset({"warning", "critical"})
_METRIC_NAME = re.compile(r"\b(?:score_ingest|rabbitmq)_[a-zA-Z0-9_]+")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def promtool() -> str:
    """The path of promtool; fails (never skips) with how to install it when it is missing."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is not installed: it comes with Debian's package `prometheus` "
            "(apt-get install -y --no-install-recommends prometheus; .ci/run installs it)",
            pytrace=False,
        )
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool with these arguments, its output captured."""
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _sample_names(metric: Metric) -> set[str]:
    return {metric.name + suffix for suffix in _SUFFIXES.get(metric.type, ("",))}


def exported_metrics() -> frozenset[str]:
    """Every sample name the api and the worker export (their modules are imported here, so
    every metric they define is registered)."""
    assert api.app.create_app is not None
    assert worker.worker.ScoreWorker is not None
    names: set[str] = set()
    for metric in REGISTRY.collect():
        names |= _sample_names(metric)
    return frozenset(name for name in names if name.startswith("score_ingest_"))


def metrics_named(expression: str) -> set[str]:
    """The score_ingest_* and rabbitmq_* metric names an expression reads."""
    return set(_METRIC_NAME.findall(expression))


def unknown_metrics(expressions: Iterable[str]) -> dict[str, set[str]]:
    """For each expression naming a metric neither the code nor the plugin exports: which."""
    known = exported_metrics() | RABBITMQ_PLUGIN_METRICS
    unknown = {expr: metrics_named(expr) - known for expr in expressions}
    return {expr: names for expr, names in unknown.items() if names}


def load_rules(path: Path) -> list[dict[str, Any]]:
    """The groups of a rules file, or of a PrometheusRule's spec."""
    document = yaml.safe_load(path.read_text())
    groups = document["spec"]["groups"] if "spec" in document else document["groups"]
    assert isinstance(groups, list)
    return groups


def alerts() -> list[dict[str, Any]]:
    """Every alerting rule of the plain rules file."""
    return [rule for group in load_rules(RULES) for rule in group["rules"] if "alert" in rule]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_rules_file_passes_promtool_check() -> None:
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


def test_promtool_check_refuses_a_broken_expression(tmp_path: Path) -> None:
    groups = load_rules(RULES)
    groups[0]["rules"][0]["expr"] = "sum(rate(score_ingest_scores_accepted_total[5m])"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": groups}))

    checked = run_promtool("check", "rules", str(broken))
    assert checked.returncode != 0
    assert "parse error" in checked.stdout + checked.stderr


def test_the_prometheus_rule_holds_the_same_groups() -> None:
    (document,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    assert document["kind"] == "PrometheusRule"
    assert document["metadata"]["namespace"] == "score-ingest"
    assert load_rules(PROMETHEUS_RULE) == load_rules(RULES), (
        "deploy/k8s/monitoring/score-ingest-rules.yaml's spec.groups must be "
        "deploy/prometheus/score-ingest-rules.yaml's groups"
    )


def test_there_is_an_alert_for_each_thing_to_be_paged_for() -> None:
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), names
    assert set(names) == EXPECTED_ALERTS


def test_every_alert_waits_says_how_bad_and_links_its_runbook() -> None:
    sections = anchors(OPERATIONS.read_text())
    for rule in alerts():
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"]) > 40, rule["alert"]
        document, _, anchor = annotations["runbook_url"].partition("#")
        assert document == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in sections, f"docs/operations.md has no section #{anchor}"


def test_every_metric_the_rules_read_exists() -> None:
    expressions = [rule["expr"] for rule in alerts()]
    assert all(metrics_named(expr) for expr in expressions)
    assert unknown_metrics(expressions) == {}


def test_the_metric_check_notices_a_misspelt_metric() -> None:
    misspelt = "sum(rate(score_ingest_scores_acepted_total[5m]))"
    assert unknown_metrics([misspelt]) == {misspelt: {"score_ingest_scores_acepted_total"}}
    assert "score_ingest_scores_accepted_total" in exported_metrics()
    assert "score_ingest_publish_confirm_seconds_bucket" in exported_metrics()


def accept_to_stored(per_minute: dict[str, int]) -> list[dict[str, str]]:
    """The accept-to-stored histogram's cumulative buckets (by `le`), each growing by its
    count a minute for 30 minutes."""
    return [
        {
            "series": f'score_ingest_accept_to_stored_seconds_bucket{{le="{le}", entity="acme"}}',
            "values": f"0+{count}x30",
        }
        for le, count in per_minute.items()
    ]


def _annotations(alert: str, summary: str) -> dict[str, str]:
    """What promtool should see on a firing alert: its annotations, the summary rendered."""
    (rule,) = [r for r in alerts() if r["alert"] == alert]
    return {**rule["annotations"], "summary": summary}


def test_alerts_fire_and_stay_quiet_as_promtool_evaluates_them(tmp_path: Path) -> None:
    queue_labels = 'vhost="score-ingest", queue="scores.persist", instance="rabbit-0"'
    unit_tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                # At 2m the last worker goes while 50 scores wait, and more keep coming.
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"rabbitmq_queue_messages_ready{{{queue_labels}}}",
                        "values": "0 0 50+50x12",
                    },
                    {
                        "series": f"rabbitmq_queue_consumers{{{queue_labels}}}",
                        "values": "2 2 0x12",
                    },
                    # Two workers export the same depth of scores.dead: one alert, not two.
                    {
                        "series": 'score_ingest_queue_depth{queue="scores.dead", pod="w-1"}',
                        "values": "0 0 0 3x11",
                    },
                    {
                        "series": 'score_ingest_queue_depth{queue="scores.dead", pod="w-2"}',
                        "values": "0 0 0 3x11",
                    },
                    # 1 publish a second fails, 10 are confirmed: 9 % not accepted.
                    {
                        "series": 'score_ingest_publish_failures_total{reason="timeout"}',
                        "values": "0+60x14",
                    },
                    {
                        "series": "score_ingest_publish_confirm_seconds_count",
                        "values": "0+600x14",
                    },
                ],
                "alert_rule_test": [
                    # Pending for its 5 minutes, then firing.
                    {"eval_time": "6m", "alertname": "ScoreIngestNoConsumers", "exp_alerts": []},
                    {
                        "eval_time": "8m",
                        "alertname": "ScoreIngestNoConsumers",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "vhost": "score-ingest",
                                    "queue": "scores.persist",
                                },
                                "exp_annotations": _annotations(
                                    "ScoreIngestNoConsumers",
                                    "scores.persist in vhost score-ingest has messages and no "
                                    "consumer",
                                ),
                            }
                        ],
                    },
                    {"eval_time": "7m", "alertname": "ScoreIngestDeadLetters", "exp_alerts": []},
                    {
                        "eval_time": "9m",
                        "alertname": "ScoreIngestDeadLetters",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "queue": "scores.dead"},
                                "exp_annotations": _annotations(
                                    "ScoreIngestDeadLetters", "3 dead letters in scores.dead"
                                ),
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "ScoreIngestPublishFailures",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical"},
                                "exp_annotations": _annotations(
                                    "ScoreIngestPublishFailures",
                                    "9.091% of publishes are not confirmed by the broker",
                                ),
                            }
                        ],
                    },
                    # Nothing is stored, so nothing measures a lag: the other alerts speak.
                    {"eval_time": "12m", "alertname": "ScoreIngestVisibilityLag", "exp_alerts": []},
                ],
            },
            {
                # Healthy: a deep but shrinking backlog, a few failures among many confirms,
                # and scores stored within 30 s, p99.
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'score_ingest_queue_depth{queue="scores.persist", pod="w-1"}',
                        "values": "90000-1000x30",
                    },
                    {
                        "series": 'score_ingest_publish_failures_total{reason="unavailable"}',
                        "values": "0+1x30",
                    },
                    {
                        "series": "score_ingest_publish_confirm_seconds_count",
                        "values": "0+6000x30",
                    },
                    *accept_to_stored({"1": 6000, "30": 6000, "+Inf": 6000}),
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": name, "exp_alerts": []}
                    for name in sorted(EXPECTED_ALERTS)
                ],
            },
            {
                # A backlog that grows for 20 minutes, and scores stored a minute late.
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'score_ingest_queue_depth{queue="scores.persist", pod="w-1"}',
                        "values": "0+500x30",
                    },
                    *accept_to_stored({"30": 1, "60": 100, "+Inf": 100}),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "25m",
                        "alertname": "ScoreIngestBacklogGrowing",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "queue": "scores.persist"},
                                "exp_annotations": _annotations(
                                    "ScoreIngestBacklogGrowing",
                                    "scores.persist has 12.5k messages and keeps growing",
                                ),
                            }
                        ],
                    },
                    {
                        "eval_time": "25m",
                        "alertname": "ScoreIngestVisibilityLag",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": _annotations(
                                    "ScoreIngestVisibilityLag",
                                    "99% of scores take up to 59.7s from 200 to stored",
                                ),
                            }
                        ],
                    },
                ],
            },
        ],
    }
    test_file = tmp_path / "score-ingest-rules.test.yaml"
    test_file.write_text(yaml.safe_dump(unit_tests, sort_keys=False))

    tested = run_promtool("test", "rules", str(test_file))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
