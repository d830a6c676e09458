"""What the engine does for the AF_PACKET capture (workers/capture.py), with scapy as the
independent peer: a CHECKSUM_PARTIAL packet's inner checksum completed (and nothing else
touched), and outer IPv4 fragments put together as the IP layer would (RFC 791 §3.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.packet import Packet, Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6TO4,
    TwoParty,
    client_udp,
    encapsulate,
    make_datapath,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.fragment import OuterReassembler
from sixgate.workers.engine.packet import fold, pseudo_sum_v6
from sixgate.workers.engine.tunnel import complete_checksum


def partial(inner: Packet) -> bytes:
    """``inner`` inside protocol 41 as a kernel peer with checksum offload hands it over:
    the transport checksum field holds only the folded pseudo-header sum (not inverted)."""
    data = bytearray(raw(inner))
    view = IPv6(bytes(data))
    layer = view[TCP] if TCP in view else view[UDP]
    start = len(data) - len(raw(layer))
    at = start + (16 if TCP in view else 6)
    src, dst = bytes(data[8:24]), bytes(data[24:40])
    proto = 6 if TCP in view else 17
    pseudo = pseudo_sum_v6(src, dst, proto, len(data) - start)
    data[at:at + 2] = (0xFFFF ^ fold(pseudo)).to_bytes(2, "big")
    return encapsulate(bytes(data), CLIENT4)


def checksum_ok(packet: bytes) -> bool:
    inner = IPv6(packet[20:])
    layer = inner[TCP] if TCP in inner else inner[UDP]
    given_sum = layer.chksum
    layer.chksum = None
    return bool(given_sum == IPv6(raw(inner))[type(layer)].chksum)


INNERS = [
    IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=40000, dport=53) / Raw(b"query"),
    IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / TCP(sport=40000, dport=80, flags="S"),
    IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrDestOpt() / UDP(sport=1, dport=53)
    / Raw(b"x" * 333),
    IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / TCP(sport=1, dport=80, flags="PA") / Raw(b"y" * 999),
]


@pytest.mark.parametrize("inner", INNERS, ids=["udp", "tcp_syn", "udp_after_dstopts", "tcp"])
def test_complete_checksum_makes_a_partial_packet_whole(inner: Packet) -> None:
    packet = partial(inner)
    assert not checksum_ok(packet)  # as it arrives: only the pseudo-header sum
    done = complete_checksum(packet)
    assert checksum_ok(done)
    assert len(done) == len(packet)
    assert [i for i in range(len(done)) if done[i] != packet[i]] != []  # only the checksum
    assert sum(a != b for a, b in zip(done, packet, strict=True)) <= 2


@pytest.mark.parametrize("packet", [
    encapsulate(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / ICMPv6EchoRequest()), CLIENT4),
    encapsulate(raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / IPv6ExtHdrFragment(m=1)
                    / UDP() / Raw(b"x" * 16)), CLIENT4),
    encapsulate(client_udp()[:45], CLIENT4),
    b"\x45\x00",
])
def test_complete_checksum_leaves_what_it_cannot_complete(packet: bytes) -> None:
    assert complete_checksum(packet) == packet


def test_a_partial_packet_is_bad_checksum_unless_completed() -> None:
    """Why the capture completes them: the engine's verification is strict."""
    packet = partial(INNERS[0])
    p = TwoParty(make_datapath())
    assert p.datapath.from_tunnel([packet], 1000.0).to_services == []
    assert p.datapath.counters.drops[DropReason.BAD_CHECKSUM] == 1
    out = p.datapath.from_tunnel([complete_checksum(packet)], 1000.0)
    assert len(out.to_services) == 1 and UDP in IP(out.to_services[0])


# --- outer IPv4 reassembly --------------------------------------------------------------------

def outer_fragments(size: int, fragsize: int = 512, ident: int = 7) -> tuple[bytes, list[bytes]]:
    whole = IP(src=CLIENT4, dst=GW4, proto=41, id=ident) / Raw(raw(
        IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=1, dport=53) / Raw(b"z" * size)))
    return raw(whole), [raw(piece) for piece in fragment(whole, fragsize)]


@given(st.integers(600, 3000), st.randoms())
def test_outer_fragments_in_any_order_give_the_packet_back(size: int, rng: object) -> None:
    whole, pieces = outer_fragments(size)
    rng.shuffle(pieces)  # type: ignore[attr-defined]
    reassembler = OuterReassembler()
    results = [reassembler.add(piece, 1.0) for piece in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    got = results[-1]
    assert isinstance(got, bytes)
    assert IP(got)[Raw].load == IP(whole)[Raw].load
    assert IP(got).frag == 0 and IP(got).flags.MF == 0
    fresh = IP(got)
    del fresh.chksum
    assert IP(raw(fresh)).chksum == IP(got).chksum  # the header checksum is valid
    assert len(reassembler) == 0 and reassembler.bytes_held == 0


def test_outer_overlap_drops_the_datagram() -> None:
    _whole, pieces = outer_fragments(2000)
    reassembler = OuterReassembler()
    assert reassembler.add(pieces[0], 1.0) is None
    overlapping = bytearray(pieces[1])
    overlapping[6:8] = (0x2000 | (8 // 8)).to_bytes(2, "big")  # offset 8: inside the first
    overlapping[10:12] = b"\0\0"
    assert reassembler.add(bytes(overlapping), 1.0) == DropReason.BAD_FRAGMENT
    assert len(reassembler) == 0 and reassembler.evicted == 1


def test_outer_reassembly_is_bounded_and_times_out() -> None:
    reassembler = OuterReassembler(max_datagrams=2)
    for ident in (1, 2, 3):
        assert reassembler.add(outer_fragments(1200, ident=ident)[1][0], float(ident)) is None
    assert len(reassembler) == 2 and reassembler.evicted == 1  # the oldest made room
    assert reassembler.expire(31.0) == 0
    assert reassembler.expire(33.5) == 2 and len(reassembler) == 0
