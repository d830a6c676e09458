"""The flow table of one worker shard: RFC 6146-style bindings and sessions.

An IPv6 client (address, port) is bound to an IPv4 pool (address, port) the services see.
Each client address gets one pool address of this worker's slice ("paired" pooling, RFC 6888
REQ-2) and keeps its own source port (port preservation), so a pool (address, port) names
exactly one client (address, port) (RFC 6146 §3.1). Sessions (one per client transport address
and forward rule target) carry the RFC 6146 §3.5.2.2 TCP state and the §4 timeouts.

Limits: a global table size and a per source /64 count (RFC 6888 REQ-4); hitting one drops the
new flow and never evicts a live one (RFC 6888 REQ-11). A freed pool address goes to the back
of the free queue, so it is reused as late as possible (RFC 6888 REQ-8).

Pure: ``now`` is a monotonic float passed in; no I/O. State is plain data (``snapshot``) so a
restarted worker can later resume its shard.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from workers.drops import DropReason
from workers.packet import PROTO_TCP, PROTO_UDP

# TCP states of RFC 6146 §3.5.2.2 (CLOSED is "no session").
V6_INIT = "v6_init"
ESTABLISHED = "established"
V6_FIN = "v6_fin"
V4_FIN = "v4_fin"
V6_V4_FIN = "v6_v4_fin"
TRANS = "trans"
UDP_OPEN = "open"

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10


@dataclass(frozen=True)
class Timeouts:
    """RFC 6146 §4 constants; RFC 5382 REQ-5 asks for at least 2 h 4 min established."""

    tcp_established_s: float = 7440.0
    tcp_transitory_s: float = 240.0
    udp_s: float = 300.0
    icmp_s: float = 60.0


class Session:
    """One live session; attributes are plain values for speed (STYLE.md: hot path)."""

    __slots__ = ("proto", "client6", "cport", "gw6", "gwport", "pool4", "target4", "tport",
                 "rule", "state", "last_seen", "timeout_s", "prefix64", "created", "alive")

    def __init__(self, proto: int, client6: bytes, cport: int, gw6: bytes, gwport: int,
                 pool4: bytes, target4: bytes, tport: int, rule: str, state: str,
                 now: float, timeout_s: float) -> None:
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
        self.prefix64 = client6[:8]
        self.created = now
        self.alive = True  # False once the table removed it (caches drop it when they see it)

    @property
    def pport(self) -> int:
        """Pool port: the client's own port (port preservation)."""
        return self.cport

    def v6_key(self) -> tuple[int, bytes, int, bytes, int]:
        return (self.proto, self.client6, self.cport, self.gw6, self.gwport)

    def v4_key(self) -> tuple[int, bytes, int, bytes, int]:
        return (self.proto, self.pool4, self.cport, self.target4, self.tport)


