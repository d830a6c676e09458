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
from dataclasses import dataclass

from sixgate.workers.engine.drops import DropReason

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

# ICMPv6 Parameter Problem codes (RFC 4443 §3.4, RFC 7112 §5 for code 3): the one definition.
PARAM_ERRONEOUS_HEADER = 0
PARAM_UNRECOGNIZED_NEXT_HEADER = 1
PARAM_UNRECOGNIZED_OPTION = 2
PARAM_INCOMPLETE_CHAIN = 3

# RFC 8200 §4.2: the only options a host must recognize in both options headers.
OPTION_PAD1 = 0
OPTION_PADN = 1

# RFC 7112 §5: how much of the upper-layer header a first fragment must hold (TCP's fixed
# header, UDP's header, ICMPv6's type, code and checksum).
UPPER_HEADER_LENGTH = {6: 20, 17: 8, 58: 4}

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


@dataclass(frozen=True, slots=True)
class ParameterProblem:
    """A packet the RFC 8200 §4 host rules refuse with an ICMPv6 Parameter Problem (RFC 4443
    §3.4) about it: counted under ``reason``; ``pointer`` is the octet offset of the offending
    field in the invoking packet. ``to_multicast``: RFC 4443 §2.4(e.3)'s exception, an option
    whose type starts with bits 10 is answered even for a multicast destination."""

    reason: DropReason
    code: int
    pointer: int
    to_multicast: bool = False


def _options_verdict(buf: bytes | memoryview, start: int, end: int,
                     dst_multicast: bool) -> DropReason | ParameterProblem | None:
    """RFC 8200 §4.2: walk the options of a Hop-by-Hop or Destination Options header that
    spans ``buf[start:end]``. Pad1 and PadN are recognized; any other option type is not, and
    its two high-order bits say what to do. None: go on with the next header."""
    i = start + 2
    while i < end:
        kind = buf[i]
        if kind == OPTION_PAD1:
            i += 1
            continue
        if i + 2 > end or i + 2 + buf[i + 1] > end:
            return DropReason.BAD_HEADER  # an option that overruns its header
        if kind != OPTION_PADN:
            action = kind >> 6
            if action == 1:  # 01: discard silently
                return DropReason.UNRECOGNIZED_OPTION
            if action == 2:  # 10: discard, Parameter Problem code 2, even to multicast
                return ParameterProblem(DropReason.UNRECOGNIZED_OPTION,
                                        PARAM_UNRECOGNIZED_OPTION, i, to_multicast=True)
            if action == 3:  # 11: discard, code 2 only when the destination is not multicast
                if dst_multicast:
                    return DropReason.UNRECOGNIZED_OPTION
                return ParameterProblem(DropReason.UNRECOGNIZED_OPTION,
                                        PARAM_UNRECOGNIZED_OPTION, i)
            # 00: skip over this option and go on
        i += 2 + buf[i + 1]
    return None


def parse_ipv6(buf: bytes | memoryview) -> IPv6View | DropReason | ParameterProblem:
    """Parse an IPv6 header and walk its extension headers as a host does (RFC 8200 §4).

    Options headers are walked option by option (§4.2); a Routing header with Segments Left 0
    is ignored and one with Segments Left != 0 refused (§4.4: we recognize no routing type,
    RFC 5095 deprecates type 0); the Fragment header is checked (§4.5, RFC 7112) and reported.
    Refusals the RFCs answer come back as ``ParameterProblem``, silent ones as a
    ``DropReason``; an unrecognized upper-layer protocol is the caller's (it knows which it
    serves).
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
    # RFC 7112 §5: a first fragment (more to come) must hold the whole header chain.
    first_fragment = False
    for _ in range(MAX_EXTENSION_HEADERS):
        if next_header in (PROTO_HOPOPT, PROTO_DSTOPTS, PROTO_ROUTING):
            # RFC 8200 §4.3: Hop-by-Hop Options only directly after the IPv6 header; anywhere
            # else its value is an unrecognized Next Header (§4, RFC 4443 §3.4 code 1).
            if next_header == PROTO_HOPOPT and offset != 40:
                return ParameterProblem(DropReason.BAD_HEADER, PARAM_UNRECOGNIZED_NEXT_HEADER,
                                        nh_offset)
            if offset + 8 > end or offset + (buf[offset + 1] + 1) * 8 > end:
                if first_fragment:
                    return ParameterProblem(DropReason.BAD_FRAGMENT, PARAM_INCOMPLETE_CHAIN, 0)
                return DropReason.TRUNCATED
            length = (buf[offset + 1] + 1) * 8
            if next_header == PROTO_ROUTING:
                # RFC 8200 §4.4: an unrecognized Routing Type with Segments Left != 0 is
                # refused, pointing at the Routing Type; with 0 the header is ignored.
                if buf[offset + 3] != 0:
                    return ParameterProblem(DropReason.BAD_HEADER, PARAM_ERRONEOUS_HEADER,
                                            offset + 2)
            else:
                verdict = _options_verdict(buf, offset, offset + length, dst[0] == 0xFF)
                if verdict is not None:
                    return verdict
            nh_offset = offset
            next_header = buf[offset]
            offset += length
        elif next_header == PROTO_FRAGMENT:
            if fragment is not None:
                return DropReason.BAD_FRAGMENT
            if offset + 8 > end:
                return DropReason.TRUNCATED
            nxt, _res, off_flags, ident = FRAGMENT_HEADER.unpack_from(buf, offset)
            frag_offset = off_flags & 0xFFF8
            more = bool(off_flags & 1)
            data_len = end - offset - 8
            # RFC 8200 §4.5: a fragment that is not the last must be a multiple of 8 octets
            # long (pointer at the Payload Length), and no fragment may reach past 65535
            # octets of reassembled payload (pointer at the Fragment Offset).
            if more and data_len % 8:
                return ParameterProblem(DropReason.BAD_FRAGMENT, PARAM_ERRONEOUS_HEADER, 4)
            if frag_offset + data_len > 0xFFFF:
                return ParameterProblem(DropReason.BAD_FRAGMENT, PARAM_ERRONEOUS_HEADER,
                                        offset + 2)
            fragment = (frag_offset, more, ident, offset, nh_offset)
            nh_offset = offset
            next_header = nxt
            offset += 8
            if frag_offset != 0:
                # Only the first fragment carries the upper-layer header (RFC 8200 §4.5).
                return (payload_len, hop_limit, src, dst, next_header, offset, fragment,
                        traffic_class, nh_offset)
            first_fragment = more
        else:
            if first_fragment and offset + UPPER_HEADER_LENGTH.get(next_header, 0) > end:
                return ParameterProblem(DropReason.BAD_FRAGMENT, PARAM_INCOMPLETE_CHAIN, 0)
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
