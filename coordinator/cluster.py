"""Past one host (issue 20): a node announces its service addresses over BGP while it is healthy.

BIRD 2 (Debian ``bird2``) is the BGP speaker; ``bird_config`` writes its config. It announces
each ``[cluster] announce`` prefix as a static route through the node's anchor device
``<name>bgp``: a TUN device the coordinator holds, up while the node is ready (what /readyz
answers 200 for) and not draining, down otherwise (``announce_state`` decides), and gone with
the coordinator (a TUN device without persist dies with its last file descriptor). BIRD
follows the device over netlink and withdraws within milliseconds: nothing polls BIRD, and a
crashed sixgate is withdrawn as fast as a drained one. A node that dies whole, BIRD with it, is
dropped by its routers when the BGP hold time runs out.

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


def anchor_name(settings: Settings) -> str:
    """The anchor device's name (the gateway name is at most 10 characters)."""
    return f"{settings.name}bgp"


def bird_config(settings: Settings) -> str:
    """The node's ``bird.conf``: a static route per announced prefix through the anchor
    device, exported to each router over eBGP; nothing imported (the node routes nothing)."""
    anchor = anchor_name(settings)
    keepalive = max(1, settings.cluster_hold_time_s // 3)
    lines = [
        f"# Written by sixgate for gateway {settings.name!r} ({settings.source_file}):",
        "# the routes below are up only while sixgate holds its anchor device up.",
        f"router id {settings.cluster_router_id};",
        "protocol device { }",
        f"protocol static {STATIC_PROTOCOL} {{",
        "  ipv4;",
        *(f'  route {prefix} via "{anchor}";' for prefix in settings.cluster_announce),
        "}",
    ]
    for number, neighbor in enumerate(settings.cluster_neighbors, 1):
        lines += [
            f"protocol bgp router{number} {{",
            f"  local as {settings.cluster_local_as};",
            f"  neighbor {neighbor} as {settings.cluster_peer_as};",
            f"  hold time {settings.cluster_hold_time_s}; keepalive time {keepalive};",
            # After a failure (a hold time run out) BIRD would wait a minute or more before
            # it tries again; a node that is back should be back within seconds.
            "  connect retry time 5; error wait time 2, 30;",
            f'  ipv4 {{ import none; export where proto = "{STATIC_PROTOCOL}"; '
            "next hop self; };",
            "}",
        ]
    return "\n".join(lines) + "\n"


def announce_state(ready: bool, draining: bool, announced: bool, unready_s: float,
                   withdraw_after_s: float) -> bool:
    """Whether the node announces now: at once when it is ready and not draining; withdrawn
    at once when draining, else only after ``withdraw_after_s`` of not being ready (a worker
    that restarts in a second keeps its sessions: moving every flow would be worse)."""
    if draining:
        return False
    if ready:
        return True
    return announced and unready_s < withdraw_after_s


class Anchor:
    """The anchor device: created at the start (root), held open, set up or down."""

    def __init__(self, settings: Settings) -> None:
        self.name = anchor_name(settings)
        self.fd = open_tun(self.name)
        self.up = False

    def set(self, up: bool) -> None:
        if up == self.up:
            return
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)
            if not index:
                raise OSError(f"anchor device {self.name} is gone")
            ipr.link("set", index=index[0], state="up" if up else "down")
        self.up = up

    def close(self) -> None:
        """The device goes with its descriptor: BIRD withdraws."""
        try:
            os.close(self.fd)
        except OSError:
            pass

