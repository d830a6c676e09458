"""coordinator/liveness.py: the 6in4 broker probe's packets (RFC 4213 §3.7-§3.8), judged by
scapy."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import IP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, in6_chksum
from scapy.packet import raw

from sixgate.coordinator.liveness import PAYLOAD, is_probe_reply, probe_request

OURS = ipaddress.IPv6Address("fe80::c000:20a").packed  # fe80::<192.0.2.10>
BROKER = ipaddress.IPv6Address("fe80::c633:6401").packed  # fe80::<198.51.100.1>
BROKER4 = ipaddress.IPv4Address("198.51.100.1").packed


def test_the_probe_is_an_echo_request_between_the_link_local_addresses() -> None:
    six = IPv6(probe_request(OURS, BROKER, 0x1234, 9))
    assert (six.src, six.dst, six.hlim) == ("fe80::c000:20a", "fe80::c633:6401", 255)
    echo = six[ICMPv6EchoRequest]
    assert (echo.id, echo.seq, echo.data) == (0x1234, 9, PAYLOAD)
    assert in6_chksum(58, six, raw(six)[40:]) == 0


def _reply(ident: int = 0x1234, seq: int = 9, src: str = "198.51.100.1",
           inner_src: str = "fe80::c633:6401") -> bytes:
    return raw(IP(src=src, dst="192.0.2.10", proto=41)
               / IPv6(src=inner_src, dst="fe80::c000:20a")
               / ICMPv6EchoReply(id=ident, seq=seq, data=PAYLOAD))


def test_only_the_reply_to_this_probe_counts() -> None:
    assert is_probe_reply(_reply(), BROKER4, OURS, BROKER, 0x1234, 9)
    assert not is_probe_reply(_reply(seq=8), BROKER4, OURS, BROKER, 0x1234, 9)  # an old one
    assert not is_probe_reply(_reply(ident=1), BROKER4, OURS, BROKER, 0x1234, 9)
    assert not is_probe_reply(_reply(src="198.51.100.2"), BROKER4, OURS, BROKER, 0x1234, 9)
    assert not is_probe_reply(_reply(inner_src="fe80::1"), BROKER4, OURS, BROKER, 0x1234, 9)
    assert not is_probe_reply(_reply()[:60], BROKER4, OURS, BROKER, 0x1234, 9)
