"""TOML config -> validated immutable ``Settings``; every mistake is reported with the file,
line, key path and what to do about it.

The whole file is validated before anything is used, so a running gateway never half-applies
a bad config. Fixed keys come from the gateway issue; the rest are documented in README.md.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli

from sixgate.coordinator.broker import HE_UPDATE_URL
from sixgate.workers.engine.flows import Timeouts
from sixgate.workers.engine.nat64 import WELL_KNOWN_PREFIX, Nat64Prefix
from sixgate.workers.engine.settings import Forward, Settings, TunnelEntry, pool_size
from sixgate.workers.engine.tunnel import DEFAULT_MARTIAN_IPV4, SixrdDomain, prefix_6to4

# Directories a run_dir must never be: sixgate chmods its run_dir to 0700 and cleans it.
SYSTEM_DIRECTORIES = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/run",
    "/var/tmp", "/var/lib", "/usr/local", "/run/user"})


class ConfigError(Exception):
    """A config problem: file, line, key path, and what the user must do."""

    def __init__(self, file: str, key: str, line: int | None, message: str) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# Every [gateway] default is the Settings field's own default: written once (workers/engine/
# settings.py), read here; the [timeouts] defaults are the Timeouts dataclass's.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)
                            if f.default is not MISSING}
TIMEOUT_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Timeouts)}
DEFAULT_METRICS_LISTEN = DEFAULTS["metrics_listen"]  # 9641: free in Prometheus' allocations
DEFAULT_POOL = "100.64.0.0/16"  # RFC 6598 shared address space

# A check of one value: (ctx, table, key, value) -> the parsed value, or raise ctx.error(...).
Check = Callable[["_Ctx", str, str, Any], Any]


@dataclass(frozen=True)
class Key:
    """One config key: where it lives, its type, its default, its check and what it is for.

    ``check`` parses a value on its own; keys without one depend on other keys (the tunnel's
    mode decides which addresses it needs, the pool must hold a workers' worth of addresses)
    and are checked by ``parse_config`` by name. ``default`` is the value used when the file
    does not set the key; ``default_text`` says it for people where it is not a value (a
    required key, or one derived at start)."""

    table: str
    name: str
    type: str
    help: str
    check: Check | None = None
    default: Any = None
    default_text: str = ""
    default_factory: Callable[[], Any] | None = None

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if isinstance(self.default, str):
            return f'"{self.default}"'
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


def _ranged_int(lo: int, hi: int) -> Check:
    return lambda ctx, table, key, value: _int(ctx, table, key, value, lo, hi)


def _ranged_number(lo: float, hi: float = 1e9) -> Check:
    return lambda ctx, table, key, value: _number(ctx, table, key, value, lo, hi)


def _one_of(allowed: dict[str, str]) -> Check:
    return lambda ctx, table, key, value: _choice(ctx, table, key, value, allowed)


def _gateway(name: str, type_: str, help_: str, check: Check | None, **kw: Any) -> Key:
    """A [gateway] key whose default is the Settings field's."""
    kw.setdefault("default", DEFAULTS.get(name))
    return Key("gateway", name, type_, help_, check, **kw)


def _timeout(name: str, floor: float, help_: str, hi: float = 1e9) -> Key:
    return Key("timeouts", name, "seconds", help_, _ranged_number(floor, hi),
               TIMEOUT_DEFAULTS[name])


FLOW_LIMIT = _ranged_int(1, 10_000_000)
BACKENDS = {"auto": "the kernel's sit where it exists, else userspace",
            "userspace": "sixgate terminates the tunnel itself",
            "kernel": "the kernel's sit link; the workers relay the forwarded ports"}
FANOUTS = {"kernel": "each worker captures its share with a kernel filter",
           "coordinator": "the coordinator captures and sends batches over ZeroMQ"}
TUN_WRITES = {"io_uring": "a batch of packets per system call (write(2) where io_uring is "
                          "refused)",
              "write": "one write(2) per packet"}
NAT64_INPUTS = {"tun": "IPv6 arrives over this host's kernel IPv6: the prefix is routed to "
                        "sixgate's TUN devices (TAYGA's model)",
                "tunnel": "a remote IPv6-only site over this gateway's [tunnel]"}
FILTERINGS = {"endpoint-independent": "any IPv4 host may reach a binding (RFC 4787 REQ-8)",
              "address-dependent": "only IPv4 hosts the client has sent to (RFC 4787)"}
# RFC 7915 §4.5: what the CLAT does with IPv4 UDP that has no checksum (TAYGA's udp-cksum-mode).
UDP_ZERO_CHECKSUM = {"calculate": "give it one (a fragment's cannot be: dropped)",
                     "drop": "drop it (bad_checksum)",
                     "forward": "send it on without one (IPv6 receivers drop it: RFC 8200 §8.1)"}
LOG_LEVELS = {"debug": "everything", "info": "start, stop, limits hit",
              "warning": "problems only", "error": "failures only"}

# The configuration's one schema: parsing, defaults, ``sixgate check`` and the README's key
# reference (README.md "Every key"; ``python -m sixgate.coordinator.config`` prints it) all read it.
SCHEMA: tuple[Key, ...] = (
    Key("tunnel", "name", "string", "the tunnel's name, its metrics' `tunnel` label; with "
        "several tunnels ([[tunnel]], one table each, README \"Several tunnels\") each "
        "needs its own", default_text="mode"),
    Key("tunnel", "mode", "string", '"6to4" (RFC 3056), "6in4" (RFC 4213 configured tunnel) '
        'or "6rd" (RFC 5969, an ISP\'s 6rd domain)', default_text="required"),
    Key("tunnel", "local_ipv4", "IPv4 address", "the address on this host the tunnel's "
        "packets arrive at and leave from (the capture and the sending socket bind it); behind "
        "a 1:1 NAT the private one", default_text="required"),
    Key("tunnel", "public_ipv4", "IPv4 address", "the address the tunnel is known by: the one "
        "the broker has as its remote, embedded in the 6to4 2002::/48 and checked by the RFC "
        "3964 rules; set it when a 1:1 NAT (a cloud VM's public address) maps it to "
        "local_ipv4 (6to4 behind one runs in userspace: Linux sit cannot)",
        default_text="local_ipv4"),
    Key("tunnel", "relay_ipv4", "IPv4 address", "6to4 only: where packets to non-2002::/16 "
        "destinations go", default_text="required in 6to4 (RFC 7526: no anycast default)"),
    Key("tunnel", "remote_ipv4", "IPv4 address", "6in4 only: the tunnel broker's endpoint, "
        "the only source accepted (RFC 4213 §3.6)", default_text="required in 6in4"),
    Key("tunnel", "prefix", "IPv6 prefix", "6in4: the routed prefix; 6rd: the ISP's 6rd "
        "prefix (this host's delegated prefix is derived from it, RFC 5969 §4); 6to4: derived, "
        "leave it out", default_text="required in 6in4 and 6rd"),
    Key("tunnel", "ipv4_mask_len", "integer 0-32", "6rd only: IPv4MaskLen, how many high bits "
        "every IPv4 address of the 6rd domain shares (they are left out of the delegated "
        "prefix, RFC 5969 §4)", _ranged_int(0, 32), 0),
    Key("tunnel", "border_relay_ipv4", "IPv4 address", "6rd only: the ISP's border relay, "
        "where packets to destinations outside the 6rd prefix go and the only source of "
        "packets from outside it (RFC 5969 §7.1.1, §12)", default_text="required in 6rd"),
    Key("tunnel", "addresses", "list of IPv6 addresses", "the gateway's own addresses, inside "
        "the prefix", default_text="[prefix::1]"),
    Key("tunnel", "mtu", "integer 1280-1480", "tunnel MTU (RFC 4213 §3.2.1); TCP MSS is "
        "clamped to mtu - 60", _ranged_int(1280, 1480), 1480),
    Key("tunnel", "martian_ipv4", "list of IPv4 prefixes", "outer sources and 2002::/16 "
        "embeddings refused (RFC 3964 §5.3.1); [] turns the check off",
        default_text="0/8, 10/8, 127/8, 169.254/16, 172.16/12, 192.168/16, 224/4, 240/4"),
    Key("tunnel", "uplink", "interface name", "6in4: the interface that holds local_ipv4; "
        "when its IPv4 address changes (a new DHCP lease, a PPP reconnect) sixgate moves the "
        "tunnel to the new address without a restart, keeping every session, and tells the "
        "broker ([broker]); \"\": local_ipv4 is fixed",
        lambda *a: _interface(*a), default=""),
    Key("tunnel", "public_ipv4_url", "http(s) URL", "6in4 behind a 1:1 NAT: a \"what is my "
        "address\" service that answers this host's public IPv4 address as text; asked at "
        "the start and every public_ipv4_check_s, a new answer moves the tunnel's public "
        "address without a restart (the broker told); \"\": public_ipv4 is fixed",
        lambda *a: _url(*a), default=""),
    Key("tunnel", "public_ipv4_check_s", "seconds 5-86400", "how often public_ipv4_url is "
        "asked", _ranged_number(5, 86400), DEFAULTS["public_ipv4_check_s"]),
    Key("tunnel", "probe_interval_s", "seconds 0-3600", "6in4: how often an ICMPv6 echo goes "
        "to the broker's link-local address fe80::<remote_ipv4> (RFC 4213 §3.7, §3.8) to tell "
        "whether it still answers (sixgate_tunnel_peer_reachable); 0: never",
        _ranged_number(0, 3600), DEFAULTS["probe_interval_s"]),
    _gateway("backend", "string", "; ".join(f'"{k}": {v}' for k, v in BACKENDS.items()),
             _one_of(BACKENDS)),
    _gateway("workers", "integer 1-64", "worker processes", _ranged_int(1, 64),
             default_text="number of CPUs", default_factory=lambda: os.cpu_count() or 1),
    _gateway("pool", "IPv4 prefix", "addresses the services see clients as, one per IPv6 "
             "client (RFC 6598 space by default)", None, default=DEFAULT_POOL),
    _gateway("run_dir", "absolute path", "control socket and pidfiles (mode 0700, the "
             "gateway user's)", lambda *a: _run_dir(*a), default="/run/sixgate"),
    _gateway("name", "1-10 of a-z0-9", "TUN devices are NAME0 .. NAME(N-1)",
             lambda *a: _name(*a), default="sixgate"),
    _gateway("user", "user name", "who the coordinator (with only the capabilities "
             "supervision needs) and the workers (with none) become after setup; \"\" keeps "
             "root", lambda *a: _user(*a)),
    _gateway("log_level", "string", "debug, info, warning or error", _one_of(LOG_LEVELS)),
    _gateway("max_flows", "integer", "sessions, whole gateway (RFC 6888 REQ-4)", FLOW_LIMIT),
    _gateway("max_flows_per_prefix", "integer", "sessions per source /64", FLOW_LIMIT),
    _gateway("max_flows_per_48", "integer", "sessions per source /48 (a site)", FLOW_LIMIT),
    _gateway("max_flows_per_ipv4_source", "integer", "6to4: sessions per outer IPv4 source "
             "(a relay or router)", FLOW_LIMIT),
    _gateway("icmp_errors_per_s", "number", "ICMPv6 errors and TCP RSTs originated per "
             "second, token bucket (RFC 4443 §2.4(f)); each source /64 gets a tenth",
             _ranged_number(0)),
    _gateway("icmp_error_burst", "integer", "their bucket's depth", _ranged_int(1, 1_000_000)),
    _gateway("echo_replies_per_s", "number", "ICMPv6 echo replies per second, the same way; "
             "requests over it are dropped as icmp_rate_limited", _ranged_number(0)),
    _gateway("echo_burst", "integer", "their bucket's depth", _ranged_int(1, 1_000_000)),
    _gateway("queue_batches", "integer", "coordinator fan-out: ZeroMQ high-water mark per "
             "worker, in batches", _ranged_int(1, 1_000_000)),
    _gateway("batch_packets", "integer 1-1024", "packets per receive batch (and per "
             "coordinator -> worker message)", _ranged_int(1, 1024)),
    _gateway("hash_seed", "integer", "fan-out hash seed", _ranged_int(0, 0xFFFFFFFF),
             default_text="random at each start",
             default_factory=lambda: int.from_bytes(os.urandom(4), "big")),
    _gateway("shards", "integer 0-1024", "fan-out shards, each with its slice of the pool, "
             "spread over the workers; more than workers lets a take-over (sixgate reload "
             "--or-take-over, systemctl reload) change the worker count, up to this, without "
             "ending a session (userspace backend); 0: one per worker",
             _ranged_int(0, 1024), default_text="0 (one per worker)"),
    _gateway("fragment_datagrams", "integer", "datagrams in reassembly at once, per worker",
             _ranged_int(1, 1_000_000)),
    _gateway("fragment_bytes", "integer", "bytes held for reassembly, per worker",
             _ranged_int(65536, 1 << 34)),
    _gateway("fanout", "string", "; ".join(f'"{k}": {v}' for k, v in FANOUTS.items()),
             _one_of(FANOUTS)),
    _gateway("flow_journal", "boolean", "workers journal their sessions to the coordinator; a "
             "worker restarted after a crash resumes them (false: it starts empty)",
             lambda *a: _bool(*a)),
    _gateway("take_over_drain_s", "seconds 1-86400", "kernel backend: at `sixgate run "
             "--take-over`, the longest the retiring run's relays keep carrying their "
             "connections (the new run's relays take every new one)", _ranged_number(1, 86400)),
    _gateway("compiled_fast_path", "boolean", "the fast path's batch loops run compiled when "
             "the C helper was built at install (workers/engine/_fastpath.c); false: in Python, "
             "the same rules and bytes", lambda *a: _bool(*a)),
    _gateway("tun_writes", "string", "; ".join(f'"{k}": {v}' for k, v in TUN_WRITES.items()),
             _one_of(TUN_WRITES)),
    Key("metrics", "listen", "host:port", "/metrics, /healthz, /readyz; \"[::1]:9641\" works "
        "too; \"\" turns them off", default=DEFAULT_METRICS_LISTEN),
    # RFC 6146 §4 / RFC 4787 REQ-5: UDP below 2 min breaks applications; RFC 5382 REQ-5 asks
    # at least 2 h 4 min for established TCP, so those are the floors.
    _timeout("tcp_established_s", 7440, "established TCP session (minimum 2 h 4 min)"),
    _timeout("tcp_transitory_s", 240, "TCP opening or closing (minimum 4 min)"),
    _timeout("udp_s", 120, "UDP session (minimum 2 min)"),
    _timeout("icmp_s", 1, "ICMP"),
    # Linux conntrack: 30 s for an unanswered UDP flow, 60 s for a half-open TCP one.
    _timeout("unassured_s", 1, "a session until the client completes the TCP handshake or the "
             "service answers its UDP (at most 240)", 240),
    Key("nat64", "prefix", "IPv6 prefix", "NAT64 (IPv6-only clients reach IPv4): the RFC 6052 "
        "prefix that stands for the IPv4 internet, the well-known one or a network-specific "
        "/32 /40 /48 /56 /64 /96", lambda *a: _nat64_prefix(*a), WELL_KNOWN_PREFIX),
    Key("nat64", "clients", "list of IPv6 prefixes", "who may use the NAT64; everyone else "
        "is refused (source_not_allowed, ICMPv6 1/1)", default_text="required"),
    Key("nat64", "input", "string", "; ".join(f'"{k}": {v}' for k, v in NAT64_INPUTS.items()),
        _one_of(NAT64_INPUTS), "tun"),
    Key("nat64", "mtu", "integer 1280-65535", "MTU of the IPv6 side; TCP MSS is clamped to "
        "mtu - 60", _ranged_int(1280, 65535), 1500),
    Key("nat64", "allow_non_global", "boolean", "let the well-known prefix stand for private "
        "and other non-global IPv4 addresses too (RFC 6052 §3.1 says no)",
        lambda *a: _bool(*a), False),
    Key("nat64", "filtering", "string", "; ".join(f'"{k}": {v}' for k, v in FILTERINGS.items()),
        _one_of(FILTERINGS), "endpoint-independent"),
    Key("nat64", "ports_per_client", "integer", "pool4 ports one client may hold (RFC 6888 "
        "REQ-4)", _ranged_int(1, 1 << 20), DEFAULTS["nat64_ports_per_client"]),
    Key("nat64", "client_prefix", "64 or 128", "what one client is for the quota: a /64 or "
        "a /128", lambda *a: _client_prefix(*a), DEFAULTS["nat64_client_prefix"]),
    Key("nat64", "port_hold_s", "seconds", "a freed pool4 port waits this long before reuse "
        "(RFC 6888 REQ-8)", _ranged_number(0, 3600), DEFAULTS["nat64_port_hold_s"]),
    Key("nat64", "log_bindings", "boolean", "one log line per binding made and ended (client "
        "address and port, pool4 address and port, never the destination: RFC 6888 REQ-12)",
        lambda *a: _bool(*a), True),
    Key("nat64", "egress_table", "integer 0-2147483647", "the routing table the NAT64's "
        "translated IPv4 is routed by (an `ip rule` per worker device, removed on stop); 0: "
        "the main table. On a 464XLAT box ([clat] beside [nat64]) keep the IPv4 uplink's "
        "routes in this table, so that this host's own IPv4 programs take the CLAT",
        _ranged_int(0, 2**31 - 1), 0),
    Key("nat64", "pool4", "list of tables", "the [[nat64.pool4]] entries: IPv4 addresses and "
        "port ranges the clients are translated to (RFC 6146 §3.5.1)",
        default_text="required"),
    Key("nat64.pool4", "address", "IPv4 address", "[[nat64.pool4]]: an address the NAT64 "
        "translates to, routed to sixgate (not one the host uses)", default_text="required"),
    Key("nat64.pool4", "tcp", "port range", "its TCP ports, like \"61001-65535\"",
        default_text="none"),
    Key("nat64.pool4", "udp", "port range", "its UDP ports", default_text="none"),
    Key("nat64.pool4", "icmp", "identifier range", "its ICMP query identifiers",
        default_text="none"),
    Key("lan", "interface", "interface name", "a LAN behind the tunnel (kernel backend): the "
        "interface it is on; sixgate routes [lan] prefix to it, sends it router "
        "advertisements (radvd) and guards it (nftables, RFC 6092 simple security)",
        lambda *a: _interface(*a), default="", default_text="required"),
    Key("lan", "prefix", "IPv6 /64", "the LAN's prefix, inside the tunnel's (hosts "
        "autoconfigure in it, RFC 4862); the router takes its ::1", default_text="required"),
    Key("lan", "rdnss", "list of IPv6 addresses", "DNS servers the router advertisements "
        "name (RFC 8106)", default_text="[]"),
    Key("lan", "allow", "list of tables", "the [[lan.allow]] holes: what the IPv6 internet "
        "may open to the LAN; everything else it did not ask for is dropped", default_text="[]"),
    Key("lan.allow", "proto", "string", '[[lan.allow]]: "tcp" or "udp"',
        default_text="required"),
    Key("lan.allow", "port", "port or range", '80, or "8000-8099"', default_text="required"),
    Key("lan.allow", "address", "IPv6 address", "the LAN host it opens (a stable address: "
        "give the host a static one or a token)", default_text="every LAN host"),
    Key("clat", "plat_prefix", "IPv6 prefix or \"auto\"", "CLAT (RFC 6877: this IPv6-only "
        "host's IPv4 programs reach IPv4 through a NAT64): the NAT64's RFC 6052 prefix; "
        "\"auto\" asks the resolver for ipv4only.arpa at the start (RFC 7050)",
        lambda *a: _plat_prefix(*a), "auto"),
    Key("clat", "ipv6_address", "IPv6 address or \"auto\"", "the CLAT's own IPv6 address, "
        "in the uplink's /64 (sixgate answers neighbour solicitations for it there) and one the "
        "NAT64 serves; \"auto\" picks a stable one in the /64 of the IPv6 default route's "
        "interface, checked by duplicate address detection (RFC 4862 §5.4)",
        default_text='"auto"'),
    Key("clat", "ipv4_address", "IPv4 address", "the host's IPv4 address on the CLAT device "
        "(RFC 7335: 192.0.0.0/29)", lambda *a: _ipv4(*a), DEFAULTS["clat_ipv4_address"]),
    Key("clat", "mtu", "integer 576-65515", "IPv4 MTU of the CLAT's default route; 1260 keeps "
        "every translated packet within IPv6's 1280 (RFC 6877 §6.3)", _ranged_int(576, 65515),
        DEFAULTS["clat_mtu"]),
    Key("clat", "rediscovery_interval_s", "seconds 1-86400", "with plat_prefix = \"auto\" and a "
        "prefix found by RFC 7050: how often the resolver is asked again (RFC 7050 §3: the "
        "prefix is learned again when the answer's TTL has run out, which getaddrinfo does not "
        "show); a new one is taken, logged and counted. A PREF64 in a router advertisement is "
        "taken whenever one comes", _ranged_number(1, 86400),
        DEFAULTS["clat_rediscovery_interval_s"]),
    Key("clat", "udp_zero_checksum", "string", "; ".join(
        f'"{k}": {v}' for k, v in UDP_ZERO_CHECKSUM.items()), _one_of(UDP_ZERO_CHECKSUM),
        DEFAULTS["clat_udp_zero_checksum"]),
    Key("broker", "url", "https URL", "6in4: the tunnel broker's update API, told our "
        "address at each start and by `sixgate tunnel update` (an HTTPS GET with basic auth, "
        "hostname = tunnel_id, myip = public_ipv4; Hurricane Electric's by default)",
        default=HE_UPDATE_URL),
    Key("broker", "tunnel_id", "string", "the tunnel's id at the broker",
        default_text="required with [broker]"),
    Key("broker", "username", "string", "the broker account's user name",
        default_text="required with [broker]"),
    Key("broker", "key_file", "path", "a file holding the update key, mode 0600 (refused "
        "otherwise); read once at the start, before sixgate drops root",
        default_text="required with [broker]"),
    Key("broker", "ca_file", "path", "CA certificates the broker's certificate must chain to",
        default_text="the system's"),
    Key("broker", "min_interval_s", "seconds 60-86400", "never ask the broker more often than "
        "this (a failed update is retried after 60 s, doubling, at least this)",
        _ranged_number(60, 86400), DEFAULTS["broker_min_interval_s"]),
    Key("cluster", "announce", "list of prefixes", "what this node announces over BGP "
        "while it is ready (/readyz 200): the 6to4 anycast local_ipv4/32, a 6in4 endpoint, "
        "its NAT64 pool4 slice, the NAT64 prefix (IPv6 prefixes go to the IPv6 neighbors); "
        "with RFC 8326's GRACEFUL_SHUTDOWN community while it drains; "
        "BIRD withdraws them when sixgate stops or crashes (README \"A fleet behind ECMP\")",
        default_text="required"),
    Key("cluster", "announce_pool", "boolean", "announce this node's share of the addresses "
        "services answer to as well: [gateway] pool (the sources of its forwards) and each "
        "[[nat64.pool4]] address, so a service behind the routers answers the node that "
        "owns the address; each node then needs a pool (and pool4) of its own",
        lambda *a: _bool(*a), False),
    Key("cluster", "local_as", "AS number", "this node's BGP AS", default_text="required"),
    Key("cluster", "peer_as", "AS number", "the routers' AS", default_text="required"),
    Key("cluster", "neighbors", "list of addresses", "the routers BIRD peers with (IPv4 "
        "and IPv6: a session each, carrying the prefixes of its family)",
        default_text="required"),
    Key("cluster", "router_id", "IPv4 address", "this node's BGP router id (unique in the "
        "fleet: not the anycast address)", default_text="required"),
    Key("cluster", "hold_time_s", "seconds 3-65535", "BGP hold time: how soon a router "
        "drops a node that died whole (BIRD too)", _ranged_int(3, 65535),
        DEFAULTS["cluster_hold_time_s"]),
    Key("cluster", "withdraw_after_s", "seconds 1-300", "how long the node must be unready "
        "before it withdraws (a worker restarting for a second is no reason to move every "
        "flow)", _ranged_number(1, 300), DEFAULTS["cluster_withdraw_after_s"]),
    Key("cluster", "drain_timeout_s", "seconds 1-86400", "`sixgate drain`: the longest it "
        "waits for this node's traffic to end",
        _ranged_number(1, 86400), DEFAULTS["cluster_drain_timeout_s"]),
    Key("cluster", "drain_quiet_s", "seconds 0.5-600", "`sixgate drain`: the node's traffic "
        "has ended when no packet came for this long", _ranged_number(0.5, 600),
        DEFAULTS["cluster_drain_quiet_s"]),
    Key("forward", "proto", "string", '"tcp" or "udp"', default_text="required"),
    Key("forward", "port", "port or range", '80, or "8000-8099"', default_text="required"),
    Key("forward", "to", "IPv4 host[:port]", "the service; a range shifts (\"8000-8099\" -> "
        ":9000 = 9000-9099), without :port the port is kept", default_text="required"),
    Key("forward", "from", "list of IPv6 prefixes", "only these sources; to anyone else the "
        "port is closed (source_not_allowed)", default_text="everyone"),
)

ALLOWED: dict[str, set[str]] = {}
for _key in SCHEMA:
    ALLOWED.setdefault(_key.table, set()).add(_key.name)


def _checked(ctx: _Ctx, table: str, section: dict[str, Any]) -> dict[str, Any]:
    """Every key of ``table`` that checks on its own, parsed (or defaulted) by the schema."""
    out = {}
    for key in SCHEMA:
        if key.table != table or key.check is None:
            continue
        if key.name in section:
            value = section[key.name]
        elif key.default_factory is not None:
            value = key.default_factory()
        else:
            value = key.default
        out[key.name] = key.check(ctx, table, key.name, value)
    return out


_GATEWAY_KEYS = {key.name: key for key in SCHEMA if key.table == "gateway"}


def _given(table: dict[str, Any], key: str) -> Any:
    """``key`` of the [gateway] table, or its schema default when the file does not set it."""
    return table.get(key, _GATEWAY_KEYS[key].default)


def reference_markdown() -> str:
    """README.md's "Every key" table, from the schema."""
    rows = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for key in SCHEMA:
        what = key.help.replace("|", "\\|")
        rows.append(f"| `{key.table}.{key.name}` | {key.type} | {key.shown_default()} | "
                    f"{what} |")
    return "\n".join(rows) + "\n"


def effective_values(settings: Settings, text: str) -> list[tuple[Key, Any, bool]]:
    """Each key (but the forward rules') as ``settings`` has it, and whether the config
    ``text`` it came from sets it; for ``sixgate check``."""
    doc = tomli.loads(text)
    if isinstance(doc.get("tunnel"), list):  # [[tunnel]]: the first; ``check`` lists the rest
        doc["tunnel"] = doc["tunnel"][0]
    out: list[tuple[Key, Any, bool]] = []
    for key in SCHEMA:
        if key.table in ("forward", "nat64.pool4", "lan.allow"):
            continue
        if key.table == "lan":
            if settings.lan_interface:
                out.append((key, getattr(settings, f"lan_{key.name}"),
                            key.name in doc.get("lan", {})))
            continue
        if key.table == "nat64":
            if not settings.nat64_prefix or key.name == "mtu" and settings.mode != "nat64":
                continue
            value: Any = (settings.mtu if key.name == "mtu"
                          else getattr(settings, f"nat64_{key.name}"))
            out.append((key, value, key.name in doc.get("nat64", {})))
            continue
        if key.table == "cluster":
            if settings.cluster_announce:
                out.append((key, getattr(settings, f"cluster_{key.name}"),
                            key.name in doc.get("cluster", {})))
            continue
        if key.table == "broker":
            if settings.broker_url:
                out.append((key, getattr(settings, f"broker_{key.name}"),
                            key.name in doc.get("broker", {})))
            continue
        if key.table == "clat":
            if settings.clat_enabled:
                out.append((key, getattr(settings, f"clat_{key.name}"),
                            key.name in doc.get("clat", {})))
            continue
        if settings.mode in ("nat64", "clat") and key.table == "tunnel":
            continue
        if key.table == "timeouts":
            value = getattr(settings.timeouts, key.name)
        elif key.table == "metrics":
            value = settings.metrics_listen
        elif key.name == "martian_ipv4":
            value = [cidr for cidr, _ in settings.martian_ipv4]
        elif key.name == "addresses":
            value = list(settings.addresses)
        elif key.table == "tunnel" and key.name == "name":
            value = settings.tunnel_name
        elif key.name == "border_relay_ipv4":  # held as relay_ipv4
            value = settings.relay_ipv4 if settings.mode == "6rd" else None
        elif key.name == "prefix" and settings.mode == "6rd":
            value = settings.sixrd_prefix  # the file's; the delegated one is derived
        else:
            value = getattr(settings, key.name)
        out.append((key, value, key.name in doc.get(key.table, {})))
    return out


def _locate(text: str, table: str, key: str | None, index: int = 0) -> int | None:
    """Line number (1-based) of ``key`` inside ``[table]`` (or the ``index``-th ``[[table]]``)."""
    current = None
    seen = -1
    header = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1)
            if current == table:
                seen += 1
                if key is None and seen == index:
                    return number
            continue
        if current == table and seen == index and key is not None:
            if re.match(rf"^\s*{re.escape(key)}\s*=", line):
                return number
    return None


