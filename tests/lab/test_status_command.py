"""``sixgate status`` against a real gateway: real ``ping -6``, refused TCP and a held TCP
connection from the peer while ``sixgate status --once`` reads /metrics in the gateway
namespace; and the one-line error when nothing listens."""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Iterator

import netlab
import pytest
from netlab import Lab

pytestmark = pytest.mark.lab

WORKERS = 2
INTERVAL_S = 2
REFUSED_BEFORE = 5  # SYNs to an unforwarded port before the first scrape: no_rule total
# Traffic must cover the whole window: command start-up, the first scrape, INTERVAL_S, the
# second scrape. ping -i 0.2 for 30 echoes lasts 6 s, far longer.
PINGS = 30
METRICS_READY_URL = "http://127.0.0.1:9641/readyz"  # [metrics] listen default


@pytest.fixture(scope="module")
def lab(served_files: netlab.ServedFiles) -> Iterator[Lab]:
    with netlab.Lab("6to4", WORKERS, served_files) as the_lab:
        netlab.wait_until(lambda: the_lab.gw(["curl", "-sf", METRICS_READY_URL]).returncode == 0,
                          timeout=15, what=f"{METRICS_READY_URL} to answer 200")
        yield the_lab


def refused_tcp(lab: Lab) -> None:
    """One SYN to a port with no forward rule: the gateway answers RST (no_rule)."""
    url = netlab.http_url(lab, "/", port=netlab.UNFORWARDED_TCP_PORT)
    exit_code, _, stderr = netlab.curl_exit(lab, url, max_time_s=5)
    assert exit_code == 7, stderr


def test_status_once_shows_rates_drops_and_workers_against_limits(lab: Lab) -> None:
    for _ in range(REFUSED_BEFORE):
        refused_tcp(lab)
    limits = re.search(r"limits +(\d+) flows", lab.sixgate("check").stdout)
    assert limits, "sixgate check printed no limits line"
    flow_limit = math.ceil(int(limits.group(1)) / WORKERS)  # each worker's share

    with netlab.open_tcp_connection(lab):
        status = subprocess.Popen(
            netlab.in_ns(lab.gw_ns, [*netlab.sixgate_command(), "status", "--once",
                                     "--interval", str(INTERVAL_S), "--config",
                                     str(lab.config_path)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pinging = subprocess.Popen(
                netlab.in_ns(lab.peer_ns, ["ping", "-6", "-n", "-c", str(PINGS), "-i", "0.2",
                                           "-W", "3", lab.plan.gateway_address]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while status.poll() is None:  # refused TCP all through the window, too
                refused_tcp(lab)
                time.sleep(0.2)
            out, err = status.communicate(timeout=10)
            ping_out, _ = pinging.communicate(timeout=30)
        finally:
            netlab.stop_process(status, 2)
    print(out)
    assert status.returncode == 0, err
    assert netlab.ping_received(ping_out) == PINGS, ping_out
    assert "READY" in out and "NOT READY" not in out, out
    assert "6to4" in out and "backend userspace/tun" in out, out
    inbound = re.search(r"\binbound +(\S+)", out)
    assert inbound and inbound.group(1) != "0", out  # pings and SYNs arrived in the window
    tunnel = re.search(r"\btunnel received +(\S+)", out)
    assert tunnel and tunnel.group(1) != "0", out
    no_rule = re.search(r"\bno_rule +(\S+) +(\d+)\b", out)
    assert no_rule and int(no_rule.group(2)) >= REFUSED_BEFORE, out
    assert no_rule.group(1) != "0", out  # refused while the status ran
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(
        rf"\b(worker-\d+) +yes +(\d+)/{flow_limit}\b", out)}
    assert sorted(rows) == [f"worker-{i}" for i in range(WORKERS)], out
    assert sum(rows.values()) >= 1, out  # the held TCP connection's binding


def test_status_unreachable_endpoint_exit_1_names_url_and_what_to_check(lab: Lab) -> None:
    url = "http://127.0.0.1:1/metrics"
    done = lab.sixgate("status", "--once", "--url", url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no traceback
    assert url in lines[0] and "sixgate run" in lines[0] and "[metrics] listen" in lines[0]
