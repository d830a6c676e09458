"""The flow table of one worker shard: RFC 6146-style bindings and sessions.

An IPv6 client (address, port) is bound to an IPv4 pool (address, port) the services see.
Each client address gets one pool address of this worker's slice ("paired" pooling, RFC 6888
REQ-2) and keeps its own source port (port preservation), so a pool (address, port) names
exactly one client (address, port) (RFC 6146 §3.1). Sessions (one per client transport address
and forward rule target) carry the RFC 6146 §3.5.2.2 TCP state and the §4 timeouts.

Assured and unassured sessions (the Linux conntrack model, ``IPS_ASSURED``): a TCP session is
assured only when the client acknowledges the service's SYN-ACK (the third packet of the
handshake), a UDP session when the service answered. Until then it lives ``unassured_s`` (a
SYN flood from spoofed sources never completes a handshake) and is the first to go when the
table or the pool is full (conntrack's early drop); an assured session is never evicted to
make room (RFC 6888 REQ-11).

Limits (RFC 6888 REQ-4/REQ-5): a table size and counts per source /64, per source /48 and per
outer IPv4 source (the 6to4 relay or router the packet came from); hitting one refuses the new
flow. A freed pool address goes to the back of the free queue, so it is reused as late as
possible (RFC 6888 REQ-8).

Expiry: one timer per session. A session sits in exactly one one-second slot of a timer wheel;
traffic only moves its ``last_seen``, and a slot that comes due moves each session it holds to
its real deadline or removes it. Memory is one slot entry per session whatever the traffic.

Pure: ``now`` is a monotonic float passed in; no I/O. State is plain data (``snapshot``) so a
restarted worker can later resume its shard.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.packet import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)

try:  # workers/engine/_fastpath.c, when the build had a compiler
    from sixgate.workers.engine._fastpath import untrack
except ImportError:  # pragma: no cover - a host without a compiler collects them as well
    def untrack(_object: object, /) -> None:
        """Without the compiled module the collector keeps walking them (slower, the same)."""

# TCP states of RFC 6146 §3.5.2.2 (CLOSED is "no session"), plus V4_SYN_RCV: the service
# answered the client's SYN and the client's ACK is awaited (conntrack's SYN_RECV).
V6_INIT = "v6_init"
V4_INIT = "v4_init"  # NAT64: an IPv4 host's SYN to a binding, the client's SYN awaited
V4_SYN_RCV = "v4_syn_rcv"
ESTABLISHED = "established"
V6_FIN = "v6_fin"
V4_FIN = "v4_fin"
V6_V4_FIN = "v6_v4_fin"
TRANS = "trans"
UDP_OPEN = "open"

# RFC 6146 §3.5.2.2 as a transition table (h11's style). Per state, the rows
# (from the IPv6 side?, a flag that must be set, flags that must be clear, next state, effect);
# the first matching row wins, no match leaves the session as it is. Two rules that do not fit
# a table sit beside it in ``FlowTable.touch_tcp``: a RST in any state, and any other segment
# in TRANS. A state missing here is handled explicitly there (never a guess).
KEEP, ASSURE, TRANSITORY = 0, 1, 2
TCP_TRANSITIONS: dict[str, tuple[tuple[bool, int, int, str, int], ...]] = {
    # The service's SYN(+ACK): the handshake is under way, not yet assured.
    V6_INIT: ((False, TCP_SYN, 0, V4_SYN_RCV, KEEP),),
    # RFC 6146 §3.5.2.2: the client's SYN answers an IPv4-initiated one (simultaneous open).
    V4_INIT: ((True, TCP_SYN, 0, ESTABLISHED, ASSURE),),
    # The client's ACK of it (the third packet) completes the handshake: assured, as
    # conntrack assures on the third packet.
    V4_SYN_RCV: ((True, TCP_ACK, TCP_SYN, ESTABLISHED, ASSURE),),
    ESTABLISHED: ((True, TCP_FIN, 0, V6_FIN, KEEP), (False, TCP_FIN, 0, V4_FIN, KEEP)),
    V6_FIN: ((False, TCP_FIN, 0, V6_V4_FIN, TRANSITORY),),
    V4_FIN: ((True, TCP_FIN, 0, V6_V4_FIN, TRANSITORY),),
    V6_V4_FIN: (),
}
# The flags any row of a state looks at: a segment with none of them (an ACK in ESTABLISHED,
# nearly every segment) changes nothing, found with one AND.
_TCP_RELEVANT = {state: sum({row[1] for row in rows}) for state, rows in TCP_TRANSITIONS.items()}


# The rule label of NAT64 sessions: their pool4 transport address comes from a PortPool
# (the forward rules' from the paired pool, port preserved). ``sixgate flows`` shows it.
NAT64_RULE = "nat64"

# Unassured sessions a pool-exhausted create looks at before giving up (bounded work per
# packet, as conntrack's early_drop scans a bounded number of entries).
EVICT_SCAN = 64

Key = tuple[int, bytes, int, bytes, int]


@dataclass(frozen=True)
class Timeouts:
    """RFC 6146 §4 constants; RFC 5382 REQ-5 asks for at least 2 h 4 min established.

    ``unassured_s``: a session that has not yet seen the client complete the TCP handshake, or
    a UDP answer from the service (Linux: ``nf_conntrack_udp_timeout`` 30 s unreplied,
    ``nf_conntrack_tcp_timeout_syn_recv`` 60 s)."""

    tcp_established_s: float = 7440.0
    tcp_transitory_s: float = 240.0
    udp_s: float = 300.0
    icmp_s: float = 60.0
    unassured_s: float = 30.0


class Session:
    """One live session; attributes are plain values for speed (STYLE.md: hot path)."""

    __slots__ = ("proto", "client6", "cport", "gw6", "gwport", "pool4", "target4", "tport",
                 "rule", "state", "last_seen", "timeout_s", "alive",
                 "assured", "outer4", "slot", "pport")

    def __init__(self, proto: int, client6: bytes, cport: int, gw6: bytes, gwport: int,
                 pool4: bytes, target4: bytes, tport: int, rule: str, state: str,
                 now: float, timeout_s: float, outer4: bytes = b"", pport: int = -1) -> None:
        self.proto = proto
        self.client6 = client6
        self.cport = cport
        self.gw6 = gw6
        self.gwport = gwport
        self.pool4 = pool4
        self.target4 = target4
        self.tport = tport
        self.rule = rule
        self.state = state
        self.last_seen = now
        self.timeout_s = timeout_s
        self.alive = True  # False once the table removed it (caches drop it when they see it)
        self.assured = False
        self.outer4 = outer4  # outer IPv4 source it was opened from (b"": not counted)
        self.slot = -1  # the timer wheel slot it sits in
        # The pool port: the client's own (port preservation) unless a PortPool allocated one
        # (NAT64, RFC 6146 §3.5.1.1).
        self.pport = cport if pport < 0 else pport
        # Never in a reference cycle: out of the collector's lists, whose full collections
        # walk every tracked object (a million sessions: a pause of about 0.5 s).
        untrack(self)

    def v6_key(self) -> Key:
        return (self.proto, self.client6, self.cport, self.gw6, self.gwport)

    def v4_key(self) -> Key:
        return (self.proto, self.pool4, self.pport, self.target4, self.tport)


class UnassuredQueue:
    """The live unassured sessions, oldest first (conntrack's early drop takes the oldest).

    A deque of 8 bytes a session where an OrderedDict took ~100 (issue 21: memory). A session
    leaves it when assured or removed (``discard``, which only counts: a session is in the
    queue exactly while it is alive and not assured); the deque keeps its entry until it
    comes to the front or the deque is compacted, which happens once it holds more than
    twice the live count (plus COMPACT_SLACK): O(1) per session amortised."""

    COMPACT_SLACK = 64
    __slots__ = ("queue", "count")

    def __init__(self) -> None:
        self.queue: deque[Session] = deque()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, session: Session) -> None:
        self.queue.append(session)
        self.count += 1

    @staticmethod
    def _queued(session: Session) -> bool:
        return session.alive and not session.assured

    def discard(self) -> None:
        """One session of the queue was assured or removed."""
        self.count -= 1
        if len(self.queue) > 2 * self.count + self.COMPACT_SLACK:
            self.queue = deque(filter(self._queued, self.queue))

    def oldest(self) -> Session | None:
        queue = self.queue
        while queue:
            if self._queued(queue[0]):
                return queue[0]
            queue.popleft()
        return None

    def first(self, count: int) -> list[Session]:
        """The ``count`` oldest (fewer if there are fewer)."""
        return list(islice(filter(self._queued, self.queue), count))


class _Binding:
    """A client address's pool address and how many of its sessions live / are assured; its
    address object, which every session of the client shares (issue 21: memory)."""

    __slots__ = ("pool4", "sessions", "assured", "client6")

    def __init__(self, pool4: bytes, client6: bytes) -> None:
        self.pool4 = pool4
        self.sessions = 0
        self.assured = 0
        self.client6 = client6
        untrack(self)  # as a Session


# The two port ranges of RFC 6146 §3.5.1.1: a binding keeps the range of the client's port.
WELL_KNOWN_PORTS = 1024


class PortPool:
    """One worker's slice of the NAT64 pool4 (RFC 6146 §3.5.1, Jool's pool4): per protocol,
    (address, first port, last port) ranges; a port leaves with the range (0-1023 or
    1024-65535) and parity of the client's port where one is free (RFC 6146 §3.5.1.1, RFC
    4787 REQ-4), from the address the client already uses (paired, RFC 6888 REQ-2). A freed
    port is held ``hold_s`` before it is handed out again, and then goes to the back of the
    queue (RFC 6888 REQ-8)."""

    def __init__(self, ranges: dict[int, list[tuple[bytes, int, int]]], hold_s: float) -> None:
        self.hold_s = hold_s
        # proto -> address -> four queues: (well-known?, parity) -> free ports, oldest first.
        self._free: dict[int, dict[bytes, list[deque[int]]]] = {}
        self.size: dict[tuple[int, bytes], int] = {}
        self.in_use: dict[tuple[int, bytes], int] = {}
        for proto, rows in ranges.items():
            by_address = self._free.setdefault(proto, {})
            for address, first, last in rows:
                queues = by_address.setdefault(address, [deque(), deque(), deque(), deque()])
                for port in range(first, last + 1):
                    queues[_port_class(port)].append(port)
                self.size[proto, address] = self.size.get((proto, address), 0) + last - first + 1
                self.in_use.setdefault((proto, address), 0)
        self._held: deque[tuple[float, int, bytes, int]] = deque()

    def allocate(self, proto: int, cport: int, prefer: bytes | None, shard: int = -1
                 ) -> tuple[bytes, int] | None:
        """A free (address, port) for a client port ``cport``, or None: none left (``shard``:
        ShardedPortPool's)."""
        by_address = self._free.get(proto)
        if not by_address:
            return None
        wanted = _port_class(cport)
        # Same range and parity first, then the other parity, then the other range.
        order = (wanted, wanted ^ 1, wanted ^ 2, wanted ^ 3)
        addresses = list(by_address) if prefer not in by_address else [prefer]
        for queue_index in order:
            for address in addresses:
                queue = by_address[address][queue_index]
                if queue:
                    self.in_use[proto, address] += 1
                    return address, queue.popleft()
        return None

    def claim(self, wanted: set[tuple[int, bytes, int]]) -> set[tuple[int, bytes, int]]:
        """Take these (protocol, address, port) out of the free queues at once (a restarted
        worker resuming its bindings); returns those taken (the others were not free here)."""
        taken: set[tuple[int, bytes, int]] = set()
        by_queue: dict[tuple[int, bytes], set[int]] = {}
        for proto, address, port in wanted:
            by_queue.setdefault((proto, address), set()).add(port)
        for (proto, address), ports in by_queue.items():
            queues = self._free.get(proto, {}).get(address)
            if queues is None:
                continue
            for index, queue in enumerate(queues):
                found = ports.intersection(queue)
                if found:
                    queues[index] = deque(p for p in queue if p not in found)
                    taken.update((proto, address, port) for port in found)
                    self.in_use[proto, address] += len(found)
        return taken

    def release(self, proto: int, address: bytes, port: int, now: float) -> None:
        self.in_use[proto, address] -= 1
        self._held.append((now + self.hold_s, proto, address, port))

    def expire(self, now: float) -> None:
        """Ports whose hold time is over become free again, at the back of their queue."""
        held = self._held
        while held and held[0][0] <= now:
            _, proto, address, port = held.popleft()
            self._free[proto][address][_port_class(port)].append(port)

    def held(self) -> int:
        return len(self._held)

    def usage(self) -> list[tuple[int, bytes, int, int]]:
        """(protocol, address, ports, ports in use) of every address of every protocol."""
        return [(proto, address, size, self.in_use[proto, address])
                for (proto, address), size in sorted(self.size.items())]


Pool4Slices = dict[tuple[int, bytes], list[tuple[int, int, int]]]


def pool4_slices(by_shard: dict[int, dict[int, list[tuple[bytes, int, int]]]]) -> Pool4Slices:
    """Each pool4 (protocol, address)'s slices: (first port, last port, shard), from the
    shards' ``worker_pool4`` slices, to name a binding's shard by its port (``port_shard``)."""
    out: Pool4Slices = {}
    for shard, ranges in by_shard.items():
        for proto, rows in ranges.items():
            for address, first, last in rows:
                out.setdefault((proto, address), []).append((first, last, shard))
    return out


def port_shard(slices: Pool4Slices, proto: int, address: bytes, port: int) -> int | None:
    """The shard of a pool4 transport address (None: not in these slices)."""
    for first, last, shard in slices.get((proto, address), ()):
        if first <= port <= last:
            return shard
    return None


class ShardedPortPool:
    """A worker's pool4 of several fan-out shards ([gateway] shards): a PortPool per shard,
    each of the shard's own slice of every pool4 range (settings.worker_pool4 cut by shards);
    a new binding takes a port of its client's shard, so the shard can move to another
    worker with its bindings. The PortPool interface, by delegation."""

    def __init__(self, by_shard: dict[int, dict[int, list[tuple[bytes, int, int]]]],
                 hold_s: float) -> None:
        self.pools = {shard: PortPool(ranges, hold_s) for shard, ranges in by_shard.items()}
        self._home = next(iter(self.pools))  # for a client of a shard not ours
        self._slices = pool4_slices(by_shard)  # a port's shard (``port_shard``)

    @property
    def hold_s(self) -> float:
        return self.pools[self._home].hold_s

    @hold_s.setter
    def hold_s(self, value: float) -> None:
        for pool in self.pools.values():
            pool.hold_s = value

    def _pool_of(self, proto: int, address: bytes, port: int) -> PortPool | None:
        shard = port_shard(self._slices, proto, address, port)
        return None if shard is None else self.pools[shard]

    def allocate(self, proto: int, cport: int, prefer: bytes | None, shard: int = -1
                 ) -> tuple[bytes, int] | None:
        return self.pools.get(shard, self.pools[self._home]).allocate(proto, cport, prefer)

    def claim(self, wanted: set[tuple[int, bytes, int]]) -> set[tuple[int, bytes, int]]:
        by_shard: dict[int, set[tuple[int, bytes, int]]] = {}
        for key in wanted:
            shard = port_shard(self._slices, *key)
            if shard is not None:
                by_shard.setdefault(shard, set()).add(key)
        taken: set[tuple[int, bytes, int]] = set()
        for shard, keys in by_shard.items():
            taken |= self.pools[shard].claim(keys)
        return taken

    def release(self, proto: int, address: bytes, port: int, now: float) -> None:
        pool = self._pool_of(proto, address, port)
        if pool is not None:
            pool.release(proto, address, port, now)

    def expire(self, now: float) -> None:
        for pool in self.pools.values():
            pool.expire(now)

    def held(self) -> int:
        return sum(pool.held() for pool in self.pools.values())

    def usage(self) -> list[tuple[int, bytes, int, int]]:
        totals: dict[tuple[int, bytes], list[int]] = {}
        for pool in self.pools.values():
            for proto, address, size, used in pool.usage():
                row = totals.setdefault((proto, address), [0, 0])
                row[0] += size
                row[1] += used
        return [(proto, address, size, used)
                for (proto, address), (size, used) in sorted(totals.items())]


def _port_class(port: int) -> int:
    """Queue index of a port: bit 1 its range (RFC 6146 §3.5.1.1), bit 0 its parity."""
    return (2 if port < WELL_KNOWN_PORTS else 0) | (port & 1)


class Bib:
    """A NAT64 binding (RFC 6146 §3.5.1 BIB entry): an IPv6 transport address and the pool4
    transport address it is mapped to, whatever the destination (endpoint-independent
    mapping, RFC 4787 REQ-1), shared by its sessions; ``remotes`` counts them per IPv4 peer
    for address-dependent filtering."""

    __slots__ = ("proto", "client6", "cport", "pool4", "pport", "sessions", "remotes")

    def __init__(self, proto: int, client6: bytes, cport: int, pool4: bytes,
                 pport: int) -> None:
        self.proto = proto
        self.client6 = client6
        self.cport = cport
        self.pool4 = pool4
        self.pport = pport
        self.sessions = 0
        self.remotes: dict[bytes, int] = {}
        untrack(self)  # as a Session (``remotes`` holds bytes and numbers)


def worker_share(limit: int | None, workers: int) -> int | None:
    """A worker's share of a gateway-wide limit, rounded up (``None``: no limit). The one
    place this is computed: the flow tables, the kernel backend's relays and the metrics."""
    return None if limit is None else max(1, -(-limit // workers))


class FlowTable:
    """Bindings and sessions of one worker shard, with limits, eviction and expiry."""

    def __init__(self, pool: list[bytes] | Mapping[int, list[bytes]], max_flows: int,
                 max_flows_per_prefix: int, timeouts: Timeouts, *,
                 max_flows_per_48: int | None = None,
                 max_flows_per_ipv4_source: int | None = None,
                 ports: PortPool | ShardedPortPool | None = None,
                 port_quota: int | None = None, quota_prefix_bytes: int = 8,
                 shard_of: Callable[[bytes], int] | None = None,
                 client_shard: Callable[[bytes], int] | None = None) -> None:
        self.max_flows = max_flows
        self.max_flows_per_prefix = max_flows_per_prefix
        self.max_flows_per_48 = max_flows_per_48
        self.max_flows_per_ipv4_source = max_flows_per_ipv4_source
        self.timeouts = timeouts
        # Free pool addresses by fan-out shard (settings.shard_pools; a list is one shard):
        # a client's address comes from its own shard's slice, so another worker count can
        # move the shard with its sessions. ``shard_of`` names an address's shard.
        pools = pool if isinstance(pool, Mapping) else {0: pool}
        self._pools: dict[int, deque[bytes]] = {shard: deque(addresses)
                                                for shard, addresses in pools.items()}
        self._home = next(iter(self._pools), 0)  # for a client of a shard not ours
        self._free = self._pools.get(self._home, deque())
        self._shard_of = shard_of
        self.pool_size = sum(len(addresses) for addresses in pools.values())
        self._by_v6: dict[Key, Session] = {}
        self._by_v4: dict[Key, Session] = {}
        self._client_pool: dict[bytes, _Binding] = {}
        # NAT64 clients' pool4 address (paired, RFC 6888 REQ-2) and session counts.
        self._nat64_pairs: dict[bytes, _Binding] = {}
        self._per_prefix: dict[bytes, int] = {}
        self._per_48: dict[bytes, int] = {}
        self._per_outer4: dict[bytes, int] = {}
        self._outer4_objects: dict[bytes, bytes] = {}  # the one object of each live source
        # NAT64 (``ports`` set): bindings by each side, and pool4 ports per client (RFC 6888
        # REQ-4 quota, per /64 or /128: ``quota_prefix_bytes`` 8 or 16).
        self.ports = ports
        # ShardedPortPool: a NAT64 client's shard (the steering hash of its /64).
        self._client_shard = client_shard
        self.port_quota = port_quota
        self.quota_prefix_bytes = quota_prefix_bytes
        self._bib_v6: dict[tuple[int, bytes, int], Bib] = {}
        self._bib_v4: dict[tuple[int, bytes, int], Bib] = {}
        self._ports_per_client: dict[bytes, int] = {}
        self.bindings_created = 0
        self.bindings_removed = 0
        self._clock = 0.0  # the latest ``now`` seen: when a port freed by ``close`` was freed
        # When a list, each NAT64 binding made (True) or ended (False) is appended, for the
        # shell's binding log (RFC 6888 REQ-12).
        self.binding_events: list[tuple[bool, Bib]] | None = None
        # Unassured sessions, oldest first: who goes first when room is needed.
        self._unassured = UnassuredQueue()
        # Timer wheel: slot (whole second) -> its sessions; a heap of the slots in use.
        # Buckets are dicts, not sets: their order (insertion) is the same in every run, so
        # which session goes first never depends on memory addresses. Each slot's number is
        # one int object, which its sessions share (``_slot_numbers``: 32 bytes a session).
        self._wheel: dict[int, dict[Session, None]] = {}
        self._slot_numbers: dict[int, int] = {}
        self._slots: list[int] = []
        self.created_total = 0
        self.expired_total = 0
        self.evicted_total = 0
        # Kept up to date on create/remove so a metrics scrape never walks a million sessions.
        self.active_by_proto: dict[int, int] = {}
        self.created_by_proto: dict[int, int] = {}
        # When a list, every removed session is appended (the datapath drops its templates).
        self.removed: list[Session] | None = None
        # The shard journal (issue 17), when a dict: sessions made or changed (state, assured,
        # timeout) since the last ``take_journal``, and the keys of those removed; the worker
        # sends them to the coordinator, which hands them to a worker restarted after a crash.
        self.journal: dict[Session, None] | None = None
        self.journal_removed: list[Key] = []
        # NAT64: pool4 ports whose binding ended (held before reuse, RFC 6888 REQ-8), for the
        # journal too: a worker restarted after a crash keeps holding them.
        self.journal_held: list[tuple[int, bytes, int]] = []

    @classmethod
    def for_shard(cls, pool: list[bytes] | Mapping[int, list[bytes]], workers: int,
                  max_flows: int, max_flows_per_prefix: int, timeouts: Timeouts, *,
                  max_flows_per_48: int | None = None,
                  max_flows_per_ipv4_source: int | None = None,
                  ports: PortPool | ShardedPortPool | None = None,
                  port_quota: int | None = None, quota_prefix_bytes: int = 8,
                  shard_of: Callable[[bytes], int] | None = None,
                  client_shard: Callable[[bytes], int] | None = None) -> FlowTable:
        """One worker's table with its share of the gateway-wide limits
        (``set_shard_limits``)."""
        table = cls(pool, 1, max_flows_per_prefix, timeouts, ports=ports, port_quota=port_quota,
                    quota_prefix_bytes=quota_prefix_bytes, shard_of=shard_of,
                    client_shard=client_shard)
        table.set_shard_limits(workers, max_flows, max_flows_per_prefix, timeouts,
                               max_flows_per_48=max_flows_per_48,
                               max_flows_per_ipv4_source=max_flows_per_ipv4_source)
        return table

    def set_shard_limits(self, workers: int, max_flows: int, max_flows_per_prefix: int,
                         timeouts: Timeouts, *, max_flows_per_48: int | None,
                         max_flows_per_ipv4_source: int | None) -> None:
        """This worker's share of the gateway-wide limits, at the start or a reload. The per
        /64 limit is exact because one shard sees all of a /64 (workers/engine/wire.py
        fanout_index); the /48 and outer-IPv4 limits spread over the shards like the global
        one. New timeouts apply from each session's next state change."""
        self.max_flows = worker_share(max_flows, workers) or 1
        self.max_flows_per_prefix = max_flows_per_prefix
        self.max_flows_per_48 = worker_share(max_flows_per_48, workers)
        self.max_flows_per_ipv4_source = worker_share(max_flows_per_ipv4_source, workers)
        self.timeouts = timeouts

    def __len__(self) -> int:
        return len(self._by_v6)

    def count(self, proto: int) -> int:
        return self.active_by_proto.get(proto, 0)

    def pool_in_use(self) -> int:
        """Pool addresses held by clients (NAT64's pool4 ports: ``ports.usage``)."""
        return len(self._client_pool)

    def _pairs_of(self, session: Session) -> dict[bytes, _Binding]:
        return self._nat64_pairs if session.rule == NAT64_RULE else self._client_pool

    def binding_v4(self, proto: int, pool4: bytes, pport: int) -> Bib | None:
        """The NAT64 binding of a pool4 transport address (RFC 6146 §3.5.1: filtering)."""
        return self._bib_v4.get((proto, pool4, pport))

    def bindings(self) -> Iterator[Bib]:
        return iter(self._bib_v6.values())

    def unassured(self) -> int:
        return len(self._unassured)

    def timer_entries(self) -> int:
        """Sessions held by the timer wheel: always exactly ``len(self)``."""
        return sum(len(bucket) for bucket in self._wheel.values())

    # --- lookups ------------------------------------------------------------------------------

    def lookup_v6(self, proto: int, client6: bytes, cport: int, gw6: bytes,
                  gwport: int) -> Session | None:
        return self._by_v6.get((proto, client6, cport, gw6, gwport))

    def lookup_v4(self, proto: int, pool4: bytes, pport: int, target4: bytes,
                  tport: int) -> Session | None:
        return self._by_v4.get((proto, pool4, pport, target4, tport))

    # --- creation -----------------------------------------------------------------------------

    def owns_shard(self, shard: int) -> bool:
        return shard in self._pools

    def owns_pool_address(self, address: bytes) -> bool:
        """Whether ``address`` is of one of this worker's shards (always, with one shard)."""
        return self._shard_of is None or self._shard_of(address) in self._pools

    def create(self, proto: int, client6: bytes, cport: int, gw6: bytes, gwport: int,
               target4: bytes, tport: int, rule: str, now: float,
               outer4: bytes = b"", from_v4: bool = False, shard: int = -1
               ) -> Session | DropReason:
        """Create a session for a new flow from an IPv6 client, or say why not.

        ``outer4``: the outer IPv4 source the packet came from, counted against
        ``max_flows_per_ipv4_source`` (b"": not counted, e.g. 6in4's single broker).
        ``shard``: the fan-out shard of the client's packet, whose pool slice gives a new
        client its address (-1 or not ours: this worker's first)."""
        self._clock = now
        full = len(self._by_v6) >= self.max_flows
        if full and not self._unassured:
            return DropReason.FLOW_LIMIT
        prefix = client6[:8]
        if self._per_prefix.get(prefix, 0) >= self.max_flows_per_prefix:
            return DropReason.PREFIX_FLOW_LIMIT
        prefix48 = client6[:6]
        if (self.max_flows_per_48 is not None
                and self._per_48.get(prefix48, 0) >= self.max_flows_per_48):
            return DropReason.PREFIX_FLOW_LIMIT
        if (outer4 and self.max_flows_per_ipv4_source is not None
                and self._per_outer4.get(outer4, 0) >= self.max_flows_per_ipv4_source):
            return DropReason.SOURCE_FLOW_LIMIT
        if full:
            self._evict_oldest_unassured()
        if rule == NAT64_RULE and self.ports is not None:
            return self._create_nat64(proto, client6, cport, gw6, gwport, target4, tport, rule,
                                      now, self._nat64_pairs.get(client6), from_v4)
        binding = self._client_pool.get(client6)
        free = self._pools.get(shard, self._free)
        if binding is None:
            if not free and not self._evict_unassured_client(free):
                return DropReason.POOL_EXHAUSTED
            pool4 = free[0]
        else:
            pool4 = binding.pool4
            client6 = binding.client6  # one address object for all of a client's sessions
        v4_key = (proto, pool4, cport, target4, tport)
        if v4_key in self._by_v4:
            return DropReason.PORT_IN_USE
        if binding is None:
            free.popleft()
            binding = _Binding(pool4, client6)
            self._client_pool[client6] = binding
        binding.sessions += 1
        if proto == PROTO_TCP:
            state = V6_INIT
        else:
            state = UDP_OPEN
        session = Session(proto, client6, cport, gw6, gwport, pool4, target4, tport, rule,
                          state, now, self.timeouts.unassured_s, outer4)
        self._add(session, v4_key, now)
        return session

    def _create_nat64(self, proto: int, client6: bytes, cport: int, gw6: bytes, gwport: int,
                      target4: bytes, tport: int, rule: str, now: float,
                      binding: _Binding | None, from_v4: bool = False) -> Session | DropReason:
        """NAT64: the session's binding is the client transport address's (endpoint-independent
        mapping, RFC 6146 §3.5.1), made on first use within the client's port quota."""
        assert self.ports is not None
        bib = self._bib_v6.get((proto, client6, cport))
        if bib is None:
            owner = client6[:self.quota_prefix_bytes]
            if (self.port_quota is not None
                    and self._ports_per_client.get(owner, 0) >= self.port_quota):
                return DropReason.PORT_QUOTA
            got = self.ports.allocate(proto, cport,
                                      binding.pool4 if binding is not None else None,
                                      self._client_shard(client6)
                                      if self._client_shard is not None else -1)
            if got is None:
                return DropReason.POOL_EXHAUSTED
            bib = Bib(proto, client6, cport, got[0], got[1])
            self._bib_v6[proto, client6, cport] = bib
            self._bib_v4[proto, bib.pool4, bib.pport] = bib
            self._ports_per_client[owner] = self._ports_per_client.get(owner, 0) + 1
            self.bindings_created += 1
            if self.binding_events is not None:
                self.binding_events.append((True, bib))
        v4_key = (proto, bib.pool4, bib.pport, target4, tport)
        if v4_key in self._by_v4:
            return DropReason.PORT_IN_USE
        if binding is None:
            binding = self._nat64_pairs[client6] = _Binding(bib.pool4, client6)
        else:
            client6 = binding.client6  # one address object for all of a client's sessions
        binding.sessions += 1
        bib.sessions += 1
        bib.remotes[target4] = bib.remotes.get(target4, 0) + 1
        session = Session(proto, client6, cport, gw6, gwport, bib.pool4, target4, tport, rule,
                          (V4_INIT if from_v4 else V6_INIT) if proto == PROTO_TCP
                          else UDP_OPEN, now,
                          self.timeouts.unassured_s, pport=bib.pport)
        self._add(session, v4_key, now)
        return session

    def _add(self, session: Session, v4_key: Key, now: float, restored: bool = False) -> None:
        """Index a new (or ``restored``: not counted as created) session, start its timer."""
        proto = session.proto
        self._by_v6[session.v6_key()] = session
        self._by_v4[v4_key] = session
        self._unassured.add(session)
        prefix = session.client6[:8]
        self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
        prefix48 = session.client6[:6]
        self._per_48[prefix48] = self._per_48.get(prefix48, 0) + 1
        outer4 = session.outer4
        if outer4:
            # One address object for all the sessions of a relay or site (issue 21: memory).
            outer4 = session.outer4 = self._outer4_objects.setdefault(outer4, outer4)
            self._per_outer4[outer4] = self._per_outer4.get(outer4, 0) + 1
        self._place(session, int(now + session.timeout_s))
        self.active_by_proto[proto] = self.active_by_proto.get(proto, 0) + 1
        self._journal_changed(session)
        if restored:
            return
        self.created_total += 1
        self.created_by_proto[proto] = self.created_by_proto.get(proto, 0) + 1

    def _evict_oldest_unassured(self) -> None:
        """conntrack's early drop: make room by removing the oldest unassured session."""
        oldest = self._unassured.oldest()
        if oldest is not None:
            self._evict(oldest)

    def _evict_unassured_client(self, free: deque[bytes]) -> bool:
        """Free a pool address (of ``free``, a shard's) by removing the sessions of a client
        none of whose sessions is assured, oldest first; at most ``EVICT_SCAN`` sessions
        looked at."""
        for session in self._unassured.first(EVICT_SCAN):
            if session.rule == NAT64_RULE:
                continue  # holds pool4 ports, not a pool address
            binding = self._client_pool.get(session.client6)
            if binding is None or binding.assured or (
                    self._shard_of is not None
                    and self._pools.get(self._shard_of(binding.pool4)) is not free):
                continue
            self._evict(session)
            if free:
                return True
        return bool(free)

    def _free_of(self, pool4: bytes) -> deque[bytes] | None:
        """The free list ``pool4`` goes back to (None: no shard of ours)."""
        if self._shard_of is None:
            return self._free
        return self._pools.get(self._shard_of(pool4))

    def _evict(self, session: Session) -> None:
        self.close(session)
        self.evicted_total += 1

    def close(self, session: Session) -> None:
        """Remove a live session now: its connection ended (the kernel backend's relays),
        or room is made for another (early drop)."""
        if session.alive:
            self._wheel[session.slot].pop(session, None)
            self._remove(session)

    # --- state --------------------------------------------------------------------------------

    def assure(self, session: Session) -> None:
        """The session carried traffic both ways as its protocol expects: keep it."""
        if not session.assured:
            session.assured = True
            self._journal_changed(session)
            self._unassured.discard()
            self._pairs_of(session)[session.client6].assured += 1
            if session.proto == PROTO_TCP:
                session.timeout_s = self.timeouts.tcp_established_s
            elif session.proto == PROTO_UDP:
                session.timeout_s = self.timeouts.udp_s
            else:
                session.timeout_s = self.timeouts.icmp_s

    def touch_udp(self, session: Session, from_v6: bool, now: float) -> None:
        """A UDP (or ICMP query) packet: refresh; the service's answer assures it."""
        session.last_seen = now
        if not from_v6 and not session.assured:
            self.assure(session)

    def touch_tcp(self, session: Session, flags: int, from_v6: bool, now: float) -> None:
        """Advance the RFC 6146 §3.5.2.2 TCP state machine (``TCP_TRANSITIONS``) for one
        segment."""
        session.last_seen = now
        if flags & TCP_RST:
            # RFC 6146 §3.5.2.2: a RST moves the session to TRANS with the transitory lifetime.
            self._shorten(session, TRANS, self.timeouts.tcp_transitory_s, now)
            return
        state = session.state
        relevant = _TCP_RELEVANT.get(state)
        if relevant is None:
            if state == TRANS:
                # RFC 6146 §3.5.2.2: any non-RST packet in TRANS makes the session live again;
                # one that never completed its handshake goes back to waiting for it.
                if session.assured:
                    session.state = ESTABLISHED
                    session.timeout_s = self.timeouts.tcp_established_s
                else:
                    session.state = V6_INIT
                self._journal_changed(session)
            else:
                # A state the table does not know is a bug: never guess a transition; the
                # session ends soon, as after a RST.
                self._shorten(session, TRANS, self.timeouts.tcp_transitory_s, now)
            return
        if not flags & relevant:
            return
        for side, must, must_not, after, effect in TCP_TRANSITIONS[state]:
            if side == from_v6 and flags & must and not flags & must_not:
                if effect == TRANSITORY:
                    self._shorten(session, after, self.timeouts.tcp_transitory_s, now)
                else:
                    session.state = after
                    self._journal_changed(session)
                    if effect == ASSURE:
                        self.assure(session)
                return

    def _shorten(self, session: Session, state: str, timeout_s: float, now: float) -> None:
        """Enter ``state`` with ``timeout_s`` (never above the unassured lifetime for an
        unassured session); an earlier deadline moves the session's one timer."""
        session.state = state
        self._journal_changed(session)
        if not session.assured:
            timeout_s = min(timeout_s, self.timeouts.unassured_s)
        session.timeout_s = timeout_s
        slot = int(now + timeout_s)
        if slot < session.slot:
            self._wheel[session.slot].pop(session, None)
            self._place(session, slot)

    def touch(self, session: Session, now: float) -> None:
        session.last_seen = now

    # --- expiry -------------------------------------------------------------------------------

    def _place(self, session: Session, slot: int) -> None:
        bucket = self._wheel.get(slot)
        if bucket is None:
            bucket = self._wheel[slot] = {}
            self._slot_numbers[slot] = slot
            heapq.heappush(self._slots, slot)
        else:
            slot = self._slot_numbers[slot]
        bucket[session] = None
        session.slot = slot

    def expire(self, now: float, budget: int = 10000) -> int:
        """Remove sessions idle past their timeout; at most ``budget`` sessions looked at.

        A due slot's sessions are removed, or moved to the slot of their real deadline when
        traffic moved it (each session is in one slot only, so memory stays one entry each).
        """
        removed = 0
        self._clock = now
        wheel, slots = self._wheel, self._slots
        current = int(now)
        while slots and slots[0] <= current and budget > 0:
            slot = slots[0]
            bucket = wheel.get(slot)
            later: list[Session] = []
            while bucket and budget > 0:
                session, _ = bucket.popitem()
                budget -= 1
                deadline = session.last_seen + session.timeout_s
                if deadline <= now:
                    self._remove(session)
                    removed += 1
                elif int(deadline) == slot:
                    later.append(session)  # due later within this very second
                else:
                    self._place(session, int(deadline))
            if bucket is not None:
                bucket.update(dict.fromkeys(later))
            if bucket:
                break  # budget spent, or sessions due later in this second
            heapq.heappop(slots)
            wheel.pop(slot, None)
            self._slot_numbers.pop(slot, None)
        self.expired_total += removed
        if self.ports is not None:
            self.ports.expire(now)
        return removed

    def _remove(self, session: Session) -> None:
        del self._by_v6[session.v6_key()]
        session.alive = False
        if self.journal is not None:
            self.journal.pop(session, None)
            self.journal_removed.append(session.v6_key())
        self.active_by_proto[session.proto] -= 1
        if self.removed is not None:
            self.removed.append(session)
        self._by_v4.pop(session.v4_key(), None)
        if not session.assured:
            self._unassured.discard()
        _decrement(self._per_prefix, session.client6[:8])
        _decrement(self._per_48, session.client6[:6])
        if session.outer4 and not _decrement(self._per_outer4, session.outer4):
            self._outer4_objects.pop(session.outer4, None)
        pairs = self._pairs_of(session)
        binding = pairs.get(session.client6)
        if binding is not None:
            binding.sessions -= 1
            if session.assured:
                binding.assured -= 1
            if binding.sessions == 0:
                del pairs[session.client6]
                free = self._free_of(session.pool4) if pairs is self._client_pool else None
                if free is not None:
                    free.append(session.pool4)  # RFC 6888 REQ-8: reused last
        if session.rule == NAT64_RULE and self.ports is not None:
            self._unbind(session)

    def _unbind(self, session: Session) -> None:
        """A NAT64 session ended: its binding ends with its last session, and the port is
        held before reuse (RFC 6888 REQ-8)."""
        assert self.ports is not None
        bib = self._bib_v6.get((session.proto, session.client6, session.cport))
        if bib is None:
            return
        bib.sessions -= 1
        _decrement(bib.remotes, session.target4)
        if bib.sessions:
            return
        del self._bib_v6[session.proto, session.client6, session.cport]
        del self._bib_v4[session.proto, bib.pool4, bib.pport]
        _decrement(self._ports_per_client, session.client6[:self.quota_prefix_bytes])
        self.ports.release(session.proto, bib.pool4, bib.pport, self._clock)
        if self.journal is not None:
            self.journal_held.append((session.proto, bib.pool4, bib.pport))
        self.bindings_removed += 1
        if self.binding_events is not None:
            self.binding_events.append((False, bib))

    def set_port_quota(self, quota: int | None, quota_prefix_bytes: int, hold_s: float) -> None:
        """A reloaded NAT64 policy (issue 17): the per-client quota (RFC 6888 REQ-4) and the
        port hold time (REQ-8) from now on. Bindings over a lowered quota stay (they are in
        use); the client makes no new one until it is under. Ports per client are counted
        again when the client prefix length changed."""
        assert self.ports is not None
        self.port_quota = quota
        self.ports.hold_s = hold_s
        if quota_prefix_bytes != self.quota_prefix_bytes:
            self.quota_prefix_bytes = quota_prefix_bytes
            self._ports_per_client.clear()
            for bib in self._bib_v6.values():
                owner = bib.client6[:quota_prefix_bytes]
                self._ports_per_client[owner] = self._ports_per_client.get(owner, 0) + 1

    # --- the shard journal --------------------------------------------------------------------

    def _journal_changed(self, session: Session) -> None:
        """``session`` was made or its state, assurance or timeout changed (not per packet)."""
        if self.journal is not None:
            self.journal[session] = None

    def take_journal(self) -> tuple[list[bytes], list[Key]]:
        """Records (packed: ``pack_session``) of the sessions made or changed since the last
        call, and the keys of those removed; both emptied."""
        journal = self.journal
        if journal is None:
            return [], []
        records = [pack_session(s) for s in journal if s.alive]
        removed = self.journal_removed
        self.journal = {}
        self.journal_removed = []
        return records, removed

    def take_held(self) -> list[tuple[int, bytes, int]]:
        """The pool4 ports put on hold since the last call (the journal's), emptied."""
        held, self.journal_held = self.journal_held, []
        return held

    def restore_held(self, held: list[tuple[int, bytes, int, float]], now: float) -> int:
        """After a crash: pool4 ports whose binding ended less than the hold time ago stay
        held for the rest of it (RFC 6888 REQ-8), those no resumed session took; how many."""
        if self.ports is None:
            return 0
        hold_s = self.ports.hold_s
        wanted = {(proto, address, port): min(remaining, hold_s)
                  for proto, address, port, remaining in held}
        taken = self.ports.claim(set(wanted))
        for key in sorted(taken, key=wanted.__getitem__):  # the hold queue stays in order
            self.ports.release(*key, now - hold_s + wanted[key])
        return len(taken)

    def restore(self, records: list[object], now: float) -> tuple[int, int]:
        """Resume the sessions a crashed worker of this shard journaled: (resumed, refused).

        A record is refused when it is malformed, already here, or does not fit this shard:
        its pool address or pool4 port is not this worker's (or is taken), or it disagrees with
        the client's pairing or binding. Resumed sessions keep their pool (address, port),
        state and assurance; their idle timers start at ``now``; they are not counted as
        created, and their NAT64 bindings are not logged again."""
        sessions: list[Session] = []
        refused = 0
        for record in records:
            try:
                sessions.append(parse_record(record))
            except (ValueError, TypeError):
                refused += 1
        nat64 = [s for s in sessions if s.rule == NAT64_RULE and self.ports is not None]
        others = [s for s in sessions if not (s.rule == NAT64_RULE and self.ports is not None)]
        resumed = self._restore_pooled(others, now) + self._restore_nat64(nat64, now)
        return resumed, refused + len(sessions) - resumed

    def _restore_common(self, session: Session, now: float) -> bool:
        """Index a parsed session unless its keys are taken; its limits are not checked (it
        was admitted once)."""
        v4_key = session.v4_key()
        if session.v6_key() in self._by_v6 or v4_key in self._by_v4:
            return False
        session.last_seen = now
        assured, timeout_s = session.assured, session.timeout_s
        session.assured = False
        self._add(session, v4_key, now, restored=True)
        if assured:
            self.assure(session)
            session.timeout_s = timeout_s  # e.g. TRANS's transitory lifetime, not assure's
        return True

    def _restore_pooled(self, sessions: list[Session], now: float) -> int:
        """Forward-rule sessions: each client keeps its pool address (paired, REQ-2)."""
        free = {address for addresses in self._pools.values() for address in addresses}
        taken: set[bytes] = set()
        resumed = 0
        for session in sessions:
            binding = self._client_pool.get(session.client6)
            if binding is None:
                if session.pool4 not in free or session.pool4 in taken:
                    continue
                binding = self._client_pool[session.client6] = _Binding(session.pool4,
                                                                        session.client6)
                taken.add(session.pool4)
            elif binding.pool4 != session.pool4:
                continue
            else:
                session.client6 = binding.client6
            binding.sessions += 1
            if self._restore_common(session, now):
                resumed += 1
            else:
                binding.sessions -= 1
        if taken:
            for addresses in self._pools.values():
                kept = [a for a in addresses if a not in taken]
                addresses.clear()
                addresses.extend(kept)
        for client6, binding in list(self._client_pool.items()):
            if binding.sessions == 0:
                del self._client_pool[client6]
                back = self._free_of(binding.pool4)
                if back is not None:
                    back.append(binding.pool4)
        return resumed

    def _restore_nat64(self, sessions: list[Session], now: float) -> int:
        """NAT64 sessions: their bindings (pool4 transport addresses) are claimed from the port
        pool first, all at once; a session whose binding cannot be had is refused."""
        if not sessions:
            return 0
        assert self.ports is not None
        wanted: dict[tuple[int, bytes, int], tuple[bytes, int]] = {}
        for session in sessions:
            key = (session.proto, session.client6, session.cport)
            if key in self._bib_v6:
                continue
            wanted.setdefault(key, (session.pool4, session.pport))
        claimed = self.ports.claim({(proto, address, port)
                                    for (proto, _c, _p), (address, port) in wanted.items()})
        for (proto, client6, cport), (address, port) in wanted.items():
            if (proto, address, port) not in claimed or (proto, address, port) in self._bib_v4:
                continue
            bib = Bib(proto, client6, cport, address, port)
            self._bib_v6[proto, client6, cport] = bib
            self._bib_v4[proto, address, port] = bib
            owner = client6[:self.quota_prefix_bytes]
            self._ports_per_client[owner] = self._ports_per_client.get(owner, 0) + 1
        resumed = 0
        for session in sessions:
            entry = self._bib_v6.get((session.proto, session.client6, session.cport))
            pair = self._nat64_pairs.get(session.client6)
            if (entry is None or (entry.pool4, entry.pport) != (session.pool4, session.pport)
                    or pair is not None and pair.pool4 != session.pool4):
                continue
            if pair is None:
                pair = self._nat64_pairs[session.client6] = _Binding(session.pool4,
                                                                     session.client6)
            else:
                session.client6 = pair.client6
            pair.sessions += 1
            if self._restore_common(session, now):
                entry.sessions += 1
                entry.remotes[session.target4] = entry.remotes.get(session.target4, 0) + 1
                resumed += 1
            else:
                pair.sessions -= 1
        for key, bib in list(self._bib_v6.items()):
            if bib.sessions == 0:  # claimed for sessions that were all refused: give it back
                del self._bib_v6[key]
                del self._bib_v4[bib.proto, bib.pool4, bib.pport]
                _decrement(self._ports_per_client, bib.client6[:self.quota_prefix_bytes])
                self.ports.release(bib.proto, bib.pool4, bib.pport, now - self.ports.hold_s)
        for client6, pair in list(self._nat64_pairs.items()):
            if pair.sessions == 0:
                del self._nat64_pairs[client6]
        return resumed

    # --- views --------------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        return list(self._by_v6.values())

    def sessions_iter(self) -> Iterator[Session]:
        """The live sessions, oldest first, without copying the table."""
        return iter(self._by_v6.values())

    def snapshot(self) -> list[dict[str, object]]:
        """Plain-data state of every session: its journal record (hex addresses) by field
        name, and its clock."""
        return [dict(zip(RECORD_FIELDS, session_record(s), strict=True), last_seen=s.last_seen)
                for s in self._by_v6.values()]


# --- the shard journal (issue 17: a worker restarted after a crash resumes its sessions) ------

# A session as journal record: plain JSON data, addresses in hex. Its clock (last_seen) is not
# kept: a resumed session starts its idle timeout again, so it can only live longer.
RECORD_FIELDS = ("proto", "client6", "cport", "gw6", "gwport", "pool4", "pport", "target4",
                 "tport", "rule", "state", "timeout_s", "assured", "outer4")
SESSION_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})
STATES = frozenset(TCP_TRANSITIONS) | {TRANS, UDP_OPEN}
Record = list[object]


def session_record(s: Session) -> Record:
    return [s.proto, s.client6.hex(), s.cport, s.gw6.hex(), s.gwport, s.pool4.hex(), s.pport,
            s.target4.hex(), s.tport, s.rule, s.state, s.timeout_s, s.assured, s.outer4.hex()]


# A record as the journal carries it (issue 21: as JSON, the journal cost 15-20% of flow
# setup, most of it in the coordinator decoding and re-encoding what it only stores): the
# same fields packed, addresses as bytes, the state by its index in STATE_NAMES, assured and
# whether there is an outer4 as flags, then the rule's UTF-8 name. Its first PACKED_KEY.size
# bytes are its identity (``Session.v6_key``), so the coordinator keys its copy by a slice.
# The files between runs (handover, shard) keep the JSON records.
PACKED = struct.Struct("!B16sH16sH4sH4sHBdB4sH")
PACKED_KEY = struct.Struct("!B16sH16sH")
STATE_NAMES = tuple(sorted(STATES))
_STATE_INDEX = {name: index for index, name in enumerate(STATE_NAMES)}
_NO_STATE = 255  # a state the table does not know (a bug): refused where it is resumed
_ASSURED, _HAS_OUTER4 = 1, 2


def pack_session(s: Session) -> bytes:
    """``session_record(s)`` packed."""
    rule = s.rule.encode()
    return PACKED.pack(s.proto, s.client6, s.cport, s.gw6, s.gwport, s.pool4, s.pport,
                       s.target4, s.tport, _STATE_INDEX.get(s.state, _NO_STATE), s.timeout_s,
                       (_ASSURED if s.assured else 0) | (_HAS_OUTER4 if s.outer4 else 0),
                       s.outer4 or bytes(4), len(rule)) + rule


def packed_size(packed: bytes) -> int:
    """The size of a packed record as its fixed part says (-1: too short to say)."""
    if len(packed) < PACKED.size:
        return -1
    return PACKED.size + int.from_bytes(packed[PACKED.size - 2:PACKED.size], "big")


def pack_record(record: object) -> bytes:
    """A JSON record (a handover's, an older run's session log) packed, each field checked
    as where a worker resumes it; ValueError (or TypeError) when it is not a record."""
    return pack_session(parse_record(record))


def unpack_record(packed: bytes) -> Record:
    """A packed record as JSON record; ValueError when it is not one."""
    if packed_size(packed) != len(packed):
        raise ValueError("not a packed session record")
    (proto, client6, cport, gw6, gwport, pool4, pport, target4, tport, state, timeout_s, flags,
     outer4, _rule_length) = PACKED.unpack_from(packed)
    if state >= len(STATE_NAMES):
        raise ValueError(f"bad state {state}")
    return [proto, client6.hex(), cport, gw6.hex(), gwport, pool4.hex(), pport, target4.hex(),
            tport, packed[PACKED.size:].decode(), STATE_NAMES[state], timeout_s,
            bool(flags & _ASSURED), outer4.hex() if flags & _HAS_OUTER4 else ""]


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"bad port {value!r}")
    return value