@dataclass
class _Ctx:
    file: str
    text: str
    # The [[table]] being parsed, for tables whose parsers do not pass an index themselves
    # ([[tunnel]]: ``_parse_tunnel`` reads one table of the list or the single [tunnel]).
    indexes: dict[str, int] = field(default_factory=dict)

    def error(self, table: str, key: str | None, message: str, index: int | None = None) -> (
            ConfigError):
        if index is None:
            index = self.indexes.get(table)
        path = table if key is None else f"{table}.{key}"
        if index is not None:
            path = f"{table}[{index}]" + (f".{key}" if key else "")
        line = _locate(self.text, table, key, index or 0)
        if line is None and key is not None:
            line = _locate(self.text, table, None, index or 0)
        return ConfigError(self.file, path, line, message)


def _ipv4(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise TypeError(value)  # ipaddress takes integers (and True) as addresses too
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError, TypeError):
        raise ctx.error(table, key, f"{value!r} is not an IPv4 address; write it like "
                                    f"\"192.0.2.10\"") from None


def _int(ctx: _Ctx, table: str, key: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ctx.error(table, key, f"{value!r} must be a whole number from {lo} to {hi}")
    return value


def _number(ctx: _Ctx, table: str, key: str, value: Any, lo: float,
            hi: float = 1e9) -> float:
    # nan and inf are TOML numbers too: a nan timeout would stop expiry for good.
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not lo <= value <= hi):
        raise ctx.error(table, key, f"{value!r} must be a number from {lo:g} to {hi:g}")
    return float(value)


