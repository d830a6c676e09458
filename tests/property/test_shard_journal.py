"""The shard journal (issue 17): whatever a worker's table went through (new sessions of
NAT64 and forward rules, TCP segments both ways, closes, expiry), the sessions it journaled,
applied in order to a copy the way the coordinator keeps it, resume in a fresh table of the
same shard as they were: same sessions, states, assurance and timeouts, the same bindings and
pool4 ports in use, the same pool addresses and quotas. Records that are malformed or do not
fit the shard are refused, never raised on.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sixgate.workers.engine.flows import (
    NAT64_RULE,
    FlowTable,
    PortPool,
    Timeouts,
    pack_session,
    session_record,
    unpack_record,
)
from sixgate.workers.engine.packet import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from sixgate.workers.journal import ShardCopy, decode, encode

POOL4 = bytes([203, 0, 113, 5])
FORWARD_POOL = [bytes([100, 64, 0, n]) for n in range(1, 4)]
PORTS = (61000, 61007)
CLIENTS = [bytes.fromhex(f"20010db80100{p:04x}") + bytes(7) + bytes([h])
           for p in range(3) for h in (1, 2)]
TARGETS = [bytes([198, 51, 100, n]) for n in (7, 53)]
GW6 = bytes.fromhex("0064ff9b") + bytes(8)
FLAGS = [TCP_SYN, TCP_SYN | TCP_ACK, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST]


def new_table() -> FlowTable:
    ports = PortPool({PROTO_TCP: [(POOL4, *PORTS)], PROTO_UDP: [(POOL4, *PORTS)]}, 30.0)
    return FlowTable(list(FORWARD_POOL), max_flows=64, max_flows_per_prefix=64,
                     timeouts=Timeouts(), ports=ports, port_quota=4)


def state_of(table: FlowTable) -> dict[str, object]:
    """What must survive a restart, in comparable form."""
    ports = table.ports
    assert ports is not None
    return {
        "sessions": sorted(json.dumps(session_record(s)) for s in table.sessions()),
        "bindings": sorted((b.proto, b.client6, b.cport, b.pool4, b.pport, b.sessions,
                            tuple(sorted(b.remotes.items()))) for b in table.bindings()),
        "ports": ports.usage(),
        "pool_in_use": table.pool_in_use(),
        "unassured": table.unassured(),
        "active": {proto: n for proto, n in table.active_by_proto.items() if n},
        "quota": dict(table._ports_per_client),
    }


class JournaledTable(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = new_table()
        self.table.journal = {}
        self.now = 0.0
        self.copy = ShardCopy(1, 1000)  # the coordinator's

    def flush(self) -> None:
        """What the worker sends and the coordinator applies: removals, then upserts."""
        records, removed = self.table.take_journal()
        assert self.copy.apply(encode(0, records, removed, self.table.take_held())) == 0

    @rule(proto=st.sampled_from([PROTO_TCP, PROTO_UDP]), client=st.sampled_from(CLIENTS),
          cport=st.integers(1024, 1027), dest=st.sampled_from(TARGETS),
          tport=st.sampled_from([53, 80]), nat64=st.booleans())
    def open(self, proto: int, client: bytes, cport: int, dest: bytes, tport: int,
             nat64: bool) -> None:
        gw6 = GW6 + dest if nat64 else bytes(15) + b"\x01"
        if self.table.lookup_v6(proto, client, cport, gw6, tport) is None:
            self.table.create(proto, client, cport, gw6, tport, dest, tport,
                              NAT64_RULE if nat64 else "tcp/80", self.now)

    @rule(index=st.integers(0, 63), flags=st.sampled_from(FLAGS), from_v6=st.booleans())
    def segment(self, index: int, flags: int, from_v6: bool) -> None:
        sessions = self.table.sessions()
        if sessions:
            session = sessions[index % len(sessions)]
            if session.proto == PROTO_TCP:
                self.table.touch_tcp(session, flags, from_v6, self.now)
            else:
                self.table.touch_udp(session, from_v6, self.now)

    @rule(index=st.integers(0, 63))
    def close(self, index: int) -> None:
        sessions = self.table.sessions()
        if sessions:
            self.table.close(sessions[index % len(sessions)])

    @rule(seconds=st.sampled_from([1.0, 31.0, 250.0]))
    def wait(self, seconds: float) -> None:
        self.now += seconds
        self.table.expire(self.now)

    @rule()
    def journal_flush(self) -> None:
        self.flush()

    @invariant()
    def a_restart_now_resumes_the_same_shard(self) -> None:
        self.flush()
        fresh = new_table()
        # The shard file a restarted worker reads: JSON records.
        records = json.loads(json.dumps(self.copy.records(0)))
        assert self.copy.refused == 0
        resumed, refused = fresh.restore(records, self.now)
        assert (resumed, refused) == (len(self.table), 0)
        assert state_of(fresh) == state_of(self.table)


TestJournaledTable = JournaledTable.TestCase
TestJournaledTable.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


@given(st.lists(st.one_of(
    st.none(), st.integers(), st.text(max_size=8),
    st.lists(st.one_of(st.integers(-2, 70000), st.text(max_size=40), st.booleans(),
                       st.floats(allow_nan=True), st.none()), min_size=0, max_size=16)),
    max_size=20))
@settings(max_examples=300, deadline=None)
def test_malformed_records_are_refused_never_raised(records: list[object]) -> None:
    table = new_table()
    resumed, refused = table.restore(records, 5.0)
    assert resumed + refused == len(records)
    assert len(table) == resumed


def test_a_record_from_another_shard_is_refused() -> None:
    """A pool address or pool4 port that is not this worker's is never taken."""
    source = new_table()
    source.journal = {}
    source.create(PROTO_UDP, CLIENTS[0], 1024, GW6 + TARGETS[0], 53, TARGETS[0], 53,
                  NAT64_RULE, 0.0)
    source.create(PROTO_UDP, CLIENTS[1], 1024, bytes(15) + b"\x01", 53, TARGETS[0], 53,
                  "udp/53", 0.0)
    records, _ = source.take_journal()
    other = FlowTable([bytes([100, 64, 1, 1])], max_flows=64, max_flows_per_prefix=64,
                      timeouts=Timeouts(),
                      ports=PortPool({PROTO_UDP: [(POOL4, 62000, 62010)]}, 30.0))
    assert other.restore(json.loads(json.dumps([unpack_record(r) for r in records])),
                         1.0) == (0, 2)
    assert len(other) == 0 and other.pool_in_use() == 0
    assert all(used == 0 for *_rest, used in other.ports.usage())  # type: ignore[union-attr]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_a_malformed_journal_message_is_refused_never_raised(junk: bytes) -> None:
    """The coordinator's copy takes whatever a worker sends: a message that does not decode
    is refused whole; a record that is not one is refused alone."""
    copy = ShardCopy(2, 10)
    assert copy.apply(junk) in (None, 0, 1)
    for record in copy.records(0) + copy.records(1):  # what it kept unpacks, or is left out
        assert isinstance(record, list) and len(record) == 14


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_journal_message_cut_or_changed_anywhere_never_raises(data: st.DataObject) -> None:
    table = new_table()
    table.journal = {}
    for port in range(1024, 1027):
        table.create(PROTO_UDP, CLIENTS[0], port, GW6 + TARGETS[0], 53, TARGETS[0], 53,
                     NAT64_RULE, 0.0)
    records, removed = table.take_journal()
    message = bytearray(encode(1, records, removed, [(PROTO_UDP, POOL4, 61001)]))
    assert decode(bytes(message))[1] == records
    at = data.draw(st.integers(0, len(message) - 1))
    if data.draw(st.booleans()):
        del message[at:]
    else:
        message[at] ^= data.draw(st.integers(1, 255))
    copy = ShardCopy(2, 10)
    if copy.apply(bytes(message)) == 1:
        for record in copy.records(1):  # what unpacks is a record a worker can check
            assert isinstance(record, list) and len(record) == 14


def test_a_packed_session_unpacks_to_its_json_record() -> None:
    table = new_table()
    table.create(PROTO_UDP, CLIENTS[0], 1024, GW6 + TARGETS[0], 53, TARGETS[0], 53,
                 NAT64_RULE, 0.0)
    table.create(PROTO_TCP, CLIENTS[1], 1024, bytes(15) + b"\x01", 80, TARGETS[0], 80,
                 "tcp/80", 0.0, outer4=bytes([192, 0, 2, 1]))
    for session in table.sessions():
        assert unpack_record(pack_session(session)) == session_record(session)
