"""``sixgate status``'s pure part: exposition text -> Sample -> View (rates like PromQL's
``increase()`` and ``histogram_quantile()``) -> rich tables. The scrapes are hand-made numbers
encoded by prometheus_client itself; the lab test reads a real gateway."""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from rich.console import Console

from sixgate.coordinator import status
from sixgate.coordinator.cli import main
from sixgate.coordinator.status import (
    Sample,
    View,
    histogram_quantile,
    metrics_url,
    parse_sample,
    rates,
    render,
)
from sixgate.workers.engine.counters import DIRECTIONS, PROCESSING_SECONDS_BOUNDS, PROTOCOLS
from sixgate.workers.engine.drops import DropReason

Key = tuple[str, tuple[tuple[str, str], ...]]
HISTOGRAMS = ("sixgate_packet_processing_seconds",)
START_UNIX = 1_700_000_000.0
INTERVAL_S = 2.0


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def idle_gateway(workers: int = 2) -> dict[Key, float]:
    """Every series of a gateway with ``workers`` workers, all counters at 0."""
    series = {key("sixgate_build_info", version="0.1.0"): 1.0,
              key("sixgate_backend_info", backend="userspace", delivery="tun",
                  tunnel_mode="6to4", fast_path="compiled"): 1.0,
              key("sixgate_ready"): 1.0,
              key("sixgate_start_time_seconds"): START_UNIX,
              key("sixgate_tunnel_received_packets_total"): 0.0}
    processes = ["coordinator"] + [f"worker-{i}" for i in range(workers)]
    for process in processes:
        for reason in DropReason:
            series[key("sixgate_drops_total", process=process, reason=reason.value)] = 0.0
        for mode in ("user", "system"):
            series[key("sixgate_cpu_seconds_total", process=process, mode=mode)] = 0.0
    for process in processes[1:]:
        for direction in DIRECTIONS:
            for protocol in PROTOCOLS:
                for name in ("sixgate_packets_total", "sixgate_bytes_total"):
                    series[key(name, process=process, direction=direction,
                               protocol=protocol)] = 0.0
        for protocol in ("tcp", "udp"):
            series[key("sixgate_flows_active", process=process, protocol=protocol)] = 0.0
        for name, value in (("sixgate_flow_limit", 100.0), ("sixgate_pool_addresses", 32.0),
                            ("sixgate_pool_addresses_in_use", 0.0),
                            ("sixgate_queue_drops_total", 0.0), ("sixgate_worker_up", 1.0),
                            ("sixgate_worker_restarts_total", 0.0),
                            ("sixgate_tcp_resets_sent_total", 0.0),
                            ("sixgate_icmp_errors_suppressed_total", 0.0),
                            ("sixgate_resident_memory_bytes", 30e6)):
            series[key(name, process=process)] = value
        series[key("sixgate_icmp_errors_sent_total", process=process,
                   type="destination_unreachable")] = 0.0
        for direction in ("inbound", "from_services"):
            for bound in [*PROCESSING_SECONDS_BOUNDS, math.inf]:
                le = "+Inf" if bound == math.inf else repr(bound)
                series[key("sixgate_packet_processing_seconds_bucket", process=process,
                           direction=direction, le=le)] = 0.0
            for suffix in ("_count", "_sum"):
                series[key("sixgate_packet_processing_seconds" + suffix, process=process,
                           direction=direction)] = 0.0
    return series


def expose(series: dict[Key, float]) -> str:
    """The series as /metrics text, written by prometheus_client's own encoder."""
    families: dict[str, Metric] = {}
    for (name, labels), value in series.items():
        base = name.rsplit("_", 1)[0]
        if base in HISTOGRAMS:
            family_name, kind = base, "histogram"
        elif name.endswith("_total"):
            family_name, kind = name.removesuffix("_total"), "counter"
        else:
            family_name, kind = name, "gauge"
        family = families.setdefault(family_name, Metric(family_name, "doc", kind))
        family.add_sample(name, dict(labels), value)

    class Fixed:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def scrape(series: dict[Key, float], now: float) -> Sample:
    return parse_sample(expose(series), now, START_UNIX + 3725 + now)


