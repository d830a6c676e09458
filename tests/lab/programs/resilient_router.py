"""The cluster lab router's forwarding: BIRD's multipath route mirrored into a Linux resilient
next-hop group, so a node that leaves moves only its own flows.

    python resilient_router.py TABLE PREFIX GROUP READY_FILE ID=GATEWAY@DEV [ID=GATEWAY@DEV ...]

BIRD installs the route to PREFIX it learnt over BGP (one next hop per announcing node) into
kernel table TABLE. This program makes a next-hop object ID for each possible node, follows
table TABLE over rtnetlink (RTMGRP_IPV4_ROUTE: no polling) and, at each change, sets resilient
group GROUP (``ip nexthop ... type resilient``: fixed hash buckets; a member removed hands only
its own buckets to the others, a member added takes buckets only once they are idle) to the
nodes BIRD has, with PREFIX in the main table pointing at it. Exit on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

RTMGRP_IPV4_ROUTE = 0x40
BUCKETS = 64
IDLE_TIMER_S = 1


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


def sync(table: str, prefix: str, group: str, members: dict[str, str], now: set[str]) -> set[str]:
    """Point ``prefix`` at a resilient group of the members whose gateway BIRD has."""
    ids = sorted(member for member, gateway in members.items() if gateway in now)
    if not ids:
        ip("route", "del", prefix, check=False)
        ip("nexthop", "del", "id", group, check=False)
        return set()
    spec = ["group", "/".join(ids), "type", "resilient", "buckets", str(BUCKETS),
            "idle_timer", str(IDLE_TIMER_S)]
    ip("nexthop", "replace", "id", group, *spec)  # made if missing; kept buckets stay
    ip("route", "replace", prefix, "nhid", group)
    return set(ids)


def main(argv: list[str]) -> None:
    table, prefix, group, ready = argv[0], argv[1], argv[2], Path(argv[3])
    members: dict[str, str] = {}
    for spec in argv[4:]:
        member, _, hop = spec.partition("=")
        gateway, _, device = hop.partition("@")
        ip("nexthop", "replace", "id", member, "via", gateway, "dev", device)
        members[member] = gateway
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    events.bind((0, RTMGRP_IPV4_ROUTE))
    current = sync(table, prefix, group, members, learnt(table, prefix))
    ready.write_text("ready\n")
    while True:
        events.recv(65536)
        now = learnt(table, prefix)
        wanted = {member for member, gateway in members.items() if gateway in now}
        if wanted != current:
            current = sync(table, prefix, group, members, now)
            print(f"group {group}: {sorted(current)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
