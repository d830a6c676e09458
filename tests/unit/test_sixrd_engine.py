"""6rd (RFC 5969) in the engine: the delegated prefix (§4), where packets go (§7.1.1), the
source checks (§12), and the config. The mapping is checked against a separate computation
over integers here and against hand-worked addresses; packets are built with scapy."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import raw

from sixgate.coordinator.config import ConfigError, parse_config
from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.settings import worker_pool
from sixgate.workers.engine.tunnel import (
    SixrdDomain,
    TunnelPolicy,
    check_inbound,
    outer_destination,
)

GW4, CE4, OTHER4, BR4 = "192.0.2.10", "198.51.100.1", "198.51.100.2", "203.0.113.1"
SIXRD = "2001:db8:8000::/33"
MASK = 5  # 192.x and 198.x share their first five bits (11000)
GW6 = "2001:db8:8000:20a0::1"  # hand-worked in tests/lab/netlab.py PLANS["6rd"]
CE6 = "2001:db8:e336:4010::1"
OUTSIDE6 = "2001:db8:1::7"  # not in the 6rd prefix: only through the border relay


def domain() -> SixrdDomain:
    return SixrdDomain.build(SIXRD, MASK, BR4, GW4)


def packed6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def packed4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def test_rfc5969_4_delegated_prefix_hand_worked() -> None:
    assert domain().delegated(GW4) == ipaddress.IPv6Network("2001:db8:8000:20a0::/60")
    assert domain().delegated(CE4) == ipaddress.IPv6Network("2001:db8:e336:4010::/60")
    # No shared bits: a /32 6rd prefix and the whole address, a /64.
    whole = SixrdDomain.build("2001:db8::/32", 0, BR4, GW4)
    assert whole.delegated(GW4) == ipaddress.IPv6Network("2001:db8:c000:20a::/64")


@given(st.integers(8, 56), st.integers(0, 32), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_rfc5969_7_1_1_every_ce_address_maps_back_to_its_ipv4(
        prefix_len: int, mask_len: int, ours: int, theirs: int, host: int) -> None:
    assume(prefix_len + 32 - mask_len <= 64)
    keep = (1 << (32 - mask_len)) - 1
    theirs = ours & ~keep & 0xFFFFFFFF | theirs & keep  # a CE of the same domain
    prefix = 0x20010DB8 << 96 >> (128 - prefix_len) << (128 - prefix_len)
    net = ipaddress.IPv6Network((prefix, prefix_len))
    sixrd = SixrdDomain.build(str(net), mask_len, BR4, str(ipaddress.IPv4Address(ours)))
    delegated = sixrd.delegated(str(ipaddress.IPv4Address(theirs)))
    # Separately: the 6rd prefix, then the IPv4 address's low (32 - mask_len) bits.
    length = prefix_len + 32 - mask_len
    assert delegated.prefixlen == length
    assert int(delegated.network_address) == prefix | (theirs & keep) << (128 - length)
    address = int(delegated.network_address) | host & ((1 << (128 - length)) - 1)
    assert sixrd.embedded_ipv4(address.to_bytes(16, "big")) == theirs.to_bytes(4, "big")


def test_rfc5969_7_1_1_outer_destination() -> None:
    assert outer_destination(packed6(CE6), "6rd", None, packed4(BR4), domain()) == packed4(CE4)
    assert outer_destination(packed6(OUTSIDE6), "6rd", None, packed4(BR4),
                             domain()) == packed4(BR4)
    assert domain().embedded_ipv4(packed6(OUTSIDE6)) is None


def policy() -> TunnelPolicy:
    return TunnelPolicy.build("6rd", GW4, None, [GW6], sixrd=domain())


def encapsulated(outer_src: str, inner_src: str, inner_dst: str = GW6) -> bytes:
    return raw(IP(src=outer_src, dst=GW4) / IPv6(src=inner_src, dst=inner_dst)
               / ICMPv6EchoRequest(id=1, seq=1))


@pytest.mark.parametrize(("outer_src", "inner_src", "expected"), [
    (CE4, CE6, None),  # a CE, its own address
    (BR4, OUTSIDE6, None),  # the world, through the border relay
    (OTHER4, CE6, DropReason.SPOOFED_6RD),  # another CE's address
    (BR4, CE6, DropReason.SPOOFED_6RD),  # a domain address must come from its CE
    (OTHER4, OUTSIDE6, DropReason.SPOOFED_6RD),  # outside the domain, not via the relay
])
def test_rfc5969_12_source_checks(outer_src: str, inner_src: str,
                                  expected: DropReason | None) -> None:
    result = check_inbound(encapsulated(outer_src, inner_src), policy())
    if expected is None:
        assert not isinstance(result, DropReason), result
        assert result[1] == packed4(outer_src)
    else:
        assert result == expected


def test_the_datapath_answers_a_ce_at_its_ipv4_and_the_world_through_the_relay() -> None:
    settings = parse_config(
        '[tunnel]\nmode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8:8000::/33"\n'
        f'ipv4_mask_len = {MASK}\nborder_relay_ipv4 = "{BR4}"\n'
        '[gateway]\npool = "100.64.0.0/16"\nworkers = 1\n')
    datapath = Datapath(settings, worker_pool(settings.pool, 1, 0))
    for outer_src, inner_src in ((CE4, CE6), (BR4, OUTSIDE6)):
        out = datapath.from_tunnel([encapsulated(outer_src, inner_src)], 1.0)
        [(reply, sent_to)] = out.to_tunnel
        assert sent_to == packed4(outer_src)
        answer = IPv6(reply)
        assert answer.src == GW6 and answer.dst == inner_src and ICMPv6EchoReply in answer


@pytest.mark.parametrize(("tunnel", "problem"), [
    ('mode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8::/32"\n',
     "border_relay_ipv4 is missing"),
    ('mode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nborder_relay_ipv4 = "203.0.113.1"\n',
     "prefix is missing"),
    # /40 + 32 - 0 = /72: no room for /64 links (RFC 5969 §4).
    ('mode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8::/40"\n'
     'border_relay_ipv4 = "203.0.113.1"\n', "would be /72"),
    ('mode = "6to4"\nlocal_ipv4 = "192.0.2.10"\nrelay_ipv4 = "203.0.113.1"\n'
     "ipv4_mask_len = 8\n", "only for mode = \"6rd\""),
    ('mode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8::/32"\n'
     'border_relay_ipv4 = "203.0.113.1"\nrelay_ipv4 = "203.0.113.1"\n', "not for mode"),
])
def test_bad_6rd_configs_are_refused_with_the_key(tunnel: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(f"[tunnel]\n{tunnel}[gateway]\npool = \"100.64.0.0/16\"\n")


def test_6rd_configures_the_kernels_sit_in_6rd_mode() -> None:
    """RFC 5969 §4 on Linux sit: the 6rd prefix and the IPv4 bits every CE shares (what ``ip
    tunnel 6rd ... 6rd-relay_prefix`` sets), not the whole address; behind a 1:1 NAT the
    kernel is refused (sit checks the inner destination against local_ipv4)."""
    from sixgate.coordinator.kernel_backend import sixrd_link
    tunnel = ('[tunnel]\nmode = "6rd"\nlocal_ipv4 = "192.0.2.10"\nprefix = "2001:db8:8000::/33"\n'
              'ipv4_mask_len = 5\nborder_relay_ipv4 = "203.0.113.1"\n')
    settings = parse_config(tunnel + '[gateway]\npool = "100.64.0.0/16"\nbackend = "kernel"\n')
    assert settings.backend == "kernel"
    assert sixrd_link(settings) == {"sit_6rd_prefix": "2001:db8:8000::",
                                    "sit_6rd_prefixlen": 33,
                                    "sit_6rd_relay_prefix": "192.0.0.0",
                                    "sit_6rd_relay_prefixlen": 5}
    assert sixrd_link(parse_config(tunnel.replace('"6rd"', '"6to4"').replace(
        'prefix = "2001:db8:8000::/33"\nipv4_mask_len = 5\nborder_relay_ipv4', "relay_ipv4")
        + '[gateway]\npool = "100.64.0.0/16"\n')) == {}
    with pytest.raises(ConfigError, match="6rd behind a 1:1 NAT needs the userspace"):
        parse_config(tunnel + 'public_ipv4 = "198.51.100.9"\n[gateway]\n'
                     'pool = "100.64.0.0/16"\nbackend = "kernel"\n')