def bump(series: dict[Key, float], by: float, name: str, **labels: str) -> None:
    series[key(name, **labels)] += by


def add_traffic(series: dict[Key, float], process: str, direction: str, protocol: str,
                packets: float, octets: float = 0) -> None:
    bump(series, packets, "sixgate_packets_total", process=process, direction=direction,
         protocol=protocol)
    bump(series, octets, "sixgate_bytes_total", process=process, direction=direction,
         protocol=protocol)


def view_of(before: dict[Key, float], after: dict[Key, float]) -> View:
    return rates(scrape(before, 10.0), scrape(after, 10.0 + INTERVAL_S))


def traffic(view: View) -> dict[str, tuple[float, float]]:
    return {row.direction: (row.packets_per_s, row.bits_per_s) for row in view.traffic}


def frame_text(view: View) -> str:
    out = io.StringIO()
    Console(file=out, color_system=None, width=120).print(render(view))
    return out.getvalue()


# --------------------------------------------------------------------------- parsing


def test_parse_sample_keys_by_sample_name_and_sorted_labels() -> None:
    sample = scrape(idle_gateway(), 5.0)
    assert sample.now == 5.0
    assert sample.values[key("sixgate_flow_limit", process="worker-1")] == 100.0
    assert sample.values[key("sixgate_packet_processing_seconds_bucket", process="worker-0",
                             direction="inbound", le="+Inf")] == 0.0


@pytest.mark.parametrize("text", ["", "<html>not metrics</html>\n"])
def test_parse_sample_refuses_what_is_not_prometheus_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sample(text, 0.0, 0.0)


# --------------------------------------------------------------------------- rates


def test_packets_and_bits_per_direction_summed_over_workers_and_protocols() -> None:
    before = idle_gateway()
    after = dict(before)
    add_traffic(after, "worker-0", "inbound", "icmp", 200, 30_000)
    add_traffic(after, "worker-1", "inbound", "tcp", 100)
    add_traffic(after, "worker-1", "outbound", "udp", 20)
    bump(after, 50, "sixgate_tunnel_received_packets_total")
    view = view_of(before, after)
    assert traffic(view)["inbound"] == (150.0, 8 * 15_000.0)
    assert traffic(view)["outbound"] == (10.0, 0.0)
    assert traffic(view)["to_services"] == (0.0, 0.0)
    assert view.tunnel_received_per_s == 25.0
    assert view.interval_s == INTERVAL_S


def test_counter_reset_counts_the_new_value_not_a_negative_rate() -> None:
    """A restarted worker counts from 0 again: 1000 -> 60 means 60 packets, not -940."""
    before = idle_gateway()
    before[key("sixgate_packets_total", process="worker-0", direction="inbound",
               protocol="tcp")] = 1000
    before[key("sixgate_drops_total", process="worker-0", reason="no_rule")] = 500
    after = dict(before)
    after[key("sixgate_packets_total", process="worker-0", direction="inbound",
              protocol="tcp")] = 60
    after[key("sixgate_drops_total", process="worker-0", reason="no_rule")] = 4
    add_traffic(after, "worker-1", "inbound", "tcp", 40)
    view = view_of(before, after)
    assert traffic(view)["inbound"][0] == (60 + 40) / INTERVAL_S
    no_rule = [d for d in view.drops if d.reason == "no_rule"]
    assert no_rule[0].per_s == 2.0 and no_rule[0].total == 4


def test_series_new_since_the_first_scrape_has_no_rate_yet() -> None:
    """A worker absent from the first scrape (it did not answer) shows no spike of its total."""
    before = idle_gateway()
    gone = key("sixgate_packets_total", process="worker-1", direction="inbound", protocol="udp")
    del before[gone]
    after = idle_gateway()
    after[gone] = 1_000_000
    assert traffic(view_of(before, after))["inbound"][0] == 0.0


