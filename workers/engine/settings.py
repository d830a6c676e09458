"""The validated, immutable settings every process runs on, and how the pool is sliced.

The coordinator builds ``Settings`` from the TOML file (``coordinator/config.py`` does all the
validation and error reporting); workers receive them as JSON (``to_json``/``from_json``), so
a worker on another host can be handed the same object. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sixgate.workers.engine.flows import Timeouts
from sixgate.workers.engine.tunnel import DEFAULT_MARTIAN_IPV4, SixrdDomain

SETTINGS_VERSION = 1


@dataclass(frozen=True)
class Forward:
    """One ``[[forward]]`` rule: IPv6 (proto, port range) -> IPv4 target."""

    proto: str  # "tcp" | "udp"
    port_lo: int
    port_hi: int
    target_ipv4: str
    target_port: int | None  # None: same port as the client asked for
    # IPv6 source prefixes allowed to use the rule ("from"); empty: everyone.
    sources: tuple[str, ...] = ()

    def source_filter(self) -> tuple[tuple[int, int], ...] | None:
        """(network, mask) integers of ``sources``, or None when everyone may use the rule."""
        if not self.sources:
            return None
        nets = [ipaddress.IPv6Network(cidr) for cidr in self.sources]
        return tuple((int(n.network_address), int(n.netmask)) for n in nets)

    def target_for(self, port: int) -> int:
        """Target port for a destination port in this rule's range (ranges shift)."""
        if self.target_port is None:
            return port
        return self.target_port + (port - self.port_lo)

    @property
    def label(self) -> str:
        ports = str(self.port_lo) if self.port_lo == self.port_hi else (
            f"{self.port_lo}-{self.port_hi}")
        if self.target_port is None:
            target = self.target_ipv4
        elif self.port_lo == self.port_hi:
            target = f"{self.target_ipv4}:{self.target_port}"
        else:
            target = (f"{self.target_ipv4}:{self.target_port}-"
                      f"{self.target_port + self.port_hi - self.port_lo}")
        return f"{self.proto}/{ports} -> {target}"


@dataclass(frozen=True)
class TunnelEntry:
    """One tunnel of a gateway with several (issue 19, ``[[tunnel]]``): all share the host's
    local (and public) IPv4 address, the forward rules, the pool and the workers; each has its
    own mode, peer, prefix and addresses. The first is also held in Settings' own fields."""

    name: str  # the ``tunnel`` label of its metrics
    mode: str  # "6in4" | "6to4" | "6rd"
    remote_ipv4: str | None  # 6in4: the broker's endpoint
    relay_ipv4: str | None  # 6to4: the relay; 6rd: the border relay
    prefix: str  # 6rd: the delegated prefix
    addresses: tuple[str, ...]
    mtu: int
    martian_ipv4: tuple[tuple[str, str], ...] = DEFAULT_MARTIAN_IPV4
    sixrd_prefix: str = ""
    ipv4_mask_len: int = 0

    def sixrd(self, known_ipv4: str) -> SixrdDomain | None:
        """The 6rd domain (mode "6rd"), its CE addresses sharing the high bits of ours."""
        if self.mode != "6rd" or not self.relay_ipv4:
            return None
        return SixrdDomain.build(self.sixrd_prefix, self.ipv4_mask_len, self.relay_ipv4,
                                 known_ipv4)


