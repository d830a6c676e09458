"""Forward rules whose target is another IPv4 host: let the replies in, and nothing else.

A translated packet to a target on another host leaves through the worker's TUN device and the
kernel forwards it out (``forwarding`` is set on the TUN device by the worker). The target
routes the pool back to this host, and its reply arrives on the uplink interface addressed to
a pool address: the kernel only forwards it on to the TUN device if forwarding is on for the
interface it arrived on (net.ipv4.conf.<if>.forwarding).

So for each interface a remote target is reached through, sixgate switches forwarding on if it
was off. Its own nftables table (always installed, ``guard_ruleset``) drops what arrives on
that interface for forwarding unless it is a reply from a configured target to the pool, and
drops everywhere any packet sourced from the pool that did not come out of our TUN devices: the
host does not become a router for anyone else, and nobody on the uplink can speak to the pool
or as the pool. On stop both are undone; a state file in the run directory lets the next start
undo what a crashed run left.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from sixgate.workers.engine.settings import (
    PROTOCOL_NUMBERS,
    Settings,
    nat64_table,
    worker_pool4,
)
from sixgate.workers.tun import local_pool4 as owned_pool4

log = logging.getLogger("sixgate.forwarding")

STATE_FILE = "forwarding.json"
RTN_LOCAL = 2


class ForwardingError(Exception):
    pass


def table_name(settings: Settings) -> str:
    return f"sixgate_{settings.name}"


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def _sysctl_path(ifname: str) -> Path:
    return Path(f"/proc/sys/net/ipv4/conf/{ifname}/forwarding")


def remote_targets(settings: Settings) -> list[str]:
    """The forward rules' targets that are not on loopback, sorted: the hosts that reply to
    pool addresses from outside (both backends' nftables tables admit only them)."""
    return sorted({r.target_ipv4 for r in settings.forwards
                   if not ipaddress.IPv4Address(r.target_ipv4).is_loopback})


def replace_table(family: str, table: str, ruleset: str = "") -> str:
    """``nft -f`` input that deletes ``table`` whether or not it exists (adding an empty
    table is a no-op when it is there), then loads ``ruleset``: one transaction, so a table
    left by a crashed run whose state file is gone never blocks or doubles the new one."""
    return f"table {family} {table} {{}}\ndelete table {family} {table}\n{ruleset}"


def uplinks_for_remote_targets(settings: Settings) -> dict[str, list[str]]:
    """Interface name -> remote targets reached through it (loopback and local targets need
    no forwarding and are left out)."""
    targets = remote_targets(settings)
    out: dict[str, list[str]] = {}
    if not targets:
        return out
    with IPRoute() as ipr:
        for target in targets:
            try:
                route = ipr.route("get", dst=target)[0]
            except Exception as exc:  # noqa: BLE001 - pyroute2 raises NetlinkError subclasses
                raise ForwardingError(f"no route to forward target {target}: {exc}; add a "
                                      "route or fix the rule's \"to\"") from None
            if route["type"] == RTN_LOCAL:
                continue
            oif = route.get_attr("RTA_OIF")
            ifname = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
            out.setdefault(ifname, []).append(target)
    return out


def nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise ForwardingError("the nft command is missing (apt-get install nftables): sixgate "
                              "needs it to limit the forwarding that remote targets require")
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise ForwardingError(f"nft failed: {result.stderr.strip()}")


def pool_conflicts(settings: Settings) -> list[str]:
    """Routes of this host (main and local tables, any device but our TUNs) that overlap the
    pool: the workers' routes would take traffic from them, so the config is refused."""
    pool = ipaddress.IPv4Network(settings.pool)
    found = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for table in (254, 255):  # RT_TABLE_MAIN, RT_TABLE_LOCAL
            for route in ipr.get_routes(family=socket.AF_INET, table=table):
                length = route["dst_len"]
                if length == 0:
                    continue  # the default route overlaps everything by design
                dst = route.get_attr("RTA_DST")
                if dst is None:
                    continue
                device = names.get(route.get_attr("RTA_OIF"), "?")
                if device.startswith(settings.name):
                    continue
                net = ipaddress.IPv4Network(f"{dst}/{length}", strict=False)
                if net.overlaps(pool):
                    found.append(f"{net} dev {device}")
    return found


def guard_ruleset(settings: Settings, uplinks: dict[str, list[str]],
                  opened: list[str]) -> str:
    """The gateway's nftables table (``nft -f`` input).

    - prerouting: a packet from a pool address that did not come out of one of our TUN
      devices is spoofed (the pool lives only behind them): dropped, counted.
    - forward, on each uplink a remote target is reached through: only those targets may send
      to the pool; and where sixgate switched forwarding on (``opened``), nothing but the
      pool is forwarded, so the host does not become a router for anyone else.
    """
    table = table_name(settings)
    pool = settings.pool
    lines = [f"table ip {table} {{",
             "  chain prerouting {",
             "    type filter hook prerouting priority raw; policy accept;",
             f'    ip saddr {pool} iifname != "{settings.name}*" counter drop',
             "  }"]
    if uplinks:
        lines += ["  chain forward {",
                  "    type filter hook forward priority filter; policy accept;"]
        for ifname, targets in sorted(uplinks.items()):
            allowed = ", ".join(sorted(targets))
            lines.append(f'    iifname "{ifname}" ip daddr {pool} ip saddr != {{ {allowed} }} '
                         "counter drop")
        if opened:
            names = ", ".join(f'"{ifname}"' for ifname in opened)
            # A NAT64 beside the tunnel receives its replies there too.
            ours = ", ".join([pool, *sorted({row[0] for row in settings.nat64_pool4})])
            lines.append(f"    iifname {{ {names} }} ip daddr != {{ {ours} }} drop")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def enable(settings: Settings) -> None:
    """Install the guard tables and open the forwarding the gateway needs: for the replies
    of a tunnel's remote forward targets (see the module docstring), and for a NAT64 (IPv6
    forwarding when its clients are on this host's side, IPv4 forwarding on the uplink to
    the IPv4 internet, steering and policy rules). All undone on stop, or at the next start
    after a crash (the state file is written before anything is changed)."""
    undo(settings)
    table = table_name(settings)
    ruleset = ""
    changed: list[tuple[str, str]] = []  # (sysctl path, value before)
    if settings.mode != "nat64":
        conflicts = pool_conflicts(settings)
        if conflicts:
            raise ForwardingError(f"the pool {settings.pool} overlaps this host's route(s) "
                                  f"{', '.join(conflicts)}; set [gateway] pool to a block no "
                                  "route of this host uses")
        uplinks = uplinks_for_remote_targets(settings)
        opened = []
        for ifname, targets in sorted(uplinks.items()):
            path = _sysctl_path(ifname)
            old = path.read_text().strip()
            if old != "1":
                changed.append((str(path), old))
                opened.append(ifname)
                log.info("forwarding on %s switched on for replies from %s (restored on stop)",
                         ifname, ", ".join(targets))
        ruleset += guard_ruleset(settings, uplinks, opened)
    rules: list[tuple[int, int]] = []
    move_local = False
    if settings.nat64_prefix:
        ruleset, rules, move_local = _enable_nat64(settings, changed, ruleset)
    # Recorded before anything is made, so a failure half-way is undone like a crash.
    egress = nat64_egress_rules(settings)
    _state_path(settings).write_text(json.dumps({
        "paths": changed, "table": table, "table6": table if settings.nat64_prefix else None,
        "rules": rules, "egress": egress,
        "local_rule": LOCAL_RULE_PRIORITY if move_local else None}))
    nft(replace_table("ip", table)
        + (replace_table("ip6", table) if settings.nat64_prefix else "") + ruleset)
    try:
        _install_routing(rules, egress)
        if move_local:
            _move_local_rule(LOCAL_RULE_PRIORITY)
    except Exception as exc:  # noqa: BLE001 - NetlinkError: say which step
        raise ForwardingError(f"cannot install the NAT64's policy routing: {exc}") from None
    for path_text, _old in changed:
        Path(path_text).write_text("1")


def _enable_nat64(settings: Settings, changed: list[tuple[str, str]],
                  ruleset: str) -> tuple[str, list[tuple[int, int]], bool]:
    """The NAT64's part of ``enable``: checks, the sysctls it needs (appended to
    ``changed``), its tables (appended to ``ruleset``), its policy rules, and whether a pool4
    address is this host's own (the local table's rule then moves behind the NAT64's)."""
    owned = local_pool4(settings)
    problem = pool4_problem(settings, owned)
    if problem:
        raise ForwardingError(f"nat64.pool4: {problem}")
    uplink = nat64_uplink(settings.nat64_egress_table)
    wanted = [_sysctl_path(uplink)]
    if settings.nat64_input == "tun":
        wanted.append(IPV6_FORWARDING)
    for path in wanted:
        old = path.read_text().strip()
        if old != "1" and str(path) not in {known for known, _ in changed}:
            changed.append((str(path), old))
            log.info("%s switched on for the NAT64 (restored on stop)", path)
    opened = {path for path, _ in changed}
    ruleset += nat64_ruleset(settings, uplink, str(_sysctl_path(uplink)) in opened,
                             str(IPV6_FORWARDING) in opened, owned)
    rules = nat64_routing(settings) if nat64_steered(settings, owned) else []
    if not rules:
        log.info("one NAT64 worker on routed pool4: its routes in the main table take every "
                 "packet to it (no steering marks or policy rules)")
    return ruleset, rules, bool(owned)


# The sysctl that makes the kernel forward IPv6 at all (per interface in IPv6 only since
# Linux 6.17's force_forwarding, so the "all" switch is the portable one).
IPV6_FORWARDING = Path("/proc/sys/net/ipv6/conf/all/forwarding")
# Any IPv4 address: the route to it names the uplink a NAT64 reaches the IPv4 internet by.
SOME_IPV4 = "192.0.2.1"


def nat64_uplink(table: int = 0) -> str:
    """The interface of this host's route to the IPv4 internet (its default route; that of
    routing table ``table`` when one is given, ``[nat64] egress_table``)."""
    with IPRoute() as ipr:
        if table:
            routes = ipr.get_default_routes(family=socket.AF_INET, table=table)
            oifs = [r.get_attr("RTA_OIF") for r in routes if r.get_attr("RTA_OIF")]
            if not oifs:
                raise ForwardingError(f"routing table {table} (nat64.egress_table) has no "
                                      "IPv4 default route: add one (ip route add default via "
                                      f"ROUTER table {table})")
            return str(ipr.get_links(oifs[0])[0].get_attr("IFLA_IFNAME"))
        try:
            route = ipr.route("get", dst=SOME_IPV4)[0]
        except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError subclasses
            raise ForwardingError("this host has no IPv4 default route: a NAT64 needs a route "
                                  "to the IPv4 internet; add one (ip route add default via "
                                  "ROUTER)") from None
        oif = route.get_attr("RTA_OIF")
        return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))