def test_drops_only_nonzero_reasons_fastest_first_summed_over_processes() -> None:
    before = idle_gateway()
    before[key("sixgate_drops_total", process="coordinator", reason="spoofed_6to4")] = 7
    after = dict(before)
    bump(after, 6, "sixgate_drops_total", process="worker-0", reason="no_rule")
    bump(after, 4, "sixgate_drops_total", process="worker-1", reason="no_rule")
    bump(after, 2, "sixgate_drops_total", process="coordinator", reason="truncated")
    view = view_of(before, after)
    assert [(d.reason, d.per_s, d.total) for d in view.drops] == [
        ("no_rule", 5.0, 10.0), ("truncated", 1.0, 2.0), ("spoofed_6to4", 0.0, 7.0)]


def test_workers_flows_against_limit_pool_cpu_and_queue_drops() -> None:
    before = idle_gateway()
    after = dict(before)
    after[key("sixgate_flows_active", process="worker-1", protocol="tcp")] = 30
    after[key("sixgate_flows_active", process="worker-1", protocol="udp")] = 15
    after[key("sixgate_pool_addresses_in_use", process="worker-1")] = 3
    after[key("sixgate_worker_restarts_total", process="worker-1")] = 2
    bump(after, 0.5, "sixgate_cpu_seconds_total", process="worker-1", mode="user")
    bump(after, 0.3, "sixgate_cpu_seconds_total", process="worker-1", mode="system")
    bump(after, 8, "sixgate_queue_drops_total", process="worker-1")
    workers = view_of(before, after).workers
    assert [w.process for w in workers] == ["worker-0", "worker-1"]
    w1 = workers[1]
    assert (w1.up, w1.flows_active, w1.flow_limit, w1.flow_percent) == (True, 45, 100, 45.0)
    assert (w1.pool_in_use, w1.pool_size, w1.restarts) == (3, 32, 2)
    assert w1.cpu_percent == pytest.approx(40.0)
    assert w1.queue_drops_per_s == 4.0
    assert workers[0].flows_active == 0 and workers[0].cpu_percent == 0


def test_worker_that_did_not_answer_is_down_with_unknown_flows() -> None:
    """metrics.py keeps only up, limit, restarts and queue drops of a silent worker."""
    before = idle_gateway()
    after = {k: v for k, v in before.items()
             if dict(k[1]).get("process") != "worker-1" or k[0] in (
                 "sixgate_worker_up", "sixgate_flow_limit", "sixgate_worker_restarts_total",
                 "sixgate_queue_drops_total")}
    after[key("sixgate_worker_up", process="worker-1")] = 0
    after[key("sixgate_ready")] = 0
    view = view_of(before, after)
    down = view.workers[1]
    assert not down.up and down.flows_active is None and down.cpu_percent is None
    assert down.flow_percent is None and down.flow_limit == 100
    assert view.header.ready is False
    text = frame_text(view)
    assert "NOT READY" in text and "NO" in text and "-/100" in text


def test_icmp_errors_resets_and_suppressed_rates() -> None:
    before = idle_gateway()
    after = dict(before)
    bump(after, 4, "sixgate_icmp_errors_sent_total", process="worker-0",
         type="destination_unreachable")
    bump(after, 6, "sixgate_tcp_resets_sent_total", process="worker-1")
    bump(after, 1, "sixgate_icmp_errors_suppressed_total", process="worker-1")
    view = view_of(before, after)
    assert (view.icmp_errors_sent_per_s, view.tcp_resets_sent_per_s,
            view.icmp_errors_suppressed_per_s) == (2.0, 3.0, 0.5)


