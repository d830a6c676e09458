"""Packet-engine cost per packet, in-process (no syscalls), beside a bare reference loop.

Reference: the least any translator must do per 64-byte UDP packet in Python: slice out the
IPv6 header fields and pack a new IPv4 header (no checks, no flow table, no checksums). sixgate,
every check, session lookup, checksum update and counter included: inbound as a worker runs it
(``Datapath.from_tunnel``, batches of 64 captured packets, the same under either fan-out), and
the return path as the worker runs it (``Datapath.from_services``, batches of 64). Flow setup
(issue 21): TCP SYNs each of a new session (8 clients x 2000 ports, within the per-client
limits), alone and with the service's SYN+ACK back (the gateway's part of a handshake), as new
flows/s, with the compiled loops (which hand a new session's first packets to the engine and
translate them) and with the Python loops.
Prints packets/s per core for each and the ratio to the reference; figures vary 2-3x between
machines, only the ratios of one run compare.

    .venv/bin/python bench/engine.py [--packets N]
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import struct
import time
from collections.abc import Callable

from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.engine.packet import (
    PROTO_IPV6,
    PROTO_TCP,
    PROTO_UDP,
    build_ipv4,
    build_ipv6,
    pseudo_sum_v4,
    pseudo_sum_v6,
    set_checksum,
)
from sixgate.workers.engine.settings import Forward, Settings, worker_pool

CLIENT6 = ipaddress.IPv6Address("2002:c633:6401::1").packed
GW6 = ipaddress.IPv6Address("2002:c000:20a::1").packed
GW4 = ipaddress.IPv4Address("192.0.2.10").packed
PEER4 = ipaddress.IPv4Address("198.51.100.1").packed
SERVICE4 = ipaddress.IPv4Address("127.0.0.1").packed


def udp6(payload: bytes) -> bytes:
    segment = bytearray(struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload)
    set_checksum(segment, 6, pseudo_sum_v6(CLIENT6, GW6, PROTO_UDP, len(segment)), udp=True)
    return build_ipv6(CLIENT6, GW6, PROTO_UDP, segment)


def settings() -> Settings:
    return Settings(mode="6to4", local_ipv4="192.0.2.10", relay_ipv4="192.88.99.1",
                    remote_ipv4=None, prefix="2002:c000:20a::/48",
                    addresses=("2002:c000:20a::1",), mtu=1480, workers=1,
                    pool="100.64.0.0/16", run_dir="/tmp/sixgate-bench", name="bench",
                    forwards=(Forward("udp", 53, 53, "127.0.0.1", 5353),))


NAT64_CLIENT6 = ipaddress.IPv6Address("2001:db8:100::10").packed
NAT64_SERVER6 = ipaddress.IPv6Address("64:ff9b::198.51.100.53").packed


def nat64_settings() -> Settings:
    return Settings(mode="nat64", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
                    prefix="64:ff9b::/96", addresses=(), mtu=1500, workers=1, pool="",
                    run_dir="/tmp/sixgate-bench", name="bench", forwards=(),
                    nat64_prefix="64:ff9b::/96", nat64_clients=("2001:db8:100::/56",),
                    nat64_pool4=(("203.0.113.5", "udp", 61001, 65535),),
                    nat64_allow_non_global=True)


def nat64_udp6(payload: bytes) -> bytes:
    segment = bytearray(struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload)
    set_checksum(segment, 6, pseudo_sum_v6(NAT64_CLIENT6, NAT64_SERVER6, PROTO_UDP,
                                           len(segment)), udp=True)
    return build_ipv6(NAT64_CLIENT6, NAT64_SERVER6, PROTO_UDP, segment)


CLAT_HOST4 = ipaddress.IPv4Address("192.0.0.1").packed
CLAT_SELF6 = ipaddress.IPv6Address("2001:db8:100::c1a7").packed
CLAT_SERVER4 = ipaddress.IPv4Address("198.51.100.53").packed
CLAT_SERVER6 = ipaddress.IPv6Address("64:ff9b::198.51.100.53").packed


def clat_settings() -> Settings:
    return Settings(mode="clat", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
                    prefix="64:ff9b::/96", addresses=(), mtu=1500, workers=1, pool="",
                    run_dir="/tmp/sixgate-bench", name="bench", forwards=(),
                    clat_plat_prefix="64:ff9b::/96", clat_ipv4_address="192.0.0.1",
                    clat_ipv6_address="2001:db8:100::c1a7")


def clat_udp4(payload: bytes) -> bytes:
    """The host's IPv4 UDP datagram, as the CLAT device reads it."""
    segment = bytearray(struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload)
    set_checksum(segment, 6, pseudo_sum_v4(CLAT_HOST4, CLAT_SERVER4, PROTO_UDP, len(segment)),
                 udp=True)
    return build_ipv4(CLAT_HOST4, CLAT_SERVER4, PROTO_UDP, segment)