def _address(value: object, lengths: tuple[int, ...]) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"bad address {value!r}")
    packed = bytes.fromhex(value)
    if len(packed) not in lengths:
        raise ValueError(f"bad address {value!r}")
    return packed


def parse_record(record: object) -> Session:
    """A journal record as a (not yet indexed) Session; ValueError when it is not one. The
    records come from another process: each field is checked, nothing is trusted."""
    if not isinstance(record, list) or len(record) != len(RECORD_FIELDS):
        raise ValueError("not a session record")
    (proto, client6, cport, gw6, gwport, pool4, pport, target4, tport, rule, state, timeout_s,
     assured, outer4) = record
    if proto not in SESSION_PROTOCOLS or isinstance(proto, bool) or not isinstance(proto, int):
        raise ValueError(f"bad protocol {proto!r}")
    if not isinstance(rule, str) or state not in STATES or not isinstance(assured, bool):
        raise ValueError("bad rule, state or assured")
    if (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
            or not 0 < timeout_s <= 1e7):
        raise ValueError(f"bad timeout {timeout_s!r}")
    session = Session(proto, _address(client6, (16,)), _port(cport), _address(gw6, (16,)),
                      _port(gwport), _address(pool4, (4,)), _address(target4, (4,)),
                      _port(tport), rule, str(state), 0.0, float(timeout_s),
                      _address(outer4, (0, 4)), _port(pport))
    session.assured = assured
    return session


def _decrement(counts: dict[bytes, int], key: bytes) -> int:
    """One fewer of ``key`` (gone at 0); how many are left."""
    count = counts.get(key, 1) - 1
    if count:
        counts[key] = count
    else:
        counts.pop(key, None)
    return count
