"""workers/engine/flows.py: RFC 6146 bindings and sessions, the §3.5.2.2 TCP states, the §4
timeouts with a fake clock, RFC 6888 limits (REQ-4, REQ-11) and pool reuse (REQ-2, REQ-8).
"""

from __future__ import annotations

import pytest
from support.helpers import FakeClock, packed4, packed6

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import (
    ESTABLISHED,
    TRANS,
    UDP_OPEN,
    V4_FIN,
    V4_SYN_RCV,
    V6_FIN,
    V6_INIT,
    V6_V4_FIN,
    FlowTable,
    Session,
    Timeouts,
    UnassuredQueue,
)
from sixgate.workers.engine.packet import PROTO_ICMPV6, PROTO_TCP, PROTO_UDP

GW6 = packed6("2002:c000:20a::1")
SVC = packed4("127.0.0.1")
POOL = [packed4(f"100.64.0.{i}") for i in range(1, 5)]
T = Timeouts()

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def client(n: int = 1, prefix: str = "2001:db8:1:1") -> bytes:
    return packed6(f"{prefix}::{n:x}")


def table(pool: list[bytes] | None = None, max_flows: int = 100,
          per_prefix: int = 100) -> FlowTable:
    return FlowTable(list(pool or POOL), max_flows, per_prefix, T)


def new(ft: FlowTable, proto: int = PROTO_TCP, c: bytes | None = None, cport: int = 40000,
        gwport: int = 80, tport: int = 8080, now: float = 0.0, assured: bool = True,
        outer4: bytes = b"") -> Session:
    """A session; ``assured``: its handshake completed (TCP) or the service answered (UDP)."""
    s = ft.create(proto, c or client(), cport, GW6, gwport, SVC, tport, "rule", now, outer4)
    assert isinstance(s, Session), s
    if assured:
        if proto == PROTO_TCP:
            ft.touch_tcp(s, SYN | ACK, False, now)
            ft.touch_tcp(s, ACK, True, now)
        else:
            ft.touch_udp(s, False, now)
    assert s.assured == assured
    return s


# --- bindings ---------------------------------------------------------------------------------

def test_rfc6146_3_1_session_found_from_both_sides() -> None:
    ft = table()
    s = new(ft)
    assert ft.lookup_v6(PROTO_TCP, client(), 40000, GW6, 80) is s
    assert ft.lookup_v4(PROTO_TCP, POOL[0], 40000, SVC, 8080) is s
    assert ft.lookup_v4(PROTO_UDP, POOL[0], 40000, SVC, 8080) is None
    assert ft.lookup_v6(PROTO_TCP, client(), 40001, GW6, 80) is None
    assert (s.pool4, s.pport, s.target4, s.tport, s.state) == (POOL[0], 40000, SVC, 8080,
                                                               ESTABLISHED)
    assert len(ft) == 1 and ft.count(PROTO_TCP) == 1 and ft.count(PROTO_UDP) == 0


def test_rfc6888_req2_one_pool_address_per_client() -> None:
    ft = table()
    a1 = new(ft, c=client(1), cport=1000)
    a2 = new(ft, PROTO_UDP, c=client(1), cport=2000, gwport=53, tport=5353)
    b1 = new(ft, c=client(2), cport=1000)
    assert a1.pool4 == a2.pool4 == POOL[0]
    assert b1.pool4 == POOL[1]
    assert ft.pool_in_use() == 2


def test_rfc6146_3_1_ipv4_transport_address_in_one_entry_only() -> None:
    # Same client port to the same target via two gateway addresses: the IPv4 side would be
    # identical, so the second is refused rather than shadowing the first.
    ft = table()
    first = new(ft)
    second = ft.create(PROTO_TCP, client(), 40000, packed6("2002:c000:20a::2"), 80, SVC, 8080,
                       "rule", 0.0)
    assert second is DropReason.PORT_IN_USE
    assert ft.lookup_v4(PROTO_TCP, POOL[0], 40000, SVC, 8080) is first
    assert len(ft) == 1


def test_rfc6888_req11_pool_exhausted_for_new_client_only() -> None:
    # Both sessions assured: nothing may be evicted to make room.
    ft = table(pool=POOL[:1])
    new(ft, c=client(1))
    assert ft.create(PROTO_TCP, client(2), 1, GW6, 80, SVC, 8080, "r", 0.0) is (
        DropReason.POOL_EXHAUSTED)
    # the bound client still opens more sessions
    new(ft, c=client(1), cport=2)
    assert len(ft) == 2


