"""Per-session fast path: the common packet of a live session, translated from a template.

Most packets belong to a session that already exists, carry no extension header, IPv4 option,
fragment or TCP SYN/FIN/RST (an MSS option, which is clamped, only comes in a SYN), and fit the
tunnel. For those, everything that depends only on the session (addresses, ports, the
pseudo-header sums, the outer IPv4 destination) is computed once when the session is first
used and kept in a template; each packet then costs one dict lookup, one sum over its bytes and
one header pack.

Nothing is checked less than on the full path (``workers/engine/datapath.py``): the upper-layer
checksum is verified (RFC 8200 §8.1) over the whole segment, the hop limit/TTL is checked and
decremented (RFC 7915 §4.1, §5.1), the IPv4 header checksum of a service's packet is verified
(RFC 791). Any packet that is not the plain case (bad checksum, hop limit 1, flags that move
the TCP state machine, padding, too big) returns None and takes the full path, which counts
and answers it; so the two paths give the same bytes out and the same counters, which
``tests/unit/test_fastpath.py`` checks packet for packet.

NAT64's ICMP query sessions (RFC 6146 §3.5.3) have the same: an Echo Request of a live
session and the Echo Reply to it (RFC 7915 §4.2, §5.2) are translated from templates keyed like
the others, the identifier standing where the ports are (client ident and 0 inbound, 0 and the
pool's ident back); the echo's checksum is verified and carried over as the others' are.

Checksums follow RFC 1624 in sum form: ones' complement sums are additive, so the new sum is
the sum of the segment as received minus the words that change plus their new values plus
the new pseudo-header. Pure: no I/O.
"""

from __future__ import annotations

import struct

from sixgate.workers.engine.flows import Session
from sixgate.workers.engine.icmp import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
)
from sixgate.workers.engine.packet import (
    IPV4_DF,
    IPV4_MF,
    IPV4_OFFSET_MASK,
    PORTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_UDP,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    sum16,
)
from sixgate.workers.engine.translate import DF_THRESHOLD

try:  # the same loops compiled (workers/engine/_fastpath.c), when the build had a compiler
    import sixgate.workers.engine._fastpath as _loops

    compiled = _loops
except ImportError:  # pragma: no cover - a host without gcc at install time
    compiled = None  # type: ignore[assignment]

TCP_SYN_FIN_RST = TCP_SYN | TCP_FIN | TCP_RST

UDP_HEADER = struct.Struct("!HHHH")
TCP_HEADER = struct.Struct("!HHIIBBHHH")
# A whole translated header in one pack: network header + transport header.
IPV4_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")
IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
IPV6_UDP = struct.Struct("!IHBB16s16sHHHH")
IPV6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
IPV4_ICMP = struct.Struct("!BBHHHBBH4s4sBBHH")
IPV6_ICMP = struct.Struct("!IHBB16s16sBBHH")
# What the type word of an echo changes by: RFC 7915 §5.2 (128 -> 8) and §4.2 (0 -> 129).
ECHO_REQUEST_TO_V4 = (ICMP_ECHO_REQUEST - ICMPV6_ECHO_REQUEST) << 8
ECHO_REPLY_TO_V6 = (ICMPV6_ECHO_REPLY - ICMP_ECHO_REPLY) << 8
ECHO_REPLY_HOP_LIMIT = 64  # what icmp.echo_reply's packet gets (packet.build_ipv6's default)


def _words(data: bytes) -> int:
    """Sum of the 16-bit words of an even-length byte string."""
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


# Template of the inbound direction (IPv6 client -> IPv4 service): (session, sum of the IPv6
# pseudo-header without its length, sum of the IPv4 addresses and protocol, what the
# transport checksum's sum changes by: new pseudo-header and ports minus the old ones, the
# translated addresses and ports as they are written: pool4, target4, pool port, target port)
InTemplate = tuple[Session, int, int, int, bytes]
# Template of the return direction (IPv4 service -> IPv6 client): (session, sum of the IPv6
# pseudo-header without its length plus the new ports minus the old ones, outer IPv4
# destination, the translated addresses and ports: gw6, client6, gateway port, client port)
OutTemplate = tuple[Session, int, bytes, bytes]


def inbound_template(session: Session) -> InTemplate:
    sum6 = _words(session.client6 + session.gw6) + session.proto
    addr4 = _words(session.pool4 + session.target4) + session.proto
    # The source port becomes the pool port (the same but in NAT64), the destination port
    # the target's.
    return (session, sum6, addr4, (addr4 - sum6 + session.pport - session.cport + session.tport
                                   - session.gwport) % 0xFFFF,
            session.pool4 + session.target4 + PORTS.pack(session.pport, session.tport))


