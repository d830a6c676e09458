"""IPv4/IPv6 header codecs and Internet checksums: the bottom of the packet engine.

Implements RFC 791 (IPv4 header), RFC 8200 §3-§4 (IPv6 header, extension header chain,
Fragment header), RFC 1071/1624 (checksums). Parsers never raise for any input bytes: they
return a parsed tuple or a ``DropReason``. Pure: no I/O, no clock, no globals that change.

Checksum arithmetic: the ones' complement sum of 16-bit words equals the big-endian integer
value of the bytes modulo 0xffff (2**16 = 1 mod 0xffff), so a whole packet is summed by one
``int.from_bytes`` in C instead of a Python loop over words.
"""

from __future__ import annotations

import struct

from workers.drops import DropReason

PROTO_HOPOPT = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_IPV6 = 41
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60

# TCP control bits, the low byte of the flags field (RFC 9293 §3.1): the one definition.
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
FRAGMENT_HEADER = struct.Struct("!BBHI")
PORTS = struct.Struct("!HH")
U16 = struct.Struct("!H")

IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF

# RFC 8200 §4: at most this many extension headers are walked before we give up; a legitimate
# packet to a translator carries one or two (RFC 7915 §5.1 translates none but Fragment).
MAX_EXTENSION_HEADERS = 8


# --- checksums (RFC 1071, RFC 1624) ---------------------------------------------------------

