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
