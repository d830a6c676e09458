"""RFC 7915 header translation between IPv6 clients and IPv4 services, with session mapping.

- ``translate_v6_to_v4``: §5.1 (IPv6 -> IPv4 header), §5.5 (transport checksums), with the
  addresses and ports of an RFC 6146 session.
- ``translate_v4_to_v6``: §4.1 (IPv4 -> IPv6 header), §4.5.
- ``translate_icmpv4_error``: §4.2 (ICMPv4 error -> ICMPv6 error) and §4.3 (the embedded packet
  is translated like a normal one, TTL not decremented).
- ``clamp_mss``: the MSS option of a SYN is lowered to fit the tunnel (both directions), so
  neither side ever sends a segment the 6in4/6to4 tunnel cannot carry.

Checksums of the transport header are updated by difference (RFC 1624) where the input sum is
known to be valid, otherwise recomputed. Pure: no I/O.
"""

from __future__ import annotations

import struct

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import Session
from sixgate.workers.engine.icmp import (
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REQUEST,
    ICMP_FRAGMENTATION_NEEDED,
    ICMP_PARAMETER_PROBLEM,
    ICMP_POINTER_INDICATES_ERROR,
    ICMP_PROTOCOL_UNREACHABLE,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAMETER_PROBLEM,
    ICMPV6_TIME_EXCEEDED,
    MIN_MTU,
    build_icmpv6,
)
from sixgate.workers.engine.packet import (
    IPV4_DF,
    PORTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_SYN,
    U16,
    build_ipv4,
    build_ipv6,
    fold,
    fold_udp,
    pseudo_sum_v4,
    pseudo_sum_v6,
    set_checksum,
    sum16,
)

# RFC 7915 §5.1: IPv4 packets up to 1260 bytes leave with DF clear, larger ones with DF set.
DF_THRESHOLD = 1260


def hop_limit_after(hop_limit: int) -> int:
    """RFC 7915 §4.1, §5.1: a translator forwards like a router, so a packet leaves with the
    TTL / hop limit it came with minus one; 0 means it expires here and is not forwarded (RFC
    4443 §3.3 Time Exceeded toward an IPv6 source, RFC 7915 §4.1 silently toward IPv4). The
    one statement of the rule: the per-session fast path (fastpath.py) restates it inline and is
    proven equal to the full path (tests/property/test_fast_path.py)."""
    return hop_limit - 1

MSS_OPTION = struct.Struct("!BBH")


def clamp_mss(segment: bytearray, max_mss: int) -> int:
    """Lower the MSS option of a SYN to ``max_mss``; returns the checksum delta (new - old)."""
    if len(segment) < 20 or not segment[13] & TCP_SYN:
        return 0
    end = min((segment[12] >> 4) * 4, len(segment))
    offset = 20
    while offset < end:
        kind = segment[offset]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation
            offset += 1
            continue
        if offset + 1 >= end:
            break
        length = segment[offset + 1]
        if length < 2 or offset + length > end:
            break
        if kind == 2 and length == 4:
            mss = (segment[offset + 2] << 8) | segment[offset + 3]
            if mss > max_mss:
                U16.pack_into(segment, offset + 2, max_mss)
                return max_mss - mss
            return 0
        offset += length
    return 0


def translate_v6_to_v4(packet: bytes | memoryview, upper_offset: int, proto: int,
                       segment_sum: int, session: Session, hop_limit: int, ident: int,
                       max_mss: int, fragmented: bool = False) -> bytes:
    """Translate a verified inbound TCP/UDP IPv6 packet into the IPv4 packet for the service.

    ``segment_sum`` is ``sum16`` of the transport segment as received (checksum included),
    already verified against the IPv6 pseudo-header; the new checksum follows by difference.
    ``hop_limit`` is the already decremented value (``hop_limit_after``); ``fragmented``: it
    came in IPv6 fragments, so it may be fragmented again (DF clear, RFC 7915 §5.1.1).
    """
    segment = bytearray(packet[upper_offset:])
    old_sport, old_dport = PORTS.unpack_from(segment)
    csum_offset = 16 if proto == PROTO_TCP else 6
    old_csum = (segment[csum_offset] << 8) | segment[csum_offset + 1]
    # The source port becomes the pool port, the destination port the target's.
    PORTS.pack_into(segment, 0, session.pport, session.tport)
    delta = session.pport + session.tport - old_sport - old_dport
    if proto == PROTO_TCP:
        delta += clamp_mss(segment, max_mss)
    length = len(segment)
    # RFC 1624 eqn 3 in sum form: the segment's words without the old checksum, plus the
    # rewritten words, over the IPv4 pseudo-header.
    total = (segment_sum - old_csum + delta
             + pseudo_sum_v4(session.pool4, session.target4, proto, length))
    U16.pack_into(segment, csum_offset, fold_udp(total) if proto == PROTO_UDP else fold(total))
    flags = IPV4_DF if 20 + length > DF_THRESHOLD and not fragmented else 0
    tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
    return build_ipv4(session.pool4, session.target4, proto, segment, ttl=hop_limit,
                      ident=ident, flags_offset=flags, tos=tos)


