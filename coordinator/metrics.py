"""The gateway's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

One endpoint covers the coordinator and every worker. Workers report to the coordinator: at
each scrape the coordinator asks every worker for its ``stats`` over the control socket (in
parallel, bounded by a timeout) and a custom prometheus_client collector turns the answers
into metric families. We chose this over prometheus_client's multiprocess mode because that
mode keeps one mmap file per process and metric which outlives crashed workers and needs
``PROMETHEUS_MULTIPROC_DIR`` set before import; here each worker's counters stay plain
integers in its own loop (no locks on the hot path), a dead or stuck worker shows as
``sixgate_worker_up 0`` instead of stale numbers, and the kernel backend's relays answer the
same ``stats`` document, so both backends export the same metric names.

Naming follows Prometheus conventions: ``sixgate_`` prefix, ``_total`` counters, seconds and
bytes. Labels are bounded: ``process`` (coordinator, worker-N), ``direction`` (the four words
of STYLE.md, and received/sent per tunnel), ``protocol``, ``reason`` (workers/engine/drops.py),
ICMPv6 error ``type``, ``tunnel`` and ``peer`` (at most config.MAX_TUNNELS tunnels and their
brokers), ``prefix`` ([cluster] announce, as the config lists them); never a per-flow or
per-client label.

The HTTP server runs in a daemon thread beside the coordinator's loop; it reads the
coordinator's counters (plain ints, read under the GIL) and uses its own ZeroMQ sockets.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from socket import AF_INET6
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from sixgate.coordinator.config import parse_listen
from sixgate.coordinator.probe import fast_path_method
from sixgate.workers.engine.counters import DIRECTIONS, PROTOCOLS
from sixgate.workers.engine.drops import ICMP_ERROR_EVENTS, DropReason, Event
from sixgate.workers.engine.flows import worker_share
from sixgate.workers.engine.settings import Settings

log = logging.getLogger("sixgate.metrics")

# The HTTP endpoint's bounds: Prometheus needs one connection per scrape; a few more serve
# people and health checks.
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_S = 5.0
SCRAPE_WORKER_TIMEOUT_MS = 1500  # below Prometheus' default 10 s scrape timeout
READY_WORKER_TIMEOUT_MS = 1000
HEALTHY_LOOP_AGE_S = 5.0  # the loop polls every 0.5 s; 10 missed rounds means it is stuck
SHUTDOWN_POLL_S = 0.05  # how soon the metrics thread notices a stop

# Every metric family the endpoint exports, for both backends (names without the _total suffix
# prometheus_client adds to counters); the dashboards and tests check their names against it.
METRIC_NAMES = (
    "sixgate_build_info", "sixgate_backend_info", "sixgate_ready", "sixgate_start_time_seconds",
    "sixgate_config_last_reload_successful",
    "sixgate_config_last_reload_success_timestamp_seconds",
    "sixgate_tunnel_received_packets", "sixgate_tunnel_received_bytes",
    "sixgate_tunnel_packets", "sixgate_tunnel_bytes",
    "sixgate_cluster_announced", "sixgate_cluster_draining",
    "sixgate_cluster_drain_quiet_seconds",
    "sixgate_prefix_flow_limit", "sixgate_queue_limit_batches",
    "sixgate_icmp_error_rate_limit_per_second", "sixgate_packets", "sixgate_bytes",
    "sixgate_drops", "sixgate_flows_active", "sixgate_flows_created", "sixgate_flows_expired",
    "sixgate_flows_evicted", "sixgate_flows_resumed", "sixgate_control_errors",
    "sixgate_flow_limit", "sixgate_pool_addresses", "sixgate_pool_addresses_in_use",
    "sixgate_nat64_pool4_ports", "sixgate_nat64_pool4_ports_in_use",
    "sixgate_queue_drops", "sixgate_icmp_errors_sent", "sixgate_tcp_resets_sent",
    "sixgate_icmp_errors_suppressed", "sixgate_echo_replies", "sixgate_worker_up",
    "sixgate_worker_restarts", "sixgate_cpu_seconds", "sixgate_resident_memory_bytes",
    "sixgate_coordinator_batch_packets", "sixgate_packet_processing_seconds",
    "sixgate_clat_plat_prefix_info", "sixgate_clat_plat_prefix_changes",
    "sixgate_tunnel_peer_reachable", "sixgate_tunnel_peer_rtt_seconds",
    "sixgate_tunnel_endpoint_updates",
    "sixgate_tunnel_endpoint_changes", "sixgate_take_over_retiring_flows",
)

# RFC 4443 §2.1 error message types, the ``type`` label of sixgate_icmp_errors_sent_total.
ICMPV6_ERROR_TYPES = {1: "destination_unreachable", 2: "packet_too_big", 3: "time_exceeded",
                      4: "parameter_problem"}


def sixgate_version() -> str:
    try:
        return metadata.version("sixgate")
    except metadata.PackageNotFoundError:
        return "unknown"


def process_usage(pid: int) -> tuple[float, float, int] | None:
    """(user CPU s, system CPU s, resident bytes) of a process from /proc, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return None
    # proc(5): fields after the ")" that ends comm; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) / ticks, int(fields[12]) / ticks,
            int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def _histogram(name: str, doc: str, labels: list[str],
               series: Iterable[tuple[list[str], dict[str, Any]]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in series:
        cumulative = 0
        buckets = []
        for bound, count in zip([*hist["bounds"], float("inf")], hist["counts"], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)),
                            cumulative))
        family.add_metric(values, buckets, sum_value=hist["sum"])
    return family


