"""Per-process packet, byte and drop counters in one exportable structure.

Directions are the four words of STYLE.md: ``inbound`` (from the tunnel), ``to_services``,
``from_services``, ``outbound`` (to the tunnel). Every drop reason exists from the start with
value 0, so rates work in any exporter. Pure: no I/O.
"""

from __future__ import annotations

from workers.drops import DropReason
from workers.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

DIRECTIONS = ("inbound", "to_services", "from_services", "outbound")
PROTO_LABELS = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMPV6: "icmp", PROTO_ICMP: "icmp"}
PROTOCOLS = ("tcp", "udp", "icmp", "other")


class Counters:
    __slots__ = ("drops", "packets", "bytes", "events")

    def __init__(self) -> None:
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.packets: dict[tuple[str, str], int] = {
            (d, p): 0 for d in DIRECTIONS for p in PROTOCOLS}
        self.bytes: dict[tuple[str, str], int] = dict.fromkeys(self.packets, 0)
        # Named events that are not drops: ICMP errors sent, RSTs sent, flows created, ...
        self.events: dict[str, int] = {}

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] += n

    def count(self, direction: str, proto: int, size: int) -> None:
        key = (direction, PROTO_LABELS.get(proto, "other"))
        self.packets[key] += 1
        self.bytes[key] += size

    def event(self, name: str, n: int = 1) -> None:
        self.events[name] = self.events.get(name, 0) + n

    def as_dict(self) -> dict[str, object]:
        return {
            "drops": {r.value: n for r, n in self.drops.items()},
            "packets": {f"{d}/{p}": n for (d, p), n in self.packets.items()},
            "bytes": {f"{d}/{p}": n for (d, p), n in self.bytes.items()},
            "events": dict(self.events),
        }


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
