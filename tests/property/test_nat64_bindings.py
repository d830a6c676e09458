"""NAT64 bindings as a state machine (hypothesis): any sequence of new sessions (NAT64 and a
tunnel's forward rules side by side), closes and clock jumps keeps RFC 6146's and RFC 6888's
promises.

Invariants: a client transport address has one pool4 transport address whatever the
destination (endpoint-independent mapping, RFC 4787 REQ-1); a pool4 transport address names one
client transport address (RFC 6146 §3.1); a port keeps its range and, where one is free, its
parity (RFC 6146 §3.5.1.1); a client /64 never holds more than its quota (RFC 6888 REQ-4); ports
in use equal the live bindings; a freed port is not handed out again within the hold time
(REQ-8); the forward rules' sessions keep their paired pool and port (port preservation).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import NAT64_RULE, FlowTable, PortPool, Timeouts
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP

POOL4 = bytes([203, 0, 113, 5])
FORWARD_POOL = [bytes([100, 64, 0, n]) for n in range(1, 4)]
PORTS = (61000, 61003)  # 4 ports per protocol: exhaustion and reuse happen
QUOTA = 2
HOLD_S = 30.0
CLIENTS = [bytes.fromhex(f"20010db80100{p:04x}") + bytes(7) + bytes([h])
           for p in range(3) for h in (1, 2)]  # 3 /64s, 2 hosts each
TARGETS = [bytes([198, 51, 100, n]) for n in (7, 53)]
GW6 = bytes.fromhex("0064ff9b") + bytes(8)


class Nat64Bindings(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        ports = PortPool({PROTO_TCP: [(POOL4, *PORTS)], PROTO_UDP: [(POOL4, *PORTS)]}, HOLD_S)
        self.table = FlowTable(list(FORWARD_POOL), max_flows=64, max_flows_per_prefix=64,
                               timeouts=Timeouts(), ports=ports, port_quota=QUOTA)
        self.now = 0.0
        self.mapped: dict[tuple[int, bytes, int], tuple[bytes, int]] = {}  # ever seen
        self.freed_at: dict[tuple[int, int], float] = {}  # (proto, port) -> when freed

    @rule(proto=st.sampled_from([PROTO_TCP, PROTO_UDP]), client=st.sampled_from(CLIENTS),
          cport=st.integers(1024, 1029), dest=st.sampled_from(TARGETS),
          tport=st.sampled_from([53, 80]), nat64=st.booleans())
    def open(self, proto: int, client: bytes, cport: int, dest: bytes, tport: int,
             nat64: bool) -> None:
        gw6 = GW6 + dest if nat64 else bytes(15) + b"\x01"
        if self.table.lookup_v6(proto, client, cport, gw6, tport) is not None:
            return  # the datapath looks a session up before it makes one
        before = {(s.proto, s.pport) for s in self.table.sessions() if s.rule == NAT64_RULE}
        made = self.table.create(proto, client, cport, gw6, tport, dest, tport,
                                 NAT64_RULE if nat64 else "tcp/80 -> 127.0.0.1", self.now)
        if isinstance(made, DropReason):
            return
        if not nat64:
            assert made.pool4 in FORWARD_POOL and made.pport == cport  # port preservation
            return
        assert made.pool4 == POOL4 and PORTS[0] <= made.pport <= PORTS[1]
        key = (proto, client, cport)
        if (proto, made.pport) not in before:
            # A newly bound port: never one freed less than the hold time ago.
            freed = self.freed_at.get((proto, made.pport))
            assert freed is None or self.now - freed >= HOLD_S
        self.mapped[key] = (made.pool4, made.pport)

    @rule(index=st.integers(0, 63))
    def close(self, index: int) -> None:
        sessions = self.table.sessions()
        if not sessions:
            return
        session = sessions[index % len(sessions)]
        live_before = {(s.proto, s.pport) for s in sessions if s.rule == NAT64_RULE}
        self.table.close(session)
        live_after = {(s.proto, s.pport) for s in self.table.sessions()
                      if s.rule == NAT64_RULE}
        for freed in live_before - live_after:
            self.freed_at[freed] = self.now

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        live_before = {(s.proto, s.pport) for s in self.table.sessions() if s.rule == NAT64_RULE}
        self.table.expire(self.now)
        live_after = {(s.proto, s.pport) for s in self.table.sessions()
                      if s.rule == NAT64_RULE}
        for freed in live_before - live_after:
            self.freed_at[freed] = self.now

    @invariant()
    def endpoint_independent_and_one_to_one(self) -> None:
        by_client: dict[tuple[int, bytes, int], tuple[bytes, int]] = {}
        by_pool: dict[tuple[int, bytes, int], tuple[bytes, int]] = {}
        for s in self.table.sessions():
            if s.rule != NAT64_RULE:
                continue
            mapped = (s.pool4, s.pport)
            assert by_client.setdefault((s.proto, s.client6, s.cport), mapped) == mapped
            client = (s.client6, s.cport)
            assert by_pool.setdefault((s.proto, s.pool4, s.pport), client) == client
        ports = self.table.ports
        assert ports is not None
        in_use = {proto: used for proto, _address, _size, used in ports.usage()}
        for proto in (PROTO_TCP, PROTO_UDP):
            assert in_use[proto] == sum(1 for key in by_client if key[0] == proto)

    @invariant()
    def quota_per_slash64(self) -> None:
        per_64: dict[bytes, set[tuple[int, bytes, int]]] = {}
        for s in self.table.sessions():
            if s.rule == NAT64_RULE:
                per_64.setdefault(s.client6[:8], set()).add((s.proto, s.client6, s.cport))
        assert all(len(bindings) <= QUOTA for bindings in per_64.values())

    @invariant()
    def parity_kept_while_the_pool_has_that_parity(self) -> None:
        # With 2 ports of each parity per protocol and a quota of 2 per /64 over 3 /64s, a
        # mismatch may happen only when that parity ran out: checked at allocation by the
        # pool; here: every port is inside the configured range.
        for s in self.table.sessions():
            if s.rule == NAT64_RULE:
                assert PORTS[0] <= s.pport <= PORTS[1]


TestNat64Bindings = Nat64Bindings.TestCase
TestNat64Bindings.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_port_pool_prefers_the_clients_range_and_parity() -> None:
    """RFC 6146 §3.5.1.1: same range and parity first, then the other parity, then the other
    range."""
    pool = PortPool({PROTO_UDP: [(POOL4, 1022, 1025)]}, 0.0)
    assert pool.allocate(PROTO_UDP, 5000, None) == (POOL4, 1024)  # high, even
    assert pool.allocate(PROTO_UDP, 5000, None) == (POOL4, 1025)  # high, odd: parity gone
    assert pool.allocate(PROTO_UDP, 7, None) == (POOL4, 1023)  # low range, odd
    assert pool.allocate(PROTO_UDP, 7, None) == (POOL4, 1022)
    assert pool.allocate(PROTO_UDP, 7, None) is None
