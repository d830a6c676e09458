"""RFC 6052 IPv4-embedded IPv6 addresses: the arithmetic of a NAT64 prefix (issue 16).

A NAT64 names every IPv4 host inside one IPv6 prefix: the well-known ``64:ff9b::/96`` (RFC 6052
§2.1) or a network-specific prefix of 32, 40, 48, 56, 64 or 96 bits (§2.2). The 32 IPv4 bits
follow the prefix, skipping bits 64-71 (the "u" octet, always zero), and the suffix after them
is zero. Pure: bytes in, bytes or None out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

WELL_KNOWN_PREFIX = "64:ff9b::/96"  # RFC 6052 §2.1
PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)  # RFC 6052 §2.2
U_OCTET = 8  # byte index of bits 64-71


def _positions(length: int) -> tuple[int, int, int, int]:
    """Byte indexes of the four IPv4 bytes after a prefix of ``length`` bits (§2.2 figure 1)."""
    first, second, third, fourth = [i for i in range(length // 8, 16) if i != U_OCTET][:4]
    return first, second, third, fourth


@dataclass(frozen=True)
class Nat64Prefix:
    """A NAT64 prefix; ``parse`` checks it, ``synthesize``/``extract`` map addresses."""

    network: bytes  # 16 bytes, every bit after the prefix zero
    length: int
    positions: tuple[int, int, int, int]

    @classmethod
    def parse(cls, text: str) -> Nat64Prefix:
        """``text`` like "64:ff9b::/96"; ValueError saying what is wrong."""
        try:
            net = ipaddress.IPv6Network(text)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an IPv6 prefix ({exc})") from None
        if net.prefixlen not in PREFIX_LENGTHS:
            raise ValueError(f"{text!r}: a NAT64 prefix is /32, /40, /48, /56, /64 or /96 "
                             "(RFC 6052 §2.2)")
        packed = net.network_address.packed
        if net.prefixlen > 64 and packed[U_OCTET]:
            raise ValueError(f"{text!r}: bits 64 to 71 must be zero (RFC 6052 §2.2)")
        return cls(packed, net.prefixlen, _positions(net.prefixlen))

    @property
    def well_known(self) -> bool:
        return self.length == 96 and self.network == ipaddress.IPv6Network(
            WELL_KNOWN_PREFIX).network_address.packed

    def synthesize(self, ipv4: bytes) -> bytes:
        """The IPv6 address that stands for ``ipv4`` (4 bytes) under this prefix (§2.2)."""
        address = bytearray(self.network)
        for index, byte in zip(self.positions, ipv4, strict=True):
            address[index] = byte
        return bytes(address)

    def extract(self, ipv6: bytes) -> bytes | None:
        """The IPv4 address ``ipv6`` (16 bytes) embeds, or None when it is not an address of
        this prefix (outside it, or a non-zero u octet, §2.2)."""
        length = self.length
        whole, bits = divmod(length, 8)
        if ipv6[:whole] != self.network[:whole]:
            return None
        if bits and (ipv6[whole] ^ self.network[whole]) >> (8 - bits):
            return None
        if ipv6[U_OCTET] and length < 96:
            return None
        first, second, third, fourth = self.positions
        return bytes((ipv6[first], ipv6[second], ipv6[third], ipv6[fourth]))

    def may_represent(self, ipv4: bytes) -> bool:
        """RFC 6052 §3.1: the well-known prefix must not stand for a non-global IPv4 address
        (private, shared, loopback, documentation...); a network-specific prefix may."""
        return not self.well_known or ipaddress.IPv4Address(ipv4).is_global
