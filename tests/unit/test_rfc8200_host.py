"""RFC 8200 §4 host rules for the extension headers sixgate walks (RFC-NOTES "RFC 8200 §4"),
at the engine: scapy builds each packet independently of the engine, it goes in through the
engine's one inbound entry (``Datapath.from_tunnel``, tunnel checks included, from the client's
own 6to4 address and from another outer source), and the ICMPv6 answer is read back with
scapy: type, code and pointer, the invoking packet quoted byte for byte, and exactly one drop
reason. Lab versions of the same rules run the
real ``sixgate run`` (tests/lab/test_gateway.py ``test_rfc8200_4_host_rule``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Pad1,
    PadN,
)
from scapy.packet import Packet, Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW6_6TO4,
    NATIVE6,
    FakeClock,
    Step,
    TwoParty,
    make_datapath,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.packet import ParameterProblem, parse_ipv6

Send = Callable[[TwoParty, bytes], Step]


def via_client(p: TwoParty, packet: bytes) -> Step:
    return p.client(packet)


def via_relay(p: TwoParty, packet: bytes) -> Step:
    """The same packet from another outer source (a second packet of the flow takes the
    one-lookup path's cache key of another tunnel endpoint)."""
    return p.tunnel(packet, CLIENT4)


PATHS = [pytest.param(via_client, id="client"), pytest.param(via_relay, id="outer_client4")]


def party() -> TwoParty:
    return TwoParty(make_datapath("6to4"), FakeClock())


def to_us(*layers: Packet) -> bytes:
    packet: Packet = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
    for layer in layers:
        packet = packet / layer
    return raw(packet)


def echo() -> Packet:
    return ICMPv6EchoRequest(id=7, seq=1, data=b"conformance")


def assert_parameter_problem(send: Send, packet: bytes, code: int, pointer: int,
                             reason: DropReason) -> None:
    step = send(party(), packet)
    assert step.drops == {reason: 1}, step.drops
    assert step.to_services == []
    reply = step.only_outbound()
    assert (reply.src, reply.dst) == (GW6_6TO4, CLIENT6_6TO4)
    problem = reply[ICMPv6ParamProblem]
    assert (problem.type, problem.code, problem.ptr) == (4, code, pointer)
    assert raw(problem)[8:] == packet  # RFC 4443 §2.4(c): the invoking packet, whole here


def assert_silent(send: Send, packet: bytes, reason: DropReason) -> None:
    step = send(party(), packet)
    assert step.drops == {reason: 1}, step.drops
    assert step.outbound == [] and step.to_services == []


# --- §4.2 options ----------------------------------------------------------------------------

@pytest.mark.parametrize("send", PATHS)
@pytest.mark.parametrize("header", [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt])
def test_rfc8200_4_2_unknown_option_00_is_skipped(send: Send, header: type[Packet]) -> None:
    packet = to_us(header(options=[HBHOptUnknown(otype=0x1E, optdata=b"ab")]), echo())
    step = send(party(), packet)
    assert step.drops == {}
    assert step.only_outbound()[1].type == 129  # echo reply


@pytest.mark.parametrize("send", PATHS)
@pytest.mark.parametrize("header", [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt])
def test_rfc8200_4_2_unknown_option_01_is_discarded_silently(send: Send,
                                                             header: type[Packet]) -> None:
    assert_silent(send, to_us(header(options=[HBHOptUnknown(otype=0x5E, optdata=b"ab")]),
                              echo()), DropReason.UNRECOGNIZED_OPTION)


@pytest.mark.parametrize("send", PATHS)
@pytest.mark.parametrize("otype", [0x9E, 0xDE], ids=["bits10", "bits11"])
@pytest.mark.parametrize("header", [IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt])
def test_rfc8200_4_2_unknown_option_10_and_11_answered_code_2_at_the_option(
        send: Send, otype: int, header: type[Packet]) -> None:
    # Pad1, PadN(2) and then the unknown option: 40 + 2 + 1 + 4 = pointer 47.
    options = [Pad1(), PadN(optdata=b"\0\0"), HBHOptUnknown(otype=otype, optdata=b"")]
    assert_parameter_problem(send, to_us(header(options=options), echo()), 2, 47,
                             DropReason.UNRECOGNIZED_OPTION)


def test_rfc8200_4_2_bits_11_silent_and_bits_10_answered_for_a_multicast_destination() -> None:
    """At the parser (our own addresses are never multicast, so the engine drops such a
    packet as not ours): 11 -> discard silently, 10 -> Parameter Problem even so."""
    def packet(otype: int) -> bytes:
        return raw(IPv6(src=CLIENT6_6TO4, dst="ff02::1") / IPv6ExtHdrDestOpt(
            options=[HBHOptUnknown(otype=otype, optdata=b"")]) / echo())
    assert parse_ipv6(packet(0xDE)) == DropReason.UNRECOGNIZED_OPTION
    assert parse_ipv6(packet(0x9E)) == ParameterProblem(DropReason.UNRECOGNIZED_OPTION, 2, 42,
                                                        to_multicast=True)


@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_2_pad_options_are_recognized(send: Send) -> None:
    header = IPv6ExtHdrDestOpt(options=[Pad1(), PadN(optdata=b"\0" * 3)])
    step = send(party(), to_us(header, UDP(sport=5, dport=53) / b"x"))
    assert step.drops == {} and len(step.to_services) == 1


@pytest.mark.parametrize("send", PATHS)
def test_option_overrunning_its_header_is_a_bad_header(send: Send) -> None:
    # PadN claiming 9 data bytes in a header with room for 4.
    header = raw(IPv6ExtHdrDestOpt(nh=58, options=[PadN(optdata=b"\0" * 4)]))
    broken = header[:3] + b"\x09" + header[4:]
    packet = raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=60) / Raw(broken) / echo())
    assert_silent(send, packet, DropReason.BAD_HEADER)


