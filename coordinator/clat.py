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

import hashlib
import ipaddress
import json
import logging
import select
import socket
import time
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


# --- RFC 8781: PREF64 in router advertisements, as the kernel hands them to userspace ----------

ND_OPT_PREF64 = 38
# Linux passes the RA options it does not act on itself (RDNSS, DNSSL, PREF64) to netlink
# listeners of this group as RTM_NEWNDUSEROPT (struct nduseroptmsg, then the options).
RTNLGRP_ND_USEROPT = 20
RTM_NEWNDUSEROPT = 68
NDUSEROPT_HEADER = 16
# RFC 8781 §4: Prefix Length Code -> prefix length.
PLC_LENGTHS = {0: 96, 1: 64, 2: 56, 3: 48, 4: 40, 5: 32}
# How long ``plat_prefix`` waits for an answer to its router solicitation.
PREF64_WAIT_S = 2.0
ICMPV6_ROUTER_SOLICITATION = 133


def parse_pref64(option: bytes) -> tuple[str, int] | None:
    """RFC 8781 §4: (prefix, lifetime in seconds) of one PREF64 option, or None when it is
    malformed (16 bytes: type 38, length 2, the scaled lifetime and the PLC in one 16-bit
    word, 96 bits of prefix; bits past the prefix length are ignored)."""
    if len(option) != 16 or option[0] != ND_OPT_PREF64 or option[1] != 2:
        return None
    word = int.from_bytes(option[2:4], "big")
    length = PLC_LENGTHS.get(word & 7)
    if length is None:
        return None
    network = ipaddress.IPv6Network((bytes(option[4:16]) + bytes(4), length), strict=False)
    return str(network), (word >> 3) * 8


def pref64_messages(data: bytes) -> list[tuple[int, str, int]]:
    """(interface index, prefix, lifetime) of every PREF64 option in a netlink datagram of
    RTM_NEWNDUSEROPT messages; anything else in it is skipped."""
    found = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = int.from_bytes(data[offset:offset + 4], "little"), \
            int.from_bytes(data[offset + 4:offset + 6], "little")
        if length < 16 or offset + length > len(data):
            break
        body = data[offset + 16:offset + length]
        offset += (length + 3) & ~3
        if kind != RTM_NEWNDUSEROPT or len(body) < NDUSEROPT_HEADER:
            continue
        opts_len = int.from_bytes(body[2:4], "little")
        ifindex = int.from_bytes(body[4:8], "little", signed=True)
        options = body[NDUSEROPT_HEADER:NDUSEROPT_HEADER + opts_len]
        at = 0
        while at + 2 <= len(options) and options[at + 1]:
            size = options[at + 1] * 8
            parsed = parse_pref64(options[at:at + size])
            if parsed is not None:
                found.append((ifindex, *parsed))
            at += size
    return found


class Pref64Listener:
    """The kernel's copies of RA options (rtnetlink RTNLGRP_ND_USEROPT), read non-blocking."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 1 << (RTNLGRP_ND_USEROPT - 1)))

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[tuple[int, str, int]]:
        found = []
        while True:
            try:
                found += pref64_messages(self.sock.recv(65536))
            except (BlockingIOError, InterruptedError):
                return found

    def close(self) -> None:
        self.sock.close()


def solicit_router(ifname: str) -> None:
    """A Router Solicitation on ``ifname`` (RFC 4861 §6.3.7), so a router answers with its RA
    now instead of at its next periodic one; best effort (it needs a raw socket)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                            socket.if_nametoindex(ifname))
            sock.sendto(bytes((ICMPV6_ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0)),
                        ("ff02::2", 0, 0, socket.if_nametoindex(ifname)))
    except OSError as exc:
        log.debug("no router solicitation on %s: %s", ifname, exc)


def discover_pref64(uplink: str, wait_s: float = PREF64_WAIT_S) -> tuple[str | None, str]:
    """The PLAT prefix from a router advertisement's PREF64 on ``uplink`` (RFC 8781), asked
    for with a router solicitation; (None, why) when none came within ``wait_s``."""
    index = socket.if_nametoindex(uplink)
    listener = Pref64Listener()
    try:
        solicit_router(uplink)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            select.select([listener], [], [], left)
            for ifindex, prefix, lifetime in listener.read():
                if ifindex == index and lifetime > 0:
                    return prefix, f"found by RFC 8781 (PREF64 in a router advertisement on " \
                                   f"{uplink})"
    finally:
        listener.close()
    return None, f"no router advertisement on {uplink} carried a PREF64 (RFC 8781)"


def plat_prefix(settings: Settings) -> tuple[str | None, str, str]:
    """(the PLAT prefix the CLAT translates to, its source for the metrics, how it was found
    in words). RFC 8781's PREF64 first (it comes with the network, RFC 8781 §1), then RFC
    7050's DNS64 query."""
    if settings.clat_plat_prefix != "auto":
        return settings.clat_plat_prefix, "configured", "configured (plat_prefix)"
    how = ""
    try:
        # Before the start picked it, an "auto" address lies on the IPv6 default route's
        # interface: that is where the router advertisements come.
        uplink = (uplink_of(settings.clat_ipv6_address) if settings.clat_ipv6_address != "auto"
                  else default_uplink())
    except ClatError as exc:
        uplink, how = "", str(exc)  # no IPv6 here: said beside the DNS64's answer
    if uplink:
        prefix, how = discover_pref64(uplink)
        if prefix is not None:
            return prefix, "rfc8781", how
    found, how7050 = discover_rfc7050()
    return found, "rfc7050", f"{how}; {how7050}" if found is None and how else how7050


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


