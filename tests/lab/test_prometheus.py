"""A real Prometheus scraping a real gateway while real traffic flows (issue 3, "Proof, in CI").

One lab (6to4, 2 workers, ``max_flows = 20`` so each worker may hold 10 bindings) and one
Prometheus 2.x server in the gateway namespace, scraping ``[metrics] listen`` every 2 s with the
job name ``sixgate`` and evaluating ``dashboards/alerts.rules.yml`` every second. The test sends
known traffic (a curl -6 download, N ping -6, a dig, a SYN to an unforwarded port, spoofed 6to4
packets) and then asks Prometheus, through its HTTP API only:

- the counters agree with what was really sent (N pings -> N echo replies, K spoofed packets ->
  K ``spoofed_6to4`` drops, the download's size in ``from_services`` bytes, ...);
- every query of every dashboard panel is valid and returns finite data for this instance;
- every alert rule is valid, and each alert really goes pending or firing when its condition is
  produced for real: held TCP connections fill a worker's flow table, a burst of spoofed packets
  raises the drop ratio, a worker is SIGKILLed (restart) and SIGSTOPped (not ready), and last the
  gateway is stopped (down).

``promtool check metrics`` must accept the real /metrics body. Tests run in file order and share
the lab; each alert test first checks its alert is not active yet, so it proves its own cause.
Prometheus and the gateway's workers are signalled by PID only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import netlab
import pytest
from netlab import Lab
from support import promql

pytestmark = [pytest.mark.lab, pytest.mark.prometheus]

DASHBOARD = netlab.REPO_ROOT / "dashboards" / "sixgate.json"
RULES = netlab.REPO_ROOT / "dashboards" / "alerts.rules.yml"
ALERTS = ("SixgateDown", "SixgateNotReady", "SixgateDropRatioHigh",
          "SixgateFlowTableNearlyFull", "SixgateNat64Pool4NearlyExhausted",
          "SixgateTunnelPeerUnreachable", "SixgateClusterNodeWithdrawn",
          "SixgateWorkerRestarting")
# Families only a NAT64 (pool4) or a 6in4 gateway (its broker) has series in: this lab's 6to4
# gateway exports them empty, so a panel made of them only is checked to be a valid query here
# (tests/test_dashboards.py's synthetic series check it returns data).
EMPTY_ON_6TO4 = frozenset({"sixgate_nat64_pool4_ports", "sixgate_nat64_pool4_ports_in_use",
                           "sixgate_tunnel_peer_reachable", "sixgate_cluster_announced"})

METRICS_LISTEN = "127.0.0.1:9641"  # the gateway's default; also the target's instance label
PROMETHEUS_LISTEN = "127.0.0.1:9090"  # inside the gateway namespace, so never in use
# A scrape asks every worker with a 1.5 s timeout (coordinator/metrics.py); a stopped worker
# must show as sixgate_ready 0 in a scrape that succeeds, not as a scrape that times out.
SCRAPE_INTERVAL_S = 2
EVALUATION_INTERVAL_S = 1
RATE_INTERVAL = "1m"  # $__rate_interval: the traffic must lie inside it when panels are asked
WAIT_S = 30.0  # for a scrape or an alert state: many scrape and evaluation intervals

WORKERS = 2
MAX_FLOWS = 20
FLOW_LIMIT = MAX_FLOWS // WORKERS  # sixgate_flow_limit of each worker
PINGS = 20
SPOOFED = 7
SPOOF_BURST = 2000  # vs ~9k packets of the 10 MB download (ACKs + replies): far above 5 %
SPOOFED_6TO4_SOURCE = "2002:cb00:7101::1"  # embeds 203.0.113.1, not the outer source
RESTARTED_WORKER = 1
STOPPED_WORKER = 0

HOLD_CONNECT_TIMEOUT_S = 3.0  # refused SYNs draw ICMPv6 unreachable: connect fails at once


class PrometheusLab(Lab):
    """The lab gateway with a small flow table and an explicit metrics listener."""

    def config_text(self) -> str:
        text = super().config_text()
        assert "[gateway]\n" in text
        return (text.replace("[gateway]\n", f"[gateway]\nmax_flows = {MAX_FLOWS}\n", 1)
                + f'\n[metrics]\nlisten = "{METRICS_LISTEN}"\n')


class PrometheusServer:
    """A real Prometheus in the lab's gateway namespace, asked over its HTTP API with curl."""

    def __init__(self, lab: Lab, binary: str) -> None:
        self.lab = lab
        self.binary = binary
        self.directory = lab.tmp / "prometheus"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        """prometheus.yml (JSON is YAML)."""
        return {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                       "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{EVALUATION_INTERVAL_S}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "sixgate",
                                "static_configs": [{"targets": [METRICS_LISTEN]}]}],
        }

    def start(self) -> None:
        """Start it, then poll until it is ready and has scraped the gateway successfully."""
        self.directory.mkdir()
        config = self.directory / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=1))
        self.process = self.lab.spawn("prometheus", self.lab.gw_ns, [
            self.binary, f"--config.file={config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={PROMETHEUS_LISTEN}", "--log.level=warn"])

        def ready() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise netlab.LabError(f"prometheus exited:\n{self.lab.diagnostics()}")
            return self.lab.gw(["curl", "-sf", "--max-time", "2",
                                f"http://{PROMETHEUS_LISTEN}/-/ready"]).returncode == 0

        netlab.wait_until(ready, timeout=WAIT_S, what="prometheus /-/ready", interval=0.2)
        netlab.wait_until(self.target_up, timeout=WAIT_S, what="a successful scrape",
                          interval=0.2)

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL after 10 s)."""
        if self.process is not None:
            netlab.stop_process(self.process, 10)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the JSON answer, whatever its status."""
        argv = ["curl", "-sS", "--max-time", "10", "-G",
                f"http://{PROMETHEUS_LISTEN}/api/v1/{path}"]
        for key, value in params.items():
            argv += ["--data-urlencode", f"{key}={value}"]
        done = self.lab.gw(argv, timeout=20)
        if done.returncode != 0:
            raise netlab.LabError(f"curl {path} exited {done.returncode}: {done.stderr}")
        return dict(json.loads(done.stdout))

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector; AssertionError naming the expr if Prometheus refuses it."""
        answer = self.api("query", query=expr)
        assert answer.get("status") == "success", f"{expr}\n-> {answer}"
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The single value of an instant query (``sum(...)`` etc.)."""
        result = self.query(expr)
        assert len(result) == 1, f"{expr} -> {result}"
        return float(result[0]["value"][1])

    def values_by(self, label: str, expr: str) -> dict[str, float]:
        """{label value: value} of an instant query."""
        return {sample["metric"].get(label, ""): float(sample["value"][1])
                for sample in self.query(expr)}

    def target_up(self) -> bool:
        """The sixgate target's last scrape succeeded."""
        targets = self.api("targets")["data"]["activeTargets"]
        return any(t["labels"].get("instance") == METRICS_LISTEN and t["health"] == "up"
                   for t in targets)

    def wait_scraped_after(self, unix_s: float) -> None:
        """Poll until a scrape of the gateway started after ``unix_s`` is stored."""
        def scraped() -> bool:
            stamps = self.query(f'timestamp(up{{job="sixgate",instance="{METRICS_LISTEN}"}})')
            return bool(stamps) and float(stamps[0]["value"][1]) > unix_s

        netlab.wait_until(scraped, timeout=WAIT_S, what=f"a scrape after {unix_s:.3f}",
                          interval=0.2)

    def active_alerts(self, name: str) -> list[dict[str, Any]]:
        """Pending or firing alerts named ``name``."""
        return [a for a in self.api("alerts")["data"]["alerts"]
                if a["labels"].get("alertname") == name]

    def wait_alert(self, name: str, states: tuple[str, ...] = ("pending", "firing")
                   ) -> dict[str, Any]:
        """Poll until alert ``name`` is in one of ``states``; that alert."""
        def active() -> dict[str, Any] | None:
            return next((a for a in self.active_alerts(name) if a["state"] in states), None)

        try:
            alert: dict[str, Any] = netlab.wait_until(active, timeout=WAIT_S,
                                                      what=f"{name} {'/'.join(states)}",
                                                      interval=0.25)
        except netlab.LabError as exc:
            pytest.fail(f"{exc}; alerts now: {self.api('alerts')['data']['alerts']}")
        return alert

    def wait_alert_inactive(self, name: str) -> None:
        """Poll until no alert ``name`` is pending or firing (an earlier disturbance ended)."""
        try:
            netlab.wait_until(lambda: not self.active_alerts(name), timeout=WAIT_S,
                              what=f"{name} inactive", interval=0.25)
        except netlab.LabError as exc:
            pytest.fail(f"{exc}: {self.active_alerts(name)}")