def return_template(session: Session, outer: bytes) -> OutTemplate:
    # The destination port becomes the client's (the pool port but in NAT64), the source
    # port the gateway's.
    return (session,
            _words(session.gw6 + session.client6) + session.proto + session.gwport
            - session.tport + session.cport - session.pport, outer,
            session.gw6 + session.client6 + PORTS.pack(session.gwport, session.cport))


def echo_inbound_template(session: Session) -> InTemplate:
    """An ICMP query session's inbound template (keyed by client, gateway address, client
    identifier and 0): the IPv6 pseudo-header to verify against, the IPv4 addresses and
    protocol, and what the message's sum changes by (the type, the identifier; ICMPv4 has no
    pseudo-header)."""
    return (session, _words(session.client6 + session.gw6) + PROTO_ICMPV6,
            _words(session.pool4 + session.target4) + PROTO_ICMP,
            (ECHO_REQUEST_TO_V4 + session.pport - session.cport) % 0xFFFF,
            session.pool4 + session.target4 + PORTS.pack(session.pport, 0))


def echo_return_template(session: Session, outer: bytes) -> OutTemplate:
    """An ICMP query session's return template (keyed by remote, pool address, 0 and the
    pool's identifier): the IPv6 pseudo-header without its length plus what the type and the
    identifier change by."""
    return (session,
            _words(session.gw6 + session.client6) + PROTO_ICMPV6 + ECHO_REPLY_TO_V6
            + session.cport - session.pport, outer,
            session.gw6 + session.client6 + PORTS.pack(0, session.cport))


# A tunnel client's echo request to one of our addresses, which every tunnel check passed
# for its outer and inner addresses (workers/engine/tunnel.py: for an echo request they depend
# on the addresses only): (the pseudo-header sum of the two addresses and protocol 58, the
# same both ways; the reply's outer IPv4 destination). Keyed by outer source and destination
# and inner source and destination.
EchoTemplate = tuple[int, bytes]


def echo_template(client6: bytes, our6: bytes, outer: bytes) -> EchoTemplate:
    return (_words(client6 + our6) + PROTO_ICMPV6, outer)


def _tcp_is_plain(segment_len: int, offset: int, flags: int) -> bool:
    """No SYN, FIN or RST (they move the session's state machine, and only a SYN's MSS option
    is clamped: RFC 9293 §3.7.1, translate.clamp_mss) and a data offset that fits the segment
    (RFC 9293 §3.1): a segment the template may translate. The options are never searched."""
    return not flags & TCP_SYN_FIN_RST and 20 <= (offset >> 4) * 4 <= segment_len


def fast_v6_to_v4(packet: bytes | memoryview, proto: int, template: InTemplate,
                  ident: int) -> bytes | None:
    """The IPv4 packet for a plain inbound TCP/UDP packet of the template's session, or None
    when the packet needs the full path. ``packet`` starts with the IPv6 header, whose next
    header is ``proto`` (no extension headers)."""
    plen = (packet[4] << 8) | packet[5]
    hop_limit = packet[7]
    # Padding after the payload, hop limit 1, a short segment: the full path decides.
    if 40 + plen != len(packet) or hop_limit <= 1:
        return None
    if proto == PROTO_UDP:
        if plen < 8:
            return None
        _sport, _dport, udp_len, old_csum = UDP_HEADER.unpack_from(packet, 40)
        if old_csum == 0 or udp_len != plen:
            # RFC 8200 §8.1: zero is invalid over IPv6; RFC 768: the length is the datagram's.
            return None  # the full path counts them
        zero = 0xFFFF
    else:
        if plen < 20:
            return None
        _sport, _dport, seq, ack, offset, flags, window, old_csum, urgent = (
            TCP_HEADER.unpack_from(packet, 40))
        if not _tcp_is_plain(plen, offset, flags):
            return None
        zero = 0
    session, sum6, addr4, delta, _addresses = template
    # RFC 8200 §8.1: verify over the IPv6 pseudo-header (length < 65536: one word). The
    # segment's ones' complement sum is its value modulo 0xffff, reduced once (RFC 1071
    # §4.1: an odd last byte is padded with zero). Written out here and below rather than
    # called: these two functions are most of a packet's Python time.
    value = int.from_bytes(packet[40:], "big") % 0xFFFF
    if plen & 1:
        value = (value << 8) % 0xFFFF
    if (sum6 + plen + value) % 0xFFFF:
        return None
    # RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'): the segment verified, so its sum is known
    # without the checksum field, and only the pseudo-header and port words change.
    rest = (delta - old_csum) % 0xFFFF
    # A sum congruent to 0 is -0, whose complement is +0: sent as ``zero`` (0xffff for UDP,
    # RFC 768).
    csum = 0xFFFF - rest if rest else zero
    total_len = 20 + plen
    flags_offset = IPV4_DF if total_len > DF_THRESHOLD else 0
    tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
    ttl = hop_limit - 1  # translate.hop_limit_after, inline (RFC 7915 §5.1)
    rest = (0x4500 + tos + total_len + ident + flags_offset + (ttl << 8) + addr4) % 0xFFFF
    header_csum = 0xFFFF - rest if rest else 0
    pool4, target4 = session.pool4, session.target4
    if proto == PROTO_UDP:
        return IPV4_UDP.pack(0x45, tos, total_len, ident, flags_offset, ttl, proto, header_csum,
                             pool4, target4, session.pport, session.tport, udp_len,
                             csum) + packet[48:]
    return IPV4_TCP.pack(0x45, tos, total_len, ident, flags_offset, ttl, proto, header_csum,
                         pool4, target4, session.pport, session.tport, seq, ack, offset, flags,
                         window, csum, urgent) + packet[60:]


