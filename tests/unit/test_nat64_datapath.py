"""The engine in NAT64 mode (issue 16): IPv6-only clients reach IPv4 hosts through the RFC 6052
prefix with RFC 6146 bindings. Packets are built and read with scapy (an independent
implementation): the engine's own codecs never judge the engine."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, TCPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw, raw

from sixgate.workers.engine.counters import Event
from sixgate.workers.engine.datapath import Datapath, Output
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import Timeouts
from sixgate.workers.engine.settings import Settings, worker_pool4
from sixgate.workers.engine.wire import nat64_shard

PREFIX = "64:ff9b::/96"
NSP = "2001:db8:64::/96"  # a network-specific prefix: may stand for any IPv4 (RFC 6052 §3.1)
CLIENTS = ("2001:db8:100::/56",)
CLIENT = "2001:db8:100::10"
OTHER_CLIENT = "2001:db8:100:1::20"
STRANGER = "2001:db8:999::1"
POOL4 = "203.0.113.5"
SERVER = "198.51.100.53"
SERVER6 = "64:ff9b::c633:6435"  # 64:ff9b::198.51.100.53
GLOBAL = "8.8.8.8"
PORTS = "61001-65535"


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = dict(
        mode="nat64", local_ipv4="", relay_ipv4=None, remote_ipv4=None, prefix=PREFIX,
        addresses=(), mtu=1500, workers=1, pool="100.64.0.0/16", run_dir="/nonexistent",
        name="sgtest", forwards=(), timeouts=Timeouts(), nat64_prefix=PREFIX,
        nat64_clients=CLIENTS, nat64_allow_non_global=True,
        nat64_pool4=((POOL4, "tcp", 61001, 65535), (POOL4, "udp", 61001, 65535),
                     (POOL4, "icmp", 0, 65535)))
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


def nat64(**overrides: object) -> Datapath:
    return Datapath(settings(**overrides), [])


def one_v4(out: Output) -> IP:
    assert len(out.to_services) == 1 and not out.to_ipv6 and not out.to_tunnel, out
    return IP(out.to_services[0])


def one_v6(out: Output) -> IPv6:
    assert len(out.to_ipv6) == 1 and not out.to_services and not out.to_tunnel, out
    return IPv6(out.to_ipv6[0])


def valid(packet: IP | IPv6) -> bool:
    """scapy recomputes every checksum of the packet; equal bytes mean they were right."""
    again = packet.copy()
    for layer in (IP, UDP, TCP, ICMP):
        if again.haslayer(layer) and hasattr(again[layer], "chksum"):
            del again[layer].chksum
    if again.haslayer(ICMPv6EchoReply):
        del again[ICMPv6EchoReply].cksum
    if again.haslayer(ICMPv6DestUnreach):
        del again[ICMPv6DestUnreach].cksum
    return raw(again.__class__(raw(again))) == raw(packet)


def udp6(src: str = CLIENT, dst: str = SERVER6, sport: int = 40000, dport: int = 53,
         payload: bytes = b"query") -> bytes:
    return raw(IPv6(src=src, dst=dst, hlim=64) / UDP(sport=sport, dport=dport) / Raw(payload))


def test_rfc6146_udp_out_and_back_with_checksums_scapy_agrees_with() -> None:
    dp = nat64()
    out4 = one_v4(dp.from_ipv6([udp6()], 1.0))
    assert (out4.src, out4.dst, out4[UDP].dport) == (POOL4, SERVER, 53)
    assert 61001 <= out4[UDP].sport <= 65535
    assert out4.ttl == 63 and bytes(out4[UDP].payload) == b"query"
    assert valid(out4)
    reply = IP(src=SERVER, dst=POOL4, ttl=50) / UDP(sport=53, dport=out4[UDP].sport) / Raw(
        b"answer")
    back = one_v6(dp.from_services([raw(reply)], 1.1))
    assert (back.src, back.dst) == (SERVER6, CLIENT)
    assert (back[UDP].sport, back[UDP].dport) == (53, 40000)
    assert back.hlim == 49 and bytes(back[UDP].payload) == b"answer"
    assert valid(back)


def test_rfc6146_3_5_1_1_port_keeps_parity_and_mapping_is_endpoint_independent() -> None:
    dp = nat64()
    even = one_v4(dp.from_ipv6([udp6(sport=40000)], 1.0))[UDP].sport
    odd = one_v4(dp.from_ipv6([udp6(sport=40001)], 1.0))[UDP].sport
    assert even % 2 == 0 and odd % 2 == 1
    # RFC 4787 REQ-1: the same client transport address to another destination keeps its
    # pool4 transport address.
    other = one_v4(dp.from_ipv6([udp6(dst="64:ff9b::c633:6407", sport=40000)], 1.0))
    assert (other.src, other[UDP].sport, other.dst) == (POOL4, even, "198.51.100.7")
    assert len(dp.flows) == 3
    assert dp.flows.ports is not None
    assert [row[3] for row in dp.flows.ports.usage()] == [0, 0, 2]  # icmp, tcp, udp ports


def test_with_shards_a_binding_takes_a_port_of_its_clients_shard() -> None:
    """[gateway] shards = 6 over 2 workers: worker 1 owns shards 1, 3, 5, each with its sixth
    of every pool4 range; a client's binding takes a port of the slice of its shard (the
    steering hash of its /64, nat64_shard), or of shard 1 where that shard is worker 0's."""
    dp = Datapath(settings(workers=2, shards=6, hash_seed=0x5167), [], workers=2, index=1)
    per = (65535 - 61001 + 1) // 6
    for n in range(1, 40):
        client = f"2001:db8:100:{n:x}::1"
        port = one_v4(dp.from_ipv6([udp6(src=client, sport=40000)], 1.0))[UDP].sport
        shard = nat64_shard(ipaddress.IPv6Address(client).packed, 0x5167, 6)
        expected = shard if shard % 2 == 1 else 1
        assert 61001 + expected * per <= port < 61001 + (expected + 1) * per, (client, port)


