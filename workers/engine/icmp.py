"""Packets the gateway originates itself: ICMPv6 echo replies, ICMPv6 errors, TCP resets.

Implements RFC 4443 §2.4 (error rules and rate limit), §3 (error messages), §4.2 (echo reply),
RFC 9293 §3.10.7.1 (reset generation for a segment to a closed port). Pure: ``now`` is passed
in, no I/O.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from sixgate.workers.engine.packet import (
    PROTO_ICMPV6,
    PROTO_TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    build_ipv4,
    build_ipv6,
    pseudo_sum_v4,
    pseudo_sum_v6,
    set_checksum,
)

# ICMPv4 (RFC 792) types and the codes sixgate names: what services send and what it answers.
ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
ICMP_PROTOCOL_UNREACHABLE = 2  # code of type 3
ICMP_PORT_UNREACHABLE = 3  # code of type 3
ICMP_FRAGMENTATION_NEEDED = 4  # code of type 3 (RFC 1191)
ICMP_POINTER_INDICATES_ERROR = 0  # code of type 12

ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAMETER_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_NEIGHBOR_SOLICITATION = 135
ICMPV6_NEIGHBOR_ADVERTISEMENT = 136
ND_HOP_LIMIT = 255
NA_SOLICITED_OVERRIDE = 0x60000000

UNREACH_NO_ROUTE = 0
UNREACH_ADMIN_PROHIBITED = 1
UNREACH_ADDRESS = 3
UNREACH_PORT = 4
TIME_EXCEEDED_HOP_LIMIT = 0
TIME_EXCEEDED_REASSEMBLY = 1

# RFC 4443 §2.4(c): an error message must not exceed the minimum IPv6 MTU, so it quotes at most
# this much of the invoking packet.
MIN_MTU = 1280
QUOTED_BYTES = MIN_MTU - 40 - 8

ICMP_HEADER = struct.Struct("!BBHI")
TCP_HEADER = struct.Struct("!HHIIBBHHH")


def build_icmpv6(src: bytes, dst: bytes, icmp_type: int, code: int, rest: int,
                 body: bytes | memoryview, hop_limit: int = 64) -> bytes:
    """A whole IPv6 packet carrying one ICMPv6 message with a correct checksum."""
    message = bytearray(ICMP_HEADER.pack(icmp_type, code, 0, rest))
    message += body
    set_checksum(message, 2, pseudo_sum_v6(src, dst, PROTO_ICMPV6, len(message)))
    return build_ipv6(src, dst, PROTO_ICMPV6, message, hop_limit=hop_limit)


def echo_reply(request: bytes | memoryview, upper_offset: int) -> bytes:
    """Answer an echo request addressed to us (RFC 4443 §4.2): identifier, sequence and data
    are returned unmodified, sourced from the address the request was sent to."""
    src = bytes(request[24:40])
    dst = bytes(request[8:24])
    message = bytearray(request[upper_offset:])
    message[0] = ICMPV6_ECHO_REPLY
    message[1] = 0
    set_checksum(message, 2, pseudo_sum_v6(src, dst, PROTO_ICMPV6, len(message)))
    return build_ipv6(src, dst, PROTO_ICMPV6, message)


def neighbor_advertisement(solicitation: bytes | memoryview, upper_offset: int) -> bytes:
    """Answer a unicast Neighbor Solicitation (a 6in4 peer's NUD probe, RFC 4213 §3.8) with a
    solicited Neighbor Advertisement (RFC 4861 §7.2.4): from the target address, hop limit
    255, S and O set, no link-layer option (RFC 4213 §3.8: a tunnel has no link layer)."""
    target = bytes(solicitation[upper_offset + 8:upper_offset + 24])
    return build_icmpv6(target, bytes(solicitation[8:24]), ICMPV6_NEIGHBOR_ADVERTISEMENT, 0,
                        NA_SOLICITED_OVERRIDE, target, hop_limit=ND_HOP_LIMIT)


def may_send_error(invoking: bytes | memoryview, upper_proto: int, upper_offset: int,
                   to_multicast: bool = False) -> bool:
    """RFC 4443 §2.4(e): never answer an error, a multicast destination (unless
    ``to_multicast``: the §2.4(e.3) exception for an option whose type bits are 10) or an
    unspecified or multicast source with an error."""
    if (invoking[24] == 0xFF and not to_multicast) or invoking[8] == 0xFF:
        return False
    if bytes(invoking[8:24]) == bytes(16):
        return False
    # RFC 4443 §2.4(e.1): no error about an error (types 0-127) or a redirect (137).
    if upper_proto == PROTO_ICMPV6 and len(invoking) > upper_offset:
        kind = invoking[upper_offset]
        if kind < 128 or kind == 137:
            return False
    return True


def icmpv6_error(our_addr: bytes, invoking: bytes | memoryview, icmp_type: int, code: int,
                 rest: int = 0) -> bytes:
    """An ICMPv6 error about ``invoking`` sent back to its source (RFC 4443 §3), holding as much
    of the invoking packet as fits in 1280 bytes (RFC 4443 §2.4(c))."""
    body = bytes(invoking[:QUOTED_BYTES])
    return build_icmpv6(our_addr, bytes(invoking[8:24]), icmp_type, code, rest, body)


def _tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
                 flags: int) -> bytes:
    """A bare TCP segment (no options, no data, window 0) in its IPv4 or IPv6 packet, by the
    address length, checksums right."""
    segment = bytearray(TCP_HEADER.pack(sport, dport, seq, ack, 5 << 4, flags, 0, 0, 0))
    if len(src) == 4:
        set_checksum(segment, 16, pseudo_sum_v4(src, dst, PROTO_TCP, len(segment)))
        return build_ipv4(src, dst, PROTO_TCP, segment)
    set_checksum(segment, 16, pseudo_sum_v6(src, dst, PROTO_TCP, len(segment)))
    return build_ipv6(src, dst, PROTO_TCP, segment)


def _reset_answering(invoking: bytes | memoryview, upper_offset: int, src: bytes,
                     dst: bytes) -> bytes | None:
    """The RST that answers a segment for which no connection exists (RFC 9293 §3.10.7.1),
    from ``src`` (the segment's destination) to ``dst`` (its source).

    If the segment had ACK set the reset takes its sequence number from SEG.ACK; otherwise
    SEQ=0 and ACK=SEG.SEQ+SEG.LEN with RST,ACK. A RST is never answered (RFC 9293 §3.10.7.1).
    """
    if len(invoking) < upper_offset + 20:
        return None
    sport, dport, seq, ack, data_off, flags, _win, _csum, _urg = TCP_HEADER.unpack_from(
        invoking, upper_offset)
    if flags & TCP_RST:
        return None
    seg_len = len(invoking) - upper_offset - (data_off >> 4) * 4
    seg_len += (1 if flags & TCP_SYN else 0) + (1 if flags & TCP_FIN else 0)
    if flags & TCP_ACK:
        return _tcp_segment(src, dst, dport, sport, ack, 0, TCP_RST)
    return _tcp_segment(src, dst, dport, sport, 0, (seq + seg_len) & 0xFFFFFFFF,
                        TCP_RST | TCP_ACK)


def tcp_reset(invoking: bytes | memoryview, upper_offset: int) -> bytes | None:
    """``_reset_answering`` an IPv6 segment (a client's that meets no session)."""
    return _reset_answering(invoking, upper_offset, bytes(invoking[24:40]),
                            bytes(invoking[8:24]))


def tcp_reset_v4(invoking: bytes | memoryview, header_len: int) -> bytes | None:
    """``_reset_answering`` an IPv4 segment (a service's that meets no session)."""
    return _reset_answering(invoking, header_len, bytes(invoking[16:20]),
                            bytes(invoking[12:16]))


def tcp_probe(src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """An ACK with sequence and acknowledgment 0 from (src, sport) to (dst, dport), IPv4 or
    IPv6 by the address length. Out of the receiver's window, it makes the receiver answer
    with an ACK carrying its own sequence numbers (RFC 9293 §3.10.7.4, RFC 5961 §4); that
    answer meets no session here and is reset exactly (``tcp_reset``): how a connection whose
    session ended is closed on both sides without knowing its sequence numbers."""
    return _tcp_segment(src, dst, sport, dport, 0, 0, TCP_ACK)


class TokenBucket:
    """RFC 4443 §2.4(f) token bucket: ``burst`` messages at once, ``rate_per_s`` refill."""

    __slots__ = ("rate_per_s", "burst", "tokens", "last")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.last: float | None = None

    def allow(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate_per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SourceRateLimiter:
    """RFC 4443 §2.4(f) for a gateway many sources share: one token bucket for everything we
    originate and one per source /64, so one source draining its bucket cannot silence the
    RSTs and errors every other client is owed. The per-source table is bounded: a new
    source past ``max_sources`` pushes out the longest-known one (the global bucket still
    bounds the total)."""

    __slots__ = ("overall", "rate_per_s", "burst", "max_sources", "_sources")

    def __init__(self, rate_per_s: float, burst: float, per_source_share: float = 0.1,
                 max_sources: int = 4096) -> None:
        self.overall = TokenBucket(rate_per_s, burst)
        self.rate_per_s = rate_per_s * per_source_share
        self.burst = max(1.0, burst * per_source_share)
        self.max_sources = max_sources
        # Oldest first; an OrderedDict takes the oldest in O(1) (a dict scans its holes).
        self._sources: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def allow(self, source: bytes | memoryview, now: float) -> bool:
        key = bytes(source[:8])
        bucket = self._sources.get(key)
        if bucket is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
            bucket = self._sources[key] = TokenBucket(self.rate_per_s, self.burst)
        return bucket.allow(now) and self.overall.allow(now)