# RFC 6890 special-purpose IPv4 blocks no forward rule may target: "this network", multicast,
# reserved and the limited broadcast address are never one service.
_BAD_TARGETS = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "\"this network\" (RFC 6890)"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast (RFC 5771)"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved or broadcast (RFC 6890)"),
)


def _parse_forward(ctx: _Ctx, index: int, raw: Any) -> Forward:
    if not isinstance(raw, dict):
        raise ctx.error("forward", None, f"{raw!r} is not a rule; write each rule as a "
                        "[[forward]] table with proto, port and to", index)
    for key in raw:
        if key not in ALLOWED["forward"]:
            raise ctx.error("forward", key, f"unknown key; allowed: "
                            f"{', '.join(sorted(ALLOWED['forward']))}", index)
    proto = raw.get("proto")
    if proto not in ("tcp", "udp"):
        raise ctx.error("forward", "proto", f"{proto!r} must be \"tcp\" or \"udp\"", index)
    port = raw.get("port")
    if isinstance(port, int) and not isinstance(port, bool):
        lo = hi = port
    elif isinstance(port, str) and re.fullmatch(r"\d+-\d+", port):
        lo, hi = (int(p) for p in port.split("-"))
    elif isinstance(port, str) and port.isdigit():
        lo = hi = int(port)
    else:
        raise ctx.error("forward", "port", f"{port!r} must be a port (80) or a range "
                        "(\"8000-8099\")", index)
    if not (1 <= lo <= hi <= 65535):
        raise ctx.error("forward", "port", f"{port!r}: ports run from 1 to 65535, low first",
                        index)
    to = raw.get("to")
    if not isinstance(to, str):
        raise ctx.error("forward", "to", "missing; write the IPv4 service as "
                        "\"127.0.0.1:8080\"", index)
    host, _, tport = to.partition(":")
    try:
        target_ip = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise ctx.error("forward", "to", f"{to!r}: {host!r} is not an IPv4 address; write "
                        "\"127.0.0.1:8080\"", index) from None
    for block, what in _BAD_TARGETS:
        if ipaddress.IPv4Address(target_ip) in block:
            raise ctx.error("forward", "to", f"{to!r}: {target_ip} is {what}, not a service "
                            "address; name the host the service runs on", index)
    target_port: int | None = None
    if tport:
        if not tport.isdigit() or not 1 <= int(tport) <= 65535:
            raise ctx.error("forward", "to", f"{to!r}: port must be 1..65535", index)
        target_port = int(tport)
        if target_port + (hi - lo) > 65535:
            raise ctx.error("forward", "to", f"{to!r}: the range {lo}-{hi} shifted to "
                            f"{target_port} runs past 65535", index)
    sources = raw.get("from", [])
    if not isinstance(sources, list) or not sources and "from" in raw:
        raise ctx.error("forward", "from", f"{sources!r} must be a non-empty list of IPv6 "
                        "prefixes like [\"2001:db8::/32\"] (leave it out to allow everyone)",
                        index)
    nets = []
    for cidr in sources:
        try:
            if not isinstance(cidr, str):
                raise TypeError(cidr)
            nets.append(str(ipaddress.IPv6Network(cidr)))
        except (ValueError, TypeError):
            raise ctx.error("forward", "from", f"{cidr!r} is not an IPv6 prefix; write it "
                            "like \"2001:db8::/32\" (host bits zero)", index) from None
    return Forward(proto=proto, port_lo=lo, port_hi=hi, target_ipv4=target_ip,
                   target_port=target_port, sources=tuple(nets))


