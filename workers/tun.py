"""The worker's TUN device: how translated IPv4 packets reach the services and replies come back.

Each worker owns one TUN device named ``<name><index>`` and routes its own slice of the IPv4
pool to it (``workers/engine/settings.py worker_routes``), so the kernel hands every reply to the
worker that owns the flow. Because the pool addresses live behind the TUN and no local socket
owns them, the kernel never answers the services' replies with its own RST or unreachable
(DESIGN.md), and no firewall rule is needed. The device is not persistent: it disappears with
the worker, also after a crash, so nothing is left behind. One exception (issue 17): a worker
stopped by a take-over (``sixgate run --take-over``) leaves its device persistent, with its
routes, for the next run's worker of the same index, which attaches to it (``open_tun``),
makes it non-persistent again and corrects its routes (``configure_tun``); the device is not
deleted and made again in the middle of the take-over. Whatever no worker took is removed by
the coordinator (``kept_devices``, ``remove_devices``).

I/O shell: opens /dev/net/tun, configures the link and routes with pyroute2 (netlink), writes
per-device sysctls (``route_localnet`` for 127.0.0.0/8 targets, ``forwarding`` for targets on
other hosts; for a NAT64 whose pool4 holds an address of this host, ``accept_local`` and
``rp_filter`` 0, so the translated packets it sends from that address are not martians).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_PERSIST = 0x0800  # in /sys/class/net/<device>/tun_flags
RTPROT_STATIC = 4  # what pyroute2 gives the routes a worker adds
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTICAST = 0x1000  # a link flag (ip link), not a TUNSETIFF one
# The largest IPv4 packet: the local stack then never fragments towards us; oversized replies
# are fragmented as IPv6 by the worker (RFC 7915 §4) or answered with Fragmentation Needed.
TUN_MTU = 65535
TUN_TXQUEUE = 4096
# A CLAT's default route goes in only where the host has none of its own (RFC 6877 §6.3: native
# IPv4 wins); its metric keeps it behind any that appears later.
CLAT_ROUTE_METRIC = 2048
MAIN_TABLE = 254


def open_tun(name: str, owner: int = -1) -> int:
    """Create TUN device ``name`` (or attach to the one a take-over's previous run kept for
    this run: ``keep_for_next_run``) and return its non-blocking fd. Open, the device is not
    persistent: it goes when the fd closes. ``owner``: the uid the worker becomes, so that it
    may keep the device for the next run without capabilities."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
        if owner >= 0:
            fcntl.ioctl(fd, TUNSETOWNER, owner)
    except OSError:
        os.close(fd)
        raise
    return fd


def keep_for_next_run(fd: int) -> None:
    """At a take-over's stop: the device stays, with its routes, when ``fd`` closes (the next
    run's worker attaches to it). Its owner may ask this without capabilities."""
    fcntl.ioctl(fd, TUNSETPERSIST, 1)


def kept_devices(names: list[str]) -> list[str]:
    """Those of ``names`` that exist as persistent TUN devices (kept for a next run)."""
    kept = []
    for name in names:
        try:
            flags = int(Path(f"/sys/class/net/{name}/tun_flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if flags & IFF_PERSIST:
            kept.append(name)
    return kept


def remove_devices(names: list[str]) -> None:
    """Delete these devices (kept for a next run that did not take them)."""
    with IPRoute() as ipr:
        for name in names:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)


def set_sysctl(device: str, key: str, value: str) -> None:
    Path(f"/proc/sys/net/ipv4/conf/{device}/{key}").write_text(value)


def local_pool4(pool4: tuple[tuple[str, str, int, int], ...]) -> list[str]:
    """The pool4 addresses (``Settings.nat64_pool4`` rows) this host owns itself."""
    with IPRoute() as ipr:
        owned = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(family=socket.AF_INET)}
    return sorted({row[0] for row in pool4} & owned)


def configure_tun(name: str, routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                  nat64_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
                  table: int | None = None, sends_from_local: bool = False,
                  adopted: bool = False, siblings: frozenset[str] = frozenset(),
                  theirs: frozenset[ipaddress.IPv4Network | ipaddress.IPv6Network] = frozenset()
                  ) -> None:
    """Bring the device up with a 64 KiB MTU and route this worker's pool slice to it; for a
    NAT64 also pool4 (and its IPv6 prefix when its clients are on this host's side: the
    device then carries both families) in routing table ``table``, which the gateway's
    packet marks select. ``sends_from_local``: packets from the device may carry a source
    address of this host (pool4 on the host's own address). ``adopted``: the device was kept
    by a take-over's previous run (its routes are corrected, not added again). ``siblings``:
    the devices of this gateway's other workers, whose routes this one may take over (a
    take-over to another worker count moves pool slices between devices kept by the previous
    run); ``theirs``: main-table routes the other workers take, which an adopted device
    leaves for them to move (deleting one first would leave the slice without a route, its
    packets to the host's other routes, for that instant)."""
    # RFC 1122 §3.2.1.3 makes 127/8 martian on any other device; the services listen there.
    set_sysctl(name, "route_localnet", "1")
    if sends_from_local:
        # A packet coming in with a local source is a martian unless the device accepts it
        # (and strict reverse-path filtering would look for the source behind this device).
        set_sysctl(name, "accept_local", "1")
        set_sysctl(name, "rp_filter", "0")
    # Targets on other hosts are forwarded from this device only (per-device, not global).
    set_sysctl(name, "forwarding", "1")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        # A deeper transmit queue than the default 500 absorbs the services' bursts while the
        # worker is busy with inbound packets.
        ipr.link("set", index=index, mtu=TUN_MTU, txqlen=TUN_TXQUEUE, state="up")
        wanted = {(net, MAIN_TABLE) for net in routes} | {
            (net, table if table is not None else MAIN_TABLE) for net in nat64_routes or []}
        # A device kept from a take-over's previous run has its routes already: the missing
        # ones are added first, then those no longer wanted go (a slice that changes its
        # prefixes is never without a route).
        present = _routes_of(index, {t for _, t in wanted}) if adopted else set()
        for net, in_table in sorted(wanted - present, key=str):
            # "add", never "replace": a route of the host's own is never taken over (the
            # coordinator refused such a pool already; this is the last line). Only one on
            # a sibling's device moves here.
            route = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": index,
                     "family": _family(net), "table": in_table}
            _add_route(ipr, route, net, in_table, siblings)
        for net, in_table in sorted(present - wanted, key=str):
            if in_table == MAIN_TABLE and net in theirs:
                continue  # a sibling replaces it
            try:
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                          oif=index, family=_family(net), table=in_table)
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:  # taken by a sibling meanwhile
                    raise


