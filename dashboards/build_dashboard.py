"""Writes ``dashboards/sixgate.json``, the Grafana dashboard of sixgate's /metrics (issue 3).

Run ``python dashboards/build_dashboard.py`` after changing a panel and commit both files;
``tests/test_dashboards.py`` fails while the JSON differs from what this script writes.
Metric and label names are those of sixgate's /metrics endpoint (``tests/promql.py`` keeps
the list and the tests check every query against it). Stdlib only.

Every panel and query uses the ``datasource`` variable, every selector filters
``instance=~"$instance"``, and rates use ``$__rate_interval`` (four scrape intervals at least,
so a rate never rests on a single sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "sixgate.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The datasource of provisioning/datasources/sixgate.yml; Grafana falls back to the default
# Prometheus datasource where it does not exist.
PROVISIONED_UID = "sixgate-prometheus"
PROVISIONED_NAME = "sixgate Prometheus"
PANEL_WIDTH = 8  # three panels per line of Grafana's 24-column grid
PANEL_HEIGHT = 8
QUANTILES = (0.5, 0.9, 0.99)

Panel = dict[str, Any]
Target = dict[str, Any]


def sel(metric: str, matchers: str = "") -> str:
    """``metric{instance=~"$instance", matchers}``: the one way a query names a series."""
    extra = f", {matchers}" if matchers else ""
    return f'{metric}{{instance=~"$instance"{extra}}}'


def rate(metric: str, matchers: str = "") -> str:
    return f"rate({sel(metric, matchers)}[$__rate_interval])"


def target(expr: str, legend: str) -> Target:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True}


def quantile_targets(histogram: str, by: str, legend: str, matchers: str = "") -> list[Target]:
    """p50/p90/p99 of a histogram, grouped by ``by`` (plus ``le``)."""
    grouping = f"{by}, le" if by else "le"
    return [
        target(f"histogram_quantile({q}, sum by ({grouping}) "
               f"({rate(histogram + '_bucket', matchers)}))",
               f"p{round(q * 100)} {legend}".rstrip())
        for q in QUANTILES
    ]


def timeseries(title: str, description: str, targets: list[Target], unit: str,
               **custom: Any) -> Panel:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"fillOpacity": 10, **custom}},
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def with_threshold(panel: Panel, red_from: float, maximum: float) -> Panel:
    """Draw the alert's threshold as a dashed red line and fix the axis at 0..maximum."""
    defaults = panel["fieldConfig"]["defaults"]
    defaults.update(min=0, max=maximum, thresholds={"mode": "absolute", "steps": [
        {"color": "green", "value": None}, {"color": "red", "value": red_from}]})
    defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return panel


def dashed(panel: Panel, legend_regex: str) -> Panel:
    """Series whose legend matches ``legend_regex`` are drawn as dashed reference lines."""
    panel["fieldConfig"]["overrides"].append({
        "matcher": {"id": "byRegexp", "options": legend_regex},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
        ],
    })
    return panel


def up_down(title: str, description: str, targets: list[Target]) -> Panel:
    return {
        "type": "state-timeline",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "mappings": [{"type": "value", "options": {
                    "0": {"text": "down", "color": "red", "index": 0},
                    "1": {"text": "up", "color": "green", "index": 1}}}],
                "thresholds": {"mode": "absolute", "steps": [
                    {"color": "red", "value": None}, {"color": "green", "value": 1}]},
            },
            "overrides": [],
        },
        "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.9,
                    "legend": {"displayMode": "list", "placement": "bottom",
                               "showLegend": False}},
    }