def test_rfc6146_endpoint_independent_filtering_lets_a_new_peer_in() -> None:
    dp = nat64()
    pport = one_v4(dp.from_ipv6([udp6()], 1.0))[UDP].sport
    stranger = IP(src="198.51.100.99", dst=POOL4) / UDP(sport=3478, dport=pport) / Raw(b"hi")
    back = one_v6(dp.from_services([raw(stranger)], 1.2))
    assert (back.src, back.dst, back[UDP].dport) == ("64:ff9b::c633:6463", CLIENT, 40000)
    assert valid(back)


def test_rfc6146_address_dependent_filtering_refuses_a_new_peer() -> None:
    dp = nat64(nat64_filtering="address-dependent")
    pport = one_v4(dp.from_ipv6([udp6()], 1.0))[UDP].sport
    stranger = IP(src="198.51.100.99", dst=POOL4) / UDP(sport=3478, dport=pport)
    out = dp.from_services([raw(stranger)], 1.2)
    assert not out.to_ipv6 and dp.counters.drops[DropReason.FILTERED] == 1
    # Another port of the same peer address it has a session with is let in.
    known = IP(src=SERVER, dst=POOL4) / UDP(sport=5353, dport=pport)
    assert one_v6(dp.from_services([raw(known)], 1.3))[UDP].sport == 5353


def test_tcp_handshake_and_data_through_the_fast_path() -> None:
    dp = nat64()
    syn = raw(IPv6(src=CLIENT, dst=SERVER6) / TCP(sport=50000, dport=80, flags="S",
                                                  options=[("MSS", 1440)]))
    out = one_v4(dp.from_ipv6([syn], 1.0))
    pport = out[TCP].sport
    assert out[TCP].flags == "S" and valid(out)
    synack = IP(src=SERVER, dst=POOL4) / TCP(sport=80, dport=pport, flags="SA", seq=7, ack=1)
    back = one_v6(dp.from_services([raw(synack)], 1.1))
    assert back[TCP].dport == 50000 and valid(back)
    for i in range(3):  # the later ones are translated from the session's templates
        data = raw(IPv6(src=CLIENT, dst=SERVER6) / TCP(sport=50000, dport=80, flags="A",
                                                       seq=1 + i, ack=8) / Raw(b"x" * 100))
        out = one_v4(dp.from_ipv6([data], 1.2))
        assert out[TCP].sport == pport and valid(out)
        answer = IP(src=SERVER, dst=POOL4) / TCP(sport=80, dport=pport, flags="A", seq=8,
                                                 ack=101 + i) / Raw(b"y" * 99)
        back = one_v6(dp.from_services([raw(answer)], 1.3))
        assert back[TCP].dport == 50000 and valid(back)