def test_a_new_client_gets_an_address_of_its_fan_out_shard() -> None:
    """[gateway] shards: a worker's pool is its shards' slices; a new client's address comes
    from the slice of its packet's shard (so the shard can move with its sessions), a shard
    that is not this worker's takes the first one's, one shard's exhaustion is its own (no
    address of another shard is lent), and a freed address goes back to its own shard."""
    pools = {1: POOL[:2], 3: POOL[2:3]}
    ft = FlowTable(pools, 100, 100, T, shard_of=lambda a: 1 if a in POOL[:2] else 3)
    first = ft.create(PROTO_UDP, client(1), 1, GW6, 53, SVC, 53, "r", 0.0, shard=3)
    assert isinstance(first, Session) and first.pool4 == POOL[2]
    ft.touch_udp(first, False, 0.0)  # assured: not evicted for room
    assert ft.create(PROTO_UDP, client(2), 1, GW6, 53, SVC, 53, "r", 0.0, shard=3) is (
        DropReason.POOL_EXHAUSTED)
    stray = ft.create(PROTO_UDP, client(3), 1, GW6, 53, SVC, 53, "r", 0.0, shard=7)
    assert isinstance(stray, Session) and stray.pool4 == POOL[0]
    ft.close(first)
    again = ft.create(PROTO_UDP, client(2), 1, GW6, 53, SVC, 53, "r", 0.0, shard=3)
    assert isinstance(again, Session) and again.pool4 == POOL[2]
    assert ft.pool_size == 3


@pytest.mark.parametrize(("proto", "state", "timeout"), [
    (PROTO_TCP, V6_INIT, T.unassured_s),
    (PROTO_UDP, UDP_OPEN, T.unassured_s),
    (PROTO_ICMPV6, UDP_OPEN, T.unassured_s),
])
def test_rfc6146_3_5_new_session_is_unassured_with_short_timeout(proto: int, state: str,
                                                                 timeout: float) -> None:
    s = new(table(), proto, assured=False)
    assert (s.state, s.timeout_s, s.assured) == (state, timeout, False)


@pytest.mark.parametrize(("proto", "timeout"), [
    (PROTO_TCP, T.tcp_established_s), (PROTO_UDP, T.udp_s), (PROTO_ICMPV6, T.icmp_s)])
def test_rfc6146_4_assured_session_gets_its_protocol_timeout(proto: int,
                                                             timeout: float) -> None:
    s = new(table(), proto)
    assert (s.timeout_s, s.assured) == (timeout, True)


def test_rfc6146_4_default_timeouts() -> None:
    # RFC 5382 REQ-5: established >= 2 h 4 min; transitory >= 4 min; RFC 4787: UDP 5 min;
    # unassured as Linux conntrack's unreplied UDP (30 s).
    assert (T.tcp_established_s, T.tcp_transitory_s, T.udp_s, T.icmp_s, T.unassured_s) == (
        7440.0, 240.0, 300.0, 60.0, 30.0)


# --- assured and unassured (Linux conntrack IPS_ASSURED, early drop) --------------------------

def test_syn_answered_by_service_is_not_assured_until_client_acks() -> None:
    ft = table()
    s = new(ft, assured=False)
    ft.touch_tcp(s, SYN | ACK, False, 1.0)
    assert (s.state, s.assured, s.timeout_s) == (V4_SYN_RCV, False, T.unassured_s)
    ft.touch_tcp(s, SYN, True, 2.0)  # a retransmitted SYN is not the third packet
    assert (s.state, s.assured) == (V4_SYN_RCV, False)
    ft.touch_tcp(s, ACK, True, 3.0)
    assert (s.state, s.assured, s.timeout_s) == (ESTABLISHED, True, T.tcp_established_s)


def test_half_open_session_expires_after_the_unassured_timeout() -> None:
    ft = table()
    s = new(ft, assured=False, now=0.0)
    ft.touch_tcp(s, SYN | ACK, False, 0.0)  # the service answered; the client never acks
    assert ft.expire(T.unassured_s - 0.5) == 0
    assert ft.expire(T.unassured_s) == 1
    assert ft.pool_in_use() == 0


def test_udp_answered_by_service_is_assured() -> None:
    ft = table()
    s = new(ft, PROTO_UDP, assured=False)
    ft.touch_udp(s, True, 1.0)  # more from the client: still unanswered
    assert not s.assured
    ft.touch_udp(s, False, 2.0)
    assert (s.assured, s.timeout_s) == (True, T.udp_s)


