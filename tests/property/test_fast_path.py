"""The per-session fast path (workers/engine/fastpath.py) changes nothing but speed.

Two engines, one with the fast path and one without, get the same random sequence of client
packets, service replies and clock ticks: plain ones (which the fast path translates) mixed
with every kind it must hand to the full path (bad and zero checksums, hop limit / TTL 1,
padding, TCP SYN/FIN/RST, MSS options, IPv4 options, fragments, DF and too big, bad header
checksums). After every step both must have produced the same bytes, the same counters and
the same session states. Packets are built with scapy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw, raw
from support import helpers

from sixgate.workers.engine import datapath as datapath_module
from sixgate.workers.engine.datapath import Datapath, Output
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.fastpath import compiled
from sixgate.workers.engine.packet import PROTO_TCP
from sixgate.workers.engine.settings import worker_pool
from sixgate.workers.engine.tunnel import TunnelPolicy, check_inbound

CLIENT4 = "198.51.100.1"  # the outer IPv4 of CLIENTS[0]
CLIENTS = ("2002:c633:6401::1", "2002:c633:6401::2", "2001:db8:1::1")
MUTATIONS = ("none", "none", "none", "bad_checksum", "zero_checksum", "hop_limit_1", "padding",
             "truncated")
REPLY_MUTATIONS = ("none", "none", "none", "ttl_1", "bad_header_checksum", "ip_options",
                   "more_fragments", "padding", "big", "big_df", "zero_udp_checksum")


# The fast path runs as compiled batch loops (workers/engine/_fastpath.c) when they were
# built, else in Python: every comparison below runs with each.
FLAVOURS = pytest.mark.parametrize("flavour", ["compiled", "python"])


def engines(flavour: str = "python", mode: str = "6to4",
            **overrides: object) -> tuple[Datapath, Datapath]:
    """The same engine twice: with the fast path (``flavour``: "compiled" or "python") and
    without it."""
    if flavour == "compiled":
        helpers.require_compiled(compiled, "workers/engine/_fastpath.c")
    settings = dataclasses.replace(helpers.make_settings(
        "6to4", mtu=1280, compiled_fast_path=flavour == "compiled"), mode=mode, **overrides)
    pool = [] if mode == "nat64" else worker_pool(settings.pool, 1, 0)
    pair = (Datapath(settings, pool, fast_path=True), Datapath(settings, pool, fast_path=False))
    assert (pair[0].compiled is not None) == (flavour == "compiled")
    helpers.MADE.extend(pair)
    return pair


def mutate6(packet: bytes, mutation: str, proto: int) -> bytes:
    data = bytearray(packet)
    csum_at = 40 + {PROTO_TCP: 16, 17: 6, 58: 2}[proto]
    if mutation == "bad_checksum":
        data[csum_at] ^= 0x01
    elif mutation == "zero_checksum":
        data[csum_at:csum_at + 2] = b"\0\0"
    elif mutation == "hop_limit_1":
        data[7] = 1
    elif mutation == "padding":
        data += b"\0\0\0\0"
    elif mutation == "truncated":
        del data[-1]
    return bytes(data)


# A few sessions, so that a script revisits them: (client, protocol, client port, port);
# the last one matches no forward rule.
SESSIONS = ((CLIENTS[0], "udp", 40000, 53), (CLIENTS[1], "udp", 40001, 7001),
            (CLIENTS[2], "udp", 40000, 53), (CLIENTS[0], "tcp", 40000, 80),
            (CLIENTS[1], "tcp", 40001, 8001), (CLIENTS[0], "tcp", 40002, 9999),
            (CLIENTS[0], "echo", 7, 0), (CLIENTS[2], "echo", 9, 0))  # echoes to us

client_packets = st.builds(
    lambda session, flags, options, size, mutation: (*session, flags, options, size, mutation),
    st.sampled_from(SESSIONS), st.sampled_from(["S", "A", "PA", "PA", "PA", "FA", "R", "SA"]),
    st.sampled_from(["none", "none", "timestamp", "mss"]), st.integers(0, 1400),
    st.sampled_from(MUTATIONS))


def client_packet(src: str, proto: str, sport: int, dport: int, flags: str, options: str,
                  size: int, mutation: str, dst: str = helpers.GW6_6TO4) -> bytes:
    payload = Raw((bytes(range(256)) * 6)[:size])
    ip6 = IPv6(src=src, dst=dst, hlim=64, tc=0x28)
    if proto == "udp":
        return mutate6(raw(ip6 / UDP(sport=sport, dport=dport) / payload), mutation, 17)
    if proto == "echo":  # NAT64's query sessions: the identifier is the port (RFC 6146 §3.5.3)
        return mutate6(raw(ip6 / ICMPv6EchoRequest(id=sport, seq=size) / payload), mutation,
                       58)
    opts = {"none": [], "timestamp": [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
            "mss": [("MSS", 1460)]}[options]
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=1, options=opts)
    return mutate6(raw(ip6 / segment / payload), mutation, 6)


def reply_packet(request: bytes, flags: str, size: int, mutation: str) -> bytes:
    req = IP(request)
    payload = Raw(b"r" * (1400 if mutation in ("big", "big_df") else size))
    ip = IP(src=req.dst, dst=req.src, ttl=1 if mutation == "ttl_1" else 64, tos=0x10,
             flags="DF" if mutation == "big_df" else 0,
             options=[b"\x01\x01\x01\x00"] if mutation == "ip_options" else [])
    if TCP in req:
        l4 = TCP(sport=req[TCP].dport, dport=req[TCP].sport, flags=flags, seq=5, ack=1)
    elif ICMP in req:
        l4 = ICMP(type=0, id=req[ICMP].id, seq=req[ICMP].seq)
    else:
        l4 = UDP(sport=req[UDP].dport, dport=req[UDP].sport)
    data = bytearray(raw(ip / l4 / payload))
    if mutation == "bad_header_checksum":
        data[10] ^= 0x01
    elif mutation == "more_fragments":
        data[6] |= 0x20
        data[10:12] = b"\0\0"
        data[10:12] = helpers_checksum(bytes(data[:20]))
    elif mutation == "padding":
        data += b"\0\0"
    elif mutation == "zero_udp_checksum" and UDP in req:
        data[26:28] = b"\0\0"
    return bytes(data)


def record_python_fast_path(patch: pytest.MonkeyPatch, calls: list[str], *,
                            taken_only: bool) -> None:
    """Record in ``calls`` each call the datapath makes of the Python fast path's functions
    (``taken_only``: each that translated its packet)."""
    for name in ("fast_v6_to_v4", "fast_v4_to_v6"):
        real = getattr(datapath_module, name)

        def counting(*args: object, _real: object = real, _name: str = name) -> object:
            out = _real(*args)  # type: ignore[operator]
            if out is not None or not taken_only:
                calls.append(_name)
            return out

        patch.setattr(datapath_module, name, counting)


def assert_written_as_scapy_would(packet: bytes) -> None:
    """scapy, recomputing the lengths and checksums of ``packet`` (IPv4 or IPv6) and of its
    transport header, writes the same bytes: the translation's are right."""
    parsed = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    fresh = parsed.copy()
    if isinstance(fresh, IP):
        del fresh.chksum, fresh.len
    else:
        del fresh.plen
    transport = fresh.payload
    names = {field.name for field in transport.fields_desc}
    delattr(transport, "cksum" if "cksum" in names else "chksum")
    assert raw(type(parsed)(raw(fresh))) == raw(parsed)