def test_a_batch_takes_the_fast_path_and_a_bad_packet_costs_only_itself() -> None:
    """from_ipv6's batch loop: the first packet makes the binding, the rest of the batch is
    translated from its template (fresh IPv4 identifications, the same binding); a packet
    with a broken checksum in between is dropped under its reason, and every packet and byte
    is counted once."""
    dp = nat64()
    good = [udp6(payload=b"q%d" % i) for i in range(5)]
    bad = bytearray(good[0])
    bad[-1] ^= 0xFF  # the UDP checksum no longer holds
    out = dp.from_ipv6([*good[:2], bytes(bad), *good[2:]], 1.0)
    translated = [IP(packet) for packet in out.to_services]
    assert [bytes(p[Raw].load) for p in translated] == [b"q%d" % i for i in range(5)]
    assert len({p[UDP].sport for p in translated}) == 1 and all(valid(p) for p in translated)
    assert len({p.id for p in translated}) == 5
    assert dp.counters.drops[DropReason.BAD_CHECKSUM] == 1
    # Inbound counts what arrived, the dropped one too.
    assert dp.counters.packets[("inbound", "udp")] == 6
    assert dp.counters.bytes[("inbound", "udp")] == sum(len(p) for p in good) + len(bad)
    assert dp.counters.packets[("to_services", "udp")] == 5
    assert dp.counters.bytes[("to_services", "udp")] == sum(len(p) for p in out.to_services)


def test_rfc6146_3_5_3_icmp_echo_identifier_is_the_binding_port() -> None:
    dp = nat64()
    ping = raw(IPv6(src=CLIENT, dst=SERVER6) / ICMPv6EchoRequest(id=0x1234, seq=7,
                                                                  data=b"ping"))
    out = one_v4(dp.from_ipv6([ping], 1.0))
    assert out[ICMP].type == 8 and out[ICMP].seq == 7 and bytes(out[ICMP].payload) == b"ping"
    assert valid(out)
    pong = IP(src=SERVER, dst=POOL4) / ICMP(type=0, id=out[ICMP].id, seq=7) / Raw(b"ping")
    back = one_v6(dp.from_services([raw(pong)], 1.1))
    assert back.haslayer(ICMPv6EchoReply)
    assert (back[ICMPv6EchoReply].id, back[ICMPv6EchoReply].seq) == (0x1234, 7)
    assert (back.src, back.dst) == (SERVER6, CLIENT) and valid(back)


def test_a_client_outside_clients_is_refused_with_admin_prohibited() -> None:
    dp = nat64()
    out = dp.from_ipv6([udp6(src=STRANGER)], 1.0)
    assert not out.to_services and dp.counters.drops[DropReason.SOURCE_NOT_ALLOWED] == 1
    error = one_v6(out)
    assert error.dst == STRANGER and error[ICMPv6DestUnreach].code == 1


def test_rfc6052_3_1_well_known_prefix_never_stands_for_a_non_global_address() -> None:
    dp = nat64(nat64_allow_non_global=False)
    dp.from_ipv6([udp6()], 1.0)  # 198.51.100.53 is documentation space: not global
    assert dp.counters.drops[DropReason.NON_GLOBAL_DESTINATION] == 1
    assert one_v4(dp.from_ipv6([udp6(dst="64:ff9b::808:808")], 1.0)).dst == GLOBAL
    # A network-specific prefix may stand for any IPv4 address.
    nsp = nat64(nat64_allow_non_global=False, nat64_prefix=NSP, prefix=NSP)
    assert one_v4(nsp.from_ipv6([udp6(dst="2001:db8:64::c633:6435")], 1.0)).dst == SERVER


