"""workers/relay.py bounds (hostile-input issue, finding 5): the descriptor budget follows
max_flows, and a client that reads nothing cannot pin a relayed connection for ever."""

from __future__ import annotations

import asyncio
import resource
import socket

from support.helpers import make_settings

from sixgate.workers import relay
from sixgate.workers.engine.counters import Counters
from sixgate.workers.engine.packet import PROTO_TCP
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
        session = relay.RelaySession(PROTO_TCP, "2001:db8::1", 1, "2001:db8::2", 80, "r", 0.0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(box._pipe(reader, writer, session, "from_services",
                                         "outbound"), 10)
        elapsed = loop.time() - start
        assert writer.transport.is_closing()
        client_side.close()
        return elapsed

    assert asyncio.run(scenario()) < 5


def test_relay_gives_each_client_one_pool_address_never_loopback() -> None:
    """Issue 13, finding 4: a relayed client reaches the service from a pool address of its
    own (paired pooling, RFC 6888 REQ-2), held while it has sessions, then freed."""
    settings = make_settings("6in4", backend="kernel", workers=2, pool="100.64.0.0/29")
    box = relay.Relay(settings, 1)
    slice_ = {"100.64.0.4", "100.64.0.5", "100.64.0.6"}  # worker 1's half, less broadcast
    assert box.pool.size == len(slice_)
    first = box.pool.acquire("2001:db8::1")
    assert first in slice_
    assert box.pool.acquire("2001:db8::1") == first  # a second session: the same source
    others = {box.pool.acquire("2001:db8::2"), box.pool.acquire("2001:db8::3")}
    assert others | {first} == slice_
    assert box.pool.acquire("2001:db8::4") is None  # exhausted
    box.pool.release("2001:db8::1")
    assert box.pool.acquire("2001:db8::4") is None  # still one session of ::1 holds it
    box.pool.release("2001:db8::1")
    assert box.pool.acquire("2001:db8::4") == first
    assert box.pool.in_use() == 3


def test_relay_refuses_a_client_when_the_pool_is_exhausted_counted() -> None:
    settings = make_settings("6in4", backend="kernel", workers=1, pool="100.64.0.0/30")
    box = relay.Relay(settings, 0)
    sessions = [relay.RelaySession(PROTO_TCP, f"2001:db8::{n}", 1000, "2001:db8:1::1", 80,
                                   "r", 0.0) for n in (1, 2, 3)]
    admitted = [box._admit((PROTO_TCP, s.client, s.cport, s.gateway, s.gwport), s)
                for s in sessions]
    assert admitted == [True, True, False]
    assert {s.source for s in sessions[:2]} == {"100.64.0.1", "100.64.0.2"}
    assert box.counters.as_dict()["drops"]["pool_exhausted"] == 1
    box._forget((PROTO_TCP, "2001:db8::1", 1000, "2001:db8:1::1", 80))
    assert box._admit((PROTO_TCP, "2001:db8::3", 1000, "2001:db8:1::1", 80), sessions[2])
    assert sessions[2].source == "100.64.0.1"