def translate_v4_to_v6(packet: bytes | memoryview, header_len: int, total_len: int,
                       proto: int, session: Session, max_mss: int) -> bytes:
    """Translate a service's IPv4 TCP/UDP reply into the IPv6 payload for the client.

    Returns the transport segment (ports and checksum rewritten); the caller builds the IPv6
    header(s), fragmenting when needed (RFC 7915 §4). The checksum is recomputed in full:
    packets captured from the local stack may carry partial checksums (DESIGN.md).
    """
    segment = bytearray(packet[header_len:total_len])
    PORTS.pack_into(segment, 0, session.gwport, session.cport)
    if proto == PROTO_TCP:
        clamp_mss(segment, max_mss)
        csum_offset = 16
    else:
        csum_offset = 6
    segment[csum_offset:csum_offset + 2] = b"\0\0"
    # RFC 7915 §4.5: zero-checksum UDP is given a computed checksum (option 2).
    total = pseudo_sum_v6(session.gw6, session.client6, proto, len(segment)) + sum16(segment)
    U16.pack_into(segment, csum_offset, fold_udp(total) if proto == PROTO_UDP else fold(total))
    return bytes(segment)


def translate_echo_v6_to_v4(message: bytes | memoryview, session: Session, hop_limit: int,
                            ident: int, tos: int, fragmented: bool = False) -> bytes:
    """A verified ICMPv6 Echo Request (``message``: the ICMPv6 part) as the ICMPv4 one (RFC
    7915 §5.2: type 128 -> 8), its identifier the binding's pool port (RFC 6146 §3.5.3); the
    ICMPv4 checksum has no pseudo-header, so it is computed anew."""
    body = bytearray(message)
    body[0] = ICMP_ECHO_REQUEST
    U16.pack_into(body, 4, session.pport)
    set_checksum(body, 2, 0)
    flags = IPV4_DF if 20 + len(body) > DF_THRESHOLD and not fragmented else 0  # §5.1.1
    return build_ipv4(session.pool4, session.target4, PROTO_ICMP, body, ttl=hop_limit,
                      ident=ident, flags_offset=flags, tos=tos)


def translate_echo_v4_to_v6(message: bytes | memoryview, session: Session) -> bytes:
    """An ICMPv4 Echo Reply (``message``: the ICMP part) as the ICMPv6 message for the client
    (RFC 7915 §4.2: type 0 -> 129), its identifier the client's own again (RFC 6146 §3.5.3),
    the checksum computed over the IPv6 pseudo-header."""
    body = bytearray(message)
    body[0] = ICMPV6_ECHO_REPLY
    U16.pack_into(body, 4, session.cport)
    set_checksum(body, 2, pseudo_sum_v6(session.gw6, session.client6, PROTO_ICMPV6, len(body)))
    return bytes(body)


def _rewrite_quote(segment: bytearray, proto: int, old_pseudo: int, new_pseudo: int,
                   sport: int, dport: int) -> None:
    """Rewrite the ports of a quoted (possibly truncated) TCP/UDP header and adjust its
    checksum by difference (RFC 1624): the quote is too short to recompute it (§4.3, §5.3)."""
    csum_offset = 16 if proto == PROTO_TCP else 6
    if len(segment) < 4:
        return
    old_sport, old_dport = PORTS.unpack_from(segment)
    PORTS.pack_into(segment, 0, sport, dport)
    if len(segment) < csum_offset + 2:
        return
    old_csum = (segment[csum_offset] << 8) | segment[csum_offset + 1]
    total = (0xFFFF - old_csum - old_pseudo + new_pseudo - old_sport - old_dport + sport
             + dport)
    if proto == PROTO_TCP:
        U16.pack_into(segment, csum_offset, fold(total))
    elif old_csum != 0:  # a zero UDP checksum in the quote stays "none"
        U16.pack_into(segment, csum_offset, fold_udp(total))


