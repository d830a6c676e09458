"""Shared test helpers for the packet engine: settings, a fake clock, drop-counter deltas and
the two-party helper (an IPv6 client on the far side of the tunnel <-> an IPv4 service).

Packets are built and read with scapy, an independent implementation, so a test never uses the
engine's own codecs to decide whether the engine is right. Every address is from a
documentation range (RFC 5737, RFC 3849) or the 6to4 prefix derived from one; documentation
ranges are deliberately not martian (workers/engine/tunnel.py).

Imported as ``support.helpers`` by every suite.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw

from sixgate.workers.engine.datapath import Datapath, Output
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import Timeouts
from sixgate.workers.engine.settings import Forward, Settings, worker_pool
from sixgate.workers.engine.tunnel import TunnelPolicy

# --- addresses ----------------------------------------------------------------------------------

GW4 = "192.0.2.10"  # this host's public IPv4 (RFC 5737 TEST-NET-1)
RELAY4 = "203.0.113.99"  # the configured 6to4 relay (RFC 7526: no anycast default)
REMOTE4 = "203.0.113.1"  # the 6in4 tunnel broker endpoint (RFC 4213 configured peer)

GW6_6TO4 = "2002:c000:20a::1"  # first address of 2002:c000:020a::/48 = 192.0.2.10
PREFIX_6TO4 = "2002:c000:20a::/48"
GW6_6IN4 = "2001:db8:ff::1"
PREFIX_6IN4 = "2001:db8:ff::/64"

CLIENT4 = "198.51.100.1"  # a 6to4 client's public IPv4 (RFC 5737 TEST-NET-2)
CLIENT6_6TO4 = "2002:c633:6401::1"  # 2002:<198.51.100.1>::1
NATIVE6 = "2001:db8:1::1"  # a native IPv6 client, reached through the relay in 6to4 mode

SERVICE4 = "127.0.0.1"
POOL = "100.64.0.0/29"  # usable: 100.64.0.1 .. 100.64.0.6

# tcp/80 -> 127.0.0.1:8080, udp/53 -> 127.0.0.1:5353, tcp/8000-8009 -> 127.0.0.2 (same port),
# udp/7000-7009 -> 127.0.0.3:9000-9009 (the range shifts)
FORWARDS = (
    Forward("tcp", 80, 80, SERVICE4, 8080),
    Forward("udp", 53, 53, SERVICE4, 5353),
    Forward("tcp", 8000, 8009, "127.0.0.2", None),
    Forward("udp", 7000, 7009, "127.0.0.3", 9000),
)
# destination port -> (target IPv4, target port), per protocol, as the rules above say
TCP_TARGETS = {80: (SERVICE4, 8080), **{p: ("127.0.0.2", p) for p in range(8000, 8010)}}
UDP_TARGETS = {53: (SERVICE4, 5353), **{p: ("127.0.0.3", 9000 + p - 7000)
                                        for p in range(7000, 7010)}}


def make_settings(mode: str = "6to4", **overrides: object) -> Settings:
    """Settings of a small gateway in ``mode``; keyword arguments replace any field."""
    if mode == "6to4":
        base: dict[str, object] = dict(
            mode="6to4", local_ipv4=GW4, relay_ipv4=RELAY4, remote_ipv4=None,
            prefix=PREFIX_6TO4, addresses=(GW6_6TO4,))
    else:
        base = dict(mode="6in4", local_ipv4=GW4, relay_ipv4=None, remote_ipv4=REMOTE4,
                    prefix=PREFIX_6IN4, addresses=(GW6_6IN4,))
    base.update(mtu=1480, workers=1, pool=POOL, run_dir="/nonexistent", name="sgtest",
                forwards=FORWARDS, timeouts=Timeouts())
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


# Every Datapath a test makes, so a fixture can assert INTERNAL_ERROR stayed 0 in all of them.
MADE: list[Datapath] = []


def make_datapath(mode: str = "6to4", **overrides: object) -> Datapath:
    settings = make_settings(mode, **overrides)
    datapath = Datapath(settings, worker_pool(settings.pool, 1, 0))
    MADE.append(datapath)
    return datapath


def internal_errors() -> int:
    """INTERNAL_ERROR drops over every Datapath made since the last call; forgets them."""
    total = sum(dp.counters.drops[DropReason.INTERNAL_ERROR] for dp in MADE)
    MADE.clear()
    return total


def gw6(mode: str) -> str:
    return GW6_6TO4 if mode == "6to4" else GW6_6IN4


def client6(mode: str) -> str:
    return CLIENT6_6TO4 if mode == "6to4" else NATIVE6


def packed4(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def packed6(addr: str) -> bytes:
    return ipaddress.IPv6Address(addr).packed


# --- clock and counters -------------------------------------------------------------------------

@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand: expiry tests never sleep."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class DropWatch:
    """Drop counters of a Datapath relative to when the watch was made (assert by name)."""

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath
        self.before = dict(datapath.counters.drops)

    def delta(self) -> dict[DropReason, int]:
        now = self.datapath.counters.drops
        return {r: n - self.before[r] for r, n in now.items() if n != self.before[r]}


# --- the two-party helper -----------------------------------------------------------------------

@dataclass
class Step:
    """What one packet pushed into the engine produced."""

    to_services: list[bytes] = field(default_factory=list)
    outbound: list[tuple[bytes, bytes]] = field(default_factory=list)  # (IPv6, outer IPv4 dst)
    drops: dict[DropReason, int] = field(default_factory=dict)

    @property
    def outer_destinations(self) -> list[str]:
        return [str(ipaddress.IPv4Address(dst)) for _pkt, dst in self.outbound]

    def only_outbound(self) -> IPv6:
        assert len(self.outbound) == 1, f"expected one outbound packet, got {self.outbound}"
        return IPv6(self.outbound[0][0])

    def only_to_services(self) -> IP:
        assert len(self.to_services) == 1, f"expected one packet to services, got {self}"
        return IP(self.to_services[0])


def outer_source(mode: str, src6: bytes) -> str:
    """The outer IPv4 source a client's packet arrives from: its own 6to4 address (RFC 3056
    §2), the relay for a native client (RFC 3056 §5.3), the broker in 6in4 (RFC 4213)."""
    if mode != "6to4":
        return REMOTE4
    if src6[:2] == b"\x20\x02":
        return str(ipaddress.IPv4Address(src6[2:6]))
    return RELAY4


def encapsulate(packet6: bytes, outer_src: str, outer_dst: str = GW4) -> bytes:
    """The IPv4 protocol-41 packet that carries ``packet6`` (scapy-built)."""
    return raw(IP(src=outer_src, dst=outer_dst, proto=41) / Raw(packet6))


class TwoParty:
    """A client on the tunnel side and the IPv4 service behind the gateway, with one engine.

    ``client(pkt6)`` pushes the client's IPv6 packet, inside the IPv4 protocol-41 packet it
    arrives in, through ``Datapath.from_tunnel``; ``service(pkt4)`` pushes the service's IPv4
    packet through ``Datapath.from_services``; each returns what that one call produced (its
    ``Output``, drop deltas).
    """

    def __init__(self, datapath: Datapath, clock: FakeClock | None = None) -> None:
        self.datapath = datapath
        self.clock = clock or FakeClock()

    def _run(self, call: Callable[[], Output]) -> Step:
        watch = DropWatch(self.datapath)
        output = call()
        return Step(output.to_services, output.to_tunnel, watch.delta())

    def client(self, packet6: bytes | IPv6) -> Step:
        data = raw(packet6) if not isinstance(packet6, bytes | bytearray) else bytes(packet6)
        return self.tunnel(data, outer_source(self.datapath.mode, data[8:24]))

    def tunnel(self, packet6: bytes | IPv6, outer_src: str) -> Step:
        """The client's packet inside an IPv4 protocol-41 packet from ``outer_src``."""
        data = raw(packet6) if not isinstance(packet6, bytes | bytearray) else bytes(packet6)
        outer = encapsulate(data, outer_src)
        return self._run(lambda: self.datapath.from_tunnel([outer], self.clock.now))

    def tick(self, seconds: float) -> Step:
        """Advance the clock and run the engine's timers (``Datapath.tick``)."""
        return self._run(lambda: self.datapath.tick(self.clock.advance(seconds)))

    def service(self, packet4: bytes | IP) -> Step:
        data = raw(packet4) if not isinstance(packet4, bytes | bytearray) else bytes(packet4)
        return self._run(lambda: self.datapath.from_services([data], self.clock.now))

    def round_trip(self, packet6: bytes | IPv6, payload: bytes = b"",
                   **reply_options: object) -> tuple[IP, Step]:
        """Client packet in, the service answers it with ``payload``; returns the IPv4 packet
        the service received and what the service's reply produced."""
        first = self.client(packet6)
        request = first.only_to_services()
        return request, self.service(reply_to(request, payload, **reply_options))