def local_pool4(settings: Settings) -> list[str]:
    """pool4 addresses this host owns itself (the README's "pool4 on this host's address")."""
    return owned_pool4(settings.nat64_pool4)


LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RP_FILTER_ALL = Path("/proc/sys/net/ipv4/conf/all/rp_filter")


def pool4_problem(settings: Settings, owned: list[str] | None = None) -> str:
    """Why pool4 cannot work on this host ("" when it can). On an address the host owns, the
    NAT64 takes only the pool4 ports and the host keeps the rest; ports the host's own
    connections draw from (net.ipv4.ip_local_port_range) would be taken from under them, so a
    TCP or UDP range overlapping it is refused (Jool's users meet this). ``owned``: the
    pool4 addresses this host owns, when the caller has them."""
    owned = local_pool4(settings) if owned is None else owned
    if not owned:
        return ""
    if RP_FILTER_ALL.read_text().strip() == "1":
        return (f"{', '.join(owned)} is an address of this host and net.ipv4.conf.all.rp_filter "
                "is 1 (strict): the translated packets the NAT64 sends from it would be "
                "dropped; set it to 2 (loose: sysctl -w net.ipv4.conf.all.rp_filter=2) or use "
                "an address routed to this host")
    low, high = (int(word) for word in LOCAL_PORT_RANGE.read_text().split())
    clashes = [f"{address} {proto} {lo}-{hi}" for address, proto, lo, hi in settings.nat64_pool4
               if address in owned and proto != "icmp" and lo <= high and low <= hi]
    if not clashes:
        return ""
    return (f"{', '.join(clashes)} on an address of this host overlap(s) "
            f"net.ipv4.ip_local_port_range {low}-{high}, the ports the host's own connections "
            f"take: give pool4 ports outside it (like tcp = \"{high + 1}-65535\"), narrow the "
            "host's range (sysctl net.ipv4.ip_local_port_range), or route an address of its "
            "own to this host (ip route add ADDRESS/32 via THIS-HOST on the router)")