@dataclass(frozen=True)
class Settings:
    mode: str
    local_ipv4: str
    relay_ipv4: str | None
    remote_ipv4: str | None
    prefix: str
    addresses: tuple[str, ...]
    mtu: int
    workers: int
    pool: str
    run_dir: str
    name: str
    forwards: tuple[Forward, ...]
    # The address the tunnel is known by (RFC 3056 prefix, RFC 3964 checks, the 6in4
    # link-local); "" is local_ipv4. Differs behind a 1:1 NAT.
    public_ipv4: str = ""
    # 6in4: seconds between reachability probes of the broker (coordinator/liveness.py).
    probe_interval_s: float = 60.0
    max_flows: int = 200_000
    max_flows_per_prefix: int = 5_000
    # RFC 6888 REQ-4: one /48 (a site) and one outer IPv4 source (a 6to4 relay or router,
    # 6to4 mode only) may hold at most these, so neither can fill the table for everyone.
    max_flows_per_48: int = 20_000
    max_flows_per_ipv4_source: int = 50_000
    timeouts: Timeouts = field(default_factory=Timeouts)
    icmp_errors_per_s: float = 100.0
    icmp_error_burst: int = 100
    # Echo replies: far above what ping needs, far below a flood (each source /64 gets a
    # tenth, as it does of the error rate).
    echo_replies_per_s: float = 10_000.0
    echo_burst: int = 10_000
    queue_batches: int = 1000
    batch_packets: int = 64
    # The fan-out hash seed: the coordinator draws a random one at each start unless the
    # config names one, so nobody outside can aim a flood at one worker.
    hash_seed: int = 0x5167
    # Fan-out shards (0: one per worker): the hash picks a shard, shard s is worker
    # s % workers's with its slice of the pool, so another worker count moves whole shards
    # (their sessions keep their pool addresses). ``shard_count`` is the number in use.
    shards: int = 0
    fragment_datagrams: int = 1024
    fragment_bytes: int = 16 << 20
    # An empty table is a choice (checks off), not "use the default".
    martian_ipv4: tuple[tuple[str, str], ...] = DEFAULT_MARTIAN_IPV4
    log_level: str = "info"
    source_file: str = ""
    backend: str = "auto"  # "auto" | "userspace" | "kernel"; workers get the resolved one
    metrics_listen: str = "127.0.0.1:9641"  # "" = no metrics endpoint
    # Who spreads captured packets over the workers: the coordinator over ZeroMQ, or the
    # kernel (each worker's capture socket filters its share, workers/engine/wire.py fanout_filter).
    fanout: str = "kernel"
    # How a worker writes to its TUN device: a batch per io_uring_enter (workers/uring.py;
    # write(2) per packet when the kernel refuses io_uring), or one write(2) per packet.
    tun_writes: str = "io_uring"
    # Who a userspace worker becomes once its devices and sockets are open ("": stay root).
    user: str = "nobody"
    # Workers journal their sessions to the coordinator, so a worker restarted after a crash
    # resumes them (workers/journal.py).
    flow_journal: bool = True
    # The kernel backend's take-over: how long the retiring run's relays keep the connections
    # they carry (the next run's relays take every new one) before they close them.
    take_over_drain_s: float = 600.0
    # The fast path's batch loops in C when the helper was built (workers/engine/_fastpath.c).
    compiled_fast_path: bool = True
    # NAT64 (mode "nat64", the [nat64] table): the RFC 6052 prefix, the IPv6 sources that may
    # use it, and pool4 as (address, protocol, first port, last port) rows.
    nat64_prefix: str = ""
    # Where its IPv6 comes from: "tun" (this host's kernel routes the prefix to the workers'
    # devices) or "tunnel" (a remote IPv6-only site over this gateway's 6in4/6to4 tunnel).
    nat64_input: str = "tun"
    nat64_clients: tuple[str, ...] = ()
    nat64_pool4: tuple[tuple[str, str, int, int], ...] = ()
    # RFC 6052 §3.1: the well-known prefix never stands for a non-global IPv4 address, unless
    # the operator says so (TAYGA's users ask for it in labs and private networks).
    nat64_allow_non_global: bool = False
    # RFC 6146 §3.5.1 / RFC 4787: "endpoint-independent" or "address-dependent" filtering.
    nat64_filtering: str = "endpoint-independent"
    # RFC 6888 REQ-4: pool4 ports one client may hold, a client being a /64 or a /128.
    nat64_ports_per_client: int = 4096
    nat64_client_prefix: int = 64
    # RFC 6888 REQ-8: a freed pool4 port waits this long before it is handed out again.
    nat64_port_hold_s: float = 120.0
    # RFC 6888 REQ-12: one log line per binding made and ended, without destinations.
    nat64_log_bindings: bool = True
    # The routing table the NAT64's translated IPv4 is routed by (0: main): on a 464XLAT box
    # the IPv4 uplink's routes live there, so this host's own IPv4 takes the CLAT.
    nat64_egress_table: int = 0
    # CLAT (mode "clat", or beside a NAT64: the [clat] table, RFC 6877 §6): the PLAT's prefix
    # ("auto": found at the start, RFC 7050), the CLAT's IPv6 address, the host's IPv4 address
    # on the CLAT device and the IPv4 MTU of its default route.
    clat_plat_prefix: str = ""
    clat_ipv6_address: str = ""
    clat_ipv4_address: str = "192.0.0.1"
    clat_mtu: int = 1260
    clat_udp_zero_checksum: str = "calculate"  # "calculate" | "drop" | "forward"
    clat_rediscovery_interval_s: float = 600.0  # RFC 7050: the resolver asked again
    # 6rd (mode "6rd", RFC 5969): the ISP's 6rd prefix ([tunnel] prefix; ``prefix`` above is
    # the delegated prefix derived from it) and IPv4MaskLen; the border relay is relay_ipv4.
    sixrd_prefix: str = ""
    # 6in4: the interface whose IPv4 address the tunnel follows ("": local_ipv4 is fixed).
    uplink: str = ""
    # 6in4 behind a 1:1 NAT: where the public address is learnt ("": public_ipv4 is fixed).
    public_ipv4_url: str = ""
    public_ipv4_check_s: float = 300.0
    # [lan] (kernel backend, coordinator/lan.py): "" interface: no LAN.
    lan_interface: str = ""
    lan_prefix: str = ""
    lan_rdnss: tuple[str, ...] = ()
    lan_allow: tuple[tuple[str, int, int, str], ...] = ()  # (proto, port lo, hi, address)
    ipv4_mask_len: int = 0
    # 6in4: the broker's update API ([broker], coordinator/broker.py); "" url: not used.
    broker_url: str = ""
    broker_tunnel_id: str = ""
    broker_username: str = ""
    broker_key_file: str = ""
    broker_ca_file: str = ""
    broker_min_interval_s: float = 300.0
    # Several tunnels ([[tunnel]], issue 19): the first one's name (its metrics' label), and
    # every further one.
    tunnel_name: str = ""
    tunnels: tuple[TunnelEntry, ...] = ()
    # [cluster] (issue 20, coordinator/cluster.py): what this node announces over BGP while
    # healthy, and the BGP speaker's (BIRD's) session; () announce: no cluster.
    cluster_announce: tuple[str, ...] = ()
    cluster_local_as: int = 0
    cluster_peer_as: int = 0
    cluster_neighbors: tuple[str, ...] = ()
    cluster_router_id: str = ""
    cluster_hold_time_s: int = 30
    cluster_withdraw_after_s: float = 3.0
    cluster_drain_timeout_s: float = 60.0
    cluster_drain_quiet_s: float = 2.0
    # [cluster] announce_pool: the node's pool and pool4 addresses were added to cluster_announce
    # (services' replies route to the node that owns the address).
    cluster_announce_pool: bool = False

    @property
    def shard_count(self) -> int:
        return self.shards or self.workers

    def all_tunnels(self) -> list[TunnelEntry]:
        """Every tunnel, the first (Settings' own fields) first; none in NAT64/CLAT mode."""
        if self.mode not in ("6in4", "6to4", "6rd"):
            return []
        first = TunnelEntry(self.tunnel_name or self.mode, self.mode, self.remote_ipv4,
                            self.relay_ipv4, self.prefix, self.addresses, self.mtu,
                            self.martian_ipv4, self.sixrd_prefix, self.ipv4_mask_len)
        return [first, *self.tunnels]

    @property
    def clat_enabled(self) -> bool:
        """A CLAT runs: alone (mode "clat") or beside the NAT64 (a 464XLAT box), in worker 0."""
        return self.mode == "clat" or bool(self.clat_plat_prefix)

    @property
    def engine_mtu(self) -> int:
        """The MTU the engine fragments and clamps to: the smallest of all tunnels'."""
        return min([self.mtu, *(t.mtu for t in self.tunnels)])

    @property
    def known_ipv4(self) -> str:
        """The address the tunnel is known by (``public_ipv4``; ``local_ipv4`` without a NAT)."""
        return self.public_ipv4 or self.local_ipv4

    @property
    def sixrd(self) -> SixrdDomain | None:
        """The 6rd domain (mode "6rd"), its CE addresses sharing the high bits of ours."""
        tunnels = self.all_tunnels()
        return tunnels[0].sixrd(self.known_ipv4) if tunnels else None

    @property
    def max_mss(self) -> int:
        """MSS both directions are clamped to: tunnel MTU - IPv6 header - TCP header."""
        return self.engine_mtu - 60

    def to_json(self) -> str:
        return json.dumps({"version": SETTINGS_VERSION, "settings": asdict(self)})

    @staticmethod
    def from_json(text: str) -> Settings:
        doc = json.loads(text)
        if doc.get("version") != SETTINGS_VERSION:
            raise ValueError(f"settings version {doc.get('version')} is not {SETTINGS_VERSION}")
        raw = doc["settings"]
        raw["addresses"] = tuple(raw["addresses"])
        raw["forwards"] = tuple(Forward(**{**f, "sources": tuple(f.get("sources", ()))})
                                for f in raw["forwards"])
        raw["timeouts"] = Timeouts(**raw["timeouts"])
        raw["martian_ipv4"] = tuple(tuple(r) for r in raw["martian_ipv4"])
        raw["nat64_clients"] = tuple(raw.get("nat64_clients", ()))
        raw["nat64_pool4"] = tuple(tuple(r) for r in raw.get("nat64_pool4", ()))
        raw["lan_rdnss"] = tuple(raw.get("lan_rdnss", ()))
        raw["lan_allow"] = tuple(tuple(r) for r in raw.get("lan_allow", ()))
        raw["cluster_announce"] = tuple(raw.get("cluster_announce", ()))
        raw["cluster_neighbors"] = tuple(raw.get("cluster_neighbors", ()))
        raw["tunnels"] = tuple(
            TunnelEntry(**{**t, "addresses": tuple(t["addresses"]),
                           "martian_ipv4": tuple(tuple(r) for r in t["martian_ipv4"])})
            for t in raw.get("tunnels", ()))
        return Settings(**raw)