def _add_route(ipr: IPRoute, route: dict[str, object],
               net: ipaddress.IPv4Network | ipaddress.IPv6Network, table: int,
               siblings: frozenset[str]) -> None:
    """Add ``route``; one to the same prefix on a sibling's device is taken over. A sibling
    may delete its own meanwhile (its correction after a take-over): then add again."""
    for _ in range(3):
        try:
            ipr.route("add", **route)
            return
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        if _on_sibling(ipr, net, table, siblings):
            ipr.route("replace", **route)
            return
    ipr.route("add", **route)  # the host's own route: EEXIST, said by the caller


def _on_sibling(ipr: IPRoute, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                table: int, siblings: frozenset[str]) -> bool:
    """Whether the route to exactly ``net`` in ``table`` leads to one of ``siblings``."""
    for route in ipr.get_routes(family=_family(net), table=table):
        if (route["dst_len"] != net.prefixlen
                or route.get_attr("RTA_DST") != str(net.network_address)):
            continue
        links = ipr.get_links(route.get_attr("RTA_OIF") or 0)
        if links and links[0].get_attr("IFLA_IFNAME") in siblings:
            return True
    return False


def _family(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


def _routes_of(index: int, tables: set[int]
               ) -> set[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]:
    """The routes a worker added to device ``index`` (static ones) in ``tables``."""
    found: set[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]] = set()
    # Strict checking: the kernel dumps only this device's routes of these tables, not a
    # router's whole table (a kernel before 4.20 cannot: pyroute2 then filters the dump).
    try:
        ipr = IPRoute(strict_check=True)
    except Exception:  # noqa: BLE001 - NetlinkError/OSError: no NETLINK_GET_STRICT_CHK
        ipr = IPRoute()
    with ipr as strict:
        for family in (socket.AF_INET, socket.AF_INET6):
            for in_table in tables:
                for route in strict.get_routes(family=family, oif=index, table=in_table):
                    if route.get_attr("RTA_OIF") != index or route["proto"] != RTPROT_STATIC:
                        continue
                    dst = route.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6
                                                        else "0.0.0.0")
                    found.add((ipaddress.ip_network(f"{dst}/{route['dst_len']}"),
                               route.get_attr("RTA_TABLE") or in_table))
    return found


def configure_clat(name: str, ipv4_address: str, ipv6_address: str, mtu: int) -> bool:
    """The CLAT device (issue 18): the host's IPv4 address on it, a default route through it
    with the CLAT's MTU unless the host has an IPv4 default route of its own (RFC 6877 §6.3:
    native IPv4 wins), and the CLAT's IPv6 address routed to it. The device's own MTU stays
    large (IPv6 needs 1280, and the PLAT's packets may be bigger); the route's MTU is what the
    host's IPv4 uses. Whether the default route was installed."""
    # No link-local address and no multicast on the device: the kernel then sends it no router
    # solicitations or MLD reports of its own, which would reach the worker as strangers'.
    Path(f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode").write_text("1")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, flags=0, change=IFF_MULTICAST)
        ipr.link("set", index=index, mtu=TUN_MTU, txqlen=TUN_TXQUEUE, state="up")
        ipr.addr("add", index=index, address=ipv4_address, prefixlen=32)
        # The main table's: a default route in another (a 464XLAT box's NAT64 egress table)
        # is no route of this host's own programs.
        native = any(route.get_attr("RTA_OIF") != index
                     for route in ipr.get_default_routes(family=socket.AF_INET)
                     if (route.get_attr("RTA_TABLE") or route["table"]) == MAIN_TABLE)
        if not native:
            ipr.route("add", dst="0.0.0.0", dst_len=0, oif=index, priority=CLAT_ROUTE_METRIC,
                      prefsrc=ipv4_address, metrics={"mtu": mtu},
                      family=socket.AF_INET)
        ipr.route("add", dst=ipv6_address, dst_len=128, oif=index, family=socket.AF_INET6)
    return not native
