"""workers/engine/datapath.py end to end with the two-party helper: a client's IPv6 packet goes in
through ``Datapath.from_tunnel`` (inside its IPv4 protocol-41 packet), the service's IPv4
answer through ``Datapath.from_services``, and what leaves (IPv4 to the services, IPv6 + outer
IPv4 destination to the tunnel, drop counters by name) is read with scapy. Time is a FakeClock:
nothing sleeps.
"""

from __future__ import annotations

import dataclasses

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    defragment6,
    fragment6,
)
from scapy.packet import Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW6_6IN4,
    GW6_6TO4,
    NATIVE6,
    RELAY4,
    REMOTE4,
    SERVICE4,
    TCP_TARGETS,
    UDP_TARGETS,
    DropWatch,
    FakeClock,
    TwoParty,
    client6,
    client_tcp,
    client_udp,
    gw6,
    icmp4_error_about,
    make_datapath,
    make_settings,
    reply_to,
    tcp_mss,
)

from sixgate.workers.engine.datapath import PROBE_AGAIN_S, Datapath
from sixgate.workers.engine.drops import DropReason, Event
from sixgate.workers.engine.flows import ESTABLISHED, V4_SYN_RCV, V6_FIN, Timeouts
from sixgate.workers.engine.settings import shard_pools, worker_pool

MODES = ["6to4", "6in4"]
T = Timeouts()


def party(mode: str = "6to4", **overrides: object) -> TwoParty:
    return TwoParty(make_datapath(mode, **overrides), FakeClock())


def expected_outer(mode: str, dst6: str | None = None) -> str:
    if mode == "6in4":
        return REMOTE4
    return CLIENT4 if (dst6 or CLIENT6_6TO4) == CLIENT6_6TO4 else RELAY4


# --- echo (RFC 4443 §4.2) ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 5])
def test_rfc4443_4_2_echo_reply_payload_byte_identical(mode: str, data: bytes) -> None:
    p = party(mode)
    request = IPv6(src=client6(mode), dst=gw6(mode)) / ICMPv6EchoRequest(id=77, seq=9,
                                                                         data=data)
    step = p.client(request)
    reply = step.only_outbound()
    assert step.to_services == [] and step.drops == {}
    assert (reply.src, reply.dst) == (gw6(mode), client6(mode))
    echo = reply[ICMPv6EchoReply]
    assert (echo.id, echo.seq) == (77, 9)
    assert raw(echo)[8:] == data
    assert step.outer_destinations == [expected_outer(mode)]


def test_rfc4443_4_2_fragmented_echo_answered_in_fragments() -> None:
    p = party()
    data = bytes(i % 256 for i in range(3000))
    request = (IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(id=5)
               / ICMPv6EchoRequest(id=1, seq=2, data=data))
    outbound = []
    for piece in fragment6(request, 1280):
        outbound += p.client(piece).outbound
    assert len(outbound) == 3 and all(len(pkt) <= 1480 for pkt, _ in outbound)
    assert {dst for _, dst in outbound} == {bytes([198, 51, 100, 1])}
    whole = defragment6([IPv6(pkt) for pkt, _ in outbound])
    assert whole[ICMPv6EchoReply].data == data


# --- refusals: RST and ICMPv6 errors ----------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_rfc4443_3_1_udp_to_unforwarded_port_port_unreachable(mode: str) -> None:
    p = party(mode)
    original = client_udp(mode, sport=1234, dport=99, payload=b"hi")
    step = p.client(original)
    err = step.only_outbound()
    assert step.to_services == [] and step.drops == {DropReason.NO_RULE: 1}
    unreach = err[ICMPv6DestUnreach]
    assert (unreach.type, unreach.code) == (1, 4)
    assert (err.src, err.dst) == (gw6(mode), client6(mode))
    assert raw(unreach)[8:] == original
    assert step.outer_destinations == [expected_outer(mode)]


@pytest.mark.parametrize("mode", MODES)
def test_rfc9293_tcp_to_unforwarded_port_rst(mode: str) -> None:
    p = party(mode)
    step = p.client(client_tcp(mode, sport=1234, dport=81, flags="S", seq=100))
    rst = step.only_outbound()
    assert step.drops == {DropReason.NO_RULE: 1} and step.to_services == []
    assert (rst.src, rst.dst) == (gw6(mode), client6(mode))
    seg = rst[TCP]
    assert (seg.sport, seg.dport, str(seg.flags), seg.seq, seg.ack) == (81, 1234, "RA", 0, 101)
    assert step.outer_destinations == [expected_outer(mode)]


def test_rfc9293_segment_without_session_reset_from_its_ack() -> None:
    p = party()
    step = p.client(client_tcp(dport=80, flags="A", seq=5, ack=987654))
    rst = step.only_outbound()[TCP]
    assert step.drops == {DropReason.NO_SESSION: 1} and step.to_services == []
    assert (str(rst.flags), rst.seq) == ("R", 987654)


@pytest.mark.parametrize(("shards", "index", "ours", "theirs"), [
    (4, 0, "100.64.128.9", "100.64.64.9"),  # worker 0 of 2 owns shards 0 and 2
    (3, 1, "100.64.100.9", "100.64.0.9"),  # worker 1 of 2 owns shard 1 alone
])
def test_a_service_segment_to_another_shards_pool_address_is_not_reset(
        shards: int, index: int, ours: str, theirs: str) -> None:
    """[gateway] shards over 2 workers: a service's segment for no session to an address of
    the worker's own shards is reset (no_session); one to another worker's shard (its route
    moving there at a take-over) is dropped as other_shard, never reset."""
    settings = make_settings(workers=2, shards=shards, pool="100.64.0.0/16")
    datapath = Datapath(settings, shard_pools(settings.pool, shards, 2, index), workers=2,
                        index=index)
    for dst, reason, answered in ((ours, DropReason.NO_SESSION, 1),
                                  (theirs, DropReason.OTHER_SHARD, 0)):
        segment = raw(IP(src="127.0.0.1", dst=dst) / TCP(sport=8080, dport=40000, flags="A"))
        out = datapath.from_services([segment], 1.0)
        assert datapath.counters.drops[reason] == 1 and len(out.to_services) == answered


