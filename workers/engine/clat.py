"""CLAT, the customer side of 464XLAT (RFC 6877 §6): the host's IPv4 as IPv6 to a NAT64.

Stateless RFC 7915 translation between one IPv4 address of the host (``address4``, RFC 7335's
192.0.0.0/29) and one IPv6 address of the CLAT (``address6``); every IPv4 destination is
written as its RFC 6052 address under the PLAT's prefix, and only packets from that prefix to
``address6`` come back. Ports and ICMP identifiers stay as they are (no state: the NAT64 keeps
the sessions), so TCP/UDP checksums change only by the addresses (RFC 1624), which also works
for a fragment and for a whole packet alike: the kernel hands a TUN device without offloads
(no IFF_VNET_HDR, no TUNSETOFFLOAD) complete checksums, finished in software before the
device, as a translator of this kind (TAYGA) relies on too. Errors are translated with the
packet they quote (§4.2-§4.3, §5.2-§5.3) by the same functions the NAT64 uses, over a session
made up from the quote. The common packet takes ``plain_to_ipv6``/``plain_to_ipv4``: the same
checks and bytes with one lookup of the remote address.

Pure: bytes in, bytes or a named ``DropReason`` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.flows import Session
from sixgate.workers.engine.icmp import (
    ICMP_DEST_UNREACHABLE,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
)
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.packet import (
    FRAGMENT_HEADER,
    IPV4_DF,
    IPV4_HEADER,
    IPV4_MF,
    IPV6_HEADER,
    PROTO_FRAGMENT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    U16,
    ParameterProblem,
    build_ipv4,
    build_ipv6,
    fold,
    fold_udp,
    parse_ipv4,
    parse_ipv6,
    pseudo_sum_v6,
    set_checksum,
    sum16,
    sum_is_valid,
)
from sixgate.workers.engine.translate import (
    DF_THRESHOLD,
    translate_icmpv4_error,
    translate_icmpv6_error,
)

CLAT_RULE = "clat"
# RFC 7915 §4.1/§5.1: ICMP echo types across the families.
_ECHO_V4_TO_V6 = {ICMP_ECHO_REQUEST: ICMPV6_ECHO_REQUEST, ICMP_ECHO_REPLY: ICMPV6_ECHO_REPLY}
_ECHO_V6_TO_V4 = {v6: v4 for v4, v6 in _ECHO_V4_TO_V6.items()}
_ERRORS_V4 = (ICMP_DEST_UNREACHABLE, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM)
# The remote addresses a plain packet's translation remembers (``Clat.plain_to_ipv6``/
# ``plain_to_ipv4``); past this the memory starts again (a miss costs one synthesis).
REMEMBERED_ADDRESSES = 4096


def _address_sum(address: bytes) -> int:
    return int.from_bytes(address, "big")


def _checksum_after(old: int, delta: int, udp: bool) -> int:
    """The checksum field ``old`` once its sum gains ``delta`` (RFC 1624 eqn 3, in sum
    form); UDP sends a computed 0 as 0xffff (RFC 768)."""
    total = 0xFFFF - old + delta
    return fold_udp(total) if udp else fold(total)


def _adjust(segment: bytearray, offset: int, delta: int, udp: bool) -> None:
    """Add ``delta`` to the checksum at ``offset``."""
    U16.pack_into(segment, offset, _checksum_after(
        (segment[offset] << 8) | segment[offset + 1], delta, udp))


@dataclass(frozen=True)
class Clat:
    """One CLAT: the PLAT's prefix, the CLAT's IPv6 address, the host's IPv4 address."""

    prefix: Nat64Prefix
    address6: bytes
    address4: bytes
    mtu: int = 1260
    # RFC 7915 §4.5, IPv4 UDP without a checksum (TAYGA's udp-cksum-mode): "calculate" one
    # (not possible for a fragment: dropped), "drop" it, or "forward" it as it is.
    udp_zero_checksum: str = "calculate"
    # What the checksums of every packet gain by the CLAT's own two addresses (IPv4 -> IPv6):
    # the same for every packet, so summed once here.
    own_delta: int = field(init=False)
    # Per remote address, what a plain packet's translation needs: IPv4 destination ->
    # (its IPv6 address, the checksum's delta); IPv6 source -> (its IPv4 address, the IPv6
    # pseudo-header's address sum, the checksum's delta). A cache, not state.
    _out: dict[bytes, tuple[bytes, int]] = field(init=False, default_factory=dict,
                                                 compare=False, repr=False)
    _in: dict[bytes, tuple[bytes, int, int]] = field(init=False, default_factory=dict,
                                                     compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "own_delta",
                           _address_sum(self.address6) - _address_sum(self.address4))

    @property
    def remembered_out(self) -> dict[bytes, tuple[bytes, int]]:
        """The remote addresses remembered for the host's packets (the compiled loop reads
        them; a miss is left to ``plain_to_ipv6``, which remembers)."""
        return self._out

    @property
    def remembered_in(self) -> dict[bytes, tuple[bytes, int, int]]:
        return self._in

    # --- the plain packet, with one lookup ------------------------------------------------------

    def plain_to_ipv6(self, packet: bytes) -> bytes | None:
        """The host's common packet: TCP or UDP with a 20-byte header from ``address4``, TTL
        above 1, header checksum right, nothing after it; whole with a transport checksum
        (UDP's not 0), or a fragment (the host fragments datagrams larger than the route's
        MTU: the first one's checksum adjusted, the rest as they are, §4.1). The same bytes
        ``to_ipv6`` makes of it; None for any other packet (``to_ipv6`` answers that one)."""
        if len(packet) < 28 or packet[0] != 0x45 or packet[8] <= 1:
            return None
        proto = packet[9]
        if proto == PROTO_UDP:
            csum = 26
        elif proto == PROTO_TCP and len(packet) >= 40:
            csum = 36
        else:
            return None
        if (packet[12:16] != self.address4 or (packet[2] << 8 | packet[3]) != len(packet)
                or not sum_is_valid(sum16(packet[:20]))):
            return None
        dst = packet[16:20]
        entry = self._out.get(dst)
        if entry is None:
            entry = self._remember_out(dst)
        dst6, delta = entry
        vtf = 0x60000000 | packet[1] << 20
        flags_offset = (packet[6] << 8) | packet[7]
        fragment = b""
        if flags_offset & 0x3FFF:  # MF or an offset: a Fragment header keeps its identity
            offset = (flags_offset & 0x1FFF) * 8
            fragment = FRAGMENT_HEADER.pack(proto, 0, offset | (flags_offset >> 13 & 1),
                                            (packet[4] << 8) | packet[5])
            if offset:
                return b"".join((IPV6_HEADER.pack(vtf, len(packet) - 12, PROTO_FRAGMENT,
                                                  packet[8] - 1, self.address6, dst6),
                                 fragment, packet[20:]))
        old = (packet[csum] << 8) | packet[csum + 1]
        if old == 0 and proto == PROTO_UDP:
            return None  # RFC 7915 §4.5: ``to_ipv6`` decides
        new = _checksum_after(old, delta, proto == PROTO_UDP)
        return b"".join((IPV6_HEADER.pack(vtf, len(packet) - 20 + len(fragment),
                                          PROTO_FRAGMENT if fragment else proto, packet[8] - 1,
                                          self.address6, dst6),
                         fragment, packet[20:csum], U16.pack(new), packet[csum + 2:]))

    def plain_to_ipv4(self, packet: bytes) -> bytes | None:
        """The PLAT's common packet: a whole TCP or UDP datagram with no extension header,
        from under the prefix to ``address6``, hop limit above 1, its checksum right (RFC 8200
        §8.1), nothing after it. The same bytes ``to_ipv4`` makes of it; None for any other
        (``to_ipv4`` answers or drops that one)."""
        if len(packet) < 48 or packet[0] >> 4 != 6 or packet[7] <= 1:
            return None
        proto = packet[6]
        if proto == PROTO_UDP:
            csum = 46
        elif proto == PROTO_TCP and len(packet) >= 60:
            csum = 56
        else:
            return None
        payload_len = (packet[4] << 8) | packet[5]
        if 40 + payload_len != len(packet) or packet[24:40] != self.address6:
            return None
        src = packet[8:24]
        entry = self._in.get(src)
        if entry is None:
            entry = self._remember_in(src)
            if entry is None:
                return None  # not under the prefix: ``to_ipv4`` drops it
        remote4, pseudo, delta = entry
        if not sum_is_valid(pseudo + proto + payload_len + sum16(packet[40:])):
            return None  # ``to_ipv4`` counts it
        new = _checksum_after((packet[csum] << 8) | packet[csum + 1], delta, proto == PROTO_UDP)
        length = 20 + payload_len
        header = bytearray(IPV4_HEADER.pack(
            0x45, (packet[0] & 0x0F) << 4 | packet[1] >> 4, length, 0,
            IPV4_DF if length > DF_THRESHOLD else 0, packet[7] - 1, proto, 0, remote4,
            self.address4))
        U16.pack_into(header, 10, fold(sum16(header)))
        return b"".join((header, packet[40:csum], U16.pack(new), packet[csum + 2:]))

    def _remember_out(self, dst: bytes) -> tuple[bytes, int]:
        if len(self._out) >= REMEMBERED_ADDRESSES:
            self._out.clear()
        dst6 = self.prefix.synthesize(dst)
        entry = self._out[dst] = (dst6, self.own_delta + _address_sum(dst6) - _address_sum(dst))
        return entry

    def _remember_in(self, src: bytes) -> tuple[bytes, int, int] | None:
        remote4 = self.prefix.extract(src)
        if remote4 is None:
            return None
        if len(self._in) >= REMEMBERED_ADDRESSES:
            self._in.clear()
        entry = self._in[src] = (remote4, _address_sum(src) + _address_sum(self.address6),
                                 _address_sum(remote4) - _address_sum(src) - self.own_delta)
        return entry

    # --- the host's IPv4, out as IPv6 (RFC 7915 §4) --------------------------------------------

    def to_ipv6(self, packet: bytes | memoryview) -> bytes | DropReason:
        view = parse_ipv4(packet)
        if isinstance(view, DropReason):
            return view
        header_len, total_len, ident, flags_offset, ttl, proto, src, dst, tos = view
        if src != self.address4:
            return DropReason.SOURCE_NOT_ALLOWED  # only the host's own CLAT address
        if ttl <= 1:
            return DropReason.HOP_LIMIT_EXCEEDED
        offset = (flags_offset & 0x1FFF) * 8
        fragmented = bool(flags_offset & IPV4_MF) or offset != 0
        dst6 = self.prefix.synthesize(dst)
        payload = bytearray(packet[header_len:total_len])
        if proto == PROTO_ICMP:
            if fragmented:
                # The ICMPv6 checksum covers the whole message's length, which no fragment
                # knows (RFC 7915 §4.1 leaves fragmented ICMP to a reassembling translator).
                return DropReason.ICMP_NOT_TRANSLATED
            translated = self._icmp_to_ipv6(packet, header_len, total_len, payload, dst6)
            if not isinstance(translated, bytearray):
                return translated  # an error translated whole, or refused
            payload, proto = translated, PROTO_ICMPV6
        elif proto not in (PROTO_TCP, PROTO_UDP):
            return DropReason.UNSUPPORTED_PROTOCOL
        elif offset == 0:
            dropped = self._transport_to_ipv6(payload, proto, dst, dst6, fragmented)
            if dropped is not None:
                return dropped
        if not fragmented:
            return build_ipv6(self.address6, dst6, proto, payload, hop_limit=ttl - 1,
                              traffic_class=tos)
        # §4.1: a fragment (or DF clear) keeps its identity in a Fragment header.
        more = 1 if flags_offset & IPV4_MF else 0
        fragment = FRAGMENT_HEADER.pack(proto, 0, offset | more, ident)
        return build_ipv6(self.address6, dst6, PROTO_FRAGMENT, fragment + payload,
                          hop_limit=ttl - 1, traffic_class=tos)

    def _transport_to_ipv6(self, segment: bytearray, proto: int, dst: bytes, dst6: bytes,
                           fragmented: bool) -> DropReason | None:
        """TCP/UDP (the first fragment, when fragmented): the checksum over the IPv6
        pseudo-header, by the addresses' difference (a UDP datagram without one: computed
        whole, RFC 7915 §4.5)."""
        csum = 16 if proto == PROTO_TCP else 6
        if len(segment) < csum + 2:
            return DropReason.TRUNCATED
        udp = proto == PROTO_UDP
        if udp and segment[csum:csum + 2] == b"\0\0":
            # RFC 7915 §4.5: no checksum in IPv4; IPv6 requires one (RFC 8200 §8.1).
            if self.udp_zero_checksum == "forward":
                return None
            if self.udp_zero_checksum == "drop" or fragmented:
                return DropReason.BAD_CHECKSUM  # a fragment's cannot be computed
            set_checksum(segment, csum, pseudo_sum_v6(self.address6, dst6, proto,
                                                      len(segment)), udp)
            return None
        # The source is ``address4`` (checked): only the remote address is the packet's own.
        _adjust(segment, csum, self.own_delta + _address_sum(dst6) - _address_sum(dst), udp)
        return None

    def _icmp_to_ipv6(self, packet: bytes | memoryview, header_len: int, total_len: int,
                      message: bytearray, dst6: bytes) -> bytearray | bytes | DropReason:
        """An echo as ICMPv6 (its message, §4.2), or an error as the whole ICMPv6 packet."""
        if len(message) < 8:
            return DropReason.TRUNCATED
        echo = _ECHO_V4_TO_V6.get(message[0])
        if echo is not None:
            message[0] = echo
            set_checksum(message, 2, pseudo_sum_v6(self.address6, dst6, PROTO_ICMPV6,
                                                   len(message)))
            return message
        if message[0] not in _ERRORS_V4:
            return DropReason.ICMP_NOT_TRANSLATED
        if not sum_is_valid(sum16(message)):
            return DropReason.BAD_CHECKSUM
        # The quoted packet came from the remote end to the host: made up as the session.
        quote = message[8:]
        quote_hl = (quote[0] & 0x0F) * 4 if quote else 0
        if len(quote) < quote_hl + 4 or quote_hl < 20 or quote[9] not in (PROTO_TCP, PROTO_UDP):
            return DropReason.ICMP_NOT_TRANSLATED
        remote4, sport = bytes(quote[12:16]), (quote[quote_hl] << 8) | quote[quote_hl + 1]
        dport = (quote[quote_hl + 2] << 8) | quote[quote_hl + 3]
        session = Session(quote[9], self.prefix.synthesize(remote4), sport, self.address6,
                          dport, self.address4, remote4, sport, CLAT_RULE, "", 0.0, 0.0,
                          pport=dport)
        # From the CLAT's address to the quote's source (the remote end).
        return translate_icmpv4_error(packet, header_len, total_len, session, 0xFFFF,
                                      source6=self.address6)

    # --- IPv6 from the PLAT, in as the host's IPv4 (RFC 7915 §5) -------------------------------

    def to_ipv4(self, packet: bytes | memoryview) -> bytes | DropReason:
        view = parse_ipv6(packet)
        if isinstance(view, ParameterProblem):
            return view.reason
        if isinstance(view, DropReason):
            return view
        payload_len, hop_limit, src, dst, proto, upper, fragment, tclass, _nh = view
        if dst != self.address6:
            return DropReason.NOT_OUR_ADDRESS
        remote4 = self.prefix.extract(src)
        if remote4 is None:
            return DropReason.SOURCE_NOT_ALLOWED  # only the PLAT's prefix speaks for IPv4
        if hop_limit <= 1:
            return DropReason.HOP_LIMIT_EXCEEDED
        end = 40 + payload_len
        payload = bytearray(packet[upper:end])
        first = fragment is None or fragment[0] == 0
        fragmented = fragment is not None
        if proto == PROTO_ICMPV6:
            if fragmented:
                return DropReason.ICMP_NOT_TRANSLATED  # as in to_ipv6: the length is unknown
            translated = self._icmp_to_ipv4(payload, src, remote4)
            if not isinstance(translated, bytearray):
                return translated  # an error translated whole, or refused
            payload, proto = translated, PROTO_ICMP
        elif proto in (PROTO_TCP, PROTO_UDP):
            if first:
                csum = 16 if proto == PROTO_TCP else 6
                if len(payload) < csum + 2:
                    return DropReason.TRUNCATED
                if not fragmented and not sum_is_valid(
                        pseudo_sum_v6(src, dst, proto, len(payload)) + sum16(payload)):
                    return DropReason.BAD_CHECKSUM
                # ``dst`` is ``address6`` (checked): only the remote address is the packet's.
                _adjust(payload, csum, _address_sum(remote4) - _address_sum(src)
                        - self.own_delta, proto == PROTO_UDP)
        else:
            return DropReason.UNSUPPORTED_PROTOCOL
        ttl = hop_limit - 1
        if fragment is None:
            flags = IPV4_DF if 20 + len(payload) > DF_THRESHOLD else 0  # §5.1
            return build_ipv4(remote4, self.address4, proto, payload, ttl=ttl, tos=tclass,
                              flags_offset=flags)
        offset, more, ident, _fh, _nho = fragment
        return build_ipv4(remote4, self.address4, proto, payload, ttl=ttl, tos=tclass,
                          ident=ident & 0xFFFF,
                          flags_offset=(offset // 8) | (IPV4_MF if more else 0))

    def _icmp_to_ipv4(self, message: bytearray, src: bytes, remote4: bytes
                      ) -> bytearray | bytes | DropReason:
        """An echo as ICMPv4 (its message, §5.2), or an error as the whole IPv4 packet."""
        if len(message) < 8:
            return DropReason.TRUNCATED
        if not sum_is_valid(pseudo_sum_v6(src, self.address6, PROTO_ICMPV6, len(message))
                            + sum16(message)):
            return DropReason.BAD_CHECKSUM
        echo = _ECHO_V6_TO_V4.get(message[0])
        if echo is not None:
            message[0] = echo
            set_checksum(message, 2, 0)
            return message
        if message[0] >= 128:
            return DropReason.ICMP_NOT_TRANSLATED
        # The quoted packet went from the host to the remote end: made up as the session.
        quote = message[8:]
        if len(quote) < 44 or quote[6] not in (PROTO_TCP, PROTO_UDP):
            return DropReason.ICMP_NOT_TRANSLATED
        if bytes(quote[8:24]) != self.address6:
            return DropReason.ICMP_NOT_TRANSLATED
        quoted4 = self.prefix.extract(bytes(quote[24:40]))
        if quoted4 is None:
            return DropReason.ICMP_NOT_TRANSLATED
        sport, dport = (quote[40] << 8) | quote[41], (quote[42] << 8) | quote[43]
        session = Session(quote[6], self.address6, sport, bytes(quote[24:40]), dport,
                          quoted4, self.address4, sport, CLAT_RULE, "", 0.0, 0.0,
                          pport=dport)
        translated = translate_icmpv6_error(bytes(message), session, 0xFFFF)
        if isinstance(translated, DropReason):
            return translated
        # translate_icmpv6_error sends from the quote's destination; the error came from
        # ``remote4`` (a router of the IPv4 path, through the PLAT).
        out = bytearray(translated)
        out[12:16] = remote4
        out[10:12] = b"\0\0"
        U16.pack_into(out, 10, fold(sum16(out[:20])))
        return bytes(out)
