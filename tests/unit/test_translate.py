"""workers/engine/translate.py: RFC 7915 header translation with an RFC 6146 session, MSS clamping,
and the §4.2/§4.3 ICMPv4 error translation tables.

The functions are called directly with a hand-made Session; packets in and out go through
scapy. End-to-end behaviour through the Datapath is in test_datapath.py.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
)
from scapy.packet import Packet, Raw, raw
from support.helpers import packed4, packed6, tcp_mss

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import Session
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP, sum16
from sixgate.workers.engine.translate import (
    DF_THRESHOLD,
    clamp_mss,
    icmpv4_error_key,
    translate_icmpv4_error,
    translate_v4_to_v6,
    translate_v6_to_v4,
)

CLIENT = "2002:c633:6401::1"
GW = "2002:c000:20a::1"
POOL4 = "100.64.0.1"
SVC = "127.0.0.1"


def session(proto: int = PROTO_UDP, cport: int = 40000, gwport: int = 53,
            tport: int = 5353) -> Session:
    return Session(proto, packed6(CLIENT), cport, packed6(GW), gwport, packed4(POOL4),
                   packed4(SVC), tport, "rule", "open", 0.0, 300.0)


def v6_to_v4(pkt6: Packet, s: Session, hop_limit: int = 63, ident: int = 1,
             max_mss: int = 1420) -> IP:
    data = raw(pkt6)
    proto = s.proto
    out = translate_v6_to_v4(data, 40, proto, sum16(data[40:]), s, hop_limit, ident, max_mss)
    return IP(out)


def scapy_checksum_ok(pkt: Packet, layer: type[Packet]) -> bool:
    got = pkt[layer].chksum
    again = pkt.__class__(raw(pkt))
    del again[layer].chksum
    return pkt.__class__(raw(again))[layer].chksum == got


# --- MSS clamping -----------------------------------------------------------------------------

def tcp_bytes(flags: str, options: list[tuple[str, object]]) -> bytearray:
    return bytearray(raw(TCP(sport=1, dport=2, flags=flags, options=options)))


@pytest.mark.parametrize(("flags", "options", "max_mss", "mss_after", "delta"), [
    pytest.param("S", [("MSS", 65000)], 1420, 1420, 1420 - 65000, id="syn_lowered"),
    pytest.param("SA", [("MSS", 65495)], 1220, 1220, 1220 - 65495, id="synack_lowered"),
    pytest.param("S", [("MSS", 1200)], 1420, 1200, 0, id="syn_already_small"),
    pytest.param("S", [("MSS", 1420)], 1420, 1420, 0, id="syn_equal"),
    pytest.param("S", [("NOP", None), ("WScale", 7), ("SAckOK", b""), ("MSS", 9000)], 1420,
                 1420, 1420 - 9000, id="mss_after_other_options"),
    pytest.param("A", [("MSS", 9000)], 1420, 9000, 0, id="not_a_syn_untouched"),
    pytest.param("S", [], 1420, None, 0, id="no_mss_option"),
])
def test_mss_clamp_table(flags: str, options: list[tuple[str, object]], max_mss: int,
                         mss_after: int | None, delta: int) -> None:
    segment = tcp_bytes(flags, options)
    assert clamp_mss(segment, max_mss) == delta
    assert tcp_mss(TCP(bytes(segment))) == mss_after


@pytest.mark.parametrize("options", [
    b"\x02\x00\xff\xff",  # length 0
    b"\x02\x01\xff\xff",  # length 1
    b"\x02\x09\xff\xff",  # runs past the header
    b"\x00\x02\x04\xff",  # end of list before MSS
    b"\x01\x01\x01\x02",  # NOPs then a kind with no room for its length
])
def test_mss_clamp_malformed_options_left_alone(options: bytes) -> None:
    segment = bytearray(raw(TCP(sport=1, dport=2, flags="S", dataofs=6))[:20] + options)
    before = bytes(segment)
    assert clamp_mss(segment, 1000) == 0
    assert bytes(segment) == before


# --- IPv6 -> IPv4 (RFC 7915 §5.1) -------------------------------------------------------------

def test_rfc7915_5_1_hop_limit_to_ttl() -> None:
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW, hlim=64) / UDP(sport=40000, dport=53) / b"q",
                   session(), hop_limit=63)
    assert pkt.ttl == 63


@pytest.mark.parametrize("tc", [0x00, 0x01, 0x2E, 0xB8, 0xFF])
def test_rfc7915_5_1_traffic_class_to_tos(tc: int) -> None:
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW, tc=tc, fl=0xABCDE) / UDP(sport=40000, dport=53),
                   session())
    assert pkt.tos == tc


@pytest.mark.parametrize(("payload_len", "df"), [
    (0, False), (1232, False),  # 20 + 8 + 1232 = 1260: DF clear
    (1233, True), (1400, True),  # 1261 and above: DF set
])
def test_rfc7915_5_df_rule_1260_bytes(payload_len: int, df: bool) -> None:
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW) / UDP(sport=40000, dport=53) / bytes(payload_len),
                   session())
    assert pkt.len == 28 + payload_len
    assert bool(pkt.flags.DF) is df and pkt.flags.MF == 0 and pkt.frag == 0
    assert DF_THRESHOLD == 1260


def test_rfc7915_5_1_addresses_ports_protocol_ident() -> None:
    s = session(PROTO_TCP, cport=40001, gwport=80, tport=8080)
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW) / TCP(sport=40001, dport=80, flags="S")
                   / b"abc", s, ident=0x4242)
    assert (pkt.src, pkt.dst, pkt.proto, pkt.id) == (POOL4, SVC, PROTO_TCP, 0x4242)
    assert (pkt[TCP].sport, pkt[TCP].dport, raw(pkt[TCP].payload)) == (40001, 8080, b"abc")
    assert scapy_checksum_ok(pkt, TCP) and scapy_checksum_ok(pkt, IP)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 999])
def test_rfc7915_5_5_udp_checksum_updated(size: int) -> None:
    payload = bytes(i % 256 for i in range(size))
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW) / UDP(sport=40000, dport=53) / payload, session())
    assert raw(pkt[UDP].payload) == payload
    assert scapy_checksum_ok(pkt, UDP)


def test_mss_clamped_v6_to_v4_with_checksum() -> None:
    s = session(PROTO_TCP, gwport=80, tport=8080)
    pkt = v6_to_v4(IPv6(src=CLIENT, dst=GW) / TCP(sport=40000, dport=80, flags="S",
                                                    options=[("MSS", 65000)]), s, max_mss=1420)
    assert tcp_mss(pkt[TCP]) == 1420
    assert scapy_checksum_ok(pkt, TCP)


# --- IPv4 -> IPv6 (RFC 7915 §4.1) -------------------------------------------------------------

def v4_to_v6(pkt4: Packet, s: Session, max_mss: int = 1420) -> IPv6:
    data = raw(pkt4)
    hl = (data[0] & 0x0F) * 4
    segment = translate_v4_to_v6(data, hl, len(data), s.proto, s, max_mss)
    # the caller builds the IPv6 header; wrap it with scapy to read the result
    return IPv6(raw(IPv6(src=GW, dst=CLIENT, nh=s.proto) / Raw(segment)))


def test_rfc7915_4_5_ports_and_checksum_v4_to_v6() -> None:
    s = session()
    pkt = v4_to_v6(IP(src=SVC, dst=POOL4) / UDP(sport=5353, dport=40000) / b"answer", s)
    assert (pkt[UDP].sport, pkt[UDP].dport, raw(pkt[UDP].payload)) == (53, 40000, b"answer")
    assert scapy_checksum_ok(pkt, UDP)


def test_rfc7915_4_5_zero_udp_checksum_computed() -> None:
    s = session()
    zero = IP(raw(IP(src=SVC, dst=POOL4) / UDP(sport=5353, dport=40000, chksum=0) / b"x"))
    assert zero[UDP].chksum == 0
    pkt = v4_to_v6(zero, s)
    assert pkt[UDP].chksum != 0 and scapy_checksum_ok(pkt, UDP)


def test_rfc7915_4_5_partial_checksum_recomputed() -> None:
    # CHECKSUM_PARTIAL from a local capture: only the pseudo-header sum is in the field.
    s = session(PROTO_TCP, gwport=80, tport=8080)
    pkt = v4_to_v6(IP(src=SVC, dst=POOL4) / TCP(sport=8080, dport=40000, flags="A",
                                                 chksum=0x1234) / b"data", s)
    assert scapy_checksum_ok(pkt, TCP)


def test_mss_clamped_v4_to_v6() -> None:
    s = session(PROTO_TCP, gwport=80, tport=8080)
    pkt = v4_to_v6(IP(src=SVC, dst=POOL4) / TCP(sport=8080, dport=40000, flags="SA",
                                                 options=[("MSS", 65495)]), s, max_mss=1420)
    assert tcp_mss(pkt[TCP]) == 1420 and scapy_checksum_ok(pkt, TCP)


def test_rfc791_options_skipped_v4_to_v6() -> None:
    s = session()
    pkt = v4_to_v6(IP(src=SVC, dst=POOL4, options=[b"\x01\x01\x01\x00"])
                   / UDP(sport=5353, dport=40000) / b"opt", s)
    assert raw(pkt[UDP].payload) == b"opt" and scapy_checksum_ok(pkt, UDP)


# --- ICMPv4 errors (RFC 7915 §4.2, §4.3) ------------------------------------------------------

def quoted_request(proto: int = PROTO_UDP) -> IP:
    """The packet we sent to the service, as the service's stack quotes it."""
    if proto == PROTO_UDP:
        l4: Packet = UDP(sport=40000, dport=5353) / b"hello"
    else:
        l4 = TCP(sport=40000, dport=8080, flags="S", seq=77)
    return IP(raw(IP(src=POOL4, dst=SVC, ttl=63) / l4))