# --- §4.4 routing header ---------------------------------------------------------------------

@pytest.mark.parametrize("send", PATHS)
@pytest.mark.parametrize("routing_type", [0, 2, 4, 253])
def test_rfc8200_4_4_routing_header_segments_left_nonzero_code_0_at_routing_type(
        send: Send, routing_type: int) -> None:
    header = IPv6ExtHdrRouting(type=routing_type, segleft=1, addresses=[NATIVE6])
    assert_parameter_problem(send, to_us(header, echo()), 0, 42, DropReason.BAD_HEADER)


@pytest.mark.parametrize("send", PATHS)
@pytest.mark.parametrize("routing_type", [0, 253])
def test_rfc8200_4_4_routing_header_segments_left_zero_is_ignored(send: Send,
                                                                  routing_type: int) -> None:
    header = IPv6ExtHdrRouting(type=routing_type, segleft=0, addresses=[NATIVE6])
    step = send(party(), to_us(header, echo()))
    assert step.drops == {}
    assert step.only_outbound()[1].type == 129


# --- §4 order of headers ---------------------------------------------------------------------

@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_hop_by_hop_not_first_code_1_at_the_next_header_naming_it(send: Send) -> None:
    packet = to_us(IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), echo())
    assert_parameter_problem(send, packet, 1, 40, DropReason.BAD_HEADER)


@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_unknown_next_header_code_1_at_that_field(send: Send) -> None:
    packet = to_us(IPv6ExtHdrDestOpt(nh=253), Raw(b"\0" * 8))
    assert_parameter_problem(send, packet, 1, 40, DropReason.UNSUPPORTED_PROTOCOL)


# --- §4.5 fragment header (RFC 5722, RFC 7112) ------------------------------------------------

@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_5_non_last_fragment_not_multiple_of_8_code_0_at_payload_length(
        send: Send) -> None:
    packet = to_us(IPv6ExtHdrFragment(nh=17, m=1, id=11), UDP(sport=5, dport=53) / (b"x" * 5))
    assert_parameter_problem(send, packet, 0, 4, DropReason.BAD_FRAGMENT)


