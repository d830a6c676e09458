"""Issue 19, dynamic endpoint: when the tunnel moves (``coordinator/uplink.follow``) and which
configs may follow an uplink at all."""

from __future__ import annotations

import pytest

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.coordinator.uplink import follow

TUNNEL = ('[tunnel]\nmode = "6in4"\nlocal_ipv4 = "192.0.2.10"\nremote_ipv4 = "198.51.100.1"\n'
          'prefix = "2001:db8:1::/64"\n')
GATEWAY = '[gateway]\npool = "100.64.0.0/16"\n'


@pytest.mark.parametrize(("current", "addresses", "moved"), [
    ("192.0.2.10", ["192.0.2.10"], None),                  # nothing changed
    ("192.0.2.10", ["192.0.2.11", "192.0.2.10"], None),    # an extra address is no move
    ("192.0.2.10", [], None),                              # between two leases: wait
    ("192.0.2.10", ["192.0.2.11"], "192.0.2.11"),          # a new lease
    ("192.0.2.10", ["203.0.113.7", "192.0.2.11"], "203.0.113.7"),  # the primary one
])
def test_the_tunnel_moves_only_when_its_address_left_for_another(
        current: str, addresses: list[str], moved: str | None) -> None:
    assert follow(current, addresses) == moved


def test_an_uplink_is_parsed_and_shown_by_name() -> None:
    settings = parse_config(TUNNEL + 'uplink = "eth0"\n' + GATEWAY)
    assert settings.uplink == "eth0" and settings.backend == "userspace"
    assert parse_config(TUNNEL + GATEWAY).uplink == ""


@pytest.mark.parametrize(("extra", "problem"), [
    ('uplink = "eth 0"\n', "tunnel.uplink.*not an interface name"),
    ('uplink = "a-name-too-long-for-linux"\n', "not an interface name"),
    ('uplink = "eth0"\npublic_ipv4 = "203.0.113.9"\n', "not behind a 1:1 NAT"),
])
def test_bad_uplinks_are_refused_with_the_key(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(TUNNEL + extra + GATEWAY)


def test_only_6in4_follows_and_only_in_userspace() -> None:
    sixto4 = ('[tunnel]\nmode = "6to4"\nlocal_ipv4 = "192.0.2.10"\nrelay_ipv4 = "192.88.99.1"\n'
              'uplink = "eth0"\n')
    with pytest.raises(ConfigError, match="only for mode = \"6in4\""):
        parse_config(sixto4 + GATEWAY)
    with pytest.raises(ConfigError, match="needs the userspace backend"):
        parse_config(TUNNEL + 'uplink = "eth0"\n' + GATEWAY + 'backend = "kernel"\n')
