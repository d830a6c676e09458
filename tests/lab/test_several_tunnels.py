"""Issue 19: several tunnels at once, seed 002's home gateway: two 6in4 brokers for
redundancy plus 6to4, on the gateway's one IPv4 address, through the real ``sixgate run``.

Three independent peers (tunnel_peer.py, struct code), each in its own namespace: broker A
(the lab's usual peer, 198.51.100.1), broker B (198.51.100.3) and a 6to4 site (203.0.113.7);
the lab's peer namespace routes the other two. From each: ping, a curl of a file and a DNS
query to the gateway's address of its tunnel, every answer through its own tunnel (a peer
accepts only what comes from the gateway to its own address); broker B cannot reach broker
A's address; the per-tunnel metrics count each tunnel's traffic.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterator

import netlab
import pytest
from netlab import GATEWAY_IPV4, LAB_DIR, PEER_IPV4, PEER_TUN, TUNNEL_MTU, Lab

pytestmark = [pytest.mark.lab]

BROKER_B_IPV4 = "198.51.100.3"
SITE_6TO4_IPV4 = "203.0.113.7"  # its 6to4 prefix: 2002:cb00:7107::/48

CONFIG = f"""\
[[tunnel]]
name = "broker-a"
mode = "6in4"
local_ipv4 = "{GATEWAY_IPV4}"
remote_ipv4 = "{PEER_IPV4}"
prefix = "2001:db8:1::/64"
addresses = ["2001:db8:1::1"]
mtu = {TUNNEL_MTU}

[[tunnel]]
name = "broker-b"
mode = "6in4"
local_ipv4 = "{GATEWAY_IPV4}"
remote_ipv4 = "{BROKER_B_IPV4}"
prefix = "2001:db8:2::/64"
addresses = ["2001:db8:2::1"]
mtu = {TUNNEL_MTU}

[[tunnel]]
name = "sixtofour"
mode = "6to4"
local_ipv4 = "{GATEWAY_IPV4}"
relay_ipv4 = "192.88.99.1"
mtu = {TUNNEL_MTU}
"""

# name: (the gateway's address in it, the peer's namespace suffix, its IPv4, mode, its own
# address and prefix on its TUN, what it routes into the tunnel)
SITES = {
    "broker-a": ("2001:db8:1::1", None, PEER_IPV4, "6in4", "2001:db8:ffff::1/64",
                 "2001:db8:1::/64"),
    "broker-b": ("2001:db8:2::1", "pb", BROKER_B_IPV4, "6in4", "2001:db8:fffe::1/64",
                 "2001:db8:2::/64"),
    "sixtofour": ("2002:c000:20a::1", "pc", SITE_6TO4_IPV4, "6to4", "2002:cb00:7107::1/48",
                  "2002::/16"),
}


class SeveralTunnels:
    """The lab plus the two further peers, each namespace removed at the end."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.namespaces: dict[str, str] = {"broker-a": lab.peer_ns}

    def add_peer(self, name: str) -> None:
        """A namespace behind the lab's peer namespace (which routes it: the gateway's one
        capture is on its one interface) running tunnel_peer.py for one tunnel."""
        lab = self.lab
        _, suffix, ipv4, mode, cidr, route = SITES[name]
        namespace = f"{lab.peer_ns[:-len('peer')]}{suffix}"
        lab.add_namespace(namespace)
        self.namespaces[name] = namespace
        link = f"v{suffix}"
        lab.ip(lab.peer_ns, "link", "add", link, "type", "veth", "peer", "name", "veth0",
               "netns", namespace)
        lab.ip(lab.peer_ns, "link", "set", link, "up")
        lab.ip(lab.peer_ns, "route", "add", f"{ipv4}/32", "dev", link)
        lab.sysctl(lab.peer_ns, "net.ipv4.ip_forward=1")
        lab.ip(lab.gw_ns, "route", "add", f"{ipv4}/32", "via", PEER_IPV4, "dev", "veth0")
        lab.sysctl(namespace, "net.ipv6.conf.all.disable_ipv6=0")
        for command in (["link", "set", "lo", "up"],
                        ["addr", "add", f"{ipv4}/32", "dev", "veth0"],
                        ["link", "set", "veth0", "up"],
                        ["route", "add", f"{PEER_IPV4}/32", "dev", "veth0"],
                        ["route", "add", "default", "via", PEER_IPV4, "dev", "veth0"]):
            lab.ip(namespace, *command)
        ready = lab.tmp / f"{name}.ready"
        argv = [sys.executable, str(LAB_DIR / "tunnel_peer.py"), "--tun", PEER_TUN, "--mode",
                mode, "--local", ipv4, "--ready-file", str(ready)]
        if mode == "6in4":
            argv += ["--remote", GATEWAY_IPV4]
        key = f"tunnel_peer_{suffix}"
        lab.spawn(key, namespace, argv)
        netlab.wait_until(lambda: ready.exists() or not lab.alive(key), timeout=15,
                          what=f"{name}'s tunnel_peer.py")
        if not lab.alive(key):
            raise netlab.LabError(f"{name}'s tunnel_peer.py died:\n"
                                  f"{netlab.tail(lab.log_path(key))}")
        lab.ip(namespace, "link", "set", PEER_TUN, "mtu", str(TUNNEL_MTU), "up")
        lab.ip(namespace, "addr", "add", cidr, "dev", PEER_TUN, "nodad")
        lab.ip(namespace, "route", "add", route, "dev", PEER_TUN)
        if mode == "6in4":  # RFC 4213 §3.7: fe80::<its IPv4>, which the gateway probes
            link_local = ipaddress.IPv6Address(b"\xfe\x80" + bytes(10)
                                               + ipaddress.IPv4Address(ipv4).packed)
            lab.ip(namespace, "addr", "add", f"{link_local}/64", "dev", PEER_TUN, "nodad")

    def run_in(self, name: str, argv: list[str], timeout: float = 30
               ) -> netlab.subprocess.CompletedProcess[str]:
        return self.lab.exec_in(self.namespaces[name], argv, timeout=timeout)


