"""Kernel backend: a real sit tunnel configured over netlink (pyroute2), where the kernel has it.

The kernel then does decapsulation, the RFC 3964 §5.2 spoofing checks (sit's
``packet_is_spoofed``), the RFC 4213 §3.6 peer check, ICMPv6 and IPv6 itself; the workers only
relay the forwarded ports to the IPv4 services (``workers/relay.py``).

What is created, per RFC:
- the sit link ``<name>sit``: 6to4 has no fixed remote and local = local_ipv4 (RFC 3056 §3);
  6in4 has remote = remote_ipv4 (RFC 4213 §3); 6rd is 6to4's link with sit's 6rd
  parameters (RFC 5969 §4: the 6rd prefix and the IPv4 bits every CE shares, ``ip tunnel
  6rd``); MTU from the config (RFC 4213 §3.2.1), TTL 64 (RFC 4213 §3.3 lets the admin set it);
- the gateway's addresses on it (/128);
- routes: 6to4: 2002::/16 on the link (sit takes the IPv4 destination from the 6to4 address,
  RFC 3056 §5.3) and the default route via the relay in its ``::V4ADDR`` form; 6rd the same
  with its 6rd prefix and border relay (RFC 5969 §7.1.1; sit also does its §12 check,
  ``is_spoofed_6rd``); 6in4: the default route over the link.

What is reachable (issue 13, finding 4): the host's own IPv6 listeners (sshd on ``[::]``,
...) must not open to the IPv6 internet because the tunnel exists. An nftables table
``sixgate_<name>_in`` admits on the sit link only the forwarded ports on the gateway's
addresses, the ICMPv6 a host must take (RFC 4890 §4.4.1: errors and echo; neighbour discovery
with hop limit 255, RFC 4861 §7.1, for the tunnel's NUD, RFC 4213 §3.8) and replies to what the
host itself opened (conntrack established/related); everything else is counted and dropped.

Relayed clients never reach a service from 127.0.0.1 (a "trust localhost" admin endpoint would
then trust the internet): each client is given an address of the IPv4 pool as its source, as
the userspace backend does. The pool is made local (a ``local`` route on ``lo``, so unprivileged
workers can bind its addresses), and the same table drops what arrives for the pool from
anyone but the configured remote targets.

Teardown deletes the link (with its addresses and routes), the pool route and the table. A state
file in the run directory names what a run created, so the next start removes a crashed run's.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import cast

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sixgate.coordinator.forwarding import (
    ForwardingError,
    nft,
    pool_conflicts,
    remote_targets,
    replace_table,
)
from sixgate.workers.engine.settings import Settings

log = logging.getLogger("sixgate.kernel")

STATE_FILE = "kernel-backend.json"
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
RTN_LOCAL = 2
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254  # a local route must be host scope (fib_props), as `ip route add local` sets
# RFC 4890 §4.4.1: ICMPv6 a host must not filter (errors, echo); the errors' own checks are
# the kernel's (RFC 4443 §2.4).
ICMPV6_ADMITTED = ("destination-unreachable", "packet-too-big", "time-exceeded",
                   "parameter-problem", "echo-request", "echo-reply")


class KernelBackendError(Exception):
    pass


def sit_name(settings: Settings) -> str:
    return f"{settings.name}sit"


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def table_name(settings: Settings) -> str:
    return f"sixgate_{settings.name}_in"


def input_ruleset(settings: Settings, link: str) -> str:
    """The input policy of the host behind the sit link (``nft -f`` input; module docstring).

    Pure: the settings decide everything, so a unit test reads the rules without nft."""
    addresses = ", ".join(settings.addresses)
    targets = remote_targets(settings)
    lines = [f"table inet {table_name(settings)} {{",
             "  counter not_forwarded {",
             "  }",
             "  chain input {",
             "    type filter hook input priority filter; policy accept;",
             '    iifname "lo" accept']
    if targets:
        lines.append(f"    ip daddr {settings.pool} ip saddr != "
                     f"{{ {', '.join(targets)} }} counter drop")
    else:
        lines.append(f"    ip daddr {settings.pool} counter drop")
    lines += [f'    iifname != "{link}" accept',
              "    ct state established,related accept",
              f"    icmpv6 type {{ {', '.join(ICMPV6_ADMITTED)} }} accept",
              # RFC 4861 §7.1.1/§7.1.2: ND is valid only with hop limit 255 (never forwarded).
              "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 "
              "accept"]
    for proto in ("tcp", "udp"):
        ports = sorted({(rule.port_lo, rule.port_hi) for rule in settings.forwards
                        if rule.proto == proto})
        if ports:
            spans = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
            lines.append(f"    ip6 daddr {{ {addresses} }} {proto} dport {{ {spans} }} accept")
    lines += ['    counter name "not_forwarded" drop',
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def _write_state(settings: Settings, state: dict[str, object]) -> None:
    """The state file replaced whole (a crash never leaves half of it), also where root's
    run made it and the gateway user, owning the run directory, writes it (a hand-back)."""
    path = _state_path(settings)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


def _read_state(path: Path) -> dict[str, object]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _pool_route(settings: Settings) -> dict[str, object]:
    pool = ipaddress.IPv4Network(settings.pool)
    return {"dst": str(pool.network_address), "dst_len": pool.prefixlen, "type": RTN_LOCAL,
            "scope": RT_SCOPE_HOST,
            "table": RT_TABLE_LOCAL, "family": socket.AF_INET}


def sixrd_link(settings: Settings) -> dict[str, object]:
    """The sit link's 6rd attributes (IFLA_IPTUN_6RD_*, what ``ip tunnel 6rd dev D
    6rd-prefix P 6rd-relay_prefix R`` sets): the 6rd prefix and the IPv4MaskLen high bits that
    every CE of the domain shares (RFC 5969 §4); none outside mode "6rd". Pure."""
    if settings.mode != "6rd":
        return {}
    prefix = ipaddress.IPv6Network(settings.sixrd_prefix)
    common = ipaddress.IPv4Network(f"{settings.known_ipv4}/{settings.ipv4_mask_len}",
                                   strict=False)
    return {"sit_6rd_prefix": str(prefix.network_address),
            "sit_6rd_prefixlen": prefix.prefixlen,
            "sit_6rd_relay_prefix": str(common.network_address),
            "sit_6rd_relay_prefixlen": settings.ipv4_mask_len}


def remove_leftovers(settings: Settings) -> None:
    """Delete what a crashed earlier run created (named in its state file): the sit link,
    the pool's local route and the input table."""
    path = _state_path(settings)
    state = _read_state(path)
    names = {sit_name(settings), *cast(list[str], state.get("links", []))}
    with IPRoute() as ipr:
        for name in sorted(names):
            index = ipr.link_lookup(ifname=name)
            if index:
                log.info("removing sit link %s left by an earlier run", name)
                ipr.link("del", index=index[0])
        route = state.get("pool_route")
        if isinstance(route, dict):
            _delete_route(ipr, route)
    switched = state.get("sysctls")
    for sysctl, before in (switched.items() if isinstance(switched, dict) else ()):
        try:
            Path(sysctl).write_text(str(before))
        except OSError as exc:
            log.warning("cannot put %s back to %s (%s)", sysctl, before, exc.strerror)
    table = state.get("table")
    if isinstance(table, str):
        try:
            nft(replace_table("inet", table))
        except ForwardingError as exc:
            log.warning("cannot delete nftables table %s: %s", table, exc)
    path.unlink(missing_ok=True)