def _rewrite_echo_quote(segment: bytearray, ident: int, pseudo6: int) -> None:
    """A quoted (possibly truncated) ICMPv4 echo request as the ICMPv6 one it was: type 128,
    the client's identifier, the checksum adjusted by difference (RFC 1624) from one without a
    pseudo-header to one with ``pseudo6``."""
    if len(segment) < 8:
        return
    old_word, old_csum = (segment[0] << 8) | segment[1], (segment[2] << 8) | segment[3]
    old_ident = (segment[4] << 8) | segment[5]
    segment[0] = ICMPV6_ECHO_REQUEST
    U16.pack_into(segment, 4, ident)
    new_word = (segment[0] << 8) | segment[1]
    total = 0xFFFF - old_csum - old_word - old_ident + new_word + ident + pseudo6
    U16.pack_into(segment, 2, fold(total))


# RFC 7915 §4.2: ICMPv4 Destination Unreachable code -> (ICMPv6 type, code); absent = drop.
_UNREACH_V4_TO_V6: dict[int, tuple[int, int]] = {
    0: (ICMPV6_DEST_UNREACHABLE, 0), 1: (ICMPV6_DEST_UNREACHABLE, 0),
    2: (ICMPV6_PARAMETER_PROBLEM, 1), 3: (ICMPV6_DEST_UNREACHABLE, 4),
    4: (ICMPV6_PACKET_TOO_BIG, 0), 5: (ICMPV6_DEST_UNREACHABLE, 0),
    6: (ICMPV6_DEST_UNREACHABLE, 0), 7: (ICMPV6_DEST_UNREACHABLE, 0),
    8: (ICMPV6_DEST_UNREACHABLE, 0), 9: (ICMPV6_DEST_UNREACHABLE, 1),
    10: (ICMPV6_DEST_UNREACHABLE, 1), 11: (ICMPV6_DEST_UNREACHABLE, 0),
    12: (ICMPV6_DEST_UNREACHABLE, 0), 13: (ICMPV6_DEST_UNREACHABLE, 1),
    15: (ICMPV6_DEST_UNREACHABLE, 1),
}
# RFC 7915 §4.2: Parameter Problem pointer, IPv4 header offset -> IPv6 header offset.
_POINTER_V4_TO_V6 = {0: 0, 1: 1, 2: 4, 3: 4, 8: 7, 9: 6, 12: 8, 13: 8, 14: 8, 15: 8,
                     16: 24, 17: 24, 18: 24, 19: 24}

# The session lookup key of an ICMP error's embedded packet: (proto, pool4, pport, target4,
# tport); the caller resolves it to a Session.
EmbeddedKey = tuple[int, bytes, int, bytes, int]


def icmpv4_error_key(packet: bytes | memoryview, header_len: int,
                     total_len: int) -> EmbeddedKey | DropReason:
    """The session key of the packet an ICMPv4 error quotes (our own translated packet)."""
    icmp = packet[header_len:total_len]
    if len(icmp) < 8 + 20 + 4:
        return DropReason.TRUNCATED
    inner = icmp[8:]
    inner_hl = (inner[0] & 0x0F) * 4
    if inner[0] >> 4 != 4 or inner_hl < 20 or len(inner) < inner_hl + 4:
        return DropReason.TRUNCATED
    proto = inner[9]
    if proto == PROTO_ICMP and inner[inner_hl] == ICMP_ECHO_REQUEST and (
            len(inner) >= inner_hl + 8):
        # NAT64: an error about an echo request, whose identifier is the query's pool port
        # (RFC 6146 §3.5.3).
        ident = (inner[inner_hl + 4] << 8) | inner[inner_hl + 5]
        return (proto, bytes(inner[12:16]), ident, bytes(inner[16:20]), 0)
    if proto not in (PROTO_TCP, PROTO_UDP):
        return DropReason.ICMP_NOT_TRANSLATED
    sport, dport = PORTS.unpack_from(inner, inner_hl)
    return (proto, bytes(inner[12:16]), sport, bytes(inner[16:20]), dport)


