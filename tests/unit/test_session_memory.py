"""Issue 21: what a session costs. A flow of one packet (a DNS query) makes no fast-path
template either way (they are made from a session's second packet), and the sessions of one
client share its address object, their gateway address and their outer IPv4 source."""

from __future__ import annotations

import gc
import ipaddress

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw
from support import helpers
from support.helpers import CLIENT4, CLIENT6_6TO4, GW4, GW6_6TO4, make_datapath

from sixgate.workers.engine.fastpath import compiled
from sixgate.workers.engine.flows import Bib, FlowTable, Timeouts
from sixgate.workers.engine.packet import PROTO_UDP

CLIENT6_BYTES = ipaddress.IPv6Address(CLIENT6_6TO4).packed


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


def test_sessions_and_bindings_stay_out_of_the_cyclic_collector() -> None:
    """A session (and a client's or NAT64 binding) holds bytes, numbers and strings only, so
    it is never in a reference cycle: kept out of the collector's lists, it is not walked by
    every full collection (a million tracked sessions: ~0.5 s a pass) and does not bring the
    next one closer."""
    helpers.require_compiled(compiled, "workers/engine/_fastpath.c")
    dp = make_datapath("6to4")
    dp.from_tunnel([query(port) for port in range(40000, 40100)], 1.0)
    sessions = list(dp.flows.sessions_iter())
    assert len(sessions) == 100
    assert not any(gc.is_tracked(session) for session in sessions)
    assert not any(gc.is_tracked(binding) for binding in dp.flows._client_pool.values())
    bib = Bib(PROTO_UDP, CLIENT6_BYTES, 40000, bytes(4), 61000)
    assert not gc.is_tracked(bib)
    clients = [CLIENT6_BYTES[:-1] + bytes([n]) for n in range(1, 5)]
    table = FlowTable([bytes([100, 64, 0, n]) for n in range(1, 5)], 200_000, 200_000,
                      Timeouts())
    gc.collect()
    before = gc.get_stats()[2]["collections"]
    for client in clients:
        for port in range(10000, 35000):
            table.create(PROTO_UDP, client, port, CLIENT6_BYTES, 53, bytes(4), 53, "dns", 2.0)
    assert len(table) == 100_000
    # 100,000 tracked sessions bring full collections about (CPython collects all
    # generations each time the objects that survived grew by a quarter): none here.
    assert gc.get_stats()[2]["collections"] == before
