"""scapy reads what the engine writes: every checksum is the one scapy computes (delete the
field, rebuild, compare) and every header field is what RFC 7915 asks for.

The engine is only driven here (through the two-party helper); the verdict is always
scapy's. Outputs covered: IPv4 to the services (UDP, TCP with clamped MSS, data, ICMPv4
Fragmentation Needed), IPv6 to the tunnel (UDP, TCP, echo reply, RST, ICMPv6 errors of our
own, translated ICMPv4 errors, fragments).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPerror6,
    IPv6,
    IPv6ExtHdrFragment,
    defragment6,
)
from scapy.packet import Raw, raw
from support.helpers import (
    CLIENT6_6TO4,
    GW6_6TO4,
    TwoParty,
    client_tcp,
    client_udp,
    icmp4_error_about,
    make_datapath,
    reply_to,
)
from support.scapy_check import checksums_match, recomputed


def party(mode: str = "6to4", **overrides: object) -> TwoParty:
    return TwoParty(make_datapath(mode, **overrides))


def assert_checksums(data: bytes) -> None:
    for name, (ours, theirs) in recomputed(data).items():
        assert ours == theirs, f"{name}: ours {ours:#06x}, scapy {theirs:#06x}"


# --- checksums of what goes to the services --------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 2, 3, 17, 1000, 1233, 1400])
def test_udp_to_services_checksums(size: int) -> None:
    out = party().client(client_udp(payload=bytes(i % 256 for i in range(size))))
    data = out.to_services[0]
    assert_checksums(data)
    assert set(recomputed(data)) == {"ip", "UDP"}


@pytest.mark.parametrize("options", [
    [("MSS", 65000)], [("MSS", 1000)], [("NOP", None), ("NOP", None), ("MSS", 9000),
                                        ("WScale", 7), ("SAckOK", b""),
                                        ("Timestamp", (1, 0))], []])
def test_tcp_syn_to_services_checksums_after_mss_clamp(options: list[tuple[str, object]]) -> None:
    data = party().client(client_tcp(flags="S", options=options)).to_services[0]
    assert_checksums(data)


def test_tcp_data_to_services_checksums() -> None:
    p = party()
    p.round_trip(client_tcp(flags="S"))
    data = p.client(client_tcp(flags="PA", seq=1001, ack=5001, payload=b"GET / HTTP/1.0\r\n"))
    assert_checksums(data.to_services[0])


@given(st.sampled_from(["udp", "tcp"]), st.binary(max_size=1300), st.integers(1, 65535))
def test_to_services_checksums_any_payload(proto: str, payload: bytes, sport: int) -> None:
    p = party()
    if proto == "udp":
        step = p.client(client_udp(sport=sport, payload=payload))
    else:
        step = p.client(client_tcp(sport=sport, flags="S", payload=payload,
                                   options=[("MSS", 65000)]))
    # see test_rfc1624_3_checksum_is_never_minus_zero for 0xffff vs 0x0000
    assert checksums_match(step.to_services[0])


# --- checksums of what goes to the tunnel ----------------------------------------------------

def test_udp_reply_checksum() -> None:
    _req, step = party().round_trip(client_udp(), payload=b"an odd answer")
    assert_checksums(step.outbound[0][0])


def test_zero_udp_checksum_from_service_gets_a_real_one() -> None:
    p = party()
    request = p.client(client_udp()).only_to_services()
    reply = IP(reply_to(request, b"no checksum"))
    reply[UDP].chksum = 0
    data = p.service(raw(reply)).outbound[0][0]
    assert IPv6(data)[UDP].chksum != 0
    assert_checksums(data)


def test_partial_tcp_checksum_from_service_recomputed() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    reply = IP(reply_to(request, b"payload", tcp_flags="PA"))
    reply[TCP].chksum = 0xBEEF  # CHECKSUM_PARTIAL garbage from a local capture
    assert_checksums(p.service(raw(reply)).outbound[0][0])


def test_tcp_synack_checksum_after_mss_clamp() -> None:
    _req, step = party().round_trip(client_tcp(flags="S"), tcp_options=[("MSS", 65495),
                                                                      ("SAckOK", b"")])
    assert_checksums(step.outbound[0][0])


@given(st.sampled_from(["udp", "tcp"]), st.binary(max_size=1400), st.integers(1, 255))
def test_outbound_checksums_any_payload(proto: str, payload: bytes, ttl: int) -> None:
    p = party()
    if proto == "udp":
        _req, step = p.round_trip(client_udp(), payload=payload, ttl=max(ttl, 2))
    else:
        _req, step = p.round_trip(client_tcp(flags="S"), payload=payload, ttl=max(ttl, 2))
    assert checksums_match(step.outbound[0][0])


@pytest.mark.parametrize("data", [b"", b"x", b"ping" * 100])
def test_echo_reply_checksum(data: bytes) -> None:
    step = party().client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoRequest(data=data))
    assert_checksums(step.outbound[0][0])
    assert IPv6(step.outbound[0][0])[ICMPv6EchoReply].data == data


@pytest.mark.parametrize("make", [
    lambda: client_udp(dport=99),  # 1/4
    lambda: client_udp(hlim=1),  # 3/0
    lambda: raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=132) / Raw(b"sctp" * 4)),  # 4/1
    lambda: client_tcp(dport=81),  # RST
    lambda: client_tcp(dport=81, flags="PA", ack=99, payload=b"x" * 3),  # RST from ACK
    lambda: client_udp(dport=99, payload=bytes(1400)),  # error truncated to 1280
], ids=["port_unreachable", "time_exceeded", "param_problem", "rst", "rst_ack", "big_quote"])
def test_our_own_errors_and_resets_checksums(make: object) -> None:
    step = party().client(make())  # type: ignore[operator]
    data = step.outbound[0][0]
    assert_checksums(data)
    assert len(data) <= 1280


@pytest.mark.parametrize(("icmp_type", "code", "mtu"), [(3, 3, 0), (3, 1, 0), (3, 4, 1400),
                                                        (3, 2, 0), (11, 0, 0), (12, 0, 0)])
def test_translated_icmpv4_errors_checksums(icmp_type: int, code: int, mtu: int) -> None:
    p = party()
    request = p.client(client_udp(payload=b"quoted")).only_to_services()
    err = icmp4_error_about(request, icmp_type, code, unused=mtu)
    if icmp_type == 12:
        err = raw(IP(src="127.0.0.1", dst=request.src) / ICMP(type=12, code=0, ptr=8)
                  / Raw(raw(request)))
    data = p.service(err).outbound[0][0]
    assert_checksums(data)


def test_translated_error_quotes_the_clients_own_udp_checksum() -> None:
    p = party()
    original = IPv6(client_udp(payload=b"hello"))
    request = p.client(raw(original)).only_to_services()
    err = IPv6(p.service(icmp4_error_about(request, 3, 3)).outbound[0][0])
    assert err[IPerror6][UDPerror].chksum == original[UDP].chksum


def test_fragmentation_needed_to_service_checksums() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    step = p.service(reply_to(request, bytes(1500), tcp_flags="A", df=True))
    data = step.to_services[0]
    assert_checksums(data)
    icmp = IP(data)
    assert (icmp[ICMP].type, icmp[ICMP].code) == (3, 4)
    assert icmp[IPerror].dst == request.src and icmp[TCPerror].sport == 8080


def test_fragments_reassemble_with_valid_checksum() -> None:
    _req, step = party().round_trip(client_udp(), payload=bytes(range(256)) * 16)
    pieces = [IPv6(pkt) for pkt, _ in step.outbound]
    assert len(pieces) == 3 and all(IPv6ExtHdrFragment in p for p in pieces)
    whole = defragment6(pieces)
    assert_checksums(raw(whole))


def test_rfc1624_3_checksum_is_never_minus_zero() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    first = p.service(reply_to(request, b"\0\0", tcp_flags="A")).outbound[0][0]
    zero_word = recomputed(first)["TCP"][1]  # scapy's checksum with a zero payload word
    # with the payload word equal to that checksum the sum is -0: the checksum must be +0
    second = p.service(reply_to(request, zero_word.to_bytes(2, "big"), tcp_flags="A"))
    data = second.outbound[0][0]
    assert recomputed(data)["TCP"][1] == 0
    assert IPv6(data)[TCP].chksum == 0


# --- RFC 7915 field values ---------------------------------------------------------------------

@pytest.mark.parametrize("hlim", [2, 64, 255])
def test_rfc7915_5_1_ttl_is_hop_limit_minus_one(hlim: int) -> None:
    out = IP(party().client(client_udp(hlim=hlim)).to_services[0])
    assert out.ttl == hlim - 1


@pytest.mark.parametrize("ttl", [2, 64, 255])
def test_rfc7915_4_1_hop_limit_is_ttl_minus_one(ttl: int) -> None:
    _req, step = party().round_trip(client_udp(), ttl=ttl)
    assert IPv6(step.outbound[0][0]).hlim == ttl - 1


@pytest.mark.parametrize("tc", [0, 0x04, 0x2E << 2, 0xFF])
def test_rfc7915_5_1_tos_is_traffic_class(tc: int) -> None:
    assert IP(party().client(client_udp(tc=tc)).to_services[0]).tos == tc


@pytest.mark.parametrize("tos", [0, 0x10, 0xB8, 0xFF])
def test_rfc7915_4_1_traffic_class_is_tos_and_flow_label_zero(tos: int) -> None:
    _req, step = party().round_trip(client_udp(), tos=tos)
    out = IPv6(step.outbound[0][0])
    assert (out.tc, out.fl, out.version) == (tos, 0, 6)


@pytest.mark.parametrize(("payload", "df"), [(0, False), (1000, False), (1232, False),
                                             (1233, True), (1432, True)])
def test_rfc7915_5_df_clear_up_to_1260_set_above(payload: int, df: bool) -> None:
    out = IP(party().client(client_udp(payload=bytes(payload))).to_services[0])
    assert out.len == 28 + payload
    assert bool(out.flags.DF) is df
    assert (out.flags.MF, out.frag, out.ihl) == (0, 0, 5)


@pytest.mark.parametrize(("make", "proto"), [(client_udp, 17), (client_tcp, 6)])
def test_rfc7915_5_1_protocol_and_next_header(make: object, proto: int) -> None:
    p = party()
    request, step = p.round_trip(make())  # type: ignore[operator]
    assert request.proto == proto
    out = IPv6(step.outbound[0][0])
    assert out.nh == proto and out.plen == len(step.outbound[0][0]) - 40


def test_rfc7915_4_1_fragments_carry_fragment_header_fields() -> None:
    _req, step = party().round_trip(client_udp(), payload=bytes(3000), ttl=40)
    pieces = [IPv6(pkt) for pkt, _ in step.outbound]
    assert [p.nh for p in pieces] == [44, 44, 44]
    assert [p[IPv6ExtHdrFragment].nh for p in pieces] == [17, 17, 17]
    assert [p[IPv6ExtHdrFragment].m for p in pieces] == [1, 1, 0]
    assert [p.hlim for p in pieces] == [39, 39, 39]
    assert all(p.fl == 0 for p in pieces)


def test_rfc4443_3_1_our_error_is_from_our_address_to_the_client() -> None:
    err = IPv6(party().client(client_udp(dport=99)).outbound[0][0])
    assert (err.src, err.dst, err.nh) == (GW6_6TO4, CLIENT6_6TO4, 58)
    assert (err[ICMPv6DestUnreach].type, err[ICMPv6DestUnreach].code) == (1, 4)
