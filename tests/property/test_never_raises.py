"""STYLE.md "Bad input and errors": no engine entry point raises for any bytes, and the
Datapath never counts INTERNAL_ERROR. Fed arbitrary bytes, structurally plausible packets,
every truncation of valid packets, valid packets with trailing bytes and with one byte
changed, and streams of fragments for the reassembler.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.packet import Raw, raw
from support import helpers
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6IN4,
    GW6_6TO4,
    REMOTE4,
    TwoParty,
    client_tcp,
    client_udp,
    icmp4_error_about,
    make_datapath,
    reply_to,
)
from support.strategies import FRAGMENT, GW6, UDP, ipv4, ipv6, ipv6_packets

from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.packet import ParameterProblem, parse_ipv4, parse_ipv6
from sixgate.workers.engine.tunnel import TunnelPolicy, check_inbound
from sixgate.workers.engine.wire import decode_batch, encode_batch

POLICIES = (TunnelPolicy.build("6to4", GW4, None, [GW6_6TO4]),
            TunnelPolicy.build("6in4", GW4, REMOTE4, [GW6_6IN4]))


def sessions_datapath() -> tuple[Datapath, list[IP]]:
    """A Datapath with live UDP and TCP sessions, and the IPv4 packets the services got."""
    p = TwoParty(make_datapath())
    requests = [p.client(client_udp(sport=40000)).only_to_services(),
                p.client(client_tcp(sport=40001, flags="S")).only_to_services()]
    return p.datapath, requests


# --- the entry points, each must return data or a reason -------------------------------------

def run_all(data: bytes) -> None:
    """Push ``data`` through every entry point; they must not raise."""
    v4 = parse_ipv4(data)
    assert isinstance(v4, DropReason | tuple)
    v6 = parse_ipv6(data)
    assert isinstance(v6, DropReason | ParameterProblem | tuple)
    for policy in POLICIES:
        result = check_inbound(data, policy)
        assert isinstance(result, DropReason | tuple)
    batch = decode_batch(data)
    assert batch is None or isinstance(batch, list)
    dp, _ = sessions_datapath()
    # as a captured packet, and as the IPv6 packet inside one from a 6to4 client
    dp.from_tunnel([data, helpers.encapsulate(data, CLIENT4)], 1000.0)
    for packet in batch or ():
        dp.from_tunnel([packet], 1000.5)
    dp.from_services([data], 1001.0)
    dp.tick(2000.0)
    assert dp.counters.drops[DropReason.INTERNAL_ERROR] == 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    run_all(data)


@given(ipv6_packets())
def test_plausible_ipv6_never_raises(packet: bytes) -> None:
    run_all(packet)
    # and decapsulated from a proto-41 packet, in both modes
    run_all(ipv4(helpers.packed4(CLIENT4), helpers.packed4(GW4), 41, packet))
    run_all(ipv4(helpers.packed4(REMOTE4), helpers.packed4(GW4), 41, packet))


@given(st.integers(0, 255), st.binary(max_size=80), st.integers(0, 3))
def test_plausible_ipv4_never_raises(proto: int, payload: bytes, flags: int) -> None:
    dp, requests = sessions_datapath()
    for request in requests:
        data = ipv4(helpers.packed4(request.dst), helpers.packed4(request.src), proto, payload,
                    flags_offset=flags << 13)
        dp.from_services([data], 1000.0)
    assert dp.counters.drops[DropReason.INTERNAL_ERROR] == 0


@given(st.sampled_from([3, 11, 12, 0, 8, 5]), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 60), st.binary(max_size=40))
def test_icmpv4_errors_about_live_sessions_never_raise(icmp_type: int, code: int, rest: int,
                                                       cut: int, tail: bytes) -> None:
    dp, requests = sessions_datapath()
    for request in requests:
        quote = raw(request)[:cut] + tail if cut else raw(request) + tail
        message = bytes([icmp_type, code, 0, 0]) + rest.to_bytes(4, "big") + quote
        data = ipv4(helpers.packed4("127.0.0.1"), helpers.packed4(request.src), 1, message)
        dp.from_services([data], 1000.0)
    assert dp.counters.drops[DropReason.INTERNAL_ERROR] == 0


# --- every truncation, trailing bytes, one changed byte ---------------------------------------

def _corpus() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes]]:
    dp, requests = sessions_datapath()
    udp_req, tcp_req = requests
    big = (IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(id=3)
           / ICMPv6EchoRequest(data=b"f" * 2000))
    inner = [
        client_udp(), client_udp(dport=99), client_tcp(options=[("MSS", 9000), ("NOP", None),
                                                                ("WScale", 7)]),
        client_tcp(flags="A", ack=5, payload=b"data"),
        raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoRequest(data=b"ping")),
        raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrRouting(segleft=0) / ScapyUDP(sport=1, dport=53) / Raw(b"ext")),
        *[raw(p) for p in fragment6(big, 1280)],
    ]
    outer = [raw(IP(src=CLIENT4, dst=GW4, proto=41) / Raw(p)) for p in inner[:3]]
    v4 = [reply_to(udp_req, b"answer"), reply_to(tcp_req, tcp_options=[("MSS", 65495)]),
          icmp4_error_about(udp_req, 3, 3), icmp4_error_about(tcp_req, 3, 4, unused=1400)]
    batch = [encode_batch(outer)]
    return inner, outer, v4, batch


INNER, OUTER, FROM_SERVICES, BATCHES = _corpus()
CORPUS = INNER + OUTER + FROM_SERVICES + BATCHES


def test_every_truncation_of_valid_packets_never_raises() -> None:
    for packet in CORPUS:
        for cut in range(len(packet) + 1):
            if cut > 120 and cut % 97 and cut != len(packet) - 1:
                continue  # every length of the headers, a sample of the payload lengths
            run_all(packet[:cut])


@given(st.sampled_from(CORPUS), st.binary(min_size=1, max_size=40))
def test_valid_packets_with_trailing_bytes_never_raise(packet: bytes, tail: bytes) -> None:
    run_all(packet + tail)


@given(st.sampled_from(CORPUS), st.data())
def test_valid_packets_with_one_byte_changed_never_raise(packet: bytes,
                                                         data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(packet) - 1))
    value = data.draw(st.integers(0, 255))
    run_all(packet[:index] + bytes([value]) + packet[index + 1:])


# --- the reassembler through Datapath.from_tunnel -----------------------------------------

@st.composite
def fragment_streams(draw: st.DrawFn) -> list[bytes]:
    """Fragments of a few datagrams (few idents, so they collide), random offsets, M flags,
    lengths, upper layers and extension headers before the Fragment header."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        ident = draw(st.integers(0, 2))
        offset = draw(st.sampled_from([0, 0, 1, 2, 3, 8, 100, 8190, 8191]))
        more = draw(st.integers(0, 1))
        data = draw(st.binary(max_size=48))
        nxt = draw(st.sampled_from([UDP, 6, 58, 44, 0, 60]))
        frag = bytes([nxt, 0]) + ((offset << 3) | more).to_bytes(2, "big") + ident.to_bytes(
            4, "big")
        if draw(st.booleans()):
            body = bytes([FRAGMENT, 0]) + bytes(6) + frag + data  # Destination Options first
            out.append(ipv6(helpers.packed6(CLIENT6_6TO4), GW6, 60, body))
        else:
            out.append(ipv6(helpers.packed6(CLIENT6_6TO4), GW6, FRAGMENT, frag + data))
    return out