# Where the NAT64's policy routing rules sit (before the main table's 32766).
STEER_PRIORITY = 1000
# [nat64] egress_table's rules: behind the steering ones (a hairpinned packet to pool4 keeps
# its worker's table) and the local table's when it moved behind them.
EGRESS_PRIORITY = STEER_PRIORITY + 3
# Byte offsets inside an ICMPv4 error (RFC 792): the quoted IPv4 header follows the 8-byte
# ICMP header; sixgate's own packets carry no options, so the quoted transport header (its
# source port, or an echo request's identifier at +4) starts 20 bytes later.
QUOTED_PROTO_BITS = (8 + 9) * 8
QUOTED_SPORT_BITS = (8 + 20) * 8
QUOTED_ECHO_ID_BITS = (8 + 20 + 4) * 8
# In an ICMPv6 error: the quoted IPv6 packet's destination follows 8 + 24 bytes.
QUOTED_CLIENT6_BITS = (8 + 24) * 8


def nat64_steered(settings: Settings, owned: list[str]) -> bool:
    """Whether the NAT64's packets need marks and policy rules to reach their worker: with
    several workers (each owns a slice), or with pool4 on an address of this host (the marks
    pick pool4's ports out of the host's own traffic, ahead of the local table). One worker
    on routed pool4 needs neither: worker 0's routes in the main table take every packet
    there, and the kernel's lookups skip the policy rules (none of sixgate's) and the
    steering chains."""
    return settings.workers > 1 or bool(owned)


