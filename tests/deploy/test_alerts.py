"""deploy/prometheus/alerts.yaml: valid rules, each with unit cases that pass and that
need it, run by promtool (Debian's prometheus package; `make test` installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
CASES = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool is not installed and could not be: `make test` installs Debian's "
            "prometheus when run as root; else `sudo apt-get install prometheus`"
        )
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in rules()]


class TestAlertRules:
    def test_rules_are_valid(self) -> None:
        result = promtool("check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(rules())} rules found" in result.stdout

    def test_unit_cases_pass(self) -> None:
        result = promtool("test", "rules", str(CASES))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_every_rule_has_a_case_where_it_fires_and_one_where_it_does_not(self) -> None:
        fires: set[str] = set()
        quiet: set[str] = set()
        for test in yaml.safe_load(CASES.read_text())["tests"]:
            for case in test["alert_rule_test"]:
                (fires if case["exp_alerts"] else quiet).add(case["alertname"])
        assert fires == quiet == set(alert_names())

    @pytest.mark.parametrize("name", alert_names())
    def test_the_cases_fail_without_the_rule(self, name: str, tmp_path: Path) -> None:
        """The cases bite: with the rule taken out, promtool reports them failing."""
        document = yaml.safe_load(RULES.read_text())
        for group in document["groups"]:
            group["rules"] = [r for r in group["rules"] if r.get("alert") != name]
        (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(document))
        shutil.copy(CASES, tmp_path / "alerts.test.yaml")
        result = promtool("test", "rules", str(tmp_path / "alerts.test.yaml"))
        assert result.returncode != 0
        assert f"alertname: {name}," in result.stdout + result.stderr

    def test_every_rule_says_how_bad_and_what(self) -> None:
        for rule in rules():
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert {"summary", "description"} <= set(rule["annotations"])
