"""IPv6 fragmentation and bounded reassembly.

Implements RFC 8200 §4.5 (Fragment header, 60 s reassembly timeout), RFC 5722 (overlapping
fragments drop the whole datagram), RFC 6146 §3.4 (bounded fragment memory) and the sending
side of RFC 7915 §4 (a translated packet larger than the tunnel MTU leaves as fragments).
Pure: ``now`` is passed in; no I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.icmp import QUOTED_BYTES
from sixgate.workers.engine.packet import FRAGMENT_HEADER, PROTO_FRAGMENT, build_ipv6, checksum

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


# A first fragment kept for the Time Exceeded sent when its datagram times out (RFC 8200 §4.5):
# (its bytes, quoted length at most; the upper-layer protocol after the Fragment header; where
# that header starts).
FirstFragment = tuple[bytes, int, int]


class _Datagram:
    __slots__ = ("first_seen", "starts", "parts", "size", "total", "head", "next_header",
                 "source", "first")

    def __init__(self, now: float, source: bytes) -> None:
        self.first_seen = now
        self.starts: list[int] = []  # fragment offsets, sorted; ``parts`` in the same order
        self.parts: list[bytes] = []
        self.size = 0
        self.total: int | None = None
        self.head: bytes | None = None  # IPv6 header + unfragmentable part, from offset 0
        self.next_header = 0
        self.source = source  # the source /64: whose budget it is held against
        self.first: FirstFragment | None = None


Key = tuple[bytes, bytes, int]


class Reassembler:
    """Collects IPv6 fragments per (source, destination, identification) within bounds.

    Bounds (RFC 6146 §3.4: limit what fragments may hold): datagrams and bytes in all, and per
    source /64. When a bound is reached the oldest incomplete datagram goes (of that source,
    for a source's budget), as Linux evicts the oldest fragment queues since FragmentSmack
    (CVE-2018-5391): a flood of first fragments cannot block everyone's fragmented traffic,
    and one source cannot push out others'. Each fragment thrown away is counted once: the
    one in hand by ``add``'s result, those held by ``evicted``/``discarded`` for the caller to
    take, and ``expire``'s return (timeout).
    """

    def __init__(self, max_datagrams: int = 1024, max_bytes: int = 16 << 20,
                 timeout_s: float = REASSEMBLY_TIMEOUT_S) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        # One source /64 may hold a sixteenth of the table, but always one largest datagram.
        self.max_datagrams_per_source = max(4, max_datagrams // 16)
        self.max_bytes_per_source = max(max_bytes // 16, 2 * (MAX_REASSEMBLED_PAYLOAD + 1))
        self.timeout_s = timeout_s
        self.bytes_held = 0
        # Fragments already held and thrown away since the caller last looked: to make room
        # (FRAGMENT_LIMIT) and with a bad fragment of their datagram (BAD_FRAGMENT).
        self.evicted = 0
        self.discarded = 0
        # Oldest first; an OrderedDict finds the oldest in O(1) however many went before.
        self._pending: OrderedDict[Key, _Datagram] = OrderedDict()
        self._by_source: dict[bytes, dict[Key, None]] = {}
        self._source_bytes: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, packet: bytes | memoryview, frag_offset: int, more: bool, ident: int,
            frag_header_offset: int, nh_offset: int,
            now: float) -> bytes | DropReason | None:
        """Add one fragment; returns the whole packet, a drop reason, or None (waiting).

        ``frag_offset``/``more``/``ident``/offsets come from ``parse_ipv6``'s fragment info.
        """
        src = bytes(packet[8:24])
        key = (src, bytes(packet[24:40]), ident)
        data = bytes(packet[frag_header_offset + 8:])
        # RFC 8200 §4.5: every fragment but the last carries a multiple of 8 bytes.
        if more and len(data) % 8:
            self._discard(key)
            return DropReason.BAD_FRAGMENT
        end = frag_offset + len(data)
        if end > MAX_REASSEMBLED_PAYLOAD:
            self._discard(key)
            return DropReason.BAD_FRAGMENT
        dgram = self._pending.get(key)
        if dgram is None:
            source = src[:8]
            if not self._make_room(source, len(data), None):
                return DropReason.FRAGMENT_LIMIT
            dgram = _Datagram(now, source)
            self._pending[key] = dgram
            self._by_source.setdefault(source, {})[key] = None
        elif not self._make_room(dgram.source, len(data), key):
            self._evict(key)
            return DropReason.FRAGMENT_LIMIT
        # RFC 5722: overlapping fragments discard the whole datagram. The parts are kept
        # sorted, so only the two neighbours of the new one can overlap it.
        starts, parts = dgram.starts, dgram.parts
        index = bisect_left(starts, frag_offset)
        if ((index < len(starts) and starts[index] < end)
                or (index and starts[index - 1] + len(parts[index - 1]) > frag_offset)):
            self._discard(key)
            return DropReason.BAD_FRAGMENT
        if not more:
            # RFC 8200 §4.5: the last fragment fixes the length; nothing may lie beyond it.
            if (dgram.total is not None and dgram.total != end) or (
                    starts and starts[-1] + len(parts[-1]) > end):
                self._discard(key)
                return DropReason.BAD_FRAGMENT
            dgram.total = end
        if dgram.total is not None and end > dgram.total:
            self._discard(key)
            return DropReason.BAD_FRAGMENT
        if frag_offset == 0:
            head = bytearray(packet[:frag_header_offset])
            dgram.next_header = packet[frag_header_offset]
            head[nh_offset] = dgram.next_header
            dgram.head = bytes(head)
            # What the Time Exceeded sent when this datagram times out will quote of it.
            dgram.first = (bytes(packet[:QUOTED_BYTES]), dgram.next_header,
                           frag_header_offset + 8)
        starts.insert(index, frag_offset)
        parts.insert(index, data)
        dgram.size += len(data)
        self.bytes_held += len(data)
        self._source_bytes[dgram.source] = self._source_bytes.get(dgram.source, 0) + len(data)
        if dgram.total is None or dgram.size != dgram.total or dgram.head is None:
            return None
        self._forget(key)
        payload = b"".join(parts)
        head = bytearray(dgram.head)
        payload_len = len(head) - 40 + len(payload)
        if payload_len > MAX_REASSEMBLED_PAYLOAD:
            return DropReason.BAD_FRAGMENT
        head[4:6] = payload_len.to_bytes(2, "big")
        return bytes(head) + payload

    def _make_room(self, source: bytes, size: int, keep: Key | None) -> bool:
        """Evict the oldest datagrams (other than ``keep``) until ``size`` more bytes, and a
        new datagram when ``keep`` is None, fit both the source's and the global bounds."""
        new = keep is None
        mine = self._by_source.get(source, {})
        while ((new and len(mine) >= self.max_datagrams_per_source)
               or self._source_bytes.get(source, 0) + size > self.max_bytes_per_source):
            victim = next((k for k in mine if k != keep), None)
            if victim is None:
                return False
            self._evict(victim)
            mine = self._by_source.get(source, {})
        while ((new and len(self._pending) >= self.max_datagrams)
               or self.bytes_held + size > self.max_bytes):
            victim = next((k for k in self._pending if k != keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, key: Key) -> None:
        self.evicted += self._forget(key)

    def _discard(self, key: Key) -> None:
        """RFC 5722: a bad fragment takes the fragments held with it."""
        self.discarded += self._forget(key)

    def expire(self, now: float) -> tuple[int, list[FirstFragment]]:
        """Forget datagrams older than the timeout (RFC 8200 §4.5); returns how many
        fragments they held, and the first fragments among them: RFC 8200 §4.5 says a Time
        Exceeded (code 1) goes to the source of each. Oldest first, so only the expired ones
        are looked at."""
        old = []
        firsts = []
        for key, dgram in self._pending.items():
            if now - dgram.first_seen < self.timeout_s:
                break
            old.append(key)
            if dgram.first is not None:
                firsts.append(dgram.first)
        return sum(self._forget(key) for key in old), firsts

    def _forget(self, key: Key) -> int:
        """Drop one datagram; returns how many fragments it held."""
        dgram = self._pending.pop(key, None)
        if dgram is None:
            return 0
        self.bytes_held -= dgram.size
        left = self._source_bytes.get(dgram.source, 0) - dgram.size
        mine = self._by_source.get(dgram.source)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._by_source[dgram.source]
        if left > 0:
            self._source_bytes[dgram.source] = left
        else:
            self._source_bytes.pop(dgram.source, None)
        return len(dgram.parts)


# --- outer IPv4 fragments of the tunnel (RFC 791 §3.2) ---------------------------------------
#
# The capture (workers/capture.py) reads the tunnel before the IP layer, so fragments of an
# outer IPv4 packet arrive as they came and are put together here, as the IP layer would have:
# bounded in datagrams and bytes (the oldest incomplete one goes first), 30 s to complete
# (Linux's ipfrag_time), and an overlap drops the datagram (as RFC 5722 asks of IPv6).
OUTER_REASSEMBLY_TIMEOUT_S = 30.0
IPV4_MAX_PACKET = 65535


class _OuterDatagram:
    __slots__ = ("first_seen", "pieces", "size", "total", "head")

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.pieces: dict[int, bytes] = {}  # offset in bytes -> data
        self.size = 0
        self.total: int | None = None  # payload length, known once the last piece came
        self.head: bytes | None = None  # the first piece's header


class OuterReassembler:
    """Puts outer IPv4 fragments back together (RFC 791 §3.2), within bounds.

    ``add`` takes a fragment (MF set or offset non-zero) and returns the whole packet (header
    of the first fragment, fragment fields cleared, checksum recomputed), a drop reason, or
    None while it waits. Fragments thrown away to make room are in ``evicted``."""

    def __init__(self, max_datagrams: int = 256, max_bytes: int = 4 << 20,
                 timeout_s: float = OUTER_REASSEMBLY_TIMEOUT_S) -> None:
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.bytes_held = 0
        self.evicted = 0
        self._pending: OrderedDict[tuple[bytes, int, int], _OuterDatagram] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, packet: bytes, now: float) -> bytes | DropReason | None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return DropReason.BAD_VERSION
        header_len = (packet[0] & 0x0F) * 4
        total_len = (packet[2] << 8) | packet[3]
        if header_len < 20 or total_len < header_len or total_len > len(packet):
            return DropReason.TRUNCATED
        flags_offset = (packet[6] << 8) | packet[7]
        offset = (flags_offset & 0x1FFF) * 8
        more = bool(flags_offset & 0x2000)
        data = packet[header_len:total_len]
        if (more and len(data) % 8) or not data or offset + len(data) > (
                IPV4_MAX_PACKET - header_len):
            return DropReason.BAD_FRAGMENT
        key = (packet[12:20], (packet[4] << 8) | packet[5], packet[9])
        dgram = self._pending.get(key)
        # Room first, oldest incomplete datagrams out (never the one this piece belongs to).
        while self._pending and (self.bytes_held + len(data) > self.max_bytes or (
                dgram is None and len(self._pending) >= self.max_datagrams)):
            oldest = next(iter(self._pending))
            if oldest == key:
                return DropReason.FRAGMENT_LIMIT
            self.evicted += len(self._forget(oldest).pieces)
        if dgram is None:
            dgram = self._pending[key] = _OuterDatagram(now)
        end = offset + len(data)
        for start, piece in dgram.pieces.items():
            if start < end and offset < start + len(piece):  # overlap: the whole datagram goes
                self.evicted += len(self._forget(key).pieces)
                return DropReason.BAD_FRAGMENT
        if not more:
            if dgram.total is not None or any(s + len(p) > end for s, p in dgram.pieces.items()):
                self.evicted += len(self._forget(key).pieces)
                return DropReason.BAD_FRAGMENT
            dgram.total = end
        elif dgram.total is not None and end > dgram.total:
            self.evicted += len(self._forget(key).pieces)
            return DropReason.BAD_FRAGMENT
        if offset == 0:
            dgram.head = packet[:header_len]
        dgram.pieces[offset] = data
        dgram.size += len(data)
        self.bytes_held += len(data)
        if dgram.total is None or dgram.head is None or dgram.size != dgram.total:
            return None
        self._forget(key)
        payload = b"".join(dgram.pieces[start] for start in sorted(dgram.pieces))
        head = bytearray(dgram.head)
        length = len(head) + len(payload)
        head[2:4] = length.to_bytes(2, "big")
        head[6:8] = bytes((head[6] & 0x40, 0))  # DF kept, MF and offset cleared
        head[10:12] = b"\0\0"
        head[10:12] = checksum(head).to_bytes(2, "big")
        return bytes(head) + payload

    def expire(self, now: float) -> int:
        """Forget datagrams older than the timeout; returns how many fragments they held."""
        old = [key for key, dgram in self._pending.items()
               if now - dgram.first_seen >= self.timeout_s]
        return sum(len(self._forget(key).pieces) for key in old)

    def _forget(self, key: tuple[bytes, int, int]) -> _OuterDatagram:
        dgram = self._pending.pop(key)
        self.bytes_held -= dgram.size
        return dgram