def test_rfc6888_req4_port_quota_per_client_slash64() -> None:
    dp = nat64(nat64_ports_per_client=2)
    one_v4(dp.from_ipv6([udp6(sport=1000)], 1.0))
    one_v4(dp.from_ipv6([udp6(src="2001:db8:100::11", sport=1001)], 1.0))  # same /64
    out = dp.from_ipv6([udp6(sport=1002)], 1.0)
    assert dp.counters.drops[DropReason.PORT_QUOTA] == 1
    assert one_v6(out)[ICMPv6DestUnreach].code == 1  # RFC 6888 REQ-11
    one_v4(dp.from_ipv6([udp6(src=OTHER_CLIENT, sport=1002)], 1.0))  # another /64


def test_pool_exhaustion_is_counted_and_answered() -> None:
    dp = nat64(nat64_pool4=((POOL4, "udp", 61000, 61001),))
    one_v4(dp.from_ipv6([udp6(sport=1000)], 1.0))
    one_v4(dp.from_ipv6([udp6(sport=1001)], 1.0))
    out = dp.from_ipv6([udp6(sport=1002)], 1.0)
    assert dp.counters.drops[DropReason.POOL_EXHAUSTED] == 1
    assert one_v6(out)[ICMPv6DestUnreach].code == 1


def test_rfc6888_req8_a_freed_port_is_held_before_reuse() -> None:
    dp = nat64(nat64_pool4=((POOL4, "udp", 61000, 61000),), nat64_port_hold_s=120.0)
    one_v4(dp.from_ipv6([udp6(sport=1000)], 0.0))
    dp.tick(100.0)  # the unanswered session expires (unassured lifetime)
    assert len(dp.flows) == 0
    dp.from_ipv6([udp6(sport=2000)], 101.0)
    assert dp.counters.drops[DropReason.POOL_EXHAUSTED] == 1  # still held
    dp.tick(250.0)
    assert one_v4(dp.from_ipv6([udp6(sport=2000)], 250.0))[UDP].sport == 61000


def test_rfc7915_4_2_icmpv4_error_from_a_router_comes_from_its_synthesized_address() -> None:
    dp = nat64()
    sent = one_v4(dp.from_ipv6([udp6()], 1.0))
    error = IP(src="192.0.2.1", dst=POOL4) / ICMP(type=3, code=3) / raw(sent)[:28]
    back = one_v6(dp.from_services([raw(error)], 1.1))
    assert back.src == "64:ff9b::c000:201" and back.dst == CLIENT
    assert back[ICMPv6DestUnreach].code == 4  # RFC 7915 §4.2: port unreachable
    assert valid(back)


def test_tcp_from_ipv4_without_a_session_is_not_let_in() -> None:
    """Only a SYN may open a session from the IPv4 side (RFC 6146 §3.5.2.2)."""
    dp = nat64()
    one_v4(dp.from_ipv6([udp6(sport=61001)], 1.0))
    ack = IP(src=SERVER, dst=POOL4) / TCP(sport=80, dport=61001, flags="A")
    assert not dp.from_services([raw(ack)], 1.0).to_ipv6
    assert dp.counters.drops[DropReason.NO_SESSION] == 1


def test_worker_pool4_slices_are_disjoint_and_cover_the_range() -> None:
    rows = ((POOL4, "tcp", 61001, 65535),)
    slices = [worker_pool4(rows, 4, i)[6][0] for i in range(4)]
    assert slices[0][1] == 61001 and slices[-1][2] == 65535
    for (_, _, hi), (_, lo, _) in zip(slices, slices[1:], strict=False):
        assert lo == hi + 1
    assert {s[0] for s in slices} == {ipaddress.IPv4Address(POOL4).packed}


@pytest.mark.parametrize("dst", ["2001:db8::1", "64:ff9a::c633:6435"])
def test_a_destination_outside_the_prefix_is_not_ours(dst: str) -> None:
    dp = nat64()
    assert not dp.from_ipv6([udp6(dst=dst)], 1.0).to_services
    assert dp.counters.drops[DropReason.NOT_OUR_ADDRESS] == 1