# --- ipv6_address = "auto": an address of the uplink's /64, checked by the kernel's DAD -------

# A global IPv6 destination: the route to it names the uplink (a lookup; nothing is sent).
SOME_IPV6 = "2001:db8::1"
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IFA_F_TEMPORARY = 0x01
DAD_ATTEMPTS = 3
DAD_WAIT_S = 5.0


def candidate_address(prefix64: ipaddress.IPv6Network, name: str, attempt: int) -> str:
    """The ``attempt``-th address sixgate would pick in ``prefix64``: a stable interface
    identifier from the gateway's name and the prefix (RFC 7217's idea: the same network gives
    the same address, so the NAT64's sessions survive a restart), another one per attempt."""
    seed = hashlib.sha256(f"sixgate-clat {name} {prefix64} {attempt}".encode()).digest()
    return str(prefix64[int.from_bytes(seed[:8], "big")])


def default_uplink() -> str:
    """The interface of this host's IPv6 default route; ClatError when there is none."""
    with IPRoute() as ipr:
        return _uplink_prefix(ipr)[1]


def _uplink_prefix(ipr: IPRoute) -> tuple[int, str, ipaddress.IPv6Network]:
    """(index, name, /64) of the interface this host's IPv6 default route leaves by."""
    try:
        route = ipr.route("get", dst=SOME_IPV6)[0]
    except Exception:  # noqa: BLE001 - pyroute2 raises NetlinkError subclasses
        raise ClatError("this host has no IPv6 default route: a CLAT needs IPv6 to reach the "
                        "NAT64; configure IPv6 (or name clat.ipv6_address)") from None
    index = route.get_attr("RTA_OIF")
    name = str(ipr.get_links(index)[0].get_attr("IFLA_IFNAME"))
    source = route.get_attr("RTA_PREFSRC")
    if source:  # the address the kernel itself sends from (RFC 6724): its /64
        return index, name, ipaddress.IPv6Network(f"{source}/64", strict=False)
    for entry in ipr.get_addr(family=socket.AF_INET6, index=index):
        address = ipaddress.IPv6Address(entry.get_attr("IFA_ADDRESS"))
        flags = entry.get_attr("IFA_FLAGS") or entry["flags"]
        usable = not (address.is_link_local or address.is_loopback or address.is_multicast)
        if entry["prefixlen"] == 64 and usable and not flags & IFA_F_TEMPORARY:
            return index, name, ipaddress.IPv6Network(f"{address}/64", strict=False)
    raise ClatError(f"{name} (the IPv6 default route's interface) has no /64 address to pick "
                    "the CLAT's address in; name clat.ipv6_address")


def _dad_passes(ipr: IPRoute, index: int, address: str) -> bool:
    """RFC 4862 §5.4 by the kernel: the address is put on the uplink (not optimistic), and
    whether its duplicate address detection passed; it is removed again either way."""
    ipr.addr("add", index=index, address=address, prefixlen=128)
    try:
        deadline = time.monotonic() + DAD_WAIT_S
        while time.monotonic() < deadline:
            entries = [e for e in ipr.get_addr(family=socket.AF_INET6, index=index)
                       if e.get_attr("IFA_ADDRESS") == address]
            flags = (entries[0].get_attr("IFA_FLAGS") or entries[0]["flags"]) if entries else 0
            if not entries or flags & IFA_F_DADFAILED:
                return False
            if not flags & IFA_F_TENTATIVE:
                return True
            time.sleep(0.1)
        return False
    finally:
        try:
            ipr.addr("del", index=index, address=address, prefixlen=128)
        except Exception:  # noqa: BLE001 - gone with a failed DAD already
            pass


def pick_ipv6_address(name: str) -> tuple[str, str]:
    """``ipv6_address = "auto"``: (an address of the uplink's /64 nobody else uses, how it was
    picked). From then on sixgate defends it with proxy neighbour answers (``enable``)."""
    with IPRoute() as ipr:
        index, uplink, prefix64 = _uplink_prefix(ipr)
        for attempt in range(DAD_ATTEMPTS):
            candidate = candidate_address(prefix64, name, attempt)
            if _dad_passes(ipr, index, candidate):
                return candidate, (f"picked in {uplink}'s {prefix64}, duplicate address "
                                   f"detection passed (attempt {attempt + 1})")
            log.warning("CLAT address %s is in use on %s (duplicate address detection "
                        "failed): picking another", candidate, uplink)
    raise ClatError(f"{DAD_ATTEMPTS} addresses picked in {prefix64} were all in use on "
                    f"{uplink}; name clat.ipv6_address")


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
