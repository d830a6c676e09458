"""IPv6 fragmentation and bounded reassembly.

Implements RFC 8200 §4.5 (Fragment header, 60 s reassembly timeout), RFC 5722 (overlapping
fragments drop the whole datagram), RFC 6146 §3.4 (bounded fragment memory) and the sending
side of RFC 7915 §4 (a translated packet larger than the tunnel MTU leaves as fragments).
Pure: ``now`` is passed in; no I/O.
"""

from __future__ import annotations

from workers.drops import DropReason
from workers.packet import FRAGMENT_HEADER, PROTO_FRAGMENT, build_ipv6

# RFC 8200 §4.5: reassembly is abandoned 60 s after the first fragment arrived.
REASSEMBLY_TIMEOUT_S = 60.0
# RFC 8200 §4.5: the reassembled payload cannot exceed the 16-bit payload length.
MAX_REASSEMBLED_PAYLOAD = 65535


def fragment_ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes,
                  mtu: int, ident: int, *, hop_limit: int = 64,
                  traffic_class: int = 0) -> list[bytes]:
    """Split one IPv6 packet into fragments that each fit ``mtu`` (RFC 8200 §4.5).

    Returns the unfragmented packet when it fits: RFC 7915 §4 says a Fragment header MUST NOT be
    added to a packet that does not need it.
    """
    if 40 + len(payload) <= mtu:
        return [build_ipv6(src, dst, next_header, payload, hop_limit=hop_limit,
                           traffic_class=traffic_class)]
    # Each fragment's data is a multiple of 8 bytes, except the last (RFC 8200 §4.5).
    chunk = (mtu - 40 - 8) & ~7
    out = []
    for offset in range(0, len(payload), chunk):
        data = payload[offset:offset + chunk]
        more = 1 if offset + chunk < len(payload) else 0
        header = FRAGMENT_HEADER.pack(next_header, 0, offset | more, ident)
        out.append(build_ipv6(src, dst, PROTO_FRAGMENT, header + data, hop_limit=hop_limit,
                              traffic_class=traffic_class))
    return out


class _Datagram:
    __slots__ = ("first_seen", "parts", "size", "total", "head", "next_header")

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.parts: dict[int, bytes] = {}
        self.size = 0
        self.total: int | None = None
        self.head: bytes | None = None  # IPv6 header + unfragmentable part, from offset 0
        self.next_header = 0


class Reassembler:
    """Collects IPv6 fragments per (source, destination, identification) within bounds."""

    def __init__(self, max_datagrams: int = 1024, max_bytes: int = 16 << 20,
                 timeout_s: float = REASSEMBLY_TIMEOUT_S) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.bytes_held = 0
        self._pending: dict[tuple[bytes, bytes, int], _Datagram] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, packet: bytes | memoryview, frag_offset: int, more: bool, ident: int,
            frag_header_offset: int, nh_offset: int,
            now: float) -> bytes | DropReason | None:
        """Add one fragment; returns the whole packet, a drop reason, or None (waiting).

        ``frag_offset``/``more``/``ident``/offsets come from ``parse_ipv6``'s fragment info.
        """
        src = bytes(packet[8:24])
        dst = bytes(packet[24:40])
        key = (src, dst, ident)
        data = bytes(packet[frag_header_offset + 8:])
        # RFC 8200 §4.5: every fragment but the last carries a multiple of 8 bytes.
        if more and len(data) % 8:
            self._forget(key)
            return DropReason.BAD_FRAGMENT
        end = frag_offset + len(data)
        if end > MAX_REASSEMBLED_PAYLOAD:
            self._forget(key)
            return DropReason.BAD_FRAGMENT
        dgram = self._pending.get(key)
        if dgram is None:
            # RFC 6146 §3.4: bound what fragments may hold; never evict on behalf of a new one.
            if (len(self._pending) >= self.max_datagrams
                    or self.bytes_held + len(data) > self.max_bytes):
                return DropReason.FRAGMENT_LIMIT
            dgram = _Datagram(now)
            self._pending[key] = dgram
        elif self.bytes_held + len(data) > self.max_bytes:
            self._forget(key)
            return DropReason.FRAGMENT_LIMIT
        # RFC 5722: overlapping fragments discard the whole datagram.
        for start, part in dgram.parts.items():
            if start < end and frag_offset < start + len(part):
                self._forget(key)
                return DropReason.BAD_FRAGMENT
        if not more:
            # RFC 8200 §4.5: the last fragment fixes the length; nothing may lie beyond it.
            if (dgram.total is not None and dgram.total != end) or any(
                    start + len(part) > end for start, part in dgram.parts.items()):
                self._forget(key)
                return DropReason.BAD_FRAGMENT
            dgram.total = end
        if dgram.total is not None and end > dgram.total:
            self._forget(key)
            return DropReason.BAD_FRAGMENT
        if frag_offset == 0:
            head = bytearray(packet[:frag_header_offset])
            dgram.next_header = packet[frag_header_offset]
            head[nh_offset] = dgram.next_header
            dgram.head = bytes(head)
        dgram.parts[frag_offset] = data
        dgram.size += len(data)
        self.bytes_held += len(data)
        if dgram.total is None or dgram.size != dgram.total or dgram.head is None:
            return None
        self._forget(key)
        payload = b"".join(dgram.parts[k] for k in sorted(dgram.parts))
        head = bytearray(dgram.head)
        payload_len = len(head) - 40 + len(payload)
        if payload_len > MAX_REASSEMBLED_PAYLOAD:
            return DropReason.BAD_FRAGMENT
        head[4:6] = payload_len.to_bytes(2, "big")
        return bytes(head) + payload

    def expire(self, now: float) -> int:
        """Forget datagrams older than the timeout; returns how many (RFC 8200 §4.5)."""
        old = [k for k, d in self._pending.items() if now - d.first_seen >= self.timeout_s]
        for key in old:
            self._forget(key)
        return len(old)

    def _forget(self, key: tuple[bytes, bytes, int]) -> None:
        dgram = self._pending.pop(key, None)
        if dgram is not None:
            self.bytes_held -= dgram.size

