"""Issue 19, the LAN behind the tunnel: its config, radvd's config and the firewall's rules
(pure; the VM test tests/kvm/guest/test_lan_router.py runs them for real)."""

from __future__ import annotations

import pytest

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.coordinator.lan import lan_ruleset, radvd_config, router_address

TUNNEL = ('[tunnel]\nmode = "6in4"\nlocal_ipv4 = "192.0.2.10"\nremote_ipv4 = "198.51.100.1"\n'
          'prefix = "2001:db8:1::/48"\naddresses = ["2001:db8:1::1"]\nmtu = 1480\n')
LAN = ('[lan]\ninterface = "lan0"\nprefix = "2001:db8:1:1::/64"\nrdnss = ["2001:db8:1:1::1"]\n'
       '[[lan.allow]]\nproto = "tcp"\nport = 8080\naddress = "2001:db8:1:1::50"\n'
       '[[lan.allow]]\nproto = "udp"\nport = "60000-60010"\n')
GATEWAY = '[gateway]\npool = "100.64.0.0/16"\nname = "home"\n'


def test_a_lan_is_parsed_and_asks_for_the_kernel_backend() -> None:
    settings = parse_config(TUNNEL + LAN + GATEWAY)
    assert settings.backend == "kernel"  # "auto" too: a host without sit says so at `run`
    assert (settings.lan_interface, settings.lan_prefix, settings.lan_rdnss) == (
        "lan0", "2001:db8:1:1::/64", ("2001:db8:1:1::1",))
    assert settings.lan_allow == (("tcp", 8080, 8080, "2001:db8:1:1::50"),
                                  ("udp", 60000, 60010, ""))
    assert router_address(settings) == "2001:db8:1:1::1"


def test_radvd_advertises_the_prefix_the_tunnel_mtu_and_the_dns() -> None:
    text = radvd_config(parse_config(TUNNEL + LAN + GATEWAY))
    assert "interface lan0 {" in text
    assert "AdvLinkMTU 1480;" in text  # RFC 4861 §4.6.4
    assert "prefix 2001:db8:1:1::/64 {" in text and "AdvAutonomous on;" in text
    assert "RDNSS 2001:db8:1:1::1 {" in text  # RFC 8106


def test_the_firewall_lets_in_replies_icmpv6_and_the_holes_only() -> None:
    rules = lan_ruleset(parse_config(TUNNEL + LAN + GATEWAY), "homesit").splitlines()
    inbound = rules[rules.index("  chain from_internet {") + 1:]
    assert inbound[0].strip() == "ct state established,related accept"  # RFC 6092 REC-11
    assert "echo-request" in inbound[2] and "packet-too-big" in inbound[2]  # RFC 4890
    assert inbound[3].strip() == "ip6 daddr 2001:db8:1:1::50 tcp dport 8080 accept"
    assert inbound[4].strip() == "udp dport 60000-60010 accept"
    assert inbound[5].strip() == 'counter name "lan_refused" drop'
    assert ('    iifname "lan0" ip6 saddr != 2001:db8:1:1::/64 counter name "lan_spoofed" drop'
            in rules)  # RFC 6092 REC-5


@pytest.mark.parametrize(("lan", "gateway", "problem"), [
    (LAN, GATEWAY + 'backend = "userspace"\n', "a LAN needs the kernel backend"),
    (LAN.replace("2001:db8:1:1::/64", "2001:db8:2::/64"), GATEWAY, "outside the tunnel's"),
    (LAN.replace("2001:db8:1:1::/64", "2001:db8:1:100::/56"), GATEWAY, "must be a /64"),
    (LAN.replace("2001:db8:1:1::/64", "2001:db8:1::/64"), GATEWAY, "holds the tunnel's"),
    (LAN.replace('proto = "tcp"', 'proto = "icmp"'), GATEWAY, r"lan.allow\[0\].proto"),
    (LAN.replace('"2001:db8:1:1::50"', '"2001:db8:9::50"'), GATEWAY, "not in the LAN"),
    ('[lan]\nprefix = "2001:db8:1:1::/64"\n', GATEWAY, "interface is missing"),
])
def test_bad_lans_are_refused_with_the_key(lan: str, gateway: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(TUNNEL + lan + gateway)