def fast_v4_to_v6(packet: bytes | memoryview, proto: int, template: OutTemplate,
                  mtu: int) -> bytes | None:
    """The IPv6 packet for a plain TCP/UDP reply of the template's session, or None when it
    needs the full path. ``packet`` has a 20-byte IPv4 header (IHL 5)."""
    total_len = (packet[2] << 8) | packet[3]
    ttl = packet[8]
    if total_len != len(packet) or ttl <= 1 or (
            ((packet[6] << 8) | packet[7]) & (IPV4_MF | IPV4_OFFSET_MASK)):
        return None
    seglen = total_len - 20
    if 40 + seglen > mtu:
        return None  # fragmentation or Fragmentation Needed: the full path
    if proto == PROTO_UDP:
        if seglen < 8:
            return None
        _sport, _dport, udp_len, old_csum = UDP_HEADER.unpack_from(packet, 20)
        zero = 0xFFFF
    else:
        if seglen < 20:
            return None
        _sport, _dport, seq, ack, offset, flags, window, old_csum, urgent = (
            TCP_HEADER.unpack_from(packet, 20))
        if not _tcp_is_plain(seglen, offset, flags):
            return None
        zero = 0
    # RFC 791: the IPv4 header checksum must verify.
    if int.from_bytes(packet[:20], "big") % 0xFFFF:
        return None
    value = int.from_bytes(packet[20:], "big") % 0xFFFF
    if seglen & 1:
        value = (value << 8) % 0xFFFF
    session, delta, _outer, _addresses = template
    gw6, client6 = session.gw6, session.client6
    # Summed whole, so the checksum is recomputed rather than carried over (the local
    # stack's checksums are not trusted, DESIGN.md): the segment without its checksum field,
    # the ports exchanged and the IPv6 pseudo-header.
    rest = (value - old_csum + delta + seglen) % 0xFFFF
    csum = 0xFFFF - rest if rest else zero
    # RFC 7915 §4.1: traffic class = TOS, hop limit = translate.hop_limit_after(TTL), inline.
    first_word = 0x60000000 | (packet[1] << 20)
    if proto == PROTO_UDP:
        return IPV6_UDP.pack(first_word, seglen, proto, ttl - 1, gw6, client6, session.gwport,
                             session.cport, udp_len, csum) + packet[28:]
    return IPV6_TCP.pack(first_word, seglen, proto, ttl - 1, gw6, client6, session.gwport,
                         session.cport, seq, ack, offset, flags, window, csum,
                         urgent) + packet[40:]