@given(fragment_streams(), st.floats(0, 200))
def test_reassembler_via_from_tunnel_never_raises(stream: list[bytes], later: float) -> None:
    dp = make_datapath(fragment_datagrams=2, fragment_bytes=128)
    for i, packet in enumerate(stream):
        dp.from_tunnel([helpers.encapsulate(packet, CLIENT4)], 1000.0 + i)
    dp.tick(1000.0 + later)
    assert dp.counters.drops[DropReason.INTERNAL_ERROR] == 0
    assert dp.reassembler.bytes_held >= 0
    assert len(dp.reassembler) <= 2 and dp.reassembler.bytes_held <= 128


def test_tcp_corpus_entry_is_what_it_claims() -> None:
    # guard for the corpus: scapy sees the TCP options we meant to feed
    assert IPv6(CORPUS[2])[TCP].options[0] == ("MSS", 9000)


def test_corpus_is_made_of_valid_packets() -> None:
    # the truncation/mutation tests start from packets the engine accepts
    expected = [(1, 0), (0, 1), (1, 0), (0, 1), (0, 1), (1, 0)]  # (to_services, outbound)
    for packet, (n_services, n_outbound) in zip(CORPUS[:6], expected, strict=True):
        step = TwoParty(make_datapath()).client(packet)
        assert (len(step.to_services), len(step.outbound)) == (n_services, n_outbound), step
    for packet in OUTER:
        assert not isinstance(check_inbound(packet, POLICIES[0]), DropReason)
    dp, _ = sessions_datapath()
    for packet in FROM_SERVICES:
        watch = helpers.DropWatch(dp)
        dp.from_services([packet], 1000.0)
        assert watch.delta() == {}
    assert [len(decode_batch(b) or []) for b in BATCHES] == [3]


# --- the CLAT (issue 18): its two directions, straight and through Datapath.from_clat ----------

CLAT_HOST4 = bytes((192, 0, 0, 1))
CLAT6 = bytes.fromhex("20010db80100000000000000" "0000c1a7")  # 2001:db8:100::c1a7
PLAT6 = bytes.fromhex("0064ff9b0000000000000000c6336407")  # 64:ff9b::198.51.100.7


def clat_datapath() -> Datapath:
    settings = dataclasses.replace(
        helpers.make_settings("6to4"), mode="clat", clat_plat_prefix="64:ff9b::/96",
        clat_ipv6_address=str(ipaddress.IPv6Address(CLAT6)))
    return Datapath(settings, [])


@given(st.integers(0, 255), st.binary(max_size=120), st.integers(0, 0xFFFF),
       st.integers(0, 255))
def test_the_clat_never_raises_on_plausible_packets_either_way(proto: int, payload: bytes,
                                                               flags: int, ttl: int) -> None:
    dp = clat_datapath()
    out = dp.from_clat([ipv4(CLAT_HOST4, bytes((198, 51, 100, 7)), proto, payload, ttl=ttl,
                             flags_offset=flags),
                        ipv6(PLAT6, CLAT6, proto, payload, hop_limit=ttl),
                        payload], 1.0)
    assert out.raised is None and dp.counters.drops[DropReason.INTERNAL_ERROR] == 0