def icmp_error(icmp_type: int, code: int, *, unused: int = 0, ptr: int | None = None,
               quote: bytes | None = None, proto: int = PROTO_UDP) -> bytes:
    icmp = ICMP(type=icmp_type, code=code)
    if ptr is not None:
        icmp.ptr = ptr
    elif icmp_type == 3 and code == 4:
        icmp.nexthopmtu = unused
    body = raw(quoted_request(proto)) if quote is None else quote
    return raw(IP(src=SVC, dst=POOL4) / icmp / Raw(body))


def translate_error(packet: bytes, s: Session | None = None, tunnel_mtu: int = 1480,
                    ) -> IPv6 | DropReason:
    out = translate_icmpv4_error(packet, 20, len(packet), s or session(), tunnel_mtu)
    return out if isinstance(out, DropReason) else IPv6(out)


UNREACH_TABLE = [
    # ICMPv4 Destination Unreachable code -> (ICMPv6 type, code, 32-bit rest)
    (0, (1, 0, 0)), (1, (1, 0, 0)), (2, (4, 1, 6)), (3, (1, 4, 0)), (5, (1, 0, 0)),
    (6, (1, 0, 0)), (7, (1, 0, 0)), (8, (1, 0, 0)), (9, (1, 1, 0)), (10, (1, 1, 0)),
    (11, (1, 0, 0)), (12, (1, 0, 0)), (13, (1, 1, 0)), (15, (1, 1, 0)),
]


