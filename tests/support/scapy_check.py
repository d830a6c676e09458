"""Checksum and field checks done by scapy alone (no engine code), for the differential suite."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    _ICMPv6,
)
from scapy.packet import Packet, raw

OUTER_TRANSPORTS = (TCP, UDP, ICMP, ICMPv6EchoReply, ICMPv6DestUnreach, ICMPv6PacketTooBig,
                    ICMPv6ParamProblem, ICMPv6TimeExceeded)


def first_transport(pkt: Packet) -> Packet | None:
    """The transport/ICMP layer right after the IP header (not a quoted one inside an error)."""
    layer = pkt.payload
    while layer is not None and not isinstance(layer, (TCP, UDP, ICMP, _ICMPv6)):
        if not layer.payload:
            return None
        layer = layer.payload
    return layer


def checksum_field(layer: Packet) -> str:
    return "cksum" if isinstance(layer, _ICMPv6) else "chksum"


def recomputed(data: bytes) -> dict[str, tuple[int, int]]:
    """{field: (value in ``data``, value scapy computes)} for the IPv4 header checksum and the
    first transport checksum of an IPv4 or IPv6 packet."""
    cls = IP if data[0] >> 4 == 4 else IPv6
    pkt = cls(data)
    out: dict[str, tuple[int, int]] = {}
    again = cls(data)
    if cls is IP:
        out["ip"] = (pkt.chksum, 0)
        del again.chksum
    transport = first_transport(pkt)
    if transport is not None:
        name = checksum_field(transport)
        out[type(transport).__name__] = (getattr(transport, name), 0)
        delattr(first_transport(again), name)
    rebuilt = cls(raw(again))
    if cls is IP:
        out["ip"] = (out["ip"][0], rebuilt.chksum)
    if transport is not None:
        t2 = first_transport(rebuilt)
        assert t2 is not None
        key = type(transport).__name__
        out[key] = (out[key][0], getattr(t2, checksum_field(t2)))
    return out


def checksums_match(data: bytes) -> bool:
    """True when every checksum in ``data`` is what scapy computes."""
    for ours, theirs in recomputed(data).values():
        if ours != theirs:
            return False
    return True