def test_rfc9293_rst_without_session_not_answered() -> None:
    p = party()
    step = p.client(client_tcp(dport=80, flags="R", seq=5))
    assert step.outbound == [] and step.drops == {DropReason.NO_SESSION: 1}


@pytest.mark.parametrize("proto", [132, 4, 255])
def test_rfc4443_3_4_unknown_next_header_parameter_problem(proto: int) -> None:
    p = party()
    original = raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=proto) / Raw(b"\0" * 16))
    step = p.client(original)
    err = step.only_outbound()
    assert step.drops == {DropReason.UNSUPPORTED_PROTOCOL: 1}
    msg = err[ICMPv6ParamProblem]
    assert (msg.type, msg.code, msg.ptr) == (4, 1, 6)
    assert raw(msg)[8:] == original


def test_rfc4443_3_4_unknown_next_header_after_8_byte_extension_header() -> None:
    p = party()
    pkt = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrDestOpt(nh=132) / Raw(b"\0" * 8)
    err = p.client(pkt).only_outbound()
    assert err[ICMPv6ParamProblem].ptr == 40  # the Next Header byte of the options header


def test_rfc4443_3_4_unknown_next_header_pointer_after_16_byte_extension_header() -> None:
    p = party()
    opts = IPv6ExtHdrDestOpt(nh=132, options=[PadN(optdata=b"\0" * 10)])
    assert len(raw(opts)) == 16
    err = p.client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / opts / Raw(b"\0" * 8)).only_outbound()
    assert err[ICMPv6ParamProblem].ptr == 40


def test_rfc8200_4_7_no_next_header_gets_no_parameter_problem() -> None:
    p = party()
    step = p.client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=59))
    assert step.outbound == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [
    lambda mode: client_udp(mode, hlim=1),
    lambda mode: client_tcp(mode, hlim=1),
    lambda mode: client_udp(mode, hlim=0),
], ids=["udp_hlim1", "tcp_hlim1", "udp_hlim0"])
def test_rfc4443_3_3_hop_limit_1_time_exceeded(mode: str, make: object) -> None:
    p = party(mode)
    original = make(mode)  # type: ignore[operator]
    step = p.client(original)
    err = step.only_outbound()
    assert step.to_services == [] and step.drops == {DropReason.HOP_LIMIT_EXCEEDED: 1}
    msg = err[ICMPv6TimeExceeded]
    assert (msg.type, msg.code) == (3, 0)
    assert (err.src, err.dst) == (gw6(mode), client6(mode))
    assert raw(msg)[8:] == original


def test_rfc7915_5_1_hop_limit_2_leaves_with_ttl_1() -> None:
    step = party().client(client_udp(hlim=2))
    assert step.only_to_services().ttl == 1


def test_rfc4443_2_4_e_no_error_to_multicast_or_unspecified_source() -> None:
    """Through the tunnel such a source is a martian (RFC 3964 §5.3.1, RFC 4213 §3.6),
    dropped silently before any rule is looked up; the §2.4(e) rule itself is
    tests/unit/test_icmp.py may_send_error's."""
    p = party()
    for src in ("ff02::1", "::"):
        step = p.client(client_udp(src=src, dport=99))
        assert step.outbound == [] and step.drops == {DropReason.MARTIAN_SOURCE: 1}


def test_rfc4443_2_4_f_errors_rate_limited_by_token_bucket() -> None:
    p = party(icmp_errors_per_s=10.0, icmp_error_burst=20)
    sources = [f"2001:db8:{i}::1" for i in range(1, 30)]  # a /64 each: the global bucket
    steps = [p.client(client_udp(src=src, dport=99)) for src in sources[:21]]
    assert [len(s.outbound) for s in steps] == [1] * 20 + [0]
    # Exactly one drop reason per packet (workers/engine/drops.py): the refused packet is no_rule;
    # the error not sent for it is an event, not a second drop.
    suppressed = p.datapath.counters.events.get(Event.REPLIES_SUPPRESSED.value, 0)
    assert steps[20].drops == {DropReason.NO_RULE: 1} and suppressed == 1
    # RSTs share the bucket
    assert p.client(client_tcp(src=sources[21], dport=81)).drops == {DropReason.NO_RULE: 1}
    assert p.datapath.counters.events[Event.REPLIES_SUPPRESSED.value] == 2
    p.clock.advance(1.0)
    assert len(p.client(client_udp(src=sources[22], dport=99)).outbound) == 1


def test_rfc4443_2_4_f_one_source_cannot_drain_the_bucket_for_everyone() -> None:
    """Each source /64 has a tenth of the bucket: a flood of refused SYNs from one source
    leaves RSTs for the next client (one bucket for all used to be drained by anyone)."""
    p = party(icmp_errors_per_s=100.0, icmp_error_burst=100)
    flood = [p.client(client_tcp(sport=1000 + i, dport=81)) for i in range(50)]
    assert sum(len(s.outbound) for s in flood) == 10  # its share: burst 10
    other = p.client(client_tcp(src="2001:db8:77::1", dport=81))
    assert str(other.only_outbound()[TCP].flags) == "RA"