def build_families(snap: dict[str, Any]) -> list[Metric]:
    """Metric families from one gateway snapshot (plain data, see ``GatewayCollector``).

    Pure: the same snapshot always gives the same families, so it is unit-tested without
    sockets. Per-worker series are omitted for a worker that did not answer (Prometheus marks
    them stale) except ``sixgate_worker_up``, its limit and its restart count.
    """
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        out.append(family)

    build = GaugeMetricFamily("sixgate_build_info", "sixgate version (value 1)",
                              labels=["version"])
    build.add_metric([snap["version"]], 1)
    out.append(build)
    backend = GaugeMetricFamily(
        "sixgate_backend_info", "Tunnel backend, delivery to services, tunnel mode and how the "
        "fast path runs (value 1)", labels=["backend", "delivery", "tunnel_mode", "fast_path"])
    backend.add_metric([snap["backend"], snap["delivery"], snap["mode"], snap["fast_path"]], 1)
    out.append(backend)
    gauge("sixgate_ready", "1 when the capture socket is open and every worker answers",
          1 if snap["ready"] else 0)
    gauge("sixgate_start_time_seconds", "Unix time the coordinator started", snap["start_time"])
    retiring = GaugeMetricFamily(
        "sixgate_take_over_retiring_flows", "Connections the run this one took over from still "
        "carries until they end (kernel backend; 0 otherwise)", labels=["protocol"])
    for proto in ("tcp", "udp", "icmp"):
        retiring.add_metric([proto], sum(active.get(proto, 0)
                                         for active in snap.get("retiring", [])))
    out.append(retiring)
    gauge("sixgate_config_last_reload_successful", "1 when the last config reload (or the "
          "start) succeeded, 0 when the last reload was refused", 1 if snap["reload_ok"] else 0)
    gauge("sixgate_config_last_reload_success_timestamp_seconds", "Unix time the config in use "
          "was loaded", snap["reload_success_unix"])
    # CLAT (issue 18): the PLAT prefix in use; empty families in the other modes.
    clat = snap.get("clat")
    info = GaugeMetricFamily("sixgate_clat_plat_prefix_info", "CLAT: the PLAT prefix in use "
                             "and how it was found: configured, rfc8781 (a router "
                             "advertisement's PREF64) or rfc7050 (DNS64) (value 1)",
                             labels=["prefix", "source"])
    changes = CounterMetricFamily("sixgate_clat_plat_prefix_changes", "CLAT: times the PLAT "
                                  "prefix changed while running (a router advertisement's "
                                  "PREF64, or the DNS64 asked again)", labels=[])
    if clat is not None:
        info.add_metric([clat["prefix"], clat["source"]], 1)
        changes.add_metric([], clat["changes"])
    out += [info, changes]
    # 6in4: each broker's reachability (RFC 4213 §3.8 probes); empty until the first ends.
    reachable = GaugeMetricFamily("sixgate_tunnel_peer_reachable", "6in4: 1 when the broker "
                                  "answered the last probe of its link-local address (RFC 4213 "
                                  "§3.8), 0 when it did not", labels=["peer"])
    rtt = GaugeMetricFamily("sixgate_tunnel_peer_rtt_seconds", "6in4: round trip of the "
                            "broker's last answer to a probe", labels=["peer"])
    for peer in snap.get("peers", []):
        reachable.add_metric([peer["address"]], 1 if peer["reachable"] else 0)
        if peer["rtt_s"] is not None:
            rtt.add_metric([peer["address"]], peer["rtt_s"])
    out += [reachable, rtt]
    updates = CounterMetricFamily("sixgate_tunnel_endpoint_updates", "6in4 with [broker]: "
                                  "updates of our address at the broker, by result",
                                  labels=["result"])
    for result, count in sorted(snap.get("broker_updates", {}).items()):
        updates.add_metric([result], count)
    out.append(updates)
    out.append(CounterMetricFamily(
        "sixgate_tunnel_endpoint_changes", "6in4 with [tunnel] uplink or public_ipv4_url: "
        "moves of the tunnel to a new address", value=snap.get("endpoint_changes", 0)))
    out.append(CounterMetricFamily(
        "sixgate_tunnel_received_packets", "Protocol-41 packets received, before any check",
        value=snap["tunnel_received"][0]))
    out.append(CounterMetricFamily(
        "sixgate_tunnel_received_bytes", "Bytes of those packets, outer IPv4 header included",
        value=snap["tunnel_received"][1]))
    # [cluster]: what BIRD announces (the anchor or the drain device up), whether a drain
    # runs and how far it is.
    announced = GaugeMetricFamily("sixgate_cluster_announced", "[cluster]: 1 while BIRD "
                                  "announces the prefix (this node ready; or draining, then "
                                  "with the GRACEFUL_SHUTDOWN community)", labels=["prefix"])
    draining = GaugeMetricFamily("sixgate_cluster_draining", "[cluster]: 1 once `sixgate "
                                 "drain` asked (announced with the GRACEFUL_SHUTDOWN community "
                                 "until the node stops, once quiet)", labels=[])
    quiet = GaugeMetricFamily("sixgate_cluster_drain_quiet_seconds", "[cluster]: while "
                              "draining, how long no packet has come (the node stops when "
                              "this reaches drain_quiet_s); 0 otherwise", labels=[])
    node = snap.get("cluster")
    if node is not None:
        for prefix in node["announce"]:
            announced.add_metric([prefix], 1 if node["announced"] else 0)
        draining.add_metric([], 1 if node["draining"] else 0)
        quiet.add_metric([], node["quiet_s"])
    out += [announced, draining, quiet]
    # Per tunnel ([[tunnel]]: at most MAX_TUNNELS label values), outer header included.
    per_packets = CounterMetricFamily(
        "sixgate_tunnel_packets", "Protocol-41 packets per tunnel: received from its peers "
        "(before any check) and sent to them", labels=["tunnel", "direction"])
    per_bytes = CounterMetricFamily(
        "sixgate_tunnel_bytes", "Bytes of those packets, outer IPv4 header included",
        labels=["tunnel", "direction"])
    for name, row in sorted(snap.get("tunnels", {}).items()):
        for direction, at in (("received", 0), ("sent", 2)):
            per_packets.add_metric([name, direction], row[at])
            per_bytes.add_metric([name, direction], row[at + 1])
    out += [per_packets, per_bytes]

    limits = snap["limits"]
    gauge("sixgate_prefix_flow_limit", "Most bindings one client /64 may hold",
          limits["max_flows_per_prefix"])
    gauge("sixgate_queue_limit_batches", "Batches the coordinator may queue per worker",
          limits["queue_batches"])
    gauge("sixgate_icmp_error_rate_limit_per_second",
          "ICMPv6 errors and RSTs a worker may send per second (token bucket rate)",
          limits["icmp_errors_per_s"])

    processes = snap["processes"]  # the coordinator first, then worker-0, worker-1, ...
    packets = CounterMetricFamily("sixgate_packets", "Packets per direction and protocol",
                                  labels=["process", "direction", "protocol"])
    octets = CounterMetricFamily("sixgate_bytes", "Bytes per direction and protocol (IP "
                                 "header included, outer tunnel header excluded)",
                                 labels=["process", "direction", "protocol"])
    drops = CounterMetricFamily("sixgate_drops",
                                "Packets dropped, by reason (workers/engine/drops.py)",
                                labels=["process", "reason"])
    active = GaugeMetricFamily("sixgate_flows_active", "Live bindings (sessions)",
                               labels=["process", "protocol"])
    created = CounterMetricFamily("sixgate_flows_created", "Bindings created",
                                  labels=["process", "protocol"])
    expired = CounterMetricFamily("sixgate_flows_expired", "Bindings removed after their "
                                  "timeout", labels=["process"])
    evicted = CounterMetricFamily("sixgate_flows_evicted", "Unassured bindings removed to make "
                                  "room for a new one (table or pool full)", labels=["process"])
    resumed = CounterMetricFamily("sixgate_flows_resumed", "Sessions a worker started again "
                                  "after a crash resumed from its shard journal",
                                  labels=["process"])
    flow_limit = GaugeMetricFamily("sixgate_flow_limit", "Most bindings this worker may hold "
                                   "(its share of max_flows)", labels=["process"])
    pool = GaugeMetricFamily("sixgate_pool_addresses", "IPv4 pool addresses this worker owns",
                             labels=["process"])
    pool_used = GaugeMetricFamily("sixgate_pool_addresses_in_use", "Pool addresses bound to "
                                  "a client", labels=["process"])
    pool4 = GaugeMetricFamily("sixgate_nat64_pool4_ports", "NAT64 pool4 ports this worker "
                              "owns, per protocol and address (its slice)",
                              labels=["process", "protocol", "address"])
    pool4_used = GaugeMetricFamily("sixgate_nat64_pool4_ports_in_use", "NAT64 pool4 ports "
                                   "bound to a client (RFC 6146 BIB entries)",
                                   labels=["process", "protocol", "address"])
    queue_drops = CounterMetricFamily("sixgate_queue_drops", "Packets lost because this "
                                      "worker's ZeroMQ queue was full", labels=["process"])
    errors_sent = CounterMetricFamily("sixgate_icmp_errors_sent", "ICMPv6 errors sent",
                                      labels=["process", "type"])
    resets = CounterMetricFamily("sixgate_tcp_resets_sent", "TCP RSTs sent for refused "
                                 "connections", labels=["process"])
    suppressed = CounterMetricFamily("sixgate_icmp_errors_suppressed", "ICMPv6 errors and "
                                     "RSTs suppressed by the rate limiter", labels=["process"])
    control_errors = CounterMetricFamily("sixgate_control_errors", "Control-socket requests "
                                         "refused as malformed or unknown",
                                         labels=["process"])
    echo = CounterMetricFamily("sixgate_echo_replies", "ICMPv6 echo replies sent",
                               labels=["process"])
    up = GaugeMetricFamily("sixgate_worker_up", "1 when the worker answered this scrape",
                           labels=["process"])
    restarts = CounterMetricFamily("sixgate_worker_restarts", "Times the worker was "
                                   "restarted after it exited", labels=["process"])
    cpu = CounterMetricFamily("sixgate_cpu_seconds", "CPU time of the process",
                              labels=["process", "mode"])
    rss = GaugeMetricFamily("sixgate_resident_memory_bytes", "Resident memory of the process",
                            labels=["process"])
    timings: list[tuple[list[str], dict[str, Any]]] = []

    for proc in processes:
        name = proc["name"]
        is_worker = name != "coordinator"
        if is_worker:
            up.add_metric([name], 1 if proc["stats"] is not None else 0)
            restarts.add_metric([name], proc["restarts"])
            flow_limit.add_metric([name], proc["flow_limit"])
            queue_drops.add_metric([name], proc["queue_drops"])
        if proc["usage"] is not None:
            user_s, system_s, rss_bytes = proc["usage"]
            cpu.add_metric([name, "user"], user_s)
            cpu.add_metric([name, "system"], system_s)
            rss.add_metric([name], rss_bytes)
        stats = proc["stats"]
        if stats is None:
            continue
        counters = stats["counters"]
        for reason in DropReason:
            drops.add_metric([name, reason.value], counters["drops"].get(reason.value, 0))
        control_errors.add_metric([name], counters["events"].get(Event.CONTROL_ERRORS.value, 0))
        if not is_worker:
            continue  # the coordinator only fans out: its packets are tunnel_*
        for direction in DIRECTIONS:
            for protocol in PROTOCOLS:
                key = f"{direction}/{protocol}"
                packets.add_metric([name, direction, protocol], counters["packets"].get(key, 0))
                octets.add_metric([name, direction, protocol], counters["bytes"].get(key, 0))
        events = counters["events"]
        flows = stats["flows"]
        for protocol in ("tcp", "udp", "icmp"):
            active.add_metric([name, protocol], flows["active"].get(protocol, 0))
            created.add_metric([name, protocol], flows["created"].get(protocol, 0))
        for row in stats.get("pool4", []):
            labels = [name, row["protocol"], row["address"]]
            pool4.add_metric(labels, row["ports"])
            pool4_used.add_metric(labels, row["in_use"])
        expired.add_metric([name], flows["expired"])
        evicted.add_metric([name], events.get(Event.FLOWS_EVICTED.value, 0))
        resumed.add_metric([name], events.get(Event.FLOWS_RESUMED.value, 0))
        pool.add_metric([name], flows["pool_size"])
        pool_used.add_metric([name], flows["pool_in_use"])
        sent = dict.fromkeys(ICMPV6_ERROR_TYPES.values(), 0)
        for (icmp_type, _code), event in ICMP_ERROR_EVENTS.items():
            sent[ICMPV6_ERROR_TYPES[icmp_type]] += events.get(event.value, 0)
        for type_name, count in sent.items():
            errors_sent.add_metric([name, type_name], count)
        resets.add_metric([name], events.get(Event.TCP_RST_SENT.value, 0))
        suppressed.add_metric([name], events.get(Event.REPLIES_SUPPRESSED.value, 0))
        echo.add_metric([name], events.get(Event.ECHO_REPLIES.value, 0))
        for direction in ("inbound", "from_services"):
            hist = stats["processing_seconds"].get(direction)
            if hist is not None:
                timings.append(([name, direction], hist))

    out += [packets, octets, drops, control_errors, active, created, expired, evicted, resumed,
            flow_limit, pool, pool_used, pool4, pool4_used,
            queue_drops, errors_sent, resets, suppressed, echo, up, restarts, cpu, rss]
    out.append(_histogram("sixgate_coordinator_batch_packets",
                          "Packets per coordinator-to-worker ZeroMQ message", [],
                          [([], snap["batch_packets"])]))
    out.append(_histogram("sixgate_packet_processing_seconds",
                          "Engine time per packet (batch means, or 1 packet in 16 sampled)",
                          ["process", "direction"], timings))
    return out