def nat64_steering(settings: Settings) -> tuple[list[str], list[str]]:
    """Chain bodies (ip, ip6) that mark each packet with the routing table of the worker that
    owns it, so it reaches that worker's TUN device: IPv6 from the clients by a hash of the
    source /64 (all of a client's bindings in one worker: endpoint-independent mapping and the
    per-/64 quota hold), IPv4 to pool4 by the worker slice its port (an echo reply's
    identifier; an error's quoted source port or identifier) falls in."""
    workers, shards = settings.workers, settings.shard_count
    base = nat64_table(settings.name, 0)
    # The hash reads the same 8 bytes (a /64) of the client in both rules: its source
    # address, or, in an ICMPv6 error a router on its path sent about one of our packets,
    # the quoted packet's destination (8 bytes of ICMPv6 header + 24 of the quoted header).
    # [gateway] shards: the hash names a shard, a map its worker (shard s in worker s mod N;
    # the engine computes the same shard for a new binding: wire.nat64_shard).
    hashed = (f"mod {workers} seed {settings.hash_seed:#x} offset {base:#x}"
              if shards == workers else
              f"mod {shards} seed {settings.hash_seed:#x} map {{ "
              + ", ".join(f"{s} : {base + s % workers:#x}" for s in range(shards)) + " }")
    v6 = [f"    ip6 daddr {settings.nat64_prefix} meta mark set jhash @nh,64,64 {hashed}",
          f"    ip6 daddr {settings.nat64_prefix} icmpv6 type {{ destination-unreachable, "
          f"packet-too-big, time-exceeded, parameter-problem }} meta mark set "
          f"jhash @th,{QUOTED_CLIENT6_BITS},64 {hashed}"]
    pool4 = ", ".join(sorted({row[0] for row in settings.nat64_pool4}))
    # Most IPv4 the hook sees is the workers' own, leaving for the IPv4 internet: it leaves
    # the chain at its first rule instead of being tested by every port map.
    v4 = [f"    ip daddr != {{ {pool4} }} accept"]
    names = {number: name for name, number in PROTOCOL_NUMBERS.items()}
    slices = [worker_pool4(settings.nat64_pool4, shards, shard) for shard in range(shards)]
    by_row: dict[tuple[int, bytes, int], list[str]] = {}
    for shard, slice_ in enumerate(slices):
        for proto, rows in slice_.items():
            for row, (address, lo, hi) in enumerate(rows):
                by_row.setdefault((proto, address, row), []).append(
                    f"{lo}-{hi} : {base + shard % workers:#x}")
    for (proto, address, _row), entries in sorted(by_row.items()):
        dst = f"ip daddr {ipaddress.IPv4Address(address)}"
        ports = "{ " + ", ".join(entries) + " }"
        name = names[proto]
        if proto == PROTOCOL_NUMBERS["icmp"]:
            v4.append(f"    {dst} icmp type echo-reply meta mark set icmp id map {ports}")
            quoted = QUOTED_ECHO_ID_BITS
        else:
            v4.append(f"    {dst} meta mark set {name} dport map {ports}")
            quoted = QUOTED_SPORT_BITS
        v4.append(f"    {dst} icmp type {{ destination-unreachable, time-exceeded, "
                  f"parameter-problem }} @th,{QUOTED_PROTO_BITS},8 {proto} meta mark set "
                  f"@th,{quoted},16 map {ports}")
    return v4, v6