def sum16(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of ``data`` as an integer congruent to it modulo 0xffff."""
    value = int.from_bytes(data, "big")
    # RFC 1071 §4.1: an odd trailing byte is padded with a zero byte on the right.
    return value << 8 if len(data) & 1 else value


def fold(total: int) -> int:
    """The 16-bit checksum field for a sum built with ``sum16``.

    A non-zero sum congruent to 0 is the ones' complement -0 (0xffff), whose complement is +0
    (RFC 1624 §3). UDP must send 0xffff instead of 0 (RFC 768): use ``fold_udp`` there.
    """
    rest = total % 0xFFFF
    if rest:
        return 0xFFFF - rest
    return 0 if total else 0xFFFF


def fold_udp(total: int) -> int:
    """``fold`` for UDP: a computed 0 is transmitted as 0xffff (RFC 768, RFC 8200 §8.1)."""
    return fold(total) or 0xFFFF


def checksum(data: bytes | bytearray | memoryview) -> int:
    """Internet checksum of ``data`` (RFC 1071)."""
    return fold(sum16(data))


def sum_is_valid(total: int) -> bool:
    """True when a sum that includes the checksum field verifies (RFC 1071 §1)."""
    return total % 0xFFFF == 0


def pseudo_sum_v4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768)."""
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length


def pseudo_sum_v6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv6 pseudo-header (RFC 8200 §8.1)."""
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length


# --- IPv4 -------------------------------------------------------------------------------------

# Parsed IPv4 view: (header_len, total_len, ident, flags_offset, ttl, proto, src, dst, tos)
IPv4View = tuple[int, int, int, int, int, int, bytes, bytes, int]


def parse_ipv4(buf: bytes | memoryview, verify_checksum: bool = True) -> IPv4View | DropReason:
    """Parse and verify an IPv4 header (RFC 791 §3.1); options are skipped, never used.

    ``verify_checksum=False`` is for packets the kernel has already verified (raw socket
    delivery happens after ip_rcv checked the header)."""
    if len(buf) < 20:
        return DropReason.TRUNCATED
    vihl, tos, total_len, ident, flags_offset, ttl, proto, _csum, src, dst = (
        IPV4_HEADER.unpack_from(buf)
    )
    if vihl >> 4 != 4:
        return DropReason.BAD_VERSION
    header_len = (vihl & 0x0F) * 4
    if header_len < 20 or total_len < header_len:
        return DropReason.BAD_HEADER
    if total_len > len(buf):
        return DropReason.TRUNCATED
    if verify_checksum and not sum_is_valid(sum16(buf[:header_len])):
        return DropReason.BAD_CHECKSUM
    return (header_len, total_len, ident, flags_offset, ttl, proto, src, dst, tos)


def build_ipv4(
    src: bytes,
    dst: bytes,
    proto: int,
    payload: bytes | bytearray | memoryview,
    *,
    ttl: int = 64,
    ident: int = 0,
    flags_offset: int = 0,
    tos: int = 0,
) -> bytes:
    """A 20-byte IPv4 header with a correct header checksum, followed by ``payload``."""
    total_len = 20 + len(payload)
    header = bytearray(
        IPV4_HEADER.pack(0x45, tos, total_len, ident, flags_offset, ttl, proto, 0, src, dst)
    )
    U16.pack_into(header, 10, checksum(header))
    return bytes(header) + bytes(payload)


# --- IPv6 -------------------------------------------------------------------------------------

# Fragment info: (offset_bytes, more_fragments, identification, fragment_header_offset,
# next_header_offset) where next_header_offset is where the "next header" byte that names the
# Fragment header sits (needed to splice it out on reassembly).
FragmentInfo = tuple[int, bool, int, int, int]

# Parsed IPv6 view: (payload_len, hop_limit, src, dst, upper_proto, upper_offset, fragment,
# traffic_class, next_header_offset) where next_header_offset is the octet that names
# upper_proto (6 without extension headers), the pointer of RFC 4443 §3.4 errors.
IPv6View = tuple[int, int, bytes, bytes, int, int, FragmentInfo | None, int, int]


def parse_ipv6(buf: bytes | memoryview) -> IPv6View | DropReason:
    """Parse an IPv6 header and walk its extension headers (RFC 8200 §4).

    Hop-by-Hop, Destination Options and Routing headers with Segments Left 0 are skipped, as
    RFC 7915 §5.1 does; the Fragment header is reported; a Routing header with Segments Left
    != 0 is a ``BAD_HEADER`` (we are the final destination of nothing it lists).
    """
    if len(buf) < 40:
        return DropReason.TRUNCATED
    vtf, payload_len, next_header, hop_limit, src, dst = IPV6_HEADER.unpack_from(buf)
    if vtf >> 28 != 6:
        return DropReason.BAD_VERSION
    end = 40 + payload_len
    if end > len(buf):
        return DropReason.TRUNCATED
    traffic_class = (vtf >> 20) & 0xFF
    offset = 40
    nh_offset = 6
    fragment: FragmentInfo | None = None
    for _ in range(MAX_EXTENSION_HEADERS):
        if next_header in (PROTO_HOPOPT, PROTO_DSTOPTS, PROTO_ROUTING):
            # RFC 8200 §4.3: Hop-by-Hop Options only directly after the IPv6 header.
            if next_header == PROTO_HOPOPT and offset != 40:
                return DropReason.BAD_HEADER
            if offset + 8 > end:
                return DropReason.TRUNCATED
            length = (buf[offset + 1] + 1) * 8
            if offset + length > end:
                return DropReason.TRUNCATED
            # RFC 7915 §5.1: a Routing header with Segments Left != 0 is not translated.
            if next_header == PROTO_ROUTING and buf[offset + 3] != 0:
                return DropReason.BAD_HEADER
            nh_offset = offset
            next_header = buf[offset]
            offset += length
        elif next_header == PROTO_FRAGMENT:
            if fragment is not None:
                return DropReason.BAD_FRAGMENT
            if offset + 8 > end:
                return DropReason.TRUNCATED
            nxt, _res, off_flags, ident = FRAGMENT_HEADER.unpack_from(buf, offset)
            fragment = (off_flags & 0xFFF8, bool(off_flags & 1), ident, offset, nh_offset)
            nh_offset = offset
            next_header = nxt
            offset += 8
            if fragment[0] != 0:
                # Only the first fragment carries the upper-layer header (RFC 8200 §4.5).
                return (payload_len, hop_limit, src, dst, next_header, offset, fragment,
                        traffic_class, nh_offset)
        else:
            return (payload_len, hop_limit, src, dst, next_header, offset, fragment,
                    traffic_class, nh_offset)
    return DropReason.BAD_HEADER


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: bytes | bytearray | memoryview,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
) -> bytes:
    """A 40-byte IPv6 header followed by ``payload``; flow label 0 (RFC 7915 §4.1)."""
    vtf = (6 << 28) | (traffic_class << 20)
    return IPV6_HEADER.pack(vtf, len(payload), next_header, hop_limit, src, dst) + bytes(payload)


# --- transport --------------------------------------------------------------------------------

def transport_sum_is_valid_v6(src: bytes, dst: bytes, proto: int,
                              segment: bytes | memoryview) -> bool:
    """Verify a TCP/UDP/ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 §8.1)."""
    return sum_is_valid(pseudo_sum_v6(src, dst, proto, len(segment)) + sum16(segment))


def transport_sum_is_valid_v4(src: bytes, dst: bytes, proto: int,
                              segment: bytes | memoryview) -> bool:
    """Verify a TCP/UDP checksum over the IPv4 pseudo-header (RFC 793, RFC 768)."""
    return sum_is_valid(pseudo_sum_v4(src, dst, proto, len(segment)) + sum16(segment))


def set_checksum(segment: bytearray, offset: int, pseudo: int, udp: bool = False) -> None:
    """Write the checksum at ``offset`` of ``segment`` given its pseudo-header sum."""
    segment[offset:offset + 2] = b"\0\0"
    total = pseudo + sum16(segment)
    U16.pack_into(segment, offset, fold_udp(total) if udp else fold(total))


def checksum_offset(proto: int) -> int | None:
    """Offset of the checksum field inside a transport header, None for others."""
    if proto == PROTO_TCP:
        return 16
    if proto == PROTO_UDP:
        return 6
    if proto in (PROTO_ICMPV6, PROTO_ICMP):
        return 2
    return None
