"""A 464XLAT box (issue 18): one ``sixgate run`` with [nat64] and [clat] on one host.

```
 client namespace (-peer)         box namespace (-gw): ONE sixgate run     IPv4 namespace (-v4)
 IPv6 only                        [nat64] 64:ff9b::/96, pool4 203.0.113.5   192.0.2.1 (router)
 2001:db8:100::10/64              [clat] 192.0.0.1 <-> 2001:db8:200::c1a7   198.51.100.7  HTTP
                                  veth4 192.0.2.254/24; the IPv4 uplink's   198.51.100.53 dnsmasq
                                  default route in table 100 only           route 203.0.113.5
                                  (nat64.egress_table = 100)                  -> 192.0.2.254
```

The box's own IPv4 programs have no route of their own to 198.51.100.0/24, so they take the
CLAT's default route (RFC 6877 §6.3); the CLAT writes their packets as IPv6 from its address
to 64:ff9b::<IPv4>; the kernel routes those to the NAT64's device of the same process, whose
IPv4 leaves by table 100. The IPv6-only client uses the same NAT64 meanwhile. The CLAT's
address lies outside [nat64] clients: the gateway makes it one (its own CLAT).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import netlab
import pytest
from nat64lab import CLIENT6, DNS4, GATEWAY6, HTTP4, Nat64Lab, synthesized

BOX4 = "192.0.2.254"  # the box's IPv4 uplink address
ROUTER4 = "192.0.2.1"  # the IPv4 namespace's, the default route of table EGRESS_TABLE
EGRESS_TABLE = 100
CLAT6 = "2001:db8:200::c1a7"  # outside the NAT64's clients (2001:db8:100::/56)
CLAT4 = "192.0.0.1"
POOL4 = "203.0.113.5"


class XlatBoxLab(Nat64Lab):
    """The NAT64 lab with the gateway namespace as a 464XLAT box (module docstring)."""

    def __init__(self, files: netlab.ServedFiles) -> None:
        super().__init__(2, files, with_clients_kit=False)

    def create_namespaces(self) -> None:
        for namespace in (self.gw_ns, self.peer_ns, self.v4_ns):
            netlab.run(["ip", "netns", "add", namespace])
            self._cleanup.callback(netlab.delete_namespace, namespace)
            self.ip(namespace, "link", "set", "lo", "up")
        for namespace in (self.gw_ns, self.peer_ns):
            self.sysctl(namespace, "net.ipv6.conf.all.disable_ipv6=0",
                        "net.ipv6.conf.default.disable_ipv6=0")
        self.sysctl(self.gw_ns, "net.ipv6.conf.all.forwarding=0", "net.ipv4.ip_forward=0")
        self.ip(self.gw_ns, "link", "add", "veth6", "type", "veth", "peer", "name", "veth6",
                "netns", self.peer_ns)
        self.ip(self.gw_ns, "link", "add", "veth4", "type", "veth", "peer", "name", "veth4",
                "netns", self.v4_ns)
        for namespace, link in ((self.gw_ns, "veth6"), (self.peer_ns, "veth6"),
                                (self.gw_ns, "veth4"), (self.v4_ns, "veth4")):
            self.ip(namespace, "link", "set", link, "up")
        self.ip(self.gw_ns, "addr", "add", f"{GATEWAY6}/64", "dev", "veth6", "nodad")
        # The CLAT's /64 on the same link (its address is answered for by proxy NDP).
        self.ip(self.gw_ns, "addr", "add", "2001:db8:200::1/64", "dev", "veth6", "nodad")
        self.ip(self.gw_ns, "-6", "route", "add", "2001:db8:100::/56", "dev", "veth6")
        self.ip(self.gw_ns, "addr", "add", f"{BOX4}/24", "dev", "veth4")
        # The IPv4 internet only in the NAT64's table: the box itself has no IPv4 route to it.
        self.ip(self.gw_ns, "route", "add", "default", "via", ROUTER4, "table",
                str(EGRESS_TABLE))
        self.ip(self.peer_ns, "addr", "add", f"{CLIENT6}/64", "dev", "veth6", "nodad")
        self.ip(self.peer_ns, "-6", "route", "add", "default", "via", GATEWAY6)
        self.ip(self.v4_ns, "addr", "add", f"{ROUTER4}/24", "dev", "veth4")
        for address in (HTTP4, DNS4):
            self.ip(self.v4_ns, "addr", "add", f"{address}/32", "dev", "veth4")
        self.ip(self.v4_ns, "route", "add", f"{POOL4}/32", "via", BOX4)

    def config_text(self) -> str:
        return super().config_text().replace("allow_non_global = true", (
            f"allow_non_global = true\negress_table = {EGRESS_TABLE}")) + (
            "\n[clat]\n"
            f'ipv6_address = "{CLAT6}"\n'
            f'ipv4_address = "{CLAT4}"\n')


@pytest.fixture(scope="module")
def box(served_files: netlab.ServedFiles) -> Iterator[XlatBoxLab]:
    with XlatBoxLab(served_files) as lab:
        yield lab


class TestXlatBox:
    def test_one_process_runs_both_and_the_box_has_ipv4_only_through_the_clat(
            self, box: XlatBoxLab) -> None:
        check = box.sixgate_out("check")
        assert "NAT64" in check and "CLAT" in check and f"table {EGRESS_TABLE}" in check
        got = box.gw(["ip", "-4", "route", "get", HTTP4])
        route = got.stdout + got.stderr + box.gw(["ip", "-4", "route"]).stdout
        assert f"dev {box.name}0c" in route and f"src {CLAT4}" in route, route
        rules = box.gw(["ip", "-4", "rule"]).stdout
        for index in range(box.workers):
            assert f"iif {box.name}{index} lookup {EGRESS_TABLE}" in rules, rules

    def test_the_boxs_own_ipv4_programs_reach_ipv4_literals(self, box: XlatBoxLab) -> None:
        body = box.gw(["curl", "-4", "-sS", "--max-time", "10",
                       f"http://{HTTP4}/{netlab.SMALL_NAME}"])
        assert body.returncode == 0 and body.stdout == netlab.SMALL_TEXT, body.stderr
        ping = box.gw(["ping", "-4", "-c", "3", "-i", "0.2", "-W", "2", HTTP4])
        assert ping.returncode == 0, ping.stdout + ping.stderr
        answer = box.gw(["dig", f"@{DNS4}", "+short", "+tries=1", "+time=3",
                         netlab.DNS_SMALL_NAME, "A"]).stdout.strip()
        assert answer == netlab.DNS_SMALL_A

    def test_a_download_through_the_clat_and_the_nat64_is_whole(
            self, box: XlatBoxLab, served_files: netlab.ServedFiles) -> None:
        mid = served_files.mid
        done = box.gw(["bash", "-c", "set -o pipefail; curl -4 -sS --fail --max-time 60 "
                       f"http://{HTTP4}/{mid.name} | sha256sum"], timeout=70)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == mid.sha256

    def test_the_nat64_translated_the_clats_packets(self, box: XlatBoxLab) -> None:
        """Its bindings: the CLAT's IPv6 address as a client (made one by the gateway: it is
        outside [nat64] clients), pool4 as the IPv4 side."""
        done = box.gw(["curl", "-4", "-sS", "--local-port", "45454", "-o", "/dev/null",
                       "--max-time", "10", f"http://{HTTP4}/{netlab.SMALL_NAME}"])
        assert done.returncode == 0, done.stderr
        rows = [b for b in box.flows()["bindings"] if b["client"] == f"[{CLAT6}]:45454"]
        assert rows and rows[0]["rule"] == "nat64" and rows[0]["target"] == f"{HTTP4}:80", (
            json.dumps(box.flows()["bindings"])[:2000])
        assert rows[0]["pool"].startswith(f"{POOL4}:"), rows

    def test_the_ipv6_only_client_uses_the_same_nat64(self, box: XlatBoxLab) -> None:
        url = f"http://[{synthesized(HTTP4)}]/{netlab.SMALL_NAME}"
        body = box.peer(["curl", "-6", "-g", "-sS", "--max-time", "10", url])
        assert body.returncode == 0 and body.stdout == netlab.SMALL_TEXT, body.stderr

    def test_a_stop_leaves_no_rule_route_or_device(self, box: XlatBoxLab) -> None:
        assert box.stop_gateway(timeout=15) == 0, box.gateway_stderr()
        assert f"lookup {EGRESS_TABLE}" not in box.gw(["ip", "-4", "rule"]).stdout
        assert "default" not in box.gw(["ip", "-4", "route"]).stdout
        assert f"{box.name}0c" not in box.gw(["ip", "link"]).stdout
        assert box.gw(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() == "0"