@dataclass(frozen=True)
class WorkerView:
    index: int
    pid: int | None  # None while it is not running
    restarts: int
    queue_drops: int  # packets lost to its full queue (coordinator fan-out)


@dataclass(frozen=True)
class GatewayView:
    """What /metrics, /healthz and /readyz read of the running gateway, taken at one time."""

    counters: dict[str, Any]  # the coordinator's own (Counters.as_dict)
    workers: tuple[WorkerView, ...]
    started_unix: float
    loop_age_s: float  # since the coordinator's main loop last went round
    batch_packets: dict[str, Any]  # Histogram.as_dict of packets per fan-out message
    capture_open: bool  # coordinator fan-out: its protocol-41 socket is open
    sit_link: str | None  # kernel backend: the sit link it made
    reload_ok: bool = True  # the last config reload (or the start) succeeded
    reload_success_unix: float = 0.0  # when the config in use was loaded
    plat_source: str = ""  # CLAT: how its PLAT prefix was found
    plat_changes: int = 0  # CLAT: PREF64 changes of the prefix while running
    # 6in4: each broker, the last probe of it (None: none yet) and its answer's round trip
    peers: tuple[tuple[str, bool | None, float | None], ...] = ()
    announced: bool | None = None  # [cluster]: the anchor device is up (None: no cluster)
    draining: bool = False  # `sixgate drain` asked
    drain_quiet_s: float = 0.0  # while draining: how long no packet has come
    broker_updates: dict[str, int] = field(default_factory=dict)  # [broker]: result -> count
    endpoint_changes: int = 0  # [tunnel] uplink: moves to a new address


