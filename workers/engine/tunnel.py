"""6to4, 6rd and 6in4 tunnel logic: decapsulation checks, address tables, outer destinations.

Implements RFC 4213 §3.5-§3.6 (decapsulation, configured tunnel peer check), RFC 3056 §2 and
§5.3 (6to4 prefix and where packets are sent), RFC 3964 §5 (6to4 spoofing and martian checks,
as Linux ``net/ipv6/sit.c`` ``packet_is_spoofed`` and KAME ``if_stf.c``), RFC 5969 §4, §7.1.1
and §12 (6rd: the delegated prefix, where packets are sent, the source checks). Pure: no I/O.
The coordinator runs ``check_inbound`` on every received proto-41 packet before fan-out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.packet import (
    PROTO_DSTOPTS,
    PROTO_FRAGMENT,
    PROTO_HOPOPT,
    PROTO_ICMPV6,
    PROTO_IPV6,
    PROTO_ROUTING,
    PROTO_TCP,
    PROTO_UDP,
    ParameterProblem,
    checksum_offset,
    parse_ipv4,
    parse_ipv6,
    pseudo_sum_v6,
    set_checksum,
)

PREFIX_6TO4 = b"\x20\x02"


def embedded_ipv4(addr6: bytes) -> bytes | None:
    """The IPv4 address a 2002:V4ADDR::/48 address embeds (RFC 3056 §2), else None."""
    if addr6[:2] == PREFIX_6TO4:
        return addr6[2:6]
    return None


def prefix_6to4(ipv4: str) -> ipaddress.IPv6Network:
    """The /48 6to4 site prefix of a public IPv4 address (RFC 3056 §2)."""
    v4 = ipaddress.IPv4Address(ipv4).packed
    return ipaddress.IPv6Network((PREFIX_6TO4 + v4 + bytes(10), 48))


@dataclass(frozen=True)
class SixrdDomain:
    """An ISP's 6rd domain (RFC 5969 §4): its 6rd prefix, how many high bits every CE's IPv4
    address in it shares (``mask_len``, IPv4MaskLen; they are left out of the addresses), and
    its border relay."""

    prefix: int  # the 6rd prefix as a 128-bit value
    prefix_len: int
    mask_len: int
    common: int  # the shared high bits, in place in a 32-bit value
    relay: bytes

    @staticmethod
    def build(prefix: str, mask_len: int, relay: str, ipv4: str) -> SixrdDomain:
        net = ipaddress.IPv6Network(prefix)
        own = int(ipaddress.IPv4Address(ipv4))
        common = own & ~((1 << (32 - mask_len)) - 1) & 0xFFFFFFFF if mask_len else 0
        return SixrdDomain(int(net.network_address), net.prefixlen, mask_len, common,
                           ipaddress.IPv4Address(relay).packed)

    def delegated(self, ipv4: str) -> ipaddress.IPv6Network:
        """RFC 5969 §4: a CE's delegated prefix, the 6rd prefix followed by its IPv4 address
        without the ``mask_len`` shared bits."""
        bits = 32 - self.mask_len
        suffix = int(ipaddress.IPv4Address(ipv4)) & ((1 << bits) - 1)
        length = self.prefix_len + bits
        return ipaddress.IPv6Network((self.prefix | suffix << (128 - length), length))

    def embedded_ipv4(self, addr6: bytes) -> bytes | None:
        """RFC 5969 §7.1.1: the IPv4 address of the CE a 6rd-domain address belongs to (the
        shared bits, then the bits after the 6rd prefix), else None: not in the domain."""
        value = int.from_bytes(addr6, "big")
        shift = 128 - self.prefix_len
        if value >> shift != self.prefix >> shift:
            return None
        bits = 32 - self.mask_len
        suffix = value >> (shift - bits) & ((1 << bits) - 1)
        return (self.common | suffix).to_bytes(4, "big")


# RFC 3964 §5.3.1 / RFC 6890: IPv4 ranges that must never appear as a tunnel endpoint or
# inside a 2002::/16 address. The documentation ranges (RFC 5737) are deliberately absent:
# they are what labs and examples use. Operators may replace this table in the config.
DEFAULT_MARTIAN_IPV4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "RFC 1122 §3.2.1.3: this network"),
    ("10.0.0.0/8", "RFC 1918: private"),
    ("127.0.0.0/8", "RFC 1122 §3.2.1.3: loopback"),
    ("169.254.0.0/16", "RFC 3927: link local"),
    ("172.16.0.0/12", "RFC 1918: private"),
    ("192.168.0.0/16", "RFC 1918: private"),
    ("224.0.0.0/4", "RFC 5771: multicast"),
    ("240.0.0.0/4", "RFC 1112 §4: reserved, includes 255.255.255.255 broadcast"),
)


class NetTable:
    """A prefix table for per-packet membership tests, built once at start-up.

    Most addresses on the wire share no first byte with any row (no martian table row starts
    with 198, say), so the set of first bytes the rows can match answers them with one set
    lookup; only the rest are compared row by row.
    """

    __slots__ = ("rows", "first_bytes")

    def __init__(self, rows: tuple[tuple[str, str], ...]) -> None:
        pairs = []
        first: set[int] = set()
        for cidr, _why in rows:
            net = ipaddress.ip_network(cidr)
            pairs.append((int(net.network_address), int(net.netmask)))
            head = net.network_address.packed[0]
            span = 1 << max(0, 8 - net.prefixlen)
            first.update(range(head, head + span))
        self.rows = tuple(pairs)
        self.first_bytes = frozenset(first)

    def __contains__(self, addr: bytes) -> bool:
        if addr[0] not in self.first_bytes:
            return False
        value = int.from_bytes(addr, "big")
        return any(value & mask == net for net, mask in self.rows)



# RFC 4213 §3.6 and RFC 3964 §5.3.1: inner IPv6 sources that are never valid on the wire.
MARTIAN_IPV6_SOURCE: tuple[tuple[str, str], ...] = (
    ("::/128", "RFC 4291 §2.5.2: unspecified"),
    ("::1/128", "RFC 4291 §2.5.3: loopback"),
    ("::/96", "RFC 4291 §2.5.5.1: IPv4-compatible, deprecated"),
    ("::ffff:0:0/96", "RFC 4291 §2.5.5.2: IPv4-mapped"),
    ("fe80::/10", "RFC 4291 §2.5.6: link local, never from beyond the tunnel (RFC 3964 §5.1)"),
    ("ff00::/8", "RFC 4213 §3.6: multicast source"),
)
# RFC 3964 §5.3.1: destinations a tunnel must not carry to us.
MARTIAN_IPV6_DESTINATION: tuple[tuple[str, str], ...] = (
    ("::/128", "RFC 4291 §2.5.2: unspecified"),
    ("::1/128", "RFC 4291 §2.5.3: loopback"),
    ("::/96", "RFC 4291 §2.5.5.1: IPv4-compatible, deprecated"),
    ("::ffff:0:0/96", "RFC 4291 §2.5.5.2: IPv4-mapped"),
    ("ff00::/8", "RFC 4443 §2.4(e.3): multicast; we are a unicast gateway"),
)
_MARTIAN_SRC6 = NetTable(MARTIAN_IPV6_SOURCE)
# RFC 4213 §3.7: a configured tunnel is a link with link-local addresses, so its peer may use
# fe80::/10 as a source (NUD probes, §3.8); every other row still applies.
_MARTIAN_SRC6_6IN4 = NetTable(tuple(r for r in MARTIAN_IPV6_SOURCE if r[0] != "fe80::/10"))
_MARTIAN_DST6 = NetTable(MARTIAN_IPV6_DESTINATION)

# RFC 3964 §5.1: Neighbor Discovery and Redirect must never be decapsulated (ICMPv6 133-137).
ND_TYPES = frozenset(range(133, 138))
ND_NEIGHBOR_SOLICITATION = 135
EXTENSION_HEADERS = frozenset((PROTO_HOPOPT, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS))


def link_local_6in4(local_ipv4: bytes) -> bytes:
    """RFC 4213 §3.7: fe80::/64 with the 32-bit IPv4 address as interface identifier."""
    return b"\xfe\x80" + bytes(10) + local_ipv4


def our_addresses(mode: str, public_ipv4: str, addresses: list[str] | tuple[str, ...]) -> (
        frozenset[bytes]):
    """Every IPv6 address the gateway answers for: the configured ones, plus the tunnel's
    link-local address in 6in4 mode (RFC 4213 §3.7: from the IPv4 address the peer knows the
    tunnel by, the public one behind a 1:1 NAT)."""
    out = {ipaddress.IPv6Address(a).packed for a in addresses}
    if mode == "6in4":
        out.add(link_local_6in4(ipaddress.IPv4Address(public_ipv4).packed))
    return frozenset(out)


@dataclass(frozen=True)
class TunnelPolicy:
    """What ``check_inbound`` accepts; built once from the settings."""

    mode: str  # "6to4" or "6in4"
    local_ipv4: bytes
    remote_ipv4: bytes | None  # 6in4 only
    # The address the world knows the tunnel by: what 2002::/16 destinations embed (RFC 3964
    # §5.2). Behind a 1:1 NAT packets arrive addressed to ``local_ipv4`` instead.
    public_ipv4: bytes
    addresses: frozenset[bytes]  # our own IPv6 addresses
    martian_ipv4: NetTable
    # A NAT64 served over the tunnel: its prefix's addresses are ours too.
    nat64: Nat64Prefix | None = None
    sixrd: SixrdDomain | None = None  # mode "6rd" only

    @staticmethod
    def build(mode: str, local_ipv4: str, remote_ipv4: str | None, addresses: list[str],
              martian_ipv4: tuple[tuple[str, str], ...] = DEFAULT_MARTIAN_IPV4,
              nat64: Nat64Prefix | None = None, public_ipv4: str = "",
              sixrd: SixrdDomain | None = None) -> TunnelPolicy:
        public_ipv4 = public_ipv4 or local_ipv4
        return TunnelPolicy(
            mode=mode,
            local_ipv4=ipaddress.IPv4Address(local_ipv4).packed,
            remote_ipv4=ipaddress.IPv4Address(remote_ipv4).packed if remote_ipv4 else None,
            public_ipv4=ipaddress.IPv4Address(public_ipv4).packed,
            addresses=our_addresses(mode, public_ipv4, addresses),
            martian_ipv4=NetTable(martian_ipv4),
            nat64=nat64,
            sixrd=sixrd,
        )


def ipv4_is_martian(addr: bytes, policy: TunnelPolicy) -> bool:
    return addr in policy.martian_ipv4


def ipv6_source_is_martian(addr: bytes) -> bool:
    return addr in _MARTIAN_SRC6


def ipv6_destination_is_martian(addr: bytes) -> bool:
    return addr in _MARTIAN_DST6


def packet_is_spoofed_6to4(outer_src: bytes, outer_dst: bytes, src6: bytes,
                           dst6: bytes) -> bool:
    """RFC 3964 §5.2 as Linux sit ``packet_is_spoofed``: 2002::/16 must embed the outer IPv4."""
    v4 = embedded_ipv4(src6)
    if v4 is not None and v4 != outer_src:
        return True
    v4 = embedded_ipv4(dst6)
    return v4 is not None and v4 != outer_dst


# The result of a successful check: (inner IPv6 packet, outer IPv4 source)
Decapsulated = tuple[memoryview, bytes]


# Most address verdicts a ``check_inbound`` cache holds before it starts over (about 5 MB).
ACCEPTED_CACHE_ENTRIES = 65536


def check_inbound(packet: bytes | memoryview, policy: TunnelPolicy,
                  accepted: set[bytes] | None = None) -> Decapsulated | DropReason:
    """Decapsulate one received IPv4 proto-41 packet and apply every tunnel check.

    Returns the inner IPv6 packet (trimmed to its own payload length, RFC 4213 §3.6: the IPv4
    packet may be padded) and the outer source, or the reason to drop it silently.

    ``accepted`` is an optional cache of address verdicts: every check but the length and
    next-header ones depends only on the outer and inner addresses, so once a TCP/UDP packet
    of four addresses passed, the next one with the same addresses only needs its lengths,
    versions and next header checked. ICMPv6 and extension headers always take the full path
    (the Neighbor Discovery rule looks into them).
    """
    buf = memoryview(packet)
    if accepted is not None and len(buf) >= 60 and buf[0] == 0x45 and buf[9] == PROTO_IPV6 \
            and buf[20] >> 4 == 6 and (buf[26] == PROTO_UDP or buf[26] == PROTO_TCP):
        total_len = (buf[2] << 8) | buf[3]
        end = 60 + ((buf[24] << 8) | buf[25])
        if end <= total_len <= len(buf):
            key = bytes(buf[12:20]) + bytes(buf[28:60])
            if key in accepted:
                return buf[20:end], bytes(buf[12:16])
            result = _check_inbound(buf, policy)
            if not isinstance(result, DropReason):
                if len(accepted) >= ACCEPTED_CACHE_ENTRIES:
                    accepted.clear()
                accepted.add(key)
            return result
    return _check_inbound(buf, policy)


def _check_inbound(buf: memoryview, policy: TunnelPolicy) -> Decapsulated | DropReason:
    # The kernel verified the outer header checksum before raw-socket delivery (ip_rcv).
    outer = parse_ipv4(buf, verify_checksum=False)
    if isinstance(outer, DropReason):
        return outer
    header_len, total_len, _id, _frag, _ttl, proto, src4, dst4, _tos = outer
    if proto != PROTO_IPV6:
        return DropReason.NOT_PROTO_41
    # RFC 4213 §3.6: a configured tunnel accepts only its configured peer, silently.
    if policy.mode == "6in4":
        if src4 != policy.remote_ipv4:
            return DropReason.WRONG_TUNNEL_PEER
    # RFC 3964 §5.3.1: the outer source must be a plausible unicast address.
    elif src4 in policy.martian_ipv4:
        return DropReason.MARTIAN_SOURCE
    inner = buf[header_len:total_len]
    if len(inner) < 40:
        return DropReason.TRUNCATED
    if inner[0] >> 4 != 6:
        return DropReason.BAD_VERSION
    src6 = bytes(inner[8:24])
    dst6 = bytes(inner[24:40])
    payload_len = (inner[4] << 8) | inner[5]
    if 40 + payload_len > len(inner):
        return DropReason.TRUNCATED
    inner = inner[:40 + payload_len]
    # RFC 4213 §3.6 / RFC 3964 §5.3.1: martian inner addresses are discarded silently.
    if src6 in (_MARTIAN_SRC6_6IN4 if policy.mode == "6in4" else _MARTIAN_SRC6):
        return DropReason.MARTIAN_SOURCE
    if dst6 in _MARTIAN_DST6:
        return DropReason.MARTIAN_DESTINATION
    if policy.mode == "6to4":
        # RFC 3964 §5.2 (Linux sit packet_is_spoofed), with the address the sender meant: a
        # 1:1 NAT in front rewrote the public destination to ``local_ipv4``.
        if packet_is_spoofed_6to4(src4, policy.public_ipv4 if dst4 == policy.local_ipv4
                                  else dst4, src6, dst6):
            return DropReason.SPOOFED_6TO4
        # RFC 3964 §5.3.1: a 2002::/16 source must not embed a martian IPv4 address.
        v4 = embedded_ipv4(src6)
        if v4 is not None and v4 in policy.martian_ipv4:
            return DropReason.MARTIAN_SOURCE
    elif policy.sixrd is not None:
        # RFC 5969 §12 (Linux sit: check_6rd): a source inside the 6rd domain must be the CE
        # the outer source is; any other source only comes through the border relay.
        v4 = policy.sixrd.embedded_ipv4(src6)
        spoofed = v4 != src4 if v4 is not None else src4 != policy.sixrd.relay
        if spoofed:
            return DropReason.SPOOFED_6RD
    if dst6 not in policy.addresses and (policy.nat64 is None
                                         or policy.nat64.extract(dst6) is None):
        return DropReason.NOT_OUR_ADDRESS
    # RFC 3964 §5.1: never decapsulate Neighbor Discovery (link-local attacks from afar);
    # a configured tunnel must answer its peer's NUD probes (RFC 4213 §3.8), so 6in4 lets
    # Neighbor Solicitations through.
    next_header = inner[6]
    if next_header == PROTO_ICMPV6:
        if len(inner) > 40 and inner[40] in ND_TYPES and not (
                policy.mode == "6in4" and inner[40] == ND_NEIGHBOR_SOLICITATION):
            return DropReason.NEIGHBOR_DISCOVERY
    elif next_header in EXTENSION_HEADERS:
        view = parse_ipv6(inner)
        if isinstance(view, DropReason):
            return view
        if isinstance(view, ParameterProblem):
            return inner, src4  # the datapath answers it (RFC 8200 §4)
        offset = view[5]
        if (view[4] == PROTO_ICMPV6 and view[6] is None and len(inner) > offset
                and inner[offset] in ND_TYPES):
            return DropReason.NEIGHBOR_DISCOVERY
    return inner, src4


def complete_checksum(packet: bytes) -> bytes:
    """The captured protocol-41 ``packet`` with its inner TCP/UDP checksum computed whole.

    For a packet the kernel marked CHECKSUM_PARTIAL (TP_STATUS_CSUMNOTREADY: it came from a
    peer on this host or hypervisor whose stack left the checksum to an offload that never ran,
    or it was merged by GRO after its pieces were verified), the checksum field holds only the
    pseudo-header sum. Such a packet never crossed a wire unverified, so its checksum is
    computed here, as the offload would have, and the engine then verifies it like any other;
    packets off the wire are never passed through this. Anything else (not TCP/UDP, a fragment,
    a broken header) is returned unchanged, for the engine to count."""
    outer = parse_ipv4(packet, verify_checksum=False)
    if isinstance(outer, DropReason) or outer[5] != PROTO_IPV6:
        return packet
    header_len, total_len = outer[0], outer[1]
    inner = packet[header_len:total_len]
    view = parse_ipv6(inner)
    if not isinstance(view, tuple) or view[6] is not None:
        return packet
    proto, offset = view[4], view[5]
    at = checksum_offset(proto)
    if proto not in (PROTO_TCP, PROTO_UDP) or at is None or len(inner) < offset + at + 2:
        return packet
    segment = bytearray(inner[offset:40 + view[0]])
    set_checksum(segment, at, pseudo_sum_v6(view[2], view[3], proto, len(segment)),
                 udp=proto == PROTO_UDP)
    start = header_len + offset
    return packet[:start] + bytes(segment) + packet[start + len(segment):]


def outer_destination(dst6: bytes, mode: str, remote_ipv4: bytes | None,
                      relay_ipv4: bytes | None, sixrd: SixrdDomain | None = None
                      ) -> bytes | None:
    """Where an outbound IPv6 packet is sent in IPv4 (RFC 3056 §5.3, RFC 4213 §3, RFC 5969
    §7.1.1: a 6rd-domain destination to its CE, every other one to the border relay)."""
    if mode == "6in4":
        return remote_ipv4
    if sixrd is not None:
        v4 = sixrd.embedded_ipv4(dst6)
        return v4 if v4 is not None else sixrd.relay
    v4 = embedded_ipv4(dst6)
    if v4 is not None:
        return v4
    return relay_ipv4



def peer_tunnels(tunnels: Sequence[tuple[str, bytes | None]]) -> tuple[dict[bytes, int], int]:
    """Which of several tunnels, given as (mode, 6in4 broker), a protocol-41 packet belongs
    to by its outer IPv4 source: the 6in4 tunnel of that broker (RFC 4213 §3.6 names one
    source per configured tunnel), else the one 6to4 or 6rd tunnel (any source), else the
    first (whose checks then refuse it). (broker -> index, the index of every other source)."""
    by_broker = {remote: index for index, (mode, remote) in enumerate(tunnels)
                 if mode == "6in4" and remote is not None}
    other = next((index for index, (mode, _) in enumerate(tunnels) if mode != "6in4"), 0)
    return by_broker, other


@dataclass
class Tunnel:
    """One tunnel as the engine runs it (several with ``[[tunnel]]``, issue 19): its checks
    and their verdict cache, and where its outbound packets go."""

    name: str
    policy: TunnelPolicy
    relay_ipv4: bytes | None  # 6to4: the relay; 6rd: the border relay
    accepted: set[bytes]  # ``check_inbound``'s cache for this policy

    @property
    def mode(self) -> str:
        return self.policy.mode

    def outer_destination(self, dst6: bytes) -> bytes | None:
        policy = self.policy
        return outer_destination(dst6, policy.mode, policy.remote_ipv4, self.relay_ipv4,
                                 policy.sixrd)


@dataclass(frozen=True)
class TunnelTable:
    """Which tunnel a packet belongs to. In: by the outer source (``peer_tunnels``). Out: by
    our IPv6 source address, the tunnel it belongs to; an address several share (the 6in4
    link-local fe80::<our IPv4>) or none (a NAT64 address), and every address when there is
    one tunnel, leaves by the tunnel the packet being answered came in by."""

    tunnels: tuple[Tunnel, ...]
    by_remote: dict[bytes, Tunnel]
    any_source: Tunnel
    by_address: dict[bytes, Tunnel]

    @staticmethod
    def build(tunnels: list[Tunnel]) -> TunnelTable:
        by_broker, other = peer_tunnels([(t.mode, t.policy.remote_ipv4) for t in tunnels])
        owners: dict[bytes, list[Tunnel]] = {}
        for tunnel in tunnels:
            for address in tunnel.policy.addresses:
                owners.setdefault(address, []).append(tunnel)
        by_address = ({a: ts[0] for a, ts in owners.items() if len(ts) == 1}
                      if len(tunnels) > 1 else {})
        return TunnelTable(tuple(tunnels), {b: tunnels[i] for b, i in by_broker.items()},
                           tunnels[other], by_address)

    def for_outer_source(self, src4: bytes) -> Tunnel:
        return self.by_remote.get(src4, self.any_source)