def test_echo_replies_rate_limited_per_source() -> None:
    """Reflection: echo replies have their own buckets; what is over is dropped, counted."""
    p = party(echo_replies_per_s=100.0, echo_burst=100)
    pings = [p.client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoRequest(seq=i))
             for i in range(15)]
    assert sum(len(s.outbound) for s in pings) == 10
    assert pings[-1].drops == {DropReason.ICMP_RATE_LIMITED: 1}
    other = p.client(IPv6(src="2001:db8:77::1", dst=GW6_6TO4) / ICMPv6EchoRequest())
    assert len(other.outbound) == 1


# --- translation, both directions ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dport", "target"), sorted(UDP_TARGETS.items())[:3])
def test_rfc6146_udp_two_party_round_trip(mode: str, dport: int,
                                          target: tuple[str, int]) -> None:
    p = party(mode)
    request, step = p.round_trip(client_udp(mode, sport=40000, dport=dport, payload=b"ask"),
                                 payload=b"answer!")
    assert (request.dst, request[UDP].dport) == target
    assert request[UDP].sport == 40000  # port preservation
    assert request.src.startswith("100.64.0.")
    assert raw(request[UDP].payload) == b"ask"
    reply = step.only_outbound()
    assert (reply.src, reply.dst) == (gw6(mode), client6(mode))
    assert (reply[UDP].sport, reply[UDP].dport) == (dport, 40000)
    assert raw(reply[UDP].payload) == b"answer!"
    assert step.outer_destinations == [expected_outer(mode)]
    assert step.drops == {}


@pytest.mark.parametrize("dport", [80, 8000, 8009])
def test_rfc6146_tcp_handshake_two_party(dport: int) -> None:
    p = party()
    syn = client_tcp(dport=dport, flags="S", seq=1000)
    request, step = p.round_trip(syn)
    assert (request.dst, request[TCP].dport) == TCP_TARGETS[dport]
    synack = step.only_outbound()[TCP]
    assert (synack.sport, synack.dport, str(synack.flags), synack.ack) == (dport, 40000, "SA",
                                                                           1001)
    session = p.datapath.flows.sessions()[0]
    # Linux conntrack's SYN_RECV: not assured until the client's ACK.
    assert (session.state, session.assured) == (V4_SYN_RCV, False)
    ack = p.client(client_tcp(dport=dport, flags="A", seq=1001, ack=5001, payload=b"GET /"))
    assert raw(ack.only_to_services()[TCP].payload) == b"GET /"
    assert (session.state, session.assured) == (ESTABLISHED, True)


def test_rfc7915_5_1_and_4_1_ttl_and_hop_limit_each_decremented_once() -> None:
    p = party()
    request, step = p.round_trip(client_udp(hlim=50), ttl=30)
    assert request.ttl == 49
    assert step.only_outbound().hlim == 29


def test_rfc7915_traffic_class_and_tos_carried() -> None:
    p = party()
    request, step = p.round_trip(client_udp(tc=0xB8), tos=0x28)
    assert request.tos == 0xB8
    reply = step.only_outbound()
    assert (reply.tc, reply.fl) == (0x28, 0)


def test_rfc7915_4_2_service_ttl_1_not_forwarded() -> None:
    p = party()
    request = p.client(client_udp()).only_to_services()
    step = p.service(reply_to(request, b"x", ttl=1))
    assert step.outbound == [] and step.drops == {DropReason.HOP_LIMIT_EXCEEDED: 1}


@pytest.mark.parametrize(("mtu", "mss"), [(1480, 1420), (1280, 1220), (1400, 1340)])
def test_mss_clamped_both_directions(mtu: int, mss: int) -> None:
    p = party(mtu=mtu)
    request, step = p.round_trip(client_tcp(flags="S", options=[("MSS", 65000)]),
                                 tcp_options=[("MSS", 65495)])
    assert tcp_mss(request[TCP]) == mss
    assert tcp_mss(step.only_outbound()[TCP]) == mss


def test_mss_small_values_untouched() -> None:
    p = party()
    request, step = p.round_trip(client_tcp(flags="S", options=[("MSS", 536)]),
                                 tcp_options=[("MSS", 1000)])
    assert tcp_mss(request[TCP]) == 536
    assert tcp_mss(step.only_outbound()[TCP]) == 1000


@pytest.mark.parametrize("mode", MODES)
def test_rfc7915_4_big_udp_reply_fragmented(mode: str) -> None:
    p = party(mode)
    payload = bytes(i * 7 % 256 for i in range(4000))
    _request, step = p.round_trip(client_udp(mode), payload=payload)
    assert len(step.outbound) == 3
    pieces = [IPv6(pkt) for pkt, _ in step.outbound]
    assert all(len(pkt) <= 1480 for pkt, _ in step.outbound)
    assert all(IPv6ExtHdrFragment in piece for piece in pieces)
    assert len({piece[IPv6ExtHdrFragment].id for piece in pieces}) == 1
    assert set(step.outer_destinations) == {expected_outer(mode)}
    whole = defragment6(pieces)
    assert (whole.src, whole.dst) == (gw6(mode), client6(mode))
    assert raw(whole[UDP].payload) == payload
    assert (whole[UDP].sport, whole[UDP].dport) == (53, 40000)