class Gateway(Protocol):
    """The metrics endpoint's whole interface to the coordinator."""

    settings: Settings

    def view(self) -> GatewayView: ...

    def ask_workers(self, cmd: str, timeout_ms: int) -> list[dict[str, Any] | None]: ...

    def ask_retiring(self, cmd: str, timeout_ms: int) -> list[dict[str, Any]]: ...


class GatewayCollector:
    """prometheus_client collector that snapshots the coordinator and asks the workers."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.version = sixgate_version()  # read once: it does not change while we run

    def snapshot(self) -> dict[str, Any]:
        settings = self.gateway.settings
        replies = self.gateway.ask_workers("stats", SCRAPE_WORKER_TIMEOUT_MS)
        view = self.gateway.view()
        kernel = settings.backend == "kernel"
        # Counted by the coordinator, or with kernel fan-out by each worker; every captured
        # packet is one tunnel's, so the tunnel's totals are their sum.
        tunnels = per_tunnel(settings, view, replies)
        received = (sum(row[0] for row in tunnels.values()),
                    sum(row[1] for row in tunnels.values()))
        processes: list[dict[str, Any]] = [{
            "name": "coordinator", "usage": process_usage(os.getpid()),
            "stats": {"counters": view.counters}}]
        for worker, reply in zip(view.workers, replies, strict=True):
            processes.append({
                "name": f"worker-{worker.index}", "restarts": worker.restarts,
                "stats": reply, "queue_drops": worker.queue_drops,
                "flow_limit": worker_share(settings.max_flows, settings.workers),
                "usage": process_usage(worker.pid) if worker.pid is not None else None})
        return {
            "version": self.version, "backend": settings.backend,
            "delivery": "socket_relay" if kernel else "tun", "mode": settings.mode,
            "fast_path": fast_path_method(settings, settings.backend)[0],
            "ready": readiness(settings, view, replies) is None,
            "start_time": view.started_unix,
            "reload_ok": view.reload_ok,
            "reload_success_unix": view.reload_success_unix or view.started_unix,
            "clat": {"prefix": settings.clat_plat_prefix, "source": view.plat_source,
                     "changes": view.plat_changes} if settings.clat_enabled else None,
            "broker_updates": view.broker_updates,
            "endpoint_changes": view.endpoint_changes,
            "peers": [{"address": address, "reachable": reachable, "rtt_s": rtt_s}
                      for address, reachable, rtt_s in view.peers if reachable is not None],
            "tunnel_received": received,
            "tunnels": tunnels,
            "cluster": {"announce": list(settings.cluster_announce),
                        "announced": view.announced, "draining": view.draining,
                        "quiet_s": view.drain_quiet_s}
            if view.announced is not None else None,
            "limits": {"max_flows_per_prefix": settings.max_flows_per_prefix,
                       "queue_batches": settings.queue_batches,
                       "icmp_errors_per_s": settings.icmp_errors_per_s},
            "processes": processes,
            "batch_packets": view.batch_packets,
            "retiring": [reply["flows"]["active"] for reply in self.gateway.ask_retiring(
                "stats", SCRAPE_WORKER_TIMEOUT_MS)],
        }

    def collect(self) -> Iterator[Metric]:
        yield from build_families(self.snapshot())


def kernel_link_statistics(link: str | None) -> tuple[int, int, int, int]:
    """The sit link's packets and bytes received, then sent (zeros without the link)."""
    if link is None:
        return 0, 0, 0, 0
    base = Path(f"/sys/class/net/{link}/statistics")
    try:
        return tuple(int((base / name).read_text())  # type: ignore[return-value]
                     for name in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"))
    except (OSError, ValueError):
        return 0, 0, 0, 0


def per_tunnel(settings: Settings, view: GatewayView,
               replies: list[dict[str, Any] | None]) -> dict[str, list[int]]:
    """[packets received, bytes, packets sent, bytes] per tunnel name: the sit link's own
    counters on the kernel backend, else the sum of every process's (``TunnelTraffic``)."""
    if settings.backend == "kernel":
        return {settings.all_tunnels()[0].name: list(kernel_link_statistics(view.sit_link))}
    out: dict[str, list[int]] = {t.name: [0, 0, 0, 0] for t in settings.all_tunnels()}
    for counters in [view.counters] + [r["counters"] for r in replies if r is not None]:
        for name, row in counters.get("tunnels", {}).items():
            if name in out:  # a name a reload removed is not one of ours any more
                out[name] = [a + b for a, b in zip(out[name], row, strict=True)]
    return out


def readiness(settings: Settings, view: GatewayView,
              replies: list[dict[str, Any] | None]) -> str | None:
    """None when ready, else what the gateway is waiting for (the /readyz body)."""
    if view.draining:
        return "draining (sixgate drain): withdrawn, stops once its traffic has ended"
    if settings.backend == "kernel":
        if view.sit_link is None or not Path(f"/sys/class/net/{view.sit_link}").exists():
            return "the sit tunnel link is not up"
    elif settings.fanout == "coordinator" and not view.capture_open:
        # With kernel fan-out each worker holds its own capture socket: it answers only
        # once that socket is open, so the worker check below covers it.
        return "the protocol-41 capture socket is not open"
    silent = [str(i) for i, reply in enumerate(replies) if reply is None]
    if silent:
        return f"worker(s) {', '.join(silent)} not answering"
    return None


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on the configured address, in a thread."""

    def __init__(self, gateway: Gateway, listen: str) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway))
        host, port = parse_listen(listen)
        server_class = _Server6 if ":" in host else _BoundedServer
        self.httpd = server_class((host, port), _handler(self))
        # A short poll interval: a stop (a restart's, an upgrade's) waits for it in shutdown.
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                       args=(SHUTDOWN_POLL_S,), daemon=True)
        self.thread.start()
        log.info("metrics on http://%s/metrics (also /healthz, /readyz)", listen)

    def healthy(self) -> str | None:
        age = self.gateway.view().loop_age_s
        if age > HEALTHY_LOOP_AGE_S:
            return f"the coordinator loop has not run for {age:.0f} s"
        return None

    def ready(self) -> str | None:
        replies = self.gateway.ask_workers("ping", READY_WORKER_TIMEOUT_MS)
        return readiness(self.gateway.settings, self.gateway.view(), replies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _BoundedServer(ThreadingHTTPServer):
    """At most ``MAX_CONNECTIONS`` connections at once (more are closed at once), each given
    ``REQUEST_TIMEOUT_S`` to send its request: idle or slow clients cannot pile up threads."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server6(_BoundedServer):
    address_family = AF_INET6


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # socket timeout: a client that sends nothing is dropped

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, encoder(server.registry), content_type)
            elif path in ("/healthz", "/readyz"):
                problem = server.healthy() if path == "/healthz" else server.ready()
                if problem is None:
                    self._reply(200, b"ok\n" if path == "/healthz" else b"ready\n")
                else:
                    self._reply(503, f"{problem}\n".encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes,
                   content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("metrics http: " + format, *args)

    return Handler