MAX_TUNNELS = 8  # the ``tunnel`` label's values are bounded by this
_TUNNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def _parse_tunnels(ctx: _Ctx, raw: Any) -> dict[str, Any]:
    """[tunnel], or several [[tunnel]] tables (issue 19: two 6in4 brokers and 6to4, say).
    The first gives Settings' own tunnel fields; the others are ``tunnels``. They share the
    host's address (one capture, one sending socket); a packet belongs to the 6in4 tunnel
    whose broker sent it, else to the one 6to4 or 6rd tunnel, so at most one of those."""
    if not isinstance(raw, list):
        values = _parse_tunnel(ctx, raw)
        values["tunnel_name"] = _tunnel_name(ctx, raw, values["mode"])
        return {**values, "tunnels": ()}
    if not raw:
        raise ConfigError(ctx.file, "tunnel", None, "missing [[tunnel]] table; see README.md")
    if len(raw) > MAX_TUNNELS:
        raise ctx.error("tunnel", None, f"at most {MAX_TUNNELS} tunnels", MAX_TUNNELS)
    parsed: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    any_source: int | None = None
    remotes: dict[str, int] = {}
    try:
        for index, entry in enumerate(raw):
            ctx.indexes["tunnel"] = index
            values = _parse_tunnel(ctx, entry)
            name = values["tunnel_name"] = _tunnel_name(ctx, entry, values["mode"])
            if name in names:
                raise ctx.error("tunnel", "name", f"{name!r} is taken by tunnel {names[name]}; "
                                "give each [[tunnel]] its own name")
            names[name] = index
            if index:
                first = parsed[0]
                for key in ("local_ipv4", "public_ipv4"):
                    if values[key] != first[key]:
                        raise ctx.error("tunnel", key if key in entry else "local_ipv4",
                                        f"{values[key]}: every tunnel shares the first one's "
                                        f"{key} ({first[key]}; one capture and one sending "
                                        "socket); use that address")
                for key in ("uplink", "public_ipv4_url", "probe_interval_s"):
                    if key in entry:
                        raise ctx.error("tunnel", key, "only the first tunnel has it for now "
                                        "(its address followed, its broker probed); move "
                                        "this tunnel first or remove the key")
            if values["mode"] == "6in4":
                remote = values["remote_ipv4"]
                if remote in remotes:
                    raise ctx.error("tunnel", "remote_ipv4", f"{remote} is tunnel "
                                    f"{remotes[remote]}'s broker too: a packet from it could "
                                    "not tell its tunnel; one tunnel per broker address")
                remotes[remote] = index
            elif any_source is not None:
                raise ctx.error("tunnel", "mode", f"tunnel {any_source} is "
                                f"{parsed[any_source]['mode']} already: 6to4 and 6rd take "
                                "packets from any IPv4 address, so a second one could not tell "
                                "its packets; keep one")
            else:
                any_source = index
            for other, earlier in enumerate(parsed):
                if ipaddress.IPv6Network(values["prefix"]).overlaps(
                        ipaddress.IPv6Network(earlier["prefix"])):
                    raise ctx.error("tunnel", "prefix" if "prefix" in entry else "mode",
                                    f"{values['prefix']} overlaps tunnel {other}'s "
                                    f"{earlier['prefix']}: each tunnel routes its own prefix")
            parsed.append(values)
        if any_source is not None:
            for key in ("uplink", "public_ipv4_url"):
                if parsed[0][key]:
                    # The tunnels share the address: following it would move the 6to4/6rd
                    # tunnel's too, whose prefix is that address.
                    ctx.indexes["tunnel"] = 0
                    raise ctx.error("tunnel", key, f"the {parsed[any_source]['mode']} tunnel "
                                    f"{any_source} shares this address and its prefix is "
                                    "made of it: a new address would be a new prefix; remove "
                                    f"{key} or that tunnel")
            relay = parsed[any_source]["relay_ipv4"]
            if relay in remotes:
                ctx.indexes["tunnel"] = remotes[relay]
                raise ctx.error("tunnel", "remote_ipv4", f"{relay} is the "
                                f"{parsed[any_source]['mode']} tunnel's relay too: its packets "
                                "would be taken for this 6in4 tunnel's")
    finally:
        ctx.indexes.pop("tunnel", None)
    first = parsed[0]
    first["tunnels"] = tuple(
        TunnelEntry(name=t["tunnel_name"], mode=t["mode"], remote_ipv4=t["remote_ipv4"],
                    relay_ipv4=t["relay_ipv4"], prefix=t["prefix"], addresses=t["addresses"],
                    mtu=t["mtu"], martian_ipv4=t["martian_ipv4"],
                    sixrd_prefix=t["sixrd_prefix"], ipv4_mask_len=t["ipv4_mask_len"])
        for t in parsed[1:])
    return first