def test_full_table_evicts_the_oldest_unassured_session_first() -> None:
    ft = table(max_flows=3)
    kept = new(ft, c=client(1), cport=1)
    old = new(ft, c=client(2), cport=2, assured=False, now=1.0)
    young = new(ft, c=client(3), cport=3, assured=False, now=2.0)
    fresh = ft.create(PROTO_TCP, client(4), 4, GW6, 80, SVC, 8080, "r", 3.0)
    assert isinstance(fresh, Session)
    assert ft.sessions() == [kept, young, fresh]
    assert not old.alive and ft.evicted_total == 1
    assert ft.lookup_v4(*old.v4_key()) is None


def test_early_drop_takes_the_oldest_unassured_past_assured_and_removed_ones() -> None:
    """The unassured queue keeps an assured or removed session's entry until it reaches the
    front (UnassuredQueue): eviction skips them, and the queue stays bounded by the live
    unassured sessions however many come and go."""
    ft = table(max_flows=3, per_prefix=10_000)
    first = new(ft, c=client(1), cport=1, assured=False)
    second = new(ft, c=client(2), cport=2, assured=False, now=1.0)
    third = new(ft, c=client(3), cport=3, assured=False, now=2.0)
    ft.touch_tcp(first, SYN | ACK, False, 2.0)
    ft.touch_tcp(first, ACK, True, 2.0)  # assured: out of the queue
    ft.close(second)
    assert ft.unassured() == 1
    fourth = new(ft, c=client(4), cport=4, assured=False, now=3.0)
    fifth = new(ft, c=client(5), cport=5, assured=False, now=4.0)  # full: third goes
    assert not third.alive and fourth.alive and fifth.alive and first.alive
    assert ft.unassured() == 2 and ft.evicted_total == 1
    big = table(max_flows=100_000, pool=POOL[:1], per_prefix=100_000)
    for port in range(1, 5001):
        new(big, c=client(7), cport=port, now=5.0)  # each assured at once
    assert big.unassured() == 0
    assert len(big._unassured.queue) <= UnassuredQueue.COMPACT_SLACK


def test_the_sessions_of_one_second_share_its_slot_number() -> None:
    """Issue 21, memory: a timer slot's number is one int object, not one per session."""
    ft = table()
    sessions = [new(ft, c=client(1), cport=port, now=1000.25) for port in (1, 2, 3)]
    assert sessions[0].slot == int(1000.25 + T.unassured_s)  # placed when made
    assert sessions[1].slot is sessions[0].slot and sessions[2].slot is sessions[0].slot


def test_full_pool_evicts_a_client_that_holds_only_unassured_sessions() -> None:
    ft = table(pool=POOL[:2])
    a = new(ft, c=client(1), cport=1)  # assured: keeps its address
    b = new(ft, PROTO_UDP, c=client(2), cport=2, assured=False)
    b2 = new(ft, c=client(2), cport=3, assured=False)
    fresh = ft.create(PROTO_TCP, client(3), 4, GW6, 80, SVC, 8080, "r", 1.0)
    assert isinstance(fresh, Session) and fresh.pool4 == b.pool4
    assert ft.sessions() == [a, fresh]
    assert not b.alive and not b2.alive and ft.evicted_total == 2


def test_full_pool_never_evicts_a_client_with_an_assured_session() -> None:
    ft = table(pool=POOL[:1])
    a = new(ft, c=client(1), cport=1)
    half = new(ft, c=client(1), cport=2, assured=False)
    assert ft.create(PROTO_TCP, client(2), 3, GW6, 80, SVC, 8080, "r", 1.0) is (
        DropReason.POOL_EXHAUSTED)
    assert ft.sessions() == [a, half]


def test_rfc6888_req4_per_48_limit() -> None:
    ft = table(per_prefix=100)
    ft.max_flows_per_48 = 2
    new(ft, c=client(1, "2001:db8:1:1"), cport=1)
    new(ft, c=client(1, "2001:db8:1:2"), cport=2)
    assert ft.create(PROTO_TCP, client(1, "2001:db8:1:3"), 3, GW6, 80, SVC, 8080, "r",
                     0.0) is DropReason.PREFIX_FLOW_LIMIT
    new(ft, c=client(1, "2001:db8:2:1"), cport=4)  # another /48


