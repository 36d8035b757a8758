"""deploy/grafana/outbox.json: a Grafana dashboard whose every query parses and names
the metrics the alert rules watch. (tests/e2e/test_operating.py checks the names
against a live sidecar's /metrics.)"""

from __future__ import annotations

import json
import re
from typing import Any

import promql_parser
import pytest

from tests.conftest import ROOT
from tests.deploy.test_alerts import rules

DASHBOARD = ROOT / "deploy" / "grafana" / "outbox.json"

# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "6h",
    "${job}": "outbox-deliver",
    "$job": "outbox-deliver",
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def as_prometheus_gets_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know in {expr!r}"
    return expr


def named_metrics(expr: str) -> set[str]:
    """The metric names an expression selects; it must parse."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_metrics() -> set[str]:
    names = set().union(*(named_metrics(as_prometheus_gets_it(q)) for q in queries()))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
            assert found, variable
            names.add(found.group(1))
    return names


class TestDashboard:
    @pytest.mark.parametrize("expr", queries())
    def test_every_query_parses(self, expr: str) -> None:
        assert named_metrics(as_prometheus_gets_it(expr))

    def test_a_query_that_does_not_parse_is_caught(self) -> None:
        with pytest.raises(ValueError):
            named_metrics(
                as_prometheus_gets_it("sum(rate(outbox_attempts_total[$__rate_interval])")
            )

    def test_every_query_is_of_the_chosen_data_source_and_job(self) -> None:
        for panel in panels():
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]
                assert 'job=~"$job"' in target["expr"], target["expr"]

    def test_it_shows_every_metric_the_alerts_watch(self) -> None:
        """The same metrics as the rules: what an alert says can be looked at."""
        watched = set().union(*(named_metrics(rule["expr"]) for rule in rules()))
        assert watched <= dashboard_metrics()

    def test_panels_have_unique_ids_and_do_not_overlap(self) -> None:
        cells: set[tuple[int, int]] = set()
        ids = [p["id"] for p in dashboard()["panels"]]
        assert len(ids) == len(set(ids))
        for panel in dashboard()["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            mine = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not mine & cells, panel["title"]
            cells |= mine