def source_allowed(nets: tuple[tuple[int, int], ...] | None, address: bytes) -> bool:
    """Whether a packed IPv6 ``address`` is in a rule's source filter (None: everyone)."""
    if nets is None:
        return True
    value = int.from_bytes(address, "big")
    return any(value & mask == network for network, mask in nets)


def pool_size(pool: str) -> int:
    """How many addresses ``pool_addresses`` has, without making them (a /16 is 65534)."""
    count = ipaddress.IPv4Network(pool).num_addresses
    return count if count <= 2 else count - 2


def pool_addresses(pool: str) -> list[ipaddress.IPv4Address]:
    """Usable pool addresses: the network and broadcast addresses of the block are left out."""
    net = ipaddress.IPv4Network(pool)
    if net.num_addresses <= 2:
        return list(net)
    return list(net)[1:-1]


def worker_pool_range(pool: str, workers: int, index: int) -> tuple[int, int]:
    """[first, last] of the pool block (as integers) owned by worker ``index``: disjoint
    slices, so a reply's destination pool address alone names the worker that owns the flow."""
    net = ipaddress.IPv4Network(pool)
    base = int(net.network_address)
    per = net.num_addresses // workers
    first = base + index * per
    last = first + per - 1 if index < workers - 1 else int(net.broadcast_address)
    return first, last