def test_rfc791_ipv4_fragments_from_the_internet_are_reassembled_then_fragmented_as_ipv6() -> None:
    from scapy.layers.inet import fragment
    from scapy.layers.inet6 import IPv6ExtHdrFragment, defragment6

    dp = nat64()
    pport = one_v4(dp.from_ipv6([udp6()], 1.0))[UDP].sport
    answer = IP(src=SERVER, dst=POOL4, id=77) / UDP(sport=53, dport=pport) / Raw(b"a" * 4000)
    pieces = fragment(answer, fragsize=1480)
    assert len(pieces) == 3
    out = dp.from_services([raw(p) for p in pieces], 1.1)
    assert len(out.to_ipv6) == 3 and all(len(p) <= 1500 for p in out.to_ipv6)
    frames = [IPv6(p) for p in out.to_ipv6]
    assert all(f.haslayer(IPv6ExtHdrFragment) for f in frames)
    whole = defragment6(frames)
    assert bytes(whole[UDP].payload) == b"a" * 4000 and whole[UDP].dport == 40000


def test_rfc7915_5_1_1_a_datagram_that_came_in_ipv6_fragments_leaves_with_df_clear() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6

    dp = nat64()
    ping = IPv6(src=CLIENT, dst=SERVER6) / IPv6ExtHdrFragment() / ICMPv6EchoRequest(
        id=9, seq=1, data=b"p" * 3000)
    out = dp.from_ipv6([raw(p) for p in fragment6(ping, 1280)], 1.0)
    echo = one_v4(out)
    assert echo[ICMP].type == 8 and len(echo) == 20 + 8 + 3000
    assert not echo.flags.DF and valid(echo)
    small = one_v4(dp.from_ipv6([raw(IPv6(src=CLIENT, dst=SERVER6) / ICMPv6EchoRequest(
        id=9, seq=2, data=b"p" * 1400))], 1.0))
    assert small.flags.DF  # RFC 7915 §5.1: over 1260 bytes and not fragmented: DF set


def test_rfc7915_4_3_fragmentation_needed_about_an_echo_quotes_the_client_request() -> None:
    dp = nat64()
    ping = raw(IPv6(src=CLIENT, dst=SERVER6) / ICMPv6EchoRequest(id=0x4242, seq=3,
                                                                  data=b"q" * 1400))
    sent = one_v4(dp.from_ipv6([ping], 1.0))
    assert sent.flags.DF
    error = IP(src="192.0.2.1", dst=POOL4) / ICMP(type=3, code=4, nexthopmtu=1280) / raw(
        sent)[:548]
    back = one_v6(dp.from_services([raw(error)], 1.1))
    assert back.src == "64:ff9b::c000:201" and back.dst == CLIENT and valid(back)
    from scapy.layers.inet6 import ICMPv6PacketTooBig
    too_big = back[ICMPv6PacketTooBig]
    assert too_big.mtu == 1300  # RFC 7915 §4.2: the IPv4 MTU + 20
    quoted = IPv6(raw(too_big.payload))
    assert (quoted.src, quoted.dst, quoted.nh) == (CLIENT, SERVER6, 58)
    request = quoted[ICMPv6EchoRequest]
    assert (request.type, request.id, request.seq) == (128, 0x4242, 3)
    # The quote is whole here (548 bytes hold 528 of the request): its checksum must verify.
    whole = raw(IPv6(src=CLIENT, dst=SERVER6) / ICMPv6EchoRequest(id=0x4242, seq=3,
                                                                   data=b"q" * 1400))
    assert raw(quoted)[40:44] == whole[40:44]


def test_rfc6146_3_5_2_2_ipv4_syn_to_a_binding_opens_v4_init_then_the_client_syn() -> None:
    dp = nat64()
    pport = one_v4(dp.from_ipv6([raw(IPv6(src=CLIENT, dst=SERVER6) / TCP(
        sport=50000, dport=80, flags="S"))], 1.0))[TCP].sport
    # Endpoint-independent filtering: another IPv4 host's SYN to the binding reaches the client.
    syn = IP(src="198.51.100.99", dst=POOL4) / TCP(sport=4444, dport=pport, flags="S")
    back = one_v6(dp.from_services([raw(syn)], 1.1))
    assert back[TCP].flags == "S" and back[TCP].dport == 50000 and valid(back)
    session = dp.flows.lookup_v4(6, ipaddress.IPv4Address(POOL4).packed, pport,
                                 ipaddress.IPv4Address("198.51.100.99").packed, 4444)
    assert session is not None and session.state == "v4_init"
    reply = raw(IPv6(src=CLIENT, dst="64:ff9b::c633:6463") / TCP(sport=50000, dport=4444,
                                                                  flags="S"))
    assert one_v4(dp.from_ipv6([reply], 1.2))[TCP].sport == pport
    assert session.state == "established"


