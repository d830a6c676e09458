"""workers/relay.py bounds (hostile-input issue, finding 5): the descriptor budget follows
max_flows, and a client that reads nothing cannot pin a relayed connection for ever."""

from __future__ import annotations

import asyncio
import resource
import socket

from support.helpers import make_settings

from sixgate.workers import relay
from sixgate.workers.engine.counters import Counters
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP
from sixgate.workers.engine.settings import Forward


def test_descriptor_budget_is_two_per_session_plus_listeners_and_spares() -> None:
    settings = make_settings("6in4", backend="kernel", max_flows=1000, workers=2,
                             forwards=(Forward("tcp", 80, 81, "127.0.0.1", None),))
    assert relay.descriptors_needed(settings) == 2 * 500 + 2 + relay.SPARE_DESCRIPTORS


def test_descriptor_limit_raised_to_what_max_flows_needs() -> None:
    """About a thousand UDP sessions used to hit the default 1024 open files (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    settings = make_settings("6in4", backend="kernel", max_flows=soft + 10_000, workers=1)
    try:
        try:
            got = relay.raise_descriptor_limit(settings)
        except OSError as exc:  # not root and a low hard limit: refused, saying what to do
            assert "lower [gateway] max_flows" in str(exc)
            return
        assert got >= relay.descriptors_needed(settings)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= got
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, max(hard, soft)))


def test_zero_window_client_is_cut_after_the_drain_timeout() -> None:
    """The service sends and sends; the client never reads: the relay's pipe gives up after
    its drain timeout and aborts, instead of waiting for ever."""

    async def scenario() -> float:
        box = relay.Relay.__new__(relay.Relay)
        box.settings = make_settings("6in4")
        box.counters = Counters()
        box.drain_timeout_s = 0.5
        client_side, relay_side = socket.socketpair()
        client_side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        relay_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _r, writer = await asyncio.open_connection(sock=relay_side)
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * (8 << 20))  # the service's endless answer
        session = relay.RelaySession(PROTO_TCP, "2001:db8::1", 1, "2001:db8::2", 80, "r")
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(box._pipe(reader, writer, session, "from_services",
                                         "outbound"), 10)
        elapsed = loop.time() - start
        assert writer.transport.is_closing()
        client_side.close()
        return elapsed

    assert asyncio.run(scenario()) < 5


RULE = Forward("tcp", 80, 80, "127.0.0.1", 8080)
UDP_RULE = Forward("udp", 53, 53, "127.0.0.1", 5353)


def connection(client: str, cport: int = 1000, proto: int = PROTO_TCP) -> relay.RelaySession:
    return relay.RelaySession(proto, client, cport, "2001:db8:1::1",
                              80 if proto == PROTO_TCP else 53, "r")


def test_relay_gives_each_client_one_pool_address_never_loopback() -> None:
    """Issue 13, finding 4: a relayed client reaches the service from a pool address of its
    own (paired pooling, RFC 6888 REQ-2), held while it has sessions, then freed. The table is
    the userspace backend's FlowTable (issue 14)."""
    settings = make_settings("6in4", backend="kernel", workers=2, pool="100.64.0.0/29")
    box = relay.Relay(settings, 1)
    slice_ = {"100.64.0.4", "100.64.0.5", "100.64.0.6"}  # worker 1's half, less broadcast
    assert box.flows.pool_size == len(slice_)
    first, second = connection("2001:db8::1", 1000), connection("2001:db8::1", 1001)
    assert box._admit(first, RULE, 0.0) and box._admit(second, RULE, 0.0)
    assert first.source in slice_ and second.source == first.source  # one source per client
    others = [connection("2001:db8::2"), connection("2001:db8::3")]
    assert all(box._admit(c, RULE, 0.0) for c in others)
    assert {c.source for c in others} | {first.source} == slice_
    fourth = connection("2001:db8::4")
    assert not box._admit(fourth, RULE, 0.0)  # exhausted: every client is assured (TCP)
    box._forget(first)
    assert not box._admit(fourth, RULE, 0.0)  # ::1's second session still holds it
    box._forget(second)
    assert box._admit(fourth, RULE, 0.0) and fourth.source == first.source
    assert box.flows.pool_in_use() == 3
    assert box.counters.as_dict()["drops"]["pool_exhausted"] == 2


def test_relay_refuses_a_client_when_the_pool_is_exhausted_counted() -> None:
    settings = make_settings("6in4", backend="kernel", workers=1, pool="100.64.0.0/30")
    box = relay.Relay(settings, 0)
    sessions = [connection(f"2001:db8::{n}") for n in (1, 2, 3)]
    admitted = [box._admit(s, RULE, 0.0) for s in sessions]
    assert admitted == [True, True, False]
    assert {s.source for s in sessions[:2]} == {"100.64.0.1", "100.64.0.2"}
    assert box.counters.as_dict()["drops"]["pool_exhausted"] == 1
    box._forget(sessions[0])
    assert box._admit(sessions[2], RULE, 0.0)
    assert sessions[2].source == "100.64.0.1"


def test_relay_udp_floods_make_room_by_early_drop_tcp_is_never_evicted() -> None:
    """The relays share the table's limits: unanswered UDP sessions (a spoofed flood) are
    unassured and give way to new clients, and their sockets are closed; relayed TCP
    connections are assured and never evicted."""
    settings = make_settings("6in4", backend="kernel", workers=1, max_flows=3,
                             max_flows_per_prefix=100)
    box = relay.Relay(settings, 0)
    tcp = connection("2001:db8::1")
    flood = [connection(f"2001:db8:{n}::1", 5000, PROTO_UDP) for n in (2, 3)]
    assert box._admit(tcp, RULE, 0.0)
    assert all(box._admit(c, UDP_RULE, 0.0) for c in flood)
    newcomer = connection("2001:db8:9::1", 6000, PROTO_UDP)
    assert box._admit(newcomer, UDP_RULE, 1.0)
    assert box.counters.as_dict()["events"]["flows_evicted"] == 1
    assert flood[0].session is not None and not flood[0].session.alive  # the oldest went
    assert tcp.session is not None and tcp.session.alive
    assert len(box.flows) == 3


def test_relay_sessions_expire_by_the_table_timeouts() -> None:
    """An unanswered UDP session lives unassured_s; a TCP connection tcp_established_s."""
    settings = make_settings("6in4", backend="kernel", workers=1)
    box = relay.Relay(settings, 0)
    udp, tcp = connection("2001:db8::2", 5000, PROTO_UDP), connection("2001:db8::1")
    assert box._admit(udp, UDP_RULE, 0.0) and box._admit(tcp, RULE, 0.0)
    box.expire(settings.timeouts.unassured_s + 1)
    assert udp.session is not None and not udp.session.alive
    assert tcp.session is not None and tcp.session.alive
    box.expire(settings.timeouts.tcp_established_s + 1)
    assert not tcp.session.alive and len(box.flows) == 0
    assert box.counters.as_dict()["events"]["flows_expired"] == 2
