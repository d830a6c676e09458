"""One worker shard's packet engine: what happens to each packet, as data in and data out.

One entry per direction, each taking a batch and ``now`` and returning an ``Output`` (what to
send to the services, what to send into the tunnel), the way aioquic's ``datagrams_to_send``
hands datagrams back: ``Datapath.from_tunnel`` takes captured IPv4 protocol-41 packets (the
same for kernel and coordinator fan-out: the tunnel checks of ``workers/engine/tunnel.py`` run
here), ``Datapath.from_services`` the IPv4 packets services sent to pool addresses, and
``Datapath.tick`` runs the timers. Every packet that goes nowhere is counted under one
``DropReason``; a packet that raises is counted as INTERNAL_ERROR, here and only here, and
handed back in ``Output.raised`` for the shell to log. The I/O shell (``workers/main.py``)
sends what it is given.

Rules implemented here, by RFC: echo responder (RFC 4443 §4.2); translation (RFC 7915 §4,
§5); sessions (RFC 6146); RST for closed ports (RFC 9293 §3.10.7.1); port unreachable and
parameter problem (RFC 4443 §3.1, §3.4), rate-limited (RFC 4443 §2.4(f)); hop limit (RFC
7915 §5.1, RFC 4443 §3.3); reassembly and fragmentation (RFC 8200 §4.5). Pure: ``now`` is
passed in, no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from sixgate.workers.engine.clat import Clat
from sixgate.workers.engine.counters import Counters, LimitHits
from sixgate.workers.engine.drops import ICMP_ERROR_EVENTS, DropReason, Event
from sixgate.workers.engine.fastpath import (
    EchoTemplate,
    InTemplate,
    OutTemplate,
    compiled,
    echo_inbound_template,
    echo_return_template,
    echo_template,
    fast_echo_reply,
    fast_echo_v4_to_v6,
    fast_echo_v6_to_v4,
    fast_v4_to_v6,
    fast_v6_to_v4,
    inbound_template,
    return_template,
)
from sixgate.workers.engine.flows import (
    ESTABLISHED,
    NAT64_RULE,
    FlowTable,
    Key,
    PortPool,
    Session,
    ShardedPortPool,
)
from sixgate.workers.engine.fragment import OuterReassembler, Reassembler, fragment_ipv6
from sixgate.workers.engine.icmp import (
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY,
    ICMP_FRAGMENTATION_NEEDED,
    ICMP_PARAMETER_PROBLEM,
    ICMP_PORT_UNREACHABLE,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_NEIGHBOR_SOLICITATION,
    ICMPV6_PARAMETER_PROBLEM,
    ICMPV6_TIME_EXCEEDED,
    ND_HOP_LIMIT,
    TIME_EXCEEDED_HOP_LIMIT,
    TIME_EXCEEDED_REASSEMBLY,
    UNREACH_ADMIN_PROHIBITED,
    UNREACH_PORT,
    SourceRateLimiter,
    echo_reply,
    icmpv6_error,
    may_send_error,
    neighbor_advertisement,
    tcp_probe,
    tcp_reset,
    tcp_reset_v4,
)
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.packet import (
    IPV4_DF,
    IPV4_MF,
    IPV4_OFFSET_MASK,
    PARAM_UNRECOGNIZED_NEXT_HEADER,
    PORTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_IPV6,
    PROTO_NONE,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    IPv6View,
    ParameterProblem,
    build_ipv4,
    build_ipv6,
    checksum,
    parse_ipv4,
    parse_ipv6,
    pseudo_sum_v6,
    sum16,
    sum_is_valid,
)
from sixgate.workers.engine.settings import (
    Settings,
    pool_shard,
    source_allowed,
    worker_pool4,
    worker_shards,
)
from sixgate.workers.engine.translate import (
    DF_THRESHOLD,
    hop_limit_after,
    icmpv4_error_key,
    icmpv6_error_key,
    translate_echo_v4_to_v6,
    translate_echo_v6_to_v4,
    translate_icmpv4_error,
    translate_icmpv6_error,
    translate_v4_to_v6,
    translate_v6_to_v4,
)
from sixgate.workers.engine.tunnel import (
    Tunnel,
    TunnelPolicy,
    TunnelTable,
    check_inbound,
)
from sixgate.workers.engine.wire import inner_shard, nat64_shard

# Counter keys of the fast path, by protocol (the same keys Counters.count builds; a NAT64
# echo counts as "icmp" on both sides).
INBOUND_KEYS = {PROTO_TCP: ("inbound", "tcp"), PROTO_UDP: ("inbound", "udp"),
                PROTO_ICMP: ("inbound", "icmp")}
TO_SERVICES_KEYS = {PROTO_TCP: ("to_services", "tcp"), PROTO_UDP: ("to_services", "udp"),
                    PROTO_ICMP: ("to_services", "icmp")}
FROM_SERVICES_KEYS = {PROTO_TCP: ("from_services", "tcp"), PROTO_UDP: ("from_services", "udp"),
                      PROTO_ICMP: ("from_services", "icmp")}
OUTBOUND_KEYS = {PROTO_TCP: ("outbound", "tcp"), PROTO_UDP: ("outbound", "udp"),
                 PROTO_ICMP: ("outbound", "icmp")}
NO_ECHO = (0, 0, 0)
ECHO_TEMPLATES = 4096


def compiled_retry(index: int, start: int, misses: int) -> tuple[int, int]:
    """(index, misses) from which a batch loop asks its compiled loop again, which left the
    packet at ``index`` to Python: after that packet; after 2, 4, ... 64 when it took none
    ``misses`` times in a row (new sessions: a connection storm, a SYN flood), as the Python
    loop translates plain packets too (issue 21: flow setup)."""
    misses = misses + 1 if index == start else 0
    return index + (1 << min(misses, 6)), misses


def _echo_key_v6(packet: bytes | memoryview) -> bytes:
    """An ICMPv6 echo's template key: its addresses, its identifier and 0 (the session's
    client, gateway address, cport, gwport)."""
    return bytes(packet[8:40]) + bytes(packet[44:46]) + b"\0\0"


def _echo_key_v4(packet: bytes | memoryview) -> bytes:
    """An ICMPv4 echo reply's template key: its addresses, 0 and its identifier (the
    session's target4, pool4, tport, pport)."""
    return bytes(packet[12:20]) + b"\0\0" + bytes(packet[24:26])

# The largest transport segment an IPv4 packet holds: 65535 - a 20-byte IPv4 header.
MAX_TRANSLATED_SEGMENT = 65535 - 20

# Rule lookup value: (label, target IPv4 bytes, target port, source filter or None)
RuleTarget = tuple[str, bytes, int, tuple[tuple[int, int], ...] | None]


@dataclass(slots=True)
class Output:
    """What one call into the engine gives the shell to send."""

    to_services: list[bytes]  # IPv4 packets for the services (the TUN device)
    to_tunnel: list[tuple[bytes, bytes]]  # (IPv6 packet, outer IPv4 destination)
    raised: Exception | None = None  # the last exception a packet raised (INTERNAL_ERROR)
    # NAT64: IPv6 packets for the IPv6 side (the TUN device; the IPv4 ones are to_services).
    to_ipv6: list[bytes] = field(default_factory=list)


class DeviceLoops(NamedTuple):
    """What a compiled loop around a worker's devices and capture (workers/_tunread.c
    ``serve``) needs to translate their plain packets as ``from_ipv6``, ``from_services`` and
    ``from_tunnel`` would: the engine's compiled batch loops, their template tables and
    arguments, in ``serve``'s order."""

    inbound: Callable[..., tuple[int, ...]]
    in_caches: dict[int, dict[bytes, InTemplate]]
    returning: Callable[..., tuple[int, ...]]
    out_caches: dict[int, dict[bytes, OutTemplate]]
    ident: int  # the next IPv4 identification's predecessor
    established: object
    df_threshold: int
    mtu: int
    tunnel_caches: dict[int, dict[bytes, InTemplate]]  # ``from_tunnel``'s, keyed with the outer
    echoes: dict[bytes, EchoTemplate]  # echo requests to us through the tunnel
    allow: Callable[[bytes, float], bool]  # the echo limit (RFC 4443 §2.4(f))
    # A new session's first packet and its first answers, in the compiled loops as in the
    # engine's batch calls (``_open_from_ipv6``, ``_open_from_tunnel``, ``_returned``).
    open_from_ipv6: Callable[[bytes, float], object]
    open_from_tunnel: Callable[[bytes, float], object]
    returner: Callable[[bytes, float], object]
    max_mss: int
    # The engine's own output lists (``pending`` takes them): what those calls answered
    # there (a refused first packet's answer); the loop returns when one holds any.
    pending: tuple[list[bytes], list[tuple[bytes, bytes]], list[bytes]]
    # The flow table's journal (changed sessions, removed keys; None: not kept) and the
    # seconds within which the loop returns once it holds anything (the shell sends it).
    journal: tuple[dict[Session, None], list[Key]] | None
    journal_s: float

# RFC 6146 §4 TCP_INCOMING_SYN: how long an IPv4 SYN to no binding waits for the client's own
# SYN before it is answered with port unreachable; at most this many wait at once (§5.3).
TCP_INCOMING_SYN_S = 6.0
MAX_HELD_SYNS = 1024
# A reload's probe is sent again this long after the next tick: past Linux's per-socket limit
# of one out-of-window answer per net.ipv4.tcp_invalid_ratelimit (500 ms).
PROBE_AGAIN_S = 0.6
# How long after its second probe a connection a reload ended is still answered with a RST
# past the RFC 4443 §2.4(f) buckets (its answers are the probes' own, not a reflection).
PROBE_ANSWERS_S = 2.0


def build_rule_table(settings: Settings) -> dict[tuple[int, int], RuleTarget]:
    """(proto, destination port) -> target, for every port of every forward rule."""
    table: dict[tuple[int, int], RuleTarget] = {}
    for rule in settings.forwards:
        proto = PROTO_TCP if rule.proto == "tcp" else PROTO_UDP
        target = ipaddress.IPv4Address(rule.target_ipv4).packed
        sources = rule.source_filter()
        for port in range(rule.port_lo, rule.port_hi + 1):
            table[(proto, port)] = (rule.label, target, rule.target_for(port), sources)
    return table