@pytest.fixture(scope="module")
def several(served_files: netlab.ServedFiles) -> Iterator[SeveralTunnels]:
    with Lab("6in4", 2, served_files, with_gateway=False, fanout="kernel") as lab:
        sites = SeveralTunnels(lab)
        sites.add_peer("broker-b")
        sites.add_peer("sixtofour")
        lab.config_path.write_text(lab.config_text().replace(lab.plan.tunnel_toml, CONFIG))
        lab.start_gateway()
        yield sites


def test_check_lists_every_tunnel(several: SeveralTunnels) -> None:
    done = several.lab.sixgate("check")
    assert done.returncode == 0, done.stderr
    assert "name          broker-a" in done.stdout, done.stdout
    assert f"tunnel 'broker-b': 6in4 on the same local IPv4, remote {BROKER_B_IPV4}" in (
        done.stdout)
    assert "tunnel 'sixtofour': 6to4" in done.stdout


@pytest.mark.parametrize("name", list(SITES))
def test_each_site_reaches_the_gateway_through_its_own_tunnel(several: SeveralTunnels,
                                                              name: str) -> None:
    """ping, curl (tcp/80) and dig (udp/53) to the gateway's address of that tunnel; a peer
    takes only packets from the gateway's IPv4 to its own, so an answer sent by another
    tunnel's way would be lost."""
    address = SITES[name][0]
    lab = several.lab
    done = several.run_in(name, ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", address])
    assert netlab.ping_received(done.stdout) == 3, done.stdout + lab.gateway_stderr()
    small = several.run_in(name, ["curl", "-6", "-g", "-sS", "--max-time", "10",
                                  f"http://[{address}]/{netlab.SMALL_NAME}"])
    assert small.stdout == netlab.SMALL_TEXT, small.stderr
    dig = several.run_in(name, ["dig", f"@{address}", "+short", "+tries=1", "+time=3",
                                netlab.DNS_SMALL_NAME, "A"])
    assert dig.stdout.strip() == netlab.DNS_SMALL_A, dig.stdout + dig.stderr


def test_a_broker_cannot_reach_another_tunnels_address(several: SeveralTunnels) -> None:
    """RFC 4213 §3.6, per tunnel: broker B's packets to broker A's prefix are not its to
    deliver (not_our_address); A's own still work."""
    lab = several.lab
    lab.ip(several.namespaces["broker-b"], "route", "add", "2001:db8:1::/64", "dev", PEER_TUN)
    before = netlab.drops(lab)
    done = several.run_in("broker-b", ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "1",
                                       "2001:db8:1::1"])
    assert netlab.ping_received(done.stdout) == 0, done.stdout
    after = netlab.drops(lab)
    assert after.get("not_our_address", 0) - before.get("not_our_address", 0) >= 2
    done = several.run_in("broker-a", ["ping", "-6", "-c", "1", "-W", "2", "2001:db8:1::1"])
    assert netlab.ping_received(done.stdout) == 1, done.stdout


def test_each_broker_is_probed(several: SeveralTunnels) -> None:
    """RFC 4213 §3.8 for every 6in4 tunnel: both brokers answer their link-local probe."""
    def reachable() -> set[str]:
        body = several.lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        return set(re.findall(r'^sixgate_tunnel_peer_reachable\{peer="([\d.]+)"\} 1\.0$',
                              body, re.MULTILINE))

    netlab.wait_until(lambda: reachable() == {PEER_IPV4, BROKER_B_IPV4}, timeout=15,
                      what="both brokers reachable")


def test_each_tunnel_has_its_own_traffic_counters(several: SeveralTunnels) -> None:
    for name in SITES:
        several.run_in(name, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", SITES[name][0]])
    body = several.lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
    for name in SITES:
        for direction in ("received", "sent"):
            match = re.search(rf'^sixgate_tunnel_packets_total\{{direction="{direction}",'
                              rf'tunnel="{name}"\}} (\S+)$', body, re.MULTILINE)
            assert match is not None and float(match.group(1)) >= 2, (name, direction, body)


def test_three_downloads_at_once_each_through_its_own_tunnel(several: SeveralTunnels) -> None:
    """The 10 MB file to all three sites at the same time (rate-limited so they overlap):
    each arrives whole, so every translated answer left by the tunnel of its session."""
    lab = several.lab
    mid = lab.files.mid
    downloads = {name: netlab.subprocess.Popen(netlab.in_ns(several.namespaces[name], [
        "bash", "-c", "set -o pipefail; curl -6 -g -sS --fail --max-time 60 --limit-rate 4M "
        f"http://[{SITES[name][0]}]/{mid.name} | sha256sum"]),
        stdout=netlab.subprocess.PIPE, stderr=netlab.subprocess.PIPE, text=True)
        for name in SITES}
    try:
        results = {name: process.communicate(timeout=90)
                   for name, process in downloads.items()}
    finally:
        for process in downloads.values():
            if process.poll() is None:
                netlab.stop_process(process, 5)
    for name, (stdout, stderr) in results.items():
        assert downloads[name].returncode == 0, (name, stderr)
        assert stdout.split()[0] == mid.sha256, name