@dataclass(frozen=True)
class Sent:
    """What the traffic fixture really sent and what the clients saw."""

    download_bytes: int
    pings: int
    ping_replies: int
    dig_answer: str
    refused_exit_code: int
    spoofed: int
    spoofed_replies: int
    finished_unix: float


# --------------------------------------------------------------------------- fixtures


def required_binary(name: str) -> str:
    """Path of a Prometheus program; a loud skip, or a failure under SIXGATE_LAB_REQUIRED=1."""
    found = shutil.which(name)
    if found is None:
        reason = (f"PROMETHEUS LAB TESTS CANNOT RUN: {name} not on PATH "
                  "(Debian package prometheus)")
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def gateway_lab(served_files: netlab.ServedFiles) -> Iterator[PrometheusLab]:
    """The lab and its gateway (conftest ``served_files`` checks the lab's requirements)."""
    required_binary("promtool")
    with PrometheusLab("6to4", WORKERS, served_files) as lab:
        yield lab


@pytest.fixture(scope="module")
def prometheus(gateway_lab: PrometheusLab) -> Iterator[PrometheusServer]:
    """Prometheus scraping the gateway; stopped by PID at the end, also after a failure."""
    server = PrometheusServer(gateway_lab, required_binary("prometheus"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sent(gateway_lab: PrometheusLab, prometheus: PrometheusServer) -> Sent:
    """Known traffic, then a scrape that saw all of it.

    The download comes first: until the services' replies are counted, the few drops below
    would be a large share of the traffic and set off SixgateDropRatioHigh early.
    """
    lab = gateway_lab
    got = netlab.download(lab, netlab.http_url(lab, lab.files.mid.name), max_time_s=60)
    assert got.exit_code == 0 and got.sha256 == lab.files.mid.sha256, got.stderr
    done = lab.peer(["ping", "-6", "-n", "-c", str(PINGS), "-i", "0.05", "-W", "3",
                     lab.plan.gateway_address], timeout=30)
    dig = netlab.dig(lab, netlab.DNS_SMALL_NAME, "A", "+short")
    refused, _, _ = netlab.curl_exit(lab, netlab.http_url(
        lab, "/", port=netlab.UNFORWARDED_TCP_PORT))
    spoofed = send_spoofed(lab, SPOOFED)
    finished = time.time()
    prometheus.wait_scraped_after(finished)
    return Sent(download_bytes=got.size_bytes, pings=PINGS,
                ping_replies=netlab.ping_received(done.stdout), dig_answer=dig.stdout.strip(),
                refused_exit_code=refused, spoofed=int(spoofed["sent"]),
                spoofed_replies=int(spoofed["replies"]), finished_unix=finished)


def send_spoofed(lab: Lab, count: int) -> dict[str, Any]:
    """Echo requests from 198.51.100.1 claiming 2002:cb00:7101::1: each a spoofed_6to4 drop."""
    return lab.probe("send41", "--outer-src", netlab.PEER_IPV4, "--outer-dst",
                     netlab.GATEWAY_IPV4, "--inner-src", SPOOFED_6TO4_SOURCE, "--inner-dst",
                     lab.plan.gateway_address, "--count", str(count), "--listen-s", "0.5")


# --------------------------------------------------------------------------- helpers


def selector(extra: str = "") -> str:
    """Label matchers of this gateway's series, plus ``extra``."""
    matchers = f'job="sixgate",instance="{METRICS_LISTEN}"'
    return "{" + matchers + (f",{extra}" if extra else "") + "}"


def worker_pid(lab: Lab, index: int) -> int:
    """PID of worker ``index`` from the run directory, checked to be our gateway's child."""
    pid = int((lab.tmp / "run" / f"worker-{index}.pid").read_text().strip())
    state = netlab.process_state(pid)
    assert state is not None, f"worker-{index} pid {pid} does not exist"
    assert state[1] == lab.processes["sixgate"].pid, f"pid {pid} is not our gateway's child"
    assert "sixgate.workers.main" in netlab.process_cmdline(pid), netlab.process_cmdline(pid)
    return pid


def eventually(prometheus: PrometheusServer, expr: str, check: Callable[[float], bool],
               what: str) -> float:
    """Poll the single value of ``expr`` until ``check`` accepts it; that value."""
    seen: list[float] = []

    def accepted() -> bool:
        result = prometheus.query(expr)
        seen.append(float(result[0]["value"][1]) if len(result) == 1 else math.nan)
        return check(seen[-1])

    try:
        netlab.wait_until(accepted, timeout=WAIT_S, what=what, interval=0.25)
    except netlab.LabError as exc:
        pytest.fail(f"{exc}: {expr} was {seen[-1:]}")
    return seen[-1]


# --------------------------------------------------------------------------- the exposition


def test_promtool_check_metrics_accepts_the_real_metrics(gateway_lab: PrometheusLab,
                                                          sent: Sent) -> None:
    """The /metrics body of a gateway that carried traffic passes ``promtool check metrics``
    (text format parses, naming conventions: counters end in _total, base units, ...)."""
    lab = gateway_lab
    body = lab.gw(["curl", "-sS", "--fail", "--max-time", "10",
                   f"http://{METRICS_LISTEN}/metrics"])
    assert body.returncode == 0, body.stderr
    assert "sixgate_echo_replies_total" in body.stdout
    checked = netlab.run([required_binary("promtool"), "check", "metrics"], input=body.stdout,
                         check=False)
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"
    for path, answer in (("healthz", "ok"), ("readyz", "ready")):
        done = lab.gw(["curl", "-sS", "--fail", "--max-time", "10",
                       f"http://{METRICS_LISTEN}/{path}"])
        assert (done.returncode, done.stdout.strip()) == (0, answer), done.stderr


def test_counters_match_the_traffic_really_sent(prometheus: PrometheusServer,
                                                sent: Sent) -> None:
    """Asked through PromQL after a scrape that followed the traffic: N pings answered are N
    echo replies, K spoofed packets are exactly K spoofed_6to4 drops, the download's bytes
    went from the services and out of the tunnel, the refused SYN drew a RST, dig made a UDP
    binding, and no packet hit an internal error."""
    assert sent.ping_replies == sent.pings
    assert sent.dig_answer == netlab.DNS_SMALL_A
    assert sent.refused_exit_code == 7  # connection refused: the gateway's RST
    assert (sent.spoofed, sent.spoofed_replies) == (SPOOFED, 0)

    def total(metric: str, extra: str = "") -> float:
        return prometheus.value(f"sum({metric}{selector(extra)})")

    echo_request_bytes = 20 + 40 + 8 + 56  # outer IPv4, IPv6, ICMPv6 header, ping's payload
    checks = [
        ("echo replies", total("sixgate_echo_replies_total"), "==", sent.pings),
        ("inbound icmp packets", total("sixgate_packets_total",
                                       'direction="inbound",protocol="icmp"'), ">=", sent.pings),
        ("outbound icmp packets", total("sixgate_packets_total",
                                        'direction="outbound",protocol="icmp"'), ">=",
         sent.pings),
        ("tunnel packets received", total("sixgate_tunnel_received_packets_total"), ">=",
         sent.pings + sent.spoofed + total("sixgate_packets_total", 'direction="inbound"')
         - sent.pings),
        ("tunnel bytes received", total("sixgate_tunnel_received_bytes_total"), ">=",
         sent.pings * echo_request_bytes),
        ("spoofed_6to4 drops", total("sixgate_drops_total", 'reason="spoofed_6to4"'), "==",
         sent.spoofed),
        ("no_rule drops", total("sixgate_drops_total", 'reason="no_rule"'), ">=", 1),
        ("tcp resets sent", total("sixgate_tcp_resets_sent_total"), ">=", 1),
        ("from_services tcp bytes", total("sixgate_bytes_total",
                                          'direction="from_services",protocol="tcp"'), ">=",
         sent.download_bytes),
        ("outbound tcp bytes", total("sixgate_bytes_total",
                                     'direction="outbound",protocol="tcp"'), ">=",
         sent.download_bytes),
        ("to_services tcp bytes", total("sixgate_bytes_total",
                                        'direction="to_services",protocol="tcp"'), ">=",
         len("GET /mid.bin HTTP/1.1\r\n\r\n")),
        ("to_services udp packets", total("sixgate_packets_total",
                                          'direction="to_services",protocol="udp"'), ">=", 1),
        ("from_services udp packets", total("sixgate_packets_total",
                                            'direction="from_services",protocol="udp"'), ">=",
         1),
        ("tcp flows created", total("sixgate_flows_created_total", 'protocol="tcp"'), "==", 1),
        ("udp flows created", total("sixgate_flows_created_total", 'protocol="udp"'), ">=", 1),
        ("internal_error drops", total("sixgate_drops_total", 'reason="internal_error"'), "==",
         0),
        ("ready", total("sixgate_ready"), "==", 1),
        ("workers up", total("sixgate_worker_up"), "==", WORKERS),
        ("flow limit, both workers", total("sixgate_flow_limit"), "==", MAX_FLOWS),
        # The compiled fast path runs (CI builds it; a silent fallback to Python fails here).
        ("userspace/tun/6to4 backend, compiled fast path",
         total("sixgate_backend_info", 'backend="userspace",delivery="tun",'
               'tunnel_mode="6to4",fast_path="compiled"'), "==", 1),
    ]
    wrong = [f"{what}: {got:g}, expected {op} {want:g}" for what, got, op, want in checks
             if not (got == want if op == "==" else got >= want)]
    print("\n".join(f"{what}: {got:g}" for what, got, _, _ in checks))
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- the dashboard


def test_every_dashboard_query_is_valid_and_returns_data(prometheus: PrometheusServer,
                                                         sent: Sent) -> None:
    """Each panel expr, expanded as Grafana sends it for this instance, is accepted by
    Prometheus and returns at least one series with a finite value (NAT64 panels: accepted)."""
    queries = promql.panel_queries(DASHBOARD)
    assert queries, f"no panel queries in {DASHBOARD}"
    problems = []
    for title, expr in queries:
        expanded = promql.expand(expr, METRICS_LISTEN, RATE_INTERVAL)
        answer = prometheus.api("query", query=expanded)
        if answer.get("status") != "success":
            problems.append(f"{title!r}: {expanded}\n  -> {answer.get('error')}")
            continue
        values = [float(s["value"][1]) for s in answer["data"]["result"]]
        if promql.metric_names(expr) <= EMPTY_ON_6TO4:
            continue
        if not any(math.isfinite(v) for v in values):
            problems.append(f"{title!r}: {expanded}\n  -> no finite value: {values}")
    assert not problems, "\n".join(problems)


def test_dashboard_instance_variable_lists_the_gateway(prometheus: PrometheusServer) -> None:
    """Grafana's ``label_values(selector, label)`` variables find this target."""
    variables = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                 if v["type"] == "query"]
    assert variables
    for variable in variables:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        answer = prometheus.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})
        assert answer["status"] == "success", answer
        assert METRICS_LISTEN in answer["data"], (variable["name"], answer)


