"""The Grafana dashboard and the Prometheus alerts of ``dashboards/`` (issue 3).

Static checks (the JSON is what ``build_dashboard.py`` writes; every query uses the variables and
only metric names from ``promql.METRICS``), ``promtool check rules`` / ``promtool test rules``,
and a real Prometheus loaded with synthetic series of every metric that must answer each panel's
query. promtool and prometheus come from Debian's ``prometheus`` package; without them these
tests are skipped, or fail under ``SIXGATE_LAB_REQUIRED=1`` (CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import promql

from sixgate.coordinator.metrics import METRIC_NAMES

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
DASHBOARD = DASHBOARDS / "sixgate.json"
RULES = DASHBOARDS / "alerts.rules.yml"
RULE_TESTS = DASHBOARDS / "alerts.test.yml"
INSTANCES = ("gw-a:9641", "gw-b:9641")
STEP_S = 15
SAMPLES = 240  # one hour
ALERTS = {"SixgateDown", "SixgateNotReady", "SixgateDropRatioHigh",
          "SixgateFlowTableNearlyFull",
          "SixgateNat64Pool4NearlyExhausted", "SixgateTunnelPeerUnreachable",
          "SixgateClusterNodeWithdrawn",
          "SixgateWorkerRestarting"}


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        reason = f"PROMETHEUS TESTS CANNOT RUN: {name} not found (Debian package prometheus)"
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _all_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every dashboard query, the instance variable and every alert."""
    return [
        *((f"panel {title!r}", expr) for title, expr in promql.panel_queries(DASHBOARD)),
        *((f"variable {var['name']!r}", _label_values_selector(var["definition"]))
          for var in _dashboard()["templating"]["list"] if var["type"] == "query"),
        *((f"alert {rule['alert']}", rule["expr"]) for rule in promql.alert_rules(RULES)),
    ]


def _label_values_selector(definition: str) -> str:
    """The series selector of Grafana's ``label_values(selector, label)``."""
    match = re.fullmatch(r"label_values\((.*),\s*\w+\)", definition)
    assert match, definition
    return match.group(1)


# --- the dashboard JSON -----------------------------------------------------------------------


def test_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    written = tmp_path / "sixgate.json"
    subprocess.run([sys.executable, str(DASHBOARDS / "build_dashboard.py"), "--output",
                    str(written)], check=True, timeout=60)
    assert written.read_text(encoding="utf-8") == DASHBOARD.read_text(encoding="utf-8"), (
        "dashboards/sixgate.json is stale: run python3 dashboards/build_dashboard.py")


def test_rows_and_variables() -> None:
    dashboard = _dashboard()
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Overview", "Limits"]
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["definition"] == "label_values(sixgate_build_info, instance)"
    assert instance["query"]["query"] == instance["definition"]
    assert instance["multi"] and instance["includeAll"]
    assert instance["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_has_the_datasource_variable_a_description_and_queries() -> None:
    for panel in promql.all_panels(_dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        if panel["type"] == "row":
            continue
        assert panel["description"].strip(), panel["title"]
        assert panel["targets"], panel["title"]
        for query in panel["targets"]:
            assert query["datasource"] == panel["datasource"], panel["title"]
    titles = [panel["title"] for panel in promql.all_panels(_dashboard())]
    assert len(titles) == len(set(titles)), titles
    ids = [panel["id"] for panel in promql.all_panels(_dashboard())]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize(("title", "expr"), promql.panel_queries(DASHBOARD))
def test_every_selector_filters_the_instance_and_rates_use_rate_interval(title: str,
                                                                         expr: str) -> None:
    assert 'instance=~"$instance"' in expr
    for name, matchers in promql.selectors(expr):
        assert 'instance=~"$instance"' in matchers, f"{title}: {name} is not filtered"
    if "[" in expr:
        assert expr.count("[") == expr.count("[$__rate_interval]"), title


@pytest.mark.parametrize(("where", "expr"), _all_exprs())
def test_every_metric_name_is_one_sixgate_exports(where: str, expr: str) -> None:
    names = promql.metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - promql.KNOWN_METRICS
    assert not unknown, f"{where}: unknown metric(s) {sorted(unknown)}"


def test_the_scanner_finds_every_selector_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{x="y}"}[5m]))) '
            '/ on (instance) group_left (process) (b > 1e-3) or sum(c{d=~"$instance"})')
    assert promql.selectors(expr) == [("a_bucket", '{x="y}"}'), ("b", ""),
                                      ("c", '{d=~"$instance"}')]
    assert promql.metric_names("sixgate_drops_totl{reason='x'}") == {"sixgate_drops_totl"}