def test_rfc7915_1_4_udp_reply_with_df_too_big_leaves_as_ipv6_fragments() -> None:
    """The decision for UDP (datapath.py, beside the TCP rule): a DF-marked datagram too big
    for the tunnel is fragmented as IPv6, not answered with Fragmentation Needed."""
    p = party()
    payload = bytes(i % 253 for i in range(3000))
    request = p.client(client_udp()).only_to_services()
    step = p.service(reply_to(request, payload, df=True))
    assert step.to_services == [] and step.drops == {}
    pieces = [IPv6(pkt) for pkt, _ in step.outbound]
    assert len(pieces) == 3 and all(IPv6ExtHdrFragment in piece for piece in pieces)
    assert raw(defragment6(pieces)[UDP].payload) == payload


def test_rfc7915_4_1_traffic_class_kept_in_fragments() -> None:
    p = party()
    _request, step = p.round_trip(client_udp(), payload=bytes(4000), tos=0x28)
    assert [IPv6(pkt).tc for pkt, _ in step.outbound] == [0x28] * 3


def test_rfc7915_4_1_tcp_df_too_big_gets_fragmentation_needed() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    big = reply_to(request, bytes(1500), tcp_flags="A", df=True)
    step = p.service(big)
    assert step.outbound == [] and step.drops == {DropReason.TOO_BIG: 1}
    icmp = IP(step.to_services[0])
    assert (icmp.src, icmp.dst) == (request.src, SERVICE4)
    assert (icmp[ICMP].type, icmp[ICMP].code, icmp[ICMP].nexthopmtu) == (3, 4, 1460)
    assert icmp[IPerror].src == SERVICE4 and icmp[TCPerror].dport == 40000


def test_rfc7915_4_1_tcp_df_that_fits_is_forwarded() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    step = p.service(reply_to(request, bytes(1420), tcp_flags="A", df=True))
    assert len(step.outbound) == 1 and len(step.outbound[0][0]) == 1480


@pytest.mark.parametrize("mode", MODES)
def test_rfc7915_4_2_port_unreachable_from_service_to_icmpv6_1_4(mode: str) -> None:
    p = party(mode)
    original = client_udp(mode, sport=1234, dport=53, payload=b"hello")
    request = p.client(original).only_to_services()
    step = p.service(icmp4_error_about(request, 3, 3))
    err = step.only_outbound()
    assert step.drops == {}
    assert (err.src, err.dst) == (gw6(mode), client6(mode))
    msg = err[ICMPv6DestUnreach]
    assert (msg.type, msg.code) == (1, 4)
    quoted = err[IPerror6]
    assert (quoted.src, quoted.dst) == (client6(mode), gw6(mode))
    assert (quoted[UDPerror].sport, quoted[UDPerror].dport) == (1234, 53)
    # byte for byte the client's packet, but for the hop limit the service saw (§4.3)
    embedded = raw(msg)[8:]
    assert embedded[:7] == original[:7] and embedded[8:] == original[8:]
    assert embedded[7] == 63
    assert step.outer_destinations == [expected_outer(mode)]


@pytest.mark.parametrize("mode", MODES)
def test_rfc792_icmpv4_error_with_a_bad_checksum_is_not_translated(mode: str) -> None:
    p = party(mode)
    request = p.client(client_udp(mode, sport=1235, dport=53)).only_to_services()
    error = bytearray(icmp4_error_about(request, 3, 3))
    error[22] ^= 0xFF  # the ICMP checksum field (after the 20-byte IPv4 header)
    step = p.service(bytes(error))
    assert step.outbound == [] and step.drops == {DropReason.BAD_CHECKSUM: 1}


def test_rfc7915_4_2_icmpv4_error_about_tcp_session() -> None:
    p = party()
    request = p.client(client_tcp(sport=4444, dport=80)).only_to_services()
    err = p.service(icmp4_error_about(request, 3, 1)).only_outbound()
    assert (err[ICMPv6DestUnreach].type, err[ICMPv6DestUnreach].code) == (1, 0)
    assert (err[IPerror6].src, err[TCPerror].sport, err[TCPerror].dport) == (
        CLIENT6_6TO4, 4444, 80)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda req: icmp4_error_about(IP(raw(IP(src=req.src, dst=req.dst) / UDP(
        sport=9, dport=9))), 3, 3), DropReason.NO_SESSION),
    (lambda req: raw(IP(src=SERVICE4, dst=req.src) / ICMP(type=8)), DropReason.ICMP_NOT_TRANSLATED),
    (lambda req: raw(IP(src=SERVICE4, dst=req.src) / ICMP(type=0)), DropReason.ICMP_NOT_TRANSLATED),
    (lambda req: icmp4_error_about(req, 3, 14), DropReason.ICMP_NOT_TRANSLATED),
    (lambda req: raw(IP(src=SERVICE4, dst=req.src) / ICMP(type=3, code=3) / b"tiny"),
     DropReason.TRUNCATED),
], ids=["no_session", "echo_request", "echo_reply", "code_14", "short_quote"])
def test_rfc7915_4_2_icmpv4_dropped(make: object, reason: DropReason) -> None:
    p = party()
    request = p.client(client_udp()).only_to_services()
    step = p.service(make(request))  # type: ignore[operator]
    assert step.outbound == [] and step.drops == {reason: 1}


# --- from_services drops ----------------------------------------------------------------------

