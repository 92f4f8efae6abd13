"""The PrometheusRule shipped with the manifests carries exactly the rules in alerts.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_prometheusrule_groups_equal_the_alert_rules_file() -> None:
    alerts = yaml.safe_load((ROOT / "deploy/monitoring/alerts.yaml").read_text())
    rule = yaml.safe_load((ROOT / "deploy/components/prometheus/prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == alerts["groups"]