def link_spec(settings: Settings) -> dict[str, object]:
    """The sit link's netlink attributes (what ``ip tunnel add`` would be given). Pure."""
    link: dict[str, object] = {"ifname": sit_name(settings), "kind": "sit",
                               "sit_local": settings.local_ipv4, "sit_ttl": 64}
    if settings.mode == "6in4":
        link["sit_remote"] = settings.remote_ipv4
    link.update(sixrd_link(settings))
    return link


def _adoptable(settings: Settings, link: dict[str, object]) -> bool:
    """A take-over (``sixgate run --take-over``): the sit link the retiring run leaves is
    kept when it is the one this config makes (its state file says how it was made)."""
    state = _read_state(_state_path(settings))
    with IPRoute() as ipr:
        exists = bool(ipr.link_lookup(ifname=sit_name(settings)))
    return exists and state.get("link") == link


def setup(settings: Settings, adopt: bool = False) -> str:
    """Create and configure the sit tunnel; returns the link name. ``adopt``: a take-over
    from a retiring run whose relays still carry connections over the link: a link made
    the same way is kept (its addresses, routes, pool route and input policy updated in
    place), so those connections go on; another one is replaced."""
    name = sit_name(settings)
    link = link_spec(settings)
    kept = adopt and _adoptable(settings, link)
    if not kept:
        remove_leftovers(settings)
    # Refused before anything is created: the pool becomes local below (the relays bind its
    # addresses as their clients' sources), which would take traffic from such routes.
    state = _read_state(_state_path(settings)) if kept else {}
    conflicts = [route for route in pool_conflicts(settings)
                 if route != _pool_route_text(state.get("pool_route"))]  # a kept link's own
    if conflicts:
        raise KernelBackendError(
            f"the pool {settings.pool} overlaps this host's route(s) {', '.join(conflicts)}; "
            "set [gateway] pool to a block no route of this host uses")
    with IPRoute() as ipr:
        if not kept:
            try:
                ipr.link("add", **link)
            except NetlinkError as exc:
                if exc.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                    raise KernelBackendError(
                        "the kernel has no sit driver (CONFIG_IPV6_SIT); use backend = "
                        "\"userspace\" or \"auto\"") from None
                raise KernelBackendError(f"cannot create sit link {name}: "
                                         f"{exc.args[-1] if exc.args else exc}") from None
        state.update(links=[name], link=link)
        _write_state(settings, state)
        index = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=index, mtu=settings.mtu, state="up")
        _configure_addresses(ipr, index, settings.addresses)
        if settings.mode in ("6to4", "6rd"):
            on_link = ipaddress.IPv6Network(settings.sixrd_prefix if settings.mode == "6rd"
                                            else "2002::/16")
            ipr.route("replace", dst=str(on_link.network_address), dst_len=on_link.prefixlen,
                      oif=index, family=10)
            relay = ipaddress.IPv6Address("::" + str(settings.relay_ipv4))
            ipr.route("replace", dst="::", dst_len=0, gateway=str(relay), oif=index, family=10)
        else:
            ipr.route("replace", dst="::", dst_len=0, oif=index, family=10)
        # The pool becomes local: relays bind its addresses as their clients' sources.
        route = _pool_route(settings)
        old_route = state.get("pool_route")
        if isinstance(old_route, dict) and old_route != route:
            _delete_route(ipr, old_route)
        ipr.route("replace", oif=ipr.link_lookup(ifname="lo")[0], **route)
        state["pool_route"] = route
        _write_state(settings, state)
    # Listeners of a worker that stops (a crash, a take-over's retiring relays) hand their
    # not yet accepted connections to the others of their SO_REUSEPORT group.
    state.setdefault("sysctls", {})
    _switch_sysctl(MIGRATE_REQ, "1", cast(dict[str, str], state["sysctls"]))
    _write_state(settings, state)
    table = table_name(settings)
    try:
        nft(replace_table("inet", table, input_ruleset(settings, name)))
    except ForwardingError as exc:
        raise KernelBackendError(f"cannot install the input policy of {name}: {exc}") from None
    state["table"] = table
    _write_state(settings, state)
    if kept:
        log.info("kernel backend: sit link %s kept from the run this one takes over from "
                 "(the connections its relays carry go on)", name)
    log.info("kernel backend: sit link %s up (%s, local %s%s, mtu %d), addresses %s", name,
             settings.mode, settings.local_ipv4,
             f", remote {settings.remote_ipv4}" if settings.remote_ipv4 else
             f", 6rd prefix {settings.sixrd_prefix} relay prefix "
             f"{link['sit_6rd_relay_prefix']}/{settings.ipv4_mask_len}"
             if settings.mode == "6rd" else "",
             settings.mtu, ", ".join(settings.addresses))
    log.info("kernel backend: only the forwarded ports and RFC 4890 ICMPv6 reach this host "
             "through %s (nftables table inet %s); relayed clients reach the services from "
             "pool %s", name, table, settings.pool)
    return name