def test_from_services_drop_table() -> None:
    p = party()
    request = p.client(client_udp()).only_to_services()
    good = IP(reply_to(request, b"ok"))
    cases = [
        (raw(IP(src=good.src, dst=good.dst, flags="MF") / UDP(sport=5353, dport=40000)),
         DropReason.BAD_FRAGMENT),
        (raw(IP(src=good.src, dst=good.dst, frag=10) / Raw(b"x" * 8)), DropReason.BAD_FRAGMENT),
        (raw(IP(src=good.src, dst=good.dst) / UDP(sport=5353, dport=40001)),
         DropReason.NO_SESSION),
        (raw(IP(src=good.src, dst="100.64.0.6") / UDP(sport=5353, dport=40000)),
         DropReason.NO_SESSION),
        (raw(IP(src=good.src, dst=good.dst, proto=132) / Raw(b"x" * 12)),
         DropReason.UNSUPPORTED_PROTOCOL),
        (raw(IP(src=good.src, dst=good.dst, proto=17) / Raw(b"x" * 7)), DropReason.TRUNCATED),
        (raw(IP(src=good.src, dst=good.dst, proto=6) / Raw(b"x" * 19)), DropReason.TRUNCATED),
        (raw(good)[:-1], DropReason.TRUNCATED),
        (raw(good)[:10] + b"\0\0" + raw(good)[12:], DropReason.BAD_CHECKSUM),
    ]
    for packet, reason in cases:
        step = p.service(packet)
        assert (step.outbound, step.drops) == ([], {reason: 1}), IP(packet).summary()
    assert p.service(raw(good)).only_outbound()[UDP].dport == 40000


# --- inbound drops ----------------------------------------------------------------------------

def _corrupt_checksum(packet: bytes, offset: int) -> bytes:
    out = bytearray(packet)
    out[offset] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize(("packet", "reason"), [
    # RFC 8200 §8.1: a zero UDP checksum is invalid over IPv6
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=1, dport=53, chksum=0)
                     / b"x"), DropReason.BAD_CHECKSUM, id="udp_zero_checksum"),
    pytest.param(_corrupt_checksum(client_udp(), 46), DropReason.BAD_CHECKSUM, id="udp_bad"),
    pytest.param(_corrupt_checksum(client_tcp(), 56), DropReason.BAD_CHECKSUM, id="tcp_bad"),
    pytest.param(_corrupt_checksum(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
                                       / ICMPv6EchoRequest()), 42), DropReason.BAD_CHECKSUM,
                 id="icmpv6_bad"),
    pytest.param(client_udp()[:47], DropReason.TRUNCATED, id="short_udp"),
    pytest.param(client_tcp()[:59], DropReason.TRUNCATED, id="plen_cut"),
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=6) / Raw(b"x" * 19)),
                 DropReason.TRUNCATED, id="tcp_header_short"),
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=58) / Raw(b"x" * 7)),
                 DropReason.TRUNCATED, id="icmp_header_short"),
    pytest.param(client_udp(src=CLIENT6_6TO4).replace(bytes.fromhex("2002c000020a0000"),
                                                      bytes.fromhex("2002c000020a0001")),
                 DropReason.NOT_OUR_ADDRESS, id="not_our_address"),
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoReply()),
                 DropReason.ICMP_NOT_TRANSLATED, id="echo_reply_to_us"),
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6DestUnreach() / IPerror6()),
                 DropReason.TRUNCATED, id="icmpv6_error_quoting_bare_header"),
    pytest.param(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6DestUnreach()
                     / IPerror6(src=GW6_6TO4, dst=CLIENT6_6TO4) / UDPerror(sport=53, dport=9)),
                 DropReason.NO_SESSION, id="icmpv6_error_about_no_session"),
])
def test_inbound_drop_table(packet: bytes, reason: DropReason) -> None:
    step = party().client(packet)
    assert (step.to_services, step.outbound, step.drops) == ([], [], {reason: 1})


def test_rfc4213_3_6_payload_length_bounds_the_packet_in_the_datapath() -> None:
    # RFC 4213 §3.6 / RFC 8200 §3: bytes after 40 + Payload Length are padding, not data.
    step = party().client(client_udp(payload=b"hello") + b"\0\0pad")
    out = step.only_to_services()
    assert out.len == 20 + 8 + 5 and raw(out[UDP].payload) == b"hello"


# --- extension headers and fragments (RFC 7915 §5.1, RFC 8200 §4.5) ---------------------------

@pytest.mark.parametrize("ext", [
    IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(segleft=0, addresses=[NATIVE6]),
    IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(),
], ids=["hop_by_hop", "dest_opts", "routing_sl0", "hbh_and_dest_opts"])
def test_rfc7915_5_1_extension_headers_skipped(ext: object) -> None:
    pkt = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ext / UDP(sport=5, dport=53) / b"payload"
    out = party().client(pkt).only_to_services()
    assert out.proto == 17 and out.ihl == 5
    assert raw(out[UDP].payload) == b"payload" and out[UDP].dport == 5353


def test_rfc8200_4_5_fragmented_udp_reassembled_before_translation() -> None:
    p = party()
    payload = bytes(i % 199 for i in range(2500))
    big = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(id=0x1234) / UDP(
        sport=7, dport=53) / payload
    steps = [p.client(piece) for piece in reversed(fragment6(big, 1280))]
    assert [len(s.to_services) for s in steps] == [0, 0, 1]
    out = IP(steps[-1].to_services[0])
    # RFC 7915 §5.1.1: it came with a Fragment Header, so it may be fragmented again: DF clear.
    assert raw(out[UDP].payload) == payload and not out.flags.DF
    assert len(p.datapath.reassembler) == 0