def translate_icmpv4_error(packet: bytes | memoryview, header_len: int, total_len: int,
                           session: Session, tunnel_mtu: int,
                           source6: bytes | None = None) -> bytes | DropReason:
    """Translate an ICMPv4 error about one of our sessions into the ICMPv6 error for the
    client (RFC 7915 §4.2), its embedded packet translated back per §4.3. ``source6``: the
    IPv6 address that stands for the error's IPv4 source (NAT64: the router's, RFC 6052);
    None: the gateway address of the session."""
    icmp = packet[header_len:total_len]
    icmp_type, code = icmp[0], icmp[1]
    rest = 0
    if icmp_type == ICMP_DEST_UNREACHABLE:
        mapped = _UNREACH_V4_TO_V6.get(code)
        if mapped is None:
            return DropReason.ICMP_NOT_TRANSLATED
        v6_type, v6_code = mapped
        if v6_type == ICMPV6_PACKET_TOO_BIG:
            # RFC 7915 §4.2: MTU + 20 for the bigger IPv6 header, never below 1280, and no
            # more than our own tunnel carries.
            mtu4 = (icmp[6] << 8) | icmp[7]
            rest = min(max(MIN_MTU, mtu4 + 20), tunnel_mtu)
        elif v6_type == ICMPV6_PARAMETER_PROBLEM:
            rest = 6  # RFC 7915 §4.2: protocol unreachable points at Next Header
    elif icmp_type == ICMP_TIME_EXCEEDED:
        v6_type, v6_code = ICMPV6_TIME_EXCEEDED, code
    elif icmp_type == ICMP_PARAMETER_PROBLEM and code in (ICMP_POINTER_INDICATES_ERROR, 2):
        pointer = _POINTER_V4_TO_V6.get(icmp[4])
        if pointer is None:
            return DropReason.ICMP_NOT_TRANSLATED
        v6_type, v6_code, rest = ICMPV6_PARAMETER_PROBLEM, 0, pointer
    else:
        return DropReason.ICMP_NOT_TRANSLATED
    inner = icmp[8:]
    inner_hl = (inner[0] & 0x0F) * 4
    inner_total = (inner[2] << 8) | inner[3]
    proto = inner[9]
    # §4.3: the embedded packet keeps its TTL as hop limit; lengths come from what is quoted.
    segment = bytearray(inner[inner_hl:])
    length = max(inner_total - inner_hl, 0)
    if proto == PROTO_ICMP:
        # The quoted echo request goes back to what the client sent (RFC 7915 §4.3).
        proto = PROTO_ICMPV6
        _rewrite_echo_quote(segment, session.cport,
                            pseudo_sum_v6(session.client6, session.gw6, PROTO_ICMPV6, length))
    else:
        _rewrite_quote(segment, proto,
                       pseudo_sum_v4(session.pool4, session.target4, proto, length),
                       pseudo_sum_v6(session.client6, session.gw6, proto, length),
                       session.cport, session.gwport)
    embedded = build_ipv6(session.client6, session.gw6, proto, segment, hop_limit=inner[8])
    # build_ipv6 wrote the quoted length; restore the original payload length (§4.3 says the
    # embedded header describes the original packet, not the truncated quote).
    embedded = embedded[:4] + U16.pack(max(inner_total - inner_hl, 0)) + embedded[6:]
    embedded = embedded[:MIN_MTU - 48]
    return build_icmpv6(source6 or session.gw6, session.client6, v6_type, v6_code, rest,
                        embedded)



# RFC 7915 §5.2: ICMPv6 Destination Unreachable code -> ICMPv4 (type 3) code; absent = drop.
_UNREACH_V6_TO_V4 = {0: 1, 1: 10, 2: 1, 3: 1, 4: 3}
# RFC 7915 §5.2: Parameter Problem pointer, IPv6 header offset -> IPv4 header offset.
_POINTER_V6_TO_V4 = {0: 0, 1: 1, 4: 2, 5: 2, 6: 9, 7: 8, **{i: 12 for i in range(8, 24)},
                     **{i: 16 for i in range(24, 40)}}
ICMP4_MIN_MTU = 68  # RFC 791: every IPv4 host handles 68-byte datagrams
# RFC 1812 §4.3.2.3: an ICMPv4 error carries at most 576 bytes in all.
ICMP4_MAX_ERROR = 576