@pytest.mark.parametrize(("code", "expected"), UNREACH_TABLE)
def test_rfc7915_4_2_destination_unreachable_codes(code: int,
                                                   expected: tuple[int, int, int]) -> None:
    pkt = translate_error(icmp_error(3, code))
    assert not isinstance(pkt, DropReason)
    msg = raw(pkt)[40:48]
    assert (msg[0], msg[1], int.from_bytes(msg[4:8], "big")) == expected


@pytest.mark.parametrize("code", [14, 16, 255])
def test_rfc7915_4_2_untranslatable_unreachable_codes_dropped(code: int) -> None:
    assert translate_error(icmp_error(3, code)) is DropReason.ICMP_NOT_TRANSLATED


@pytest.mark.parametrize(("mtu4", "tunnel_mtu", "expected"), [
    (1000, 1480, 1280),  # never below 1280
    (0, 1480, 1280),  # an RFC 1191-less router
    (1400, 1480, 1420),  # + 20 for the bigger IPv6 header
    (1460, 1480, 1480),
    (1500, 1480, 1480),  # never above what the tunnel carries
    (1400, 1280, 1280),
])
def test_rfc7915_4_2_fragmentation_needed_to_packet_too_big(mtu4: int, tunnel_mtu: int,
                                                            expected: int) -> None:
    pkt = translate_error(icmp_error(3, 4, unused=mtu4), tunnel_mtu=tunnel_mtu)
    assert not isinstance(pkt, DropReason)
    assert pkt[ICMPv6PacketTooBig].mtu == expected


@pytest.mark.parametrize("code", [0, 1])
def test_rfc7915_4_2_time_exceeded_same_code(code: int) -> None:
    pkt = translate_error(icmp_error(11, code))
    assert not isinstance(pkt, DropReason)
    assert (pkt[ICMPv6TimeExceeded].type, pkt[ICMPv6TimeExceeded].code) == (3, code)


POINTER_TABLE = [(0, 0), (1, 1), (2, 4), (3, 4), (8, 7), (9, 6), (12, 8), (13, 8), (14, 8),
                 (15, 8), (16, 24), (17, 24), (18, 24), (19, 24)]


@pytest.mark.parametrize(("ptr4", "ptr6"), POINTER_TABLE)
@pytest.mark.parametrize("code", [0, 2])
def test_rfc7915_4_2_parameter_problem_pointer(code: int, ptr4: int, ptr6: int) -> None:
    pkt = translate_error(icmp_error(12, code, ptr=ptr4))
    assert not isinstance(pkt, DropReason)
    msg = pkt[ICMPv6ParamProblem]
    assert (msg.type, msg.code, msg.ptr) == (4, 0, ptr6)


