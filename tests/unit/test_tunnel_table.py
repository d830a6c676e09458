"""Issue 19: several tunnels in one engine (``[[tunnel]]``): two 6in4 brokers and 6to4 on one
host address. Each packet is checked by the tunnel it came by (the 6in4 one of its broker,
else the 6to4 one) and everything answering it, or translated back to its client, leaves by
that tunnel. The peers are scapy packets, independent of the engine."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6IN4,
    GW6_6TO4,
    PREFIX_6IN4,
    PREFIX_6TO4,
    RELAY4,
    REMOTE4,
    make_settings,
)

from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.settings import Settings, TunnelEntry, worker_pool

BROKER_B4 = "203.0.113.2"
GW6_B = "2001:db8:fe::1"
CLIENT_A = "2001:db8:aaaa::1"  # behind broker A
CLIENT_B = "2001:db8:bbbb::1"  # behind broker B


def settings() -> Settings:
    return make_settings("6in4", tunnel_name="broker-a", tunnels=(
        TunnelEntry("broker-b", "6in4", BROKER_B4, None, "2001:db8:fe::/64", (GW6_B,), 1400),
        TunnelEntry("6to4", "6to4", None, RELAY4, PREFIX_6TO4, (GW6_6TO4,), 1480)))


def engine() -> Datapath:
    s = settings()
    return Datapath(s, worker_pool(s.pool, 1, 0))


def outer(src4: str, inner: IPv6) -> bytes:
    return raw(IP(src=src4, dst=GW4, ttl=64) / inner)


def sent(out: object) -> list[tuple[IPv6, str]]:
    return [(IPv6(p), ".".join(str(b) for b in dst)) for p, dst in out.to_tunnel]  # type: ignore[attr-defined]


def test_settings_round_trip_and_the_engine_mtu_is_the_smallest() -> None:
    s = settings()
    assert Settings.from_json(s.to_json()) == s
    assert [t.name for t in s.all_tunnels()] == ["broker-a", "broker-b", "6to4"]
    assert s.engine_mtu == 1400 and s.max_mss == 1340
    assert PREFIX_6IN4 == s.prefix


def test_each_tunnel_answers_an_echo_through_itself() -> None:
    dp = engine()
    for src4, client, gw6 in ((REMOTE4, CLIENT_A, GW6_6IN4), (BROKER_B4, CLIENT_B, GW6_B),
                              (CLIENT4, CLIENT6_6TO4, GW6_6TO4)):
        ping = IPv6(src=client, dst=gw6) / ICMPv6EchoRequest(id=7, seq=1)
        [(reply, dst)] = sent(dp.from_tunnel([outer(src4, ping)], 1.0))
        assert reply.haslayer(ICMPv6EchoReply) and (reply.src, reply.dst) == (gw6, client)
        assert dst == src4, (gw6, dst)


def test_a_broker_reaches_only_its_own_tunnels_addresses() -> None:
    """RFC 4213 §3.6 per tunnel: broker B's packet to broker A's address is not B's to
    deliver; a 6to4 packet from broker B's address is B's tunnel's (and refused there)."""
    dp = engine()
    stray = IPv6(src=CLIENT_B, dst=GW6_6IN4) / ICMPv6EchoRequest(id=7, seq=1)
    out = dp.from_tunnel([outer(BROKER_B4, stray)], 1.0)
    assert not out.to_tunnel and not out.to_services
    assert dp.counters.drops[DropReason.NOT_OUR_ADDRESS] == 1
    sixtofour = IPv6(src="2002:cb00:7102::1", dst=GW6_6TO4) / ICMPv6EchoRequest()
    assert not dp.from_tunnel([outer(BROKER_B4, sixtofour)], 1.0).to_tunnel


def test_a_service_answer_leaves_by_the_tunnel_its_session_came_by() -> None:
    """TCP through broker B, UDP through 6to4: the IPv4 answers go back to each one's peer,
    translated from the address the client used, also once their templates exist."""
    dp = engine()
    syn = IPv6(src=CLIENT_B, dst=GW6_B) / TCP(sport=40000, dport=80, flags="S", seq=1)
    [request] = dp.from_tunnel([outer(BROKER_B4, syn)], 1.0).to_services
    query = IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4) / UDP(sport=5000, dport=53) / Raw(b"q")
    [asked_raw] = dp.from_tunnel([outer(CLIENT4, query)], 1.0).to_services
    answer, asked = IP(request), IP(asked_raw)
    for flags in ("SA", "A", "A"):  # the last ones from the session's return template
        back = IP(src=answer.dst, dst=answer.src) / TCP(sport=answer[TCP].dport,
                                                         dport=answer[TCP].sport, flags=flags)
        [(reply, dst)] = sent(dp.from_services([raw(back)], 1.1))
        assert (reply.src, reply.dst, dst) == (GW6_B, CLIENT_B, BROKER_B4)
        # In between, a packet of broker A's tunnel: the next answer still goes to B.
        ping = IPv6(src=CLIENT_A, dst=GW6_6IN4) / ICMPv6EchoRequest()
        assert sent(dp.from_tunnel([outer(REMOTE4, ping)], 1.1))[0][1] == REMOTE4
    for _ in range(2):
        back = IP(src=asked.dst, dst=asked.src) / UDP(sport=asked[UDP].dport,
                                                       dport=asked[UDP].sport) / Raw(b"a")
        [(reply, dst)] = sent(dp.from_services([raw(back)], 1.3))
        assert (reply.src, dst) == (GW6_6TO4, CLIENT4)