def test_rfc6888_req4_per_outer_ipv4_source_limit() -> None:
    ft = table()
    ft.max_flows_per_ipv4_source = 2
    relay, other = b"\xcb\x00\x71\x01", b"\xcb\x00\x71\x02"
    new(ft, c=client(1, "2001:db8:1:1"), outer4=relay)
    new(ft, c=client(1, "2001:db8:2:1"), outer4=relay)
    assert ft.create(PROTO_TCP, client(1, "2001:db8:3:1"), 1, GW6, 80, SVC, 8080, "r", 0.0,
                     relay) is DropReason.SOURCE_FLOW_LIMIT
    new(ft, c=client(1, "2001:db8:3:1"), outer4=other)
    new(ft, c=client(1, "2001:db8:4:1"))  # b"": not counted (6in4)
    assert ft.expire(T.tcp_established_s) == 4
    new(ft, c=client(1, "2001:db8:5:1"), outer4=relay, now=T.tcp_established_s)


def test_for_shard_splits_the_spread_limits_and_keeps_the_64_exact() -> None:
    ft = FlowTable.for_shard(list(POOL), 4, 10, 7, T, max_flows_per_48=9,
                             max_flows_per_ipv4_source=None)
    assert (ft.max_flows, ft.max_flows_per_prefix, ft.max_flows_per_48,
            ft.max_flows_per_ipv4_source) == (3, 7, 3, None)


def test_one_timer_per_session_whatever_the_traffic() -> None:
    """100k RST/ACK pairs leave the timer wheel holding the one session once."""
    ft = table()
    s = new(ft)
    now = 0.0
    for _ in range(100_000):
        now += 0.01
        ft.touch_tcp(s, RST, True, now)
        ft.touch_tcp(s, ACK, True, now)
    assert ft.timer_entries() == 1
    assert sum(1 for _ in ft._slots) <= 3  # slots of sessions that moved, not one per packet
    assert ft.expire(now + T.tcp_established_s) == 1
    assert ft.timer_entries() == 0


# --- limits (RFC 6888 REQ-4, REQ-11) ----------------------------------------------------------

def test_rfc6888_req4_global_limit_never_evicts_an_assured_session() -> None:
    ft = table(max_flows=3)
    sessions = [new(ft, c=client(i), cport=i) for i in range(1, 4)]
    assert ft.create(PROTO_TCP, client(9), 9, GW6, 80, SVC, 8080, "r", 0.0) is (
        DropReason.FLOW_LIMIT)
    assert ft.sessions() == sessions
    for s in sessions:
        assert ft.lookup_v6(PROTO_TCP, s.client6, s.cport, GW6, 80) is s


def test_rfc6888_req4_per_64_limit_never_evicts() -> None:
    ft = table(per_prefix=2)
    a = new(ft, c=client(1), cport=1)
    b = new(ft, c=client(2), cport=2)
    # a third client of the same /64 is refused ...
    assert ft.create(PROTO_TCP, client(3), 3, GW6, 80, SVC, 8080, "r", 0.0) is (
        DropReason.PREFIX_FLOW_LIMIT)
    # ... so is a second flow of a client already there
    assert ft.create(PROTO_UDP, client(1), 4, GW6, 53, SVC, 53, "r", 0.0) is (
        DropReason.PREFIX_FLOW_LIMIT)
    # a neighbouring /64 of the same /48 is counted apart
    new(ft, c=client(1, "2001:db8:1:2"), cport=5)
    assert ft.sessions()[:2] == [a, b]


def test_rfc6888_req4_per_64_limit_frees_on_expiry() -> None:
    ft = table(per_prefix=1)
    new(ft, PROTO_UDP, c=client(1), now=0.0)
    assert ft.create(PROTO_UDP, client(2), 1, GW6, 53, SVC, 53, "r", 1.0) is (
        DropReason.PREFIX_FLOW_LIMIT)
    assert ft.expire(T.udp_s) == 1
    new(ft, PROTO_UDP, c=client(2), now=T.udp_s)


def test_rfc6888_req4_global_limit_checked_before_prefix_limit() -> None:
    ft = table(max_flows=1, per_prefix=1)
    new(ft)
    assert ft.create(PROTO_TCP, client(2), 2, GW6, 80, SVC, 8080, "r", 0.0) is (
        DropReason.FLOW_LIMIT)


# --- pool reuse (RFC 6888 REQ-8) --------------------------------------------------------------