def test_rfc6146_3_5_2_2_ipv4_syn_to_no_binding_waits_six_seconds_then_port_unreachable() -> None:
    dp = nat64()
    syn = IP(src=SERVER, dst=POOL4) / TCP(sport=4444, dport=61234, flags="S", seq=99)
    assert not dp.from_services([raw(syn)], 10.0).to_ipv6
    assert not dp.tick(15.9).to_services  # still waiting
    error = one_v4(dp.tick(16.1))
    assert (error.src, error.dst) == (POOL4, SERVER)
    assert (error[ICMP].type, error[ICMP].code) == (3, 3) and valid(error)
    assert error[TCPerror].seq == 99  # RFC 792: the SYN's header and 8 bytes quoted
    assert dp.counters.drops[DropReason.NO_SESSION] == 1


# --- beside a tunnel: [tunnel] and [nat64] in one gateway ---------------------------------------

POOL4_ROWS = ((POOL4, "tcp", 61001, 65535), (POOL4, "udp", 61001, 65535),
              (POOL4, "icmp", 0, 65535))


def beside_6in4(nat64_input: str) -> Datapath:
    from support.helpers import make_settings
    return Datapath(make_settings("6in4", nat64_prefix=PREFIX, nat64_clients=CLIENTS,
                                  nat64_pool4=POOL4_ROWS, nat64_allow_non_global=True,
                                  nat64_input=nat64_input), [b"\x64\x40\x00\x01"])


def test_nat64_over_the_tunnel_a_remote_ipv6_only_site() -> None:
    """input = "tunnel": IPv6 to the prefix arrives over 6in4 and the answers go back in."""
    from support.helpers import REMOTE4, encapsulate
    dp = beside_6in4("tunnel")
    out4 = one_v4(dp.from_tunnel([encapsulate(udp6(), REMOTE4)], 1.0))
    assert (out4.src, out4.dst, out4[UDP].dport) == (POOL4, SERVER, 53) and valid(out4)
    reply = IP(src=SERVER, dst=POOL4) / UDP(sport=53, dport=out4[UDP].sport) / Raw(b"ok")
    out = dp.from_services([raw(reply)], 1.1)
    assert not out.to_ipv6 and len(out.to_tunnel) == 1
    packet, outer = out.to_tunnel[0]
    assert outer == ipaddress.IPv4Address(REMOTE4).packed
    back = IPv6(packet)
    assert (back.src, back.dst, back[UDP].dport) == (SERVER6, CLIENT, 40000) and valid(back)
    # The tunnel's own forward rules still work beside it, and the prefix is not reachable
    # from the TUN side in this mode.
    assert not dp.from_ipv6([udp6()], 1.2).to_services
    assert dp.counters.drops[DropReason.NOT_OUR_ADDRESS] == 1


def test_nat64_for_this_hosts_side_beside_a_tunnel_routes_answers_by_destination() -> None:
    """input = "tun" beside 6in4: the NAT64's clients are answered through the TUN devices,
    the tunnel's clients (forward rules) through the tunnel."""
    from support.helpers import GW6_6IN4, REMOTE4, encapsulate
    dp = beside_6in4("tun")
    out4 = one_v4(dp.from_ipv6([udp6()], 1.0))
    reply = IP(src=SERVER, dst=POOL4) / UDP(sport=53, dport=out4[UDP].sport) / Raw(b"ok")
    assert one_v6(dp.from_services([raw(reply)], 1.1)).dst == CLIENT
    # A tunnel client of the forward rule udp/53 -> 127.0.0.1:5353.
    query = udp6(src="2001:db8:77::1", dst=GW6_6IN4)
    to_service = one_v4(dp.from_tunnel([encapsulate(query, REMOTE4)], 1.2))
    assert to_service.dst == "127.0.0.1" and to_service[UDP].dport == 5353
    answer = IP(src="127.0.0.1", dst=to_service.src) / UDP(sport=5353,
                                                           dport=to_service[UDP].sport)
    out = dp.from_services([raw(answer)], 1.3)
    assert not out.to_ipv6 and len(out.to_tunnel) == 1
    # The prefix over the tunnel is not this mode's input: not ours.
    assert not dp.from_tunnel([encapsulate(udp6(src="2001:db8:77::1"), REMOTE4)],
                              1.4).to_services