def test_rfc8200_4_5_overlapping_fragments_drop_in_datapath() -> None:
    p = party()
    def piece(offset: int, more: int, data: bytes) -> bytes:
        return raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(
            nh=17, offset=offset, m=more, id=3) / Raw(data))
    assert p.client(piece(0, 1, bytes(16))).drops == {}
    step = p.client(piece(1, 0, bytes(16)))
    # RFC 5722: the whole datagram goes; both fragments are counted, once each.
    assert step.drops == {DropReason.BAD_FRAGMENT: 2} and step.outbound == []
    assert len(p.datapath.reassembler) == 0


def test_reassembled_datagram_too_big_for_ipv4_makes_no_session() -> None:
    """A reassembled UDP datagram over 65515 bytes cannot be one IPv4 packet: it is dropped
    as too_big before a session is made (it used to make one and then raise)."""
    p = party()
    whole = IPv6(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(id=9)
                     / UDP(sport=40000, dport=53) / Raw(bytes(65520 - 8))))
    pieces = fragment6(whole, 1400)
    steps = [p.client(raw(x)) for x in pieces]
    assert steps[-1].drops == {DropReason.TOO_BIG: 1}
    assert sum(len(s.to_services) for s in steps) == 0
    assert len(p.datapath.flows) == 0


def test_rfc8200_4_5_fragment_timeout_counted_on_tick() -> None:
    p = party()
    p.client(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(nh=17, m=1, id=8)
                 / Raw(bytes(16))))
    watch = DropWatch(p.datapath)
    p.datapath.tick(p.clock.advance(59.0))
    assert watch.delta() == {}
    p.datapath.tick(p.clock.advance(1.0))
    assert watch.delta() == {DropReason.FRAGMENT_TIMEOUT: 1}


# --- limits (RFC 6888 REQ-4, REQ-11) ----------------------------------------------------------

def test_rfc6888_req4_global_flow_limit_counted_and_never_evicts() -> None:
    p = party(max_flows=2)
    first, _ = p.round_trip(client_udp(sport=1))
    p.round_trip(client_udp(sport=2))  # answered, so assured: never evicted
    step = p.client(client_udp(sport=3))
    assert step.to_services == [] and step.drops == {DropReason.FLOW_LIMIT: 1}
    err = step.only_outbound()[ICMPv6DestUnreach]
    assert (err.type, err.code) == (1, 1)  # RFC 6888 REQ-11: tell the sender
    assert len(p.datapath.flows) == 2
    # the old flows keep working both ways
    assert len(p.client(client_udp(sport=1)).to_services) == 1
    assert len(p.service(reply_to(first, b"still here")).outbound) == 1
    assert p.datapath.limit_hits.counts == {DropReason.FLOW_LIMIT: 1}


def test_full_table_evicts_an_unanswered_flow_for_a_new_one() -> None:
    """Linux conntrack's early drop: a flood of flows nobody answered cannot lock out a new
    client; the answered flow stays."""
    p = party(max_flows=2)
    answered, _ = p.round_trip(client_udp(sport=1))
    p.client(client_udp(sport=2))  # never answered
    step = p.client(client_udp(sport=3))
    assert len(step.to_services) == 1 and step.drops == {}
    assert p.datapath.counters.events["flows_evicted"] == 1
    assert len(p.service(reply_to(answered, b"still here")).outbound) == 1
    assert p.client(client_udp(sport=2)).drops == {}  # comes back as a new flow


def test_rfc6888_req4_per_64_limit_counted_and_never_evicts() -> None:
    p = party("6in4", max_flows_per_prefix=2)
    same64 = ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::3"]
    steps = [p.client(client_udp("6in4", src=src)) for src in same64]
    assert [len(s.to_services) for s in steps] == [1, 1, 0]
    assert steps[2].drops == {DropReason.PREFIX_FLOW_LIMIT: 1}
    # another /64 is not affected, and the first two flows still pass
    assert len(p.client(client_udp("6in4", src="2001:db8:1:1::1")).to_services) == 1
    assert len(p.client(client_udp("6in4", src=same64[0])).to_services) == 1
    assert DropWatch(p.datapath).before[DropReason.FLOW_LIMIT] == 0


def test_rfc6888_req2_pool_address_per_client_reused_last() -> None:
    # pool 100.64.0.0/29: .1 .. .6 usable
    p = party("6in4")

    def answered(src: str, sport: int = 40000) -> str:
        return str(p.round_trip(client_udp("6in4", src=src, sport=sport))[0].src)

    first = answered("2001:db8:1::1")
    # one client, two flows: one pool address
    again = answered("2001:db8:1::1", 2)
    p.clock.advance(10.0)
    second = answered("2001:db8:2::1")
    assert (first, again, second) == ("100.64.0.1", "100.64.0.1", "100.64.0.2")
    # the first client's flows expire (the second's, 10 s younger, do not): .1 goes last
    p.datapath.tick(p.clock.advance(T.udp_s - 10.0))
    assert len(p.datapath.flows) == 1
    later = [answered(f"2001:db8:{i}::1") for i in range(3, 8)]
    assert later == ["100.64.0.3", "100.64.0.4", "100.64.0.5", "100.64.0.6", "100.64.0.1"]
    step = p.client(client_udp("6in4", src="2001:db8:99::1"))
    assert step.drops == {DropReason.POOL_EXHAUSTED: 1} and step.to_services == []
    # RFC 6888 REQ-11: the refused client is told
    assert step.only_outbound()[ICMPv6DestUnreach].code == 1


# --- expiry with a fake clock (RFC 6146 §4) ---------------------------------------------------