def _tunnel_name(ctx: _Ctx, tunnel: dict[str, Any], mode: str) -> str:
    name = tunnel.get("name", mode)
    if not isinstance(name, str) or not _TUNNEL_NAME.fullmatch(name):
        raise ctx.error("tunnel", "name", f"{name!r} must be 1-32 letters, digits, '_', '.' "
                        "or '-', starting with a letter or digit")
    return name


def _parse_tunnel(ctx: _Ctx, tunnel: Any) -> dict[str, Any]:
    """The [tunnel] keys, which depend on each other through ``mode``."""
    if not tunnel:
        raise ConfigError(ctx.file, "tunnel", None, "missing [tunnel] table; see README.md")
    mode = tunnel.get("mode")
    if mode not in ("6to4", "6in4", "6rd"):
        raise ctx.error("tunnel", "mode", f"{mode!r} must be \"6to4\" (RFC 3056), "
                        "\"6in4\" (RFC 4213 configured tunnel) or \"6rd\" (RFC 5969)")
    if "local_ipv4" not in tunnel:
        raise ctx.error("tunnel", None, "local_ipv4 is missing; set this host's public IPv4")
    local_ipv4 = _ipv4(ctx, "tunnel", "local_ipv4", tunnel["local_ipv4"])
    public_ipv4 = local_ipv4
    if "public_ipv4" in tunnel:
        public_ipv4 = _ipv4(ctx, "tunnel", "public_ipv4", tunnel["public_ipv4"])
    relay_ipv4 = remote_ipv4 = None
    sixrd_prefix, mask_len = "", 0
    for key in ("ipv4_mask_len", "border_relay_ipv4"):
        if key in tunnel and mode != "6rd":
            raise ctx.error("tunnel", key, "only for mode = \"6rd\"; remove it")
    if mode == "6rd":
        sixrd_prefix, mask_len, relay_ipv4, prefix = _parse_6rd(ctx, tunnel, public_ipv4)
    elif mode == "6to4":
        if "relay_ipv4" not in tunnel:
            # RFC 7526: the anycast relay is deprecated, so there is no silent default.
            raise ctx.error("tunnel", None, "relay_ipv4 is missing: 6to4 needs a relay for "
                            "non-2002::/16 destinations; name one (RFC 7526 deprecated the "
                            "192.88.99.1 anycast default)")
        relay_ipv4 = _ipv4(ctx, "tunnel", "relay_ipv4", tunnel["relay_ipv4"])
        if "remote_ipv4" in tunnel:
            raise ctx.error("tunnel", "remote_ipv4", "only for mode = \"6in4\"; remove it")
        # RFC 3056 §2: the prefix embeds the address the world knows (behind a 1:1 NAT, the
        # public one).
        derived = prefix_6to4(public_ipv4)
        if "prefix" in tunnel and _ipv6_network(tunnel["prefix"]) != derived:
            raise ctx.error("tunnel", "prefix", f"in 6to4 mode the prefix is derived from "
                            f"{'public_ipv4' if 'public_ipv4' in tunnel else 'local_ipv4'} "
                            f"({derived}); remove the key")
        prefix = derived
    else:
        if "remote_ipv4" not in tunnel:
            raise ctx.error("tunnel", None, "remote_ipv4 is missing: 6in4 needs the tunnel "
                            "broker's IPv4 endpoint")
        remote_ipv4 = _ipv4(ctx, "tunnel", "remote_ipv4", tunnel["remote_ipv4"])
        if "prefix" not in tunnel:
            raise ctx.error("tunnel", None, "prefix is missing: 6in4 needs the routed prefix "
                            "your broker gave you, e.g. \"2001:db8:1::/64\"")
        try:
            if not isinstance(tunnel["prefix"], str):
                raise TypeError(tunnel["prefix"])
            prefix = ipaddress.IPv6Network(tunnel["prefix"])
        except (ValueError, TypeError) as exc:
            raise ctx.error("tunnel", "prefix", f"{tunnel['prefix']!r} is not an IPv6 prefix "
                            f"({exc}); write it like \"2001:db8:1::/64\"") from None
        if "relay_ipv4" in tunnel:
            raise ctx.error("tunnel", "relay_ipv4", "only for mode = \"6to4\"; remove it")
    if mode == "6rd":
        for key in ("relay_ipv4", "remote_ipv4"):
            if key in tunnel:
                raise ctx.error("tunnel", key, "not for mode = \"6rd\" (its relay is "
                                "border_relay_ipv4); remove it")
    raw_addresses = tunnel.get("addresses", [str(prefix.network_address + 1)])
    if not isinstance(raw_addresses, list) or not raw_addresses:
        raise ctx.error("tunnel", "addresses", "must be a non-empty list of IPv6 addresses")
    addresses = []
    for value in raw_addresses:
        addr = _ipv6_address(ctx, "tunnel", "addresses", value)
        if addr not in prefix:
            raise ctx.error("tunnel", "addresses", f"{addr} is outside the tunnel prefix "
                            f"{prefix}; packets for it would never reach this host")
        addresses.append(str(addr))
    checked = _checked(ctx, "tunnel", tunnel)
    mtu = checked["mtu"]
    martian_rows = DEFAULT_MARTIAN_IPV4
    if "martian_ipv4" in tunnel:
        if not isinstance(tunnel["martian_ipv4"], list):
            raise ctx.error("tunnel", "martian_ipv4", "must be a list of IPv4 prefixes like "
                            "[\"10.0.0.0/8\"] ([] turns the check off)")
        rows = []
        for cidr in tunnel["martian_ipv4"]:
            try:
                if not isinstance(cidr, str):
                    raise TypeError(cidr)
                rows.append((str(ipaddress.IPv4Network(cidr)), "configured"))
            except (ValueError, TypeError):
                raise ctx.error("tunnel", "martian_ipv4", f"{cidr!r} is not an IPv4 prefix "
                                "like \"10.0.0.0/8\"") from None
        martian_rows = tuple(rows)
    uplink = checked["uplink"]
    if uplink and mode != "6in4":
        raise ctx.error("tunnel", "uplink", f"only for mode = \"6in4\" ({mode}'s prefix is "
                        "the IPv4 address: a new address is a new prefix, a restart); remove "
                        "it")
    url = checked["public_ipv4_url"]
    if url and mode != "6in4":
        raise ctx.error("tunnel", "public_ipv4_url", f"only for mode = \"6in4\" ({mode}'s "
                        "prefix is the IPv4 address: a new address is a new prefix, a "
                        "restart); remove it")
    if uplink and public_ipv4 != local_ipv4 and not url:
        raise ctx.error("tunnel", "uplink", "behind a 1:1 NAT (public_ipv4) the address to "
                        "follow is the NAT's, which this host's interface does not show: add "
                        "public_ipv4_url (a \"what is my address\" service), or remove one "
                        "of them")
    if "probe_interval_s" in tunnel and mode != "6in4":
        raise ctx.error("tunnel", "probe_interval_s", f"only for mode = \"6in4\" ({mode} has "
                        "no one peer to probe); remove it")
    return dict(mode=mode, local_ipv4=local_ipv4, public_ipv4=public_ipv4, relay_ipv4=relay_ipv4,
                probe_interval_s=checked["probe_interval_s"], sixrd_prefix=sixrd_prefix,
                ipv4_mask_len=mask_len, uplink=uplink, public_ipv4_url=url,
                public_ipv4_check_s=checked["public_ipv4_check_s"],
                remote_ipv4=remote_ipv4, prefix=str(prefix), addresses=tuple(addresses),
                mtu=mtu, martian_ipv4=martian_rows)


def _parse_6rd(ctx: _Ctx, tunnel: dict[str, Any], public_ipv4: str
               ) -> tuple[str, int, str, ipaddress.IPv6Network]:
    """RFC 5969 §4: the 6rd prefix, IPv4MaskLen, the border relay and the delegated prefix
    they give this host's (public) IPv4 address."""
    for key, what in (("prefix", "the ISP's 6rd prefix, e.g. \"2001:db8::/32\""),
                      ("border_relay_ipv4", "the ISP's 6rd border relay")):
        if key not in tunnel:
            raise ctx.error("tunnel", None, f"{key} is missing: 6rd needs {what}")
    try:
        if not isinstance(tunnel["prefix"], str):
            raise TypeError(tunnel["prefix"])
        sixrd = ipaddress.IPv6Network(tunnel["prefix"])
    except (ValueError, TypeError) as exc:
        raise ctx.error("tunnel", "prefix", f"{tunnel['prefix']!r} is not an IPv6 prefix "
                        f"({exc}); write the 6rd prefix like \"2001:db8::/32\"") from None
    mask_len = _checked(ctx, "tunnel", tunnel)["ipv4_mask_len"]
    relay = _ipv4(ctx, "tunnel", "border_relay_ipv4", tunnel["border_relay_ipv4"])
    length = sixrd.prefixlen + 32 - mask_len
    if length > 64:
        # RFC 5969 §4: the delegated prefix must leave room for /64 links.
        raise ctx.error("tunnel", "ipv4_mask_len", f"the delegated prefix would be /{length} "
                        f"({sixrd.prefixlen} + 32 - {mask_len}); it must be /64 or shorter: "
                        "check the ISP's 6rd prefix and IPv4MaskLen")
    domain = SixrdDomain.build(str(sixrd), mask_len, relay, public_ipv4)
    return str(sixrd), mask_len, relay, domain.delegated(public_ipv4)