class FlowTable:
    """Bindings and sessions of one worker shard, with limits and expiry."""

    def __init__(self, pool: list[bytes], max_flows: int, max_flows_per_prefix: int,
                 timeouts: Timeouts) -> None:
        self.max_flows = max_flows
        self.max_flows_per_prefix = max_flows_per_prefix
        self.timeouts = timeouts
        self.pool_size = len(pool)
        self._free: deque[bytes] = deque(pool)
        self._by_v6: dict[tuple[int, bytes, int, bytes, int], Session] = {}
        self._by_v4: dict[tuple[int, bytes, int, bytes, int], Session] = {}
        self._client_pool: dict[bytes, list[object]] = {}  # client6 -> [pool4, sessions]
        self._per_prefix: dict[bytes, int] = {}
        self._deadlines: list[tuple[float, int, tuple[int, bytes, int, bytes, int]]] = []
        self._seq = 0
        self.created_total = 0
        self.expired_total = 0
        # Kept up to date on create/remove so a metrics scrape never walks a million sessions.
        self.active_by_proto: dict[int, int] = {}
        self.created_by_proto: dict[int, int] = {}
        # When a list, every removed session is appended (the datapath drops its templates).
        self.removed: list[Session] | None = None

    def __len__(self) -> int:
        return len(self._by_v6)

    def count(self, proto: int) -> int:
        return self.active_by_proto.get(proto, 0)

    def pool_in_use(self) -> int:
        return len(self._client_pool)

    # --- lookups ------------------------------------------------------------------------------

    def lookup_v6(self, proto: int, client6: bytes, cport: int, gw6: bytes,
                  gwport: int) -> Session | None:
        return self._by_v6.get((proto, client6, cport, gw6, gwport))

    def lookup_v4(self, proto: int, pool4: bytes, pport: int, target4: bytes,
                  tport: int) -> Session | None:
        return self._by_v4.get((proto, pool4, pport, target4, tport))

    # --- creation -----------------------------------------------------------------------------

    def create(self, proto: int, client6: bytes, cport: int, gw6: bytes, gwport: int,
               target4: bytes, tport: int, rule: str, now: float) -> Session | DropReason:
        """Create a session for a new flow from an IPv6 client, or say why not."""
        if len(self._by_v6) >= self.max_flows:
            return DropReason.FLOW_LIMIT
        prefix = client6[:8]
        if self._per_prefix.get(prefix, 0) >= self.max_flows_per_prefix:
            return DropReason.PREFIX_FLOW_LIMIT
        binding = self._client_pool.get(client6)
        if binding is None:
            if not self._free:
                return DropReason.POOL_EXHAUSTED
            pool4 = self._free[0]
        else:
            pool4 = binding[0]  # type: ignore[assignment]
        v4_key = (proto, pool4, cport, target4, tport)
        if v4_key in self._by_v4:
            return DropReason.PORT_IN_USE
        if binding is None:
            self._free.popleft()
            binding = [pool4, 0]
            self._client_pool[client6] = binding
        binding[1] = binding[1] + 1  # type: ignore[operator]
        if proto == PROTO_TCP:
            state, timeout = V6_INIT, self.timeouts.tcp_transitory_s
        elif proto == PROTO_UDP:
            state, timeout = UDP_OPEN, self.timeouts.udp_s
        else:
            state, timeout = UDP_OPEN, self.timeouts.icmp_s
        session = Session(proto, client6, cport, gw6, gwport, pool4, target4, tport, rule,
                          state, now, timeout)
        v6_key = session.v6_key()
        self._by_v6[v6_key] = session
        self._by_v4[v4_key] = session
        self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
        self._schedule(now + timeout, v6_key)
        self.created_total += 1
        self.created_by_proto[proto] = self.created_by_proto.get(proto, 0) + 1
        self.active_by_proto[proto] = self.active_by_proto.get(proto, 0) + 1
        return session

    # --- state --------------------------------------------------------------------------------

    def touch_tcp(self, session: Session, flags: int, from_v6: bool, now: float) -> None:
        """Advance the RFC 6146 §3.5.2.2 TCP state machine for one segment."""
        session.last_seen = now
        state = session.state
        t = self.timeouts
        if flags & TCP_RST:
            # RFC 6146 §3.5.2.2: a RST moves the session to TRANS with the transitory lifetime.
            self._shorten(session, TRANS, t.tcp_transitory_s, now)
            return
        if state == V6_INIT:
            if not from_v6 and flags & TCP_SYN:
                session.state, session.timeout_s = ESTABLISHED, t.tcp_established_s
        elif state == ESTABLISHED:
            if flags & TCP_FIN:
                session.state = V6_FIN if from_v6 else V4_FIN
        elif state == V6_FIN:
            if not from_v6 and flags & TCP_FIN:
                self._shorten(session, V6_V4_FIN, t.tcp_transitory_s, now)
        elif state == V4_FIN:
            if from_v6 and flags & TCP_FIN:
                self._shorten(session, V6_V4_FIN, t.tcp_transitory_s, now)
        elif state == TRANS:
            # RFC 6146 §3.5.2.2: any non-RST packet in TRANS makes the session live again.
            session.state, session.timeout_s = ESTABLISHED, t.tcp_established_s

    def _shorten(self, session: Session, state: str, timeout_s: float, now: float) -> None:
        """Enter ``state``; a lifetime shorter than the scheduled one gets its own heap entry
        (a longer one is found when the old entry pops)."""
        session.state = state
        if timeout_s < session.timeout_s:
            self._schedule(now + timeout_s, session.v6_key())
        session.timeout_s = timeout_s

    def touch(self, session: Session, now: float) -> None:
        session.last_seen = now

    # --- expiry -------------------------------------------------------------------------------

    def _schedule(self, deadline: float, key: tuple[int, bytes, int, bytes, int]) -> None:
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, key))

    def expire(self, now: float, budget: int = 10000) -> int:
        """Remove sessions idle past their timeout; at most ``budget`` heap entries per call.

        The heap holds each session's earliest possible deadline; a popped entry whose session
        was seen since is pushed again with its new deadline (lazy deletion, O(log n) each).
        """
        removed = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now and budget > 0:
            budget -= 1
            _deadline, _seq, key = heapq.heappop(heap)
            session = self._by_v6.get(key)
            if session is None:
                continue
            deadline = session.last_seen + session.timeout_s
            if deadline > now:
                self._schedule(deadline, key)
                continue
            self._remove(session)
            removed += 1
        self.expired_total += removed
        return removed

    def _remove(self, session: Session) -> None:
        del self._by_v6[session.v6_key()]
        session.alive = False
        self.active_by_proto[session.proto] -= 1
        if self.removed is not None:
            self.removed.append(session)
        self._by_v4.pop(session.v4_key(), None)
        count = self._per_prefix.get(session.prefix64, 1) - 1
        if count:
            self._per_prefix[session.prefix64] = count
        else:
            self._per_prefix.pop(session.prefix64, None)
        binding = self._client_pool.get(session.client6)
        if binding is not None:
            binding[1] = binding[1] - 1  # type: ignore[operator]
            if binding[1] == 0:
                del self._client_pool[session.client6]
                self._free.append(session.pool4)  # RFC 6888 REQ-8: reused last

    # --- views --------------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        return list(self._by_v6.values())

    def snapshot(self) -> list[dict[str, object]]:
        """Plain-data state of every session (hex addresses), for listing and resumption."""
        return [
            {
                "proto": s.proto, "client6": s.client6.hex(), "cport": s.cport,
                "gw6": s.gw6.hex(), "gwport": s.gwport, "pool4": s.pool4.hex(),
                "target4": s.target4.hex(), "tport": s.tport, "rule": s.rule,
                "state": s.state, "last_seen": s.last_seen, "timeout_s": s.timeout_s,
            }
            for s in self._by_v6.values()
        ]