def test_header_version_backend_mode_ready_uptime() -> None:
    view = view_of(idle_gateway(), idle_gateway())
    header = view.header
    assert (header.version, header.backend, header.delivery, header.mode) == (
        "0.1.0", "userspace", "tun", "6to4")
    assert header.ready is True
    assert header.uptime_s == 3725 + 10 + INTERVAL_S


def test_samples_out_of_order_refused() -> None:
    sample = scrape(idle_gateway(), 1.0)
    with pytest.raises(ValueError):
        rates(sample, sample)


# --------------------------------------------------------------------------- quantiles


INF = math.inf


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    # 100 observations: 50 up to 1, 40 in (1, 2], 10 in (2, 4]; rank 50 ends bucket 1.
    (0.5, [(1.0, 50), (2.0, 90), (4.0, 100), (INF, 100)], 1.0),
    # rank 70: 20 of the 40 in (1, 2] -> 1.5.
    (0.7, [(1.0, 50), (2.0, 90), (4.0, 100), (INF, 100)], 1.5),
    # rank 99: 9 of the 10 in (2, 4] -> 3.8.
    (0.99, [(1.0, 50), (2.0, 90), (4.0, 100), (INF, 100)], 3.8),
    # the first bucket's lower edge is 0: rank 5 of 10 in (0, 1] -> 0.5.
    (0.5, [(1.0, 10), (INF, 10)], 0.5),
    # the rank in +Inf: the highest finite bound, as Prometheus answers.
    (0.99, [(1.0, 10), (2.0, 10), (INF, 20)], 2.0),
    # counts that dip (series reset apart) are evened out to 12, 12, 16: rank 14.4 lies
    # 2.4 of 4 into (2, 4] -> 3.2 (not 6.4 of 8 from the dip -> 3.6).
    (0.9, [(1.0, 12), (2.0, 8), (4.0, 16), (INF, 16)], 3.2),
])
def test_histogram_quantile_interpolates_like_prometheus(
        q: float, buckets: list[tuple[float, float]], expected: float) -> None:
    assert histogram_quantile(q, buckets) == pytest.approx(expected)


@pytest.mark.parametrize("buckets", [[], [(1.0, 0), (INF, 0)], [(1.0, 3), (2.0, 4)]],
                         ids=["no_buckets", "no_observations", "no_inf_bucket"])
def test_histogram_quantile_unknown(buckets: list[tuple[float, float]]) -> None:
    assert histogram_quantile(0.5, buckets) is None


def test_latency_from_bucket_increases_over_the_interval_summed_over_workers() -> None:
    """Old observations (before the first scrape) do not count: only the interval's."""
    before = idle_gateway()
    for bound in ("1e-05", "2e-05", "5e-05", "0.0001", "0.0002", "0.0005", "0.001", "0.005",
                  "0.05", "+Inf"):
        # 1000 old slow observations in (2e-05, 5e-05] and above on worker-0 ...
        before[key("sixgate_packet_processing_seconds_bucket", process="worker-0",
                   direction="inbound", le=bound)] = 0 if bound in ("1e-05", "2e-05") else 1000
    after = dict(before)
    # ... then 60 new ones in (5e-06, 1e-05] on worker-0 and 40 on worker-1.
    for process, n in (("worker-0", 60), ("worker-1", 40)):
        for bound in ("1e-05", "2e-05", "5e-05", "0.0001", "0.0002", "0.0005", "0.001",
                      "0.005", "0.05", "+Inf"):
            bump(after, n, "sixgate_packet_processing_seconds_bucket", process=process,
                 direction="inbound", le=bound)
    latency = {row.direction: row for row in view_of(before, after).latency}
    # rank 50 of 100, all in (5e-06, 1e-05]: 5e-06 + 5e-06 * 50/100.
    assert latency["inbound"].p50_s == pytest.approx(7.5e-6)
    assert latency["inbound"].p99_s == pytest.approx(5e-6 + 5e-6 * 99 / 100)
    assert latency["from_services"].p50_s is None


# --------------------------------------------------------------------------- render


