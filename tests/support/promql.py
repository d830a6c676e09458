"""Helpers for the tests of the Grafana dashboard and the Prometheus alerts (issue 3).

``METRICS`` is the /metrics contract: every metric sixgate exports with its type and the label
values it can take. The tests check each name a query uses against it (a typo fails), and
``openmetrics`` writes synthetic series of exactly these names and labels, which a real
Prometheus then answers each dashboard query from.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml

WORKERS = ("worker-0", "worker-1")
PROCESSES = ("coordinator", *WORKERS)
DIRECTIONS = ("inbound", "to_services", "from_services", "outbound")
PROTOCOLS = ("tcp", "udp", "icmp", "other")
# A few DropReason values; the dashboard must not depend on which.
REASONS = ("truncated", "spoofed_6to4", "no_rule", "icmp_rate_limited", "internal_error")

# name: (type, {label: the values the synthetic series take})
METRICS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "sixgate_build_info": ("gauge", {"version": ("0.1.0",)}),
    "sixgate_backend_info": ("gauge", {"backend": ("userspace",), "delivery": ("tun",),
                                       "tunnel_mode": ("6to4",), "fast_path": ("compiled",)}),
    "sixgate_ready": ("gauge", {}),
    "sixgate_start_time_seconds": ("gauge", {}),
    "sixgate_config_last_reload_successful": ("gauge", {}),
    "sixgate_config_last_reload_success_timestamp_seconds": ("gauge", {}),
    "sixgate_tunnel_received_packets_total": ("counter", {}),
    "sixgate_tunnel_received_bytes_total": ("counter", {}),
    "sixgate_tunnel_packets_total": ("counter", {"tunnel": ("6to4",),
                                                 "direction": ("received", "sent")}),
    "sixgate_tunnel_bytes_total": ("counter", {"tunnel": ("6to4",),
                                               "direction": ("received", "sent")}),
    "sixgate_cluster_announced": ("gauge", {"prefix": ("192.0.2.10/32",)}),
    "sixgate_cluster_draining": ("gauge", {}),
    "sixgate_cluster_drain_quiet_seconds": ("gauge", {}),
    "sixgate_packets_total": ("counter", {"process": WORKERS, "direction": DIRECTIONS,
                                          "protocol": PROTOCOLS}),
    "sixgate_bytes_total": ("counter", {"process": WORKERS, "direction": DIRECTIONS,
                                        "protocol": PROTOCOLS}),
    "sixgate_drops_total": ("counter", {"process": PROCESSES, "reason": REASONS}),
    "sixgate_flows_active": ("gauge", {"process": WORKERS,
                                       "protocol": ("tcp", "udp", "icmp")}),
    "sixgate_flows_created_total": ("counter", {"process": WORKERS,
                                                "protocol": ("tcp", "udp", "icmp")}),
    "sixgate_flows_expired_total": ("counter", {"process": WORKERS}),
    "sixgate_flows_evicted_total": ("counter", {"process": WORKERS}),
    "sixgate_flows_resumed_total": ("counter", {"process": WORKERS}),
    "sixgate_control_errors_total": ("counter", {"process": PROCESSES}),
    "sixgate_flow_limit": ("gauge", {"process": WORKERS}),
    "sixgate_prefix_flow_limit": ("gauge", {}),
    "sixgate_pool_addresses": ("gauge", {"process": WORKERS}),
    "sixgate_pool_addresses_in_use": ("gauge", {"process": WORKERS}),
    "sixgate_nat64_pool4_ports": ("gauge", {"process": WORKERS, "protocol": ("tcp", "udp"),
                                            "address": ("203.0.113.5",)}),
    "sixgate_nat64_pool4_ports_in_use": ("gauge", {"process": WORKERS,
                                                   "protocol": ("tcp", "udp"),
                                                   "address": ("203.0.113.5",)}),
    "sixgate_queue_limit_batches": ("gauge", {}),
    "sixgate_queue_drops_total": ("counter", {"process": WORKERS}),
    "sixgate_icmp_error_rate_limit_per_second": ("gauge", {}),
    "sixgate_icmp_errors_sent_total": ("counter", {"process": WORKERS, "type": (
        "destination_unreachable", "packet_too_big", "time_exceeded", "parameter_problem")}),
    "sixgate_tcp_resets_sent_total": ("counter", {"process": WORKERS}),
    "sixgate_icmp_errors_suppressed_total": ("counter", {"process": WORKERS}),
    "sixgate_echo_replies_total": ("counter", {"process": WORKERS}),
    "sixgate_coordinator_batch_packets": ("histogram", {}),
    "sixgate_packet_processing_seconds": ("histogram", {
        "process": WORKERS, "direction": ("inbound", "from_services")}),
    "sixgate_worker_up": ("gauge", {"process": WORKERS}),
    "sixgate_worker_restarts_total": ("counter", {"process": WORKERS}),
    "sixgate_cpu_seconds_total": ("counter", {"process": PROCESSES, "mode": ("user", "system")}),
    "sixgate_resident_memory_bytes": ("gauge", {"process": PROCESSES}),
    "sixgate_clat_plat_prefix_info": ("gauge", {"prefix": ("64:ff9b::/96",),
                                                "source": ("rfc8781",)}),
    "sixgate_clat_plat_prefix_changes_total": ("counter", {}),
    "sixgate_tunnel_peer_reachable": ("gauge", {"peer": ("198.51.100.1",)}),
    "sixgate_tunnel_peer_rtt_seconds": ("gauge", {"peer": ("198.51.100.1",)}),
    "sixgate_tunnel_endpoint_updates_total": ("counter", {"result": ("good", "badauth")}),
    "sixgate_tunnel_endpoint_changes_total": ("counter", {}),
    "sixgate_take_over_retiring_flows": ("gauge", {"protocol": ("tcp", "udp", "icmp")}),
}
BUCKETS = {
    "sixgate_coordinator_batch_packets": ("1", "2", "4", "8", "16", "32", "64", "128", "256"),
    "sixgate_packet_processing_seconds": ("5e-06", "1e-05", "5e-05", "0.0001", "0.0005",
                                          "0.001", "0.005", "0.01", "0.05"),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

KNOWN_METRICS: frozenset[str] = frozenset(
    {"up"}
    | {name for name, (kind, _) in METRICS.items() if kind != "histogram"}
    | {name + suffix for name, (kind, _) in METRICS.items() if kind == "histogram"
       for suffix in HISTOGRAM_SUFFIXES}
)

# --- reading the dashboard and the rules ---------------------------------------------------


def panel_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    return [(panel["title"], query["expr"])
            for panel in all_panels(dashboard)
            for query in panel.get("targets", [])
            if "expr" in query]


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those inside collapsed rows, in order."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def alert_rules(path: Path) -> list[dict[str, Any]]:
    """Every alerting rule (``alert``, ``expr``, ``for``, ``labels``, ...) of every group."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def expand(expr: str, instance: str, rate_interval: str = "30s",
           interval: str | None = None) -> str:
    """The query Grafana sends for one selected instance.

    Like Grafana for a ``=~`` matcher, the value is regex-escaped and its backslashes doubled
    for the PromQL string.
    """
    value = re.escape(instance).replace("\\", "\\\\")
    for name, replacement in (("${instance}", value), ("$instance", value),
                              ("$__rate_interval", rate_interval),
                              ("$__interval", interval or rate_interval)):
        expr = expr.replace(name, replacement)
    return expr


