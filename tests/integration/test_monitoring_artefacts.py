"""Integration: the alert rules and the Grafana dashboard match the metrics we export."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdproxy.runtime.metrics import Metrics
from tests.conftest import require_binary
from tests.integration.test_metrics import exercise_all, sample_snapshot, samples, typed

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "monitoring" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "monitoring" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sdproxy-dashboard.json"
#: labels Prometheus adds to every scraped series
TARGET_LABELS = {"job", "instance"}


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool", install="apt-get install prometheus")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_exprs() -> Iterator[str]:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["definition"]


def all_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()] + list(dashboard_exprs())


def test_alert_rules_pass_promtool(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_scenarios_fire_as_expected(promtool: str) -> None:
    """deploy/monitoring/alerts_test.yaml: synthetic series in, expected alerts out."""
    result = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "SdproxyQueueWaitHigh": "sdproxy_queue_wait_seconds_bucket",
        "SdproxyQueueNearlyFull": "sdproxy_queue_capacity",
        "SdproxyPodsStuckStarting": 'state=~"starting',
        "SdproxyBackendErrors": "sdproxy_backend_errors_total",
        "SdproxyNoReadyPodsWithQueuedWork": 'state="ready"',
        "SdproxyDiscoveryDisconnected": "sdproxy_discovery_connected",
        "SdproxyNoLeader": "sdproxy_leader",
    }
    for alert, fragment in wanted.items():
        assert fragment in exprs[alert], alert


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, is valid PromQL."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _fill_grafana_variables(expr)}
        for i, expr in enumerate(dashboard_exprs())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _fill_grafana_variables(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$job", ".*")


def test_dashboard_uses_the_datasource_variable() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_the_key_signals() -> None:
    text = "\n".join(dashboard_exprs())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(sdproxy_queue_wait" in text
    for name in (
        "sdproxy_queue_depth",
        "sdproxy_pod_inflight",
        "sdproxy_pod_limit",
        "sdproxy_desired_pods",
        'sdproxy_pods{job=~"$job",state="ready"}',
        "sum by (code) (rate(sdproxy_requests_total",
        "sum by (reason) (rate(sdproxy_rejected_total",
        "sum by (pod, kind) (rate(sdproxy_backend_errors_total",
        "sum by (reason) (rate(sdproxy_interrupts_total",
    ):
        assert name in text, name


def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, from an exposition where every metric has samples."""
    metrics = Metrics(snapshot=typed(sample_snapshot))
    exercise_all(metrics)
    series: dict[str, set[str]] = {}
    for sample in samples(metrics):
        series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_every_referenced_metric_and_label_is_exported() -> None:
    series = exported_series()
    missing: list[str] = []
    for expr in all_exprs():
        for name in re.findall(r"\bsdproxy_[a-z0-9_]+", expr):
            if name not in series:
                missing.append(f"{name} (in {expr!r})")
        for name, selector in re.findall(r"\b(sdproxy_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                if label not in TARGET_LABELS and label not in series.get(name, set()):
                    missing.append(f"label {label} of {name}")
    assert not missing, missing
