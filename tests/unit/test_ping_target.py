"""coordinator/ping.py: which way ``sixgate ping`` goes (the deploy health gate's target)."""

from __future__ import annotations

import ipaddress

import pytest

from sixgate.coordinator.config import parse_config
from sixgate.coordinator.ping import _nat64_target, ping

NAT64 = """\
[nat64]
prefix = "{prefix}"
clients = ["2001:db8:100::/56"]
[[nat64.pool4]]
address = "203.0.113.5"
tcp = "61001-65535"
"""
TUNNEL = ('[tunnel]\nmode = "6to4"\nlocal_ipv4 = "192.0.2.10"\nrelay_ipv4 = "198.51.100.1"\n')


@pytest.mark.parametrize("prefix", ["64:ff9b::/96", "2001:db8:64::/48", "2001:db8::/32"])
def test_an_ipv4_target_is_the_rfc6052_address_of_the_prefix(prefix: str) -> None:
    settings = parse_config(NAT64.format(prefix=prefix))
    target = _nat64_target(settings, "198.51.100.7")
    assert target is not None
    network = ipaddress.IPv6Network(prefix)
    assert ipaddress.IPv6Address(target) in network
    # An IPv6 target inside the prefix is pinged as it is; one outside is not the NAT64's.
    assert _nat64_target(settings, str(ipaddress.IPv6Address(target))) == target
    assert _nat64_target(settings, "2001:db9::1") is None


def test_without_nat64_an_ipv4_target_is_refused_with_the_reason() -> None:
    settings = parse_config(TUNNEL)
    assert _nat64_target(settings, "198.51.100.7") is None
    with pytest.raises(ValueError, match="no \\[nat64\\] table"):
        ping(settings, "198.51.100.7", 1)


def test_a_nat64_only_config_cannot_ping_outside_its_prefix() -> None:
    settings = parse_config(NAT64.format(prefix="64:ff9b::/96"))
    with pytest.raises(ValueError, match="not inside the NAT64 prefix"):
        ping(settings, "2001:db8:ffff::1", 1)