# --- a small PromQL scanner: which metrics, with which matchers ----------------------------

_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<matchers>\{(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^}"'])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][\w:]*)
  | (?P<other>\S)
""", re.VERBOSE)
_OTHER = "other"
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                 "count_values", "bottomk", "topk", "quantile"}
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name or "", ``{matchers}`` or "") of every vector selector in ``expr``."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        after = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        index += 1
        if kind == "matchers":
            found.append(("", text))
        elif kind != "name":
            continue
        elif text in _GROUPING and after == "(":
            index = tokens.index((_OTHER, ")"), index) + 1  # skip the label list
        elif after == "(" or text.lower() in _KEYWORDS:
            continue  # a function call or a keyword
        elif after.startswith("{"):
            found.append((text, after))
            index += 1
        else:
            found.append((text, ""))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr) if name}


# --- synthetic data for a real Prometheus --------------------------------------------------


def openmetrics(instances: tuple[str, ...], start_s: int, samples: int, step_s: int) -> str:
    """Every series of ``METRICS`` for each instance (job ``sixgate``) plus ``up``, one sample
    each ``step_s`` from ``start_s``: gauges at 1, counters rising steadily, histograms with
    counts in every bucket. Input of ``promtool tsdb create-blocks-from openmetrics``.
    """
    lines = []
    families = {"up": ("gauge", {}), **METRICS}
    for name, (kind, labels) in families.items():
        for instance, values in itertools.product(instances, itertools.product(*labels.values())):
            series_labels = {"job": "sixgate", "instance": instance,
                             **dict(zip(labels, values, strict=True))}
            for series, per_step in _series(name, kind, series_labels):
                for n in range(samples):
                    value = 1 if per_step is None else per_step * n
                    lines.append(f"{series} {value} {start_s + n * step_s}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _series(name: str, kind: str, labels: dict[str, str]) -> list[tuple[str, float | None]]:
    """(series text, increase per step or None for a constant 1) of one labelled metric."""
    if kind == "gauge":
        return [(_format(name, labels), None)]
    if kind == "counter":
        return [(_format(name, labels), 10)]
    bounds = (*BUCKETS[name], "+Inf")
    return [
        *((_format(name + "_bucket", {**labels, "le": le}), 10 * (rank + 1))
          for rank, le in enumerate(bounds)),
        (_format(name + "_count", labels), 10 * len(bounds)),
        (_format(name + "_sum", labels), 3),
    ]


def _format(name: str, labels: dict[str, str]) -> str:
    inside = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return f"{name}{{{inside}}}"