def _untracked_pool4(settings: Settings, owned: list[str], ours: str) -> list[str]:
    """Rules keeping pool4 traffic out of conntrack (the NAT64 keeps its own state) and
    dropping packets from a pool4 address that did not come out of our TUN devices. An
    address of this host's own keeps its other ports: only the pool4 ranges are untracked,
    and its other traffic stays the host's."""
    routed = sorted({row[0] for row in settings.nat64_pool4} - set(owned))
    lines = []
    if routed:
        addresses = ", ".join(routed)
        lines += [f"    ip saddr {{ {addresses} }} iifname != {ours} counter drop",
                  f"    ip daddr {{ {addresses} }} notrack",
                  # What the workers translated, on its way out: no conntrack entry either
                  # (one per binding, and its lookup on every packet, for nothing).
                  f"    ip saddr {{ {addresses} }} notrack"]
    # The host's own address as a source from outside is a martian the kernel drops itself
    # (no accept_local on the uplink).
    for address, proto, lo, hi in settings.nat64_pool4:
        if address in owned:
            inbound, outbound = ((f"icmp type echo-reply icmp id {lo}-{hi}",
                                  f"icmp type echo-request icmp id {lo}-{hi}")
                                 if proto == "icmp" else
                                 (f"{proto} dport {lo}-{hi}", f"{proto} sport {lo}-{hi}"))
            lines += [f"    ip daddr {address} {inbound} notrack",
                      f"    iifname {ours} ip saddr {address} {outbound} notrack"]
    return lines