def parse_config(text: str, file: str = "<config>") -> Settings:
    """Validate a whole config text; raises ``ConfigError`` for the first problem found."""
    ctx = _Ctx(file, text)
    try:
        doc = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(file, "", int(match.group(1)) if match else None,
                          f"not valid TOML ({exc}); fix the syntax") from None
    for table in doc:
        if table not in ALLOWED:
            raise ConfigError(file, table, _locate(text, table, None), "unknown table; "
                              f"allowed: {', '.join(sorted(ALLOWED))}")
    for table, keys in ALLOWED.items():
        if table in ("forward", "nat64.pool4", "lan.allow"):
            continue
        if table == "tunnel" and isinstance(doc.get(table), list):
            for index, section in enumerate(doc[table]):
                if not isinstance(section, dict):
                    raise ctx.error(table, None, "write each tunnel as a [[tunnel]] table",
                                    index)
                for key in section:
                    if key not in keys:
                        raise ctx.error(table, key, "unknown key; allowed: "
                                        f"{', '.join(sorted(keys))}", index)
            continue
        section = doc.get(table, {})
        if not isinstance(section, dict):
            raise ctx.error(table, None, "must be a table ([" + table + "])")
        for key in section:
            if key not in keys:
                raise ctx.error(table, key, f"unknown key; allowed: {', '.join(sorted(keys))}")

    if "clat" in doc and "nat64" not in doc:
        return _parse_clat(ctx, doc)
    nat64_values: dict[str, Any] = {}
    if "nat64" in doc:
        nat64_values = _parse_nat64(ctx, doc["nat64"])
        mtu = nat64_values.pop("mtu")
    if "clat" in doc:
        # A 464XLAT box (RFC 6877): the CLAT for this host's own IPv4 programs beside the
        # NAT64, in its worker 0; the kernel routes between the CLAT device and the NAT64's.
        if "tunnel" in doc:
            raise ctx.error("clat", None, "a CLAT beside a tunnel has nothing to do: the "
                            "tunnel's host has native IPv4 (RFC 6877 §6.3); remove [clat]")
        if nat64_values["nat64_input"] != "tun":
            raise ctx.error("nat64", "input", "beside a [clat] the NAT64 takes IPv6 from its "
                            "devices; set input = \"tun\"")
        clat_values = _clat_values(ctx, doc["clat"])
        if clat_values["clat_plat_prefix"] == "auto":  # this host's own NAT64
            clat_values["clat_plat_prefix"] = nat64_values["nat64_prefix"]
        nat64_values.update(clat_values)
    if nat64_values and "tunnel" not in doc:
        if nat64_values["nat64_input"] == "tunnel":
            raise ctx.error("nat64", "input", "\"tunnel\" needs a [tunnel] table (the 6in4 or "
                            "6to4 tunnel the IPv6-only site comes over); add one, or use "
                            "\"tun\"")
        tunnel_values = dict(mode="nat64", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
                             prefix=nat64_values["nat64_prefix"], addresses=(), mtu=mtu,
                             martian_ipv4=DEFAULT_MARTIAN_IPV4)
    else:
        tunnel_values = _parse_tunnels(ctx, doc.get("tunnel"))
        if tunnel_values["tunnels"] and nat64_values.get("nat64_input") == "tunnel":
            raise ctx.error("nat64", "input", "\"tunnel\" with several tunnels is not "
                            "supported (whose tunnel would a NAT64 client's answers take?); "
                            "keep one [tunnel], or use \"tun\"")
        if nat64_values and "mtu" in doc["nat64"]:
            raise ctx.error("nat64", "mtu", "beside a [tunnel] the tunnel's mtu applies to "
                            "both; remove this key")
    local_ipv4 = tunnel_values["local_ipv4"]
    gateway = doc.get("gateway", {})
    values = _checked(ctx, "gateway", gateway)
    shards = values["shards"]
    if shards and shards < values["workers"]:
        raise ctx.error("gateway", "shards", f"{shards} is fewer than workers "
                        f"({values['workers']}): each worker owns at least one shard; raise "
                        "shards or leave it out")
    if nat64_values:
        slices = max(shards, values["workers"])
        what = f"{slices} shards" if shards > values["workers"] else f"{slices} workers"
        for address, proto, lo, hi in nat64_values["nat64_pool4"]:
            if (hi - lo + 1) < 2 * slices:
                raise ctx.error("nat64.pool4", None, f"{address} {proto} {lo}-{hi} is too "
                                f"small to give each of {what} two ports; widen the range or "
                                f"use fewer {what.split()[1]}")
        if values["backend"] == "kernel":
            raise ctx.error("gateway", "backend", "NAT64 runs in userspace only; set "
                            "backend = \"userspace\" or leave it out")
        values["backend"] = "userspace"
        if doc.get("forward") and "tunnel" not in doc:
            raise ctx.error("forward", None, "[[forward]] rules need a [tunnel]; a NAT64 "
                            "gateway translates its whole prefix")
    mode = tunnel_values["mode"]
    if tunnel_values.get("tunnels"):
        # The kernel backend makes one sit link; several need several (not built yet).
        if values["backend"] == "kernel":
            raise ctx.error("gateway", "backend", "several tunnels run on the userspace "
                            "backend for now; set backend = \"userspace\" or \"auto\"")
        if "lan" in doc:
            raise ctx.error("lan", None, "a LAN (kernel backend) sits behind one tunnel; "
                            "keep one [tunnel] or remove [lan]")
        values["backend"] = "userspace"
    if tunnel_values.get("uplink"):
        # The kernel backend's sit link keeps the local address it was made with.
        if values["backend"] == "kernel":
            raise ctx.error("tunnel", "uplink", "following the uplink's address needs the "
                            "userspace backend for now; set backend = \"userspace\" or "
                            "\"auto\", or remove uplink")
        values["backend"] = "userspace"
    if mode in ("6to4", "6rd") and tunnel_values.get("public_ipv4") != local_ipv4:
        # Linux sit drops what a 1:1 NAT delivers: the inner destination embeds the public
        # address, the outer one is local_ipv4 (its RFC 3964 check, is_spoofed_6rd).
        if values["backend"] == "kernel":
            raise ctx.error("tunnel", "public_ipv4", f"{mode} behind a 1:1 NAT needs the "
                            "userspace backend (the kernel's sit link checks the inner "
                            "destination against local_ipv4); set backend = \"userspace\" or "
                            "\"auto\"")
        values["backend"] = "userspace"
    workers = values["workers"]
    pool_text = _given(gateway, "pool")
    try:
        if not isinstance(pool_text, str):
            raise TypeError(pool_text)
        pool = ipaddress.IPv4Network(pool_text)
    except (ValueError, TypeError) as exc:
        raise ctx.error("gateway", "pool", f"{pool_text!r} is not an IPv4 prefix ({exc}); "
                        "write it like \"100.64.0.0/16\"") from None
    if pool_size(str(pool)) < workers:
        raise ctx.error("gateway", "pool", f"{pool} has fewer addresses than workers "
                        f"({workers}); use a larger block")
    if shards and pool.num_addresses // shards < 2:
        raise ctx.error("gateway", "shards", f"the pool {pool} cannot give each of {shards} "
                        "shards an address of its own; use a larger pool or fewer shards")
    forwards_raw = doc.get("forward", [])
    if not isinstance(forwards_raw, list):
        raise ctx.error("forward", None, "write forward rules as [[forward]] tables")
    forwards = tuple(_parse_forward(ctx, i, f) for i, f in enumerate(forwards_raw))
    seen: dict[tuple[str, int], int] = {}
    for i, rule in enumerate(forwards):
        if rule.target_ipv4 == local_ipv4:
            raise ctx.error("forward", "to", f"{rule.target_ipv4} is tunnel.local_ipv4, the "
                            "tunnel's own address: a service on this host is reached as "
                            "\"127.0.0.1:PORT\"", i)
        if ipaddress.IPv4Address(rule.target_ipv4) in pool:
            raise ctx.error("forward", "to", f"{rule.target_ipv4} is inside the pool {pool}; "
                            "choose another pool or target", i)
        for port in range(rule.port_lo, rule.port_hi + 1):
            other = seen.setdefault((rule.proto, port), i)
            if other != i:
                raise ctx.error("forward", "port", f"{rule.proto} port {port} is already "
                                f"forwarded by rule {other}; each port may have one rule", i)
    for key in ("local_ipv4", "public_ipv4", "relay_ipv4", "remote_ipv4"):
        for value in [tunnel_values.get(key), *(getattr(t, key, None)
                                                for t in tunnel_values.get("tunnels", ()))]:
            if value and ipaddress.IPv4Address(value) in pool:
                raise ctx.error("gateway", "pool", f"the pool {pool} contains tunnel.{key} "
                                f"{value}; choose a pool no real host uses")
    broker_values = _parse_broker(ctx, doc["broker"], tunnel_values) if "broker" in doc else {}
    if "cluster" in doc:
        broker_values.update(_parse_cluster(ctx, doc["cluster"]))
    lan_values = _parse_lan(ctx, doc["lan"], tunnel_values, values) if "lan" in doc else {}
    if broker_values.get("cluster_announce_pool"):
        broker_values["cluster_announce"] = _pool_announced(
            broker_values["cluster_announce"], tunnel_values["mode"], pool,
            nat64_values.get("nat64_pool4", ()))
    return Settings(
        **tunnel_values, **nat64_values, **broker_values, **lan_values, pool=str(pool),
        forwards=forwards,
        timeouts=Timeouts(**_checked(ctx, "timeouts", doc.get("timeouts", {}))),
        source_file=file, metrics_listen=_metrics_listen(ctx, doc.get("metrics", {})),
        **values)