def _pool_route_text(route: object) -> str:
    """How ``pool_conflicts`` names a pool route this backend made ("" for none)."""
    if not isinstance(route, dict):
        return ""
    return f"{route.get('dst')}/{route.get('dst_len')} dev lo"


def _configure_addresses(ipr: IPRoute, index: int, addresses: tuple[str, ...]) -> None:
    """The gateway's addresses on the link (/128), no other global /128 (a kept link may
    carry a previous config's; sit's own IPv4-compatible /96 of a 6to4 link stays)."""
    present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=10)
               if a["scope"] == 0 and a["prefixlen"] == 128}
    wanted = {str(ipaddress.IPv6Address(a)) for a in addresses}
    for address in sorted(present - wanted):
        ipr.addr("del", index=index, address=address, prefixlen=128, family=10)
    for address in sorted(wanted - present):
        # IFA_F_NODAD: the tunnel has no neighbours to detect; bind at once.
        ipr.addr("add", index=index, address=address, prefixlen=128, family=10, flags=0x02)


def _delete_route(ipr: IPRoute, route: dict[str, object]) -> None:
    lo = ipr.link_lookup(ifname="lo")
    try:
        ipr.route("del", oif=lo[0] if lo else 1, **route)
    except NetlinkError as exc:
        if exc.code != errno.ESRCH:
            raise


def _switch_sysctl(path: Path, value: str, switched: dict[str, str]) -> None:
    """Set a sysctl, remembering its value before (once) so teardown puts it back."""
    try:
        before = path.read_text().strip()
        if before != value:
            path.write_text(value)
            switched.setdefault(str(path), before)
    except OSError as exc:
        log.warning("cannot set %s to %s (%s)", path, value, exc.strerror)


UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def new_privileged_ports(running: Settings, new: Settings) -> list[str]:
    """Ports the new forward rules listen on that the running ones do not, and that only a
    privileged process may bind (the relays have dropped their capabilities): "tcp/80"..."""
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    def ports(settings: Settings) -> set[tuple[str, int]]:
        return {(rule.proto, port) for rule in settings.forwards
                for port in range(rule.port_lo, rule.port_hi + 1)}
    return [f"{proto}/{port}" for proto, port in sorted(ports(new) - ports(running))
            if port < start]


def update_input_policy(settings: Settings, link: str) -> None:
    """A reload: the input table opens the new rules' ports (one nft transaction)."""
    try:
        nft(replace_table("inet", table_name(settings), input_ruleset(settings, link)))
    except ForwardingError as exc:
        raise KernelBackendError(f"cannot update the input policy of {link}: {exc}") from None


def teardown(settings: Settings) -> None:
    """Remove exactly what ``setup`` created."""
    try:
        remove_leftovers(settings)
    except (OSError, NetlinkError) as exc:
        log.warning("kernel backend teardown: %s", exc)