class Datapath:
    """The packet engine of one worker shard."""

    def __init__(self, settings: Settings, pool: list[bytes] | dict[int, list[bytes]],
                 workers: int = 1, fast_path: bool = True, index: int = 0) -> None:
        self.settings = settings
        self.workers = workers
        # [gateway] shards above the workers: a new client's pool address comes from its
        # fan-out shard's slice (settings.shard_pools; workers/engine/wire.py inner_shard).
        self._shards = settings.shard_count if isinstance(pool, dict) else 0
        sharded = settings.shard_count != workers
        self.mtu = settings.engine_mtu
        self.max_mss = settings.max_mss
        self.mode = settings.mode
        # CLAT (mode "clat", or beside the NAT64 in its worker 0): stateless, its prefix
        # resolved by the coordinator at the start.
        self.clat = (Clat(Nat64Prefix.parse(settings.clat_plat_prefix),
                          ipaddress.IPv6Address(settings.clat_ipv6_address).packed,
                          ipaddress.IPv4Address(settings.clat_ipv4_address).packed,
                          settings.clat_mtu, settings.clat_udp_zero_checksum)
                     if settings.clat_enabled and index == 0
                     and settings.clat_plat_prefix != "auto" else None)
        self.rules = build_rule_table(settings)
        # NAT64 (RFC 6146): IPv6 to the prefix from the IPv6 side, pool4 ports of this worker.
        self.nat64: Nat64Prefix | None = None
        ports = None
        # Beside a tunnel ([tunnel] and [nat64]) or alone (mode "nat64"); IPv6 to the prefix
        # comes from the TUN devices (``from_ipv6``) or through the tunnel (``nat64_tun``).
        self.nat64_tun = settings.nat64_input == "tun"
        self.nat64_alone = settings.mode == "nat64"
        self.pool4_addresses = frozenset(ipaddress.IPv4Address(row[0]).packed
                                         for row in settings.nat64_pool4)
        self._entry_tun = False  # the packets being handled came from the TUN devices
        if settings.nat64_prefix:
            self.nat64 = Nat64Prefix.parse(settings.nat64_prefix)
            # [gateway] shards: each shard's slice of pool4, a client's ports from its own.
            ports = (ShardedPortPool({shard: worker_pool4(settings.nat64_pool4,
                                                          settings.shard_count, shard)
                                      for shard in worker_shards(settings.shard_count,
                                                                 workers, index)},
                                     settings.nat64_port_hold_s) if sharded
                     else PortPool(worker_pool4(settings.nat64_pool4, workers, index),
                                   settings.nat64_port_hold_s))
            self._set_nat64_policy(settings)
        self.flows = FlowTable.for_shard(
            pool, workers, settings.max_flows, settings.max_flows_per_prefix, settings.timeouts,
            max_flows_per_48=settings.max_flows_per_48,
            max_flows_per_ipv4_source=settings.max_flows_per_ipv4_source, ports=ports,
            port_quota=settings.nat64_ports_per_client if ports is not None else None,
            quota_prefix_bytes=settings.nat64_client_prefix // 8,
            shard_of=pool_shard(settings.pool, self._shards) if self._shards else None,
            client_shard=self._client_shard if sharded and ports is not None else None)
        self.reassembler = Reassembler(settings.fragment_datagrams, settings.fragment_bytes)
        # NAT64: IPv4 fragments from the internet (RFC 791 §3.2), within the same bounds.
        self.reassembler4 = (OuterReassembler(settings.fragment_datagrams,
                                              settings.fragment_bytes)
                             if self.nat64 is not None else None)
        self._fragmented = False  # the packet being translated came in IPv6 fragments
        # NAT64: IPv4 SYNs to no binding, waiting (RFC 6146 §3.5.2.2), oldest first:
        # (pool4, pool port, remote IPv4, remote port) -> (deadline, the SYN)
        self._held_syns: dict[tuple[bytes, int, bytes, int], tuple[float, bytes]] = {}
        self._set_rate_limits(settings)
        self.counters = Counters()
        # The tunnels, each with its checks (workers/engine/tunnel.py) and their cache of
        # address verdicts; a NAT64 or CLAT gateway has none.
        tunnels = [Tunnel(
            entry.name,
            TunnelPolicy.build(entry.mode, settings.local_ipv4, entry.remote_ipv4,
                               list(entry.addresses), entry.martian_ipv4,
                               None if self.nat64_tun else self.nat64, settings.known_ipv4,
                               entry.sixrd(settings.known_ipv4)),
            ipaddress.IPv4Address(entry.relay_ipv4).packed if entry.relay_ipv4 else None,
            set()) for entry in settings.all_tunnels()]
        self.tunnels = TunnelTable.build(tunnels) if tunnels else None
        self.addresses = frozenset().union(*(t.policy.addresses for t in tunnels))
        self._our_objects = {address: address for address in self.addresses}
        # The tunnel of the packet being answered (``_outer_for``).
        self._tunnel = self.tunnels.any_source if self.tunnels is not None else None
        # What the current call produced, handed back as its Output (``_take``).
        self._to_services: list[bytes] = []
        self._to_tunnel: list[tuple[bytes, bytes]] = []
        self._to_ipv6: list[bytes] = []
        self._raised: Exception | None = None
        self._ident4 = 0
        self._ident6 = 0
        self.limit_hits = LimitHits()
        self._now = 0.0  # the time of the packet being handled, for the error rate limiter
        # Probes of sessions a reload ended, sent once more PROBE_AGAIN_S after the next tick
        # (``reconfigure``, which knows no time); that tick sets when.
        self._probes_again: list[tuple[bytes, bytes]] = []  # (to the client, to the service)
        self._probes_due: float | None = None
        # The connections probed, keyed as ``_fast_in`` (client, gateway address, ports):
        # their answers are reset at once until ``_probed_until``, however many come.
        self._probed: set[bytes] = set()
        self._probed_until = float("inf")
        self._outer4 = b""  # its outer IPv4 source (6to4: counted per source by the flows)
        # workers/engine/fastpath.py templates of live sessions, keyed by the packet bytes that name
        # the session: IPv6 src, dst, ports (inbound); IPv4 src, dst, ports (return); a NAT64
        # echo's under its packets' protocol, the identifier for the ports (``_echo_key_*``).
        self.fast_path = fast_path
        # The fast path's batch loops compiled (workers/engine/_fastpath.c): they take the
        # plain packets of a batch up to the first one they leave to the loops below.
        self.compiled = compiled if fast_path and settings.compiled_fast_path else None
        self._fast_in: dict[int, dict[bytes, InTemplate]] = {PROTO_TCP: {}, PROTO_UDP: {},
                                                             PROTO_ICMPV6: {}}
        self._fast_out: dict[int, dict[bytes, OutTemplate]] = {PROTO_TCP: {}, PROTO_UDP: {},
                                                               PROTO_ICMP: {}}
        # Kernel fan-out (``from_tunnel``): the same inbound templates keyed by the captured
        # packet's outer source and destination plus the inner addresses and ports, so one
        # lookup stands for the tunnel checks (all address-only, workers/engine/tunnel.py) and the
        # session. Entries of removed sessions go when next seen; the size is bounded.
        self._fast_tunnel: dict[int, dict[bytes, InTemplate]] = {PROTO_TCP: {}, PROTO_UDP: {}}
        self._fast_tunnel_max = 2 * self.flows.max_flows + 1024
        # Echo requests to our addresses (fastpath.EchoTemplate) from known tunnel addresses,
        # keyed by the outer and inner addresses; at most ECHO_TEMPLATES.
        self._fast_echo: dict[bytes, EchoTemplate] = {}
        self.flows.removed = []

    # --- helpers ------------------------------------------------------------------------------

    def _client_shard(self, client6: bytes) -> int:
        return nat64_shard(client6, self.settings.hash_seed, self.settings.shard_count)

    def _set_rate_limits(self, settings: Settings) -> None:
        """RFC 4443 §2.4(f): errors and RSTs, and echo replies (reflection: one source must not
        turn the gateway into a firehose), each per source /64 and in all."""
        self.error_limiter = SourceRateLimiter(settings.icmp_errors_per_s,
                                               settings.icmp_error_burst)
        self.echo_limiter = SourceRateLimiter(settings.echo_replies_per_s, settings.echo_burst)

    def _take(self) -> Output:
        """Hand over what was produced since the last call."""
        out = Output(self._to_services, self._to_tunnel, self._raised, self._to_ipv6)
        self._to_services = []
        self._to_tunnel = []
        self._to_ipv6 = []
        self._raised = None
        return out

    def _internal_error(self, exc: Exception) -> None:
        """The one per-packet guard's count: a packet that raised costs only itself."""
        self.counters.drops[DropReason.INTERNAL_ERROR] += 1
        self._raised = exc

    def _drop(self, reason: DropReason) -> None:
        self.counters.drops[reason] += 1

    def _send_v6(self, packet: bytes, proto: int) -> None:
        """Queue an IPv6 packet for the tunnel or (NAT64 clients on this host's side) the TUN
        devices, fragmenting it to the MTU."""
        dst = packet[24:40]
        outer = self._outer_for(dst, packet[8:24])
        if outer is None:
            self._drop(DropReason.INTERNAL_ERROR)
            return
        if len(packet) > self.mtu:
            self._ident6 = (self._ident6 + 1) & 0xFFFFFFFF
            traffic_class = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
            pieces = fragment_ipv6(packet[8:24], dst, packet[6], packet[40:], self.mtu,
                                   self._ident6, hop_limit=packet[7],
                                   traffic_class=traffic_class)
            self.counters.event(Event.FRAGMENTS_SENT, len(pieces))
        else:
            pieces = [packet]
        for piece in pieces:
            if outer:
                self._to_tunnel.append((piece, outer))
            else:
                self._to_ipv6.append(piece)
            self.counters.count("outbound", proto, len(piece))

    def _outer_for(self, client6: bytes, our6: bytes) -> bytes | None:
        """Where an IPv6 packet from ``our6`` to ``client6`` goes: b"" for the TUN devices (a
        NAT64 alone, or one whose clients are on this host's side: routed by destination, as
        a router does), else the endpoint of the tunnel ``our6`` belongs to (``TunnelTable``)
        (None: no way there)."""
        if self.nat64_alone or (self.nat64_tun and self.nat64 is not None
                                and source_allowed(self.nat64_clients, client6)):
            return b""
        tunnels = self.tunnels
        if tunnels is None:
            return None
        tunnel = tunnels.by_address.get(our6, self._tunnel)
        return tunnel.outer_destination(client6) if tunnel is not None else None

    def _error(self, packet: bytes | memoryview, view: IPv6View, icmp_type: int, code: int,
               rest: int = 0) -> None:
        """Send an ICMPv6 error about ``packet`` (parsed as ``view``) if RFC 4443 §2.4 allows."""
        self._send_error(packet, view[3], view[4], view[5], icmp_type, code, rest)

    def _send_error(self, packet: bytes | memoryview, our_address: bytes, upper_proto: int,
                    upper_offset: int, icmp_type: int, code: int, rest: int = 0,
                    to_multicast: bool = False) -> None:
        """The one way an ICMPv6 error leaves: RFC 4443 §2.4(e) (never about an error, a
        multicast destination unless ``to_multicast``, an unspecified or multicast source) and
        (f) (per-source token buckets), then counted as the event of its type and code."""
        if not may_send_error(packet, upper_proto, upper_offset, to_multicast):
            return
        # RFC 4443 §2.4(f): originated errors are rate-limited (token buckets). The packet is
        # already counted under the reason it was refused for: this is an event, not a drop.
        if not self.error_limiter.allow(packet[8:24], self._now):
            self.counters.event(Event.REPLIES_SUPPRESSED)
            return
        self.counters.event(ICMP_ERROR_EVENTS[icmp_type, code])
        self._send_v6(icmpv6_error(our_address, packet, icmp_type, code, rest), PROTO_ICMPV6)

    def _parameter_problem(self, packet: bytes | memoryview, problem: ParameterProblem) -> None:
        """A packet the RFC 8200 §4 host rules refuse: counted under its one reason and, if it
        was addressed to us and RFC 4443 §2.4 allows, answered with a Parameter Problem."""
        self._drop(problem.reason)
        our_address = bytes(packet[24:40])
        if our_address in self.addresses:
            # The chain is broken, so whether it holds an ICMPv6 error is unknown (upper
            # protocol -1): only the address rules of §2.4(e) apply.
            self._send_error(packet, our_address, -1, 0, ICMPV6_PARAMETER_PROBLEM, problem.code,
                             problem.pointer, problem.to_multicast)

    def _reset(self, packet: bytes | memoryview, view: IPv6View) -> None:
        rst = tcp_reset(packet, view[5])
        if rst is None:
            return
        if self._probed and self._now <= self._probed_until and (
                bytes(packet[8:40]) + bytes(packet[view[5]:view[5] + 4]) in self._probed):
            pass  # the answer to a reload's probe: ours to finish, one per connection
        elif not self.error_limiter.allow(packet[8:24], self._now):
            self.counters.event(Event.REPLIES_SUPPRESSED)
            return
        self.counters.event(Event.TCP_RST_SENT)
        self._send_v6(rst, PROTO_TCP)

    # --- inbound: IPv6 from the tunnel --------------------------------------------------------

    def from_tunnel(self, packets: Iterable[bytes], now: float) -> Output:
        """Captured IPv4 protocol-41 packets, in order: the tunnel checks of
        ``check_inbound``, then ``_inbound``.

        A plain packet of a known session from known tunnel addresses takes one lookup, keyed
        by its outer source and destination and its inner addresses and ports: the tunnel
        checks depend on those addresses only (workers/engine/tunnel.py), and the session on those
        plus the ports. RFC 4213 §3.6: the outer packet must be exactly one IPv6 packet here;
        options, padding and everything else take ``_from_tunnel_full``. Per packet this loop
        is most of a worker's Python time: it keeps what it touches in locals and adds its
        counters once per batch. A packet that raises is counted as INTERNAL_ERROR and handed
        back in ``Output.raised``; the rest of the batch goes on."""
        fast = self.fast_path
        caches = self._fast_tunnel
        append = self._to_services.append
        touch_tcp = self.flows.touch_tcp
        ident = self._ident4
        udp_n = udp_in = udp_out = tcp_n = tcp_in = tcp_out = 0  # packets, bytes in, out
        packets = packets if isinstance(packets, list) else list(packets)
        loops, total, index, totals = self.compiled, len(packets), 0, [0] * 13
        retry = misses = 0
        allow, echoes, mtu = self.echo_limiter.allow, self._fast_echo, self.mtu
        while index < total:
            if loops is not None and index >= retry:
                self._ident4 = ident  # what _run_compiled hands back if the loop fails
                start = index
                index, ident = self._run_compiled(
                    loops.inbound, totals, packets, index, caches, 20, ident, now, ESTABLISHED,
                    DF_THRESHOLD, self._to_services, self._to_tunnel, echoes, allow, mtu,
                    self._open_from_tunnel, self.max_mss)
                if index >= total:
                    break
                retry, misses = compiled_retry(index, start, misses)
            packet = packets[index]
            index += 1
            try:
                size = len(packet)
                template = None
                if (fast and size >= 64 and packet[0] == 0x45 and packet[9] == PROTO_IPV6
                        and packet[20] >> 4 == 6 and (packet[2] << 8) | packet[3] == size):
                    proto = packet[26]
                    if proto == PROTO_ICMPV6:
                        echo = echoes.get(packet[12:20] + packet[28:60])
                        reply = (None if echo is None
                                 else fast_echo_reply(packet[20:], echo, mtu))
                        if reply is not None and echo is not None:
                            self._echo_answered(reply, echo[1], size - 20,
                                                allow(packet[28:44], now), totals)
                            continue
                    cache = caches.get(proto)
                    if cache is not None:
                        key = packet[12:20] + packet[28:64]
                        template = cache.get(key)
                        if template is not None and not template[0].alive:
                            del cache[key]
                            template = None
                out = (None if template is None
                       else fast_v6_to_v4(packet[20:], proto, template, (ident + 1) & 0xFFFF))
                if out is None:
                    self._ident4 = ident
                    self._from_tunnel_full(packet, now)
                    ident = self._ident4
                    continue
                ident = (ident + 1) & 0xFFFF
                append(out)
                session = template[0]  # type: ignore[index]
                if proto == PROTO_UDP:
                    session.last_seen = now
                    udp_n += 1
                    udp_in += size - 20
                    udp_out += len(out)
                else:
                    touch_tcp(session, packet[73], True, now)
                    tcp_n += 1
                    tcp_in += size - 20
                    tcp_out += len(out)
            except Exception as exc:  # noqa: BLE001 - one packet must never kill the batch
                self._internal_error(exc)
                ident = self._ident4
        self._ident4 = ident
        self._count_batch(INBOUND_KEYS, TO_SERVICES_KEYS, (udp_n, udp_in, udp_out),
                          (tcp_n, tcp_in, tcp_out), totals)
        self._count_echoes(totals[9:])
        return self._take()

    def _echo_answered(self, reply: bytes, outer: bytes, size: int, allowed: bool,
                       totals: list[int]) -> None:
        """The Python loop's echo request of ``size`` bytes to us: its ``reply`` out to
        ``outer`` if the echo limit ``allowed`` it; counted in ``totals[9:13]`` as the
        compiled loop counts (``_count_echoes``)."""
        totals[9] += 1
        totals[10] += size
        if allowed:
            self._to_tunnel.append((reply, outer))
            totals[11] += 1
            totals[12] += len(reply)

    def _count_echoes(self, echoes: list[int]) -> None:
        """A batch's echo requests to us answered from templates: (requests, their bytes,
        replies, their bytes); a request without a reply is the echo limit's (RFC 4443
        §2.4(f)), counted as the full path counts it."""
        requests, request_bytes, replies, reply_bytes = echoes
        if requests:
            counters = self.counters
            packets, octets = counters.packets, counters.bytes
            packets[INBOUND_KEYS[PROTO_ICMP]] += requests
            octets[INBOUND_KEYS[PROTO_ICMP]] += request_bytes
            packets[OUTBOUND_KEYS[PROTO_ICMP]] += replies
            octets[OUTBOUND_KEYS[PROTO_ICMP]] += reply_bytes
            if replies:
                counters.event(Event.ECHO_REPLIES, replies)
            if requests > replies:
                counters.drop(DropReason.ICMP_RATE_LIMITED, requests - replies)

    def from_ipv6(self, packets: Iterable[bytes], now: float) -> Output:
        """NAT64: IPv6 packets from the IPv6 side (the kernel routed the prefix to our TUN),
        in order, each through ``_inbound``; a packet that raises costs only itself."""
        if self.nat64 is None or not self.nat64_tun:
            # Only a NAT64 for this host's side takes IPv6 from the TUN devices.
            packets = list(packets)
            self.counters.drop(DropReason.NOT_OUR_ADDRESS, len(packets))
            return self._take()
        # The loop of ``from_tunnel`` without the outer header: a plain packet of a session
        # with an inbound template is translated here with one lookup (the same template and
        # checks ``_inbound`` would use first); everything else takes ``_inbound``.
        self._entry_tun = True
        fast = self.fast_path
        templates = self._fast_in
        append = self._to_services.append
        touch_tcp = self.flows.touch_tcp
        ident = self._ident4
        udp_n = udp_in = udp_out = tcp_n = tcp_in = tcp_out = 0  # packets, bytes in, out
        echo_n = echo_in = echo_out = 0
        packets = packets if isinstance(packets, list) else list(packets)
        loops, total, index, totals = self.compiled, len(packets), 0, [0] * 13
        retry = misses = 0
        while index < total:
            if loops is not None and index >= retry:
                self._ident4 = ident  # what _run_compiled hands back if the loop fails
                start = index
                index, ident = self._run_compiled(
                    loops.inbound, totals, packets, index, templates, 0, ident, now, ESTABLISHED,
                    DF_THRESHOLD, self._to_services, self._to_tunnel, None, None, 0,
                    self._open_from_ipv6, self.max_mss)
                if index >= total:
                    break
                retry, misses = compiled_retry(index, start, misses)
            packet = packets[index]
            index += 1
            try:
                size = len(packet)
                template = None
                if fast and size >= 48 and packet[0] >> 4 == 6:
                    proto = packet[6]
                    cache = templates.get(proto)
                    if cache is not None:
                        template = cache.get(bytes(packet[8:44]) if proto != PROTO_ICMPV6
                                             else _echo_key_v6(packet))
                if template is None:
                    out = None
                elif proto == PROTO_ICMPV6:
                    out = fast_echo_v6_to_v4(packet, template, (ident + 1) & 0xFFFF)
                else:
                    out = fast_v6_to_v4(packet, proto, template, (ident + 1) & 0xFFFF)
                if out is None:
                    self._ident4 = ident
                    self._inbound(packet, now)
                    ident = self._ident4
                    continue
                ident = (ident + 1) & 0xFFFF
                append(out)
                session = template[0]  # type: ignore[index]
                if proto == PROTO_UDP:
                    session.last_seen = now
                    udp_n += 1
                    udp_in += size
                    udp_out += len(out)
                elif proto == PROTO_ICMPV6:
                    session.last_seen = now
                    echo_n += 1
                    echo_in += size
                    echo_out += len(out)
                else:
                    touch_tcp(session, packet[53], True, now)
                    tcp_n += 1
                    tcp_in += size
                    tcp_out += len(out)
            except Exception as exc:  # noqa: BLE001 - one packet must never kill the batch
                self._internal_error(exc)
                ident = self._ident4
        self._ident4 = ident
        self._entry_tun = False
        self._count_batch(INBOUND_KEYS, TO_SERVICES_KEYS, (udp_n, udp_in, udp_out),
                          (tcp_n, tcp_in, tcp_out), totals, (echo_n, echo_in, echo_out))
        return self._take()

    def device_loops(self, journal_s: float) -> DeviceLoops | None:
        """The compiled loops and tables for a loop around the devices and the capture that
        runs no Python per packet (``count_served`` counts what it did); None where the loops
        are not built or this is a CLAT (its device takes ``from_clat``): the shell then calls
        the engine per batch. ``journal_s``: how soon the loop returns once the flow table's
        journal holds something (the shell's interval for sending it)."""
        if self.compiled is None or self.mode == "clat":
            return None
        return DeviceLoops(self.compiled.inbound, self._fast_in, self.compiled.returning,
                           self._fast_out, self._ident4, ESTABLISHED, DF_THRESHOLD, self.mtu,
                           self._fast_tunnel, self._fast_echo, self.echo_limiter.allow,
                           self._open_from_ipv6, self._open_from_tunnel, self._returned,
                           self.max_mss, (self._to_services, self._to_tunnel, self._to_ipv6),
                           None if self.flows.journal is None
                           else (self.flows.journal, self.flows.journal_removed),
                           journal_s)

    def pending(self) -> Output:
        """What the engine queued while a loop from ``device_loops`` ran (an opener's answer
        to a first packet it refused, what a packet raised), handed over."""
        return self._take()

    def count_served(self, ident: int, inbound: Sequence[int], returning: Sequence[int]) -> None:
        """Count what a loop from ``device_loops`` translated: the inbound loop's totals
        (as ``from_ipv6`` and ``from_tunnel`` count them), the returning loop's (as
        ``from_services``); ``ident`` is the last IPv4 identification it gave."""
        self._ident4 = ident
        self._count_batch(INBOUND_KEYS, TO_SERVICES_KEYS, NO_ECHO, NO_ECHO, list(inbound))
        self._count_echoes(list(inbound[9:13]))
        self._count_batch(FROM_SERVICES_KEYS, OUTBOUND_KEYS, NO_ECHO, NO_ECHO, list(returning))

    def _run_compiled(self, loop: Callable[..., tuple[int, ...]], totals: list[int],
                      packets: list[bytes], *args: object) -> tuple[int, int]:
        """One call of a compiled batch loop (workers/engine/_fastpath.c): (the index of the
        first packet it left to Python, IPv4 ident); its (packets, bytes in, bytes out) per
        protocol (and direction, for the CLAT) added to ``totals``. It raises only when memory
        runs out: the batch ends there, counted once, with the ident in ``_ident4``."""
        try:
            index, ident, *counts = loop(packets, *args)
        except Exception as exc:  # noqa: BLE001 - one batch must never kill the worker
            self._internal_error(exc)
            return len(packets), self._ident4
        for i, value in enumerate(counts):
            totals[i] += value
        return index, ident

    def _count_batch(self, first: dict[int, tuple[str, str]],
                     second: dict[int, tuple[str, str]], udp: tuple[int, int, int],
                     tcp: tuple[int, int, int], compiled: list[int],
                     echo: tuple[int, int, int] = NO_ECHO) -> None:
        """A batch's fast-path totals per protocol: (packets, bytes in, bytes out), the
        Python loop's plus the compiled one's (UDP's three, TCP's, then the echo's)."""
        for proto, (n, size_in, size_out), extra in ((PROTO_UDP, udp, compiled[:3]),
                                                      (PROTO_TCP, tcp, compiled[3:6]),
                                                      (PROTO_ICMP, echo, compiled[6:9])):
            n, size_in, size_out = n + extra[0], size_in + extra[1], size_out + extra[2]
            if n:
                self.counters.count_pair(first[proto], size_in, second[proto], size_out, n)

    def _from_tunnel_full(self, packet: bytes, now: float) -> None:
        """``check_inbound`` and ``_inbound`` for a packet the one-lookup path did not take;
        a plain packet that ends up with an inbound template gets its one-lookup entry."""
        tunnels = self.tunnels
        if tunnels is None:
            self._drop(DropReason.NOT_PROTO_41)  # no tunnel in NAT64 mode
            return
        tunnel = self._tunnel = tunnels.for_outer_source(packet[12:16])
        result = check_inbound(packet, tunnel.policy, tunnel.accepted)
        if isinstance(result, DropReason):
            self.counters.drops[result] += 1
            return
        inner = result[0]
        replies = len(self._to_tunnel)
        self._inbound(inner, now, result[1])
        if (packet[0] == 0x45 and len(inner) >= 48 and inner[6] == PROTO_ICMPV6
                and inner[40] == ICMPV6_ECHO_REQUEST and len(self._to_tunnel) == replies + 1
                and len(packet) == 20 + len(inner) and bytes(inner[24:40]) in self.addresses):
            # Answered (one reply, not fragmented): the next from these addresses is answered
            # from a template (RFC 4443 §4.2 as icmp.echo_reply does it).
            if len(self._fast_echo) >= ECHO_TEMPLATES:
                self._fast_echo.clear()
            self._fast_echo[packet[12:20] + packet[28:60]] = echo_template(
                bytes(inner[8:24]), bytes(inner[24:40]), self._to_tunnel[-1][1])
        if (packet[0] == 0x45 and len(inner) >= 44 and inner[6] in (PROTO_UDP, PROTO_TCP)
                and len(packet) == 20 + len(inner)):
            template = self._fast_in[inner[6]].get(bytes(inner[8:44]))
            if template is not None:
                cache = self._fast_tunnel[inner[6]]
                if len(cache) >= self._fast_tunnel_max:
                    cache.clear()
                cache[packet[12:20] + packet[28:64]] = template

    def _inbound_fast(self, packet: bytes | memoryview, proto: int, template: InTemplate,
                      now: float) -> bool:
        """Translate a plain packet of ``template``'s session; False: the full path decides."""
        ident = (self._ident4 + 1) & 0xFFFF
        out = fast_v6_to_v4(packet, proto, template, ident)
        if out is None:
            return False
        self._ident4 = ident
        if proto == PROTO_TCP:
            self.flows.touch_tcp(template[0], packet[53], True, now)
        else:
            template[0].last_seen = now
        self.counters.count_pair(INBOUND_KEYS[proto], len(packet), TO_SERVICES_KEYS[proto],
                                 len(out))
        self._to_services.append(out)
        return True

    def _inbound(self, packet: bytes | memoryview, now: float, outer4: bytes = b"") -> None:
        """One decapsulated IPv6 packet; ``outer4`` is the outer IPv4 source it came from."""
        self._now = now
        self._outer4 = (outer4 if self._tunnel is not None and self._tunnel.mode != "6in4"
                        else b"")
        if len(packet) >= 44 and packet[0] >> 4 == 6 and self.fast_path:
            proto = packet[6]
            if proto == PROTO_UDP or proto == PROTO_TCP:
                template = self._fast_in[proto].get(bytes(packet[8:44]))
                if template is not None and self._inbound_fast(packet, proto, template, now):
                    return
        view = parse_ipv6(packet)
        if isinstance(view, DropReason):
            self._drop(view)
            return
        if isinstance(view, ParameterProblem):
            self._parameter_problem(packet, view)
            return
        proto = view[4]
        if len(packet) > 40 + view[0]:
            # RFC 4213 §3.6: the length comes from the IPv6 header; anything after is padding.
            packet = packet[:40 + view[0]]
        self.counters.count("inbound", proto, len(packet))
        fragment = view[6]
        self._fragmented = fragment is not None
        if fragment is not None:
            reassembler = self.reassembler
            whole = reassembler.add(packet, fragment[0], fragment[1], fragment[2],
                                    fragment[3], fragment[4], now)
            if reassembler.evicted or reassembler.discarded:
                self.counters.drop(DropReason.FRAGMENT_LIMIT, reassembler.evicted)
                self.counters.drop(DropReason.BAD_FRAGMENT, reassembler.discarded)
                reassembler.evicted = reassembler.discarded = 0
            if whole is None:
                return
            if isinstance(whole, DropReason):
                self._drop(whole)
                return
            packet = whole
            view = parse_ipv6(packet)
            if isinstance(view, ParameterProblem):
                self._parameter_problem(packet, view)
                return
            if isinstance(view, DropReason) or view[6] is not None:
                self._drop(DropReason.BAD_FRAGMENT)
                return
            proto = view[4]
        if self.nat64 is not None and self._entry_tun == self.nat64_tun:
            target4 = self.nat64.extract(view[3])
            if target4 is not None or self._entry_tun:
                self._nat64_inbound(packet, view, proto, now, target4)
                return
        if view[3] not in self.addresses:
            self._drop(DropReason.NOT_OUR_ADDRESS)
            return
        if proto == PROTO_TCP or proto == PROTO_UDP:
            self._inbound_transport(packet, view, proto, now)
        elif proto == PROTO_ICMPV6:
            self._inbound_icmp(packet, view)
        elif proto == PROTO_NONE:
            # RFC 8200 §4.7: No Next Header is a recognized value; nothing follows, no error.
            self._drop(DropReason.UNSUPPORTED_PROTOCOL)
        else:
            # RFC 4443 §3.4: unrecognized Next Header, pointing at the field that names it.
            self._drop(DropReason.UNSUPPORTED_PROTOCOL)
            self._error(packet, view, ICMPV6_PARAMETER_PROBLEM, PARAM_UNRECOGNIZED_NEXT_HEADER,
                        view[8])

    def _nat64_inbound(self, packet: bytes | memoryview, view: IPv6View, proto: int,
                       now: float, target4: bytes | None) -> None:
        """NAT64: a whole IPv6 packet to an address of the prefix (RFC 6146 §3.4);
        ``target4`` the IPv4 address it embeds (None: not an address of the prefix)."""
        assert self.nat64 is not None
        if target4 is None:
            self._drop(DropReason.NOT_OUR_ADDRESS)
            return
        error = proto == PROTO_ICMPV6 and len(packet) > view[5] and packet[view[5]] < 128
        if not error and not source_allowed(self.nat64_clients, view[2]):
            # Default deny: only the configured clients may use the translator. An ICMPv6
            # error (a router on a client's path) only ever reaches a live session.
            self._drop(DropReason.SOURCE_NOT_ALLOWED)
            if (proto == PROTO_TCP and len(packet) > view[5] + 13
                    and packet[view[5] + 13] & (TCP_ACK | TCP_RST)):
                # A segment of a connection (one a reload ended by taking its client out of
                # ``clients``): reset at once (RFC 9293 §3.10.7.1), as Linux takes ICMPv6
                # errors about an established connection as soft errors and would wait. A
                # RST (a closed socket's answer to a reload's probe) is never answered.
                self._reset(packet, view)
            else:
                self._error(packet, view, ICMPV6_DEST_UNREACHABLE, UNREACH_ADMIN_PROHIBITED)
            return
        if not self.settings.nat64_allow_non_global and not self.nat64.may_represent(target4):
            self._drop(DropReason.NON_GLOBAL_DESTINATION)
            self._error(packet, view, ICMPV6_DEST_UNREACHABLE, UNREACH_ADMIN_PROHIBITED)
            return
        if proto == PROTO_TCP or proto == PROTO_UDP:
            self._inbound_transport(packet, view, proto, now, target4)
        elif proto == PROTO_ICMPV6:
            self._nat64_icmp(packet, view, target4, now)
        elif proto == PROTO_NONE:
            self._drop(DropReason.UNSUPPORTED_PROTOCOL)
        else:
            # RFC 7915 §5.1 would translate other protocols unchanged; a stateful NAT64 has no
            # binding for them (RFC 6146 §3.4): refused as an unrecognized Next Header.
            self._drop(DropReason.UNSUPPORTED_PROTOCOL)
            self._error(packet, view, ICMPV6_PARAMETER_PROBLEM, PARAM_UNRECOGNIZED_NEXT_HEADER,
                        view[8])

    def _icmpv6_message(self, packet: bytes | memoryview,
                        view: IPv6View) -> bytes | memoryview | None:
        """The ICMPv6 message of ``packet`` once its length and checksum (RFC 4443 §2.3)
        hold; None when not (counted)."""
        segment = packet[view[5]:]
        if len(segment) < 8:
            self._drop(DropReason.TRUNCATED)
            return None
        if not sum_is_valid(pseudo_sum_v6(view[2], view[3], PROTO_ICMPV6, len(segment))
                            + sum16(segment)):
            self._drop(DropReason.BAD_CHECKSUM)
            return None
        return segment

    def _nat64_icmp(self, packet: bytes | memoryview, view: IPv6View, target4: bytes,
                    now: float) -> None:
        """NAT64 ICMPv6: an echo request opens or uses a query session whose identifier is
        its port (RFC 6146 §3.5.3) and leaves as ICMPv4 (RFC 7915 §5.2); an error about a
        session is translated with its quote; the rest is not translated."""
        segment = self._icmpv6_message(packet, view)
        if segment is None:
            return
        if segment[0] < 128:
            self._inbound_icmp_error(segment)
            return
        if segment[0] != ICMPV6_ECHO_REQUEST:
            self._drop(DropReason.ICMP_NOT_TRANSLATED)
            return
        hop_limit = hop_limit_after(view[1])
        if hop_limit <= 0:
            self._expired_in_transit(packet, view)
            return
        ident = (segment[4] << 8) | segment[5]
        session = self.flows.lookup_v6(PROTO_ICMP, view[2], ident, view[3], 0)
        again = session is not None  # the template from the second request (as for TCP/UDP)
        if session is None:
            created = self.flows.create(PROTO_ICMP, view[2], ident, view[3], 0, target4, 0,
                                        NAT64_RULE, now)
            if isinstance(created, DropReason):
                self._refused_by_limits(created, packet, view)
                return
            session = created
            self.counters.event(Event.FLOWS_CREATED_ICMP)
        session.last_seen = now
        self._ident4 = (self._ident4 + 1) & 0xFFFF
        tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
        out = translate_echo_v6_to_v4(segment, session, hop_limit, self._ident4, tos,
                                      self._fragmented)
        self._to_services.append(out)
        self.counters.count("to_services", PROTO_ICMP, len(out))
        if again and view[5] == 40 and self._entry_tun:
            cache = self._fast_in[PROTO_ICMPV6]
            key = _echo_key_v6(packet)
            if key not in cache:
                cache[key] = echo_inbound_template(session)

    def _refused_by_limits(self, reason: DropReason, packet: bytes | memoryview,
                           view: IPv6View) -> None:
        """A new flow no limit lets in: counted, reported once a minute, and answered."""
        self._drop(reason)
        self.limit_hits.hit(reason)
        # RFC 6888 REQ-11: SHOULD send Destination Unreachable when no mapping fits.
        self._error(packet, view, ICMPV6_DEST_UNREACHABLE, UNREACH_ADMIN_PROHIBITED)

    def _inbound_icmp(self, packet: bytes | memoryview, view: IPv6View) -> None:
        offset = view[5]
        segment = self._icmpv6_message(packet, view)
        if segment is None:
            return
        if segment[0] == ICMPV6_ECHO_REQUEST:
            if not self.echo_limiter.allow(view[2], self._now):
                self._drop(DropReason.ICMP_RATE_LIMITED)
                return
            self.counters.event(Event.ECHO_REPLIES)
            self._send_v6(echo_reply(packet, offset), PROTO_ICMPV6)
            return
        if segment[0] == ICMPV6_NEIGHBOR_SOLICITATION:
            self._neighbor_solicitation(packet, view, segment)
            return
        if segment[0] < 128:
            self._inbound_icmp_error(segment)
            return
        # RFC 7915 §5.2: other informational messages (MLD, node information, ...) are not
        # translated.
        self._drop(DropReason.ICMP_NOT_TRANSLATED)

    def _inbound_icmp_error(self, segment: bytes | memoryview) -> None:
        """An ICMPv6 error about one of our replies goes to the service as ICMPv4 (RFC 7915
        §5.2): a Packet Too Big from the client's path lowers the service's TCP segments."""
        key = icmpv6_error_key(segment)
        if isinstance(key, DropReason):
            self._drop(key)
            return
        session = self.flows.lookup_v6(*key)
        if session is None:
            self._drop(DropReason.NO_SESSION)
            return
        out = translate_icmpv6_error(segment, session, self.mtu)
        if isinstance(out, DropReason):
            self._drop(out)
            return
        self.counters.event(Event.ICMP_ERRORS_TRANSLATED)
        self._to_services.append(out)
        self.counters.count("to_services", PROTO_ICMP, len(out))

    def _neighbor_solicitation(self, packet: bytes | memoryview, view: IPv6View,
                               segment: bytes | memoryview) -> None:
        """RFC 4213 §3.8: a configured tunnel MUST answer NUD probes. RFC 4861 §7.1.1: a valid
        NS has hop limit 255, code 0, 24+ bytes, and a unicast target; ours, or it is ignored."""
        if (self._tunnel is None or self._tunnel.mode != "6in4" or view[1] != ND_HOP_LIMIT
                or segment[1] != 0
                or len(segment) < 24 or view[2] == bytes(16)):
            self._drop(DropReason.NEIGHBOR_DISCOVERY)
            return
        if bytes(segment[8:24]) not in self.addresses:
            self._drop(DropReason.NOT_OUR_ADDRESS)
            return
        self.counters.event(Event.NEIGHBOR_ADVERTISEMENTS)
        self._send_v6(neighbor_advertisement(packet, view[5]), PROTO_ICMPV6)

    def _inbound_transport(self, packet: bytes | memoryview, view: IPv6View, proto: int,
                           now: float, target4: bytes | None = None) -> None:
        """A TCP/UDP packet to a forwarded port, or (``target4`` given) through NAT64."""
        offset = view[5]
        segment = packet[offset:]
        header = 20 if proto == PROTO_TCP else 8
        if len(segment) < header:
            self._drop(DropReason.TRUNCATED)
            return
        segment_sum = sum16(segment)
        # RFC 8200 §8.1: the upper-layer checksum covers the pseudo-header; UDP zero is invalid.
        if not sum_is_valid(pseudo_sum_v6(view[2], view[3], proto, len(segment))
                            + segment_sum) or (proto == PROTO_UDP and segment[6:8] == b"\0\0"):
            self._drop(DropReason.BAD_CHECKSUM)
            return
        # Parse fully before translating (TAYGA's parse_ip4): the UDP length is the datagram's
        # (RFC 768, RFC 8200 §8.4), the TCP data offset lies between the fixed header and the
        # segment's end (RFC 9293 §3.1); otherwise the header lies about the packet.
        if proto == PROTO_UDP:
            if (segment[4] << 8 | segment[5]) != len(segment):
                self._drop(DropReason.BAD_HEADER)
                return
        elif not 20 <= (segment[12] >> 4) * 4 <= len(segment):
            self._drop(DropReason.BAD_HEADER)
            return
        if len(segment) > MAX_TRANSLATED_SEGMENT:
            # RFC 791: a reassembled datagram whose IPv4 translation would not fit in 65535
            # bytes is refused before any session is made for it.
            self._drop(DropReason.TOO_BIG)
            return
        sport, dport = PORTS.unpack_from(segment)
        session = self.flows.lookup_v6(proto, view[2], sport, view[3], dport)
        flags = segment[13] if proto == PROTO_TCP else 0
        # A session's templates are made from its second packet each way: a flow of one
        # packet (a DNS query) never pays for them (issue 21: memory, flow setup).
        again = session is not None
        if session is None:
            session = self._open_session(packet, view, proto, sport, dport, flags, now, target4)
            if session is None:
                return
        elif hop_limit_after(view[1]) <= 0:
            self._expired_in_transit(packet, view)
            return
        if proto == PROTO_TCP:
            self.flows.touch_tcp(session, flags, True, now)
        else:
            session.last_seen = now
        self._ident4 = (self._ident4 + 1) & 0xFFFF
        out = translate_v6_to_v4(packet, offset, proto, segment_sum, session,
                                 hop_limit_after(view[1]), self._ident4, self.max_mss,
                                 self._fragmented)
        self._to_services.append(out)
        self.counters.count("to_services", proto, len(out))
        if offset == 40 and again:
            key = bytes(packet[8:44])
            if key not in self._fast_in[proto]:
                self._fast_in[proto][key] = inbound_template(session)

    def _open_from_tunnel(self, packet: bytes, now: float) -> Session | bool | None:
        """``from_tunnel``'s opener for the compiled loop (``_opened``): a protocol-41 packet
        (20-byte outer header, the inner packet after it) whose tunnel checks passed for its
        addresses before (``check_inbound``'s cache of verdicts; None otherwise: the full
        checks are the full path's)."""
        tunnel = self.tunnels.for_outer_source(packet[12:16]) if self.tunnels else None
        if (tunnel is None or tunnel.accepted is None
                or packet[12:20] + packet[28:60] not in tunnel.accepted):
            return None
        self._tunnel = tunnel
        return self._opened(packet[20:], now,
                            packet[12:16] if tunnel.mode != "6in4" else b"", False)

    def _open_from_ipv6(self, packet: bytes, now: float) -> Session | bool | None:
        """``from_ipv6``'s opener for the compiled loop (``_opened``)."""
        return self._opened(packet, now, b"", True)

    def _opened(self, packet: bytes, now: float, outer4: bytes,
                entry_tun: bool) -> Session | bool | None:
        """A new session for the compiled loop (workers/engine/_fastpath.c ``inbound``), which
        translates the packet that opens it: a TCP SYN or UDP datagram no template knows, with
        no extension header and no padding, a verified checksum, consistent lengths and hop
        limit above 1 (so the full path would translate it as it is, if it makes a session).
        ``entry_tun``: it came from the TUN devices (``from_ipv6``), not through the tunnel;
        the loop around the devices (``device_loops``) calls this between the engine's
        batch calls, so the engine's state of which entry it serves is set here and put back.
        Returns the session; True: refused here (``_open_session`` counted and answered it);
        None: the full path decides (nothing done yet: an existing session, a destination
        that is neither ours nor NAT64's)."""
        entry, self._entry_tun = self._entry_tun, entry_tun
        try:
            return self._open_checked(packet, now, outer4)
        except Exception as exc:  # noqa: BLE001 - one packet must never kill the batch
            self._internal_error(exc)
            return True
        finally:
            self._entry_tun = entry

    def _open_checked(self, packet: bytes, now: float, outer4: bytes) -> Session | bool | None:
        """``_opened``'s work: ``_inbound``'s dispatch and checks, then ``_open_session``."""
        view = parse_ipv6(packet)
        if not isinstance(view, tuple) or view[5] != 40 or view[6] is not None:
            return None
        target4 = None
        # ``_inbound``'s dispatch and ``_nat64_inbound``'s checks, which all drop.
        if self.nat64 is not None and self._entry_tun == self.nat64_tun:
            target4 = self.nat64.extract(view[3])
            if target4 is None and self._entry_tun:
                return None
        if target4 is not None:
            if not source_allowed(self.nat64_clients, view[2]) or (
                    not self.settings.nat64_allow_non_global
                    and not self.nat64.may_represent(target4)):  # type: ignore[union-attr]
                return None
        elif view[3] not in self.addresses:
            return None
        proto = view[4]
        sport, dport = PORTS.unpack_from(packet, 40)
        if self.flows.lookup_v6(proto, view[2], sport, view[3], dport) is not None:
            return None
        self._now = now
        self._outer4 = outer4
        self._fragmented = False
        flags = packet[53] if proto == PROTO_TCP else 0
        session = self._open_session(packet, view, proto, sport, dport, flags, now, target4)
        if session is None:
            self.counters.count("inbound", proto, len(packet))
            return True
        if proto == PROTO_TCP:
            self.flows.touch_tcp(session, flags, True, now)
        return session

    def _open_session(self, packet: bytes | memoryview, view: IPv6View, proto: int, sport: int,
                      dport: int, flags: int, now: float, target4: bytes | None
                      ) -> Session | None:
        """The new session of a verified TCP/UDP packet no session knows (to a forwarded port,
        or ``target4`` given, through NAT64), or None: refused, counted and answered."""
        rule = (self.rules.get((proto, dport)) if target4 is None
                else (NAT64_RULE, target4, dport, None))
        if rule is None:
            self._drop(DropReason.NO_RULE)
            self._refuse(packet, view, proto)
            return None
        if not source_allowed(rule[3], view[2]):
            # A rule open to some sources only: to anyone else the port is closed.
            self._drop(DropReason.SOURCE_NOT_ALLOWED)
            self._refuse(packet, view, proto)
            return None
        # RFC 6146 §3.5.2.2: only a SYN opens a TCP session; anything else is refused like a
        # closed port so the client learns at once (RFC 9293 §3.10.7.1).
        if proto == PROTO_TCP and (flags & (TCP_SYN | TCP_ACK | TCP_RST)) != TCP_SYN:
            self._drop(DropReason.NO_SESSION)
            self._refuse(packet, view, proto)
            return None
        if hop_limit_after(view[1]) <= 0:
            self._expired_in_transit(packet, view)
            return None
        # Our address as one object for all its sessions (issue 21: memory).
        gw6 = self._our_objects.get(view[3], view[3])
        shard = inner_shard(packet, self.settings.hash_seed, self._shards) \
            if self._shards else -1
        created = self.flows.create(proto, view[2], sport, gw6, dport, rule[1], rule[2],
                                    rule[0], now, self._outer4, shard=shard)
        if isinstance(created, DropReason):
            self._refused_by_limits(created, packet, view)
            return None
        self.counters.event(Event.FLOWS_CREATED_TCP if proto == PROTO_TCP
                            else Event.FLOWS_CREATED_UDP)
        if self._held_syns and proto == PROTO_TCP:
            self._discard_held_syn(created)
        if self.flows.removed:
            # Unassured sessions evicted to make room (Linux conntrack's early drop).
            self.counters.event(Event.FLOWS_EVICTED, len(self.flows.removed))
            self._forget_templates()
        return created

    def _expired_in_transit(self, packet: bytes | memoryview, view: IPv6View) -> None:
        """RFC 7915 §5.1 / RFC 4443 §3.3: a router never forwards with hop limit 0; checked
        before a session is created, so an expiring packet leaves no state behind."""
        self._drop(DropReason.HOP_LIMIT_EXCEEDED)
        self._error(packet, view, ICMPV6_TIME_EXCEEDED, TIME_EXCEEDED_HOP_LIMIT)

    def _refuse(self, packet: bytes | memoryview, view: IPv6View, proto: int) -> None:
        if proto == PROTO_TCP:
            self._reset(packet, view)
        else:
            self._error(packet, view, ICMPV6_DEST_UNREACHABLE, UNREACH_PORT)

    # --- CLAT: the host's IPv4 and the PLAT's IPv6 on one device --------------------------------

    def from_clat(self, packets: Iterable[bytes], now: float) -> Output:
        """CLAT (workers/engine/clat.py): the host's IPv4 leaves as IPv6, the PLAT's IPv6
        comes in as IPv4; both go back to the CLAT device (``to_services``). Counted like the
        other modes: IPv4 read is from_services, IPv6 written outbound, IPv6 read inbound,
        IPv4 written to_services."""
        clat = self.clat
        assert clat is not None
        count, drop = self.counters.count, self._drop
        plain_to_ipv6, plain_to_ipv4 = clat.plain_to_ipv6, clat.plain_to_ipv4
        append = self._to_services.append
        # The plain packets' totals, added once per batch: (packets, bytes in, bytes out) by
        # direction and protocol.
        out_totals = {PROTO_UDP: [0, 0, 0], PROTO_TCP: [0, 0, 0]}
        in_totals = {PROTO_UDP: [0, 0, 0], PROTO_TCP: [0, 0, 0]}
        packets = packets if isinstance(packets, list) else list(packets)
        loops, total, index = self.compiled, len(packets), 0
        # The compiled loop's totals: IPv4 UDP, IPv4 TCP, IPv6 UDP, IPv6 TCP, three each.
        compiled_totals = [0] * 12
        while index < total:
            if loops is not None:  # the same plain packets, compiled (as in from_tunnel)
                index, _ = self._run_compiled(
                    loops.clat, compiled_totals, packets, index, clat.remembered_out,
                    clat.remembered_in, clat.address4, clat.address6, DF_THRESHOLD,
                    self._to_services)
                if index >= total:
                    break
            packet = packets[index]
            index += 1
            try:
                version = packet[0] >> 4 if packet else 0
                plain = (plain_to_ipv6(packet) if version == 4 else
                         plain_to_ipv4(packet) if version == 6 else None)
                if plain is not None:
                    append(plain)
                    totals = (out_totals[packet[9]] if version == 4 else
                              in_totals[packet[6]])
                    totals[0] += 1
                    totals[1] += len(packet)
                    totals[2] += len(plain)
                    continue
                if version == 4:
                    count("from_services", packet[9] if len(packet) > 9 else 0, len(packet))
                    result = clat.to_ipv6(packet)
                    if isinstance(result, DropReason):
                        drop(result)
                        continue
                    count("outbound", result[6], len(result))
                elif version == 6:
                    count("inbound", packet[6] if len(packet) > 6 else 0, len(packet))
                    result = clat.to_ipv4(packet)
                    if isinstance(result, DropReason):
                        drop(result)
                        continue
                    count("to_services", result[9], len(result))
                else:
                    drop(DropReason.BAD_VERSION)
                    continue
                append(result)
            except Exception as exc:  # noqa: BLE001 - the one per-packet guard
                self._internal_error(exc)
        for at, totals in enumerate((out_totals[PROTO_UDP], out_totals[PROTO_TCP],
                                     in_totals[PROTO_UDP], in_totals[PROTO_TCP])):
            for i in range(3):
                totals[i] += compiled_totals[3 * at + i]
        for proto, (n, size_in, size_out) in out_totals.items():
            if n:
                self.counters.count_pair(FROM_SERVICES_KEYS[proto], size_in,
                                         OUTBOUND_KEYS[proto], size_out, n)
        for proto, (n, size_in, size_out) in in_totals.items():
            if n:
                self.counters.count_pair(INBOUND_KEYS[proto], size_in, TO_SERVICES_KEYS[proto],
                                         size_out, n)
        return self._take()

    # --- from services: IPv4 to a pool address ------------------------------------------------

    def from_services(self, packets: Iterable[bytes], now: float) -> Output:
        """IPv4 packets the services sent to pool addresses, in order. A plain packet of a
        session with a return template is translated from it (workers/engine/fastpath.py); every
        other packet takes ``_from_services_full``. Like ``from_tunnel``: locals,
        counters added once per batch, a packet that raises costs only itself."""
        fast = self.fast_path
        caches = self._fast_out
        append = self._to_tunnel.append
        to_ipv6 = self._to_ipv6.append
        touch_tcp = self.flows.touch_tcp
        mtu = self.mtu
        udp_n = udp_in = udp_out = tcp_n = tcp_in = tcp_out = 0  # packets, bytes in, out
        echo_n = echo_in = echo_out = 0
        packets = packets if isinstance(packets, list) else list(packets)
        loops, total, index, totals = self.compiled, len(packets), 0, [0] * 9
        retry = misses = 0
        while index < total:
            if loops is not None and index >= retry:
                start = index
                index, _ = self._run_compiled(
                    loops.returning, totals, packets, index, caches, mtu, now, ESTABLISHED,
                    self._to_tunnel, self._to_ipv6, self._returned, self.max_mss)
                if index >= total:
                    break
                retry, misses = compiled_retry(index, start, misses)
            packet = packets[index]
            index += 1
            try:
                template = None
                if fast and len(packet) >= 28 and packet[0] == 0x45:
                    proto = packet[9]
                    cache = caches.get(proto)
                    if cache is not None:
                        template = cache.get(packet[12:24] if proto != PROTO_ICMP
                                             else _echo_key_v4(packet))
                if template is None:
                    out = None
                elif proto == PROTO_ICMP:
                    out = fast_echo_v4_to_v6(packet, template, mtu)
                else:
                    out = fast_v4_to_v6(packet, proto, template, mtu)
                if out is None:
                    self._from_services_full(packet, now)
                    continue
                if template[2]:  # type: ignore[index]
                    append((out, template[2]))  # type: ignore[index]
                else:  # NAT64: a client on this host's side
                    to_ipv6(out)
                if proto == PROTO_ICMP:
                    template[0].last_seen = now  # type: ignore[index]
                    echo_n += 1
                    echo_in += len(packet)
                    echo_out += len(out)
                elif proto == PROTO_UDP:
                    template[0].last_seen = now  # type: ignore[index]
                    udp_n += 1
                    udp_in += len(packet)
                    udp_out += len(out)
                else:
                    touch_tcp(template[0], packet[33], False, now)  # type: ignore[index]
                    tcp_n += 1
                    tcp_in += len(packet)
                    tcp_out += len(out)
            except Exception as exc:  # noqa: BLE001 - one packet must never kill the batch
                self._internal_error(exc)
        self._count_batch(FROM_SERVICES_KEYS, OUTBOUND_KEYS, (udp_n, udp_in, udp_out),
                          (tcp_n, tcp_in, tcp_out), totals, (echo_n, echo_in, echo_out))
        return self._take()

    def _from_services_full(self, packet: bytes, now: float) -> None:
        self._now = now
        view = parse_ipv4(packet)
        if isinstance(view, DropReason):
            self._drop(view)
            return
        header_len, total_len, _ident, flags_offset, ttl, proto, src, dst, tos = view
        self.counters.count("from_services", proto, total_len)
        if flags_offset & (IPV4_MF | IPV4_OFFSET_MASK):
            if self.reassembler4 is None:
                # The TUN MTU is 65535, so the local stack never fragments towards us.
                self._drop(DropReason.BAD_FRAGMENT)
                return
            # NAT64: the IPv4 internet fragments (RFC 791 §3.2): the datagram is put back
            # together, then translated and fragmented again as IPv6 if it must be.
            whole = self.reassembler4.add(packet, now)
            if self.reassembler4.evicted:
                self.counters.drop(DropReason.FRAGMENT_LIMIT, self.reassembler4.evicted)
                self.reassembler4.evicted = 0
            if whole is None:
                return
            if isinstance(whole, DropReason):
                self._drop(whole)
                return
            view = parse_ipv4(whole)
            if isinstance(view, DropReason):
                self._drop(view)
                return
            packet = whole
            header_len, total_len, _ident, flags_offset, ttl, proto, src, dst, tos = view
        if proto == PROTO_TCP or proto == PROTO_UDP:
            if total_len - header_len < (20 if proto == PROTO_TCP else 8):
                self._drop(DropReason.TRUNCATED)
                return
            sport, dport = PORTS.unpack_from(packet, header_len)
            session = self.flows.lookup_v4(proto, dst, dport, src, sport)
            if session is None:
                if self.nat64 is None or dst not in self.pool4_addresses:
                    if not self.flows.owns_pool_address(dst):
                        # Another worker's (its route is moving there): not ours to reset.
                        self._drop(DropReason.OTHER_SHARD)
                        return
                    self._drop(DropReason.NO_SESSION)
                    if proto == PROTO_TCP:
                        # A service's segment of a connection whose session is gone (ended
                        # by a reload, or lost): reset it, as a closed port would (RFC 9293
                        # §3.10.7.1), so the service learns at once.
                        reset = tcp_reset_v4(packet, header_len)
                        if reset is not None:
                            self._to_services.append(reset)
                            self.counters.event(Event.TCP_RST_SENT)
                    return
                session = self._nat64_session_from_v4(proto, dst, dport, src, sport, now,
                                                      packet, header_len)
                if session is None:
                    return
            if hop_limit_after(ttl) <= 0:
                self._drop(DropReason.HOP_LIMIT_EXCEEDED)
                return
            again = session.assured  # the service answered before: its template is worth it
            if proto == PROTO_TCP:
                self.flows.touch_tcp(session, packet[header_len + 13], False, now)
            else:
                self.flows.touch_udp(session, False, now)
            segment = translate_v4_to_v6(packet, header_len, total_len, proto, session,
                                         self.max_mss)
            if 40 + len(segment) > self.mtu and flags_offset & IPV4_DF and proto == PROTO_TCP:
                # RFC 7915 §4.1: DF set and too big for the next hop -> Fragmentation Needed.
                # MSS clamping makes this rare; the service's stack learns the MTU from it.
                # A UDP datagram with DF goes out as IPv6 fragments instead (RFC 7915 §1.4: a
                # translator fragments or answers, as a router does). The services sit on this
                # host behind a TUN of MTU 65535, where Linux sets DF on every UDP datagram
                # (IP_PMTUDISC_WANT), not because the application asked: Fragmentation Needed
                # would lose this datagram (UDP does not resend it) and make the stack send
                # the next ones as IPv4 fragments.
                self._drop(DropReason.TOO_BIG)
                self._to_services.append(self._frag_needed(packet, header_len, total_len))
                return
            self._emit(session, proto, segment, hop_limit_after(ttl), tos)
            if header_len == 20 and again:
                key = bytes(packet[12:24])
                outer = self._outer_for(session.client6, session.gw6)
                if outer is not None and key not in self._fast_out[proto]:
                    self._fast_out[proto][key] = return_template(session, outer)
        elif proto == PROTO_ICMP:
            self._from_services_icmp(packet, header_len, total_len)
        else:
            self._drop(DropReason.UNSUPPORTED_PROTOCOL)

    def _returned(self, packet: bytes, now: float) -> tuple[Session, bytes] | bool | None:
        """A session's first answers for the compiled loop (workers/engine/_fastpath.c
        ``returning``), which translates them: a TCP/UDP packet no template knows, with a
        20-byte header that verifies, not a fragment, TTL above 1, consistent lengths and
        small enough for the MTU (so the full path would send it as it is). Returns the
        session (moved by the packet, as ``_from_services_full`` moves it) and where its
        IPv6 packet goes (``_outer_for``); None: the full path decides (nothing done yet: no
        session, an assured one, whose template the full path makes, or no way back); True:
        it raised (counted once, as the batch loops count a packet that raises)."""
        try:
            proto = packet[9]
            sport, dport = PORTS.unpack_from(packet, 20)
            session = self.flows.lookup_v4(proto, packet[16:20], dport, packet[12:16], sport)
            if session is None or session.assured:
                return None
            outer = self._outer_for(session.client6, session.gw6)
            if outer is None:
                return None
            self._now = now
            if proto == PROTO_TCP:
                self.flows.touch_tcp(session, packet[33], False, now)
            else:
                self.flows.touch_udp(session, False, now)
            return session, outer
        except Exception as exc:  # noqa: BLE001 - one packet must never kill the batch
            self._internal_error(exc)
            return True

    def _nat64_session_from_v4(self, proto: int, pool4: bytes, pport: int, remote4: bytes,
                               rport: int, now: float, packet: bytes,
                               header_len: int) -> Session | None:
        """An IPv4 packet to a NAT64 binding from a peer it has no session with: RFC 6146
        §3.5.1 filtering decides (endpoint-independent: anyone may reach the binding;
        address-dependent: only an address it has a session with), and a new session is made
        for it; for TCP only a SYN makes one, in V4 INIT (§3.5.2.2). A SYN to no binding is
        held TCP_INCOMING_SYN_S for the client's own SYN (simultaneous open), then answered
        with port unreachable (``tick``). Counted when refused."""
        assert self.nat64 is not None
        bib = self.flows.binding_v4(proto, pool4, pport)
        syn = proto == PROTO_TCP and (packet[header_len + 13] & (TCP_SYN | TCP_ACK | TCP_RST)
                                      == TCP_SYN)
        if proto == PROTO_TCP and not syn:
            self._drop(DropReason.NO_SESSION)
            return None
        if bib is None:
            key = (pool4, pport, remote4, rport)
            if syn and key not in self._held_syns and len(self._held_syns) < MAX_HELD_SYNS:
                self._held_syns[key] = (now + TCP_INCOMING_SYN_S, bytes(packet))
            else:
                self._drop(DropReason.NO_SESSION)
            return None
        if not self.eif and remote4 not in bib.remotes:
            self._drop(DropReason.FILTERED)
            return None
        if not self.settings.nat64_allow_non_global and not self.nat64.may_represent(remote4):
            self._drop(DropReason.NON_GLOBAL_DESTINATION)
            return None
        created = self.flows.create(proto, bib.client6, bib.cport, self.nat64.synthesize(remote4),
                                    rport, remote4, rport, NAT64_RULE, now, from_v4=True)
        if isinstance(created, DropReason):
            self._drop(created)
            self.limit_hits.hit(created)
            return None
        self.counters.event(Event.FLOWS_CREATED_TCP if syn else Event.FLOWS_CREATED_UDP)
        return created

    def _expire_held_syns(self, now: float) -> None:
        """RFC 6146 §3.5.2.2: an IPv4 SYN nobody's SYN answered in TCP_INCOMING_SYN_S is
        answered with ICMPv4 port unreachable (through the IPv4 side, like any packet)."""
        held = self._held_syns
        while held:
            key, (deadline, syn) = next(iter(held.items()))
            if deadline > now:
                return
            del held[key]
            self._drop(DropReason.NO_SESSION)
            header_len = (syn[0] & 0x0F) * 4
            message = bytearray(bytes((ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE)) + bytes(6)
                                + syn[:header_len + 8])
            message[2:4] = checksum(message).to_bytes(2, "big")
            self._to_services.append(build_ipv4(key[0], key[2], PROTO_ICMP, message))

    def _discard_held_syn(self, session: Session) -> None:
        """The client's SYN made the binding an IPv4 SYN was waiting for: the held SYN goes
        (RFC 6146 §3.5.2.2), counted once."""
        if self._held_syns.pop((session.pool4, session.pport, session.target4, session.tport),
                               None) is not None:
            self._drop(DropReason.NO_SESSION)

    def _emit(self, session: Session, proto: int, segment: bytes, hop_limit: int,
              tos: int) -> None:
        packet = build_ipv6(session.gw6, session.client6, proto, segment, hop_limit=hop_limit,
                            traffic_class=tos)
        self._send_v6(packet, proto)

    def _from_services_icmp(self, packet: bytes | memoryview, header_len: int,
                            total_len: int) -> None:
        if total_len - header_len < 8:
            self._drop(DropReason.TRUNCATED)
            return
        icmp_type = packet[header_len]
        if icmp_type == ICMP_ECHO_REPLY and bytes(packet[16:20]) in self.pool4_addresses:
            self._nat64_echo_reply(packet, header_len, total_len)
            return
        if icmp_type not in (ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM):
            # RFC 7915 §4.2: echo, timestamp, info and the rest are not translated here.
            self._drop(DropReason.ICMP_NOT_TRANSLATED)
            return
        # RFC 792: the checksum covers the whole ICMP message; a damaged error is not
        # believed (nor translated into one the client would believe).
        if not sum_is_valid(sum16(packet[header_len:total_len])):
            self._drop(DropReason.BAD_CHECKSUM)
            return
        key = icmpv4_error_key(packet, header_len, total_len)
        if isinstance(key, DropReason):
            self._drop(key)
            return
        session = self.flows.lookup_v4(*key)
        if session is None:
            self._drop(DropReason.NO_SESSION)
            return
        source6 = None
        if self.nat64 is not None and session.rule == NAT64_RULE:
            # RFC 7915 §4.2 / RFC 6052: the error comes from the IPv4 router as the client sees
            # it; one the prefix may not stand for is sent as from the destination.
            router4 = bytes(packet[12:16])
            if self.settings.nat64_allow_non_global or self.nat64.may_represent(router4):
                source6 = self.nat64.synthesize(router4)
        out = translate_icmpv4_error(packet, header_len, total_len, session, self.mtu, source6)
        if isinstance(out, DropReason):
            self._drop(out)
            return
        self.counters.event(Event.ICMP_ERRORS_TRANSLATED)
        self._send_v6(out, PROTO_ICMPV6)

    def _nat64_echo_reply(self, packet: bytes | memoryview, header_len: int,
                          total_len: int) -> None:
        """NAT64: an ICMPv4 Echo Reply to a query session's pool port (RFC 6146 §3.5.3)."""
        message = packet[header_len:total_len]
        # RFC 792: the checksum covers the whole ICMP message.
        if not sum_is_valid(sum16(message)):
            self._drop(DropReason.BAD_CHECKSUM)
            return
        ident = (message[4] << 8) | message[5]
        session = self.flows.lookup_v4(PROTO_ICMP, bytes(packet[16:20]), ident,
                                       bytes(packet[12:16]), 0)
        if session is None:
            self._drop(DropReason.NO_SESSION)
            return
        hop_limit = hop_limit_after(packet[8])
        if hop_limit <= 0:
            self._drop(DropReason.HOP_LIMIT_EXCEEDED)
            return
        again = session.assured  # answered before: its template is worth it
        self.flows.touch_udp(session, False, self._now)
        self._send_v6(build_ipv6(session.gw6, session.client6, PROTO_ICMPV6,
                                 translate_echo_v4_to_v6(message, session), hop_limit=hop_limit,
                                 traffic_class=packet[1]), PROTO_ICMPV6)
        if again and header_len == 20:
            cache = self._fast_out[PROTO_ICMP]
            key = _echo_key_v4(packet)
            outer = self._outer_for(session.client6, session.gw6)
            if outer is not None and key not in cache:
                cache[key] = echo_return_template(session, outer)

    def _frag_needed(self, packet: bytes | memoryview, header_len: int,
                     total_len: int) -> bytes:
        """ICMPv4 3/4 back to the service with the MTU it must use (RFC 1191, RFC 7915 §4.1)."""
        quote = bytes(packet[:header_len + 8])
        mtu4 = self.mtu - 20  # IPv6 header is 20 bytes bigger than IPv4's
        message = bytearray(bytes((ICMP_DEST_UNREACHABLE, ICMP_FRAGMENTATION_NEEDED, 0, 0, 0, 0))
                            + mtu4.to_bytes(2, "big") + quote)
        message[2:4] = checksum(message).to_bytes(2, "big")
        return build_ipv4(bytes(packet[16:20]), bytes(packet[12:16]), PROTO_ICMP, message)

    # --- time ---------------------------------------------------------------------------------

    def reconfigure(self, settings: Settings) -> Output:
        """A reloaded config (issue 17): forward rules, flow limits, timeouts, rate limits and
        the NAT64 policy change in place; every session whose rule still exists goes on. A
        session of a rule that is gone, or of a NAT64 client no longer in ``clients``, ends:
        removed, and each side of a TCP one is sent ``tcp_probe``, whose
        answer then meets no session and is reset (both sides learn at once). The caller
        checked that nothing else changed (coordinator/reload.py)."""
        self.settings = settings
        if self.clat is not None:  # a new PLAT prefix (RFC 8781 PREF64 changed it)
            self.clat = dataclasses.replace(self.clat,
                                            prefix=Nat64Prefix.parse(settings.clat_plat_prefix))
        self.rules = build_rule_table(settings)
        self.compiled = compiled if self.fast_path and settings.compiled_fast_path else None
        flows = self.flows
        flows.set_shard_limits(self.workers, settings.max_flows, settings.max_flows_per_prefix,
                               settings.timeouts, max_flows_per_48=settings.max_flows_per_48,
                               max_flows_per_ipv4_source=settings.max_flows_per_ipv4_source)
        self._fast_tunnel_max = 2 * flows.max_flows + 1024
        self._set_rate_limits(settings)
        labels = {rule.label for rule in settings.forwards}
        if self.nat64 is not None:
            # The NAT64 policy too; a client no longer in ``clients`` loses its sessions.
            self._set_nat64_policy(settings)
            flows.set_port_quota(settings.nat64_ports_per_client, settings.nat64_client_prefix // 8,
                                 settings.nat64_port_hold_s)
            labels.add(NAT64_RULE)
        ended = [s for s in flows.sessions_iter() if s.rule not in labels
                 or s.rule == NAT64_RULE and not source_allowed(self.nat64_clients, s.client6)]
        for session in ended:
            if session.proto == PROTO_TCP:
                to_client = tcp_probe(session.gw6, session.gwport, session.client6,
                                      session.cport)
                to_service = tcp_probe(session.pool4, session.pport, session.target4,
                                       session.tport)
                self._send_v6(to_client, PROTO_TCP)
                self._to_services.append(to_service)
                self._probed.add(session.client6 + session.gw6
                                 + PORTS.pack(session.cport, session.gwport))
                self._probed_until = float("inf")
                # Once more a tick later: Linux answers at most one out-of-window segment per
                # socket every net.ipv4.tcp_invalid_ratelimit (500 ms, RFC 5961 §7), so a
                # probe right after another such answer (a duplicate SYN-ACK's) goes unheard.
                self._probes_again.append((to_client, to_service))
                self._probes_due = None
            flows.close(session)
        if ended:
            self.counters.event(Event.FLOWS_ENDED_BY_RELOAD, len(ended))
        self._forget_templates()
        return self._take()

    def _set_nat64_policy(self, settings: Settings) -> None:
        """Who may use the NAT64 and how its bindings filter (RFC 6146 §3.5.1): at the start
        and at a reload."""
        self.nat64_clients = tuple(
            (int(net.network_address), int(net.netmask))
            for net in map(ipaddress.IPv6Network, settings.nat64_clients))
        self.eif = settings.nat64_filtering == "endpoint-independent"

    def _forget_templates(self) -> None:
        """Drop the fast-path templates of the sessions the flow table just removed."""
        removed = self.flows.removed
        assert removed is not None
        for session in removed:
            echo = session.proto == PROTO_ICMP  # keyed by its packets' protocols
            self._fast_in[PROTO_ICMPV6 if echo else session.proto].pop(
                session.client6 + session.gw6 + PORTS.pack(session.cport, session.gwport), None)
            self._fast_out[session.proto].pop(
                session.target4 + session.pool4 + PORTS.pack(session.tport, session.pport), None)
        removed.clear()

    def tick(self, now: float) -> Output:
        """Expire idle sessions and stale fragments (call about once a second); the Time
        Exceeded errors of timed-out reassemblies are what it returns to send."""
        expired = self.flows.expire(now)
        if expired:
            self.counters.event(Event.FLOWS_EXPIRED, expired)
            self._forget_templates()
        if self._probes_again:
            if self._probes_due is None:
                self._probes_due = now + PROBE_AGAIN_S
            elif now >= self._probes_due:
                # Never more than a reload ended; a connection already reset answers a RST.
                for to_client, to_service in self._probes_again:
                    self._send_v6(to_client, PROTO_TCP)
                    self._to_services.append(to_service)
                self._probes_again = []
                self._probed_until = now + PROBE_ANSWERS_S
        elif self._probed and now > self._probed_until:
            self._probed = set()
        if self.reassembler4 is not None:
            self.counters.drop(DropReason.FRAGMENT_TIMEOUT, self.reassembler4.expire(now))
            self._expire_held_syns(now)
        timed_out, firsts = self.reassembler.expire(now)
        if timed_out:
            self.counters.drop(DropReason.FRAGMENT_TIMEOUT, timed_out)
        self._now = now
        for first, upper_proto, upper_offset in firsts:
            # RFC 8200 §4.5: the first fragment had come, so its source learns of the timeout
            # (RFC 4443 §3.3 code 1), within the same §2.4 rules and rate limit.
            our_address = first[24:40]
            if our_address in self.addresses:
                self._send_error(first, our_address, upper_proto, upper_offset,
                                 ICMPV6_TIME_EXCEEDED, TIME_EXCEEDED_REASSEMBLY)
        return self._take()