def _parse_lan(ctx: _Ctx, lan: dict[str, Any], tunnel: dict[str, Any],
               gateway: dict[str, Any]) -> dict[str, Any]:
    """[lan] and its [[lan.allow]] holes (coordinator/lan.py): a LAN routed behind the tunnel,
    on the kernel backend."""
    if tunnel["mode"] not in ("6in4", "6to4", "6rd"):
        raise ctx.error("lan", None, "a LAN is routed behind a tunnel; add a [tunnel] or "
                        "remove [lan]")
    if gateway["backend"] == "userspace":
        # The userspace backend has no IPv6 forwarding of its own to a LAN (issue 19 note).
        raise ctx.error("lan", None, "a LAN needs the kernel backend (the kernel routes to "
                        "it, radvd advertises it, nftables guards it); set [gateway] backend = "
                        "\"kernel\" or \"auto\" on a host with sit, or remove [lan]")
    gateway["backend"] = "kernel"  # "auto" too: on a host without sit, `run` says so and stops
    if not lan.get("interface"):
        raise ctx.error("lan", None, "interface is missing: name the LAN's interface, like "
                        "\"eth1\"")
    values = _checked(ctx, "lan", lan)
    if "prefix" not in lan:
        raise ctx.error("lan", None, "prefix is missing: give the LAN a /64 of the tunnel's "
                        "prefix, like \"2001:db8:1:1::/64\"")
    try:
        if not isinstance(lan["prefix"], str):
            raise TypeError(lan["prefix"])
        prefix = ipaddress.IPv6Network(lan["prefix"])
    except (ValueError, TypeError) as exc:
        raise ctx.error("lan", "prefix", f"{lan['prefix']!r} is not an IPv6 prefix ({exc}); "
                        "write it like \"2001:db8:1:1::/64\"") from None
    if prefix.prefixlen != 64:
        raise ctx.error("lan", "prefix", f"{prefix} must be a /64: hosts autoconfigure only in "
                        "a /64 (RFC 4862 §5.5.3, RFC 4291 §2.5.1)")
    routed = ipaddress.IPv6Network(tunnel["prefix"])
    if not prefix.subnet_of(routed):
        raise ctx.error("lan", "prefix", f"{prefix} is outside the tunnel's prefix {routed}: "
                        "the internet would not route it here; take a /64 of it")
    for address in tunnel["addresses"]:
        if ipaddress.IPv6Address(address) in prefix:
            raise ctx.error("lan", "prefix", f"{prefix} holds the tunnel's address {address}; "
                            "give the LAN another /64 (or the tunnel other addresses)")
    rdnss = lan.get("rdnss", [])
    if not isinstance(rdnss, list):
        raise ctx.error("lan", "rdnss", "must be a list of IPv6 addresses")
    servers = [str(_ipv6_address(ctx, "lan", "rdnss", value)) for value in rdnss]
    holes_raw = lan.get("allow", [])
    if not isinstance(holes_raw, list):
        raise ctx.error("lan", "allow", "write each hole as a [[lan.allow]] table")
    holes = []
    for index, raw in enumerate(holes_raw):
        if not isinstance(raw, dict):
            raise ctx.error("lan.allow", None, "write each hole as a [[lan.allow]] table with "
                            "proto and port", index)
        for key in raw:
            if key not in ALLOWED["lan.allow"]:
                raise ctx.error("lan.allow", key, "unknown key; allowed: "
                                f"{', '.join(sorted(ALLOWED['lan.allow']))}", index)
        proto = raw.get("proto")
        if proto not in ("tcp", "udp"):
            raise ctx.error("lan.allow", "proto", f"{proto!r} must be \"tcp\" or \"udp\"",
                            index)
        if "port" not in raw:
            raise ctx.error("lan.allow", None, "port is missing", index)
        lo, hi = _port_range(ctx, index, "port", raw["port"], "lan.allow")
        if lo == 0:
            raise ctx.error("lan.allow", "port", "ports run from 1", index)
        address = raw.get("address", "")
        if address:
            host = _ipv6_address(ctx, "lan.allow", "address", address, index)
            if host not in prefix:
                raise ctx.error("lan.allow", "address", f"{host} is not in the LAN {prefix}",
                                index)
            address = str(host)
        holes.append((proto, lo, hi, address))
    return {"lan_interface": values["interface"], "lan_prefix": str(prefix),
            "lan_rdnss": tuple(servers), "lan_allow": tuple(holes)}


def _pool_announced(announce: tuple[str, ...], mode: str, pool: ipaddress.IPv4Network,
                    pool4: tuple[tuple[str, str, int, int], ...]) -> tuple[str, ...]:
    """``announce`` with the node's pool (a tunnel's forwards' sources) and its pool4
    addresses, each once, after what it names itself. Pure."""
    extra = [] if mode == "nat64" else [str(pool)]
    extra += [f"{address}/32" for address, *_ in pool4]
    return tuple(dict.fromkeys([*announce, *extra]))


def _parse_cluster(ctx: _Ctx, cluster: dict[str, Any]) -> dict[str, Any]:
    """[cluster] (issue 20, coordinator/cluster.py): the node's BGP announcements."""
    for key in ("announce", "local_as", "peer_as", "neighbors", "router_id"):
        if key not in cluster:
            raise ctx.error("cluster", None, f"{key} is missing (README \"A fleet behind "
                            "ECMP\")")
    values = _checked(ctx, "cluster", cluster)
    announce = cluster["announce"]
    if not isinstance(announce, list) or not announce:
        raise ctx.error("cluster", "announce", "must be a non-empty list of prefixes like "
                        "[\"192.0.2.10/32\"] or [\"64:ff9b::/96\"]")
    prefixes = []
    for value in announce:
        try:
            if not isinstance(value, str):
                raise TypeError(value)
            prefixes.append(ipaddress.ip_network(value))
        except (ValueError, TypeError):
            raise ctx.error("cluster", "announce", f"{value!r} is not an IPv4 or IPv6 prefix "
                            "like \"192.0.2.10/32\" or \"64:ff9b::/96\" (host bits zero)"
                            ) from None
    neighbors = cluster["neighbors"]
    if not isinstance(neighbors, list) or not neighbors:
        raise ctx.error("cluster", "neighbors", "must be a non-empty list of the routers' "
                        "IPv4 or IPv6 addresses")
    peers = []
    for value in neighbors:
        try:
            if not isinstance(value, str):
                raise TypeError(value)
            peers.append(ipaddress.ip_address(value))
        except (ValueError, TypeError):
            raise ctx.error("cluster", "neighbors", f"{value!r} is not an IPv4 or IPv6 "
                            "address") from None
    # A BGP session carries the prefixes of its own address family (one session per family
    # and router, as routers are usually peered); the pool and pool4 are IPv4.
    families = {p.version for p in prefixes} | ({4} if values["announce_pool"] else set())
    for version, name in ((4, "IPv4"), (6, "IPv6")):
        if version in families and not any(n.version == version for n in peers):
            raise ctx.error("cluster", "announce", f"announces {name} prefixes but no "
                            f"neighbor has an {name} address: add the routers' {name} "
                            "addresses to neighbors (a session per address family)")
    router_id = _ipv4(ctx, "cluster", "router_id", cluster["router_id"])
    return {"cluster_announce": tuple(str(p) for p in prefixes),
            "cluster_announce_pool": values["announce_pool"],  # added: ``_pool_announced``
            "cluster_neighbors": tuple(str(n) for n in peers),
            "cluster_router_id": router_id,
            **{f"cluster_{key}": _int(ctx, "cluster", key, cluster[key], 1, 4294967294)
               for key in ("local_as", "peer_as")},
            **{f"cluster_{key}": values[key] for key in (
                "hold_time_s", "withdraw_after_s", "drain_timeout_s", "drain_quiet_s")}}


def _parse_broker(ctx: _Ctx, broker: dict[str, Any], tunnel: dict[str, Any]) -> dict[str, Any]:
    """[broker]: the 6in4 broker's update API (coordinator/broker.py)."""
    if tunnel["mode"] != "6in4":
        raise ctx.error("broker", None, f"a tunnel broker serves 6in4 tunnels; this is "
                        f"{tunnel['mode']}: remove [broker]")
    values: dict[str, Any] = {"broker_min_interval_s":
                              _checked(ctx, "broker", broker)["min_interval_s"]}
    url = broker.get("url", HE_UPDATE_URL)
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ctx.error("broker", "url", f"{url!r} must be an https:// URL")
    values["broker_url"] = url
    for key in ("tunnel_id", "username", "key_file", "ca_file"):
        value = broker.get(key, "")
        if not isinstance(value, str) or (not value and key != "ca_file"):
            raise ctx.error("broker", key if key in broker else None,
                            f"{key} must be a non-empty string" if key in broker
                            else f"{key} is missing: the broker update needs it")
        values[f"broker_{key}"] = value
    for key in ("key_file", "ca_file"):
        if values[f"broker_{key}"] and not values[f"broker_{key}"].startswith("/"):
            raise ctx.error("broker", key, "must be an absolute path")
    return values


def _parse_clat(ctx: _Ctx, doc: dict[str, Any]) -> Settings:
    """A CLAT host: [clat] with [gateway] and [metrics]; one worker, userspace."""
    for other in ("tunnel", "forward"):
        if other in doc:
            raise ctx.error(other, None, "a CLAT runs on its own, on the IPv6-only host: a "
                            "host with a tunnel has the native IPv4 routes a CLAT leaves alone "
                            "(RFC 6877 §6.3). Run it as a second sixgate with its own [gateway] "
                            "name and run_dir, or remove this table")
    clat_values = _clat_values(ctx, doc["clat"])
    gateway = doc.get("gateway", {})
    settings = _checked(ctx, "gateway", gateway)
    if "workers" not in gateway:
        settings["workers"] = 1
    elif settings["workers"] != 1:
        raise ctx.error("gateway", "workers", "a CLAT translates this host's own traffic in "
                        "one worker; set workers = 1 or leave it out")
    if settings["backend"] == "kernel":
        raise ctx.error("gateway", "backend", "a CLAT runs in userspace only; set backend = "
                        "\"userspace\" or leave it out")
    settings["backend"] = "userspace"
    prefix = clat_values["clat_plat_prefix"]
    return Settings(
        mode="clat", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
        prefix=prefix if prefix != "auto" else "", addresses=(), mtu=1500,
        martian_ipv4=DEFAULT_MARTIAN_IPV4, pool=_given(gateway, "pool"), forwards=(),
        timeouts=Timeouts(**_checked(ctx, "timeouts", doc.get("timeouts", {}))),
        source_file=ctx.file, metrics_listen=_metrics_listen(ctx, doc.get("metrics", {})),
        **clat_values, **settings)


