"""Issue 21: what a session costs. A flow of one packet (a DNS query) makes no fast-path
template either way (they are made from a session's second packet), and the sessions of one
client share its address object, their gateway address and their outer IPv4 source."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw
from support.helpers import CLIENT4, CLIENT6_6TO4, GW4, GW6_6TO4, make_datapath


def query(sport: int) -> bytes:
    return raw(IP(src=CLIENT4, dst=GW4) / IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
               / UDP(sport=sport, dport=53) / Raw(b"q"))


def answer(request: bytes) -> bytes:
    asked = IP(request)
    return raw(IP(src=asked.dst, dst=asked.src) / UDP(sport=asked[UDP].dport,
                                                       dport=asked[UDP].sport) / Raw(b"a"))


def test_a_flow_of_one_packet_each_way_makes_no_template() -> None:
    dp = make_datapath("6to4")
    [request] = dp.from_tunnel([query(40000)], 1.0).to_services
    assert len(dp.from_services([answer(request)], 1.1).to_tunnel) == 1
    assert not dp._fast_in[17] and not dp._fast_tunnel[17] and not dp._fast_out[17]
    # The second packet each way makes them; the third takes them.
    dp.from_tunnel([query(40000)], 1.2)
    dp.from_services([answer(request)], 1.3)
    assert len(dp._fast_in[17]) == len(dp._fast_tunnel[17]) == len(dp._fast_out[17]) == 1


def test_the_sessions_of_one_client_share_its_address_objects() -> None:
    dp = make_datapath("6to4")
    dp.from_tunnel([query(port) for port in (40000, 40001, 40002)], 1.0)
    sessions = list(dp.flows.sessions_iter())
    assert len(sessions) == 3
    first = sessions[0]
    assert all(s.client6 is first.client6 and s.gw6 is first.gw6 and s.outer4 is first.outer4
               for s in sessions)