def test_render_shows_header_traffic_drops_workers_and_latency() -> None:
    before = idle_gateway()
    after = dict(before)
    add_traffic(after, "worker-0", "inbound", "icmp", 6, 2_500_000)
    bump(after, 8, "sixgate_drops_total", process="worker-1", reason="no_rule")
    after[key("sixgate_flows_active", process="worker-0", protocol="tcp")] = 95
    text = frame_text(view_of(before, after))
    assert "sixgate 0.1.0" in text and "READY" in text and "NOT READY" not in text
    assert "6to4" in text and "userspace/tun" in text and "up 01:02:17" in text
    # Tables stand side by side: look for each row as a run of cells.
    assert re.search(r"\binbound +3 +10M\b", text), text  # 6 packets, 20 Mbit in 2 s
    assert re.search(r"\bno_rule +4 +8\b", text), text
    assert re.search(r"\bworker-0 +yes +95/100 +95% +0/32\b", text), text
    assert re.search(r"\bworker-1 +yes +0/100 +0% +0/32\b", text), text
    assert "truncated" not in text  # zero reasons are left out
    assert "processing time" in text
    assert all(len(line) <= 120 for line in text.splitlines())


def test_render_without_drops_says_none() -> None:
    assert "(none)" in frame_text(view_of(idle_gateway(), idle_gateway()))


# --------------------------------------------------------------------------- the URL


@pytest.mark.parametrize(("listen", "url"), [
    ("127.0.0.1:9641", "http://127.0.0.1:9641/metrics"),
    ("[::1]:9641", "http://[::1]:9641/metrics"),
    ("[2001:db8::5]:80", "http://[2001:db8::5]:80/metrics"),
    ("0.0.0.0:9641", "http://127.0.0.1:9641/metrics"),  # unspecified: reach it on loopback
    ("[::]:9641", "http://[::1]:9641/metrics"),
])
def test_metrics_url_from_listen(listen: str, url: str) -> None:
    assert metrics_url(listen) == url


# --------------------------------------------------------------------------- the shell

METRICS_OFF_CONFIG = """\
[tunnel]
mode = "6to4"
local_ipv4 = "192.0.2.10"
relay_ipv4 = "192.88.99.1"

[metrics]
listen = ""
"""


class _Scrapes:
    """A /metrics endpoint on loopback whose inbound counter grows by 10 per scrape."""

    def __init__(self) -> None:
        self.series = idle_gateway()
        scrapes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                add_traffic(scrapes.series, "worker-0", "inbound", "icmp", 10)
                body = expose(scrapes.series).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoint() -> Iterator[_Scrapes]:
    scrapes = _Scrapes()
    yield scrapes
    scrapes.close()


def test_cli_status_once_prints_one_plain_frame(endpoint: _Scrapes,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--once", "--interval", "0.1", "--url", endpoint.url]) == 0
    out = capsys.readouterr().out
    assert "READY" in out and "worker-1" in out and "\x1b[" not in out
    assert re.search(r"\binbound +[1-9]", out), out  # 10 packets between the scrapes


def test_cli_status_wrong_path_exit_1(endpoint: _Scrapes,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    url = endpoint.url.replace("/metrics", "/nothing")
    assert main(["status", "--once", "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"sixgate status: {url} answered HTTP 404" in err and len(err.splitlines()) == 1


def test_cli_status_metrics_off_in_config_exit_2(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(METRICS_OFF_CONFIG)
    assert main(["status", "--once", "--config", str(config)]) == 2
    assert "give --url" in capsys.readouterr().err


def test_live_view_refreshes_until_ctrl_c(endpoint: _Scrapes,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (here: during the third wait) ends the live view normally, frames shown."""
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status.time, "sleep", sleep)
    out = io.StringIO()
    status.watch(endpoint.url, 0.5, once=False,
                 console=Console(file=out, color_system=None, width=120))
    assert len(waits) == 3
    assert "worker-0" in out.getvalue()
