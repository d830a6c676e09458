"""workers/engine/tunnel.py: decapsulation checks (RFC 4213 §3.6, RFC 3964 §5), 6to4 addresses
(RFC 3056 §2) and where outbound packets go (RFC 3056 §5.3, RFC 4213 §3).

Outer and inner packets are built with scapy; each table row names the rule it checks.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_Redirect,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrDestOpt,
)
from scapy.packet import Packet, Raw, raw
from support.helpers import (
    CLIENT4,
    CLIENT6_6TO4,
    GW4,
    GW6_6IN4,
    GW6_6TO4,
    NATIVE6,
    POLICY_6IN4,
    POLICY_6TO4,
    RELAY4,
    REMOTE4,
    packed4,
    packed6,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.tunnel import (
    DEFAULT_MARTIAN_IPV4,
    MARTIAN_IPV6_DESTINATION,
    MARTIAN_IPV6_SOURCE,
    TunnelPolicy,
    check_inbound,
    embedded_ipv4,
    outer_destination,
    prefix_6to4,
)


def six_to_four(v4: str, suffix: str = "::1") -> str:
    """2002:V4ADDR::suffix (RFC 3056 §2)."""
    return str(ipaddress.IPv6Address(
        b"\x20\x02" + packed4(v4) + ipaddress.IPv6Address(suffix).packed[6:]))


def outer(inner: bytes | Packet, *, src: str = CLIENT4, dst: str = GW4, proto: int = 41,
          pad: bytes = b"") -> bytes:
    return raw(IP(src=src, dst=dst, proto=proto) / Raw(raw(inner))) + pad


def inner(src: str = CLIENT6_6TO4, dst: str = GW6_6TO4, upper: Packet | None = None) -> bytes:
    return raw(IPv6(src=src, dst=dst) / (upper if upper is not None else
                                         UDP(sport=1, dport=53) / Raw(b"q")))


def accepted(result: object) -> tuple[bytes, bytes]:
    assert not isinstance(result, DropReason), f"dropped: {result}"
    packet, src4 = result  # type: ignore[misc]
    return bytes(packet), src4


# --- RFC 3056 §2 / §5.3 -----------------------------------------------------------------------

@pytest.mark.parametrize(("addr", "expected"), [
    ("2002:c000:20a::1", "192.0.2.10"),
    ("2002:c633:6401:5::ffff", "198.51.100.1"),
    ("2002:ffff:ffff::", "255.255.255.255"),
    ("2002::", "0.0.0.0"),
    ("2001:db8::1", None),
    ("2003:c000:20a::1", None),
    ("::ffff:192.0.2.1", None),
])
def test_rfc3056_2_embedded_ipv4(addr: str, expected: str | None) -> None:
    got = embedded_ipv4(packed6(addr))
    assert got == (packed4(expected) if expected else None)


@pytest.mark.parametrize(("v4", "prefix"), [
    ("192.0.2.10", "2002:c000:20a::/48"),
    ("198.51.100.1", "2002:c633:6401::/48"),
    ("1.2.3.4", "2002:102:304::/48"),
])
def test_rfc3056_2_site_prefix(v4: str, prefix: str) -> None:
    assert prefix_6to4(v4) == ipaddress.IPv6Network(prefix)


@pytest.mark.parametrize(("dst6", "mode", "expected"), [
    # RFC 3056 §5.3: a 2002::/16 destination is reached at its embedded IPv4 address ...
    pytest.param(CLIENT6_6TO4, "6to4", CLIENT4, id="6to4_to_6to4_site"),
    pytest.param("2002:cb00:7107::42", "6to4", "203.0.113.7", id="6to4_other_site"),
    # ... any other IPv6 destination through the configured relay (RFC 3068 / RFC 7526).
    pytest.param(NATIVE6, "6to4", RELAY4, id="6to4_native_via_relay"),
    pytest.param("2a00:1450::1", "6to4", RELAY4, id="6to4_native2_via_relay"),
    # RFC 4213 §3: a configured tunnel has exactly one peer, whatever the destination.
    pytest.param(NATIVE6, "6in4", REMOTE4, id="6in4_native"),
    pytest.param(CLIENT6_6TO4, "6in4", REMOTE4, id="6in4_even_for_2002"),
])
def test_rfc3056_5_3_and_rfc4213_3_outer_destination(dst6: str, mode: str,
                                                     expected: str) -> None:
    got = outer_destination(packed6(dst6), mode, packed4(REMOTE4) if mode == "6in4" else None,
                            packed4(RELAY4) if mode == "6to4" else None)
    assert got == packed4(expected)


def test_tunnel_policy_build_packs_addresses() -> None:
    assert POLICY_6TO4.local_ipv4 == packed4(GW4)
    assert POLICY_6TO4.remote_ipv4 is None
    assert POLICY_6TO4.addresses == frozenset({packed6(GW6_6TO4)})
    assert POLICY_6IN4.remote_ipv4 == packed4(REMOTE4)
    assert len(POLICY_6TO4.martian_ipv4.rows) == len(DEFAULT_MARTIAN_IPV4)
    empty = TunnelPolicy.build("6to4", GW4, None, [GW6_6TO4], martian_ipv4=())
    assert empty.martian_ipv4.rows == ()
    assert packed4("10.1.2.3") not in empty.martian_ipv4


# --- accepted packets -------------------------------------------------------------------------

def test_rfc4213_3_6_decapsulates_inner_packet_and_outer_source() -> None:
    pkt = inner()
    got, src4 = accepted(check_inbound(outer(pkt), POLICY_6TO4))
    assert got == pkt
    assert src4 == packed4(CLIENT4)


def test_rfc4213_3_6_length_from_ipv6_payload_length_padding_removed() -> None:
    # The IPv4 packet may be padded (its total length larger than the IPv6 packet).
    pkt = inner()
    padded = raw(IP(src=CLIENT4, dst=GW4, proto=41) / Raw(pkt + b"\0" * 6))
    got, _ = accepted(check_inbound(padded, POLICY_6TO4))
    assert got == pkt


def test_rfc791_bytes_after_ipv4_total_length_ignored() -> None:
    pkt = inner()
    got, _ = accepted(check_inbound(outer(pkt, pad=b"\xee" * 5), POLICY_6TO4))
    assert got == pkt


def test_rfc3068_6to4_native_source_from_any_relay_accepted() -> None:
    # Native IPv6 arrives from whichever relay is nearest the sender, with its own IPv4.
    pkt = inner(src=NATIVE6)
    got, src4 = accepted(check_inbound(outer(pkt, src="203.0.113.77"), POLICY_6TO4))
    assert got == pkt and src4 == packed4("203.0.113.77")


@pytest.mark.parametrize("v4", ["192.0.2.1", "198.51.100.200", "203.0.113.9"])
def test_rfc5737_documentation_ranges_not_martian(v4: str) -> None:
    pkt = inner(src=six_to_four(v4))
    accepted(check_inbound(outer(pkt, src=v4), POLICY_6TO4))


def test_rfc3849_documentation_ipv6_source_not_martian() -> None:
    pkt = inner(src="2001:db8::dead", dst=GW6_6IN4)
    accepted(check_inbound(outer(pkt, src=REMOTE4), POLICY_6IN4))


def test_rfc4213_3_6_6in4_accepts_configured_peer() -> None:
    pkt = inner(src=NATIVE6, dst=GW6_6IN4)
    got, src4 = accepted(check_inbound(outer(pkt, src=REMOTE4), POLICY_6IN4))
    assert got == pkt and src4 == packed4(REMOTE4)


def test_rfc4213_6in4_does_not_apply_6to4_embed_check() -> None:
    # A 6to4-addressed client behind the broker: the broker's IPv4 is not the embedded one.
    pkt = inner(src=CLIENT6_6TO4, dst=GW6_6IN4)
    accepted(check_inbound(outer(pkt, src=REMOTE4), POLICY_6IN4))


def test_rfc4443_4_echo_request_decapsulated() -> None:
    pkt = inner(upper=ICMPv6EchoRequest(id=1, seq=2, data=b"ping"))
    got, _ = accepted(check_inbound(outer(pkt), POLICY_6TO4))
    assert got == pkt


# --- dropped packets --------------------------------------------------------------------------

@pytest.mark.parametrize(("packet", "expected"), [
    pytest.param(b"", DropReason.TRUNCATED, id="empty"),
    pytest.param(outer(inner())[:19], DropReason.TRUNCATED, id="outer_short"),
    pytest.param(b"\x65" + outer(inner())[1:], DropReason.BAD_VERSION, id="outer_version_6"),
    pytest.param(b"\x44" + outer(inner())[1:], DropReason.BAD_HEADER, id="outer_ihl_4"),
    pytest.param(b"\x4f" + outer(inner())[1:40], DropReason.TRUNCATED, id="ihl_past_end"),
    pytest.param(outer(inner(), proto=4), DropReason.NOT_PROTO_41, id="ipip_not_41"),
    pytest.param(outer(inner(), proto=17), DropReason.NOT_PROTO_41, id="udp_not_41"),
    pytest.param(outer(inner()[:39]), DropReason.TRUNCATED, id="inner_short"),
    pytest.param(outer(b"\x40" + inner()[1:]), DropReason.BAD_VERSION, id="inner_version_4"),
    pytest.param(outer(inner()[:-1]), DropReason.TRUNCATED, id="inner_payload_cut"),
    pytest.param(outer(inner(dst="2002:c000:20a::2")), DropReason.NOT_OUR_ADDRESS,
                 id="not_our_address"),
])
def test_rfc4213_3_6_malformed_dropped(packet: bytes, expected: DropReason) -> None:
    assert check_inbound(packet, POLICY_6TO4) is expected


@pytest.mark.parametrize("peer", ["203.0.113.2", CLIENT4, GW4, "0.0.0.0"])
def test_rfc4213_3_6_wrong_peer_dropped_silently(peer: str) -> None:
    # Silently: the result is only a reason, there is no packet to send back.
    pkt = inner(src=NATIVE6, dst=GW6_6IN4)
    assert check_inbound(outer(pkt, src=peer), POLICY_6IN4) is DropReason.WRONG_TUNNEL_PEER


def test_rfc3964_5_2_spoofed_6to4_source_dropped() -> None:
    # Inner source 2002:<198.51.100.1>:: but the outer source is another host.
    pkt = inner(src=CLIENT6_6TO4)
    assert check_inbound(outer(pkt, src="198.51.100.2"), POLICY_6TO4) is DropReason.SPOOFED_6TO4


def test_rfc3964_5_2_spoofed_6to4_destination_dropped() -> None:
    # Our 2002:<192.0.2.10>::1 inside an IPv4 packet sent to another of our IPv4 addresses.
    pkt = inner(src=NATIVE6)
    assert check_inbound(outer(pkt, src=RELAY4, dst="192.0.2.11"),
                         POLICY_6TO4) is DropReason.SPOOFED_6TO4


MARTIAN4_SAMPLES = {
    "0.0.0.0/8": "0.1.2.3",
    "10.0.0.0/8": "10.20.30.40",
    "127.0.0.0/8": "127.0.0.1",
    "169.254.0.0/16": "169.254.1.1",
    "172.16.0.0/12": "172.31.255.254",
    "192.168.0.0/16": "192.168.1.1",
    "224.0.0.0/4": "224.0.0.1",
    "240.0.0.0/4": "255.255.255.255",
}


def test_martian_ipv4_table_has_a_sample_per_row() -> None:
    assert sorted(MARTIAN4_SAMPLES) == sorted(cidr for cidr, _why in DEFAULT_MARTIAN_IPV4)
    for cidr, sample in MARTIAN4_SAMPLES.items():
        assert ipaddress.IPv4Address(sample) in ipaddress.IPv4Network(cidr)


@pytest.mark.parametrize("cidr", sorted(MARTIAN4_SAMPLES))
def test_rfc3964_5_3_1_martian_outer_source_dropped(cidr: str) -> None:
    pkt = inner(src=NATIVE6)
    assert check_inbound(outer(pkt, src=MARTIAN4_SAMPLES[cidr]),
                         POLICY_6TO4) is DropReason.MARTIAN_SOURCE


@pytest.mark.parametrize("cidr", sorted(MARTIAN4_SAMPLES))
def test_rfc3964_5_3_1_martian_ipv4_embedded_in_2002_dropped(cidr: str) -> None:
    v4 = MARTIAN4_SAMPLES[cidr]
    pkt = inner(src=six_to_four(v4))
    # Outer source consistent with the embedded address: still a martian.
    assert check_inbound(outer(pkt, src=v4), POLICY_6TO4) is DropReason.MARTIAN_SOURCE
    # Outer source a plausible relay: the embed check catches it first.
    assert check_inbound(outer(pkt, src=RELAY4), POLICY_6TO4) is DropReason.SPOOFED_6TO4


def test_rfc3964_5_3_1_martian_table_is_configurable() -> None:
    # With an empty table (operator's choice) a 10/8 6to4 peer is accepted.
    open_policy = TunnelPolicy.build("6to4", GW4, None, [GW6_6TO4], martian_ipv4=())
    pkt = inner(src=six_to_four("10.1.2.3"))
    accepted(check_inbound(outer(pkt, src="10.1.2.3"), open_policy))


MARTIAN6_SOURCE_SAMPLES = {
    "::/128": "::",
    "::1/128": "::1",
    "::/96": "::c000:201",
    "::ffff:0:0/96": "::ffff:c000:201",
    "fe80::/10": "fe80::1",
    "ff00::/8": "ff02::1",
}
MARTIAN6_DESTINATION_SAMPLES = {
    "::/128": "::",
    "::1/128": "::1",
    "::/96": "::c000:20a",
    "::ffff:0:0/96": "::ffff:c000:20a",
    "ff00::/8": "ff02::1",
}


def test_martian_ipv6_tables_have_a_sample_per_row() -> None:
    assert sorted(MARTIAN6_SOURCE_SAMPLES) == sorted(c for c, _ in MARTIAN_IPV6_SOURCE)
    assert sorted(MARTIAN6_DESTINATION_SAMPLES) == sorted(c for c, _ in MARTIAN_IPV6_DESTINATION)
    for table in (MARTIAN6_SOURCE_SAMPLES, MARTIAN6_DESTINATION_SAMPLES):
        for cidr, sample in table.items():
            assert ipaddress.IPv6Address(sample) in ipaddress.IPv6Network(cidr)


@pytest.mark.parametrize("mode", ["6to4", "6in4"])
@pytest.mark.parametrize("cidr", sorted(MARTIAN6_SOURCE_SAMPLES))
def test_rfc4213_3_6_martian_inner_source_dropped(mode: str, cidr: str) -> None:
    policy, ours, src4 = ((POLICY_6TO4, GW6_6TO4, CLIENT4) if mode == "6to4"
                          else (POLICY_6IN4, GW6_6IN4, REMOTE4))
    pkt = inner(src=MARTIAN6_SOURCE_SAMPLES[cidr], dst=ours)
    result = check_inbound(outer(pkt, src=src4), policy)
    if mode == "6in4" and cidr == "fe80::/10":
        # RFC 4213 §3.7: a configured tunnel is a link; its peer may use link-local sources.
        assert not isinstance(result, DropReason), result
    else:
        assert result is DropReason.MARTIAN_SOURCE


@pytest.mark.parametrize("mode", ["6to4", "6in4"])
@pytest.mark.parametrize("cidr", sorted(MARTIAN6_DESTINATION_SAMPLES))
def test_rfc3964_5_3_1_martian_inner_destination_dropped(mode: str, cidr: str) -> None:
    policy, src4 = (POLICY_6TO4, RELAY4) if mode == "6to4" else (POLICY_6IN4, REMOTE4)
    pkt = inner(src=NATIVE6, dst=MARTIAN6_DESTINATION_SAMPLES[cidr])
    assert check_inbound(outer(pkt, src=src4), policy) is DropReason.MARTIAN_DESTINATION


ND_MESSAGES = {
    133: ICMPv6ND_RS(),
    134: ICMPv6ND_RA(),
    135: ICMPv6ND_NS(tgt=GW6_6TO4),
    136: ICMPv6ND_NA(tgt=GW6_6TO4),
    137: ICMPv6ND_Redirect(tgt=GW6_6TO4, dst=NATIVE6),
}


@pytest.mark.parametrize("icmp_type", sorted(ND_MESSAGES))
def test_rfc3964_5_1_neighbor_discovery_never_decapsulated(icmp_type: int) -> None:
    pkt = inner(upper=ND_MESSAGES[icmp_type])
    assert pkt[40] == icmp_type
    assert check_inbound(outer(pkt), POLICY_6TO4) is DropReason.NEIGHBOR_DISCOVERY


def test_rfc3964_5_1_neighbor_discovery_behind_extension_header_never_decapsulated() -> None:
    pkt = raw(IPv6(src=CLIENT6_6TO4, dst=GW6_6TO4, hlim=255) / IPv6ExtHdrDestOpt()
              / ICMPv6ND_NS(tgt=GW6_6TO4))
    assert check_inbound(outer(pkt), POLICY_6TO4) is DropReason.NEIGHBOR_DISCOVERY
