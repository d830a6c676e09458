"""workers/engine/nat64.py: RFC 6052 address synthesis and extraction (issue 16, first part).

The reference is RFC 6052 §2.4's own table of examples, written out here by hand; properties
cover every prefix length with hypothesis."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sixgate.workers.engine.nat64 import PREFIX_LENGTHS, WELL_KNOWN_PREFIX, Nat64Prefix

# RFC 6052 §2.4, Table 2 (and §2.1's well-known prefix)
RFC_6052_EXAMPLES = [
    ("2001:db8::/32", "192.0.2.33", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "192.0.2.33", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "192.0.2.33", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "192.0.2.33", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "192.0.2.33", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "192.0.2.33", "2001:db8:122:344::192.0.2.33"),
    (WELL_KNOWN_PREFIX, "192.0.2.33", "64:ff9b::192.0.2.33"),
]


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


@pytest.mark.parametrize(("prefix", "ipv4", "ipv6"), RFC_6052_EXAMPLES)
def test_rfc6052_2_4_examples(prefix: str, ipv4: str, ipv6: str) -> None:
    nat64 = Nat64Prefix.parse(prefix)
    assert nat64.synthesize(v4(ipv4)) == v6(ipv6)
    assert nat64.extract(v6(ipv6)) == v4(ipv4)


@given(st.sampled_from(PREFIX_LENGTHS), st.binary(min_size=16, max_size=16),
       st.binary(min_size=4, max_size=4))
def test_synthesize_then_extract_is_the_identity(length: int, bits: bytes, ipv4: bytes) -> None:
    network = ipaddress.IPv6Network((int.from_bytes(bits, "big") >> (128 - length)
                                     << (128 - length), length))
    packed = bytearray(network.network_address.packed)  # the prefix, suffix bits zero
    if length > 64:
        packed[8] = 0  # RFC 6052 §2.2: bits 64-71 are zero
    nat64 = Nat64Prefix.parse(f"{ipaddress.IPv6Address(bytes(packed))}/{length}")
    address = nat64.synthesize(ipv4)
    assert ipaddress.IPv6Address(address) in ipaddress.IPv6Network((bytes(packed), length))
    assert address[8] == 0  # the u octet, whatever the length
    assert nat64.extract(address) == ipv4


@given(st.binary(min_size=16, max_size=16))
def test_addresses_outside_the_prefix_embed_nothing(address: bytes) -> None:
    nat64 = Nat64Prefix.parse("2001:db8:122::/48")
    inside = address[:6] == v6("2001:db8:122::")[:6] and address[8] == 0
    assert (nat64.extract(address) is not None) == inside


@pytest.mark.parametrize(("text", "why"), [
    ("2001:db8::/33", "/32, /40"),
    ("2001:db8::1/96", "not an IPv6 prefix"),  # host bits set
    ("2001:db8:0:0:ff00::/96", "bits 64 to 71"),
    ("192.0.2.0/24", "not an IPv6 prefix"),
])
def test_prefix_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Nat64Prefix.parse(text)


def test_rfc6052_3_1_well_known_prefix_never_stands_for_a_non_global_address() -> None:
    well_known = Nat64Prefix.parse(WELL_KNOWN_PREFIX)
    assert well_known.well_known
    for private in ("10.1.2.3", "192.168.1.1", "100.64.0.1", "127.0.0.1", "192.0.2.33"):
        assert not well_known.may_represent(v4(private)), private
    assert well_known.may_represent(v4("8.8.8.8"))
    specific = Nat64Prefix.parse("2001:db8:122:344::/96")
    assert not specific.well_known and specific.may_represent(v4("10.1.2.3"))
