"""RFC 4213 §3.7/§3.8: a configured (6in4) tunnel is a link with link-local addresses and must
answer its peer's NUD probes; 6to4 never decapsulates ND (RFC 3964 §5.1).

scapy builds the probes and parses the answers."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.packet import raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6IN4,
    GW6_6TO4,
    POLICY_6IN4,
    POLICY_6TO4,
    REMOTE4,
    TwoParty,
    make_datapath,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.tunnel import TunnelPolicy, check_inbound, link_local_6in4

LINK_LOCAL_GW = "fe80::c000:20a"  # fe80:: + 192.0.2.10 (RFC 4213 §3.7)
LINK_LOCAL_PEER = "fe80::cb00:7101"  # the broker's, fe80:: + 203.0.113.1


def test_rfc4213_3_7_link_local_is_fe80_plus_ipv4() -> None:
    assert link_local_6in4(ipaddress.IPv4Address(GW4).packed) == (
        ipaddress.IPv6Address(LINK_LOCAL_GW).packed)


def policy(mode: str) -> TunnelPolicy:
    return POLICY_6IN4 if mode == "6in4" else POLICY_6TO4


def probe(target: str, dst: str | None = None, src: str = LINK_LOCAL_PEER,
          hlim: int = 255) -> IPv6:
    """A unicast NUD probe (RFC 4861 §7.2.2), with the SLLA option real stacks add."""
    return (IPv6(src=src, dst=dst or target, hlim=hlim) / ICMPv6ND_NS(tgt=target)
            / ICMPv6NDOptSrcLLAddr(lladdr="00:00:00:00:00:00"))


@pytest.mark.parametrize("target", [LINK_LOCAL_GW, GW6_6IN4])
def test_rfc4213_3_8_nud_probe_passes_the_6in4_tunnel_checks(target: str) -> None:
    outer = IP(src=REMOTE4, dst=GW4) / probe(target)
    result = check_inbound(raw(outer), policy("6in4"))
    assert not isinstance(result, DropReason), result


def test_rfc3964_5_1_nud_probe_never_decapsulated_from_6to4() -> None:
    outer = IP(src=CLIENT4, dst=GW4) / probe(GW6_6TO4, src=CLIENT6_6TO4)
    assert check_inbound(raw(outer), policy("6to4")) is DropReason.NEIGHBOR_DISCOVERY


def test_rfc4213_3_8_other_nd_still_dropped_on_6in4() -> None:
    outer = IP(src=REMOTE4, dst=GW4) / IPv6(src=LINK_LOCAL_PEER, dst=LINK_LOCAL_GW,
                                            hlim=255) / ICMPv6ND_RA()
    assert check_inbound(raw(outer), policy("6in4")) is DropReason.NEIGHBOR_DISCOVERY


def test_rfc4213_3_6_link_local_source_still_martian_on_6to4() -> None:
    outer = IP(src=CLIENT4, dst=GW4) / IPv6(src=LINK_LOCAL_PEER, dst=GW6_6TO4) / b"x"
    assert check_inbound(raw(outer), policy("6to4")) is DropReason.MARTIAN_SOURCE


@pytest.mark.parametrize("target", [LINK_LOCAL_GW, GW6_6IN4])
def test_rfc4861_7_2_4_solicited_advertisement_answers_nud(target: str) -> None:
    party = TwoParty(make_datapath("6in4"))
    step = party.client(probe(target))
    answer = step.only_outbound()
    assert step.drops == {}
    assert step.outer_destinations == [REMOTE4]
    assert (answer.src, answer.dst, answer.hlim) == (target, LINK_LOCAL_PEER, 255)
    na = answer[ICMPv6ND_NA]
    assert (na.tgt, na.S, na.O, na.R) == (target, 1, 1, 0)
    recomputed = IPv6(raw(answer))
    del recomputed[ICMPv6ND_NA].cksum
    assert IPv6(raw(recomputed))[ICMPv6ND_NA].cksum == na.cksum


@pytest.mark.parametrize(("packet", "reason"), [
    (probe(GW6_6IN4, hlim=64), DropReason.NEIGHBOR_DISCOVERY),  # RFC 4861 §7.1.1: hop limit
    (probe("2001:db8:ff::99", dst=GW6_6IN4), DropReason.NOT_OUR_ADDRESS),  # not our target
], ids=["hop_limit_not_255", "foreign_target"])
def test_rfc4861_7_1_1_invalid_solicitation_ignored(packet: IPv6, reason: DropReason) -> None:
    step = TwoParty(make_datapath("6in4")).client(packet)
    assert step.outbound == [] and step.drops == {reason: 1}


def test_no_advertisement_in_6to4_mode() -> None:
    step = TwoParty(make_datapath("6to4")).client(probe(GW6_6TO4, src=CLIENT6_6TO4))
    assert step.outbound == [] and step.drops == {DropReason.NEIGHBOR_DISCOVERY: 1}


def test_echo_to_6in4_link_local_answered() -> None:
    party = TwoParty(make_datapath("6in4"))
    step = party.client(IPv6(src=LINK_LOCAL_PEER, dst=LINK_LOCAL_GW)
                        / ICMPv6EchoRequest(id=7, seq=1, data=b"nud"))
    reply = step.only_outbound()
    assert reply.src == LINK_LOCAL_GW and reply[ICMPv6EchoReply].data == b"nud"