def nat64_ruleset(settings: Settings, uplink: str, opened4: bool, opened6: bool,
                  owned: list[str]) -> str:
    """The NAT64 gateway's nftables tables (``nft -f`` input).

    - ip prerouting: a packet from a pool4 address that did not come out of our TUN devices is
      spoofed: dropped, counted.
    - where sixgate switched forwarding on, it forwards nothing but its own traffic: IPv4 from
      the uplink only to pool4, IPv6 only to the prefix (into our TUNs) and out of our TUNs.
    """
    table = table_name(settings)
    pool4 = ", ".join(sorted({row[0] for row in settings.nat64_pool4}))
    ours = f'"{settings.name}*"'
    steered = nat64_steered(settings, owned)
    steer4, steer6 = nat64_steering(settings) if steered else ([], [])
    lines = [f"table ip {table} {{",
             "  chain nat64_prerouting {",
             "    type filter hook prerouting priority raw; policy accept;",
             *_untracked_pool4(settings, owned, ours)]
    if steered:
        # A conntrack expression in the table makes the kernel put IPv4 fragments together
        # before this hook (nf_defrag_ipv4, priority -400): a non-first fragment has no port
        # to steer by. Unsteered, every fragment takes the one worker's route and the worker
        # puts them together itself; without the expression no conntrack or defrag hook runs
        # for this table (issue 16: about 1.5% of a packet).
        lines.append(f"    ip daddr {{ {pool4} }} ct state untracked")
    lines.append("  }")
    if steered:
        lines += ["  chain steer {",
                  "    type filter hook prerouting priority mangle; policy accept;",
                  *steer4,
                  "  }",
                  # What this host's own stack sends to pool4 (Fragmentation Needed of its
                  # routing).
                  "  chain steer_local {",
                  "    type route hook output priority mangle; policy accept;",
                  *steer4,
                  "  }"]
    lines += ["  chain nat64_forward {",
              "    type filter hook forward priority filter; policy accept;",
              # pool4 lives behind our devices only: what no worker took never goes back out.
              f"    ip daddr {{ {pool4} }} oifname != {ours} counter drop"]
    if opened4:
        # Beside a tunnel, its pool's replies from remote forward targets come in here too.
        allowed = pool4 if settings.mode == "nat64" else f"{pool4}, {settings.pool}"
        lines.append(f'    iifname "{uplink}" ip daddr != {{ {allowed} }} counter drop')
    lines.append("  }")
    lines.append("}")
    if settings.nat64_input != "tun":
        return "\n".join(lines) + "\n"  # IPv6 comes over the tunnel: no IPv6 forwarding
    lines.append(f"table ip6 {table} {{")
    if steered:
        lines += ["  chain steer {",
                  "    type filter hook prerouting priority mangle; policy accept;",
                  *steer6,
                  "  }",
                  "  chain steer_local {",
                  "    type route hook output priority mangle; policy accept;",
                  *steer6,
                  "  }"]
    lines += ["  chain forward {",
              "    type filter hook forward priority filter; policy accept;"]
    if opened6:
        # The clients' packets, nearly all of this chain's, first: one rule each.
        lines.append(f"    oifname {ours} ip6 daddr {settings.nat64_prefix} accept")
    lines.append(f"    ip6 daddr {settings.nat64_prefix} oifname != {ours} counter drop")
    if opened6:
        lines += [f"    iifname {ours} accept",
                  "    counter drop"]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def nat64_routing(settings: Settings) -> list[tuple[int, int]]:
    """(family, table = mark) of each worker: a packet with the mark looks up the worker's
    table (its device's routes); when that is empty (the worker is being restarted) the next
    rule throws it away rather than let the main table send it back out."""
    families = (socket.AF_INET, socket.AF_INET6) if settings.nat64_input == "tun" else (
        socket.AF_INET,)
    return [(int(family), nat64_table(settings.name, index))
            for family in families for index in range(settings.workers)]


def nat64_egress_rules(settings: Settings) -> list[tuple[str, int]]:
    """(device, table): the NAT64's translated IPv4 leaves each worker's device routed by
    ``[nat64] egress_table`` (none for 0, the main table)."""
    from sixgate.workers.main import tun_name
    table = settings.nat64_egress_table
    return [(tun_name(settings, index), table) for index in range(settings.workers)] \
        if table else []


def _egress_rule(ifname: str, table: int) -> dict[str, Any]:
    return dict(family=socket.AF_INET, iifname=ifname, table=table, priority=EGRESS_PRIORITY)


