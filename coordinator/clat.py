"""The CLAT's host side (issue 18, RFC 6877 §6): the PLAT prefix, and what the kernel needs so
the CLAT's IPv6 address reaches the worker's TUN device.

The worker's device carries the host's IPv4 (its address and a default route, see
workers/tun.py ``configure_clat``) and the CLAT's IPv6 address (routed to it). For the router
on the uplink to deliver to that address, this host answers neighbour solicitations for it
there (proxy NDP, which Linux only does with IPv6 forwarding on) and forwards what arrives to
the device; the uplink keeps taking router advertisements (``accept_ra`` 2 where it was 1).
Every switch and the proxy entry are recorded in the run directory before they are made and
undone on stop, or at the next start after a crash. I/O shell; the translation is
workers/engine/clat.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from pathlib import Path

from pyroute2 import IPRoute

from sixgate.workers.engine.nat64 import PREFIX_LENGTHS, Nat64Prefix
from sixgate.workers.engine.settings import Settings

log = logging.getLogger("sixgate.clat")

STATE_FILE = "clat.json"
# RFC 7050 §2.2: the well-known name with only A records, and its two addresses.
IPV4ONLY_NAME = "ipv4only.arpa"
WELL_KNOWN_IPV4 = (bytes((192, 0, 0, 170)), bytes((192, 0, 0, 171)))
IPV6_FORWARDING = Path("/proc/sys/net/ipv6/conf/all/forwarding")


class ClatError(Exception):
    pass


def prefix_of_synthesized(address: bytes) -> str | None:
    """RFC 7050 §3: the NAT64 prefix an AAAA of ipv4only.arpa was synthesized under (the
    well-known IPv4 address sits after it, at one of RFC 6052's lengths); None if none."""
    for length in sorted(PREFIX_LENGTHS, reverse=True):
        network = ipaddress.IPv6Network((address, length), strict=False)
        try:
            prefix = Nat64Prefix.parse(str(network))
        except ValueError:
            continue
        if prefix.extract(address) in WELL_KNOWN_IPV4:
            return str(network)
    return None


def discover_rfc7050() -> tuple[str | None, str]:
    """The PLAT prefix from the resolver's AAAA of ipv4only.arpa; (None, why) without one."""
    try:
        answers = socket.getaddrinfo(IPV4ONLY_NAME, None, socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError as exc:
        return None, (f"no AAAA for {IPV4ONLY_NAME} ({exc}): no DNS64 resolver answers here; "
                      "name the prefix (plat_prefix = \"64:ff9b::/96\") or use a DNS64 resolver")
    for *_rest, sockaddr in answers:
        found = prefix_of_synthesized(ipaddress.IPv6Address(sockaddr[0]).packed)
        if found:
            return found, f"found by RFC 7050 (the resolver's AAAA of {IPV4ONLY_NAME}: " \
                          f"{sockaddr[0]})"
    return None, (f"the AAAA of {IPV4ONLY_NAME} embeds neither 192.0.0.170 nor 192.0.0.171 "
                  "(RFC 7050 §3): name the prefix in plat_prefix")


def plat_prefix(settings: Settings) -> tuple[str | None, str]:
    """The PLAT prefix the CLAT translates to and how it was found."""
    if settings.clat_plat_prefix != "auto":
        return settings.clat_plat_prefix, "configured (plat_prefix)"
    return discover_rfc7050()


def _state_path(settings: Settings) -> Path:
    return Path(settings.run_dir) / STATE_FILE


def uplink_of(address6: str) -> str:
    """The interface this host reaches ``address6``'s neighbours by: the one holding a route
    to its /64 (the uplink the router solicits it on)."""
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=address6)[0]
        except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError subclasses
            raise ClatError(f"no route to {address6}: the CLAT's address must be in the "
                            "/64 of an interface with IPv6 (clat.ipv6_address)") from None
        oif = route.get_attr("RTA_OIF")
        return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))


def enable(settings: Settings) -> str:
    """Switch on what the CLAT's IPv6 address needs (module docstring); the uplink's name."""
    undo(settings)
    address6 = settings.clat_ipv6_address
    uplink = uplink_of(address6)
    changed: list[tuple[str, str]] = []
    wanted = [(IPV6_FORWARDING, "1"),
              (Path(f"/proc/sys/net/ipv6/conf/{uplink}/proxy_ndp"), "1")]
    accept_ra = Path(f"/proc/sys/net/ipv6/conf/{uplink}/accept_ra")
    if accept_ra.read_text().strip() == "1":
        wanted.append((accept_ra, "2"))  # forwarding on would make the kernel ignore RAs
    for path, value in wanted:
        old = path.read_text().strip()
        if old != value:
            changed.append((str(path), old))
    # Recorded before anything is made, so a failure half-way is undone like a crash.
    _state_path(settings).write_text(json.dumps({"paths": changed, "proxy": [address6, uplink]}))
    for path, value in wanted:
        Path(path).write_text(value)
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=uplink)[0]
        ipr.neigh("replace", dst=address6, ifindex=index, flags=0x08,  # NTF_PROXY
                  family=socket.AF_INET6)
    log.info("CLAT address %s answered for on %s (proxy NDP; IPv6 forwarding, proxy_ndp%s "
             "restored on stop)", address6, uplink,
             ", accept_ra 2" if any(p.endswith("accept_ra") for p, _ in changed) else "")
    return uplink


def undo(settings: Settings) -> None:
    """Restore what ``enable`` (of this run or a crashed earlier one) changed."""
    path = _state_path(settings)
    if not path.exists():
        return
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = {}
    proxy = state.get("proxy")
    if proxy:
        try:
            with IPRoute() as ipr:
                links = ipr.link_lookup(ifname=proxy[1])
                if links:
                    ipr.neigh("del", dst=proxy[0], ifindex=links[0], flags=0x08,
                              family=socket.AF_INET6)
        except Exception as exc:  # noqa: BLE001 - NetlinkError: gone already, or say it
            if "No such file" not in str(exc):
                log.warning("cannot remove the proxy neighbour entry %s on %s: %s", proxy[0],
                            proxy[1], exc)
    for path_text, old in state.get("paths", []):
        try:
            Path(path_text).write_text(old)
        except OSError as exc:
            log.warning("cannot restore %s to %s: %s", path_text, old, exc)
    path.unlink(missing_ok=True)
