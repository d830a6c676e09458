"""workers/engine/icmp.py: echo reply (RFC 4443 §4.2), error rules and size (RFC 4443 §2.4),
TCP reset generation (RFC 9293 §3.10.7.1) and the token bucket (RFC 4443 §2.4(f)).

Invoking packets are built by scapy and what we build is read back by scapy.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_Redirect,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.packet import Packet, Raw, raw
from support.helpers import packed6

from sixgate.workers.engine.icmp import (
    MIN_MTU,
    TokenBucket,
    echo_reply,
    icmpv6_error,
    may_send_error,
    tcp_reset,
)
from sixgate.workers.engine.packet import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, parse_ipv6

CLIENT = "2001:db8:1::1"
US = "2001:db8:ff::1"


def view_of(packet: bytes) -> tuple[int, int]:
    view = parse_ipv6(packet)
    assert not isinstance(view, type(None)) and isinstance(view, tuple)
    return view[4], view[5]


def checksum_ok(pkt: Packet, layer: type[Packet]) -> bool:
    """scapy recomputes the checksum of ``layer`` from scratch and compares."""
    got = pkt[layer].cksum if hasattr(pkt[layer], "cksum") else pkt[layer].chksum
    again = IPv6(raw(pkt))
    if hasattr(again[layer], "cksum"):
        del again[layer].cksum
        return IPv6(raw(again))[layer].cksum == got
    del again[layer].chksum
    return IPv6(raw(again))[layer].chksum == got


# --- echo (RFC 4443 §4.2) ---------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"x", b"ping data 123", bytes(range(256)) * 5])
def test_rfc4443_4_2_echo_reply_returns_id_seq_data_unmodified(data: bytes) -> None:
    request = raw(IPv6(src=CLIENT, dst=US, hlim=9) / ICMPv6EchoRequest(id=0x1234, seq=0xBEEF,
                                                                        data=data))
    reply = IPv6(echo_reply(request, 40))
    assert (reply.src, reply.dst) == (US, CLIENT)  # from the address the request was sent to
    echo = reply[ICMPv6EchoReply]
    assert (echo.type, echo.code, echo.id, echo.seq) == (129, 0, 0x1234, 0xBEEF)
    assert raw(echo)[8:] == data
    assert checksum_ok(reply, ICMPv6EchoReply)


def test_rfc4443_4_2_echo_reply_drops_request_extension_headers() -> None:
    request = raw(IPv6(src=CLIENT, dst=US) / IPv6ExtHdrDestOpt()
                  / ICMPv6EchoRequest(id=1, seq=2, data=b"abc"))
    reply = IPv6(echo_reply(request, 48))
    assert reply.nh == PROTO_ICMPV6 and reply[ICMPv6EchoReply].data == b"abc"
    assert checksum_ok(reply, ICMPv6EchoReply)


# --- error rules (RFC 4443 §2.4(e)) -----------------------------------------------------------

def udp(src: str = CLIENT, dst: str = US) -> bytes:
    return raw(IPv6(src=src, dst=dst) / UDP(sport=1, dport=2) / b"x")


def icmp(message: Packet, src: str = CLIENT) -> bytes:
    return raw(IPv6(src=src, dst=US, nh=PROTO_ICMPV6) / message)


@pytest.mark.parametrize(("packet", "allowed"), [
    pytest.param(udp(), True, id="unicast_udp"),
    pytest.param(icmp(ICMPv6EchoRequest()), True, id="echo_request"),
    pytest.param(icmp(ICMPv6EchoReply()), True, id="echo_reply"),
    # (e.1) no error about an error message
    pytest.param(icmp(ICMPv6DestUnreach() / IPerror6()), False, id="e1_dest_unreach"),
    pytest.param(icmp(ICMPv6PacketTooBig() / IPerror6()), False, id="e1_packet_too_big"),
    pytest.param(icmp(ICMPv6TimeExceeded() / IPerror6()), False, id="e1_time_exceeded"),
    pytest.param(icmp(ICMPv6ParamProblem() / IPerror6()), False, id="e1_param_problem"),
    pytest.param(icmp(Raw(b"\x7f\x00\x00\x00\x00\x00\x00\x00")), False, id="e1_type_127"),
    # (e.2) no error about a redirect
    pytest.param(icmp(ICMPv6ND_Redirect(tgt=US, dst=CLIENT)), False, id="e2_redirect"),
    # (e.3) no error about a packet to a multicast address
    pytest.param(udp(dst="ff02::1"), False, id="e3_multicast_destination"),
    pytest.param(udp(dst="ff0e::1234"), False, id="e3_global_multicast_destination"),
    # (e.6) no error to a source that is not a single node
    pytest.param(udp(src="::"), False, id="e6_unspecified_source"),
    pytest.param(udp(src="ff02::2"), False, id="e6_multicast_source"),
])
def test_rfc4443_2_4_e_no_error_about_error(packet: bytes, allowed: bool) -> None:
    proto, offset = view_of(packet)
    assert may_send_error(packet, proto, offset) is allowed


def test_rfc4443_2_4_e_error_behind_extension_header_recognised() -> None:
    packet = raw(IPv6(src=CLIENT, dst=US) / IPv6ExtHdrDestOpt() / ICMPv6DestUnreach()
                 / IPerror6())
    proto, offset = view_of(packet)
    assert (proto, offset) == (PROTO_ICMPV6, 48)
    assert may_send_error(packet, proto, offset) is False


# --- error messages (RFC 4443 §3, §2.4(c)) ----------------------------------------------------

@pytest.mark.parametrize(("icmp_type", "code", "rest", "layer"), [
    (1, 4, 0, ICMPv6DestUnreach),
    (1, 1, 0, ICMPv6DestUnreach),
    (3, 0, 0, ICMPv6TimeExceeded),
    (4, 1, 40, ICMPv6ParamProblem),
])
def test_rfc4443_3_error_message_fields(icmp_type: int, code: int, rest: int,
                                        layer: type[Packet]) -> None:
    invoking = udp()
    pkt = IPv6(icmpv6_error(packed6(US), invoking, icmp_type, code, rest))
    assert (pkt.src, pkt.dst, pkt.nh) == (US, CLIENT, PROTO_ICMPV6)
    msg = pkt[layer]
    assert (msg.type, msg.code) == (icmp_type, code)
    assert raw(msg)[4:8] == rest.to_bytes(4, "big")
    assert raw(msg)[8:] == invoking  # the whole invoking packet, it fits
    assert checksum_ok(pkt, layer)


@pytest.mark.parametrize("size", [1000, 1232, 1233, 1280, 1500, 9000])
def test_rfc4443_2_4_c_error_at_most_1280_bytes(size: int) -> None:
    invoking = raw(IPv6(src=CLIENT, dst=US) / UDP(sport=1, dport=2) / bytes(size - 48))
    out = icmpv6_error(packed6(US), invoking, 1, 4)
    assert len(out) == min(MIN_MTU, 48 + size)
    assert out[48:] == invoking[:MIN_MTU - 48]
    pkt = IPv6(out)
    assert pkt.plen == len(out) - 40
    assert checksum_ok(pkt, ICMPv6DestUnreach)


# --- TCP reset (RFC 9293 §3.10.7.1) -----------------------------------------------------------

def segment(flags: str, seq: int = 1000, ack: int = 0, payload: bytes = b"") -> bytes:
    return raw(IPv6(src=CLIENT, dst=US) / TCP(sport=40000, dport=81, flags=flags, seq=seq,
                                               ack=ack) / Raw(payload))


@pytest.mark.parametrize(("flags", "seq", "ack", "payload", "out_flags", "out_seq", "out_ack"), [
    # no ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, SYN and FIN each count one
    pytest.param("S", 1000, 0, b"", "RA", 0, 1001, id="syn"),
    pytest.param("S", 0xFFFFFFFF, 0, b"", "RA", 0, 0, id="syn_seq_wraps"),
    pytest.param("S", 1000, 0, b"hello", "RA", 0, 1006, id="syn_with_data"),
    pytest.param("F", 7, 0, b"", "RA", 0, 8, id="fin"),
    pytest.param("FS", 7, 0, b"ab", "RA", 0, 11, id="syn_fin_data"),
    pytest.param("", 50, 0, b"xyz", "RA", 0, 53, id="no_flags_data"),
    # ACK set: <SEQ=SEG.ACK><CTL=RST>
    pytest.param("A", 1000, 77777, b"", "R", 77777, 0, id="ack"),
    pytest.param("SA", 1000, 5555, b"", "R", 5555, 0, id="syn_ack"),
    pytest.param("PA", 1000, 4242, b"data", "R", 4242, 0, id="push_ack_data"),
])
def test_rfc9293_rst_for_syn_acks_seq_plus_one(flags: str, seq: int, ack: int, payload: bytes,
                                               out_flags: str, out_seq: int,
                                               out_ack: int) -> None:
    rst = tcp_reset(segment(flags, seq, ack, payload), 40)
    assert rst is not None
    pkt = IPv6(rst)
    seg = pkt[TCP]
    assert (pkt.src, pkt.dst, seg.sport, seg.dport) == (US, CLIENT, 81, 40000)
    assert (str(seg.flags), seg.seq, seg.ack) == (out_flags, out_seq, out_ack)
    assert raw(seg.payload) == b""
    assert checksum_ok(pkt, TCP)


@pytest.mark.parametrize("flags", ["R", "RA", "SR"])
def test_rfc9293_3_10_7_1_never_reset_a_reset(flags: str) -> None:
    assert tcp_reset(segment(flags, ack=5), 40) is None


def test_rfc9293_truncated_segment_gets_no_reset() -> None:
    assert tcp_reset(segment("S")[:59], 40) is None


# --- token bucket (RFC 4443 §2.4(f)) ----------------------------------------------------------

def test_rfc4443_2_4_f_token_bucket_burst_then_rate() -> None:
    # (times and rates are exact binary fractions, so no float rounding decides a result)
    bucket = TokenBucket(rate_per_s=4.0, burst=10)
    assert [bucket.allow(5.0) for _ in range(11)] == [True] * 10 + [False]
    assert bucket.allow(5.125) is False  # half a token
    assert bucket.allow(5.25) is True  # one token after 0.25 s at 4/s
    assert bucket.allow(5.25) is False


def test_rfc4443_2_4_f_token_bucket_refill_capped_at_burst() -> None:
    bucket = TokenBucket(rate_per_s=10.0, burst=3)
    assert [bucket.allow(0.0) for _ in range(3)] == [True] * 3
    # a long silence refills to the burst, not beyond
    assert [bucket.allow(1000.0) for _ in range(4)] == [True, True, True, False]


def test_rfc4443_2_4_f_token_bucket_zero_rate_stops_after_burst() -> None:
    bucket = TokenBucket(rate_per_s=0.0, burst=2)
    assert [bucket.allow(float(t)) for t in range(4)] == [True, True, False, False]


@pytest.mark.parametrize(("rate", "seconds", "expected"), [(1.0, 10, 11), (2.0, 5, 11),
                                                            (64.0, 2, 129), (0.5, 8, 5)])
def test_rfc4443_2_4_f_token_bucket_long_run_rate(rate: float, seconds: int,
                                                  expected: int) -> None:
    # burst 1: one at t=0, then exactly ``rate`` per second, asked every 1/64 s
    bucket = TokenBucket(rate_per_s=rate, burst=1)
    allowed = sum(bucket.allow(step / 64) for step in range(seconds * 64 + 1))
    assert allowed == expected


def test_icmp_proto_constants_used_in_errors() -> None:
    # the invoking UDP packet is quoted as UDP by scapy (IPerror6 / UDPerror)
    pkt = IPv6(icmpv6_error(packed6(US), udp(), 1, 4))
    quoted = pkt[IPerror6]
    assert quoted.nh == PROTO_UDP and quoted.src == CLIENT and quoted.dst == US
    assert PROTO_TCP == 6
