"""scapy builds what the engine reads: proto-41 packets with IPv6 inside (6to4 and 6in4),
IPv6 with Hop-by-Hop, Destination Options, Routing (Segments Left 0) and Fragment headers,
fragments cut by scapy's fragment6, and ICMPv4 errors from the service side. What comes out
is read back by scapy and compared with what scapy put in.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    RouterAlert,
    defragment6,
    fragment6,
)
from scapy.packet import Packet, Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6IN4,
    GW6_6TO4,
    NATIVE6,
    POLICY_6IN4,
    POLICY_6TO4,
    REMOTE4,
    TwoParty,
    make_datapath,
    packed4,
)
from support.scapy_check import checksums_match

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.tunnel import check_inbound


def party(mode: str = "6to4") -> TwoParty:
    return TwoParty(make_datapath(mode))


# --- proto 41 built by scapy -------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "outer_src", "inner_src", "inner_dst"), [
    ("6to4", CLIENT4, CLIENT6_6TO4, GW6_6TO4),
    ("6to4", "203.0.113.50", NATIVE6, GW6_6TO4),
    ("6in4", REMOTE4, NATIVE6, GW6_6IN4),
])
def test_rfc4213_3_6_scapy_encapsulated_packet_decapsulated(mode: str, outer_src: str,
                                                            inner_src: str,
                                                            inner_dst: str) -> None:
    inner = IPv6(src=inner_src, dst=inner_dst) / UDP(sport=999, dport=53) / Raw(b"dns?")
    outer = IP(src=outer_src, dst=GW4) / inner  # scapy sets proto 41 itself
    data = raw(outer)
    assert IP(data).proto == 41
    result = check_inbound(data, POLICY_6TO4 if mode == "6to4" else POLICY_6IN4)
    assert not isinstance(result, DropReason), result
    decapsulated, src4 = result
    assert bytes(decapsulated) == raw(IP(data).payload)
    assert src4 == packed4(outer_src)
    # and the engine answers the decapsulated packet
    out = party(mode).client(bytes(decapsulated)).only_to_services()
    assert raw(out[UDP].payload) == b"dns?" and out[UDP].sport == 999


def test_rfc4213_3_6_scapy_padded_outer_packet() -> None:
    inner = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoRequest(data=b"pad me")
    # the IPv4 total length counts 10 bytes of padding the IPv6 payload length does not
    data = raw(IP(src=CLIENT4, dst=GW4, proto=41, len=20 + len(raw(inner)) + 10)
               / Raw(raw(inner))) + bytes(10)
    assert IP(data).len == len(data)
    result = check_inbound(data, POLICY_6TO4)
    assert not isinstance(result, DropReason)
    assert bytes(result[0]) == raw(inner)


# --- extension headers built by scapy (RFC 7915 §5.1) -------------------------------------------

EXTENSIONS: dict[str, Packet] = {
    "hop_by_hop_padn": IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 4)]),
    "hop_by_hop_router_alert": IPv6ExtHdrHopByHop(options=[RouterAlert()]),
    "dest_opts_unknown_skippable": IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x1E,
                                                                            optdata=b"abc")]),
    "dest_opts_long": IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 20)]),
    "routing_sl0": IPv6ExtHdrRouting(segleft=0, addresses=[NATIVE6, GW6_6TO4]),
    "atomic_fragment": IPv6ExtHdrFragment(id=0x77, m=0, offset=0),
    "all_four": (IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(segleft=0)
                 / IPv6ExtHdrFragment(id=5)),
    "dest_opts_after_fragment": IPv6ExtHdrFragment(id=6) / IPv6ExtHdrDestOpt(),
}


@pytest.mark.parametrize("name", sorted(EXTENSIONS))
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_rfc7915_5_1_scapy_extension_headers_skipped(name: str, proto: str) -> None:
    l4: Packet = (UDP(sport=4321, dport=53) if proto == "udp"
                  else TCP(sport=4321, dport=80, flags="S", seq=10, options=[("MSS", 1300)]))
    pkt = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, hlim=33) / EXTENSIONS[name].copy() / l4 / Raw(
        b"through the chain")
    out = party().client(raw(pkt)).only_to_services()
    layer = UDP if proto == "udp" else TCP
    assert out.ihl == 5 and out.proto == (17 if proto == "udp" else 6)  # nothing translated
    assert out.ttl == 32
    assert out[layer].sport == 4321
    assert raw(out[layer].payload) == b"through the chain"
    assert checksums_match(raw(out))


@pytest.mark.parametrize("name", sorted(EXTENSIONS))
def test_rfc4443_4_2_echo_through_scapy_extension_headers(name: str) -> None:
    pkt = (IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / EXTENSIONS[name].copy()
           / ICMPv6EchoRequest(id=3, seq=4, data=b"ext"))
    step = party().client(raw(pkt))
    reply = step.only_outbound()
    assert reply.nh == 58  # the reply carries no extension header
    assert (reply[ICMPv6EchoReply].id, reply[ICMPv6EchoReply].data) == (3, b"ext")
    assert checksums_match(raw(reply))


@pytest.mark.parametrize("segleft", [1, 2])
def test_rfc7915_5_1_scapy_routing_header_segments_left_not_translated(segleft: int) -> None:
    pkt = (IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
           / IPv6ExtHdrRouting(segleft=segleft, addresses=[NATIVE6, GW6_6TO4])
           / UDP(sport=1, dport=53))
    step = party().client(raw(pkt))
    assert step.to_services == [] and step.drops == {DropReason.BAD_HEADER: 1}


# --- fragments built by scapy (RFC 8200 §4.5) ---------------------------------------------------

@given(st.integers(1500, 6000), st.integers(1280, 1500), st.randoms(use_true_random=False),
       st.sampled_from(["none", "hop_by_hop", "dest_opts_before"]))
def test_rfc8200_4_5_scapy_fragments_reassembled(size: int, mtu: int, rnd: object,
                                                 before: str) -> None:
    unfragmentable: list[Packet] = {
        "none": [], "hop_by_hop": [IPv6ExtHdrHopByHop()],
        "dest_opts_before": [IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(segleft=0)]}[before]
    pkt: Packet = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
    for header in unfragmentable:
        pkt = pkt / header
    payload = bytes((i * 13) % 256 for i in range(size))
    pkt = pkt / IPv6ExtHdrFragment(id=0xFEED) / UDP(sport=5000, dport=53) / Raw(payload)
    pieces = [raw(p) for p in fragment6(pkt, mtu)]
    assert len(pieces) >= 2
    rnd.shuffle(pieces)  # type: ignore[attr-defined]
    p = party()
    outputs = []
    for piece in pieces:
        step = p.client(piece)
        assert step.drops == {}
        outputs += step.to_services
    assert len(outputs) == 1
    out = IP(outputs[0])
    assert raw(out[UDP].payload) == payload and checksums_match(outputs[0])


def test_rfc8200_4_5_scapy_fragmented_echo_answered() -> None:
    request = (IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(id=1)
               / ICMPv6EchoRequest(id=9, data=b"E" * 4000))
    p = party()
    outbound = []
    for piece in fragment6(request, 1480):
        outbound += p.client(raw(piece)).outbound
    whole = defragment6([IPv6(pkt) for pkt, _ in outbound])
    assert whole[ICMPv6EchoReply].data == b"E" * 4000
    assert checksums_match(raw(whole))


# --- ICMPv4 errors built by scapy ---------------------------------------------------------------

def test_rfc7915_4_2_scapy_fragmentation_needed_to_packet_too_big() -> None:
    p = party()
    request = p.client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=7, dport=53)
                       / Raw(b"q")).only_to_services()
    err = IP(src="127.0.0.1", dst=request.src) / ICMP(type=3, code=4, nexthopmtu=1300) / raw(
        request)
    out = p.service(raw(err)).only_outbound()
    assert out[ICMPv6PacketTooBig].mtu == 1320
    assert out[IPerror6].src == CLIENT6_6TO4
    assert checksums_match(raw(out))


def test_rfc7915_4_2_scapy_rfc792_short_quote_translated() -> None:
    # RFC 792 routers quote the IP header and only 8 bytes of the datagram
    p = party()
    request = p.client(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=7, dport=53)
                       / Raw(b"long enough payload")).only_to_services()
    err = IP(src="192.0.2.200", dst=request.src) / ICMP(type=3, code=1) / raw(request)[:28]
    out = p.service(raw(err)).only_outbound()
    unreach = out[ICMPv6DestUnreach]
    assert (unreach.type, unreach.code) == (1, 0)
    quoted = out[IPerror6]
    assert (quoted.src, quoted.dst, quoted.nh) == (CLIENT6_6TO4, GW6_6TO4, 17)
    assert raw(quoted)[40:44] == (7).to_bytes(2, "big") + (53).to_bytes(2, "big")
    assert checksums_match(raw(out))