def _rule_variants(family: int, table: int) -> list[dict[str, Any]]:
    return [dict(family=family, table=table, fwmark=table, priority=STEER_PRIORITY),
            dict(family=family, fwmark=table, priority=STEER_PRIORITY + 1,
                 action="FR_ACT_BLACKHOLE")]


# pool4 on an address of this host: its packets would reach the host's own sockets by the
# local table, whose rule comes first (priority 0). It moves behind the NAT64's mark rules, so
# the marked packets (pool4 ports only) reach the workers and all else is delivered as before.
LOCAL_TABLE = 255
LOCAL_RULE_PRIORITY = STEER_PRIORITY + 2


def _local_rule(priority: int) -> dict[str, Any]:
    return dict(family=socket.AF_INET, table=LOCAL_TABLE, priority=priority)


def _move_local_rule(priority: int) -> None:
    """The IPv4 local table's rule from priority 0 to ``priority`` (added there first, so
    there is no instant without it)."""
    with IPRoute() as ipr:
        ipr.rule("add", **_local_rule(priority))
        ipr.rule("del", **_local_rule(0))
    log.info("IPv4 local table rule moved from priority 0 to %d, behind the NAT64's (pool4 on "
             "this host's address; restored on stop)", priority)


def _restore_local_rule(priority: int) -> None:
    with IPRoute() as ipr:
        present = {(r.get_attr("FRA_PRIORITY") or 0) for r in ipr.get_rules(family=socket.AF_INET)
                   if r.get_attr("FRA_TABLE") == LOCAL_TABLE}
        if 0 not in present:
            ipr.rule("add", **_local_rule(0))
        if priority in present:
            ipr.rule("del", **_local_rule(priority))


def _install_routing(rules: list[tuple[int, int]], egress: list[tuple[str, int]]) -> None:
    with IPRoute() as ipr:
        for family, table in rules:
            for rule in _rule_variants(family, table):
                ipr.rule("add", **rule)
        for ifname, table in egress:
            ipr.rule("add", **_egress_rule(ifname, table))


def _remove_routing(rules: list[list[int]], egress: list[list[Any]]) -> None:
    with IPRoute() as ipr:
        for family, table in rules:
            for rule in _rule_variants(family, table):
                try:
                    ipr.rule("del", **rule)
                except Exception as exc:  # noqa: BLE001 - NetlinkError: already gone
                    log.debug("rule for table %#x already gone: %s", table, exc)
        for ifname, table in egress:
            try:
                ipr.rule("del", **_egress_rule(ifname, table))
            except Exception as exc:  # noqa: BLE001 - NetlinkError: already gone
                log.debug("egress rule of %s already gone: %s", ifname, exc)


def undo(settings: Settings) -> None:
    """Restore what ``enable`` or ``enable_nat64`` (of this run or a crashed earlier one)
    changed."""
    path = _state_path(settings)
    if not path.exists():
        return
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = {}
    restore = [(str(_sysctl_path(ifname)), old) for ifname, old in state.get("sysctls", [])]
    for path_text, old in restore + [tuple(row) for row in state.get("paths", [])]:
        try:
            Path(path_text).write_text(old)
        except OSError as exc:
            log.warning("cannot restore %s to %s: %s", path_text, old, exc)
    if state.get("local_rule"):
        try:
            _restore_local_rule(int(state["local_rule"]))
        except Exception as exc:  # noqa: BLE001 - NetlinkError: say it, go on undoing
            log.error("cannot put the IPv4 local table's rule back at priority 0: %s; do it "
                      "by hand: ip rule add priority 0 lookup local", exc)
    if state.get("rules") or state.get("egress"):
        _remove_routing(state.get("rules") or [], state.get("egress") or [])
    for family, key in (("ip", "table"), ("ip6", "table6")):
        table = state.get(key)
        if table:
            try:
                nft(f"delete table {family} {table}\n")
            except ForwardingError as exc:
                log.warning("cannot delete nftables table %s %s: %s", family, table, exc)
    path.unlink(missing_ok=True)