def test_reload_changes_the_nat64_policy_live_and_ends_a_removed_clients_sessions() -> None:
    """Issue 17: a reload narrows ``clients``, lowers the quota, switches filtering and the
    prefix length the quota counts by, in place. The TCP session of the client that is no
    longer listed ends with an out-of-window ACK to each side; the listed client's goes on."""
    dp = nat64()
    syn = raw(IPv6(src=OTHER_CLIENT, dst=SERVER6) / TCP(sport=50000, dport=80, flags="S"))
    pport = one_v4(dp.from_ipv6([syn], 1.0))[TCP].sport
    kept = one_v4(dp.from_ipv6([udp6(sport=1000)], 1.0))[UDP].sport
    one_v4(dp.from_ipv6([udp6(src="2001:db8:100::11", sport=1001)], 1.0))
    narrowed = dataclasses.replace(
        dp.settings, nat64_clients=("2001:db8:100::/64",), nat64_ports_per_client=2,
        nat64_filtering="address-dependent", nat64_client_prefix=128)
    out = dp.reconfigure(narrowed)
    probe6, probe4 = IPv6(out.to_ipv6[0]), IP(out.to_services[0])
    assert (probe6.dst, probe6[TCP].dport, probe6[TCP].flags) == (OTHER_CLIENT, 50000, "A")
    assert (probe4.src, probe4[TCP].sport, probe4[TCP].flags) == (POOL4, pport, "A")
    assert dp.counters.events.get(Event.FLOWS_ENDED_BY_RELOAD.value) == 1
    assert sorted(s.cport for s in dp.flows.sessions()) == [1000, 1001]
    # The client answers the probe; it is no longer a client: reset at its SEG.ACK at once.
    answer6 = raw(IPv6(src=OTHER_CLIENT, dst=SERVER6) / TCP(sport=50000, dport=80, flags="A",
                                                             seq=1, ack=77))
    reset = one_v6(dp.from_ipv6([answer6], 1.05))
    assert (reset.dst, reset[TCP].flags, reset[TCP].seq) == (OTHER_CLIENT, "R", 77)
    # The kept binding goes on; the stranger now is one.
    answer = IP(src=SERVER, dst=POOL4) / UDP(sport=53, dport=kept) / Raw(b"a")
    assert one_v6(dp.from_services([raw(answer)], 1.1))[UDP].dport == 1000
    refused = dp.from_ipv6([udp6(src=OTHER_CLIENT, sport=1002)], 1.2)
    assert dp.counters.drops[DropReason.SOURCE_NOT_ALLOWED] == 2 and not refused.to_services
    # Address-dependent filtering from now on.
    stranger = IP(src="198.51.100.99", dst=POOL4) / UDP(sport=3478, dport=kept)
    assert not dp.from_services([raw(stranger)], 1.3).to_ipv6
    assert dp.counters.drops[DropReason.FILTERED] == 1
    # Counted per /128 now: ::10 has one port of its two, ::11 too; a second port each fits,
    # a third does not.
    one_v4(dp.from_ipv6([udp6(sport=1003)], 1.4))
    dp.from_ipv6([udp6(sport=1004)], 1.4)
    assert dp.counters.drops[DropReason.PORT_QUOTA] == 1
    one_v4(dp.from_ipv6([udp6(src="2001:db8:100::11", sport=1005)], 1.4))


