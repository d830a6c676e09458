"""Issue 20: when a node announces (pure decision) and the BIRD config it writes."""

from __future__ import annotations

import dataclasses

import pytest
from support.helpers import make_settings

from sixgate.coordinator.cluster import (
    ANNOUNCE,
    DRAIN,
    WITHDRAWN,
    anchor_name,
    announce_state,
    bird_config,
    drain_anchor_name,
)


@pytest.mark.parametrize(
    ("ready", "draining", "announced", "unready_s", "expected"),
    [
        (True, False, False, 0.0, ANNOUNCE),  # ready: announce at once
        (True, True, True, 0.0, DRAIN),  # a drain: the shutdown community at once
        (False, True, True, 9.0, DRAIN),  # ready or not, until the node stops
        (True, True, False, 0.0, WITHDRAWN),  # a drain never announces a withdrawn node
        (False, False, True, 2.9, ANNOUNCE),  # a worker restarting: keep it for a while
        (False, False, True, 3.0, WITHDRAWN),  # unready for withdraw_after_s: withdraw
        (False, False, False, 0.0, WITHDRAWN),  # never announced while unready
    ],
)
def test_announce_state(ready: bool, draining: bool, announced: bool, unready_s: float,
                        expected: str) -> None:
    assert announce_state(ready, draining, announced, unready_s, 3.0) == expected


def test_bird_config_routes_each_prefix_through_the_anchor_to_each_router() -> None:
    settings = dataclasses.replace(
        make_settings("6to4"), cluster_announce=("192.0.2.10/32", "203.0.113.0/28"),
        cluster_local_as=65001, cluster_peer_as=65000,
        cluster_neighbors=("198.51.100.1", "198.51.100.5"), cluster_router_id="198.51.100.2",
        cluster_hold_time_s=9)
    text = bird_config(settings)
    anchor = anchor_name(settings)
    assert anchor == "sgtestbgp"
    assert f'route 192.0.2.10/32 via "{anchor}";' in text
    assert f'route 203.0.113.0/28 via "{anchor}";' in text
    assert text.count("protocol bgp ") == 2 and "neighbor 198.51.100.5 as 65000;" in text
    assert "hold time 9; keepalive time 3;" in text and "router id 198.51.100.2;" in text
    assert "import none;" in text
    # While it drains: the same prefixes through the drain device, with RFC 8326's community,
    # below the anchor's routes, and exported too.
    drain = drain_anchor_name(settings)
    assert drain == "sgtestdrn"
    assert (f'route 192.0.2.10/32 via "{drain}" {{ bgp_community.add((65535, 0)); }};'
            in text)
    assert "preference 90;" in text
    assert 'proto = "sixgate_announce" || proto = "sixgate_drain"' in text


def test_bird_config_gives_ipv6_prefixes_their_own_protocols_and_the_ipv6_sessions() -> None:
    """A BIRD static protocol has one channel: the IPv6 prefixes (a NAT64 prefix) get static
    protocols of their own, exported over the IPv6 neighbors' sessions only."""
    settings = dataclasses.replace(
        make_settings("6to4"), cluster_announce=("192.0.2.10/32", "64:ff9b::/96"),
        cluster_local_as=65001, cluster_peer_as=65000,
        cluster_neighbors=("198.51.100.1", "2001:db8:ff::1"), cluster_router_id="198.51.100.2")
    text = bird_config(settings)
    v4, v6 = text.split("protocol bgp router1")[1].split("protocol bgp router2")
    assert "neighbor 198.51.100.1 as 65000;" in v4 and "ipv4 { import none;" in v4
    assert 'proto = "sixgate_announce" || proto = "sixgate_drain"' in v4
    assert "neighbor 2001:db8:ff::1 as 65000;" in v6 and "ipv6 { import none;" in v6
    assert 'proto = "sixgate_announce6" || proto = "sixgate_drain6"' in v6
    static6 = text.split("protocol static sixgate_announce6 {")[1].split("}")[0]
    assert "ipv6;" in static6 and 'route 64:ff9b::/96 via "sgtestbgp";' in static6
    assert "64:ff9b::/96" not in text.split("protocol static sixgate_announce {")[1].split("}")[0]
    assert ('route 64:ff9b::/96 via "sgtestdrn" { bgp_community.add((65535, 0)); };'
            in text.split("protocol static sixgate_drain6 {")[1])