def test_rfc6146_udp_session_expires_with_fake_clock() -> None:
    p = party()
    request, step = p.round_trip(client_udp())
    assert len(step.outbound) == 1
    p.clock.advance(T.udp_s - 1)
    p.datapath.tick(p.clock.now)
    assert len(p.service(reply_to(request, b"a")).outbound) == 1  # refreshes the session
    p.clock.advance(T.udp_s)
    p.datapath.tick(p.clock.now)
    assert p.service(reply_to(request, b"b")).drops == {DropReason.NO_SESSION: 1}


def test_rfc6146_tcp_established_timeout_in_datapath() -> None:
    p = party()
    request, _ = p.round_trip(client_tcp(flags="S"))
    p.client(client_tcp(flags="A", seq=1001, ack=5001))  # the handshake's third packet
    start = p.clock.now
    p.datapath.tick(p.clock.advance(T.tcp_established_s - 1))
    ack = reply_to(request, b"", tcp_flags="A")
    assert len(p.datapath.flows) == 1
    p.datapath.tick(start + T.tcp_established_s)
    assert len(p.datapath.flows) == 0
    assert p.service(ack).drops == {DropReason.NO_SESSION: 1}


# --- outer destinations (RFC 3056 §5.3, RFC 4213 §3) --------------------------------------------

@pytest.mark.parametrize("client", [CLIENT6_6TO4, NATIVE6, "2002:cb00:7107::5"])
def test_rfc4213_3_6in4_outer_destination_always_the_remote(client: str) -> None:
    p = party("6in4")
    _req, step = p.round_trip(client_udp("6in4", src=client))
    err = p.client(client_udp("6in4", src=client, dport=99))
    echo = p.client(IPv6(src=client, dst=GW6_6IN4) / ICMPv6EchoRequest())
    for s in (step, err, echo):
        assert s.outer_destinations == [REMOTE4]


@pytest.mark.parametrize(("client", "outer"), [
    (CLIENT6_6TO4, CLIENT4),
    ("2002:cb00:7107::5", "203.0.113.7"),
    (NATIVE6, RELAY4),
    ("2a00:1450:4001::1", RELAY4),
])
def test_rfc3056_5_3_6to4_outer_destination_embedded_or_relay(client: str, outer: str) -> None:
    p = party("6to4")
    _req, step = p.round_trip(client_udp(src=client))
    err = p.client(client_udp(src=client, dport=99))
    rst = p.client(client_tcp(src=client, dport=81))
    for s in (step, err, rst):
        assert s.outer_destinations == [outer]


# --- counters and shards ------------------------------------------------------------------------

def test_counters_per_direction_after_a_round_trip() -> None:
    p = party()
    p.round_trip(client_udp(payload=b"ask"), payload=b"answer")
    packets = p.datapath.counters.packets
    assert packets[("inbound", "udp")] == 1 and packets[("to_services", "udp")] == 1
    assert packets[("from_services", "udp")] == 1 and packets[("outbound", "udp")] == 1
    assert p.datapath.counters.bytes[("to_services", "udp")] == 20 + 8 + 3
    assert p.datapath.counters.bytes[("outbound", "udp")] == 40 + 8 + 6
    assert p.datapath.counters.events["flows_created_udp"] == 1


def test_rfc6888_req4_global_limit_split_between_shards() -> None:
    settings = make_settings(max_flows=5)
    datapath = Datapath(settings, worker_pool(settings.pool, 2, 0), workers=2)
    p = TwoParty(datapath)
    steps = []
    for sport in range(1, 5):
        steps.append(p.client(client_udp(sport=sport)))
        if steps[-1].to_services:
            p.service(reply_to(steps[-1].only_to_services()))  # answered: assured
    assert [len(s.to_services) for s in steps] == [1, 1, 1, 0]  # ceil(5 / 2) = 3 per shard
    assert steps[3].drops == {DropReason.FLOW_LIMIT: 1}
    assert datapath.counters.drops[DropReason.INTERNAL_ERROR] == 0


# --- per-rule source allow-lists ([[forward]] from, hostile-input issue finding 11) ----------

@pytest.mark.parametrize("mode", MODES)
def test_rule_from_list_refuses_other_sources_as_no_rule(mode: str) -> None:
    """RFC 6092-style holes: a rule open to one prefix is a closed port to everyone else
    (RST for TCP, port unreachable for UDP, rate-limited), counted as source_not_allowed."""
    from sixgate.workers.engine.settings import Forward

    allowed = "2002:c633:6401::/48" if mode == "6to4" else "2001:db8:1::/48"
    rules = (Forward("tcp", 80, 80, SERVICE4, 8080, (allowed,)),
             Forward("udp", 53, 53, SERVICE4, 5353, (allowed,)))
    p = TwoParty(make_datapath(mode, forwards=rules))
    inside = client6(mode)
    outside = "2001:db8:77::1" if mode == "6to4" else "2001:db8:2::1"
    assert p.client(client_tcp(mode, src=inside)).drops == {}
    refused = p.client(client_tcp(mode, src=outside))
    assert refused.drops == {DropReason.SOURCE_NOT_ALLOWED: 1} and refused.to_services == []
    assert str(refused.only_outbound()[TCP].flags) == "RA"
    udp = p.client(client_udp(mode, src=outside))
    assert udp.drops == {DropReason.SOURCE_NOT_ALLOWED: 1}
    assert udp.only_outbound()[ICMPv6DestUnreach].code == 4
    assert len(p.datapath.flows) == 1


