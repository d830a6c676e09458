"""workers/_tunread.c ``serve``: a NAT64 worker's compiled loop around poll(2). What it
translates leaves byte for byte as the engine's batch calls would give it, counted the same,
new sessions' first packets and first answers included (the engine's openers); from the first
packet its compiled loops do not take, the batch is handed back to Python in order (a
captured outer fragment before the compiled loop sees it); it returns when a watched
descriptor is readable, and when an opener answered a refused first packet itself; a refused
write is counted.

SOCK_SEQPACKET socket pairs stand for the TUN devices (one packet per read(2) and write(2),
as tests/unit/test_tunread.py); a second engine with the same settings, called per batch as
the worker calls it without the loop, is the reference."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
from scapy.packet import Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6TO4,
    make_datapath,
    require_compiled,
)
from test_nat64_datapath import CLIENT, POOL4, SERVER, SERVER6, nat64, udp6

from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.journal import FLUSH_INTERVAL_S as JOURNAL_S
from sixgate.workers.main import Served, serve
from sixgate.workers.uring import UringWriter


class Devices:
    """Three packet pipes: the IPv6 device and the IPv4 one (serve reads them) and the
    device serve writes to."""

    def __init__(self) -> None:
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                      for _ in range(3)]
        for ours, theirs in self.pairs:
            ours.setblocking(False)
            theirs.setblocking(False)
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    def send6(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.pairs[0][1].send(packet)

    def send4(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.pairs[1][1].send(packet)

    def written(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.pairs[2][1].recv(65536))
            except BlockingIOError:
                return out

    def serve(self, datapath: Datapath, watch: list[int] | None = None, timeout_ms: int = 0,
              write_fd: int | None = None, ring: tuple[object, ...] | None = None) -> Served:
        """One call as the worker makes it (workers/main.py ``Worker._serve``)."""
        loops = datapath.device_loops(JOURNAL_S)
        assert loops is not None
        fds = (self.pairs[0][0].fileno(), self.pairs[1][0].fileno(), -1, 0,
               self.pairs[2][0].fileno() if write_fd is None else write_fd, -1)
        served = Served._make(serve(watch or [], timeout_ms, 4096, fds, loops, ring))
        datapath.count_served(served.ident, served.inbound, served.returning)
        return served

    def close(self) -> None:
        for pair in self.pairs:
            for sock in pair:
                sock.close()


@pytest.fixture()
def devices() -> Iterator[Devices]:
    require_compiled(serve, "workers/_tunread.c")
    made = Devices()
    yield made
    made.close()


def tcp6(flags: str, seq: int = 1, ack: int = 0, payload: bytes = b"") -> bytes:
    return raw(IPv6(src=CLIENT, dst=SERVER6) / TCP(sport=50000, dport=80, flags=flags,
                                                   seq=seq, ack=ack) / Raw(payload))


def tcp4(port: int, flags: str, seq: int = 7, ack: int = 1, payload: bytes = b"") -> bytes:
    return raw(IP(src=SERVER, dst=POOL4) / TCP(sport=80, dport=port, flags=flags, seq=seq,
                                               ack=ack) / Raw(payload))


def with_options(packet: bytes) -> bytes:
    """``packet`` (IPv6, from its first byte) with an empty Destination Options header: a
    packet the compiled loops leave to Python (RFC 8200 §4)."""
    ipv6 = IPv6(packet)
    return raw(IPv6(src=ipv6.src, dst=ipv6.dst, hlim=ipv6.hlim) / IPv6ExtHdrDestOpt()
               / ipv6.payload)


def echo6(seq: int) -> bytes:
    return raw(IPv6(src=CLIENT, dst=SERVER6) / ICMPv6EchoRequest(id=0x1234, seq=seq,
                                                               data=b"ping"))


def sessions(datapath: Datapath) -> dict[str, int]:
    """A UDP, an established TCP and an echo session through the engine: the pool4 port
    (identifier) of each."""
    now = time.monotonic()
    udp = IP(datapath.from_ipv6([udp6()], now).to_services[0])[UDP].sport
    syn = IP(datapath.from_ipv6([tcp6("S")], now).to_services[0])[TCP].sport
    datapath.from_services([tcp4(syn, "SA", seq=7, ack=2)], now)
    datapath.from_ipv6([tcp6("A", seq=2, ack=8)], now)
    echo = IP(datapath.from_ipv6([echo6(0)], now).to_services[0])[ICMP].id
    ports = {"udp": udp, "tcp": syn, "echo": echo}
    # A session's templates are made when it is seen again (Datapath._inbound).
    for _ in range(2):
        datapath.from_ipv6(requests(0), now)
        datapath.from_services(replies(ports, 0), now)
    return ports


def replies(ports: dict[str, int], first: int) -> list[bytes]:
    return [raw(IP(src=SERVER, dst=POOL4) / UDP(sport=53, dport=ports["udp"]) / Raw(b"answer")),
            tcp4(ports["tcp"], "A", seq=8, ack=2 + first, payload=b"y" * 50),
            raw(IP(src=SERVER, dst=POOL4) / ICMP(type=0, id=ports["echo"], seq=first)
                / Raw(b"ping"))]


def requests(first: int) -> list[bytes]:
    return [udp6(payload=b"q%d" % first), tcp6("A", seq=2 + first, ack=8, payload=b"x" * 40),
            echo6(first)]


def test_it_translates_as_the_engine_does_and_counts_the_same(devices: Devices) -> None:
    served, reference = nat64(), nat64()
    ports = sessions(served)
    assert sessions(reference) == ports
    expected: list[bytes] = []
    for first in (1, 4):
        batch6 = requests(first)
        batch4 = replies(ports, first)
        devices.send6(batch6)
        devices.send4(batch4)
        result = devices.serve(served)
        assert (result.ready, result.left_ipv6, result.left_ipv4, result.to_tunnel) == (
            [], [], [], [])
        assert (result.translated_in, result.translated_back, result.device_failed) == (3, 3, 0)
        now = time.monotonic()
        expected += reference.from_ipv6(batch6, now).to_services
        expected += reference.from_services(batch4, now).to_ipv6
    assert devices.written() == expected
    assert served.counters.packets == reference.counters.packets
    assert served.counters.bytes == reference.counters.bytes
    assert served.counters.drops == reference.counters.drops
    assert (served.device_loops(JOURNAL_S).ident  # type: ignore[union-attr]
            == reference.device_loops(JOURNAL_S).ident)  # type: ignore[union-attr]


def test_from_the_first_packet_it_does_not_take_the_batch_goes_back_in_order(
        devices: Devices) -> None:
    served, reference = nat64(), nat64()
    sessions(served)
    sessions(reference)
    new_client = with_options(udp6(sport=40001, payload=b"new"))  # the full path's to make
    batch = [*requests(1)[:2], new_client, *requests(2)]
    devices.send6(batch)
    result = devices.serve(served)
    assert result.left_ipv6 == batch[2:] and result.translated_in == 2
    now = time.monotonic()
    rest = served.from_ipv6(result.left_ipv6, now).to_services  # as the worker does with them
    assert devices.written() + rest == reference.from_ipv6(batch, now).to_services
    assert served.counters.packets == reference.counters.packets
    assert served.counters.bytes == reference.counters.bytes


def test_it_returns_when_a_watched_descriptor_is_readable(devices: Devices) -> None:
    served = nat64()
    sessions(served)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"!")
        # A long timeout: only the readable descriptor can end the call.
        assert devices.serve(served, [read_end], timeout_ms=60_000).ready == [read_end]
        os.read(read_end, 1)
        assert devices.serve(served, [read_end], timeout_ms=10).ready == []
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_refused_write_is_counted_not_retried(devices: Devices) -> None:
    served = nat64()
    sessions(served)
    read_end, write_end = os.pipe()
    try:
        devices.send6(requests(1))
        result = devices.serve(served, write_fd=read_end)  # a pipe's read end: EBADF
        assert (result.translated_in, result.device_failed) == (3, 3)
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.fixture()
def ring(devices: Devices) -> Iterator[UringWriter]:
    """The worker's io_uring writer on the device serve writes to: two entries, so a batch
    of three takes two submissions and the rings wrap."""
    try:
        writer = UringWriter.open(devices.pairs[2][0].fileno(), entries=2)
    except OSError as exc:
        reason = f"io_uring refused on this host ({exc}): nothing to test the ring with"
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":  # CI's hosts allow it
            pytest.fail(reason)
        pytest.skip(reason)
    yield writer
    writer.close()


def test_through_the_ring_the_device_gets_what_write_2_would_give(
        devices: Devices, ring: UringWriter) -> None:
    served, reference = nat64(), nat64()
    ports = sessions(served)
    sessions(reference)
    read_end, write_end = os.pipe()
    try:
        expected: list[bytes] = []
        for first in (1, 4, 7):
            batch6, batch4 = requests(first), replies(ports, first)
            devices.send6(batch6)
            devices.send4(batch4)
            # write_fd is a pipe's read end: a packet written by write(2) would fail, so what
            # arrives came through the ring (whose entries name the device).
            result = devices.serve(served, write_fd=read_end, ring=ring.compiled_ring())
            assert (result.translated_in, result.translated_back) == (3, 3)
            assert (result.device_failed, result.ring_errno) == (0, 0)
            now = time.monotonic()
            expected += reference.from_ipv6(batch6, now).to_services
            expected += reference.from_services(batch4, now).to_ipv6
        # The Python writer goes on from where serve left the ring.
        assert ring.write([b"after", b"serve", b"!"]) == 0
        assert devices.written() == [*expected, b"after", b"serve", b"!"]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_ring_that_fails_as_a_whole_counts_its_packets_and_says_why(
        devices: Devices, ring: UringWriter) -> None:
    served = nat64()
    sessions(served)
    read_end, write_end = os.pipe()
    try:
        devices.send6(requests(1))
        broken = (read_end, *ring.compiled_ring()[1:])  # io_uring_enter on a pipe: refused
        result = devices.serve(served, ring=broken)
        assert (result.translated_in, result.device_failed) == (3, 3)
        assert result.ring_errno == errno.EOPNOTSUPP
        assert devices.written() == []
    finally:
        os.close(read_end)
        os.close(write_end)


# --- the tunnel's capture (kernel fan-out) --------------------------------------------------


def query(sport: int, payload: bytes = b"q") -> bytes:
    return raw(IP(src=CLIENT4, dst=GW4) / IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
               / UDP(sport=sport, dport=53) / Raw(payload))


def echo_to_us(seq: int) -> bytes:
    return raw(IP(src=CLIENT4, dst=GW4) / IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
               / ICMPv6EchoRequest(id=7, seq=seq, data=b"x" * 56))


class Capture(Devices):
    """The capture as a datagram socket pair (no PACKET_AUXDATA: every status 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.capture = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.capture[0].setblocking(False)

    def capture_send(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.capture[1].send(packet)

    def serve_capture(self, datapath: Datapath, timeout_ms: int = 0) -> Served:
        loops = datapath.device_loops(JOURNAL_S)
        assert loops is not None
        fds = (-1, self.pairs[1][0].fileno(), self.capture[0].fileno(), 64,
               self.pairs[2][0].fileno(), -1)  # no send socket: the tunnel's packets come back
        served = Served._make(serve([], timeout_ms, 4096, fds, loops, None))
        datapath.count_served(served.ident, served.inbound, served.returning)
        return served

    def close(self) -> None:
        super().close()
        for sock in self.capture:
            sock.close()


@pytest.fixture()
def capture() -> Iterator[Capture]:
    require_compiled(serve, "workers/_tunread.c")
    made = Capture()
    yield made
    made.close()


def tunnel_sessions(datapath: Datapath) -> None:
    """A client's UDP session with its templates and an echo template to us (the session's
    from its second packet, the one-lookup entry from its third; the echo's from the first
    answered: Datapath._from_tunnel_full)."""
    now = time.monotonic()
    for seq in range(3):
        datapath.from_tunnel([query(40000)], now)
        datapath.from_tunnel([echo_to_us(seq)], now)


def test_captured_packets_as_from_tunnel_gives_them_the_rest_back_with_statuses(
        capture: Capture) -> None:
    served, reference = make_datapath("6to4"), make_datapath("6to4")
    tunnel_sessions(served)
    tunnel_sessions(reference)
    with_header = raw(IP(src=CLIENT4, dst=GW4) / with_options(query(40001, b"new")[20:]))
    batch = [query(40000, b"a"), echo_to_us(5), with_header, query(40000, b"b")]
    capture.capture_send(batch)
    result = capture.serve_capture(served)
    assert result.captured == 4 and result.captured_bytes == sum(map(len, batch))
    assert result.left_capture == batch[2:] and result.statuses == [0, 0]
    assert result.translated_in == 2 and result.inbound[9:13] == (1, 104, 1, 104)  # the echo
    now = time.monotonic()
    rest = served.from_tunnel(result.left_capture, now)  # as the worker does with them
    expected = reference.from_tunnel(batch, now)
    assert capture.written() + rest.to_services == expected.to_services
    assert result.to_tunnel + rest.to_tunnel == expected.to_tunnel  # the echo reply
    assert served.counters.packets == reference.counters.packets
    assert served.counters.bytes == reference.counters.bytes


def test_an_outer_fragment_is_left_to_python_before_the_compiled_loop_sees_it(
        capture: Capture) -> None:
    served = make_datapath("6to4")
    tunnel_sessions(served)
    fragment = bytearray(query(40000, b"f"))
    fragment[6] |= 0x20  # MF: the outer datagram continues (RFC 791 §3.2)
    batch = [query(40000, b"a"), bytes(fragment), query(40000, b"b")]
    capture.capture_send(batch)
    result = capture.serve_capture(served)
    assert result.translated_in == 1 and result.left_capture == batch[1:]


def test_packets_left_to_python_on_one_side_do_not_hold_up_the_other(devices: Devices) -> None:
    """When every batch from the clients is left to Python (each with an extension header,
    say), the answers waiting on the other device are read in the same turn all the same (a
    flood of such packets would otherwise starve every answer)."""
    served = nat64()
    ports = sessions(served)
    devices.send6([with_options(udp6(sport=41000 + i, payload=b"new")) for i in range(3)])
    devices.send4(replies(ports, 1))
    result = devices.serve(served)
    assert len(result.left_ipv6) == 3 and result.translated_in == 0
    assert result.translated_back == 3 and len(devices.written()) == 3


def test_new_sessions_open_in_the_loop_as_the_engine_opens_them(devices: Devices) -> None:
    """SYNs and datagrams of new sessions are translated in the loop (the engine's opener
    makes each session), and so are their first answers (the returner): the same bytes,
    counters and sessions as the engine's batch calls."""
    served, reference = nat64(), nat64()
    firsts = [tcp6("S")] + [udp6(sport=41000 + i, payload=b"new%d" % i) for i in range(3)]
    devices.send6(firsts)
    result = devices.serve(served)
    assert (result.left_ipv6, result.translated_in) == ([], 4)
    now = time.monotonic()
    expected = reference.from_ipv6(firsts, now).to_services
    out4 = devices.written()
    assert out4 == expected
    answers = [tcp4(IP(out4[0])[TCP].sport, "SA", seq=7, ack=2)]
    answers += [raw(IP(src=SERVER, dst=POOL4) / UDP(sport=53, dport=IP(packet)[UDP].sport)
                    / Raw(b"answer")) for packet in out4[1:]]
    devices.send4(answers)
    result = devices.serve(served)
    assert (result.left_ipv4, result.translated_back) == ([], 4)
    assert devices.written() == reference.from_services(answers, now).to_ipv6
    assert served.counters.packets == reference.counters.packets
    assert served.counters.bytes == reference.counters.bytes
    assert ({(s.proto, s.cport, s.state, s.assured) for s in served.flows.sessions()}
            == {(s.proto, s.cport, s.state, s.assured) for s in reference.flows.sessions()})
    assert len(served.flows) == 4


def test_a_first_packet_an_opener_refuses_is_answered_at_once(capture: Capture) -> None:
    """A new client's datagram to a port no rule opens, from tunnel addresses already
    accepted: the opener refuses it and queues its answer in the engine; the loop returns
    for it to be sent (Worker._serve takes ``pending``) instead of sleeping to its
    timeout."""
    served = make_datapath("6to4")
    tunnel_sessions(served)
    refused = raw(IP(src=CLIENT4, dst=GW4) / IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4)
                  / UDP(sport=40002, dport=54) / Raw(b"closed"))
    capture.capture_send([refused])
    started = time.monotonic()
    result = capture.serve_capture(served, timeout_ms=20_000)
    assert time.monotonic() - started < 10  # returned for the answer, not at the timeout
    assert (result.left_capture, result.translated_in) == ([], 1)  # taken by the opener
    answer = served.pending().to_tunnel
    assert len(answer) == 1 and answer[0][1] == refused[12:16]  # to the outer source
    unreachable = IPv6(answer[0][0])
    assert unreachable.dst == CLIENT6_6TO4 and unreachable[ICMPv6DestUnreach].code == 4
    assert served.pending().to_tunnel == []


def test_sessions_an_opener_made_are_journaled_within_the_interval(devices: Devices) -> None:
    """The flow table's journal (the shard's copy at the coordinator, workers/journal.py)
    holds the sessions the openers made in the loop: the loop returns within the journal's
    interval for the worker to send them, not at its own timeout."""
    served = nat64()
    served.flows.journal = {}  # kept, as a worker keeps it
    devices.send6([udp6(sport=42000, payload=b"new")])
    started = time.monotonic()
    result = devices.serve(served, timeout_ms=20_000)
    assert time.monotonic() - started < 10  # within the interval, not at the timeout
    assert result.translated_in == 1 and len(served.flows.journal) == 1