@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_5_fragment_past_65535_code_0_at_fragment_offset(send: Send) -> None:
    # Offset 65528 + 16 bytes of data reaches past the largest payload.
    packet = to_us(IPv6ExtHdrFragment(nh=17, m=0, id=12, offset=65528 // 8), Raw(bytes(16)))
    assert_parameter_problem(send, packet, 0, 42, DropReason.BAD_FRAGMENT)


@pytest.mark.parametrize("send", PATHS)
def test_rfc7112_5_first_fragment_without_the_upper_layer_header_code_3_pointer_0(
        send: Send) -> None:
    # A first fragment (M=1) whose Destination Options header runs into the next fragment.
    options = raw(IPv6ExtHdrDestOpt(nh=17, options=[PadN(optdata=b"\0" * 20)]))
    packet = to_us(IPv6ExtHdrFragment(nh=60, m=1, id=13), Raw(options[:16]))
    assert_parameter_problem(send, packet, 3, 0, DropReason.BAD_FRAGMENT)


@pytest.mark.parametrize("send", PATHS)
def test_rfc7112_5_first_fragment_with_a_cut_tcp_header_code_3(send: Send) -> None:
    packet = to_us(IPv6ExtHdrFragment(nh=6, m=1, id=14), Raw(bytes(16)))
    assert_parameter_problem(send, packet, 3, 0, DropReason.BAD_FRAGMENT)


@pytest.mark.parametrize("send", PATHS)
def test_rfc8200_4_5_reassembly_timeout_time_exceeded_code_1_after_a_first_fragment(
        send: Send) -> None:
    p = party()
    first = to_us(IPv6ExtHdrFragment(nh=17, m=1, id=31), UDP(sport=5, dport=53) / bytes(8))
    assert send(p, first).outbound == []
    assert p.tick(59.0).outbound == []
    step = p.tick(1.0)
    assert step.drops == {DropReason.FRAGMENT_TIMEOUT: 1}
    reply = step.only_outbound()
    assert (reply.src, reply.dst) == (GW6_6TO4, CLIENT6_6TO4)
    exceeded = reply[ICMPv6TimeExceeded]
    assert (exceeded.type, exceeded.code) == (3, 1)
    assert raw(exceeded)[8:] == first


def test_rfc8200_4_5_reassembly_timeout_silent_without_the_first_fragment() -> None:
    p = party()
    later = to_us(IPv6ExtHdrFragment(nh=17, m=1, id=32, offset=2), Raw(bytes(16)))
    assert p.client(later).outbound == []
    step = p.tick(60.0)
    assert step.drops == {DropReason.FRAGMENT_TIMEOUT: 1} and step.outbound == []


# --- RFC 4443 §2.4 for these errors ----------------------------------------------------------

def test_rfc4443_2_4_f_parameter_problems_are_rate_limited_one_reason_each() -> None:
    p = party()
    packet = to_us(IPv6ExtHdrRouting(segleft=1, addresses=[NATIVE6]), echo())
    steps = [p.client(packet) for _ in range(40)]
    answered = sum(len(step.outbound) for step in steps)
    assert 0 < answered < 40
    assert all(step.drops == {DropReason.BAD_HEADER: 1} for step in steps)


def test_rfc4443_2_4_e_no_error_to_a_multicast_source() -> None:
    """A multicast source never gets an error; through the tunnel it does not even reach the
    header walk: RFC 3964 §5.3.1 drops it as a martian first (the §2.4(e) rule itself:
    tests/unit/test_icmp.py may_send_error)."""
    packet = raw(IPv6(src="ff02::1", dst=GW6_6TO4) / IPv6ExtHdrRouting(
        segleft=1, addresses=[NATIVE6]) / echo())
    step = party().client(packet)
    assert step.outbound == [] and step.drops == {DropReason.MARTIAN_SOURCE: 1}


# --- property: a malformed chain is refused, never translated --------------------------------

HEADERS = st.sampled_from([0, 43, 44, 60])


@settings(max_examples=300, deadline=None)
@given(chain=st.lists(st.tuples(HEADERS, st.binary(min_size=0, max_size=24)), min_size=1,
                      max_size=5),
       upper=st.sampled_from([6, 17, 58, 59, 253]), tail=st.binary(max_size=40))
def test_any_extension_chain_gets_one_reason_or_a_translation_never_both(
        chain: list[tuple[int, bytes]], upper: int, tail: bytes) -> None:
    """Random chains of options, routing and fragment headers with random bodies: each packet
    is counted under at most one drop reason; a dropped one never reaches the services, and
    what leaves toward the client is only ever one ICMPv6 message (error or echo reply)."""
    body = b""
    kinds = [kind for kind, _ in chain] + [upper]
    for (kind, data), following in zip(chain, kinds[1:], strict=True):
        data = data[:6] if kind == 44 else data
        length = (len(data) + 2 + 7) // 8 * 8
        block = bytes([following, (length // 8) - 1 if kind != 44 else 0]) + data
        body += block.ljust(length if kind != 44 else 8, b"\0")
    packet = raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, nh=kinds[0]) / Raw(body + tail))
    for send in (via_client, via_relay):
        step = send(party(), packet)
        total = sum(step.drops.values())
        assert total <= 1, step.drops
        if total:
            assert step.to_services == []
        assert len(step.outbound) <= 1
        if step.outbound:
            assert IPv6(step.outbound[0][0]).nh == 58