def helpers_checksum(header: bytes) -> bytes:
    total = helpers.ref_ones_sum(header)
    return (~total & 0xFFFF).to_bytes(2, "big")


def scripts(client_steps: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    """Scripts of client steps, service replies (to one of the requests so far) and ticks."""
    return st.lists(st.one_of(
        st.tuples(st.just("client"), client_steps),
        st.tuples(st.just("reply"), st.tuples(st.integers(0, 50),
                                              st.sampled_from(["A", "PA", "SA", "FA", "R"]),
                                              st.integers(0, 1300),
                                              st.sampled_from(REPLY_MUTATIONS))),
        st.tuples(st.just("tick"), st.sampled_from([1.0, 30.0, 250.0, 400.0])),
    ), min_size=5, max_size=60)


steps = scripts(client_packets)


def state(dp: Datapath) -> tuple[object, ...]:
    return (dp.counters.as_dict(), sorted(
        (s.v6_key(), s.state, s.last_seen, s.timeout_s) for s in dp.flows.sessions()))


Pair = tuple[Output, Output]


@FLAVOURS
@settings(max_examples=300)
@given(steps)
def test_fast_path_gives_the_full_paths_bytes_counters_and_states(
        flavour: str, script: list[tuple[str, object]]) -> None:
    fast, full = engines(flavour)

    def client(arg: object) -> Pair:
        packet = client_packet(*arg)  # type: ignore[misc]
        outer = helpers.encapsulate(packet, helpers.outer_source("6to4", packet[8:24]))
        return fast.from_tunnel([outer], now_of[0]), full.from_tunnel([outer], now_of[0])

    now_of = [1000.0]
    run_script(fast, full, script, client, now_of)


def run_script(fast: Datapath, full: Datapath, script: list[tuple[str, object]],
               client: Callable[[object], Pair], now_of: list[float]) -> None:
    """Play ``script`` into both engines (``client`` plays a client step); after every step
    both must have returned the same bytes and have the same counters and session states."""
    requests: list[bytes] = []
    for kind, arg in script:
        if kind == "client":
            out_fast, out_full = client(arg)
        elif kind == "reply":
            if not requests:
                continue
            index, flags, size, mutation = arg  # type: ignore[misc]
            packet = reply_packet(requests[index % len(requests)], flags, size, mutation)
            out_fast = fast.from_services([packet], now_of[0])
            out_full = full.from_services([packet], now_of[0])
        else:
            now_of[0] += arg  # type: ignore[operator]
            out_fast, out_full = fast.tick(now_of[0]), full.tick(now_of[0])
        # What the services got: translated requests, and ICMP Fragmentation Needed, which
        # is no request to answer.
        requests.extend(p for p in out_full.to_services
                        if p[9] in (6, 17) or p[9] == 1 and p[20] == 8)  # an echo request
        assert out_fast == out_full, kind
        assert state(fast) == state(full), kind


@FLAVOURS
def test_fast_path_is_taken_for_plain_packets(flavour: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a vacuous comparison: once a session's templates exist (made from its second
    packet each way), plain packets in both directions come from them (the compiled loops take
    them before the Python functions see them), and what they produce is valid (scapy
    recomputes every checksum and length and gets the same bytes)."""
    taken: list[str] = []
    record_python_fast_path(monkeypatch, taken, taken_only=True)
    fast, _full = engines(flavour)
    for proto, flags in (("udp", "A"), ("tcp", "S")):
        first = client_packet(CLIENTS[0], proto, 40000, 53 if proto == "udp" else 80, flags,
                              "none", 10, "none")
        request = fast.from_tunnel([encapsulate(first, CLIENT4, "plain")], 1.0).to_services[-1]
        fast.from_services([reply_packet(request, "SA", 20, "none")], 1.0)
        second = client_packet(CLIENTS[0], proto, 40000, 53 if proto == "udp" else 80, "PA",
                               "timestamp", 333, "none")
        # The client's ACK completes the handshake (a state change: never compiled); it makes
        # the inbound template, the service's next answer the return one.
        fast.from_tunnel([encapsulate(second, CLIENT4, "plain")], 1.5)
        fast.from_services([reply_packet(request, "A", 500, "none")], 1.6)
        taken.clear()
        out_in = fast.from_tunnel([encapsulate(second, CLIENT4, "plain")], 2.0)
        out_back = fast.from_services([reply_packet(request, "PA", 777, "none")], 2.0)
        assert taken == ([] if flavour == "compiled" else ["fast_v6_to_v4", "fast_v4_to_v6"])
        assert len(out_in.to_services) == len(out_back.to_tunnel) == 1, proto
        assert_written_as_scapy_would(out_in.to_services[0])
        assert_written_as_scapy_would(out_back.to_tunnel[0][0])



@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["udp", "tcp"]), st.binary(max_size=1200), st.binary(max_size=1200),
       st.booleans())
def test_the_compiled_loops_verify_any_payloads_checksum(
        proto: str, payload_in: bytes, payload_back: bytes, corrupt: bool) -> None:
    """The compiled loops' ones' complement sum (RFC 1071, summed in 32-bit words) agrees with
    scapy's for any payload: every length and alignment, carries from any bytes. A packet whose
    checksum verifies is translated by the compiled loop (the Python fast path never sees it),
    as scapy would write it; a client's packet whose checksum is off by one bit is not, and is
    dropped as bad_checksum. A sum that rejected a valid packet would only slow it down (the
    Python path takes it), so what is asserted is who took it."""
    fast, _full = engines("compiled")
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:  # a fixture's would outlive the example
        record_python_fast_path(patch, calls, taken_only=False)
        port = 53 if proto == "udp" else 80
        first = client_packet(CLIENTS[0], proto, 40000, port, "S", "none", 10, "none")
        request = fast.from_tunnel([encapsulate(first, CLIENT4, "plain")], 1.0).to_services[-1]
        fast.from_services([reply_packet(request, "SA", 20, "none")], 1.0)
        second = client_packet(CLIENTS[0], proto, 40000, port, "A", "none", 0, "none")
        fast.from_tunnel([encapsulate(second, CLIENT4, "plain")], 1.5)
        fast.from_services([reply_packet(request, "A", 5, "none")], 1.6)
        ip6 = IPv6(src=CLIENTS[0], dst=helpers.GW6_6TO4, hlim=64)
        l4 = (UDP(sport=40000, dport=port) if proto == "udp"
              else TCP(sport=40000, dport=port, flags="PA", seq=1001, ack=6))
        inbound = bytearray(raw(ip6 / l4 / Raw(payload_in)))
        req = IP(request)
        back_l4 = (UDP(sport=req[UDP].dport, dport=req[UDP].sport) if proto == "udp"
                   else TCP(sport=req[TCP].dport, dport=req[TCP].sport, flags="PA", seq=6,
                            ack=1001))
        back = bytearray(raw(IP(src=req.dst, dst=req.src, ttl=64) / back_l4
                             / Raw(payload_back)))
        if corrupt:
            inbound[40 + (6 if proto == "udp" else 16)] ^= 0x01
        bad_before = fast.counters.drops[DropReason.BAD_CHECKSUM]
        calls.clear()
        out_in = fast.from_tunnel([encapsulate(bytes(inbound), CLIENT4, "plain")], 2.0)
        out_back = fast.from_services([bytes(back)], 2.0)
    # The service's answer is taken by the compiled loop and its checksum written from the
    # sum of its bytes (the way back verifies the IPv4 header only).
    assert len(out_back.to_tunnel) == 1
    if corrupt:
        assert set(calls) == {"fast_v6_to_v4"}  # left to Python, which refuses it too
        assert out_in.to_services == []
        assert fast.counters.drops[DropReason.BAD_CHECKSUM] == bad_before + 1
    else:
        assert calls == []  # both taken by the compiled loops
        assert len(out_in.to_services) == 1
        assert_written_as_scapy_would(out_in.to_services[0])
    assert_written_as_scapy_would(out_back.to_tunnel[0][0])

# --- the address-verdict cache of check_inbound ----------------------------------------------

OUTER_SOURCES = ("198.51.100.1", "203.0.113.1", "203.0.113.7", "10.1.2.3")
INNER_SOURCES = (CLIENTS[0], "2002:cb00:7101::1", "2001:db8:1::1", "2002:a01:203::1", "::1")
INNER_DESTINATIONS = (helpers.GW6_6TO4, helpers.GW6_6IN4, "2002:c000:20b::1", "ff02::1")
POLICIES = (TunnelPolicy.build("6to4", helpers.GW4, None, [helpers.GW6_6TO4]),
            TunnelPolicy.build("6in4", helpers.GW4, helpers.REMOTE4, [helpers.GW6_6IN4]))

tunnel_packets = st.builds(
    lambda outer, inner, proto, cut, pad, ihl6: (outer, inner, proto, cut, pad, ihl6),
    st.sampled_from(OUTER_SOURCES), st.tuples(st.sampled_from(INNER_SOURCES),
                                              st.sampled_from(INNER_DESTINATIONS)),
    st.sampled_from(["udp", "tcp", "icmp"]), st.sampled_from([0, 0, 0, 1, 30]),
    st.sampled_from([0, 0, 4]), st.booleans())


def tunnel_packet(outer: str, inner: tuple[str, str], proto: str, cut: int, pad: int,
                  ihl6: bool) -> bytes:
    l4 = {"udp": UDP(sport=1, dport=53), "tcp": TCP(sport=1, dport=80),
          "icmp": IPv6(src="::1")}[proto]  # "icmp": an IPv6 header as payload, next header 41
    data = raw(IP(src=outer, dst=helpers.GW4, proto=41,
                  options=[b"\x01\x01\x01\x00"] if ihl6 else [])
               / IPv6(src=inner[0], dst=inner[1]) / l4)
    data = data[:len(data) - cut] + b"\0" * pad
    return data


@given(st.lists(tunnel_packets, min_size=1, max_size=40), st.sampled_from([0, 1]))
def test_check_inbound_cache_changes_no_verdict(packets: list[tuple[object, ...]],
                                                which: int) -> None:
    policy = POLICIES[which]
    accepted: set[bytes] = set()
    for args in packets:
        data = tunnel_packet(*args)  # type: ignore[arg-type]
        assert check_inbound(data, policy, accepted) == check_inbound(data, policy)


# --- kernel fan-out: Datapath.from_tunnel's one-lookup path ------------------------------------

OUTER = st.sampled_from(["198.51.100.1", "198.51.100.1", "203.0.113.7", "10.9.9.9"])
OUTER_SHAPES = st.sampled_from(["plain", "plain", "plain", "padding", "options"])


def encapsulate(inner: bytes, outer_src: str, shape: str) -> bytes:
    data = raw(IP(src=outer_src, dst=helpers.GW4, proto=41,
                  options=[b"\x01\x01\x01\x00"] if shape == "options" else [])
               / Raw(inner))
    return data + b"\0\0\0\0" if shape == "padding" else data


tunnel_steps = scripts(st.tuples(client_packets, OUTER, OUTER_SHAPES))


@FLAVOURS
@settings(max_examples=300)
@given(tunnel_steps)
def test_from_tunnel_equals_check_inbound_then_full_path(
        flavour: str, script: list[tuple[str, object]]) -> None:
    """The one-lookup path gives exactly what the tunnel checks followed by the full-path
    engine give (an engine without the fast path): bytes, counters, session states."""
    fast, full = engines(flavour)

    def client(arg: object) -> Pair:
        args, outer_src, shape = arg  # type: ignore[misc]
        packet = encapsulate(client_packet(*args), outer_src, shape)
        return fast.from_tunnel([packet], now_of[0]), full.from_tunnel([packet], now_of[0])

    now_of = [1000.0]
    run_script(fast, full, script, client, now_of)


def test_from_tunnel_second_packet_of_a_flow_skips_the_full_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: the third packet of a flow from the same tunnel addresses is translated
    from the one-lookup cache without running check_inbound again; a spoofed outer source
    for the same inner packet is not (the key holds the outer addresses) and is dropped.
    The first packet makes no template (a flow of one packet never pays for one), the second
    makes it and the cache entry."""
    fast, _full = engines()
    first = client_packet(CLIENTS[0], "udp", 40000, 53, "A", "none", 10, "none")
    out = fast.from_tunnel([encapsulate(first, CLIENT4, "plain")], 1.0)
    assert len(out.to_services) == 1 and len(fast._fast_tunnel[17]) == 0
    out = fast.from_tunnel([encapsulate(first, CLIENT4, "plain")], 1.5)
    assert len(out.to_services) == 1 and len(fast._fast_tunnel[17]) == 1

    def must_not_run(*_args: object) -> object:
        raise AssertionError("check_inbound ran for a cached flow")

    monkeypatch.setattr(datapath_module, "check_inbound", must_not_run)
    second = client_packet(CLIENTS[0], "udp", 40000, 53, "A", "none", 20, "none")
    out = fast.from_tunnel([encapsulate(second, CLIENT4, "plain")], 2.0)
    assert len(out.to_services) == 1 and out.raised is None
    monkeypatch.undo()
    before = fast.counters.drops[DropReason.SPOOFED_6TO4]
    out = fast.from_tunnel([encapsulate(second, "203.0.113.7", "plain")], 3.0)
    assert fast.counters.drops[DropReason.SPOOFED_6TO4] == before + 1
    assert out.to_services == []


@FLAVOURS
@settings(max_examples=100)
@given(st.lists(st.one_of(
    st.lists(st.tuples(client_packets, OUTER, OUTER_SHAPES), min_size=1, max_size=12),
    st.sampled_from([1.0, 30.0, 400.0])), min_size=1, max_size=12))
def test_batches_equal_one_packet_at_a_time(flavour: str, script: list[object]) -> None:
    """A batch (the worker's recvmmsg, or its TUN reads) gives what its packets give one by
    one through the full path; the batch's summed counters and ident included. The services
    answer each client batch in one batch."""
    fast, full = engines(flavour)
    now = 1000.0
    for step in script:
        if isinstance(step, float):
            now += step
            assert fast.tick(now) == full.tick(now)
            continue
        batch = [encapsulate(client_packet(*args), outer_src, shape)
                 for args, outer_src, shape in step]  # type: ignore[attr-defined]
        out_fast = fast.from_tunnel(batch, now)
        one_by_one = [full.from_tunnel([packet], now) for packet in batch]
        assert out_fast.to_services == [p for out in one_by_one for p in out.to_services]
        assert out_fast.to_tunnel == [p for out in one_by_one for p in out.to_tunnel]
        replies = [reply_packet(request, "PA", 10 * i, REPLY_MUTATIONS[i % 4])
                   for i, request in enumerate(out_fast.to_services) if request[9] in (6, 17)]
        back_fast = fast.from_services(replies, now)
        back_full = [full.from_services([reply], now) for reply in replies]
        assert back_fast.to_tunnel == [p for out in back_full for p in out.to_tunnel]
        assert back_fast.to_services == [p for out in back_full for p in out.to_services]
        assert state(fast) == state(full)
        assert out_fast.raised is None and back_fast.raised is None


def test_a_packet_that_raises_is_counted_and_the_batch_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine bug on one packet costs that packet only: it is counted as internal_error,
    handed back for the worker to log, and the packets after it in the batch are translated."""
    fast, _full = engines()
    packets = [encapsulate(client_packet(CLIENTS[0], "udp", 40000 + i, 53, "A", "none", 10,
                                         "none"), CLIENT4, "plain") for i in range(3)]
    real = Datapath._from_tunnel_full

    def broken_on_the_second(self: Datapath, packet: bytes, *args: object) -> None:
        if packet == packets[1]:
            raise ValueError("engine bug")
        real(self, packet, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Datapath, "_from_tunnel_full", broken_on_the_second)
    out = fast.from_tunnel(packets, 1.0)
    assert fast.counters.drops[DropReason.INTERNAL_ERROR] == 1
    assert isinstance(out.raised, ValueError)
    assert [IP(p)[UDP].sport for p in out.to_services] == [40000, 40002]
    fast.counters.drops[DropReason.INTERNAL_ERROR] = 0  # provoked: not for the suite's guard


# --- NAT64 (issue 16): IPv6 from this host's side, replies back to it -------------------------

NAT64_SERVER = "198.51.100.53"
NAT64_CLIENTS = ("2001:db8:100::10", "2001:db8:100:1::20")
NAT64_SESSIONS = ((NAT64_CLIENTS[0], "udp", 40000, 53), (NAT64_CLIENTS[1], "udp", 40001, 53),
                  (NAT64_CLIENTS[0], "tcp", 40000, 80), (NAT64_CLIENTS[1], "tcp", 40001, 22),
                  (NAT64_CLIENTS[0], "echo", 7, 0), (NAT64_CLIENTS[1], "echo", 7, 0))


def nat64_client_steps(sessions: tuple[tuple[str, str, int, int], ...]
                       ) -> st.SearchStrategy[list[object]]:
    return scripts(st.builds(
        lambda session, flags, options, size, mutation: (*session, flags, options, size,
                                                         mutation),
        st.sampled_from(sessions), st.sampled_from(["S", "A", "PA", "PA", "PA", "FA", "R"]),
        st.sampled_from(["none", "none", "timestamp", "mss"]), st.integers(0, 1400),
        st.sampled_from(MUTATIONS)))


nat64_steps = nat64_client_steps(NAT64_SESSIONS)
# Echoes alone as well: among the others a script seldom repeats one session often enough.
nat64_echo_steps = nat64_client_steps(NAT64_SESSIONS[4:])


def nat64_engines(flavour: str) -> tuple[Datapath, Datapath]:
    return engines(flavour, "nat64", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
                   addresses=(),
                   prefix="64:ff9b::/96", forwards=(), nat64_prefix="64:ff9b::/96",
                   nat64_clients=("2001:db8:100::/56",), nat64_allow_non_global=True,
                   nat64_pool4=(("203.0.113.5", "tcp", 61001, 65535),
                                ("203.0.113.5", "udp", 61001, 65535),
                                ("203.0.113.5", "icmp", 0, 65535)))


@FLAVOURS
@settings(max_examples=100)
@given(nat64_steps)
def test_nat64_fast_path_gives_the_full_paths_bytes_counters_and_states(
        flavour: str, script: list[tuple[str, object]]) -> None:
    """The same comparison for a NAT64 on this host (``from_ipv6`` in, ``to_ipv6`` back)."""
    nat64_comparison(flavour, script)


@FLAVOURS
@settings(max_examples=100)
@given(nat64_echo_steps)
def test_nat64_echo_fast_path_gives_the_full_paths_bytes_counters_and_states(
        flavour: str, script: list[tuple[str, object]]) -> None:
    """The same for echoes alone (RFC 6146 §3.5.3 query sessions)."""
    nat64_comparison(flavour, script)


def nat64_comparison(flavour: str, script: list[tuple[str, object]]) -> None:
    fast, full = nat64_engines(flavour)

    def client(arg: object) -> Pair:
        packet = client_packet(*arg, dst="64:ff9b::" + NAT64_SERVER)  # type: ignore[misc]
        return fast.from_ipv6([packet], now_of[0]), full.from_ipv6([packet], now_of[0])

    now_of = [1000.0]
    run_script(fast, full, script, client, now_of)


@FLAVOURS
def test_nat64_echo_is_translated_from_its_templates(flavour: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: from a query session's third request (its templates are made from the
    second packet each way), the echo and its reply never reach the full path, and what
    comes out is valid (scapy recomputes every checksum and length and gets the same bytes)."""
    fast, _full = nat64_engines(flavour)
    server6 = "64:ff9b::" + NAT64_SERVER

    def ping(seq: int) -> tuple[Output, Output]:
        request = client_packet(NAT64_CLIENTS[0], "echo", 7, 0, "", "", seq, "none",
                                dst=server6)
        out = fast.from_ipv6([request], 1.0 + seq)
        assert len(out.to_services) == 1, seq
        return out, fast.from_services([reply_packet(out.to_services[0], "", seq, "none")],
                                       1.0 + seq)

    ping(1)
    ping(2)

    def full_path(*_args: object) -> None:
        raise AssertionError("the full path ran for a session with templates")

    monkeypatch.setattr(Datapath, "_nat64_icmp", full_path)
    monkeypatch.setattr(Datapath, "_nat64_echo_reply", full_path)
    out, back = ping(333)
    assert out.raised is None and back.raised is None and len(back.to_ipv6) == 1
    out4 = IP(out.to_services[0])
    assert out4[ICMP].type == 8 and out4[ICMP].seq == 333 and out4.src == "203.0.113.5"
    assert_written_as_scapy_would(out.to_services[0])
    out6 = IPv6(back.to_ipv6[0])
    assert out6[ICMPv6EchoReply].id == 7 and out6.dst == NAT64_CLIENTS[0]
    assert_written_as_scapy_would(back.to_ipv6[0])
    packets = fast.counters.as_dict()["packets"]
    assert packets["to_services/icmp"] == packets["outbound/icmp"] == 3  # type: ignore[index]


def counting_inbound(engine: Datapath) -> list[object]:
    """The start index of each call ``engine`` makes of its compiled inbound loop."""
    real, asked = engine.compiled, []

    class Counting:
        def inbound(self, *args: object) -> object:
            asked.append(args[1])
            return real.inbound(*args)  # type: ignore[union-attr]

    engine.compiled = Counting()  # type: ignore[assignment]
    return asked


def counting_returning(engine: Datapath) -> list[object]:
    """The start index of each call ``engine`` makes of its compiled returning loop."""
    real, asked = engine.compiled, []

    class Counting:
        inbound = real.inbound  # type: ignore[union-attr]

        def returning(self, *args: object) -> object:
            asked.append(args[1])
            return real.returning(*args)  # type: ignore[union-attr]

    engine.compiled = Counting()  # type: ignore[assignment]
    return asked


def test_a_storm_of_new_sessions_is_opened_in_the_compiled_loop() -> None:
    """A batch of SYNs, each a new session, is taken in one call of the compiled loop: the
    engine opens each session (``Datapath._opened``) and the loop translates its SYN (issue
    21: flow setup), with what the engine without a fast path gives, bytes and counters."""
    fast, full = nat64_engines("compiled")
    asked = counting_inbound(fast)
    batch = [client_packet(NAT64_CLIENTS[0], "tcp", 20000 + i, 80, "S", "mss", 0, "none",
                           dst="64:ff9b::" + NAT64_SERVER) for i in range(64)]
    assert fast.from_ipv6(batch, 1.0) == full.from_ipv6(batch, 1.0)
    assert state(fast) == state(full)
    assert len(fast.flows) == 64
    assert asked == [0], asked


def test_a_storm_the_compiled_loop_leaves_asks_it_seldom() -> None:
    """A batch of packets the compiled loop leaves to Python (ACKs of no session, each
    refused) asks it again after 1, 2, 4, ... packets through Python, not before each."""
    fast, full = nat64_engines("compiled")
    asked = counting_inbound(fast)
    batch = [client_packet(NAT64_CLIENTS[0], "tcp", 20000 + i, 80, "A", "none", 0, "none",
                           dst="64:ff9b::" + NAT64_SERVER) for i in range(64)]
    assert fast.from_ipv6(batch, 1.0) == full.from_ipv6(batch, 1.0)
    assert asked == [0, 2, 6, 14, 30, 62], asked


# New sessions' first packets: the packets the compiled loop hands to the engine to open a
# session and then translates itself (``Datapath._opened``), and packets like them it must
# leave to the full path (a refused port, a flag that opens nothing, a mutation, a client
# the NAT64 does not serve, a destination it may not represent).
opening_packets = st.lists(st.tuples(
    st.integers(0, 3), st.sampled_from(["tcp", "tcp", "udp"]), st.integers(1024, 1100),
    st.sampled_from([53, 80, 80, 7001, 8001, 9999]),
    st.sampled_from(["S", "S", "S", "SA", "SF", "SR", "A"]),
    st.sampled_from(["none", "timestamp", "mss", "mss"]), st.integers(0, 1400),
    st.sampled_from(MUTATIONS)), min_size=1, max_size=24)
NAT64_OPENING_CLIENTS = (*NAT64_CLIENTS, "2001:db8:100::11", "2001:db8:200::30")  # last: not
NAT64_TARGETS = (NAT64_SERVER, "10.1.2.3")  # the second: not global (RFC 6052 §3.1)


def assert_opened_alike(fast: Datapath, full: Datapath, feed: str,
                        packets: list[bytes]) -> None:
    """The batch through both engines, then one packet at a time again (each a session by
    now, or refused again): the same bytes, counters and sessions."""
    assert getattr(fast, feed)(packets, 5.0) == getattr(full, feed)(packets, 5.0)
    assert state(fast) == state(full)
    for packet in packets:
        assert getattr(fast, feed)([packet], 6.0) == getattr(full, feed)([packet], 6.0)
    assert state(fast) == state(full)


@settings(max_examples=150)
@given(opening_packets)
def test_new_sessions_open_in_the_compiled_loop_as_in_the_full_path(
        packets: list[tuple[int, str, int, int, str, str, int, str]]) -> None:
    """6to4: each client's first packet takes the full path (its tunnel checks, whose verdict
    the opener then needs); every new session after it opens in the compiled loop."""
    fast, full = engines("compiled")
    asked = []
    opened = fast._opened

    def opening(*args: object) -> object:
        asked.append(args)
        return opened(*args)  # type: ignore[arg-type]

    fast._opened = opening  # type: ignore[method-assign]
    def tunnelled(packet: bytes) -> bytes:
        return helpers.encapsulate(packet, helpers.outer_source("6to4", packet[8:24]))

    batch = [tunnelled(client_packet(CLIENTS[client % len(CLIENTS)], proto, sport, dport, flags,
                                     options, size, mutation))
             for client, proto, sport, dport, flags, options, size, mutation in packets]
    primers = [tunnelled(client_packet(src, "udp", 1, 53, "", "none", 0, "none"))
               for src in CLIENTS]
    assert_opened_alike(fast, full, "from_tunnel", primers)
    assert_opened_alike(fast, full, "from_tunnel", batch)
    if any(flags == "S" and mutation == "none" and dport in (53, 80, 7001, 8001)
           for _c, _p, _s, dport, flags, _o, _z, mutation in packets):
        assert asked  # not vacuous: the compiled loop opened sessions


@pytest.mark.parametrize("allow_non_global", [True, False])
@settings(max_examples=100)
@given(packets=opening_packets)
def test_nat64_new_sessions_open_in_the_compiled_loop_as_in_the_full_path(
        allow_non_global: bool, packets: list[tuple[int, str, int, int, str, str, int, str]]
        ) -> None:
    fast, full = nat64_engines("compiled")
    for engine in (fast, full):
        engine.settings = dataclasses.replace(engine.settings,
                                              nat64_allow_non_global=allow_non_global)
    batch = [client_packet(NAT64_OPENING_CLIENTS[client], proto, sport, dport, flags, options,
                           size, mutation, dst="64:ff9b::" + NAT64_TARGETS[sport % 2])
             for client, proto, sport, dport, flags, options, size, mutation in packets]
    assert_opened_alike(fast, full, "from_ipv6", batch)


def service_answer(request: bytes, flags: str, options: str, size: int,
                   mutation: str) -> bytes:
    """The service's answer to a translated ``request`` (``reply_packet``'s, with TCP
    options: a SYN+ACK's MSS is lowered on the way back too)."""
    answer = IP(reply_packet(request, flags, size, mutation))
    if TCP in answer and options != "none":
        answer[TCP].options = [("MSS", 1460)] if options == "mss" else [
            ("NOP", None), ("NOP", None), ("Timestamp", (5, 6))]
        del answer[TCP].chksum, answer[TCP].dataofs, answer.len, answer.chksum
    data = raw(answer)
    return data if mutation != "bad_header_checksum" else reply_packet(request, flags, size,
                                                                       mutation)


@settings(max_examples=150)
@given(opening_packets, st.lists(st.tuples(
    st.integers(0, 50), st.sampled_from(["SA", "SA", "SA", "A", "PA", "R", "FA"]),
    st.sampled_from(["none", "timestamp", "mss", "mss", "mss"]), st.integers(0, 1400),
    st.sampled_from(REPLY_MUTATIONS)), min_size=1, max_size=24))
def test_first_answers_return_in_the_compiled_loop_as_in_the_full_path(
        packets: list[tuple[int, str, int, int, str, str, int, str]],
        answers: list[tuple[int, str, str, int, str]]) -> None:
    """The services' answers to new sessions (none assured yet: no return template) are
    translated by the compiled loop with the session the engine moves
    (``Datapath._returned``): the same bytes, counters and states as the full path."""
    fast, full = engines("compiled")
    batch = [helpers.encapsulate(packet, helpers.outer_source("6to4", packet[8:24]))
             for packet in (client_packet(CLIENTS[client % len(CLIENTS)], proto, sport, dport,
                                          flags, options, size, "none")
                            for client, proto, sport, dport, flags, options, size, _m in packets)]
    requests = [p for p in full.from_tunnel(batch, 5.0).to_services if p[9] in (6, 17)]
    fast.from_tunnel(batch, 5.0)
    if not requests:
        return
    replies = [service_answer(requests[index % len(requests)], flags, options, size, mutation)
               for index, flags, options, size, mutation in answers]
    assert fast.from_services(replies, 6.0) == full.from_services(replies, 6.0)
    assert state(fast) == state(full)
    for reply in replies:  # again, one at a time: assured sessions take the full path's way
        assert fast.from_services([reply], 7.0) == full.from_services([reply], 7.0)
    assert state(fast) == state(full)


def test_a_syn_ack_returns_in_the_compiled_loop() -> None:
    """Not vacuous: a batch of SYN+ACKs of new sessions, the MSS of each lowered to the
    tunnel's, is translated in one call of the compiled loop, as the full path does."""
    fast, full = engines("compiled")
    asked = counting_returning(fast)
    syns = [helpers.encapsulate(syn, helpers.outer_source("6to4", syn[8:24])) for syn in (
        client_packet(CLIENTS[0], "tcp", 20000 + i, 80, "S", "mss", 0, "none")
        for i in range(16))]
    requests = full.from_tunnel(syns, 5.0).to_services
    assert fast.from_tunnel(syns, 5.0).to_services == requests and len(requests) == 16
    answers = [service_answer(request, "SA", "mss", 0, "none") for request in requests]
    back = fast.from_services(answers, 6.0)
    assert back == full.from_services(answers, 6.0)
    assert state(fast) == state(full)
    assert asked == [0] and len(back.to_tunnel) == 16
    assert IPv6(back.to_tunnel[0][0])[TCP].options == [("MSS", fast.max_mss)]


@FLAVOURS
@settings(max_examples=100)
@given(scripts(st.tuples(st.builds(
    lambda session, size, mutation: (*session, "", "", size, mutation),
    st.sampled_from(SESSIONS[-2:]), st.integers(0, 1400), st.sampled_from(MUTATIONS)),
    OUTER, OUTER_SHAPES)))
def test_echoes_to_us_under_a_tight_echo_limit(flavour: str,
                                               script: list[tuple[str, object]]) -> None:
    """Echo requests to the gateway alone, through the tunnel (answered from templates keyed
    by the outer and inner addresses), with an echo limit of one a second and a burst of two:
    the same replies, counters and drops (icmp_rate_limited) as the full path."""
    fast, full = engines(flavour, echo_replies_per_s=1.0, echo_burst=2)

    def client(arg: object) -> Pair:
        args, outer_src, shape = arg  # type: ignore[misc]
        packet = encapsulate(client_packet(*args), outer_src, shape)
        return fast.from_tunnel([packet], now_of[0]), full.from_tunnel([packet], now_of[0])

    now_of = [1000.0]
    run_script(fast, full, script, client, now_of)


@FLAVOURS
def test_echoes_to_us_are_answered_from_their_template(
        flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: after one echo request to us answered through the full path, the next
    from the same tunnel and inner addresses never reaches it, and its reply is what the
    full path's icmp.echo_reply makes (scapy recomputes its checksum and gets the same)."""
    fast, full = engines(flavour)

    def request(seq: int) -> bytes:
        packet = client_packet(CLIENTS[0], "echo", 7, 0, "", "", seq, "none")
        return encapsulate(packet, CLIENT4, "plain")

    first = fast.from_tunnel([request(1)], 1.0)
    assert len(first.to_tunnel) == 1 and len(fast._fast_echo) == 1

    def full_path(*_args: object) -> None:
        raise AssertionError("the full path ran for an echo with a template")

    expected = full.from_tunnel([request(333)], 2.0).to_tunnel
    monkeypatch.setattr(Datapath, "_from_tunnel_full", full_path)
    out = fast.from_tunnel([request(333)], 2.0)
    assert out.raised is None and out.to_tunnel == expected
    reply = IPv6(out.to_tunnel[0][0])
    assert reply[ICMPv6EchoReply].id == 7 and reply[ICMPv6EchoReply].seq == 333
    fresh = reply.copy()
    del fresh.payload.cksum
    assert raw(IPv6(raw(fresh))) == raw(reply)
    assert fast.counters.as_dict()["packets"]["outbound/icmp"] == 2  # type: ignore[index]