def _clat_values(ctx: _Ctx, clat: dict[str, Any]) -> dict[str, Any]:
    """[clat] as the Settings' clat_* fields."""
    values = _checked(ctx, "clat", clat)
    address6 = clat.get("ipv6_address", "auto")
    parsed: ipaddress.IPv6Address | None = None  # "auto": picked at the start
    if address6 != "auto":
        try:
            if not isinstance(address6, str):
                raise ValueError(address6)
            parsed = ipaddress.IPv6Address(address6)
        except ValueError:
            raise ctx.error("clat", "ipv6_address", f"{address6!r} must be an IPv6 address of "
                            "this host's uplink /64, like \"2001:db8:100::c1a7\", or "
                            "\"auto\"") from None
        if (parsed.is_multicast or parsed.is_loopback or parsed.is_link_local
                or parsed.is_unspecified):
            raise ctx.error("clat", "ipv6_address", f"{parsed} must be a unicast global or "
                            "unique local address")
    return dict(clat_plat_prefix=values["plat_prefix"],
                clat_ipv6_address=str(parsed) if parsed else "auto",
                clat_ipv4_address=values["ipv4_address"], clat_mtu=values["mtu"],
                clat_udp_zero_checksum=values["udp_zero_checksum"],
                clat_rediscovery_interval_s=values["rediscovery_interval_s"])


def _plat_prefix(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    if value == "auto":
        return "auto"
    return _nat64_prefix(ctx, table, key, value)


def _nat64_prefix(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        Nat64Prefix.parse(value)
    except ValueError as exc:
        raise ctx.error(table, key, f"{exc}; write it like \"64:ff9b::/96\"") from None
    return str(ipaddress.IPv6Network(value))


def _bool(ctx: _Ctx, table: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(table, key, f"{value!r} must be true or false")
    return value


def _client_prefix(ctx: _Ctx, table: str, key: str, value: Any) -> int:
    if value not in (64, 128) or isinstance(value, bool):
        raise ctx.error(table, key, f"{value!r} must be 64 (a client is a /64) or 128")
    return int(value)


def _port_range(ctx: _Ctx, index: int, key: str, value: Any, table: str = "nat64.pool4"
                ) -> tuple[int, int]:
    """``"61001-65535"`` or one number, inside 0-65535, low first."""
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d+(-\d+)?", value):
        low, _, high = value.partition("-")
        lo, hi = int(low), int(high or low)
    else:
        raise ctx.error(table, key, f"{value!r} must be a range like \"61001-65535\"",
                        index)
    if not 0 <= lo <= hi <= 65535:
        raise ctx.error(table, key, f"{value!r}: ports run from 0 to 65535, low first",
                        index)
    return lo, hi


def _parse_nat64(ctx: _Ctx, nat64: Any) -> dict[str, Any]:
    """[nat64] and its [[nat64.pool4]] rows, as the Settings' nat64_* fields (plus mtu)."""
    values = _checked(ctx, "nat64", nat64)
    clients = nat64.get("clients")
    if not isinstance(clients, list) or not clients:
        raise ctx.error("nat64", "clients", "missing or empty: name the IPv6 prefixes that may "
                        "use the NAT64, like [\"2001:db8:100::/56\"] (everyone else is refused)")
    nets = []
    for cidr in clients:
        try:
            if not isinstance(cidr, str):
                raise TypeError(cidr)
            nets.append(str(ipaddress.IPv6Network(cidr)))
        except (ValueError, TypeError):
            raise ctx.error("nat64", "clients", f"{cidr!r} is not an IPv6 prefix; write it "
                            "like \"2001:db8:100::/56\" (host bits zero)") from None
    rows_raw = nat64.get("pool4")
    if not isinstance(rows_raw, list) or not rows_raw:
        raise ctx.error("nat64", None, "no [[nat64.pool4]]: give the NAT64 at least one IPv4 "
                        "address with port ranges, like address = \"203.0.113.5\", tcp = "
                        "\"61001-65535\"")
    rows: list[tuple[str, str, int, int]] = []
    seen: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
    for index, raw in enumerate(rows_raw):
        if not isinstance(raw, dict):
            raise ctx.error("nat64.pool4", None, "write each pool4 entry as a [[nat64.pool4]] "
                            "table", index)
        for key in raw:
            if key not in ALLOWED["nat64.pool4"]:
                raise ctx.error("nat64.pool4", key, "unknown key; allowed: "
                                f"{', '.join(sorted(ALLOWED['nat64.pool4']))}", index)
        if "address" not in raw:
            raise ctx.error("nat64.pool4", None, "address is missing", index)
        try:
            if not isinstance(raw["address"], str):
                raise TypeError(raw["address"])
            address = ipaddress.IPv4Address(raw["address"])
        except (ValueError, TypeError):
            raise ctx.error("nat64.pool4", "address", f"{raw['address']!r} is not an IPv4 "
                            "address", index) from None
        if address.is_multicast or address.is_loopback or address.is_unspecified:
            raise ctx.error("nat64.pool4", "address", f"{address} is multicast, loopback or "
                            "unspecified; name a unicast address routed to this host", index)
        protos = [proto for proto in ("tcp", "udp", "icmp") if proto in raw]
        if not protos:
            raise ctx.error("nat64.pool4", None, "give it tcp, udp and/or icmp port ranges",
                            index)
        for proto in protos:
            lo, hi = _port_range(ctx, index, proto, raw[proto])
            for other_lo, other_hi, other in seen.get((str(address), proto), []):
                if lo <= other_hi and other_lo <= hi:
                    raise ctx.error("nat64.pool4", proto, f"{lo}-{hi} overlaps entry {other}'s "
                                    f"{other_lo}-{other_hi} on {address}", index)
            seen.setdefault((str(address), proto), []).append((lo, hi, index))
            rows.append((str(address), proto, lo, hi))
    return dict(nat64_prefix=values["prefix"], nat64_clients=tuple(nets),
                nat64_pool4=tuple(rows), nat64_allow_non_global=values["allow_non_global"],
                nat64_filtering=values["filtering"],
                nat64_ports_per_client=values["ports_per_client"],
                nat64_client_prefix=values["client_prefix"],
                nat64_port_hold_s=values["port_hold_s"],
                nat64_log_bindings=values["log_bindings"], nat64_input=values["input"],
                nat64_egress_table=values["egress_table"],
                mtu=values["mtu"])


def _name(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9]{0,9}", value):
        raise ctx.error(table, key, f"{value!r} must be 1-10 lower-case letters/digits "
                        "starting with a letter (TUN devices are named <name><worker>)")
    return value


def _url(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or (value and not re.fullmatch(r"https?://[^\s/]+\S*",
                                                                  value)):
        raise ctx.error(table, key, f"{value!r} is not an http(s) URL, e.g. "
                        "\"https://ipv4.icanhazip.com/\"")
    return value


def _interface(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    # Linux: IFNAMSIZ - 1 characters, no "/" or white space (dev_valid_name).
    if not isinstance(value, str) or (value and not re.fullmatch(r"[^/\s:]{1,15}", value)):
        raise ctx.error(table, key, f"{value!r} is not an interface name (1-15 characters, "
                        "no \"/\", \":\" or spaces), e.g. \"eth0\"")
    return value


def _run_dir(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ctx.error(table, key, f"{value!r} must be an absolute path")
    if os.path.normpath(value) in SYSTEM_DIRECTORIES:
        # sixgate makes its run directory mode 0700 and deletes sockets and pidfiles in it.
        raise ctx.error(table, key, f"{value!r} is a system directory; give sixgate one of "
                        "its own, like \"/run/sixgate\"")
    return value


def _user(ctx: _Ctx, table: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}|", value):
        raise ctx.error(table, key, f"{value!r} must be a user name like \"nobody\" (or \"\" "
                        "to keep the workers root)")
    return value


def _choice(ctx: _Ctx, table: str, key: str, value: object, allowed: dict[str, str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        choices = "; ".join(f'"{name}": {what}' for name, what in allowed.items())
        raise ctx.error(table, key, f"{value!r} is not one of: {choices}")
    return str(value)


def _ipv6_address(ctx: _Ctx, table: str, key: str, value: Any, index: int | None = None
                  ) -> ipaddress.IPv6Address:
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        return ipaddress.IPv6Address(value)
    except (ValueError, TypeError):
        raise ctx.error(table, key, f"{value!r} is not an IPv6 address", index) from None


def _ipv6_network(value: object) -> ipaddress.IPv6Network | None:
    try:
        return ipaddress.IPv6Network(str(value), strict=False)
    except ValueError:
        return None


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError saying what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("must be \"host:port\" with a port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    else:
        ipaddress.IPv4Address(host)
    return host, int(port_text)


def _metrics_listen(ctx: _Ctx, metrics: dict[str, Any]) -> str:
    listen = metrics.get("listen", DEFAULT_METRICS_LISTEN)
    if listen == "":
        return ""  # explicitly off
    if not isinstance(listen, str):
        raise ctx.error("metrics", "listen", "must be a string like \"127.0.0.1:9641\"")
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise ctx.error("metrics", "listen", f"{listen!r} {exc}; write e.g. "
                        "\"127.0.0.1:9641\" or \"[::1]:9641\", or \"\" to turn metrics "
                        "off") from None
    return listen


def load_config(path: str) -> Settings:
    """Read and validate a config file; unreadable files are a ConfigError too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", None, f"cannot read the file ({exc.strerror}); check the "
                          "path given to --config") from None
    return parse_config(text, str(path))


if __name__ == "__main__":
    print(reference_markdown(), end="")
