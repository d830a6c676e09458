"""RFC 8200 §4.5 fragmentation and reassembly: ``fragment_ipv6`` then ``Reassembler`` gives
back the packet exactly, for any payload size, any MTU 1280..1480 (RFC 4213 §3.2.1) and any
arrival order; every fragment fits the MTU; through ``Datapath.from_tunnel`` the service gets the
whole datagram once.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6
from scapy.packet import raw
from support.helpers import TwoParty, make_datapath, packed6

from sixgate.workers.engine.fragment import Reassembler, fragment_ipv6
from sixgate.workers.engine.packet import PROTO_FRAGMENT, PROTO_UDP, build_ipv6, parse_ipv6

SRC = packed6("2002:c633:6401::1")
DST = packed6("2002:c000:20a::1")

mtus = st.integers(1280, 1480)


@given(st.integers(0, 9000), mtus, st.integers(0, 0xFFFFFFFF), st.randoms(use_true_random=False))
def test_rfc8200_4_5_fragment_then_reassemble_is_identity(size: int, mtu: int, ident: int,
                                                          rnd: object) -> None:
    payload = bytes((i * 31 + size) % 256 for i in range(size))
    original = build_ipv6(SRC, DST, PROTO_UDP, payload, hop_limit=17)
    pieces = fragment_ipv6(SRC, DST, PROTO_UDP, payload, mtu, ident, hop_limit=17)
    assert all(len(p) <= mtu for p in pieces)
    if len(original) <= mtu:
        assert pieces == [original]  # RFC 7915 §4: no Fragment header when it fits
        return
    assert all(p[6] == PROTO_FRAGMENT for p in pieces)
    rnd.shuffle(pieces)  # type: ignore[attr-defined]
    r = Reassembler()
    results = []
    for piece in pieces:
        view = parse_ipv6(piece)
        assert isinstance(view, tuple) and view[6] is not None
        offset, more, got_ident, fh, nh = view[6]
        assert got_ident == ident
        if more:
            assert (len(piece) - fh - 8) % 8 == 0
        results.append(r.add(piece, offset, more, got_ident, fh, nh, 5.0))
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == original
    assert len(r) == 0 and r.bytes_held == 0


@given(st.integers(0, 6000), mtus)
def test_rfc8200_4_5_scapy_reassembles_our_fragments(size: int, mtu: int) -> None:
    segment = raw(UDP(sport=1, dport=2) / bytes(size))
    pieces = fragment_ipv6(SRC, DST, PROTO_UDP, segment, mtu, 77)
    if len(pieces) == 1:
        return
    whole = defragment6([IPv6(p) for p in pieces])
    assert IPv6ExtHdrFragment not in whole
    assert raw(whole[UDP]) == segment


@given(st.integers(1, 5000), mtus, st.randoms(use_true_random=False))
def test_rfc8200_4_5_datapath_reassembles_in_any_order(size: int, mtu: int,
                                                        rnd: object) -> None:
    p = TwoParty(make_datapath())
    data = bytes((i * 7) % 256 for i in range(size))
    # the UDP segment with its checksum, computed by scapy over the IPv6 pseudo-header
    segment = raw(IPv6(src="2002:c633:6401::1", dst="2002:c000:20a::1")
                  / UDP(sport=40000, dport=53) / data)[40:]
    pieces = fragment_ipv6(SRC, DST, PROTO_UDP, segment, mtu, 0xABC)
    rnd.shuffle(pieces)  # type: ignore[attr-defined]
    outputs = []
    for piece in pieces:
        step = p.client(piece)
        assert step.drops == {}
        outputs += step.to_services
    assert len(outputs) == 1
    assert raw(IP(outputs[0])[UDP].payload) == data
