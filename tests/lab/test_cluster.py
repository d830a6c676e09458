"""Issue 20: a fleet of three sixgate nodes behind ECMP, with real BGP (BIRD 2 on every node and
on the router), health-gated announcements and drains.

Namespaces: a router (BIRD, eBGP to each node; the multipath route it learns is mirrored into
a Linux resilient next-hop group, programs/resilient_router.py, layer-3 hash), three nodes
(each: the 6to4 anycast address 192.0.2.10 on lo, ``sixgate run`` with [cluster], its BIRD
from ``sixgate cluster bird-config``, an HTTP service that names the node) and a client side
of 16 independent 6to4 sites (tunnel_peer.py, one per IPv4 address, policy-routed by source).
Protocol 41 has no ports, so the router's layer-3 hash keeps each site on one node.

Assert: every node carries traffic; a sixgate killed with SIGKILL is withdrawn at once (its
anchor device dies with it) and every site's new connections succeed on the others while a
connection held on a surviving node goes on, and no site of a surviving node moves (the
resilient group: with a plain multipath route, hash-threshold, removing the first node moved
sites between the others); ``sixgate drain`` lowers a node to the least weight (RFC 8326's
community), its running download finishes there, new connections succeed, and the node stops
and is withdrawn; a node frozen whole is dropped within the BGP hold time. Failover time
and connections lost per event are printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netlab
import pytest
import sshd
from netlab import LAB_DIR

pytestmark = [pytest.mark.lab, pytest.mark.cluster]

ANYCAST_IPV4 = "192.0.2.10"  # every node's 6to4 address: 2002:c000:20a::/48
ANYCAST_IPV6 = "2002:c000:20a::1"
ROUTER_AS, NODE_AS = 65000, 65001
NODES = ("n1", "n2", "n3")
SITES = 16  # P(a node gets no site) = 3 * (2/3)^16, about 1 in 2000
HOLD_TIME_S = 3
GROUP_ID = 100  # the router's resilient next-hop group
# A service behind the router (in its namespace), forwarded to by every node: its answers to a
# node's pool address reach that node by the pool route the node announces (announce_pool).
REMOTE_SERVICE = "203.0.113.1:8081"
REMOTE_PORT = 81
# An IPv6 prefix every node announces too, as a fleet of NAT64s announces its prefix: over a
# session of its own per node (IPv6 link addresses), next to the IPv4 one.
ANYCAST_PREFIX6 = "2001:db8:64::/96"


def link_addresses(number: int) -> tuple[str, str]:
    """(router, node) on the /30 to node ``number`` (1-3) inside 198.51.100.0/24."""
    base = 4 * (number - 1)
    return f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"


def link_addresses6(number: int) -> tuple[str, str]:
    """(router, node) IPv6 addresses on the link to node ``number``."""
    return f"2001:db8:ff:{number}::1", f"2001:db8:ff:{number}::2"


def site_ipv4(i: int) -> str:
    return f"203.0.113.{10 + i}"


def site_ipv6(i: int) -> str:
    """RFC 3056 §2: 2002:<203.0.113.(10+i)>::1."""
    return f"2002:cb00:71{10 + i:02x}::1"


ROUTER_BIRD = """\
router id 198.51.100.1;
protocol device { }
protocol kernel { kernel table 100; ipv4 { export all; }; merge paths on; }
""" + "".join(f"""\
protocol bgp {node} {{
  local {link_addresses(n)[0]} as {ROUTER_AS};
  neighbor {link_addresses(n)[1]} as {NODE_AS};
  hold time {HOLD_TIME_S}; keepalive time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export none; }};
}}
protocol bgp {node}_6 {{
  local {link_addresses6(n)[0]} as {ROUTER_AS};
  neighbor {link_addresses6(n)[1]} as {NODE_AS};
  hold time {HOLD_TIME_S}; keepalive time 1; connect retry time 1; error wait time 1, 5;
  ipv6 {{ import all; export none; }};
}}
""" for n, node in enumerate(NODES, 1))


def node_pool(number: int) -> str:
    """Node ``number``'s own pool (announced: a service behind the router answers it there)."""
    return f"100.64.{number}.0/24"


def install_root(tmp: Path, node: str) -> Path:
    """Where ``sixgate deploy`` installs on ``node`` (the rollout test): the lab's gateway
    and BIRD use the paths a deployed one would, so a rollout takes them over."""
    return tmp / node / "root"


def run_dir(tmp: Path, node: str) -> Path:
    return install_root(tmp, node) / "run" / "sixgate"


def bird_conf(tmp: Path, node: str) -> Path:
    return install_root(tmp, node) / "etc" / "sixgate" / "bird.conf"