def overview() -> list[Panel]:
    return [
        timeseries(
            "Throughput",
            "Bits per second of IPv6 and IPv4 packets in each direction, summed over the "
            "workers: inbound (decapsulated from the tunnel, after the coordinator's checks), "
            "to_services (translated to IPv4), from_services (the services' replies), "
            "outbound (encapsulated to the tunnel peer). sixgate_bytes_total x 8.",
            [target(f"sum by (instance, direction) ({rate('sixgate_bytes_total')}) * 8",
                    "{{instance}} {{direction}}")],
            "bps"),
        timeseries(
            "Packets by direction and protocol",
            "Packets per second per direction and protocol (tcp, udp, icmp, other), summed "
            "over the workers (sixgate_packets_total).",
            [target(f"sum by (instance, direction, protocol) ({rate('sixgate_packets_total')})",
                    "{{instance}} {{direction}} {{protocol}}")],
            "pps"),
        timeseries(
            "Drops by reason",
            "Packets dropped per second, by DropReason (workers/engine/drops.py), summed over the "
            "coordinator and the workers (sixgate_drops_total), each packet under exactly one "
            "reason; internal_error must stay 0.",
            [target(f"sum by (instance, reason) ({rate('sixgate_drops_total')})",
                    "{{instance}} {{reason}}")],
            "pps", drawStyle="bars", stacking={"mode": "normal", "group": "A"}),
        timeseries(
            "Active flows by protocol",
            "Live bindings (RFC 6146 sessions) per protocol, summed over the workers "
            "(sixgate_flows_active).",
            [target(f"sum by (instance, protocol) ({sel('sixgate_flows_active')})",
                    "{{instance}} {{protocol}}")],
            "short"),
        timeseries(
            "Packet processing latency",
            "p50/p90/p99 of the engine's time per packet, by direction (inbound: from the "
            "tunnel, from_services: the services' replies), over all workers. One packet in 16 "
            "is timed (sixgate_packet_processing_seconds); queueing time is not included.",
            quantile_targets("sixgate_packet_processing_seconds", "instance, direction",
                             "{{instance}} {{direction}}"),
            "s"),
        timeseries(
            "Tunnel packets received",
            "Protocol-41 packets per second the coordinator read from its raw socket, before "
            "any check (sixgate_tunnel_received_packets_total): the gateway's offered load.",
            [target(f"sum by (instance) ({rate('sixgate_tunnel_received_packets_total')})",
                    "{{instance}}")],
            "pps"),
        timeseries(
            "Traffic per tunnel",
            "Bits per second each tunnel received from its peers and sent to them, outer "
            "header included (sixgate_tunnel_bytes_total{tunnel,direction}): with several "
            "tunnels ([[tunnel]]), which broker or 6to4 carries the load.",
            [target(f"sum by (instance, tunnel, direction) "
                    f"({rate('sixgate_tunnel_bytes_total')}) * 8",
                    "{{instance}} {{tunnel}} {{direction}}")],
            "bps"),
        up_down(
            "Cluster: announced",
            "[cluster]: 1 while the node's BGP speaker announces the prefix (ready; or "
            "draining, then with the GRACEFUL_SHUTDOWN community), 0 while it is withdrawn "
            "(sixgate_cluster_announced): which nodes the routers spread the traffic over.",
            [target("max by (instance, prefix) (sixgate_cluster_announced"
                    "{instance=~\"$instance\"})", "{{instance}} {{prefix}}")]),
    ]


