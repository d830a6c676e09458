"""workers/engine/packet.py: IPv4/IPv6 header codecs and Internet checksums, vector tables.

Inputs are built with scapy; expected values are written out by hand from the RFCs.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw, raw
from support.helpers import packed4, packed6, ref_ones_sum

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.packet import (
    PROTO_FRAGMENT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    ParameterProblem,
    build_ipv4,
    build_ipv6,
    checksum,
    checksum_offset,
    fold,
    fold_udp,
    parse_ipv4,
    parse_ipv6,
    pseudo_sum_v6,
    set_checksum,
    sum16,
    sum_is_valid,
    transport_sum_is_valid_v4,
    transport_sum_is_valid_v6,
)

A6 = "2001:db8:1::1"
B6 = "2001:db8:2::2"

# --- checksums (RFC 1071, RFC 1624) ---------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    # RFC 1071 §3 worked example: words 0001 f203 f4f5 f6f7 sum to ddf2 -> checksum 220d.
    (bytes.fromhex("0001f203f4f5f6f7"), 0x220D),
    # RFC 1071 §4.1: an odd byte is padded on the right: 0001 f200 -> f201 -> 0dfe.
    (bytes.fromhex("0001f2"), 0x0DFE),
    # end-around carry: ffff + 0001 = 0001 (carry folded) -> fffe
    (bytes.fromhex("ffff0001"), 0xFFFE),
    # the IPv4 header of RFC 1071's companion examples (Wikipedia's well-known header)
    (bytes.fromhex("450000730000400040110000c0a80001c0a800c7"), 0xB861),
])
def test_rfc1071_checksum_vectors(data: bytes, expected: int) -> None:
    assert checksum(data) == expected


@pytest.mark.parametrize("data", [b"\x12\x34", b"\xff\xff\xff\xff\x00\x01", bytes(range(37)),
                                  b"\x80" * 1001])
def test_rfc1071_sum16_agrees_with_word_by_word_sum(data: bytes) -> None:
    # sum16 is a fast congruent sum; folded it must be the RFC 1071 ones' complement sum
    # (0xffff and 0 are the two zeros of ones' complement).
    ref = ref_ones_sum(data)
    assert sum16(data) % 0xFFFF == ref % 0xFFFF


def test_rfc1624_3_fold_writes_plus_zero() -> None:
    # A non-zero sum congruent to 0 is -0 (0xffff); its complement is +0 (RFC 1624 §3).
    assert fold(0xFFFF) == 0
    assert fold(0xFFFF * 7) == 0
    assert fold(0) == 0xFFFF  # all-zero data: sum +0, checksum 0xffff
    assert fold(0x1234) == 0xFFFF - 0x1234


def test_rfc768_udp_never_sends_zero_checksum() -> None:
    # A UDP checksum of 0 means "none"; a computed zero is sent as 0xffff (RFC 768).
    assert fold_udp(0xFFFF) == 0xFFFF
    assert fold_udp(0x1234) == 0xFFFF - 0x1234


def test_rfc1071_inserting_the_checksum_makes_the_block_verify() -> None:
    block = bytearray(bytes.fromhex("4500003c1c4640004006") + b"\0\0" + packed4("172.16.10.99")
                      + packed4("172.16.10.12"))
    block[10:12] = checksum(block).to_bytes(2, "big")
    assert sum_is_valid(sum16(block))
    assert ref_ones_sum(bytes(block)) == 0xFFFF
    block[0] ^= 0x01
    assert not sum_is_valid(sum16(block))


def test_rfc8200_8_1_set_checksum_matches_scapy_udp() -> None:
    pkt = IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / Raw(b"odd")
    segment = bytearray(raw(pkt)[40:])
    set_checksum(segment, 6, pseudo_sum_v6(packed6(A6), packed6(B6), PROTO_UDP, len(segment)))
    assert int.from_bytes(segment[6:8], "big") == IPv6(raw(pkt))[UDP].chksum
    assert transport_sum_is_valid_v6(packed6(A6), packed6(B6), PROTO_UDP, bytes(segment))
    segment[-1] ^= 0x40
    assert not transport_sum_is_valid_v6(packed6(A6), packed6(B6), PROTO_UDP, bytes(segment))


def test_rfc793_transport_sum_v4_verifies_scapy_tcp() -> None:
    pkt = IP(raw(IP(src="192.0.2.1", dst="198.51.100.2") / TCP(sport=5, dport=6, flags="S")
                 / Raw(b"abc")))
    segment = raw(pkt)[20:]
    assert transport_sum_is_valid_v4(packed4("192.0.2.1"), packed4("198.51.100.2"), PROTO_TCP,
                                     segment)
    assert not transport_sum_is_valid_v4(packed4("192.0.2.1"), packed4("198.51.100.3"),
                                         PROTO_TCP, segment)


@pytest.mark.parametrize(("proto", "offset"), [
    (PROTO_TCP, 16), (PROTO_UDP, 6), (PROTO_ICMPV6, 2), (PROTO_ICMP, 2), (132, None), (0, None)])
def test_checksum_offset_per_transport(proto: int, offset: int | None) -> None:
    assert checksum_offset(proto) == offset


# --- IPv4 (RFC 791) ---------------------------------------------------------------------------

def _v4(**kw: object) -> bytes:
    return raw(IP(src="192.0.2.1", dst="198.51.100.2", **kw) / UDP(sport=1, dport=2) / b"data")


def _with(buf: bytes, offset: int, value: bytes, fix_checksum: bool = True) -> bytes:
    out = bytearray(buf)
    out[offset:offset + len(value)] = value
    if fix_checksum:
        hl = (out[0] & 0x0F) * 4
        out[10:12] = b"\0\0"
        out[10:12] = checksum(out[:hl]).to_bytes(2, "big")
    return bytes(out)


GOOD4 = _v4(ttl=17, tos=0xB8, id=0x1234, flags="DF")


@pytest.mark.parametrize(("packet", "expected"), [
    pytest.param(GOOD4[:19], DropReason.TRUNCATED, id="shorter_than_20"),
    pytest.param(b"", DropReason.TRUNCATED, id="empty"),
    pytest.param(_with(GOOD4, 0, b"\x65"), DropReason.BAD_VERSION, id="version_6"),
    pytest.param(_with(GOOD4, 0, b"\x44"), DropReason.BAD_HEADER, id="ihl_4"),
    pytest.param(_with(GOOD4, 2, b"\x00\x13"), DropReason.BAD_HEADER, id="total_lt_header"),
    pytest.param(_with(GOOD4, 2, b"\x01\x00"), DropReason.TRUNCATED, id="total_gt_buffer"),
    pytest.param(_with(GOOD4, 10, b"\x00\x00", fix_checksum=False), DropReason.BAD_CHECKSUM,
                 id="zero_checksum"),
    pytest.param(_with(GOOD4, 8, b"\x10", fix_checksum=False), DropReason.BAD_CHECKSUM,
                 id="ttl_changed_checksum_not"),
])
def test_rfc791_parse_ipv4_rejects(packet: bytes, expected: DropReason) -> None:
    assert parse_ipv4(packet) is expected


def test_rfc791_parse_ipv4_fields() -> None:
    view = parse_ipv4(GOOD4)
    assert view == (20, len(GOOD4), 0x1234, 0x4000, 17, PROTO_UDP, packed4("192.0.2.1"),
                    packed4("198.51.100.2"), 0xB8)


def test_rfc791_parse_ipv4_skips_options() -> None:
    # IHL 6: a 4-byte option (NOP NOP NOP EOL) sits between the header and UDP.
    pkt = raw(IP(src="192.0.2.1", dst="198.51.100.2", options=[b"\x01\x01\x01\x00"])
              / UDP(sport=1, dport=2))
    view = parse_ipv4(pkt)
    assert not isinstance(view, DropReason)
    assert view[0] == 24 and view[1] == 32


def test_rfc791_parse_ipv4_trailing_bytes_are_not_the_packet() -> None:
    # A link layer may pad: total length, not the buffer, says where the packet ends.
    view = parse_ipv4(GOOD4 + b"\0" * 11)
    assert not isinstance(view, DropReason)
    assert view[1] == len(GOOD4)


def test_rfc791_build_ipv4_is_what_scapy_reads() -> None:
    out = build_ipv4(packed4("192.0.2.1"), packed4("198.51.100.2"), PROTO_UDP, b"12345678",
                     ttl=9, ident=0xBEEF, flags_offset=0x4000, tos=0x20)
    pkt = IP(out)
    assert (pkt.version, pkt.ihl, pkt.len, pkt.id, int(pkt.flags), pkt.frag, pkt.ttl,
            pkt.proto, pkt.tos) == (4, 5, 28, 0xBEEF, 2, 0, 9, PROTO_UDP, 0x20)
    assert (pkt.src, pkt.dst) == ("192.0.2.1", "198.51.100.2")
    check = pkt.chksum
    del pkt.chksum
    assert IP(raw(pkt)).chksum == check


# --- IPv6 (RFC 8200) --------------------------------------------------------------------------

def _v6(*layers: object, tc: int = 0, hlim: int = 64) -> bytes:
    pkt = IPv6(src=A6, dst=B6, tc=tc, hlim=hlim)
    for layer in layers:
        pkt = pkt / layer
    return raw(pkt)


UDP_TAIL = UDP(sport=1000, dport=53) / Raw(b"x" * 5)


@pytest.mark.parametrize(("packet", "upper_proto", "upper_offset"), [
    pytest.param(_v6(UDP_TAIL), PROTO_UDP, 40, id="plain_udp"),
    pytest.param(_v6(IPv6ExtHdrHopByHop(), UDP_TAIL), PROTO_UDP, 48, id="hop_by_hop"),
    pytest.param(_v6(IPv6ExtHdrDestOpt(), UDP_TAIL), PROTO_UDP, 48, id="dest_opts"),
    pytest.param(_v6(IPv6ExtHdrRouting(segleft=0, addresses=[B6]), UDP_TAIL), PROTO_UDP, 64,
                 id="routing_segleft_0"),
    pytest.param(_v6(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0),
                     IPv6ExtHdrDestOpt(), UDP_TAIL), PROTO_UDP, 72, id="chain_of_four"),
    pytest.param(_v6(ICMPv6EchoRequest()), PROTO_ICMPV6, 40, id="icmpv6"),
    pytest.param(_v6(IPv6ExtHdrDestOpt(nh=59)), 59, 48, id="no_next_header"),
])
def test_rfc8200_4_extension_header_chain_walked(packet: bytes, upper_proto: int,
                                                 upper_offset: int) -> None:
    view = parse_ipv6(packet)
    assert not isinstance(view, DropReason), view
    assert (view[4], view[5], view[6]) == (upper_proto, upper_offset, None)


def test_rfc8200_3_parse_ipv6_fields() -> None:
    packet = _v6(UDP_TAIL, tc=0xB8, hlim=7)
    view = parse_ipv6(packet)
    assert view == (13, 7, packed6(A6), packed6(B6), PROTO_UDP, 40, None, 0xB8, 6)


def test_rfc8200_4_5_first_fragment_reported() -> None:
    packet = _v6(IPv6ExtHdrFragment(id=0xDEADBEEF, m=1, offset=0),
                 UDP(sport=1000, dport=53) / Raw(b"x" * 8))
    view = parse_ipv6(packet)
    assert not isinstance(view, DropReason)
    # (offset bytes, M, identification, fragment header offset, offset of the byte naming it)
    assert view[6] == (0, True, 0xDEADBEEF, 40, 6)
    assert (view[4], view[5]) == (PROTO_UDP, 48)


def test_rfc8200_4_5_later_fragment_stops_at_fragment_header() -> None:
    packet = _v6(IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(nh=PROTO_UDP, id=9, m=0, offset=5),
                 Raw(b"y" * 16))
    view = parse_ipv6(packet)
    assert not isinstance(view, DropReason)
    assert view[6] == (40, False, 9, 48, 40)
    assert (view[4], view[5]) == (PROTO_UDP, 56)


def _nine_dest_opts() -> bytes:
    layers: list[object] = [IPv6ExtHdrDestOpt() for _ in range(9)]
    return _v6(*layers, UDP_TAIL)


def _payload_len(packet: bytes, value: int) -> bytes:
    return packet[:4] + value.to_bytes(2, "big") + packet[6:]


@pytest.mark.parametrize(("packet", "expected"), [
    pytest.param(b"", DropReason.TRUNCATED, id="empty"),
    pytest.param(_v6(UDP_TAIL)[:39], DropReason.TRUNCATED, id="short_header"),
    pytest.param(b"\x40" + _v6(UDP_TAIL)[1:], DropReason.BAD_VERSION, id="version_4"),
    pytest.param(_payload_len(_v6(UDP_TAIL), 14), DropReason.TRUNCATED, id="plen_past_end"),
    pytest.param(_v6(IPv6ExtHdrFragment(m=0), IPv6ExtHdrFragment(m=1), UDP_TAIL),
                 DropReason.BAD_FRAGMENT, id="two_fragment_headers"),
    pytest.param(_nine_dest_opts(), DropReason.BAD_HEADER, id="nine_extension_headers"),
    pytest.param(_payload_len(_v6(IPv6ExtHdrDestOpt(), UDP_TAIL), 4), DropReason.TRUNCATED,
                 id="ext_header_past_payload_length"),
    pytest.param(_payload_len(_v6(IPv6ExtHdrFragment(), UDP_TAIL), 4), DropReason.TRUNCATED,
                 id="fragment_header_past_payload_length"),
])
def test_rfc8200_4_parse_ipv6_rejects(packet: bytes, expected: DropReason) -> None:
    assert parse_ipv6(packet) is expected


@pytest.mark.parametrize(("packet", "expected"), [
    # RFC 8200 §4.4: a Routing header with Segments Left != 0 -> code 0 at the Routing Type.
    pytest.param(_v6(IPv6ExtHdrRouting(segleft=1, addresses=[B6]), UDP_TAIL),
                 ParameterProblem(DropReason.BAD_HEADER, 0, 42), id="routing_segleft_1"),
    # RFC 8200 §4.3: Hop-by-Hop only immediately after the IPv6 header -> code 1 at the
    # Next Header field that names it (the Destination Options header's first octet).
    pytest.param(_v6(IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), UDP_TAIL),
                 ParameterProblem(DropReason.BAD_HEADER, 1, 40), id="hop_by_hop_not_first"),
])
def test_rfc8200_4_parse_ipv6_refuses_with_parameter_problem(
        packet: bytes, expected: ParameterProblem) -> None:
    assert parse_ipv6(packet) == expected


def test_rfc8200_4_eight_extension_headers_still_walked() -> None:
    layers: list[object] = [IPv6ExtHdrDestOpt() for _ in range(7)]
    view = parse_ipv6(_v6(*layers, UDP_TAIL))
    assert not isinstance(view, DropReason)
    assert view[4] == PROTO_UDP and view[5] == 40 + 7 * 8


def test_rfc8200_3_trailing_bytes_outside_payload_length_ignored() -> None:
    packet = _v6(IPv6ExtHdrDestOpt(), UDP_TAIL)
    view = parse_ipv6(packet + b"\xff" * 9)
    assert view == parse_ipv6(packet)


def test_rfc7915_4_1_build_ipv6_flow_label_zero_and_fields() -> None:
    out = build_ipv6(packed6(A6), packed6(B6), PROTO_FRAGMENT, b"z" * 8, hop_limit=3,
                     traffic_class=0xA5)
    pkt = IPv6(out)
    assert (pkt.version, pkt.tc, pkt.fl, pkt.plen, pkt.nh, pkt.hlim) == (
        6, 0xA5, 0, 8, PROTO_FRAGMENT, 3)
    assert (pkt.src, pkt.dst) == (A6, B6)