def test_rfc6888_req8_pool_address_per_client_reused_last() -> None:
    ft = table(pool=POOL[:3])
    new(ft, PROTO_UDP, c=client(1), now=0.0)  # .1
    new(ft, PROTO_UDP, c=client(2), now=100.0)  # .2
    assert ft.expire(T.udp_s) == 1  # client 1 gone: .1 goes to the back (.3, .1)
    c3 = new(ft, PROTO_UDP, c=client(3), now=T.udp_s)
    c4 = new(ft, PROTO_UDP, c=client(4), now=T.udp_s)
    assert (c3.pool4, c4.pool4) == (POOL[2], POOL[0])
    assert ft.pool_in_use() == 3


def test_rfc6888_req2_client_keeps_pool_address_while_any_session_lives() -> None:
    ft = table(pool=POOL[:2])
    new(ft, PROTO_UDP, c=client(1), cport=1, now=0.0)
    new(ft, PROTO_TCP, c=client(1), cport=2, now=0.0, assured=False)  # unassured 30 s
    ft.expire(T.unassured_s)  # the TCP one goes, the UDP one keeps .1
    assert len(ft) == 1 and ft.pool_in_use() == 1
    again = new(ft, PROTO_TCP, c=client(1), cport=3, now=T.unassured_s)
    assert again.pool4 == POOL[0]


# --- TCP states (RFC 6146 §3.5.2.2) -----------------------------------------------------------

U = T.unassured_s
TCP_TRANSITIONS = [
    # (state, flags, from_v6, new state, new timeout)
    (V6_INIT, SYN, True, V6_INIT, U),  # retransmitted SYN
    (V6_INIT, SYN | ACK, False, V4_SYN_RCV, U),  # the service answered: not yet assured
    (V6_INIT, ACK, False, V6_INIT, U),
    (V6_INIT, RST, False, TRANS, U),  # never above the unassured lifetime
    (V4_SYN_RCV, ACK, True, ESTABLISHED, T.tcp_established_s),  # the third packet: assured
    (V4_SYN_RCV, SYN, True, V4_SYN_RCV, U),
    (V4_SYN_RCV, SYN | ACK, False, V4_SYN_RCV, U),
    (ESTABLISHED, ACK, True, ESTABLISHED, T.tcp_established_s),
    (ESTABLISHED, FIN | ACK, True, V6_FIN, T.tcp_established_s),
    (ESTABLISHED, FIN | ACK, False, V4_FIN, T.tcp_established_s),
    (V6_FIN, FIN | ACK, False, V6_V4_FIN, T.tcp_transitory_s),
    (V6_FIN, FIN | ACK, True, V6_FIN, T.tcp_established_s),
    (V4_FIN, FIN | ACK, True, V6_V4_FIN, T.tcp_transitory_s),
    (V4_FIN, ACK, True, V4_FIN, T.tcp_established_s),
    (ESTABLISHED, RST, True, TRANS, T.tcp_transitory_s),
    (ESTABLISHED, RST | ACK, False, TRANS, T.tcp_transitory_s),
    (TRANS, ACK, True, ESTABLISHED, T.tcp_established_s),
    (TRANS, RST, True, TRANS, T.tcp_transitory_s),
    ("unassured_trans", ACK, True, V6_INIT, U),  # back to waiting for the handshake
]


def _session_in(ft: FlowTable, state: str) -> Session:
    s = new(ft, assured=False)
    handshake = [(SYN | ACK, False), (ACK, True)]
    path = {V6_INIT: [], V4_SYN_RCV: [(SYN | ACK, False)], ESTABLISHED: handshake,
            V6_FIN: handshake + [(FIN, True)], V4_FIN: handshake + [(FIN, False)],
            TRANS: handshake + [(RST, True)], "unassured_trans": [(RST, True)]}[state]
    for flags, from_v6 in path:
        ft.touch_tcp(s, flags, from_v6, 1.0)
    assert s.state == state.removeprefix("unassured_")
    return s


@pytest.mark.parametrize(("state", "flags", "from_v6", "after", "timeout"), TCP_TRANSITIONS)
def test_rfc6146_3_5_2_2_tcp_state_table(state: str, flags: int, from_v6: bool, after: str,
                                         timeout: float) -> None:
    ft = table()
    s = _session_in(ft, state)
    ft.touch_tcp(s, flags, from_v6, 2.0)
    assert (s.state, s.timeout_s, s.last_seen) == (after, timeout, 2.0)


# --- expiry with a fake clock (RFC 6146 §4) ---------------------------------------------------

