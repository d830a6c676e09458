"""The cluster lab router's forwarding: BIRD's multipath route mirrored into a Linux resilient
next-hop group, so a node that leaves moves only its own flows, and a node that drains keeps
the flows it has.

    python resilient_router.py TABLE PREFIX GROUP READY_FILE BIRD_SOCKET ID=GATEWAY@DEV ...

BIRD installs the route to PREFIX it learnt over BGP (one next hop per announcing node) into
kernel table TABLE. This program makes a next-hop object ID for each possible node, follows
table TABLE over rtnetlink (RTMGRP_IPV4_ROUTE) and, at each change, sets resilient group GROUP
(``ip nexthop ... type resilient``: fixed hash buckets; a member removed hands only its own
buckets to the others, a member added or weighed more takes buckets only once they are idle)
to the nodes BIRD has, with PREFIX in the main table pointing at it. A path that carries the
GRACEFUL_SHUTDOWN community (65535:0, RFC 8326: the node drains) stays in the group at weight
1 against the others' 64: its idle buckets move to the others, its active ones stay until
idle, so its established connections end where they are. Communities do not change the kernel
route, so BIRD is also asked for them (``birdc show route all``) every POLL_S. Exit on SIGTERM.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

RTMGRP_IPV4_ROUTE = 0x40
BUCKETS = 64
IDLE_TIMER_S = 1
WEIGHT, DRAINING_WEIGHT = 64, 1
GRACEFUL_SHUTDOWN = "(65535,0)"
POLL_S = 0.25


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise SystemExit(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def learnt(table: str, prefix: str) -> set[str]:
    """The gateways of BIRD's route to ``prefix`` in ``table``."""
    done = subprocess.run(["ip", "-j", "route", "show", "table", table, prefix],
                          capture_output=True, text=True, check=False)
    # No table yet (BIRD has installed nothing in it; ip prints a "[" then): no route.
    routes = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []
    gateways = set()
    for route in routes:
        for hop in route.get("nexthops", [route]):
            if "gateway" in hop:
                gateways.add(hop["gateway"])
    return gateways


def draining(bird_socket: str, prefix: str) -> set[str]:
    """The gateways of BIRD's paths to ``prefix`` that carry GRACEFUL_SHUTDOWN."""
    done = subprocess.run(["birdc", "-r", "-s", bird_socket, "show", "route", "for", prefix,
                           "all"], capture_output=True, text=True, check=False)
    found, gateway = set(), None
    for line in done.stdout.splitlines():
        words = line.split()
        if "via" in words and words.index("via") + 1 < len(words):
            gateway = words[words.index("via") + 1]
        elif "BGP.community:" in line and gateway and GRACEFUL_SHUTDOWN in line.replace(" ", ""):
            found.add(gateway)
    return found


def weighed(members: dict[str, str], now: set[str], leaving: set[str]) -> dict[str, int]:
    """The members whose gateway BIRD has, each with its weight (a draining one the least)."""
    return {member: DRAINING_WEIGHT if gateway in leaving else WEIGHT
            for member, gateway in sorted(members.items()) if gateway in now}


def sync(prefix: str, group: str, weights: dict[str, int]) -> dict[str, int]:
    """Point ``prefix`` at a resilient group of ``weights``' members."""
    if not weights:
        ip("route", "del", prefix, check=False)
        ip("nexthop", "del", "id", group, check=False)
        return {}
    spec = ["group", "/".join(f"{member},{weight}" for member, weight in weights.items()),
            "type", "resilient", "buckets", str(BUCKETS), "idle_timer", str(IDLE_TIMER_S)]
    ip("nexthop", "replace", "id", group, *spec)  # made if missing; kept buckets stay
    ip("route", "replace", prefix, "nhid", group)
    return weights


def main(argv: list[str]) -> None:
    table, prefix, group, ready, bird_socket = argv[0], argv[1], argv[2], Path(argv[3]), argv[4]
    members: dict[str, str] = {}
    for spec in argv[5:]:
        member, _, hop = spec.partition("=")
        gateway, _, device = hop.partition("@")
        ip("nexthop", "replace", "id", member, "via", gateway, "dev", device)
        members[member] = gateway
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    events.bind((0, RTMGRP_IPV4_ROUTE))
    current = sync(prefix, group, weighed(members, learnt(table, prefix),
                                          draining(bird_socket, prefix)))
    ready.write_text("ready\n")
    while True:
        if select.select([events], [], [], POLL_S)[0]:
            events.recv(65536)
        wanted = weighed(members, learnt(table, prefix), draining(bird_socket, prefix))
        if wanted != current:
            current = sync(prefix, group, wanted)
            print(f"group {group}: {current}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