def node_config(node: str, number: int, tmp: Path) -> str:
    return f"""\
[tunnel]
mode = "6to4"
local_ipv4 = "{ANYCAST_IPV4}"
relay_ipv4 = "192.88.99.1"

[gateway]
workers = 1
run_dir = "{run_dir(tmp, node)}"
name = "sgc{number}"
pool = "{node_pool(number)}"

[cluster]
announce = ["{ANYCAST_IPV4}/32", "{ANYCAST_PREFIX6}"]
announce_pool = true
local_as = {NODE_AS}
peer_as = {ROUTER_AS}
neighbors = ["{link_addresses(number)[0]}", "{link_addresses6(number)[0]}"]
router_id = "{link_addresses(number)[1]}"
hold_time_s = {HOLD_TIME_S}
withdraw_after_s = 10
drain_quiet_s = 5
drain_timeout_s = 20

[[forward]]
proto = "tcp"
port = 80
to = "127.0.0.1:8080"

[[forward]]
proto = "tcp"
port = {REMOTE_PORT}
to = "{REMOTE_SERVICE}"
"""


class Fleet:
    """The namespaces, links and processes; everything is removed at the end."""

    def __init__(self) -> None:
        tag = netlab.next_tag()
        self.tag = tag
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.tmp.chmod(0o755)
        self.cleanup = contextlib.ExitStack()
        self.cleanup.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.router = f"{tag}-rt"
        self.clients = f"{tag}-cl"
        self.nodes = {node: f"{tag}-{node}" for node in NODES}

    def ns(self, name: str) -> None:
        netlab.run(["ip", "netns", "add", name])
        self.cleanup.callback(netlab.delete_namespace, name)
        netlab.run(["ip", "-n", name, "link", "set", "lo", "up"])

    def ip(self, namespace: str, *args: str) -> None:
        netlab.run(["ip", "-n", namespace, *args])

    def spawn(self, key: str, namespace: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with (self.tmp / f"{key}.out").open("wb") as out, \
                (self.tmp / f"{key}.err").open("wb") as err:
            process = subprocess.Popen(netlab.in_ns(namespace, argv), stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, cwd=netlab.REPO_ROOT, env=env)
        self.processes[key] = process
        self.spawned.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.spawned:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for process in reversed(self.spawned):
            netlab.stop_process(process, 5)

    def exec_in(self, namespace: str, argv: list[str], timeout: float = 30
                ) -> subprocess.CompletedProcess[str]:
        return netlab.run(netlab.in_ns(namespace, argv), timeout=timeout, check=False)

    def build(self) -> None:
        for name in (self.router, self.clients, *self.nodes.values()):
            self.ns(name)
        netlab.run(["ip", "netns", "exec", self.router, "sysctl", "-qw",
                    "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=0",
                    "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0"])
        for number, (node, namespace) in enumerate(self.nodes.items(), 1):
            router_side, node_side = link_addresses(number)
            self.ip(self.router, "link", "add", node, "type", "veth", "peer", "name", "eth0",
                    "netns", namespace)
            self.ip(self.router, "addr", "add", f"{router_side}/30", "dev", node)
            self.ip(self.router, "link", "set", node, "up")
            netlab.run(["ip", "netns", "exec", namespace, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"])
            self.ip(namespace, "addr", "add", f"{node_side}/30", "dev", "eth0")
            # IPv6 on the link only (the BGP session of the IPv6 prefix): BIRD's static
            # routes through the anchor devices need none on them.
            netlab.run(["ip", "netns", "exec", namespace, "sysctl", "-qw",
                        "net.ipv6.conf.eth0.disable_ipv6=0"])
            self.ip(namespace, "addr", "add", f"{link_addresses6(number)[1]}/64", "dev",
                    "eth0", "nodad")
            self.ip(self.router, "addr", "add", f"{link_addresses6(number)[0]}/64", "dev",
                    node, "nodad")
            self.ip(namespace, "link", "set", "eth0", "up")
            self.ip(namespace, "addr", "add", f"{ANYCAST_IPV4}/32", "dev", "lo")
            self.ip(namespace, "route", "add", "default", "via", router_side)
            site = self.tmp / node / "www"
            site.mkdir(parents=True)
            (site / "node.txt").write_text(node)
            run_dir(self.tmp, node).mkdir(parents=True)
            bird_conf(self.tmp, node).parent.mkdir(parents=True)
            (self.tmp / node).chmod(0o755)
            self.spawn(f"http-{node}", namespace,
                       netlab.http_server_argv("127.0.0.1", 8080, site))
        self.ip(self.router, "link", "add", "cl", "type", "veth", "peer", "name", "eth0",
                "netns", self.clients)
        self.ip(self.router, "addr", "add", "203.0.113.1/24", "dev", "cl")
        self.ip(self.router, "link", "set", "cl", "up")
        self.ip(self.clients, "link", "set", "eth0", "up")
        netlab.run(["ip", "netns", "exec", self.clients, "sysctl", "-qw",
                    "net.ipv6.conf.all.disable_ipv6=0"])
        for i in range(SITES):
            self.ip(self.clients, "addr", "add", f"{site_ipv4(i)}/24", "dev", "eth0")
        self.ip(self.clients, "route", "add", "192.0.2.0/24", "via", "203.0.113.1")
        # The nodes' pools, learnt over BGP into table 100, are routed by it.
        self.ip(self.router, "rule", "add", "to", "100.64.0.0/16", "lookup", "100",
                "priority", "100")
        remote = self.tmp / "remote"
        remote.mkdir()
        (remote / "remote.txt").write_text("behind the router")
        address, port = REMOTE_SERVICE.split(":")
        self.spawn("http-remote", self.router, netlab.http_server_argv(address, int(port),
                                                                       remote))
        (self.tmp / "router.conf").write_text(ROUTER_BIRD)
        self.bird("router", self.router, self.tmp / "router.conf")
        # BIRD's multipath route (table 100) mirrored into a resilient next-hop group.
        ready = self.tmp / "resilient.ready"
        self.spawn("resilient", self.router, [
            sys.executable, str(netlab.PROGRAMS / "resilient_router.py"), "100",
            f"{ANYCAST_IPV4}/32", str(GROUP_ID), str(ready), str(self.tmp / "router.ctl"),
            *(f"{n}={link_addresses(n)[1]}@{node}" for n, node in enumerate(NODES, 1))])
        netlab.wait_until(ready.exists, timeout=10, what="the router's resilient group")
        for i in range(SITES):
            self.start_site(i)
        for number, node in enumerate(NODES, 1):
            config = self.config(node)
            config.write_text(node_config(node, number, self.tmp))
            done = self.exec_in(self.nodes[node], [*netlab.sixgate_command(), "cluster",
                                                   "bird-config", "--config", str(config)])
            assert done.returncode == 0, done.stderr
            bird_conf(self.tmp, node).write_text(done.stdout)
            self.bird(node, self.nodes[node], bird_conf(self.tmp, node))
            self.start_gateway(node)

    def config(self, node: str) -> Path:
        return self.tmp / node / "sixgate.toml"

    def bird(self, key: str, namespace: str, config: Path) -> None:
        socket_path = self.tmp / f"{key}.ctl"
        self.spawn(f"bird-{key}", namespace, ["bird", "-f", "-c", str(config), "-s",
                                              str(socket_path)])
        netlab.wait_until(lambda: socket_path.exists(), timeout=10, what=f"BIRD of {key}")

    def start_site(self, i: int) -> None:
        """A 6to4 site: tunnel_peer.py on its own TUN, its /48 routed by source."""
        tun = f"tun{i}"
        ready = self.tmp / f"site{i}.ready"
        self.spawn(f"site{i}", self.clients, [
            sys.executable, str(LAB_DIR / "tunnel_peer.py"), "--tun", tun, "--mode", "6to4",
            "--local", site_ipv4(i), "--ready-file", str(ready)])
        netlab.wait_until(ready.exists, timeout=15, what=f"site {i}'s tunnel_peer.py")
        self.ip(self.clients, "link", "set", tun, "mtu", "1480", "up")
        self.ip(self.clients, "addr", "add", f"{site_ipv6(i)}/48", "dev", tun, "nodad")
        self.ip(self.clients, "-6", "rule", "add", "from", f"{site_ipv6(i)[:-1]}/48",
                "table", str(100 + i))
        self.ip(self.clients, "-6", "route", "add", "2002::/16", "dev", tun, "table",
                str(100 + i))

    def start_gateway(self, node: str) -> None:
        key = f"sixgate-{node}-{time.monotonic_ns()}"
        self.spawn(key, self.nodes[node], [*netlab.sixgate_command(), "run", "--config",
                                           str(self.config(node))])
        self.processes[f"sixgate-{node}"] = self.processes[key]
        netlab.wait_until(lambda: node in self.next_hops(), timeout=30,
                          what=f"{node} announced at the router")
        # A member that comes back takes buckets only as they go idle: wait for its share,
        # so that no later check sees sites move onto it.
        netlab.wait_until(self.balanced, timeout=30, what="the router's buckets balanced")

    def balanced(self) -> bool:
        """Every member of the router's group holds its weight's share of the buckets."""
        weights = self.weights()
        out = netlab.run(["ip", "-n", self.router, "-j", "nexthop", "bucket", "show", "id",
                          str(GROUP_ID)], check=False).stdout
        held: dict[int, int] = {}
        for bucket in json.loads(out) if out.strip() else []:
            nhid = bucket.get("bucket", {}).get("nhid")
            held[nhid] = held.get(nhid, 0) + 1
        total = sum(weights.values())
        return bool(total) and all(
            abs(held.get(NODES.index(node) + 1, 0) - 64 * weight / total) <= 1
            for node, weight in weights.items())

    def ipv6_paths(self) -> dict[str, str]:
        """The router's BGP paths to the IPv6 prefix: node -> "announce", or "drain" when
        the path carries RFC 8326's GRACEFUL_SHUTDOWN community."""
        out = netlab.run(["birdc", "-r", "-s", str(self.tmp / "router.ctl"), "show", "route",
                          "for", ANYCAST_PREFIX6, "all"], check=False).stdout
        paths: dict[str, str] = {}
        node = ""
        for line in out.splitlines():
            found = re.search(r"\[(n\d)_6 ", line)
            if found:
                node = found.group(1)
                paths[node] = "announce"
            elif node and "BGP.community" in line and "(65535,0)" in line:
                paths[node] = "drain"
        return paths

    def next_hops(self) -> set[str]:
        """The nodes the router forwards the anycast address to now (its resilient group)."""
        return set(self.weights())

    def weights(self) -> dict[str, int]:
        """Each node's weight in the router's resilient group now."""
        route = netlab.run(["ip", "-n", self.router, "route", "show",
                            f"{ANYCAST_IPV4}/32"]).stdout
        if f"nhid {GROUP_ID}" not in route:
            return {}
        out = netlab.run(["ip", "-n", self.router, "-j", "nexthop", "show", "id",
                          str(GROUP_ID)], check=False).stdout
        groups = json.loads(out) if out.strip() else []
        return {NODES[member["id"] - 1]: int(member.get("weight", 1))
                for group in groups for member in group.get("group", [])}

    def fetch(self, site: int, timeout: float = 5) -> str:
        """The node that served site ``site``'s request ("" if it failed)."""
        done = self.exec_in(self.clients, [
            "curl", "-6", "-g", "-sS", "--max-time", str(timeout), "--interface",
            site_ipv6(site), f"http://[{ANYCAST_IPV6}]/node.txt"], timeout=timeout + 5)
        return done.stdout.strip() if done.returncode == 0 else ""

    def served_by(self) -> dict[int, str]:
        return {i: self.fetch(i) for i in range(SITES)}

    def diagnostics(self) -> str:
        return "\n".join(f"--- {path.name}\n{netlab.tail(path, 2000)}"
                         for path in sorted(self.tmp.glob("*.err")) if path.stat().st_size)


@pytest.fixture(scope="module")
def fleet(served_files: netlab.ServedFiles) -> Iterator[Fleet]:
    missing = [program for program in ("bird", "birdc") if shutil.which(program) is None]
    if missing:
        reason = f"CLUSTER LAB CANNOT RUN: {', '.join(missing)} missing (Debian bird2)"
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    built = Fleet()
    with built.cleanup:
        try:
            built.build()
        except BaseException:
            print(built.diagnostics())
            raise
        finally:
            # Runs first: every process told to stop at once, then each waited for (about 25),
            # before the namespaces go (which kills whatever is left in them).
            built.cleanup.callback(built.stop_all)
        yield built


def test_the_nodes_bird_config_is_what_bird_accepts(fleet: Fleet) -> None:
    done = fleet.exec_in(fleet.nodes["n1"], ["bird", "-p", "-c",
                                             str(bird_conf(fleet.tmp, "n1"))])
    assert done.returncode == 0, done.stderr
    check = fleet.exec_in(fleet.nodes["n1"], [*netlab.sixgate_command(), "check", "--config",
                                              str(fleet.config("n1"))])
    assert check.returncode == 0, check.stderr
    assert (f"cluster       BIRD announces {ANYCAST_IPV4}/32, {ANYCAST_PREFIX6}, {node_pool(1)} "
            "through sgc1bgp while this node is ready") in check.stdout, check.stdout


def test_every_node_carries_traffic(fleet: Fleet) -> None:
    assert fleet.next_hops() == set(NODES)
    # The IPv6 prefix too, from every node over its IPv6 session.
    netlab.wait_until(lambda: fleet.ipv6_paths() == dict.fromkeys(NODES, "announce"),
                      timeout=15, what=lambda: f"the IPv6 prefix from every node: "
                                               f"{fleet.ipv6_paths()}")
    served = fleet.served_by()
    assert "" not in served.values(), (served, fleet.diagnostics())
    assert set(served.values()) == set(NODES), served
    # Protocol 41 has no ports: the router's layer-3 hash keeps a site on its node.
    assert fleet.served_by() == served
    for node, namespace in fleet.nodes.items():
        body = fleet.exec_in(namespace, ["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        assert f'sixgate_cluster_announced{{prefix="{ANYCAST_IPV4}/32"}} 1.0' in body, node
        assert f'sixgate_cluster_announced{{prefix="{ANYCAST_PREFIX6}"}} 1.0' in body, node


def test_a_service_behind_the_router_answers_the_node_that_owns_the_pool_address(
        fleet: Fleet) -> None:
    """announce_pool: each node announces its own pool; every site's request to the service
    behind the router (forwarded by whichever node the site reaches) is answered back to
    that node: the service saw each node's pool addresses, and the router has a route to
    each pool through its node."""
    served = fleet.served_by()
    for site in range(SITES):
        done = fleet.exec_in(fleet.clients, [
            "curl", "-6", "-g", "-sS", "--max-time", "5", "--interface", site_ipv6(site),
            f"http://[{ANYCAST_IPV6}]:{REMOTE_PORT}/remote.txt"], timeout=10)
        assert done.stdout == "behind the router", (site, done.stderr, fleet.diagnostics())
    seen = {line.split()[0] for line in (fleet.tmp / "http-remote.err").read_text().splitlines()
            if "GET /remote.txt" in line}
    pools = {node: node_pool(NODES.index(node) + 1) for node in NODES}
    assert {node for node in NODES for address in seen
            if ipaddress.IPv4Address(address) in ipaddress.IPv4Network(pools[node])} == set(
        served.values()), (seen, served)
    routes = netlab.run(["ip", "-n", fleet.router, "route", "show", "table", "100"]).stdout
    for number in range(1, len(NODES) + 1):
        assert re.search(rf"^{re.escape(node_pool(number))} via "
                         rf"{re.escape(link_addresses(number)[1])}\b", routes,
                         re.MULTILINE), routes


# A steady download: a small receive buffer read at a fixed pace, so the client's window
# updates reach the node every few milliseconds (curl's --limit-rate lets the window close for
# seconds, and a bucket with no packet for the router's idle timer moves). Prints the sha256.
STEADY = """
import hashlib, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
s.bind((sys.argv[2], 0))
s.settimeout(10)
s.connect((sys.argv[1], 80))
s.sendall(b"GET /big.bin HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(8192):
    data += chunk
    time.sleep(0.01)
print(hashlib.sha256(data.split(b"\\r\\n\\r\\n", 1)[1]).hexdigest(), flush=True)
"""


HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 80), timeout=5, source_address=(sys.argv[2], 0))
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET /node.txt HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().rsplit("\\n", 1)[-1], flush=True)
"""


def test_a_killed_sixgate_is_withdrawn_at_once_and_the_others_take_its_sites(
        fleet: Fleet) -> None:
    served = fleet.served_by()
    victim = "n2"
    kept_site = next(i for i, node in served.items() if node != victim)
    hold = subprocess.Popen(netlab.in_ns(fleet.clients, [
        sys.executable, "-c", HOLD, ANYCAST_IPV6, site_ipv6(kept_site)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout is not None and hold.stdin is not None
        assert hold.stdout.readline().strip() == "connected"
        killed_at = time.monotonic()
        os.kill(fleet.processes[f"sixgate-{victim}"].pid, signal.SIGKILL)
        netlab.wait_until(lambda: victim not in fleet.next_hops(), timeout=HOLD_TIME_S + 5,
                          what=f"{victim} withdrawn")
        failover_s = time.monotonic() - killed_at
        after = fleet.served_by()
        lost = [i for i, node in after.items() if not node]
        print(f"\ncluster: sixgate of {victim} killed: withdrawn in {failover_s * 1000:.0f} ms; "
              f"connections lost after it: {len(lost)} of {SITES}")
        assert not lost, (after, fleet.diagnostics())
        assert victim not in after.values()
        netlab.wait_until(lambda: victim not in fleet.ipv6_paths(), timeout=5,
                          what=f"{victim}'s IPv6 path withdrawn")
        # Only the victim's sites move (resilient next-hop group on the router).
        stayed = {i: node for i, node in served.items() if node != victim}
        assert {i: after[i] for i in stayed} == stayed, (served, after)
        # A connection held on a surviving node goes on.
        hold.stdin.write("go\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == served[kept_site]
    finally:
        if hold.poll() is None:
            netlab.stop_process(hold, 5)
        fleet.start_gateway(victim)  # back for the next tests
    assert fleet.next_hops() == set(NODES)


def test_a_drain_keeps_the_nodes_connections_then_it_stops(fleet: Fleet) -> None:
    """``sixgate drain``: the node announces with RFC 8326's GRACEFUL_SHUTDOWN community at
    once, and the router keeps it in its group at the lowest weight (its active buckets stay,
    its idle ones go to the others). A download through the drained node that runs across
    the drain arrives whole (no connection reset), every site's new connections succeed
    meanwhile; once the node's traffic has been quiet for drain_quiet_s (5 s here) it
    stops by itself, exit code 0, and is withdrawn."""
    node = "n3"
    gateway = fleet.processes[f"sixgate-{node}"]
    site = next(i for i, served in fleet.served_by().items() if served == node)
    payload = os.urandom(6 << 20)  # ~8 s at STEADY's pace: longer than the drain's start
    (fleet.tmp / node / "www" / "big.bin").write_bytes(payload)
    download = subprocess.Popen(netlab.in_ns(fleet.clients, [
        sys.executable, "-c", STEADY, ANYCAST_IPV6, site_ipv6(site)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    drain: subprocess.Popen[str] | None = None
    finished = False
    try:
        time.sleep(1)
        started = time.monotonic()
        drain = subprocess.Popen(netlab.in_ns(fleet.nodes[node], [
            *netlab.sixgate_command(), "drain", "--config", str(fleet.config(node))]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        netlab.wait_until(lambda: fleet.weights().get(node) == 1, timeout=10,
                          what=f"{node} at the lowest weight at the router")
        lowered_s = time.monotonic() - started
        assert download.poll() is None, "the download ended before the drain began"
        # The IPv6 prefix drains the same way: still announced, with the community.
        netlab.wait_until(lambda: fleet.ipv6_paths().get(node) == "drain", timeout=5,
                          what=lambda: f"{node}'s IPv6 path with GRACEFUL_SHUTDOWN: "
                                       f"{fleet.ipv6_paths()}")
        during: dict[int, Any] = fleet.served_by()
        assert gateway.poll() is None and node in fleet.next_hops(), \
            "the drained node left while its download ran"
        # Its metrics: still announced, draining, and how long it has been quiet (the drain's
        # progress), which grows once the download is over.
        metrics: list[str] = []

        def quiet_for_a_second() -> bool:
            metrics[:] = [fleet.exec_in(fleet.nodes[node], [
                "curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout]
            found = re.search(r"^sixgate_cluster_drain_quiet_seconds (\S+)$", metrics[0],
                              re.MULTILINE)
            return found is not None and float(found.group(1)) >= 1.0

        netlab.wait_until(quiet_for_a_second, timeout=30, what="the drain's quiet time")
        assert f'sixgate_cluster_announced{{prefix="{ANYCAST_IPV4}/32"}} 1.0' in metrics[0]
        assert "sixgate_cluster_draining 1.0" in metrics[0]
        stdout, stderr = drain.communicate(timeout=60)
        fetched, failed = download.communicate(timeout=60)
        finished = True
    finally:
        for process in (download, drain):
            if process is not None and process.poll() is None:
                netlab.stop_process(process, 5)
        if not finished and gateway.poll() is None:
            # A failed test leaves no draining node to the next ones: stopped, started again.
            netlab.stop_process(gateway, 10)
            fleet.start_gateway(node)
    assert drain.returncode == 0, stdout + stderr
    assert "GRACEFUL_SHUTDOWN" in stdout and "stopped" in stdout, stdout
    assert gateway.wait(timeout=10) == 0
    assert download.returncode == 0, failed + fleet.diagnostics()
    assert fetched.split()[0] == hashlib.sha256(payload).hexdigest(), "the download broke"
    lost = [i for i, served in during.items() if not served]
    print(f"\ncluster: drain of {node}: at the lowest weight in {lowered_s * 1000:.0f} ms, "
          f"stopped after {time.monotonic() - started:.1f} s; its download across the drain "
          f"whole; new connections lost meanwhile: {len(lost)} of {SITES}")
    assert not lost, during
    netlab.wait_until(lambda: node not in fleet.next_hops() and node not in fleet.ipv6_paths(),
                      timeout=5, what=f"{node} withdrawn once stopped")
    fleet.start_gateway(node)
    assert fleet.next_hops() == set(NODES)


def test_a_node_that_freezes_whole_is_dropped_within_the_hold_time(fleet: Fleet) -> None:
    """A hung host: every process of node n1 (BIRD too) stopped with SIGSTOP. Its BGP session
    stays open but sends no keepalive; the router drops the node when the hold time (3 s)
    runs out, and every site's new connection succeeds on the other two. SIGCONT brings it
    back."""
    node = "n1"
    served = fleet.served_by()
    frozen = netlab.namespace_pids(fleet.nodes[node])
    assert frozen
    started = time.monotonic()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        netlab.wait_until(lambda: node not in fleet.next_hops(), timeout=HOLD_TIME_S + 5,
                          what=f"{node} dropped by the router")
        failover_s = time.monotonic() - started
        after = fleet.served_by()
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    lost = [i for i, served in after.items() if not served]
    print(f"\ncluster: {node} frozen whole: dropped after {failover_s:.1f} s (hold time "
          f"{HOLD_TIME_S} s); connections lost after it: {len(lost)} of {SITES}")
    # The hold time dropped it (3 s), nothing slower; room for a loaded machine's polling.
    assert failover_s <= HOLD_TIME_S + 3
    assert not lost and node not in after.values(), after
    stayed = {i: served_by for i, served_by in served.items() if served_by != node}
    assert {i: after[i] for i in stayed} == stayed, (served, after)
    netlab.wait_until(lambda: fleet.next_hops() == set(NODES), timeout=30,
                      what=f"{node} announced again")


# --- a rolling upgrade by `sixgate deploy apply` over the three nodes (issue 20) --------------


def deploy_inventory(fleet: Fleet, key: Path, known_hosts: Path) -> str:
    """The three nodes as a deploy inventory: one anycast tunnel address, each its own
    router id, sessions and BIRD socket; the paths the lab's gateways already use."""
    text = (
        "[defaults]\n"
        f'ssh_key = "{key}"\nknown_hosts = "{known_hosts}"\nservice = "pidfile"\n'
        f'mode = "6to4"\nlocal_ipv4 = "{ANYCAST_IPV4}"\nrelay_ipv4 = "192.88.99.1"\n'
        'workers = 1\nrules = ["web"]\n'
        f'cluster_announce = ["{ANYCAST_IPV4}/32", "{ANYCAST_PREFIX6}"]\n'
        "cluster_announce_pool = true\n"
        f"cluster_local_as = {NODE_AS}\ncluster_peer_as = {ROUTER_AS}\n"
        f"cluster_hold_time_s = {HOLD_TIME_S}\ncluster_withdraw_after_s = 10\n"
        "cluster_drain_quiet_s = 2\ncluster_drain_timeout_s = 20\n"
        '\n[rules.web]\nforward = [{ proto = "tcp", port = 80, to = "127.0.0.1:8080" }, '
        f'{{ proto = "tcp", port = {REMOTE_PORT}, to = "{REMOTE_SERVICE}" }}]\n')
    for number, node in enumerate(NODES, 1):
        text += (f"\n[hosts.{node}]\n"
                 f'ssh = "{link_addresses(number)[1]}"\n'
                 f'install_root = "{install_root(fleet.tmp, node)}"\n'
                 f'gateway_name = "sgc{number}"\npool = "{node_pool(number)}"\n'
                 f'cluster_neighbors = ["{link_addresses(number)[0]}", '
                 f'"{link_addresses6(number)[0]}"]\n'
                 f'cluster_router_id = "{link_addresses(number)[1]}"\n'
                 f'bird_socket = "{fleet.tmp / f"{node}.ctl"}"\n')
    return text


# One node at a time: each batch drains its node first (the deploy's [cluster] step). With
# one node at the lowest weight against two at 64 the router's resilient group wants no
# bucket on it (with two drained at once, each would keep one and never go quiet). The health
# gate asks /readyz only: an echo from an anycast address is answered to whichever node the
# router picks.
ROLLOUT = """\
[release]
wheel = "{wheel}"
wheelhouse = "wheelhouse"

[batches]
serial = [1]
max_fail_percentage = 0

[health]
timeout_s = 60
ping = false

[on_failure]
rollback = "batch"
"""


class Stream:
    """New connections from every site in turn, one every ``PACE_S``, and the router's view
    of the nodes, recorded with their times until ``stop``. A site asks again only after
    the router's idle timer, so a drained node's buckets can go idle and move."""

    PACE_S = 0.1

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.started = time.monotonic()
        self.fetches: list[tuple[float, int, str]] = []  # (time, site, node or "" if failed)
        self.views: list[tuple[float, dict[str, int]]] = []  # (time, node -> weight)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._fetch, daemon=True),
                        threading.Thread(target=self._watch, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _fetch(self) -> None:
        site = 0
        while not self.stopping.is_set():
            node = self.fleet.fetch(site)
            self.fetches.append((time.monotonic() - self.started, site, node))
            site = (site + 1) % SITES
            self.stopping.wait(self.PACE_S)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self.views.append((time.monotonic() - self.started, self.fleet.weights()))
            self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)

    def events(self, node: str) -> tuple[float | None, float | None, float | None]:
        """When ``node`` went to the lowest weight (its drain), left the group, came back."""
        low = out = back = None
        for at, weights in self.views:
            if low is None and weights.get(node) == 1:
                low = at
            elif low is not None and out is None and node not in weights:
                out = at
            elif out is not None and back is None and weights.get(node, 0) > 1:
                back = at
        return low, out, back


@pytest.mark.deploy
def test_a_rolling_upgrade_by_deploy_apply_keeps_new_connections_succeeding(
        fleet: Fleet) -> None:
    """``sixgate deploy apply`` (real ansible-playbook over SSH from the router's namespace to
    an sshd on each node) rolls a release over the three nodes' running gateways one node at
    a time: each node is drained (RFC 8326's community: the router lowers it, its
    buckets move as they go idle), stops once quiet, comes back on the release and is
    announced again, while every site opens a new connection in turn all along: none fails.
    The nodes' timelines and the connections lost per event are printed."""
    missing = [f"program {p!r}" for p in ("ssh", "ssh-keygen") if shutil.which(p) is None]
    if not Path(sshd.SSHD).exists():
        missing.append(f"{sshd.SSHD} (Debian openssh-server)")
    if not (Path(sys.executable).parent / "ansible-playbook").exists():
        missing.append("ansible-playbook (pip install -e '.[test]')")
    if missing:
        reason = f"CLUSTER ROLLOUT CANNOT RUN: {', '.join(missing)} missing"
        if os.environ.get("SIXGATE_LAB_REQUIRED") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    tmp = fleet.tmp / "deploy"
    tmp.mkdir()
    key = sshd.client_key(tmp)
    known_hosts = tmp / "known_hosts"
    lines = []
    for number, (node, namespace) in enumerate(fleet.nodes.items(), 1):
        (tmp / node).mkdir()
        config, line = sshd.server_files(tmp / node, link_addresses(number)[1], key)
        lines.append(line)
        fleet.spawn(f"sshd-{node}", namespace, sshd.sshd_argv(config))
    known_hosts.write_text("".join(lines))
    built = subprocess.run([*netlab.sixgate_command(), "deploy", "build", "--out",
                            str(tmp / "wheelhouse")], capture_output=True, text=True,
                           timeout=600, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp / "wheelhouse").glob("sixgate-*.whl")
    version = wheel.name.split("-")[1]
    for node, namespace in fleet.nodes.items():
        netlab.wait_until(lambda ns=namespace: fleet.exec_in(ns, [
            "ss", "-Hltn", "sport = :22"]).stdout.strip(), timeout=15, what=f"sshd of {node}")
    (tmp / "inventory.toml").write_text(deploy_inventory(fleet, key, known_hosts))
    (tmp / "rollout.toml").write_text(ROLLOUT.format(wheel=f"wheelhouse/{wheel.name}"))
    lab_gateways = {node: fleet.processes[f"sixgate-{node}"] for node in NODES}
    netlab.wait_until(lambda: fleet.next_hops() == set(NODES) and fleet.balanced(),
                      timeout=30, what="every node in the router's group")
    env = dict(os.environ, TMPDIR=str(tmp), ANSIBLE_NOCOLOR="1", PYTHONUNBUFFERED="1")
    stream = Stream(fleet)
    try:
        time.sleep(1)
        done = subprocess.run(netlab.in_ns(fleet.router, [
            *netlab.sixgate_command(), "deploy", "apply", "-i", str(tmp / "inventory.toml"),
            "-r", str(tmp / "rollout.toml")]), capture_output=True, text=True, timeout=600,
            check=False, env=env)
        output = done.stdout + done.stderr
        print(output)  # shown by pytest when the test fails
        assert done.returncode == 0, output + fleet.diagnostics()
        netlab.wait_until(lambda: fleet.next_hops() == set(NODES), timeout=60,
                          what=lambda: f"every node back in the router's group: "
                                       f"{fleet.weights()}\n{output}")
        time.sleep(1)
    finally:
        stream.stop()
    print(f"\ncluster: rolling upgrade by sixgate deploy apply, {len(stream.fetches)} new "
          f"connections over {stream.fetches[-1][0]:.0f} s")
    lost = [(at, site) for at, site, node in stream.fetches if not node]
    for node in NODES:
        low, out, back = stream.events(node)
        assert low is not None and out is not None and back is not None, (
            node, stream.views, output)
        during = [f for f in stream.fetches if low <= f[0] <= back]
        print(f"cluster: {node}: drained at +{low:.1f} s, out of the group +{out:.1f} s, "
              f"back +{back:.1f} s; new connections meanwhile {len(during)}, lost "
              f"{sum(1 for f in during if not f[2])}")
    assert not lost, (lost, output, fleet.diagnostics())
    # Each node really went through it: the lab's gateway drained and stopped (exit 0); the
    # one running now is the release's, under the deploy's supervisor.
    for node in NODES:
        assert lab_gateways[node].wait(timeout=10) == 0, node
        pid = int((run_dir(fleet.tmp, node) / "coordinator.pid").read_text())
        cmdline = " ".join(netlab.process_cmdline(pid))
        assert f"/opt/sixgate/releases/{version}/bin/" in cmdline, (node, cmdline)
