"""Following the uplink's IPv4 address (issue 19, ``[tunnel] uplink``): a 6in4 endpoint whose
address changes (a new DHCP lease, a PPP reconnect) moves with it instead of going dark.

The kernel says when an address of the interface comes or goes (an rtnetlink socket joined
to RTMGRP_IPV4_IFADDR, which needs no privilege); ``follow`` decides, purely, whether the
tunnel must move and to which address. The coordinator then moves it (gateway.py
``_move_tunnel``): new settings, each worker started again on them with its shard (the crash
path, so every session goes on), the broker told (coordinator/broker.py).

Behind a 1:1 NAT the interface never shows the public address: a "what is my address"
service (``[tunnel] public_ipv4_url``) is asked instead (``ask_public_ipv4``; its answer read
by ``public_ipv4_in``), and a new answer moves the tunnel's public address the same way.

I/O shell: pyroute2's IPRoute, urllib. ``follow`` and ``public_ipv4_in`` are pure.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence

from pyroute2 import IPRoute

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RT_SCOPE_UNIVERSE = 0


def follow(current: str, addresses: Sequence[str]) -> str | None:
    """The address the tunnel moves to, or None: it stays. It stays while ``current`` is
    still one of the interface's addresses (an extra address is not a move) and while the
    interface has none (between two leases: nothing to move to yet); otherwise it takes the
    interface's primary address (the first the kernel lists)."""
    if current in addresses or not addresses:
        return None
    return addresses[0]


def public_ipv4_in(body: str) -> str | None:
    """The address a "what is my address" service answered (plain text, perhaps with more
    around it: the first dotted quad that is an IPv4 address), or None."""
    for candidate in re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", body[:4096]):
        try:
            return str(ipaddress.IPv4Address(candidate))
        except ValueError:
            continue
    return None


def ask_public_ipv4(url: str, timeout_s: float = 10.0) -> tuple[str | None, str]:
    """Ask the service once: (its answer or None, what happened, for the log)."""
    from sixgate.coordinator.metrics import sixgate_version
    request = urllib.request.Request(url, headers={"User-Agent":
                                                   f"sixgate/{sixgate_version()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            body = reply.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"{url} did not answer ({exc})"
    address = public_ipv4_in(body)
    return address, (f"{url} says {address}" if address else
                     f"{url} answered no IPv4 address ({body[:80]!r})")


def ipv4_addresses(ipr: IPRoute, ifname: str) -> list[str]:
    """The interface's global IPv4 addresses, primary first; [] when it has none or is gone."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return []
    found = []
    for message in ipr.get_addr(family=socket.AF_INET, index=index):
        if message["scope"] != RT_SCOPE_UNIVERSE:
            continue
        address = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
        if address and not ipaddress.IPv4Address(address).is_loopback:
            found.append(str(address))
    return found


class UplinkWatch:
    """The interface's IPv4 address changes, as the kernel announces them: a plain rtnetlink
    socket joined to the group (readable when any IPv4 address comes or goes; what changed is
    then read with pyroute2, so the announcements themselves are never parsed)."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                    NETLINK_ROUTE)
        self.events.bind((0, RTMGRP_IPV4_IFADDR))
        self.query = IPRoute()

    def fileno(self) -> int:
        return self.events.fileno()

    def drain(self) -> None:
        """Take the pending announcements (the caller then reads the addresses again); an
        overrun (ENOBUFS: more changes than the buffer held) is one more reason to."""
        while True:
            try:
                self.events.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def addresses(self) -> list[str]:
        return ipv4_addresses(self.query, self.ifname)

    def close(self) -> None:
        self.events.close()
        self.query.close()