def test_rfc6888_req8_a_held_port_stays_held_across_a_worker_crash(tmp_path: object) -> None:
    """Issue 16/17: a binding ends, its pool4 port goes on hold (RFC 6888 REQ-8); the worker
    journals it, the coordinator's copy writes it into the shard of a worker started after a
    crash, and that worker does not hand the port out before the hold time is over."""
    from pathlib import Path

    from sixgate.workers.journal import ShardCopy, encode, read_shard, split_held

    run_dir = str(tmp_path)
    dp = nat64(nat64_port_hold_s=120.0, nat64_pool4=((POOL4, "udp", 61001, 61002),))
    dp.flows.journal = {}
    pport = one_v4(dp.from_ipv6([udp6(sport=40000)], 1.0))[UDP].sport
    dp.tick(1000.0)  # the UDP session times out: its binding ends, the port is held
    held = dp.flows.take_held()
    assert held == [(17, ipaddress.IPv4Address(POOL4).packed, pport)]
    copy = ShardCopy(1, 100, hold_s=120.0)
    records, removed = dp.flows.take_journal()
    assert copy.apply(encode(0, records, removed, held)) == 0
    copy.write(run_dir, 0)
    records, held_again = split_held(read_shard(run_dir, 0) or [])
    assert records == [] and [entry[:3] for entry in held_again] == held
    assert 119 < held_again[0][3] <= 120
    assert not Path(run_dir, "worker-0.shard").exists()  # read once

    restarted = nat64(nat64_port_hold_s=120.0, nat64_pool4=((POOL4, "udp", 61001, 61002),))
    assert restarted.flows.restore_held(held_again, 2000.0) == 1
    # The other port of the range is handed out; then the pool is exhausted, not the held
    # port reused, until the hold is over.
    first = one_v4(restarted.from_ipv6([udp6(sport=40002)], 2000.0))[UDP].sport
    assert first != pport
    assert not restarted.from_ipv6([udp6(src=OTHER_CLIENT, sport=40004)], 2001.0).to_services
    restarted.tick(2121.0)  # the hold is over (and the first session's port goes on hold)
    later = restarted.from_ipv6([udp6(src=OTHER_CLIENT, sport=40004)], 2121.0)
    assert IP(later.to_services[0])[UDP].sport == pport


def test_reload_resets_every_probed_connection_however_many_answer_at_once() -> None:
    """Issue 17 (CI failure of stop 31): a reload ends 300 sessions of 16 /64s at once. The
    clients of closed connections answer the probes with RSTs, which are never answered (RFC
    9293 §3.10.7.1) and so cost no token of the RFC 4443 §2.4(f) buckets; the live ones answer
    with ACKs, each of which is reset although 150 answers of one /64 far exceed its bucket:
    the probes were ours, so these RSTs are not a reflection anyone else can trigger."""
    dp = nat64()
    clients = [f"2001:db8:100:{0x10 + i % 16:x}::10" for i in range(300)]
    for number, client in enumerate(clients):
        syn = IPv6(src=client, dst=SERVER6) / TCP(sport=20000 + number, dport=80, flags="S")
        one_v4(dp.from_ipv6([raw(syn)], 1.0))
    out = dp.reconfigure(dataclasses.replace(dp.settings, nat64_clients=("2001:db8:100::/64",)))
    assert len(out.to_ipv6) == 300 and len(out.to_services) == 300
    closed = [raw(IPv6(src=client, dst=SERVER6) / TCP(sport=20000 + number, dport=80,
                                                       flags="R", seq=0))
              for number, client in enumerate(clients) if number % 2 == 0]
    live = [raw(IPv6(src=client, dst=SERVER6) / TCP(sport=20000 + number, dport=80,
                                                     flags="A", seq=1, ack=77))
            for number, client in enumerate(clients) if number % 2 == 1]
    answered = dp.from_ipv6(closed, 1.1)
    assert not answered.to_ipv6, "a RST was answered"
    resets = dp.from_ipv6(live, 1.1).to_ipv6
    assert len(resets) == 150 and all(IPv6(r)[TCP].flags == "R" for r in resets)
    # Past the second probe's time, an answer is no longer ours: rate-limited as before.
    dp.tick(2.0)
    dp.tick(2.0 + 5)
    late = dp.from_ipv6(live, 10.0).to_ipv6
    assert 0 < len(late) < 150