@pytest.mark.parametrize("mode", MODES)
def test_tcp_states_follow_the_client_through_the_kernel_fanout_path(mode: str) -> None:
    """The one-lookup path of kernel fan-out (``from_tunnel``) reads the client's TCP flags
    from the right byte: the third packet of the handshake assures the session, a FIN moves
    it on (it once read a byte of the inner destination address instead)."""
    p = party(mode)
    outer = CLIENT4 if mode == "6to4" else REMOTE4
    first = p.tunnel(client_tcp(mode, flags="S", seq=1000), outer)
    request = first.only_to_services()
    p.service(reply_to(request))  # SYN-ACK
    (session,) = p.datapath.flows.sessions()
    assert (session.state, session.assured) == (V4_SYN_RCV, False)
    for _ in range(2):  # the second goes through the one-lookup cache
        step = p.tunnel(client_tcp(mode, flags="A", seq=1001, ack=5001), outer)
        assert len(step.to_services) == 1
    assert (session.state, session.assured) == (ESTABLISHED, True)
    p.tunnel(client_tcp(mode, flags="FA", seq=1001, ack=5001), outer)
    assert session.state == V6_FIN


def _lying(layer: UDP | TCP) -> bytes:
    """A client packet whose checksum is right but whose header lies about its length."""
    return raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / layer / Raw(b"query"))


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "full"])
def test_parse_fully_udp_length_not_the_datagrams_is_bad_header(fast_path: bool) -> None:
    """Issue 15 (TAYGA's parse-fully rule): a UDP length field that disagrees with the IPv6
    payload length (RFC 768) is dropped as bad_header, never translated, also for a live
    session whose packets take the fast path."""
    settings = make_settings("6to4")
    p = TwoParty(Datapath(settings, worker_pool(settings.pool, 1, 0), fast_path=fast_path),
                 FakeClock())
    assert len(p.client(client_udp(sport=41000)).to_services) == 1  # the session exists
    assert len(p.client(client_udp(sport=41000)).to_services) == 1  # its template is made
    for length in (8, 12, 14, 40):
        step = p.client(_lying(UDP(sport=41000, dport=53, len=length)))
        assert step.to_services == [] and step.drops == {DropReason.BAD_HEADER: 1}, length
    assert len(p.client(client_udp(sport=41000)).to_services) == 1


@pytest.mark.parametrize("dataofs", [0, 4, 15])
def test_parse_fully_tcp_data_offset_outside_the_segment_is_bad_header(dataofs: int) -> None:
    """RFC 9293 §3.1: the data offset is at least 5 words and within the segment."""
    p = party()
    step = p.client(_lying(TCP(sport=40000, dport=80, flags="S", dataofs=dataofs)))
    assert step.to_services == [] and step.drops == {DropReason.BAD_HEADER: 1}


# --- a reloaded config (issue 17) -------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_reload_ends_the_sessions_of_a_removed_rule_with_a_reset_on_both_sides(mode: str) -> None:
    """Datapath.reconfigure without the rule of port 80: that TCP session ends; each side gets
    an out-of-window ACK, whose answer meets no session and is reset with exactly the sequence
    number it expects (RFC 9293 §3.10.7.1); the UDP session of a kept rule goes on."""
    p = party(mode)
    syn = client_tcp(mode, sport=40000, dport=80, flags="S", seq=1000)
    request, answer = p.round_trip(syn)
    p.client(client_tcp(mode, sport=40000, dport=80, flags="A", seq=1001, ack=5001))
    p.round_trip(client_udp(mode, sport=40001, dport=53))
    kept = [f for f in p.datapath.settings.forwards if f.port_lo != 80]
    out = p.datapath.reconfigure(dataclasses.replace(p.datapath.settings, forwards=tuple(kept)))
    assert [(s.proto, s.cport) for s in p.datapath.flows.sessions()] == [(17, 40001)]
    probe6 = IPv6(out.to_tunnel[0][0])
    assert len(out.to_tunnel) == 1 and probe6[TCP].flags == "A"
    assert (probe6.src, probe6[TCP].sport, probe6.dst, probe6[TCP].dport) == (
        gw6(mode), 80, client6(mode), 40000)
    probe4 = IP(out.to_services[0])
    assert len(out.to_services) == 1 and probe4[TCP].flags == "A"
    assert (probe4.src, probe4[TCP].sport, probe4.dst, probe4[TCP].dport) == (
        request.src, request[TCP].sport, request.dst, request[TCP].dport)
    # The client answers the out-of-window ACK with its own: reset at SEG.ACK.
    client_ack = client_tcp(mode, sport=40000, dport=80, flags="A", seq=1001, ack=5001)
    reset6 = p.client(client_ack).only_outbound()
    assert reset6[TCP].flags == "R" and reset6[TCP].seq == 5001
    # So does the service: reset towards it at its SEG.ACK.
    service_ack = reply_to(request, tcp_flags="A")
    reset4 = p.service(service_ack).only_to_services()
    assert reset4[TCP].flags == "R" and reset4[TCP].seq == IP(service_ack)[TCP].ack
    assert (reset4.src, reset4.dst) == (request.src, request.dst)
    assert p.datapath.counters.events.get(Event.FLOWS_ENDED_BY_RELOAD.value) == 1
    assert answer.outbound  # the SYN-ACK reached the client
    # Both probes go once more PROBE_AGAIN_S after the next tick (Linux answers one
    # out-of-window segment per socket per 500 ms), and only once.
    first = p.datapath.tick(100.0)
    assert not first.to_tunnel and not first.to_services
    again = p.datapath.tick(100.0 + PROBE_AGAIN_S)
    assert [bytes(IPv6(packet)) for packet, _ in again.to_tunnel] == [bytes(probe6)]
    assert [bytes(IP(packet)) for packet in again.to_services] == [bytes(probe4)]
    later = p.datapath.tick(102.0)
    assert not later.to_tunnel and not later.to_services
