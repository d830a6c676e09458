"""Issue 19, dynamic endpoint: when the tunnel moves (``coordinator/uplink.follow``) and which
configs may follow an uplink at all."""

from __future__ import annotations

import pytest

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.coordinator.uplink import follow, public_ipv4_in

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


@pytest.mark.parametrize(("body", "address"), [
    ("203.0.113.7\n", "203.0.113.7"),                           # icanhazip, ipify
    ("Current IP Address: 198.51.100.9</body>", "198.51.100.9"),  # checkip.dyndns.org
    ("999.1.1.1 then 192.0.2.4", "192.0.2.4"),                  # not an address, then one
    ("1.2.3.4.5", None), ("2001:db8::1\n", None), ("", None),
])
def test_the_public_address_is_read_from_a_what_is_my_address_answer(
        body: str, address: str | None) -> None:
    assert public_ipv4_in(body) == address


def test_a_public_address_url_is_for_6in4_and_lets_uplink_follow_behind_a_nat() -> None:
    nat = TUNNEL + 'public_ipv4 = "203.0.113.9"\nuplink = "eth0"\n'
    settings = parse_config(nat + 'public_ipv4_url = "https://ipv4.icanhazip.com/"\n'
                            'public_ipv4_check_s = 60\n' + GATEWAY)
    assert (settings.public_ipv4_url, settings.public_ipv4_check_s) == (
        "https://ipv4.icanhazip.com/", 60)
    with pytest.raises(ConfigError, match="add public_ipv4_url"):
        parse_config(nat + GATEWAY)
    with pytest.raises(ConfigError, match="not an http"):
        parse_config(TUNNEL + 'public_ipv4_url = "ftp://x/"\n' + GATEWAY)
    with pytest.raises(ConfigError, match="public_ipv4_check_s"):
        parse_config(TUNNEL + 'public_ipv4_check_s = 1\n' + GATEWAY)
    sixto4 = ('[tunnel]\nmode = "6to4"\nlocal_ipv4 = "192.0.2.10"\nrelay_ipv4 = "192.88.99.1"\n'
              'public_ipv4_url = "https://ipv4.icanhazip.com/"\n')
    with pytest.raises(ConfigError, match="only for mode = \"6in4\""):
        parse_config(sixto4 + GATEWAY)
