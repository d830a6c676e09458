"""Issue 19: a tunnel behind a 1:1 NAT (a cloud VM: the public address is not on the host).

Three namespaces: the peer (6to4 relay or 6in4 broker, as in the other labs) knows the gateway
as 192.0.2.10 (``public_ipv4``); a NAT namespace owns that address and maps it 1:1 to
192.0.2.202 (``local_ipv4``, the only IPv4 address of the gateway's namespace) with nftables
DNAT/SNAT, as a cloud provider's edge does, protocol 41 included. Through the real ``sixgate
run``: ping, a 100 MB curl byte-identical, the 6to4 prefix derived from the public address,
the RFC 3964 check against the public one (a spoofed 6to4 source is still dropped), and
``sixgate check`` saying what each address is for. 6in4 also learns its public address from a
"what is my address" service on the peer side (``public_ipv4_url``): when the NAT maps the
gateway to a new public address, the tunnel follows without a restart (issue 19).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from netlab import GATEWAY_IPV4, PEER_FAR_IPV4, PEER_IPV4, PEER_OTHER_IPV4, Lab, run

pytestmark = [pytest.mark.lab]

PUBLIC_IPV4 = GATEWAY_IPV4  # what the peer knows the tunnel by
LOCAL_IPV4 = "192.0.2.202"  # the gateway's own address behind the NAT
NAT_INSIDE_IPV4 = "192.0.2.201"  # the NAT's address on the gateway's link
MYIP_PORT = 8088  # the peer side's "what is my address" service


class NatLab(Lab):
    """The tunnel lab with a 1:1 NAT namespace between the peer and the gateway."""

    def __init__(self, mode: str, files: netlab.ServedFiles) -> None:
        super().__init__(mode, 1, files, fanout="kernel")
        self.nat_ns = f"{self.gw_ns[:-3]}-nat"

    def create_namespaces(self) -> None:
        for namespace in (self.gw_ns, self.nat_ns, self.peer_ns):
            run(["ip", "netns", "add", namespace])
            self._cleanup.callback(netlab.delete_namespace, namespace)
        self.sysctl(self.gw_ns, "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1")
        self.sysctl(self.peer_ns, "net.ipv6.conf.all.disable_ipv6=0",
                    "net.ipv6.conf.default.disable_ipv6=0")
        self.sysctl(self.nat_ns, "net.ipv4.ip_forward=1")
        for namespace in (self.gw_ns, self.nat_ns, self.peer_ns):
            self.ip(namespace, "link", "set", "lo", "up")
        # peer veth0 <-> nat up0: the NAT holds the public address.
        self.ip(self.nat_ns, "link", "add", "up0", "type", "veth", "peer", "name", "veth0",
                "netns", self.peer_ns)
        self.ip(self.nat_ns, "addr", "add", f"{PUBLIC_IPV4}/24", "dev", "up0")
        self.ip(self.nat_ns, "link", "set", "up0", "up")
        for prefix in ("198.51.100.0/24", "203.0.113.0/24"):
            self.ip(self.nat_ns, "route", "add", prefix, "dev", "up0")
        for address in (PEER_IPV4, PEER_OTHER_IPV4, PEER_FAR_IPV4):
            self.ip(self.peer_ns, "addr", "add", f"{address}/24", "dev", "veth0")
        self.ip(self.peer_ns, "link", "set", "veth0", "up")
        self.ip(self.peer_ns, "route", "add", "192.0.2.0/24", "dev", "veth0", "src", PEER_IPV4)
        # nat down0 <-> gateway veth0: the gateway's only IPv4 address is the private one.
        self.ip(self.nat_ns, "link", "add", "down0", "type", "veth", "peer", "name", "veth0",
                "netns", self.gw_ns)
        self.ip(self.nat_ns, "addr", "add", f"{NAT_INSIDE_IPV4}/30", "dev", "down0")
        self.ip(self.nat_ns, "link", "set", "down0", "up")
        self.ip(self.gw_ns, "addr", "add", f"{LOCAL_IPV4}/30", "dev", "veth0")
        self.ip(self.gw_ns, "link", "set", "veth0", "up")
        self.ip(self.gw_ns, "route", "add", "default", "via", NAT_INSIDE_IPV4)
        self.map_public(PUBLIC_IPV4)

    def map_public(self, public: str) -> None:
        """1:1, every protocol (41 has no ports), ``public`` <-> LOCAL_IPV4; the table dies
        with the namespace. "What is my address" answers ``public`` from now on."""
        run(netlab.in_ns(self.nat_ns, ["nft", "-f", "-"]), input=(
            "table ip one_to_one {}\ndelete table ip one_to_one\n"
            "table ip one_to_one {\n"
            " chain pre { type nat hook prerouting priority dstnat;\n"
            f"  ip daddr {public} dnat to {LOCAL_IPV4}\n }}\n"
            " chain post { type nat hook postrouting priority srcnat;\n"
            f"  ip saddr {LOCAL_IPV4} snat to {public}\n }}\n"
            "}\n"))
        # As MASQUERADE does when its address changes: the old mappings are forgotten (a
        # flow's conntrack entry would keep the old public address otherwise).
        run(netlab.in_ns(self.nat_ns, [sys.executable, "-c",
                                       "from pyroute2 import Conntrack; Conntrack().flush()"]))
        (self.myip_dir / "myip").write_text(f"{public}\n")

    @property
    def myip_dir(self) -> Path:
        path = self.tmp / "myip"
        path.mkdir(exist_ok=True)
        return path

    def start_services(self) -> None:
        super().start_services()
        self.spawn("myip", self.peer_ns, netlab.http_server_argv(PEER_IPV4, MYIP_PORT,
                                                                 self.myip_dir))

    def config_text(self) -> str:
        tunnel = f'local_ipv4 = "{LOCAL_IPV4}"\npublic_ipv4 = "{PUBLIC_IPV4}"\n'
        if self.mode == "6in4":
            tunnel += (f'public_ipv4_url = "http://{PEER_IPV4}:{MYIP_PORT}/myip"\n'
                       "public_ipv4_check_s = 5\n")
        return super().config_text().replace(f'local_ipv4 = "{GATEWAY_IPV4}"\n', tunnel)


@pytest.fixture(scope="module", params=["6to4", "6in4"])
def nat_lab(request: pytest.FixtureRequest,
            served_files: netlab.ServedFiles) -> Iterator[NatLab]:
    with NatLab(request.param, served_files) as lab:
        yield lab


def test_check_says_what_each_address_is_for(nat_lab: NatLab) -> None:
    done = nat_lab.sixgate("check")
    assert done.returncode == 0, done.stderr
    assert f"local IPv4    {LOCAL_IPV4} (the capture and the sending socket bind it" \
        in done.stdout, done.stdout
    assert f"public IPv4   {PUBLIC_IPV4} (what the tunnel is known by" in done.stdout
    if nat_lab.mode == "6to4":
        assert "6to4 prefix   2002:c000:20a::/48 (derived from public_ipv4)" in done.stdout


def test_ping_and_a_100mb_download_through_the_nat(nat_lab: NatLab) -> None:
    done = nat_lab.peer(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                         nat_lab.plan.gateway_address], timeout=20)
    assert netlab.ping_received(done.stdout) == 3, done.stdout + nat_lab.gateway_stderr()
    served = nat_lab.files.big
    got = netlab.download(nat_lab, netlab.http_url(nat_lab, served.name), max_time_s=150)
    assert got.exit_code == 0, got.stderr
    assert (got.size_bytes, got.sha256) == (served.size_bytes, served.sha256)
    # Nothing the NAT delivered was taken for spoofed or for someone else's.
    dropped = netlab.drops(nat_lab)
    assert {r: dropped.get(r) for r in ("spoofed_6to4", "not_our_address", "wrong_tunnel_peer",
                                         "martian_source")} == dict.fromkeys(
        ("spoofed_6to4", "not_our_address", "wrong_tunnel_peer", "martian_source"), 0), dropped


def test_sixgate_ping_from_the_gateway_host_through_the_nat(nat_lab: NatLab) -> None:
    """``sixgate ping`` (its own raw socket and its own copy of the tunnel checks) gets its
    replies: they embed the public address and arrive at the private one."""
    done = nat_lab.sixgate("ping", nat_lab.plan.peer_address, "--count", "2", "--interval",
                           "0.2")
    assert done.returncode == 0 and "2 received" in done.stdout, done.stdout + done.stderr


def test_the_tunnel_checks_hold_behind_the_nat(nat_lab: NatLab) -> None:
    """6to4 (RFC 3964 §5.2): the peer's legitimate packets embed the public address and pass
    (above); one whose inner destination embeds the private address, the outer destination
    the NAT delivers to, is dropped as spoofed. 6in4 (RFC 4213 §3.6): another source than the
    broker is dropped, whatever the NAT did."""
    lab = nat_lab
    if lab.mode == "6to4":
        # 2002:c000:2ca::1 embeds 192.0.2.202 (LOCAL_IPV4).
        outer, inner_dst, reason = PEER_IPV4, "2002:c000:2ca::1", "spoofed_6to4"
    else:
        outer, inner_dst, reason = PEER_OTHER_IPV4, lab.plan.gateway_address, \
            "wrong_tunnel_peer"
    before = netlab.drops(lab)
    sent = lab.probe("send41", "--outer-src", outer, "--outer-dst", PUBLIC_IPV4,
                     "--inner-src", lab.plan.peer_address, "--inner-dst", inner_dst,
                     "--count", "5", "--listen-s", "0.5")
    after = netlab.wait_for_drops(lab, before, reason, 5)
    assert netlab.drops_delta(before, after).get(reason) == 5, (sent, netlab.drops_delta(
        before, after))


@pytest.mark.parametrize("nat_lab", ["6in4"], indirect=True)
def test_a_new_public_address_is_learnt_and_followed(nat_lab: NatLab) -> None:
    """The NAT maps the gateway to 192.0.2.11 instead; "what is my address" says so; within
    public_ipv4_check_s the tunnel's public address moves (workers started again, counted),
    and once the broker's end follows (SIGUSR1 to tunnel_peer.py) ping works again; then back."""
    lab = nat_lab

    def changes() -> float:
        body = lab.gw(["curl", "-sf", "http://127.0.0.1:9641/metrics"]).stdout
        found = re.search(r"^sixgate_tunnel_endpoint_changes_total (\S+)$", body, re.MULTILINE)
        assert found, body
        return float(found.group(1))

    def move(public: str, expected: float) -> None:
        lab.ip(lab.nat_ns, "addr", "replace", f"{public}/24", "dev", "up0")
        lab.map_public(public)
        netlab.wait_until(lambda: changes() == expected, timeout=30,
                          what=lambda: f"the tunnel to move to {public}; gateway log:\n"
                                       f"{lab.gateway_stderr()}")
        (lab.tmp / "remote").write_text(public + "\n")
        os.kill(lab.processes["tunnel_peer"].pid, signal.SIGUSR1)

        def answers() -> bool:  # once the workers are up again
            done = lab.peer(["ping", "-6", "-c", "1", "-W", "1", lab.plan.gateway_address],
                            timeout=10, check=False)
            return netlab.ping_received(done.stdout) == 1

        netlab.wait_until(answers, timeout=20, what=lambda: f"ping through {public}; gateway "
                          f"log:\n{lab.gateway_stderr()}")

    before = changes()
    try:
        move("192.0.2.11", before + 1)
        assert "the public address is 192.0.2.11 now, not 192.0.2.10" in lab.gateway_stderr()
    finally:
        move(PUBLIC_IPV4, before + 2)