# The session lookup key of an ICMPv6 error's embedded packet (our own reply to the client):
# (proto, client6, cport, gw6, gwport).
EmbeddedKeyV6 = tuple[int, bytes, int, bytes, int]


def icmpv6_error_key(message: bytes | memoryview) -> EmbeddedKeyV6 | DropReason:
    """The session key of the packet an ICMPv6 error (``message`` = the ICMPv6 part) quotes."""
    inner = message[8:]
    if len(inner) < 44:
        return DropReason.TRUNCATED
    proto = inner[6]
    # RFC 7915 §5.3: stop at extension headers in the quote; our replies never carry any.
    if inner[0] >> 4 != 6 or proto not in (PROTO_TCP, PROTO_UDP):
        return DropReason.ICMP_NOT_TRANSLATED
    sport, dport = PORTS.unpack_from(inner, 40)
    return (proto, bytes(inner[24:40]), dport, bytes(inner[8:24]), sport)


def translate_icmpv6_error(message: bytes | memoryview, session: Session,
                           tunnel_mtu: int) -> bytes | DropReason:
    """Translate an ICMPv6 error a client (or a router on its path) sent about one of our
    replies into the ICMPv4 error for the service (RFC 7915 §5.2), embedded packet per §5.3.
    Packet Too Big matters most: the service's TCP learns the smaller path MTU from it."""
    icmp_type, code = message[0], message[1]
    rest = 0
    if icmp_type == ICMPV6_DEST_UNREACHABLE:
        mapped = _UNREACH_V6_TO_V4.get(code)
        if mapped is None:
            return DropReason.ICMP_NOT_TRANSLATED
        v4_type, v4_code = ICMP_DEST_UNREACHABLE, mapped
    elif icmp_type == ICMPV6_PACKET_TOO_BIG:
        # §5.2: MTU - 20 for the smaller IPv4 header, and no more than our own tunnel takes.
        mtu6 = int.from_bytes(message[4:8], "big")
        mtu4 = max(ICMP4_MIN_MTU, min(mtu6, tunnel_mtu) - 20)
        v4_type, v4_code, rest = ICMP_DEST_UNREACHABLE, ICMP_FRAGMENTATION_NEEDED, mtu4
    elif icmp_type == ICMPV6_TIME_EXCEEDED:
        v4_type, v4_code = ICMP_TIME_EXCEEDED, code
    elif icmp_type == ICMPV6_PARAMETER_PROBLEM and code == 0:
        pointer = _POINTER_V6_TO_V4.get(int.from_bytes(message[4:8], "big"))
        if pointer is None:
            return DropReason.ICMP_NOT_TRANSLATED
        v4_type, v4_code, rest = ICMP_PARAMETER_PROBLEM, ICMP_POINTER_INDICATES_ERROR, pointer << 24
    elif icmp_type == ICMPV6_PARAMETER_PROBLEM and code == 1:
        # §5.2: unrecognized Next Header -> protocol unreachable
        v4_type, v4_code = ICMP_DEST_UNREACHABLE, ICMP_PROTOCOL_UNREACHABLE
    else:
        return DropReason.ICMP_NOT_TRANSLATED
    inner = message[8:]
    proto = inner[6]
    length = (inner[4] << 8) | inner[5]
    segment = bytearray(inner[40:])
    _rewrite_quote(segment, proto,
                   pseudo_sum_v6(session.gw6, session.client6, proto, length),
                   pseudo_sum_v4(session.target4, session.pool4, proto, length),
                   session.tport, session.pport)
    # §5.3: the embedded header describes the original packet: its length, hop limit as TTL.
    quote = bytearray(build_ipv4(session.target4, session.pool4, proto, segment,
                                 ttl=inner[7]))
    U16.pack_into(quote, 2, 20 + length)
    quote[10:12] = b"\0\0"
    U16.pack_into(quote, 10, fold(sum16(quote[:20])))
    body = bytearray(struct.pack("!BBHI", v4_type, v4_code, 0, rest)) + quote
    body = body[:ICMP4_MAX_ERROR - 20]
    U16.pack_into(body, 2, fold(sum16(body)))
    # The error comes from the client as the service knows it: its pool address.
    return build_ipv4(session.pool4, session.target4, PROTO_ICMP, body)