def clat_udp6(payload: bytes) -> bytes:
    """The PLAT's IPv6 answer to the CLAT's address."""
    segment = bytearray(struct.pack("!HHHH", 53, 40000, 8 + len(payload), 0) + payload)
    set_checksum(segment, 6, pseudo_sum_v6(CLAT_SERVER6, CLAT_SELF6, PROTO_UDP, len(segment)),
                 udp=True)
    return build_ipv6(CLAT_SERVER6, CLAT_SELF6, PROTO_UDP, segment)


SETUP_CLIENTS, SETUP_PORTS = 8, 2000  # new sessions: 16,000, inside every per-client limit


def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int) -> bytearray:
    """A 20-byte TCP header (no options), its checksum 0."""
    return bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535,
                                 0, 0))


def tcp_syn(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """A TCP SYN over IPv6 with its checksum."""
    segment = tcp_header(sport, dport, 1000, 0, 0x02)
    set_checksum(segment, 16, pseudo_sum_v6(src, dst, PROTO_TCP, len(segment)))
    return build_ipv6(src, dst, PROTO_TCP, segment)


def new_sessions(prefix: bytes, dst: bytes, dport: int, outer: bool) -> list[bytes]:
    """SYNs of SETUP_CLIENTS clients (one /64 each under ``prefix``, 6 bytes) x SETUP_PORTS."""
    packets = []
    for client in range(SETUP_CLIENTS):
        src = prefix + struct.pack("!H", client) + bytes(7) + b"\x01"
        for port in range(20000, 20000 + SETUP_PORTS):
            syn = tcp_syn(src, dst, port, dport)
            packets.append(build_ipv4(PEER4, GW4, PROTO_IPV6, syn) if outer else syn)
    return packets


def syn_ack(syn4: bytes) -> bytes:
    """The service's SYN+ACK to a translated SYN (no options), with its checksum."""
    src, dst = syn4[16:20], syn4[12:16]
    dport, sport = struct.unpack_from("!HH", syn4, 20)
    segment = tcp_header(sport, dport, 5000, 1001, 0x12)
    set_checksum(segment, 16, pseudo_sum_v4(src, dst, PROTO_TCP, len(segment)))
    return build_ipv4(src, dst, PROTO_TCP, segment)


def flow_setup(make: Callable[[], Datapath], feed: str, packets: list[bytes],
               compiled: bool = True) -> tuple[float, float]:
    """New sessions per second, (the SYN alone, the gateway's part of the handshake: the SYN
    in and the service's SYN+ACK back): fresh Datapaths fed ``packets`` (each a new session)
    in batches of 64, then each batch's SYN+ACKs; every SYN must have made its session and
    every SYN+ACK gone back. ``compiled``: False runs the Python loops."""
    def fresh() -> tuple[Datapath, Callable[[list[bytes], float], object]]:
        datapath = make()
        if not compiled:
            datapath.compiled = None
        return datapath, getattr(datapath, feed)

    # The SYN+ACKs of a first engine's SYNs: a fresh engine gives each the same binding.
    datapath, handle = fresh()
    answers = [syn_ack(syn4) for first in range(0, len(packets), 64)
               for syn4 in handle(packets[first:first + 64], 1.0).to_services]  # type: ignore[attr-defined]
    assert len(answers) == len(packets), f"{feed}: {len(answers)} SYNs for {len(packets)}"
    datapath, handle = fresh()
    start = time.perf_counter()
    for first in range(0, len(packets), 64):
        handle(packets[first:first + 64], 1.0)
    syn_s = time.perf_counter() - start
    assert len(datapath.flows) == len(packets), f"{feed}: {len(datapath.flows)} sessions"
    datapath, handle = fresh()
    back = 0
    start = time.perf_counter()
    for first in range(0, len(packets), 64):
        handle(packets[first:first + 64], 1.0)
        out = datapath.from_services(answers[first:first + 64], 1.0)
        back += len(out.to_tunnel) + len(out.to_ipv6)
    both_s = time.perf_counter() - start
    assert back == len(packets), f"{feed}: {back} SYN+ACKs back of {len(packets)}"
    return len(packets) / syn_s, len(packets) / both_s


def rate(n: int, loop: object) -> float:
    start = time.perf_counter()
    loop()  # type: ignore[operator]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packets", type=int, default=200_000)
    n = parser.parse_args().packets
    inner = udp6(b"x" * 64)
    outer = build_ipv4(PEER4, GW4, PROTO_IPV6, inner)
    ipv6_header = struct.Struct("!IHBB16s16s")
    ipv4_header = struct.Struct("!BBHHHBBH4s4s")
    pool4 = ipaddress.IPv4Address("100.64.0.1").packed

    def reference() -> None:
        for _ in range(n):
            _vtf, plen, nh, hlim, _src, _dst = ipv6_header.unpack_from(outer, 20)
            (ipv4_header.pack(0x45, 0, 20 + plen, 0, 0, hlim - 1, nh, 0, pool4, SERVICE4)
             + outer[60:])

    s = settings()
    datapath = Datapath(s, worker_pool(s.pool, 1, 0))
    tcp_settings = dataclasses.replace(s, forwards=(*s.forwards,
                                                    Forward("tcp", 80, 80, "127.0.0.1", 8080)))
    nat64_tcp = dataclasses.replace(nat64_settings(), nat64_pool4=(
        ("203.0.113.5", "tcp", 1024, 65535),), nat64_ports_per_client=SETUP_PORTS)
    setup_rows = []
    for compiled in (True, False):
        loops = "" if compiled else ", Python loops"
        for name, make, feed, syns in (
                ("sixgate", lambda: Datapath(tcp_settings, worker_pool(s.pool, 1, 0)),
                 "from_tunnel", new_sessions(CLIENT6[:6], GW6, 80, outer=True)),
                ("sixgate NAT64", lambda: Datapath(nat64_tcp, []), "from_ipv6",
                 new_sessions(NAT64_CLIENT6[:6], NAT64_SERVER6, 80, outer=False))):
            syn, both = flow_setup(make, feed, syns, compiled)
            setup_rows += [(f"{name} new TCP sessions{loops}: SYN ({feed})", syn),
                           (f"{name} new TCP sessions{loops}: SYN in, SYN+ACK back", both)]

    def sixgate_from_tunnel() -> None:
        batch = [outer] * 64
        for _ in range(n // 64):
            datapath.from_tunnel(batch, 1.0)

    sent4 = datapath.from_tunnel([outer], 1.0).to_services[0]
    reply_segment = bytearray(struct.pack("!HHHH", 5353, 40000, 8 + 64, 0) + b"y" * 64)
    set_checksum(reply_segment, 6, pseudo_sum_v4(SERVICE4, sent4[12:16], PROTO_UDP,
                                                  len(reply_segment)), udp=True)
    reply = build_ipv4(SERVICE4, sent4[12:16], PROTO_UDP, reply_segment)

    def sixgate_return() -> None:
        batch = [reply] * 64
        for _ in range(n // 64):
            datapath.from_services(batch, 1.0)

    nat64 = Datapath(nat64_settings(), [])
    request6 = nat64_udp6(b"x" * 64)

    def nat64_from_ipv6() -> None:
        batch = [request6] * 64
        for _ in range(n // 64):
            nat64.from_ipv6(batch, 1.0)

    out4 = nat64.from_ipv6([request6], 1.0).to_services[0]
    answer_segment = bytearray(struct.pack("!HHHH", 53, out4[20] << 8 | out4[21], 8 + 64, 0)
                               + b"y" * 64)
    set_checksum(answer_segment, 6, pseudo_sum_v4(out4[16:20], out4[12:16], PROTO_UDP,
                                                   len(answer_segment)), udp=True)
    answer4 = build_ipv4(bytes(out4[16:20]), bytes(out4[12:16]), PROTO_UDP, answer_segment)

    def nat64_from_ipv4() -> None:
        batch = [answer4] * 64
        for _ in range(n // 64):
            nat64.from_services(batch, 1.0)

    clat = Datapath(clat_settings(), [])
    host4 = clat_udp4(b"x" * 64)

    def clat_to_ipv6() -> None:
        batch = [host4] * 64
        for _ in range(n // 64):
            clat.from_clat(batch, 1.0)

    plat6 = clat_udp6(b"y" * 64)

    def clat_to_ipv4() -> None:
        batch = [plat6] * 64
        for _ in range(n // 64):
            clat.from_clat(batch, 1.0)

    ref = rate(n, reference)
    rows = [("reference: bare header rewrite", ref),
            ("sixgate inbound: Datapath.from_tunnel", rate(n, sixgate_from_tunnel)),
            ("sixgate return: Datapath.from_services", rate(n, sixgate_return)),
            ("sixgate NAT64 IPv6 -> IPv4: Datapath.from_ipv6", rate(n, nat64_from_ipv6)),
            ("sixgate NAT64 IPv4 -> IPv6: Datapath.from_services", rate(n, nat64_from_ipv4)),
            ("sixgate CLAT IPv4 -> IPv6: Datapath.from_clat", rate(n, clat_to_ipv6)),
            ("sixgate CLAT IPv6 -> IPv4: Datapath.from_clat", rate(n, clat_to_ipv4))]
    # The same two inbound loops without the compiled fast path (compiled_fast_path =
    # false, or a host where workers/engine/_fastpath.c was not built).
    loops = datapath.compiled
    if loops is not None:
        datapath.compiled = nat64.compiled = None
        rows += [("sixgate inbound, Python loops: Datapath.from_tunnel",
                  rate(n, sixgate_from_tunnel)),
                 ("sixgate NAT64 IPv6 -> IPv4, Python loops: Datapath.from_ipv6",
                  rate(n, nat64_from_ipv6))]
        datapath.compiled = nat64.compiled = loops
    print(f"64-byte UDP, {n} packets, one core, no syscalls")
    for name, pps in rows:
        print(f"  {name:<62} {pps:>12,.0f} pkt/s   ratio {pps / ref:5.2f}")
    print(f"flow setup: {SETUP_CLIENTS * SETUP_PORTS} TCP SYNs, each a new session, one core "
          "(the Python loops: without the compiled fast path)")
    for name, fps in setup_rows:
        print(f"  {name:<68} {fps:>10,.0f} flows/s ratio {fps / ref:5.2f}")


if __name__ == "__main__":
    main()