def test_rfc6146_tcp_established_timeout() -> None:
    clock = FakeClock(0.0)
    ft = table()
    s = new(ft, now=clock.now)
    ft.touch_tcp(s, SYN | ACK, False, clock.advance(1.0))
    assert ft.expire(clock.advance(T.tcp_transitory_s + 10)) == 0  # not the SYN timeout
    assert ft.expire(1.0 + T.tcp_established_s - 0.001) == 0
    assert ft.expire(1.0 + T.tcp_established_s) == 1
    assert len(ft) == 0 and ft.pool_in_use() == 0 and ft.expired_total == 1


def test_rfc6146_tcp_established_timeout_restarts_on_traffic() -> None:
    ft = table()
    s = new(ft, now=0.0)
    ft.touch_tcp(s, SYN | ACK, False, 0.0)
    ft.touch_tcp(s, ACK, True, 5000.0)
    assert ft.expire(T.tcp_established_s + 1) == 0
    assert ft.expire(5000.0 + T.tcp_established_s) == 1


def test_unassured_timeout_without_answer() -> None:
    ft = table()
    new(ft, now=10.0, assured=False)  # a SYN nobody answers
    assert ft.expire(10.0 + T.unassured_s - 0.5) == 0
    assert ft.expire(10.0 + T.unassured_s) == 1


def test_rfc6146_tcp_both_fins_transitory_timeout() -> None:
    ft = table()
    s = new(ft, now=0.0)
    ft.touch_tcp(s, SYN | ACK, False, 1.0)
    ft.touch_tcp(s, FIN | ACK, True, 20.0)
    ft.touch_tcp(s, FIN | ACK, False, 21.0)
    assert s.state == V6_V4_FIN
    assert ft.expire(21.0 + T.tcp_transitory_s - 0.5) == 0
    assert ft.expire(21.0 + T.tcp_transitory_s) == 1


def test_rfc6146_tcp_rst_shortens_lifetime_to_transitory() -> None:
    ft = table()
    s = new(ft, now=0.0)
    ft.touch_tcp(s, SYN | ACK, False, 1.0)
    assert ft.expire(300.0) == 0  # pops the SYN deadline, reschedules at 7441
    ft.touch_tcp(s, RST, True, 400.0)
    assert s.state == TRANS
    assert ft.expire(400.0 + T.tcp_transitory_s) == 1


def test_rfc6146_udp_timeout() -> None:
    ft = table()
    s = new(ft, PROTO_UDP, now=0.0, gwport=53, tport=5353)
    ft.touch(s, 100.0)
    assert ft.expire(T.udp_s + 50) == 0
    assert ft.expire(100.0 + T.udp_s) == 1


def test_rfc6146_expire_budget_bounds_work_per_call() -> None:
    ft = table()
    for i in range(5):
        new(ft, PROTO_UDP, cport=1000 + i, gwport=53, tport=5353, now=0.0)
    assert ft.expire(T.udp_s, budget=2) == 2
    assert ft.expire(T.udp_s, budget=2) == 2
    assert ft.expire(T.udp_s, budget=2) == 1
    assert len(ft) == 0


def test_snapshot_is_plain_data() -> None:
    ft = table()
    new(ft, now=3.0, assured=False)
    (row,) = ft.snapshot()
    assert row == {
        "proto": PROTO_TCP, "client6": client().hex(), "cport": 40000, "pport": 40000,
        "gw6": GW6.hex(),
        "gwport": 80, "pool4": POOL[0].hex(), "target4": SVC.hex(), "tport": 8080,
        "rule": "rule", "state": V6_INIT, "last_seen": 3.0, "timeout_s": T.unassured_s,
        "assured": False, "outer4": "",
    }


def test_tcp_state_unknown_to_the_table_is_ended_not_guessed() -> None:
    """Issue 14: an unknown state/event pair is handled explicitly: the session goes to TRANS
    with the transitory lifetime, as after a RST, whatever the segment."""
    ft = table()
    s = _session_in(ft, ESTABLISHED)
    s.state = "no_such_state"
    ft.touch_tcp(s, ACK, True, 2.0)
    assert (s.state, s.timeout_s) == (TRANS, T.tcp_transitory_s)


def test_tcp_transition_table_names_only_known_states() -> None:
    from sixgate.workers.engine.flows import TCP_TRANSITIONS

    states = set(TCP_TRANSITIONS) | {TRANS}
    assert {V6_INIT, V4_SYN_RCV, ESTABLISHED, V6_FIN, V4_FIN, V6_V4_FIN} <= states
    for rows in TCP_TRANSITIONS.values():
        for _side, _must, _must_not, after, _effect in rows:
            assert after in states
