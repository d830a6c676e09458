"""Past one host (issue 20): a node announces its service addresses over BGP while it is healthy.

BIRD 2 (Debian ``bird2``) is the BGP speaker; ``bird_config`` writes its config. It announces
each ``[cluster] announce`` prefix as a static route through the node's anchor device
``<name>bgp``: a TUN device the coordinator holds, up while the node is ready (what /readyz
answers 200 for) and not draining, down otherwise (``announce_state`` decides), and gone with
the coordinator (a TUN device without persist dies with its last file descriptor). BIRD
follows the device over netlink and withdraws within milliseconds: nothing polls BIRD, and a
crashed sixgate is withdrawn at once. A node that dies whole, BIRD with it, is dropped by its
routers when the BGP hold time runs out.

A drain does not withdraw at once: it moves the announcements to a second device, ``<name>drn``,
whose static routes carry the well-known GRACEFUL_SHUTDOWN community (65535:0, RFC 8326), so
the routers know the node is leaving while its connections still reach it: a router that
keeps such a path in its resilient next-hop group at the lowest weight (its active buckets
stay, its idle ones move, README "A fleet behind ECMP") sends the node no new flows and lets
its established ones end there. Once no packet came for drain_quiet_s the node stops and both
devices go: the last withdrawal moves nothing that is still in use.

The routers spread the announced addresses over the nodes with ECMP. Protocol 41 has no
ports: a router's layer-3 hash (Linux ``fib_multipath_hash_policy`` 0: source and
destination address) keeps each (relay or site, anycast address) pair on one node.
"""

from __future__ import annotations

import logging
import os

from pyroute2 import IPRoute

from sixgate.workers.engine.settings import Settings
from sixgate.workers.tun import open_tun

log = logging.getLogger("sixgate.cluster")

STATIC_PROTOCOL = "sixgate_announce"
DRAIN_PROTOCOL = "sixgate_drain"
GRACEFUL_SHUTDOWN = (65535, 0)  # RFC 8326 §4: the path is about to go away
# Announcement states (``announce_state``): the anchor up; the drain device up; neither.
ANNOUNCE, DRAIN, WITHDRAWN = "announce", "drain", "withdrawn"


def anchor_name(settings: Settings) -> str:
    """The anchor device's name (the gateway name is at most 10 characters)."""
    return f"{settings.name}bgp"


def drain_anchor_name(settings: Settings) -> str:
    """The device the announcements move to while the node drains."""
    return f"{settings.name}drn"


def _family(prefix: str) -> str:
    return "ipv6" if ":" in prefix else "ipv4"


def bird_config(settings: Settings) -> str:
    """The node's ``bird.conf``: a static route per announced prefix through the anchor
    device, exported to each router over eBGP; nothing imported (the node routes nothing).
    A BIRD static protocol has one channel: the IPv6 prefixes (a NAT64 prefix) get static
    protocols of their own, and each session carries the prefixes of its neighbor's family."""
    anchor, drain = anchor_name(settings), drain_anchor_name(settings)
    keepalive = max(1, settings.cluster_hold_time_s // 3)
    community = "({}, {})".format(*GRACEFUL_SHUTDOWN)
    lines = [
        f"# Written by sixgate for gateway {settings.name!r} ({settings.source_file}):",
        "# the routes below are up only while sixgate holds their device up; while it",
        "# drains, the second set's, with the GRACEFUL_SHUTDOWN community (RFC 8326).",
        f"router id {settings.cluster_router_id};",
        "protocol device { }",
    ]
    for family in ("ipv4", "ipv6"):
        prefixes = [p for p in settings.cluster_announce if _family(p) == family]
        if not prefixes:
            continue
        static, draining = static_protocols(family)
        lines += [
            f"protocol static {static} {{",
            f"  {family};",
            *(f'  route {prefix} via "{anchor}";' for prefix in prefixes),
            "}",
            f"protocol static {draining} {{",
            f"  {family} {{ preference 90; }};",  # below the static default 200: never chosen
            *(f'  route {prefix} via "{drain}" {{ bgp_community.add({community}); }};'
              for prefix in prefixes),
            "}",
        ]
    for number, neighbor in enumerate(settings.cluster_neighbors, 1):
        family = _family(neighbor)
        static, draining = static_protocols(family)
        lines += [
            f"protocol bgp router{number} {{",
            f"  local as {settings.cluster_local_as};",
            f"  neighbor {neighbor} as {settings.cluster_peer_as};",
            f"  hold time {settings.cluster_hold_time_s}; keepalive time {keepalive};",
            # After a failure (a hold time run out) BIRD would wait a minute or more before
            # it tries again; a node that is back should be back within seconds.
            "  connect retry time 5; error wait time 2, 30;",
            f'  {family} {{ import none; export where proto = "{static}" || '
            f'proto = "{draining}"; next hop self; }};',
            "}",
        ]
    return "\n".join(lines) + "\n"


def static_protocols(family: str) -> tuple[str, str]:
    """BIRD's static protocols of one address family: (announce, drain)."""
    suffix = "6" if family == "ipv6" else ""
    return STATIC_PROTOCOL + suffix, DRAIN_PROTOCOL + suffix


def announce_state(ready: bool, draining: bool, announced: bool, unready_s: float,
                   withdraw_after_s: float) -> str:
    """How the node announces now: ANNOUNCE at once when it is ready; DRAIN at once when it
    drains and is announced (a drain never announces a withdrawn node); WITHDRAWN only after
    ``withdraw_after_s`` of not being ready (a worker that restarts in a second keeps its
    sessions: moving every flow would be worse)."""
    if draining:
        return DRAIN if announced else WITHDRAWN
    if ready or (announced and unready_s < withdraw_after_s):
        return ANNOUNCE
    return WITHDRAWN


class Anchor:
    """The anchor device and the drain one: created at the start (root), held open, set up
    or down."""

    def __init__(self, settings: Settings) -> None:
        self.name = anchor_name(settings)
        self.drain_name = drain_anchor_name(settings)
        self.fd = open_tun(self.name)
        try:
            self.drain_fd = open_tun(self.drain_name)
        except OSError:
            os.close(self.fd)
            raise
        self.state = WITHDRAWN

    @property
    def up(self) -> bool:
        """Announced (also while draining)."""
        return self.state != WITHDRAWN

    def set(self, state: str) -> None:
        if state == self.state:
            return
        with IPRoute() as ipr:
            # The drain device first: the prefixes never leave BIRD's table between the two
            # (the anchor's routes win while both are up).
            for name, up in ((self.drain_name, state == DRAIN), (self.name, state == ANNOUNCE)):
                index = ipr.link_lookup(ifname=name)
                if not index:
                    raise OSError(f"anchor device {name} is gone")
                ipr.link("set", index=index[0], state="up" if up else "down")
        self.state = state

    def close(self) -> None:
        """The devices go with their descriptors: BIRD withdraws."""
        for fd in (self.fd, self.drain_fd):
            try:
                os.close(fd)
            except OSError:
                pass

