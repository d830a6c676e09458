"""The metrics document: histogram buckets, the workers' ``stats`` answer and the families
``coordinator/metrics.py`` builds from a snapshot (pure; the lab test scrapes a real gateway)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sixgate.coordinator.metrics import METRIC_NAMES, build_families
from sixgate.workers.engine.counters import (
    BATCH_PACKETS_BOUNDS,
    PROCESSING_SECONDS_BOUNDS,
    Counters,
    Histogram,
    worker_stats,
)
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.packet import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP


def test_histogram_le_semantics() -> None:
    hist = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 9.0):
        hist.observe(value)
    # A value equal to a bound belongs to that bucket (Prometheus "le").
    assert hist.counts == [2, 2, 1]
    assert hist.count == 5 and hist.total == pytest.approx(14.0)


def _worker_stats(echo: int = 3, drops: int = 2) -> dict[str, Any]:
    counters = Counters()
    for _ in range(echo):
        counters.count("inbound", PROTO_ICMPV6, 104)
        counters.count("outbound", PROTO_ICMPV6, 104)
    counters.event(Event.ECHO_REPLIES, echo)
    counters.event(Event.ERROR_PORT_UNREACHABLE, 2)
    counters.event(Event.ERROR_TIME_EXCEEDED)
    counters.event(Event.TCP_RST_SENT, 5)
    counters.event(Event.REPLIES_SUPPRESSED, drops)
    processing = {"inbound": Histogram(PROCESSING_SECONDS_BOUNDS)}
    processing["inbound"].observe(1.2e-5)
    return {"ok": True, **worker_stats(counters, {PROTO_TCP: 4}, {PROTO_TCP: 9, PROTO_UDP: 1},
                                       6, 100, 1, 8, processing)}


def _snapshot(workers: list[dict[str, Any] | None]) -> dict[str, Any]:
    coordinator = Counters()
    coordinator.drop(DropReason.SPOOFED_6TO4, 7)
    return {
        "version": "0.1.0", "backend": "userspace", "delivery": "tun", "mode": "6to4",
        "fast_path": "compiled",
        "ready": all(w is not None for w in workers), "start_time": 1.7e9,
        "reload_ok": True, "reload_success_unix": 1.7e9,
        "clat": {"prefix": "64:ff9b::/96", "source": "rfc8781", "changes": 2},
        "peers": [{"address": "198.51.100.1", "reachable": True, "rtt_s": 0.012}],
        "tunnel_received": (20, 2400),
        "tunnels": {"6to4": [20, 2400, 18, 2000]},
        "cluster": {"announce": ["192.0.2.10/32"], "announced": True, "draining": True,
                    "quiet_s": 1.5},
        "limits": {"max_flows_per_prefix": 50, "queue_batches": 1000, "icmp_errors_per_s": 100},
        "processes": [{"name": "coordinator", "usage": (1.0, 0.5, 4096),
                       "stats": {"counters": coordinator.as_dict()}}]
        + [{"name": f"worker-{i}", "restarts": i, "stats": w, "queue_drops": 0,
            "flow_limit": 100, "usage": None} for i, w in enumerate(workers)],
        "batch_packets": Histogram(BATCH_PACKETS_BOUNDS).as_dict(),
    }


def _exposed(snapshot: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render through prometheus_client's own exposition and parse it back with its parser."""
    class Fixed:
        def collect(self) -> list[Any]:
            return build_families(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_drop_reason_exported_from_the_start_for_every_process() -> None:
    samples = _exposed(_snapshot([_worker_stats(), _worker_stats()]))
    for process in ("coordinator", "worker-0", "worker-1"):
        for reason in DropReason:
            key = ("sixgate_drops_total", (("process", process), ("reason", reason.value)))
            assert key in samples, key
    assert samples[("sixgate_drops_total",
                    (("process", "coordinator"), ("reason", "spoofed_6to4")))] == 7


def test_worker_counters_become_named_series() -> None:
    samples = _exposed(_snapshot([_worker_stats(echo=3, drops=2)]))
    w0 = (("process", "worker-0"),)
    assert samples[("sixgate_echo_replies_total", w0)] == 3
    assert samples[("sixgate_packets_total", (("direction", "inbound"), ("process", "worker-0"),
                                              ("protocol", "icmp")))] == 3
    assert samples[("sixgate_icmp_errors_sent_total",
                    (("process", "worker-0"), ("type", "destination_unreachable")))] == 2
    assert samples[("sixgate_icmp_errors_sent_total",
                    (("process", "worker-0"), ("type", "time_exceeded")))] == 1
    assert samples[("sixgate_tcp_resets_sent_total", w0)] == 5
    assert samples[("sixgate_icmp_errors_suppressed_total", w0)] == 2
    assert samples[("sixgate_flows_active", (("process", "worker-0"), ("protocol", "tcp")))] == 4
    assert samples[("sixgate_flows_created_total",
                    (("process", "worker-0"), ("protocol", "tcp")))] == 9
    assert samples[("sixgate_flows_expired_total", w0)] == 6
    assert samples[("sixgate_flow_limit", w0)] == 100
    assert samples[("sixgate_tunnel_received_packets_total", ())] == 20
    # Per tunnel (issue 19) and the cluster's announcement (issue 20).
    assert samples[("sixgate_tunnel_bytes_total", (("direction", "sent"),
                                                   ("tunnel", "6to4")))] == 2000
    assert samples[("sixgate_cluster_announced", (("prefix", "192.0.2.10/32"),))] == 1
    assert samples[("sixgate_cluster_draining", ())] == 1
    assert samples[("sixgate_cluster_drain_quiet_seconds", ())] == 1.5
    assert samples[("sixgate_packet_processing_seconds_bucket",
                    (("direction", "inbound"), ("le", "2e-05"), ("process", "worker-0")))] == 1
    assert samples[("sixgate_packet_processing_seconds_bucket",
                    (("direction", "inbound"), ("le", "1e-05"), ("process", "worker-0")))] == 0
    assert samples[("sixgate_backend_info", (("backend", "userspace"), ("delivery", "tun"),
                                             ("fast_path", "compiled"),
                                             ("tunnel_mode", "6to4")))] == 1


def test_a_retiring_runs_connections_are_counted_until_they_end() -> None:
    """Issue 17, kernel backend: the relays of the run a take-over retired still carry
    connections; they are the gateway's until they end (0 without a retiring run)."""
    snapshot = _snapshot([_worker_stats()])
    assert _exposed(snapshot)[("sixgate_take_over_retiring_flows", (("protocol", "tcp"),))] == 0
    snapshot["retiring"] = [{"tcp": 2, "udp": 0, "icmp": 0}, {"tcp": 1, "udp": 0, "icmp": 0}]
    samples = _exposed(snapshot)
    assert samples[("sixgate_take_over_retiring_flows", (("protocol", "tcp"),))] == 3
    assert samples[("sixgate_take_over_retiring_flows", (("protocol", "udp"),))] == 0


def test_silent_worker_is_down_not_stale() -> None:
    samples = _exposed(_snapshot([_worker_stats(), None]))
    assert samples[("sixgate_worker_up", (("process", "worker-0"),))] == 1
    assert samples[("sixgate_worker_up", (("process", "worker-1"),))] == 0
    assert samples[("sixgate_worker_restarts_total", (("process", "worker-1"),))] == 1
    assert samples[("sixgate_ready", ())] == 0
    assert not any(name == "sixgate_echo_replies_total" and dict(labels)["process"] == "worker-1"
                   for name, labels in samples)


def test_no_unbounded_labels() -> None:
    """Only the bounded label names of coordinator/metrics.py's docstring ever appear."""
    samples = _exposed(_snapshot([_worker_stats(), _worker_stats()]))
    names = {label for _name, labels in samples for label, _value in labels}
    assert names <= {"process", "direction", "protocol", "reason", "type", "mode", "le",
                     "version", "backend", "delivery", "tunnel_mode", "fast_path",
                     "address",  # NAT64 pool4 addresses: as many as the config names
                     "prefix", "source",  # CLAT: the one PLAT prefix in use
                     "peer", "tunnel"}  # each tunnel and 6in4 broker (at most 8)


def test_families_are_exactly_the_documented_names() -> None:
    families = build_families(_snapshot([_worker_stats(), None]))
    names = [f.name for f in families]
    assert len(names) == len(set(names)) and set(names) == set(METRIC_NAMES)