def fast_echo_v6_to_v4(packet: bytes | memoryview, template: InTemplate,
                       ident: int) -> bytes | None:
    """The ICMPv4 Echo Request for a plain ICMPv6 one of the template's query session
    (``packet`` starts with the IPv6 header, next header 58), or None when the full path
    must decide (``Datapath._nat64_icmp``)."""
    plen = (packet[4] << 8) | packet[5]
    hop_limit = packet[7]
    if 40 + plen != len(packet) or hop_limit <= 1 or plen < 8 or (
            packet[40] != ICMPV6_ECHO_REQUEST):
        return None
    session, sum6, addr4, delta, _addresses = template
    value = sum16(packet[40:]) % 0xFFFF
    if (sum6 + plen + value) % 0xFFFF:  # RFC 4443 §2.3: over the IPv6 pseudo-header
        return None
    old_csum = (packet[42] << 8) | packet[43]
    # The message's sum without its checksum field, the type and identifier changed; no
    # pseudo-header on the IPv4 side (RFC 792).
    rest = (value - old_csum + delta) % 0xFFFF
    csum = 0xFFFF - rest if rest else 0
    total_len = 20 + plen
    flags_offset = IPV4_DF if total_len > DF_THRESHOLD else 0
    tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
    ttl = hop_limit - 1
    rest = (0x4500 + tos + total_len + ident + flags_offset + (ttl << 8) + addr4) % 0xFFFF
    header_csum = 0xFFFF - rest if rest else 0
    return IPV4_ICMP.pack(0x45, tos, total_len, ident, flags_offset, ttl, PROTO_ICMP,
                          header_csum, session.pool4, session.target4, ICMP_ECHO_REQUEST,
                          packet[41], csum, session.pport) + packet[46:]


def fast_echo_v4_to_v6(packet: bytes | memoryview, template: OutTemplate,
                       mtu: int) -> bytes | None:
    """The ICMPv6 Echo Reply for a plain ICMPv4 one to the template's query session
    (``packet`` has a 20-byte IPv4 header, protocol 1), or None when the full path must
    decide (``Datapath._nat64_echo_reply``)."""
    total_len = (packet[2] << 8) | packet[3]
    ttl = packet[8]
    if total_len != len(packet) or ttl <= 1 or (
            ((packet[6] << 8) | packet[7]) & (IPV4_MF | IPV4_OFFSET_MASK)):
        return None
    seglen = total_len - 20
    if seglen < 8 or 40 + seglen > mtu or packet[20] != ICMP_ECHO_REPLY:
        return None
    if int.from_bytes(packet[:20], "big") % 0xFFFF:  # RFC 791
        return None
    value = sum16(packet[20:]) % 0xFFFF
    if value:  # RFC 792: the checksum covers the whole message
        return None
    session, delta, _outer, _addresses = template
    old_csum = (packet[22] << 8) | packet[23]
    rest = (value - old_csum + delta + seglen) % 0xFFFF
    csum = 0xFFFF - rest if rest else 0
    return IPV6_ICMP.pack(0x60000000 | (packet[1] << 20), seglen, PROTO_ICMPV6, ttl - 1,
                          session.gw6, session.client6, ICMPV6_ECHO_REPLY, packet[21], csum,
                          session.cport) + packet[26:]


def fast_echo_reply(packet: bytes | memoryview, template: EchoTemplate,
                    mtu: int) -> bytes | None:
    """The Echo Reply to a plain Echo Request to us (``packet`` starts with the IPv6 header,
    next header 58; ``icmp.echo_reply``'s bytes), or None when the full path must decide
    (``Datapath._inbound_icmp``; the caller asks the echo rate limit)."""
    plen = (packet[4] << 8) | packet[5]
    if 40 + plen != len(packet) or plen < 8 or packet[40] != ICMPV6_ECHO_REQUEST or (
            len(packet) > mtu):
        return None
    sum6 = template[0]
    value = sum16(packet[40:]) % 0xFFFF
    if (sum6 + plen + value) % 0xFFFF:  # RFC 4443 §2.3
        return None
    # RFC 4443 §4.2: identifier, sequence and data returned unmodified; type 129, code 0;
    # the same pseudo-header (the addresses only change places).
    old_csum = (packet[42] << 8) | packet[43]
    rest = (value - old_csum - ((ICMPV6_ECHO_REQUEST << 8) | packet[41])
            + (ICMPV6_ECHO_REPLY << 8) + sum6 + plen) % 0xFFFF
    csum = 0xFFFF - rest if rest else 0
    return IPV6_ICMP.pack(0x60000000, plen, PROTO_ICMPV6, ECHO_REPLY_HOP_LIMIT,
                          bytes(packet[24:40]), bytes(packet[8:24]), ICMPV6_ECHO_REPLY, 0, csum,
                          (packet[44] << 8) | packet[45]) + packet[46:]