def test_expand_substitutes_grafanas_variables() -> None:
    expr = 'rate(x{instance=~"$instance"}[$__rate_interval]) + y{i="${instance}"}[$__interval]'
    assert promql.expand(expr, "127.0.0.1:9641", "1m", "15s") == (
        'rate(x{instance=~"127\\\\.0\\\\.0\\\\.1:9641"}[1m]) '
        '+ y{i="127\\\\.0\\\\.0\\\\.1:9641"}[15s]')


def test_provisioning_matches_the_dashboard() -> None:
    datasources = yaml.safe_load(
        (DASHBOARDS / "provisioning/datasources/sixgate.yml").read_text(encoding="utf-8"))
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://localhost:9090"
    variables = {var["name"]: var for var in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    providers = yaml.safe_load(
        (DASHBOARDS / "provisioning/dashboards/sixgate.yml").read_text(encoding="utf-8"))
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


# --- the alert rules --------------------------------------------------------------------------


def test_the_alerts_exist_with_severity_and_annotations() -> None:
    rules = promql.alert_rules(RULES)
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert "{{ $labels.instance }}" in annotations["summary"], rule["alert"]
        assert "$value" in annotations["description"], rule["alert"]


def test_every_alert_has_a_rule_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == ALERTS
    assert quiet == ALERTS


def test_promtool_check_rules() -> None:
    result = subprocess.run([_binary("promtool"), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = subprocess.run([_binary("promtool"), "test", "rules", str(RULE_TESTS)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus answers every panel ----------------------------------------------------


class Prometheus:
    """A Prometheus server on a TSDB backfilled with ``promql.openmetrics`` series."""

    def __init__(self, url: str, end_s: int) -> None:
        self.url = url
        self.end_s = end_s

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400 carries the parse error
            body = json.load(error)
        assert body["status"] == "success", f"{params}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr, time=str(self.end_s))
        return data["result"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    promtool, server = _binary("promtool"), _binary("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    # Whole hours in the recent past, inside the default 15-day retention.
    start_s = int(time.time()) // 3600 * 3600 - 3 * 3600
    series = work / "series.om"
    series.write_text(promql.openmetrics(INSTANCES, start_s, SAMPLES, STEP_S), encoding="utf-8")
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet",
                    str(series), str(work / "data")], check=True, timeout=120)
    (work / "prometheus.yml").write_text(f"global:\n  scrape_interval: {STEP_S}s\n",
                                         encoding="utf-8")
    port = _free_port()
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [server, f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, process, work / "prometheus.log")
        yield Prometheus(url, start_s + (SAMPLES - 1) * STEP_S)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready after 60 s:\n{log.read_text()}")


def test_instance_variable_lists_every_gateway(prometheus: Prometheus) -> None:
    values = prometheus.get("/api/v1/label/instance/values",
                            **{"match[]": "sixgate_build_info"})
    assert sorted(values) == sorted(INSTANCES)


@pytest.mark.parametrize(("title", "expr"), promql.panel_queries(DASHBOARD))
def test_every_panel_query_returns_data_for_the_selected_instance(
        prometheus: Prometheus, title: str, expr: str) -> None:
    rate_interval = f"{4 * STEP_S}s"
    result = prometheus.query(promql.expand(expr, INSTANCES[0], rate_interval))
    assert result, f"{title}: no data for {INSTANCES[0]}"
    assert all(sample["metric"].get("instance") == INSTANCES[0] for sample in result), result
    numbers = [float(sample["value"][1]) for sample in result]
    assert all(number == number for number in numbers), f"{title}: NaN in {result}"
    assert not prometheus.query(promql.expand(expr, "absent:9641", rate_interval)), title


def test_contract_is_what_the_exporter_exports() -> None:
    """tests/promql.py METRICS (what dashboards and rules may use) and the exporter's own list
    (coordinator/metrics.py METRIC_NAMES, which a unit test ties to the real families) agree."""
    names = {name.removesuffix("_total") if kind == "counter" else name
             for name, (kind, _labels) in promql.METRICS.items()}
    assert names == set(METRIC_NAMES)
