"""v6 -> v4 -> v6 identity through the two-party helper: whatever the client's address,
port, payload, hop limit and traffic class, the service sees the client's port and payload on
the rule's target, and the client gets the service's payload back from the port it called,
from the address it called, through the right tunnel endpoint. No drop, no INTERNAL_ERROR.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import IPv6, defragment6
from scapy.packet import Raw, raw
from support.helpers import (
    GW6_6IN4,
    GW6_6TO4,
    RELAY4,
    REMOTE4,
    TCP_TARGETS,
    UDP_TARGETS,
    TwoParty,
    make_datapath,
    reply_to,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.tunnel import DEFAULT_MARTIAN_IPV4

MARTIAN4 = [ipaddress.IPv4Network(c) for c, _ in DEFAULT_MARTIAN_IPV4]


MARTIANS = ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")


@st.composite
def clients(draw: st.DrawFn, mode: str) -> tuple[str, str]:
    """(client IPv6 address, the outer IPv4 destination its packets must go to)."""
    if mode == "6in4":
        value = draw(st.integers(0x2001_0DB8 << 96, (0x2001_0DB9 << 96) - 1))
        return str(ipaddress.IPv6Address(value)), REMOTE4
    if draw(st.booleans()):
        # A real 6to4 client's IPv4 is no martian (RFC 3964 §5.3.1): the tunnel drops those.
        v4 = ipaddress.IPv4Address(draw(st.integers(0x0100_0000, 0xDFFF_FFFF).filter(
            lambda n: not any(ipaddress.IPv4Address(n) in ipaddress.IPv4Network(net)
                              for net in MARTIANS))))
        iid = draw(st.integers(1, (1 << 80) - 1))
        addr = ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | iid)
        return str(addr), str(v4)
    value = draw(st.integers(0x2400 << 112, (0x2C00 << 112) - 1))  # native 2400::/6
    return str(ipaddress.IPv6Address(value)), RELAY4


@st.composite
def exchanges(draw: st.DrawFn) -> dict[str, object]:
    mode = draw(st.sampled_from(["6to4", "6in4"]))
    client, outer = draw(clients(mode))
    proto = draw(st.sampled_from(["udp", "tcp"]))
    targets = UDP_TARGETS if proto == "udp" else TCP_TARGETS
    return dict(
        mode=mode, client=client, outer=outer, proto=proto,
        dport=draw(st.sampled_from(sorted(targets))),
        sport=draw(st.integers(1, 65535)),
        request=draw(st.binary(max_size=1200)),
        reply=draw(st.one_of(st.binary(max_size=1400), st.binary(min_size=1400, max_size=4000))),
        hlim=draw(st.integers(2, 255)), ttl=draw(st.integers(2, 255)),
        tc=draw(st.integers(0, 255)), tos=draw(st.integers(0, 255)),
    )


@given(exchanges())
def test_v6_to_v4_to_v6_identity(x: dict[str, object]) -> None:
    mode, client, proto = str(x["mode"]), str(x["client"]), x["proto"]
    gw = GW6_6TO4 if mode == "6to4" else GW6_6IN4
    sport, dport = int(x["sport"]), int(x["dport"])  # type: ignore[call-overload]
    request, reply_payload = bytes(x["request"]), bytes(x["reply"])  # type: ignore[arg-type]
    p = TwoParty(make_datapath(mode))
    ip6 = IPv6(src=client, dst=gw, hlim=x["hlim"], tc=x["tc"])
    if proto == "udp":
        first = ip6 / UDP(sport=sport, dport=dport) / Raw(request)
        target = UDP_TARGETS[dport]
        layer = UDP
    else:
        # the handshake opens the session; the data segment is the one checked
        syn = p.client(ip6 / TCP(sport=sport, dport=dport, flags="S", seq=1))
        synack = p.service(reply_to(syn.only_to_services(), tcp_flags="SA"))
        assert len(synack.outbound) == 1
        first = ip6 / TCP(sport=sport, dport=dport, flags="PA", seq=2, ack=5001) / Raw(request)
        target = TCP_TARGETS[dport]
        layer = TCP
    step1 = p.client(first)
    assert step1.drops == {} and step1.outbound == []
    to_service = step1.only_to_services()
    assert (to_service.dst, to_service[layer].dport) == target
    assert to_service[layer].sport == sport
    assert ipaddress.IPv4Address(to_service.src) in ipaddress.IPv4Network("100.64.0.0/29")
    assert raw(to_service[layer].payload) == request
    assert len(raw(to_service)) == 20 + len(raw(first)) - 40
    assert (to_service.ttl, to_service.tos) == (int(x["hlim"]) - 1, x["tc"])  # type: ignore

    answer = reply_to(to_service, reply_payload, ttl=int(x["ttl"]), tos=int(x["tos"]),  # type: ignore
                      tcp_flags="A" if layer is TCP else None)
    step2 = p.service(answer)
    assert step2.drops == {} and step2.to_services == []
    assert set(step2.outer_destinations) == {x["outer"]}
    packets = [IPv6(pkt) for pkt, _ in step2.outbound]
    back = defragment6(packets) if len(packets) > 1 else packets[0]
    assert all((p.tc, p.fl) == (x["tos"], 0) for p in packets)
    assert (back.src, back.dst) == (gw, client)
    assert (back[layer].sport, back[layer].dport) == (dport, sport)
    assert raw(back[layer].payload) == reply_payload
    assert back.hlim == int(x["ttl"]) - 1  # type: ignore[call-overload]
    assert p.datapath.counters.drops[DropReason.INTERNAL_ERROR] == 0