# --------------------------------------------------------------------------- the alerts


def test_every_alert_rule_is_loaded_valid_and_evaluated(prometheus: PrometheusServer) -> None:
    """Prometheus loaded every alert of dashboards/alerts.rules.yml, evaluates them
    without error, and each expr alone is a valid query."""
    rules = promql.alert_rules(RULES)
    assert sorted(r["alert"] for r in rules) == sorted(ALERTS)
    for rule in rules:
        prometheus.query(rule["expr"])

    def evaluated() -> dict[str, dict[str, Any]] | None:
        loaded = {r["name"]: r for g in prometheus.api("rules")["data"]["groups"]
                  for r in g["rules"] if r["type"] == "alerting"}
        return loaded if all(loaded.get(a, {}).get("health") == "ok" for a in ALERTS) else None

    try:
        netlab.wait_until(evaluated, timeout=WAIT_S, what="every rule health ok")
    except netlab.LabError as exc:
        pytest.fail(f"{exc}: {prometheus.api('rules')['data']}")


def test_alert_flow_table_nearly_full_when_a_worker_holds_its_limit(
        gateway_lab: PrometheusLab, prometheus: PrometheusServer, sent: Sent) -> None:
    """Connections from one /64 all land on one worker: opening more than its 10 bindings
    fills its table, each extra SYN is one flow_limit drop answered with ICMPv6 destination
    unreachable (so the client gives up at once), and SixgateFlowTableNearlyFull goes pending
    for exactly that worker."""
    lab = gateway_lab
    assert not prometheus.active_alerts("SixgateFlowTableNearlyFull")
    before = prometheus.values_by("process", f"sum by (process) "
                                  f"(sixgate_flows_active{selector()})")
    limit_drops_expr = "sum(sixgate_drops_total" + selector('reason="flow_limit"') + ")"
    limit_drops = prometheus.value(limit_drops_expr)
    unreachable_expr = ("sum(sixgate_icmp_errors_sent_total"
                        + selector('type="destination_unreachable"') + ")")
    unreachable = prometheus.value(unreachable_expr)
    attempts = FLOW_LIMIT + 2
    holder = subprocess.Popen(
        netlab.in_ns(lab.peer_ns, [sys.executable, str(netlab.PROGRAMS / "hold_connections.py"),
                                   lab.plan.gateway_address, "80", str(attempts),
                                   str(HOLD_CONNECT_TIMEOUT_S)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line, "the connection holder printed nothing"
        connected = int(json.loads(line)["connected"])
        held_since = time.time()
        prometheus.wait_scraped_after(held_since)
        active = prometheus.values_by("process", f"sum by (process) "
                                      f"(sixgate_flows_active{selector()})")
        full = [p for p, v in active.items() if v == FLOW_LIMIT]
        assert len(full) == 1, f"flows before {before}, now {active}"
        owner = full[0]
        assert connected == FLOW_LIMIT - before.get(owner, 0), (connected, before, active)
        alert = prometheus.wait_alert("SixgateFlowTableNearlyFull")
        assert alert["labels"]["process"] == owner, alert
        assert float(alert["value"]) == 1.0, alert
        dropped = prometheus.value(limit_drops_expr) - limit_drops
        assert dropped == attempts - connected, (dropped, connected)
        unreachable_sent = prometheus.value(unreachable_expr) - unreachable
        assert unreachable_sent == dropped, (unreachable_sent, dropped)
        print(f"{owner}: {connected} connections held, {FLOW_LIMIT}/{FLOW_LIMIT} flows, "
              f"{dropped:g} SYNs dropped as flow_limit; alert {alert['state']}")
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        netlab.stop_process(holder, 5)


def test_alert_drop_ratio_high_after_a_burst_of_spoofed_packets(
        gateway_lab: PrometheusLab, prometheus: PrometheusServer, sent: Sent) -> None:
    """2000 spoofed 6to4 packets against ~9k packets of real traffic: every one counted as
    spoofed_6to4, and SixgateDropRatioHigh goes pending."""
    assert not prometheus.active_alerts("SixgateDropRatioHigh")
    spoofed = "sum(sixgate_drops_total" + selector('reason="spoofed_6to4"') + ")"
    before = prometheus.value(spoofed)
    result = send_spoofed(gateway_lab, SPOOF_BURST)
    assert (result["sent"], result["replies"]) == (SPOOF_BURST, 0), result
    eventually(prometheus, spoofed, lambda v: v == before + SPOOF_BURST,
               f"spoofed_6to4 drops to reach {before + SPOOF_BURST:g}")
    alert = prometheus.wait_alert("SixgateDropRatioHigh")
    assert float(alert["value"]) > 0.05, alert
    print(f"drop ratio {float(alert['value']):.3f}; alert {alert['state']}")


def test_alert_worker_restarting_fires_when_a_worker_is_killed(
        gateway_lab: PrometheusLab, prometheus: PrometheusServer, sent: Sent) -> None:
    """SIGKILL worker-1: the coordinator restarts it, sixgate_worker_restarts_total becomes 1
    and SixgateWorkerRestarting (no ``for``) fires for that worker; the gateway is ready
    again afterwards."""
    lab = gateway_lab
    process = f"worker-{RESTARTED_WORKER}"
    assert not prometheus.active_alerts("SixgateWorkerRestarting")
    victim = worker_pid(lab, RESTARTED_WORKER)
    os.kill(victim, signal.SIGKILL)
    restarts = "sum(sixgate_worker_restarts_total" + selector(f'process="{process}"') + ")"
    eventually(prometheus, restarts, lambda v: v == 1, f"{process} restarts to be 1")
    alert = prometheus.wait_alert("SixgateWorkerRestarting", ("firing",))
    assert alert["labels"]["process"] == process, alert
    assert worker_pid(lab, RESTARTED_WORKER) != victim
    eventually(prometheus, f"sum(sixgate_ready{selector()})", lambda v: v == 1,
               "sixgate_ready 1 after the restart")


def test_alert_not_ready_while_a_worker_is_stopped(
        gateway_lab: PrometheusLab, prometheus: PrometheusServer, sent: Sent) -> None:
    """SIGSTOP worker-0: it stops answering, the scrape still succeeds but reports
    sixgate_ready 0 and sixgate_worker_up 0 for it, /readyz says 503 and names it, and
    SixgateNotReady goes pending. SIGCONT makes the gateway ready again."""
    lab = gateway_lab
    process = f"worker-{STOPPED_WORKER}"
    prometheus.wait_alert_inactive("SixgateNotReady")
    pid = worker_pid(lab, STOPPED_WORKER)
    os.kill(pid, signal.SIGSTOP)
    try:
        alert = prometheus.wait_alert("SixgateNotReady")
        assert alert["labels"]["instance"] == METRICS_LISTEN, alert
        worker_up = "sum(sixgate_worker_up" + selector(f'process="{process}"') + ")"
        eventually(prometheus, worker_up, lambda v: v == 0, f"sixgate_worker_up 0 for {process}")
        assert prometheus.target_up(), "the scrape itself must still succeed"
        readyz = lab.gw(["curl", "-sS", "--max-time", "10", "-w", " %{http_code}",
                         f"http://{METRICS_LISTEN}/readyz"])
        assert readyz.stdout.endswith(" 503"), readyz.stdout
        assert f"worker(s) {STOPPED_WORKER} not answering" in readyz.stdout, readyz.stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    eventually(prometheus, f"sum(sixgate_ready{selector()})", lambda v: v == 1,
               "sixgate_ready 1 after SIGCONT")


def test_alert_down_when_the_gateway_is_stopped(gateway_lab: PrometheusLab,
                                                prometheus: PrometheusServer,
                                                sent: Sent) -> None:
    """Last: SIGTERM the gateway (it exits 0 with no internal error over the whole module),
    the scrapes fail, up becomes 0 and SixgateDown goes pending."""
    lab = gateway_lab
    assert not prometheus.active_alerts("SixgateDown")
    assert netlab.drops(lab).get("internal_error") == 0
    assert lab.stop_gateway(timeout=10) == 0, lab.gateway_stderr()
    eventually(prometheus, f"sum(up{selector()})", lambda v: v == 0, "up 0")
    alert = prometheus.wait_alert("SixgateDown")
    assert alert["labels"]["instance"] == METRICS_LISTEN, alert
