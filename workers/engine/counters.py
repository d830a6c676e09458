"""Per-process packet, byte and drop counters in one exportable structure.

Directions are the four words of STYLE.md: ``inbound`` (from the tunnel), ``to_services``,
``from_services``, ``outbound`` (to the tunnel). Every drop reason exists from the start with
value 0, so rates work in any exporter. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from sixgate.workers.engine.tunnel import peer_tunnels

if TYPE_CHECKING:
    from sixgate.workers.engine.settings import TunnelEntry

DIRECTIONS = ("inbound", "to_services", "from_services", "outbound")
PROTO_LABELS = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmp", PROTO_ICMP: "icmp"}
PROTOCOLS = ("tcp", "udp", "icmp", "other")


class Counters:
    __slots__ = ("drops", "packets", "bytes", "events", "tunnels")

    def __init__(self) -> None:
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.packets: dict[tuple[str, str], int] = {
            (d, p): 0 for d in DIRECTIONS for p in PROTOCOLS}
        self.bytes: dict[tuple[str, str], int] = dict.fromkeys(self.packets, 0)
        # Events (workers/engine/drops.py Event) by value: ICMP errors sent, RSTs sent, flows
        # created.
        self.events: dict[str, int] = {}
        # Per tunnel (its name): [packets received, bytes, packets sent, bytes], outer IPv4
        # header included (``TunnelTraffic``).
        self.tunnels: dict[str, list[int]] = {}

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] += n

    def count(self, direction: str, proto: int, size: int) -> None:
        key = (direction, PROTO_LABELS.get(proto, "other"))
        self.packets[key] += 1
        self.bytes[key] += size

    def count_pair(self, first: tuple[str, str], first_size: int, second: tuple[str, str],
                   second_size: int, n: int = 1) -> None:
        """``n`` packets in and their translations out, by precomputed keys (the fast path);
        the sizes are their totals."""
        packets, octets = self.packets, self.bytes
        packets[first] += n
        octets[first] += first_size
        packets[second] += n
        octets[second] += second_size

    def event(self, event: Event, n: int = 1) -> None:
        # The member's value by its sunder name: ``.value`` is a property call (per new session).
        key = event._value_
        self.events[key] = self.events.get(key, 0) + n

    def as_dict(self) -> dict[str, object]:
        return {
            "drops": {r.value: n for r, n in self.drops.items()},
            "packets": {f"{d}/{p}": n for (d, p), n in self.packets.items()},
            "bytes": {f"{d}/{p}": n for (d, p), n in self.bytes.items()},
            "events": dict(self.events),
            "tunnels": {name: list(row) for name, row in self.tunnels.items()},
        }


OUTER_HEADER = 20  # the IPv4 header the kernel puts before a sent packet (not in the payload)


class TunnelTraffic:
    """Packets and bytes per tunnel, counted where they are received and sent (the I/O
    shells), told apart by the peer's IPv4 address as the engine tells them apart
    (tunnel.TunnelTable): a 6in4 tunnel's broker, else the one 6to4/6rd tunnel, else the first.
    With one tunnel nothing is looked up per packet."""

    __slots__ = ("rows", "by_peer", "default")

    def __init__(self, counters: Counters, tunnels: Sequence[TunnelEntry]) -> None:
        rows = [counters.tunnels.setdefault(t.name, [0, 0, 0, 0]) for t in tunnels]
        self.rows = counters.tunnels
        by_broker, other = peer_tunnels([
            (t.mode, ipaddress.IPv4Address(t.remote_ipv4).packed if t.remote_ipv4 else None)
            for t in tunnels])
        self.by_peer = ({broker: rows[i] for broker, i in by_broker.items()}
                        if len(rows) > 1 else {})
        self.default = rows[other] if rows else [0, 0, 0, 0]

    @property
    def one_row(self) -> bool:
        """Whether every packet counts in the one row (nothing to tell apart by peer): then
        totals are enough (``received_totals``, ``sent_totals``)."""
        return not self.by_peer

    def received_totals(self, count: int, total_bytes: int) -> None:
        """``count`` protocol-41 packets of ``total_bytes`` received (``one_row`` only)."""
        row = self.default
        row[0] += count
        row[1] += total_bytes

    def sent_totals(self, count: int, payload_bytes: int) -> None:
        """``count`` packets with ``payload_bytes`` of IPv6 sent (``one_row`` only)."""
        row = self.default
        row[2] += count
        row[3] += payload_bytes + OUTER_HEADER * count

    def received(self, packets: list[bytes], total_bytes: int) -> None:
        """Protocol-41 packets as captured (outer header first), ``total_bytes`` in all: by
        their source."""
        if not self.by_peer:
            self.received_totals(len(packets), total_bytes)
            return
        by_peer, default = self.by_peer, self.default
        for packet in packets:
            row = by_peer.get(packet[12:16], default)
            row[0] += 1
            row[1] += len(packet)

    def sent(self, packets: list[tuple[bytes, bytes]], payload_bytes: int) -> None:
        """(IPv6 packet, IPv4 destination) pairs sent, their payloads ``payload_bytes`` in all:
        by their destination."""
        if not self.by_peer:
            self.sent_totals(len(packets), payload_bytes)
            return
        by_peer, default = self.by_peer, self.default
        for payload, dst in packets:
            row = by_peer.get(dst, default)
            row[2] += 1
            row[3] += len(payload) + OUTER_HEADER


class LimitHits:
    """Limit hits (flow table, per /64, pool) to report to the operator at most once per
    interval (RFC 6888 REQ-11: SHOULD notify management), so a flood cannot flood the log."""

    __slots__ = ("counts", "interval_s", "_last")

    def __init__(self, interval_s: float = 60.0) -> None:
        self.counts: dict[DropReason, int] = {}
        self.interval_s = interval_s
        self._last: float | None = None

    def hit(self, reason: DropReason) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def report_due(self, now: float) -> str | None:
        """The text to log now (and forget), or None when nothing is due."""
        if not self.counts or (self._last is not None and now - self._last < self.interval_s):
            return None
        self._last = now
        text = ", ".join(f"{r.value} x{n}" for r, n in sorted(self.counts.items(),
                                                               key=lambda kv: kv[0].value))
        self.counts.clear()
        return text


class Histogram:
    """Fixed-bucket histogram (Prometheus ``le`` semantics: a value lands in the first bucket
    whose upper bound is >= it; the last, implicit bucket is +Inf). Plain data, so a worker can
    send it to the coordinator, which exports it."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def observe_many(self, value: float, n: int) -> None:
        """``n`` observations of ``value`` (a batch's mean per packet)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def as_dict(self) -> dict[str, object]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total,
                "count": self.count}


# Per-packet engine time: the buckets span what a CPython datapath spends on one packet
# (microseconds to tens of them); the top ones catch garbage-collection pauses and a fragment
# reassembly.
PROCESSING_SECONDS_BOUNDS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.05)
# Packets per coordinator->worker ZeroMQ message; at most batch_packets (default 64).
BATCH_PACKETS_BOUNDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


def worker_stats(counters: Counters, active_by_proto: dict[int, int],
                 created_by_proto: dict[int, int], expired: int, limit: int, pool_in_use: int,
                 pool_size: int, processing: dict[str, Histogram],
                 pool4: list[dict[str, object]] | None = None) -> dict[str, object]:
    """What a worker answers to the ``stats`` control request: plain JSON data, the same for
    the userspace datapath and the kernel backend's relays (coordinator/metrics.py exports it).
    ``pool4``: a NAT64 worker's pool4 rows (address, protocol, ports, in use)."""
    def by_name(table: dict[int, int]) -> dict[str, int]:
        return {"tcp": table.get(PROTO_TCP, 0), "udp": table.get(PROTO_UDP, 0),
                "icmp": table.get(PROTO_ICMP, 0)}

    return {
        "counters": counters.as_dict(),
        "flows": {"active": by_name(active_by_proto), "created": by_name(created_by_proto),
                  "expired": expired, "limit": limit, "pool_in_use": pool_in_use,
                  "pool_size": pool_size},
        "processing_seconds": {d: h.as_dict() for d, h in processing.items()},
        "pool4": pool4 or [],
    }