def reply_to(request: IP | bytes, payload: bytes = b"", *, tcp_flags: str | None = None,
             ttl: int = 64, tos: int = 0, df: bool = False,
             tcp_options: list[tuple[str, object]] | None = None) -> bytes:
    """The service's IPv4 answer to ``request``: addresses and ports swapped (scapy-built)."""
    req = IP(request) if isinstance(request, bytes | bytearray) else request
    ip = IP(src=req.dst, dst=req.src, ttl=ttl, tos=tos, flags="DF" if df else 0)
    if TCP in req:
        seg = req[TCP]
        if tcp_flags is None:
            tcp_flags = "SA" if seg.flags.S and not seg.flags.A else "A"
        seq_len = len(seg.payload) + (1 if seg.flags.S else 0) + (1 if seg.flags.F else 0)
        l4 = TCP(sport=seg.dport, dport=seg.sport, flags=tcp_flags, seq=5000,
                 ack=(seg.seq + seq_len) & 0xFFFFFFFF, options=tcp_options or [])
    elif UDP in req:
        l4 = UDP(sport=req[UDP].dport, dport=req[UDP].sport)
    else:
        raise AssertionError(f"service cannot answer {req.summary()}")
    return raw(ip / l4 / Raw(payload))


def icmp4_error_about(request: IP | bytes, icmp_type: int, code: int, *, unused: int = 0,
                      src: str = SERVICE4) -> bytes:
    """An ICMPv4 error a service host would send about ``request`` (whole packet quoted)."""
    req = IP(request) if isinstance(request, bytes | bytearray) else request
    return raw(IP(src=src, dst=req.src) / ICMP(type=icmp_type, code=code, unused=unused)
               / Raw(raw(req)))


