"""The shipped monitoring files, checked offline: rules pass promtool, the dashboard is well-formed
and names only the provisioned datasource."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from tests.monitoring.conftest import ALERTS, DASHBOARD, DATASOURCES, PROVIDERS, tool


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    wanted = {"type": "prometheus", "uid": datasource["uid"]}
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]

    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Queues", "Workers", "Latency", "Failures"]
    charts = [p for p in panels if p["type"] != "row"]
    assert len({p["title"] for p in charts}) == len(charts), "panel titles are unique"
    known = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    for panel in charts:
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["description"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == wanted, panel["title"]
            assert target["expr"].strip() and target["legendFormat"], panel["title"]
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= known, target["expr"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == wanted