@pytest.mark.parametrize(("icmp_type", "code", "ptr"), [
    (12, 0, 4), (12, 0, 10), (12, 1, 0), (5, 0, None), (4, 0, None), (0, 0, None),
    (8, 0, None), (13, 0, None)])
def test_rfc7915_4_2_untranslated_icmp_dropped(icmp_type: int, code: int,
                                               ptr: int | None) -> None:
    assert translate_error(icmp_error(icmp_type, code, ptr=ptr)) is (
        DropReason.ICMP_NOT_TRANSLATED)


def test_rfc7915_4_3_embedded_packet_translated_back() -> None:
    # the client's UDP packet: 2002:c633:6401::1.40000 -> 2002:c000:20a::1.53, hop limit 64
    original = IPv6(raw(IPv6(src=CLIENT, dst=GW, hlim=64) / UDP(sport=40000, dport=53)
                        / b"hello"))
    pkt = translate_error(icmp_error(3, 3))
    assert not isinstance(pkt, DropReason)
    assert (pkt.src, pkt.dst) == (GW, CLIENT)
    quoted = pkt[IPerror6]
    assert (quoted.src, quoted.dst, quoted.nh, quoted.plen) == (CLIENT, GW, PROTO_UDP, 13)
    assert quoted.hlim == 63  # §4.3: the quoted TTL, not decremented again
    assert (quoted[UDPerror].sport, quoted[UDPerror].dport) == (40000, 53)
    # the quoted UDP checksum is the client's own again
    assert quoted[UDPerror].chksum == original[UDP].chksum
    assert raw(quoted[UDPerror].payload) == b"hello"
    check = pkt[ICMPv6DestUnreach].cksum
    again = IPv6(raw(pkt))
    del again[ICMPv6DestUnreach].cksum
    assert IPv6(raw(again))[ICMPv6DestUnreach].cksum == check


def test_rfc7915_4_3_embedded_tcp_quote_of_8_bytes() -> None:
    s = session(PROTO_TCP, gwport=80, tport=8080)
    quote = raw(quoted_request(PROTO_TCP))[:28]  # IPv4 header + 8 bytes, as RFC 792 asks
    pkt = translate_error(icmp_error(3, 1, quote=quote), s)
    assert not isinstance(pkt, DropReason)
    body = raw(pkt)[48:]
    assert IPv6(body).src == CLIENT and body[40:44] == (40000).to_bytes(2, "big") + (
        80).to_bytes(2, "big")
    # quoted payload length is the original's (20-byte TCP header), not the quote's 8
    assert int.from_bytes(body[4:6], "big") == 20


def test_rfc4443_2_4_c_translated_error_at_most_1280_bytes() -> None:
    big = IP(raw(IP(src=POOL4, dst=SVC, ttl=63) / UDP(sport=40000, dport=5353)
                 / bytes(1400)))
    pkt = translate_error(icmp_error(3, 3, quote=raw(big)))
    assert not isinstance(pkt, DropReason)
    assert len(raw(pkt)) == 1280


@pytest.mark.parametrize(("quote", "expected"), [
    pytest.param(raw(quoted_request())[:23], DropReason.TRUNCATED, id="quote_too_short"),
    pytest.param(b"\x65" + raw(quoted_request())[1:], DropReason.TRUNCATED, id="quote_not_v4"),
    # An echo request's quote names a NAT64 query session (RFC 6146 §3.5.3); no other ICMP.
    pytest.param(raw(IP(src=POOL4, dst=SVC) / ICMP(type=0)), DropReason.ICMP_NOT_TRANSLATED,
                 id="quote_is_icmp_not_an_echo_request"),
])
def test_rfc7915_4_3_icmpv4_error_key_rejects(quote: bytes, expected: DropReason) -> None:
    packet = icmp_error(3, 3, quote=quote)
    assert icmpv4_error_key(packet, 20, len(packet)) is expected


def test_rfc7915_4_3_icmpv4_error_key_names_the_session() -> None:
    packet = icmp_error(3, 3)
    assert icmpv4_error_key(packet, 20, len(packet)) == (
        PROTO_UDP, packed4(POOL4), 40000, packed4(SVC), 5353)


def test_icmpv4_quote_classes_parse() -> None:
    # sanity of the fixture itself: scapy sees an ICMP error quoting our UDP packet
    pkt = IP(icmp_error(3, 3))
    assert pkt[IPerror].src == POOL4 and pkt[UDPerror].dport == 5353
