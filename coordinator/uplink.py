"""Following the uplink's IPv4 address (issue 19, ``[tunnel] uplink``): a 6in4 endpoint whose
address changes (a new DHCP lease, a PPP reconnect) moves with it instead of going dark.

The kernel says when an address of the interface comes or goes (an rtnetlink socket joined
to RTMGRP_IPV4_IFADDR, which needs no privilege); ``follow`` decides, purely, whether the
tunnel must move and to which address. The coordinator then moves it (gateway.py
``_move_tunnel``): new settings, each worker started again on them with its shard (the crash
path, so every session goes on), the broker told (coordinator/broker.py).

I/O shell: pyroute2's IPRoute. ``follow`` is pure.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
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