# --- client packets -----------------------------------------------------------------------------

def client_udp(mode: str = "6to4", *, sport: int = 40000, dport: int = 53,
               payload: bytes = b"query", hlim: int = 64, tc: int = 0,
               src: str | None = None) -> bytes:
    return raw(IPv6(src=src or client6(mode), dst=gw6(mode), hlim=hlim, tc=tc)
               / UDP(sport=sport, dport=dport) / Raw(payload))


def client_tcp(mode: str = "6to4", *, sport: int = 40000, dport: int = 80, flags: str = "S",
               seq: int = 1000, ack: int = 0, payload: bytes = b"", hlim: int = 64,
               options: list[tuple[str, object]] | None = None, src: str | None = None) -> bytes:
    return raw(IPv6(src=src or client6(mode), dst=gw6(mode), hlim=hlim)
               / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                     options=options or [])
               / Raw(payload))


def tcp_mss(segment: TCP) -> int | None:
    for name, value in segment.options:
        if name == "MSS":
            return int(value)  # type: ignore[arg-type]
    return None


# --- an independent RFC 1071 reference ------------------------------------------------------------

def ref_ones_sum(data: bytes) -> int:
    """RFC 1071 §4.1 written the slow, obvious way: 16-bit words, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_verifies(data: bytes) -> bool:
    """A block that includes its checksum verifies when its ones' complement sum is -0."""
    return ref_ones_sum(data) == 0xFFFF


# The tunnel checks of the two modes, as a Datapath builds them from its settings.
POLICY_6TO4 = TunnelPolicy.build("6to4", GW4, None, [GW6_6TO4])
POLICY_6IN4 = TunnelPolicy.build("6in4", GW4, REMOTE4, [GW6_6IN4])


def require_compiled(module: object, source: str) -> None:
    """A compiled helper (``source``) must exist in CI (``make test`` builds it: gcc and the
    Python headers are in bootstrap), so its tests fail there when it is missing; elsewhere
    they skip, saying why."""
    if module is None:
        reason = (f"{source} was not built: reinstall with gcc and the Python headers "
                  "(`.venv/bin/pip install -e .`)")
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