def limits() -> list[Panel]:
    return [
        dashed(timeseries(
            "Flow table fill per worker",
            "Live bindings of each worker (sixgate_flows_active, tcp + udp) against its share "
            "of max_flows (sixgate_flow_limit, dashed). At the limit new flows are dropped as "
            "flow_limit.",
            [target(f"sum by (instance, process) ({sel('sixgate_flows_active')})",
                    "{{instance}} {{process}} active"),
             target(f"max by (instance, process) ({sel('sixgate_flow_limit')})",
                    "{{instance}} {{process}} limit")],
            "short"), ".* limit$"),
        with_threshold(timeseries(
            "Flow table fill ratio",
            "sixgate_flows_active / sixgate_flow_limit per worker. The alert "
            "SixgateFlowTableNearlyFull fires above 0.9 (red line) for 5 minutes.",
            [target(f"sum by (instance, process) ({sel('sixgate_flows_active')}) "
                    f"/ on (instance, process) "
                    f"(max by (instance, process) ({sel('sixgate_flow_limit')}) > 0)",
                    "{{instance}} {{process}}")],
            "percentunit"), 0.9, 1),
        dashed(timeseries(
            "Pool addresses in use",
            "IPv4 pool addresses of each worker in use by a client "
            "(sixgate_pool_addresses_in_use) against the addresses it owns "
            "(sixgate_pool_addresses, dashed). When all are in use, new clients are dropped "
            "as pool_exhausted.",
            [target(f"sum by (instance, process) ({sel('sixgate_pool_addresses_in_use')})",
                    "{{instance}} {{process}} in use"),
             target(f"sum by (instance, process) ({sel('sixgate_pool_addresses')})",
                    "{{instance}} {{process}} size")],
            "short"), ".* size$"),
        dashed(timeseries(
            "NAT64 pool4 ports in use",
            "NAT64 bindings: pool4 ports (ICMP identifiers for icmp) in use per protocol and "
            "pool4 address, summed over the workers (sixgate_nat64_pool4_ports_in_use), against "
            "the ports configured (sixgate_nat64_pool4_ports, dashed). When a protocol's ports "
            "run out, new bindings are dropped as pool_exhausted and answered with ICMPv6 "
            "unreachable (RFC 6888 REQ-8 holds freed ports for port_hold_s before reuse).",
            [target(f"sum by (instance, protocol, address) "
                    f"({sel('sixgate_nat64_pool4_ports_in_use')})",
                    "{{instance}} {{address}} {{protocol}} in use"),
             target(f"sum by (instance, protocol, address) ({sel('sixgate_nat64_pool4_ports')})",
                    "{{instance}} {{address}} {{protocol}} size")],
            "short"), ".* size$"),
        timeseries(
            "6in4 broker reachable",
            "6in4: 1 while the tunnel broker answers the gateway's probes of its link-local "
            "address (RFC 4213 §3.8, every [tunnel] probe_interval_s), 0 when the last one went "
            "unanswered (sixgate_tunnel_peer_reachable; the last answer's round trip is "
            "sixgate_tunnel_peer_rtt_seconds). Empty for 6to4 and NAT64.",
            [target(f"max by (instance, peer) ({sel('sixgate_tunnel_peer_reachable')})",
                    "{{instance}} {{peer}} reachable")],
            "short"),
        timeseries(
            "ZeroMQ queue drops per worker",
            "Packets per second the coordinator could not queue to a worker because its "
            "ZeroMQ high-water mark (sixgate_queue_limit_batches) was reached "
            "(sixgate_queue_drops_total). Non-zero means that worker is overloaded.",
            [target(f"sum by (instance, process) ({rate('sixgate_queue_drops_total')})",
                    "{{instance}} {{process}}")],
            "pps"),
        dashed(timeseries(
            "ICMPv6 errors and RSTs: sent vs rate-limited",
            "ICMPv6 errors sent by type (sixgate_icmp_errors_sent_total), TCP RSTs sent "
            "(sixgate_tcp_resets_sent_total) and those suppressed by the RFC 4443 §2.4(f) rate "
            "limiter (sixgate_icmp_errors_suppressed_total), summed over the processes. Dashed: "
            "the configured icmp_errors_per_s (sixgate_icmp_error_rate_limit_per_second).",
            [target(f"sum by (instance, type) ({rate('sixgate_icmp_errors_sent_total')})",
                    "{{instance}} sent {{type}}"),
             target(f"sum by (instance) ({rate('sixgate_tcp_resets_sent_total')})",
                    "{{instance}} sent tcp_reset"),
             target(f"sum by (instance) ({rate('sixgate_icmp_errors_suppressed_total')})",
                    "{{instance}} suppressed"),
             target(f"max by (instance) ({sel('sixgate_icmp_error_rate_limit_per_second')})",
                    "{{instance}} configured limit")],
            "pps"), ".* configured limit$"),
        timeseries(
            "Coordinator batch size",
            "p50/p90/p99 of the packets per ZeroMQ batch the coordinator sends to a worker "
            "(sixgate_coordinator_batch_packets). Batches grow with load; a p99 at the largest "
            "bucket (256) means the coordinator is saturated.",
            quantile_targets("sixgate_coordinator_batch_packets", "instance", "{{instance}}"),
            "short"),
        timeseries(
            "Worker restarts",
            "Worker processes restarted by the coordinator after a crash or a missed "
            "heartbeat (increase of sixgate_worker_restarts_total). The alert "
            "SixgateWorkerRestarting fires on any restart in 15 minutes.",
            [target(f"sum by (instance, process) (increase("
                    f"{sel('sixgate_worker_restarts_total')}[$__rate_interval]))",
                    "{{instance}} {{process}}")],
            "short", drawStyle="bars"),
        up_down(
            "Workers up and gateway ready",
            "sixgate_worker_up: the worker answered the last scrape. sixgate_ready: the same "
            "as /readyz (capture socket open and every worker answering).",
            [target(f"max by (instance) ({sel('sixgate_ready')})", "{{instance}} ready"),
             target(f"max by (instance, process) ({sel('sixgate_worker_up')})",
                    "{{instance}} {{process}}")]),
        timeseries(
            "CPU per process",
            "CPU seconds per second (1 = one core busy) of the coordinator and each worker, "
            "user + system, from /proc/PID/stat (sixgate_cpu_seconds_total). A worker near 1 "
            "is at its limit: CPython runs one core per process.",
            [target(f"sum by (instance, process) ({rate('sixgate_cpu_seconds_total')})",
                    "{{instance}} {{process}}")],
            "short"),
        timeseries(
            "Resident memory per process",
            "Resident set size of the coordinator and each worker, from /proc/PID/statm "
            "(sixgate_resident_memory_bytes). Flow tables and queues are bounded, so steady "
            "growth means a leak.",
            [target(f"max by (instance, process) ({sel('sixgate_resident_memory_bytes')})",
                    "{{instance}} {{process}}")],
            "bytes"),
    ]