def worker_pool(pool: str, workers: int, index: int) -> list[bytes]:
    """The addresses worker ``index`` hands to clients (its slice, minus network/broadcast)."""
    net = ipaddress.IPv4Network(pool)
    first, last = worker_pool_range(pool, workers, index)
    if net.num_addresses > 2:
        first = max(first, int(net.network_address) + 1)
        last = min(last, int(net.broadcast_address) - 1)
    return [v.to_bytes(4, "big") for v in range(first, last + 1)]


def worker_shards(shards: int, workers: int, index: int) -> range:
    """The fan-out shards worker ``index`` owns: shard s is worker s % workers's."""
    return range(index, shards, workers)


def shard_pools(pool: str, shards: int, workers: int, index: int) -> dict[int, list[bytes]]:
    """Worker ``index``'s pool addresses by shard: each shard's slice of the pool
    (``worker_pool`` cut by shards), so a pool address names its shard wherever it lives."""
    return {shard: worker_pool(pool, shards, shard)
            for shard in worker_shards(shards, workers, index)}


def pool_shard(pool: str, shards: int) -> Callable[[bytes], int]:
    """The shard whose pool slice holds an address (``worker_pool_range`` by shards), as a
    function: the prefix is parsed once, not per address."""
    net = ipaddress.IPv4Network(pool)
    base, per = int(net.network_address), net.num_addresses // shards

    def shard_of(address: bytes) -> int:
        return max(0, min((int.from_bytes(address, "big") - base) // per, shards - 1))
    return shard_of


def worker_routes(pool: str, workers: int, index: int, shards: int = 0
                  ) -> list[ipaddress.IPv4Network]:
    """The prefixes to route to worker ``index``'s TUN device: its shards' pool slices."""
    ranges = [worker_pool_range(pool, shards or workers, shard)
              for shard in worker_shards(shards or workers, workers, index)]
    return list(ipaddress.collapse_addresses(
        net for first, last in ranges for net in ipaddress.summarize_address_range(
            ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))))


PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}


def worker_pool4(rows: tuple[tuple[str, str, int, int], ...], workers: int,
                 index: int) -> dict[int, list[tuple[bytes, int, int]]]:
    """Worker ``index``'s slice of NAT64 pool4, by protocol number: each (address, protocol,
    port range) row cut into ``workers`` contiguous slices, so the destination port of an
    IPv4 packet alone names the worker that owns its binding."""
    out: dict[int, list[tuple[bytes, int, int]]] = {}
    for address, proto, first, last in rows:
        per = (last - first + 1) // workers
        lo = first + index * per
        hi = last if index == workers - 1 else lo + per - 1
        out.setdefault(PROTOCOL_NUMBERS[proto], []).append(
            (ipaddress.IPv4Address(address).packed, lo, hi))
    return out


def nat64_table(name: str, index: int) -> int:
    """The routing table (and packet mark) of NAT64 worker ``index`` of gateway ``name``: its
    device's routes live there, and the gateway's steering marks select it (one number per
    gateway name, so two gateways on one host never share one)."""
    return 0x5A600000 | ((zlib.crc32(name.encode()) & 0xFFF) << 8) | index
