"""The shipped Grafana dashboard and Prometheus alert rules query only metrics a running
gateway exposes (issue 19, item 6): a renamed metric breaks this test, not a dashboard."""

from __future__ import annotations

import json
import re

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Gateway

DASHBOARD = REPO / "deploy" / "grafana" / "ragline.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
_METRIC = re.compile(r"\b((?:ragline|process|python)_[a-z0-9_]+)\b")


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load(ALERTS.read_text())
    out += [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    return out


def test_every_metric_the_dashboard_and_alerts_query_is_exposed(gateway: Gateway) -> None:
    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    exposed: set[str] = set()
    for family in text_string_to_metric_families(text):
        exposed |= {family.name + s for s in ("", "_total", "_bucket", "_sum", "_count")}
    queries = _queries()
    assert len(queries) >= 20
    for where, expr in queries:
        names = _METRIC.findall(expr)
        assert names, f"{where}: queries no ragline metric"
        for name in names:
            assert name in exposed, f"{where}: {name} is not in /metrics"


def test_the_files_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule)
    alerts = {r["alert"] for r in rules}
    assert {"RaglineHighErrorRate", "RaglineSlowFirstToken", "RaglineNoHealthyReplica",
            "RaglineSafetyBlocksSpike", "RaglineBudgetExhausted"} <= alerts  # fmt: skip