def variables() -> list[dict[str, Any]]:
    instances = "label_values(sixgate_build_info, instance)"
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {"text": PROVISIONED_NAME, "value": PROVISIONED_UID},
         "hide": 0, "includeAll": False, "multi": False,
         "options": [], "refresh": 1, "regex": ""},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DATASOURCE,
         "definition": instances,
         "query": {"qryType": 3, "query": instances,
                   "refId": "PrometheusVariableQueryEditor-VariableQuery"},
         "current": {}, "hide": 0, "includeAll": True, "allValue": ".+", "multi": True,
         "options": [], "refresh": 2, "regex": "", "sort": 1},
    ]


def lay_out(rows: list[tuple[str, list[Panel]]]) -> list[Panel]:
    """Rows and their panels in Grafana's flat list, with ids, refIds and grid positions."""
    laid: list[Panel] = []
    y = 0
    for title, panels in rows:
        laid.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                     "datasource": DATASOURCE,
                     "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for index, panel in enumerate(panels):
            column = index % (24 // PANEL_WIDTH)
            if index and column == 0:
                y += PANEL_HEIGHT
            panel["gridPos"] = {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": column * PANEL_WIDTH,
                                "y": y}
            for number, query in enumerate(panel["targets"]):
                query["refId"] = chr(ord("A") + number)
            laid.append(panel)
        y += PANEL_HEIGHT
    for panel_id, panel in enumerate(laid, start=1):
        panel["id"] = panel_id
    return laid


def dashboard() -> dict[str, Any]:
    return {
        "uid": "sixgate",
        "title": "sixgate",
        "description": "sixgate IPv6-in-IPv4 gateway: traffic, drops, latency and limits "
                       "(Prometheus job sixgate).",
        "tags": ["sixgate", "ipv6"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "refresh": "30s",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "type": "dashboard", "name": "Annotations & Alerts", "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        }]},
        "templating": {"list": variables()},
        "panels": lay_out([("Overview", overview()), ("Limits", limits())]),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT,
                        help=f"where to write the dashboard (default: {OUTPUT})")
    args = parser.parse_args(argv)
    args.output.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
