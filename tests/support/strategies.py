"""Hypothesis strategies and byte-level builders for the property suite.

Packets are assembled with ``struct`` and their checksums computed with the slow reference
of tests/unit/helpers.py, never with the engine's own checksum code.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from support.helpers import packed6, ref_ones_sum

# RFC 8200 §4 extension header numbers and the transports the engine knows
HOPOPT, TCP, UDP, ROUTING, FRAGMENT, ICMPV6, NONE, DSTOPTS = 0, 6, 17, 43, 44, 58, 59, 60


def ref_checksum(data: bytes) -> int:
    return ~ref_ones_sum(data) & 0xFFFF


def pseudo_v6(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, proto)


def with_transport_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> bytes:
    """``segment`` with its TCP/UDP/ICMPv6 checksum field filled in (RFC 8200 §8.1)."""
    offset = {TCP: 16, UDP: 6, ICMPV6: 2}.get(proto)
    if offset is None or len(segment) < offset + 2:
        return segment
    seg = bytearray(segment)
    seg[offset:offset + 2] = b"\0\0"
    value = ref_checksum(pseudo_v6(src, dst, proto, len(seg)) + bytes(seg))
    if proto == UDP and value == 0:
        value = 0xFFFF
    seg[offset:offset + 2] = value.to_bytes(2, "big")
    return bytes(seg)


def ipv6(src: bytes, dst: bytes, next_header: int, payload: bytes, hop_limit: int = 64,
         traffic_class: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (traffic_class << 20), len(payload),
                       next_header, hop_limit, src, dst) + payload


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64, ident: int = 0,
         flags_offset: int = 0, tos: int = 0) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident,
                                   flags_offset, ttl, proto, 0, src, dst))
    header[10:12] = ref_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def pseudo_v4(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!xBH", proto, length)


def with_transport_checksum_v4(src: bytes, dst: bytes, proto: int, segment: bytes) -> bytes:
    offset = {TCP: 16, UDP: 6}.get(proto)
    if offset is None or len(segment) < offset + 2:
        return segment
    seg = bytearray(segment)
    seg[offset:offset + 2] = b"\0\0"
    value = ref_checksum(pseudo_v4(src, dst, proto, len(seg)) + bytes(seg))
    seg[offset:offset + 2] = (value or 0xFFFF).to_bytes(2, "big")
    return bytes(seg)


# --- strategies -------------------------------------------------------------------------------

GW6 = packed6("2002:c000:20a::1")
CLIENT6 = packed6("2002:c633:6401::1")

addresses6 = st.one_of(
    st.just(GW6), st.just(CLIENT6), st.binary(min_size=16, max_size=16),
    st.sampled_from([packed6(a) for a in ("::", "::1", "ff02::1", "fe80::1", "2001:db8::1")]))


@st.composite
def extension_header(draw: st.DrawFn, kind: int) -> tuple[int, bytes]:
    """(kind, body without its next-header byte) of one extension header."""
    if kind == FRAGMENT:
        offset = draw(st.integers(0, 0x1FFF))
        more = draw(st.integers(0, 1))
        ident = draw(st.integers(0, 0xFFFFFFFF))
        return kind, struct.pack("!BHI", 0, (offset << 3) | more, ident)
    units = draw(st.integers(0, 2))
    body = bytearray(draw(st.binary(min_size=7 + 8 * units, max_size=7 + 8 * units)))
    body[0] = units
    if kind == ROUTING and draw(st.booleans()):
        body[2] = 0  # segments left 0: skippable
    return kind, bytes(body)


@st.composite
def ipv6_packets(draw: st.DrawFn, src: bytes | None = None, dst: bytes | None = None,
                 valid_checksum: bool = True) -> bytes:
    """A structurally plausible IPv6 packet: right version and payload length, a random chain
    of extension headers, a random upper layer (often with a valid checksum)."""
    s = src or draw(addresses6)
    d = dst or draw(st.one_of(st.just(GW6), addresses6))
    kinds = draw(st.lists(st.sampled_from([HOPOPT, DSTOPTS, ROUTING, FRAGMENT]), max_size=3))
    upper = draw(st.sampled_from([TCP, UDP, ICMPV6, NONE, 132, TCP, UDP]))
    if upper == TCP:
        header = bytearray(draw(st.binary(min_size=20, max_size=20)))
        header[2:4] = draw(st.sampled_from([b"\x00\x50", b"\x00\x51", b"\x1f\x40", b"\x1f\x49"]))
        header[12] = draw(st.sampled_from([0x50, 0x60, 0x70, 0x00, 0xF0]))
        header[13] = draw(st.sampled_from([0x02, 0x02, 0x12, 0x10, 0x04, 0x11, header[13]]))
        options = draw(st.binary(max_size=(header[12] >> 4) * 4 - 20 if header[12] >= 0x50
                                 else 0))
        segment = bytes(header) + options + draw(st.binary(max_size=64))
    elif upper == UDP:
        header = bytearray(draw(st.binary(min_size=8, max_size=8)))
        header[2:4] = draw(st.sampled_from([b"\x00\x35", b"\x00\x63", b"\x1b\x58"]))
        segment = bytes(header) + draw(st.binary(max_size=64))
    elif upper == ICMPV6:
        segment = bytes([draw(st.sampled_from([128, 129, 1, 3, 133, 135, 137, 200]))]) + draw(
            st.binary(min_size=3, max_size=64))
    else:
        segment = draw(st.binary(max_size=32))
    if valid_checksum and draw(st.integers(0, 9)) > 0:
        segment = with_transport_checksum(s, d, upper, segment)
    chain = [draw(extension_header(k)) for k in kinds]
    # each extension header is [next header][body]; the last one names the upper layer
    out = b""
    nxt = upper
    for kind, body in reversed(chain):
        out = bytes([nxt]) + body + out
        nxt = kind
    return ipv6(s, d, nxt, out + segment, hop_limit=draw(st.integers(0, 255)),
                traffic_class=draw(st.integers(0, 255)))
