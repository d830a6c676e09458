"""FlowTable as a state machine (hypothesis): any sequence of creates, TCP segments, UDP touches
and clock jumps keeps the table's invariants, and expiry matches a plain model.

Invariants (RFC 6146 §3.1, RFC 6888 REQ-2/4/11): every session is findable from both sides;
one pool address per client address, never shared; per-/64 and global counts equal what is
live and never exceed their limits; only an unassured session is ever evicted to make room
(Linux conntrack's early drop); one timer per session; a session expires exactly when idle
past its current timeout.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import FlowTable, Timeouts
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

POOL = [bytes([100, 64, 0, n]) for n in range(1, 5)]  # 4 pool addresses: exhaustion happens
CLIENTS = [bytes.fromhex(f"2002c6336401{p:04x}") + bytes(7) + bytes([h])
           for p in range(3) for h in (1, 2)]  # 3 /64s, 2 hosts each
GW6 = bytes.fromhex("2002c000020a") + bytes(9) + b"\x01"
TARGET = bytes([127, 0, 0, 1])
TIMEOUTS = Timeouts(tcp_established_s=7440, tcp_transitory_s=240, udp_s=300, icmp_s=60)


class FlowTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable(list(POOL), max_flows=8, max_flows_per_prefix=3,
                               timeouts=TIMEOUTS)
        self.now = 0.0

    @rule(proto=st.sampled_from([PROTO_TCP, PROTO_UDP]), client=st.sampled_from(CLIENTS),
          cport=st.integers(1024, 1030), gwport=st.sampled_from([53, 80]))
    def create(self, proto: int, client: bytes, cport: int, gwport: int) -> None:
        sessions = self.table.sessions()
        before = {id(s) for s in sessions}
        unassured = {id(s) for s in sessions if not s.assured}
        if self.table.lookup_v6(proto, client, cport, GW6, gwport) is not None:
            return
        result = self.table.create(proto, client, cport, GW6, gwport, TARGET, gwport + 8000,
                                   "rule", self.now)
        after = {id(s) for s in self.table.sessions()}
        # Linux conntrack's early drop, RFC 6888 REQ-11: only unassured sessions ever make
        # room, and only when the table or the pool is full.
        assert before - after <= unassured
        if isinstance(result, DropReason):
            prefix_live = sum(1 for s in self.table.sessions() if s.client6[:8] == client[:8])
            assert (result is DropReason.FLOW_LIMIT and len(before) >= 8 and not unassured
                    or result is DropReason.PREFIX_FLOW_LIMIT and prefix_live >= 3
                    or result is DropReason.POOL_EXHAUSTED
                    or result is DropReason.PORT_IN_USE), result
            assert after <= before
        else:
            assert after - before == {id(result)}
            if before - after:
                assert len(before) >= 8 or self.table.pool_in_use() == len(POOL)

    @rule(data=st.data(), flags=st.sampled_from([TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK,
                                                 TCP_RST, TCP_SYN]), from_v6=st.booleans())
    def tcp_segment(self, data: st.DataObject, flags: int, from_v6: bool) -> None:
        tcp = [s for s in self.table.sessions() if s.proto == PROTO_TCP]
        if tcp:
            self.table.touch_tcp(data.draw(st.sampled_from(tcp)), flags, from_v6, self.now)

    @rule(data=st.data())
    def udp_touch(self, data: st.DataObject) -> None:
        udp = [s for s in self.table.sessions() if s.proto == PROTO_UDP]
        if udp:
            self.table.touch_udp(data.draw(st.sampled_from(udp)), data.draw(st.booleans()),
                                 self.now)

    @rule(seconds=st.sampled_from([0.4, 1.0, 29.0, 31.0, 59.0, 239.0, 241.0, 299.0, 301.0,
                                   7441.0]))
    def advance_and_expire(self, seconds: float) -> None:
        self.now += seconds
        # A session's deadline is last_seen + timeout (floats: written the same way as the
        # table, since now - last_seen >= timeout can differ from it by one ulp).
        due = {id(s) for s in self.table.sessions() if s.last_seen + s.timeout_s <= self.now}
        live_before = {id(s) for s in self.table.sessions()}
        removed = self.table.expire(self.now)
        live_after = {id(s) for s in self.table.sessions()}
        # Exactly the sessions idle past their current timeout go, no others.
        assert live_before - live_after == due
        assert removed == len(due)

    @invariant()
    def both_sides_find_every_session(self) -> None:
        for s in self.table.sessions():
            assert self.table.lookup_v6(*s.v6_key()) is s
            assert self.table.lookup_v4(*s.v4_key()) is s

    @invariant()
    def one_pool_address_per_client_never_shared(self) -> None:
        owner: dict[bytes, bytes] = {}
        for s in self.table.sessions():
            assert owner.setdefault(s.pool4, s.client6) == s.client6
        per_client = {}
        for s in self.table.sessions():
            assert per_client.setdefault(s.client6, s.pool4) == s.pool4
        assert self.table.pool_in_use() == len(per_client)

    @invariant()
    def one_timer_per_session_and_unassured_tracked(self) -> None:
        sessions = self.table.sessions()
        assert self.table.timer_entries() == len(sessions)
        assert self.table.unassured() == sum(1 for s in sessions if not s.assured)

    @invariant()
    def limits_hold(self) -> None:
        sessions = self.table.sessions()
        assert len(sessions) == len(self.table) <= 8
        for prefix in {s.client6[:8] for s in sessions}:
            assert sum(1 for s in sessions if s.client6[:8] == prefix) <= 3

    @invariant()
    def per_protocol_counts_match_the_sessions(self) -> None:
        """The counts sixgate_flows_active exports are kept incrementally; they must equal a
        walk over the table after any sequence of creations and expiries."""
        sessions = self.table.sessions()
        for proto in (PROTO_TCP, PROTO_UDP):
            assert self.table.count(proto) == sum(1 for s in sessions if s.proto == proto)
        assert sum(self.table.created_by_proto.values()) == self.table.created_total


TestFlowTableMachine = FlowTableMachine.TestCase
TestFlowTableMachine.settings = settings(max_examples=400, stateful_step_count=30,
                                         deadline=None)
