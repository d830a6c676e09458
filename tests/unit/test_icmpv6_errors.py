"""RFC 7915 §5.2/§5.3: ICMPv6 errors that a client (or a router on its path) sends about the
gateway's replies reach the service as ICMPv4 errors, its own packet quoted back.

The case that matters in practice: a client behind a smaller path MTU than the tunnel's sends
Packet Too Big; unless the service's TCP hears "fragmentation needed" it keeps sending
segments that never arrive (a PMTUD black hole). scapy builds the errors and parses the result.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.packet import Packet, raw
from support.helpers import (
    SERVICE4,
    TwoParty,
    client6,
    client_tcp,
    client_udp,
    gw6,
    make_datapath,
    reply_to,
)

from sixgate.workers.engine.drops import DropReason

MODES = ["6to4", "6in4"]


def session_with_reply(mode: str, tcp: bool = True,
                       size: int = 1400) -> tuple[TwoParty, IP, IPv6]:
    """A live session and the service's big reply as the client received it."""
    party = TwoParty(make_datapath(mode))
    request = party.client(client_tcp(mode, flags="S") if tcp else client_udp(mode))
    sent4 = request.only_to_services()
    flags = "A" if tcp else None
    step = party.service(reply_to(sent4, bytes(size), tcp_flags=flags))
    return party, sent4, step.only_outbound()


def error_about(reply: IPv6, message: Packet, sender: str | None = None) -> IPv6:
    """An ICMPv6 error from ``sender`` (default: the client) quoting ``reply``."""
    return IPv6(src=sender or reply.dst, dst=reply.src) / message / raw(reply)[:1232]


@pytest.mark.parametrize("mode", MODES)
def test_rfc7915_5_2_packet_too_big_becomes_fragmentation_needed(mode: str) -> None:
    party, sent4, reply = session_with_reply(mode)
    step = party.client(error_about(reply, ICMPv6PacketTooBig(mtu=1280), "2001:db8:9::1"))
    assert step.drops == {} and step.outbound == []
    err = step.only_to_services()
    # From the client's pool address to the service, type 3 code 4, MTU - 20 (§5.2).
    assert (err.src, err.dst) == (sent4.src, SERVICE4)
    assert (err[ICMP].type, err[ICMP].code, err[ICMP].nexthopmtu) == (3, 4, 1260)
    # §5.3: the quote is the service's own packet: its addresses and ports, as it sent them.
    assert (err[IPerror].src, err[IPerror].dst) == (SERVICE4, sent4.src)
    assert (err[TCPerror].sport, err[TCPerror].dport) == (sent4[TCP].dport, sent4[TCP].sport)
    assert err[IPerror].len == 20 + 20 + 1400


@pytest.mark.parametrize("mode", MODES)
def test_rfc7915_5_2_checksums_of_translated_error_verify(mode: str) -> None:
    party, _sent4, reply = session_with_reply(mode)
    err = party.client(error_about(reply, ICMPv6PacketTooBig(mtu=1400))).only_to_services()
    rebuilt = IP(raw(err))
    del rebuilt.chksum
    del rebuilt[ICMP].chksum
    rebuilt = IP(raw(rebuilt))
    assert (rebuilt.chksum, rebuilt[ICMP].chksum) == (err.chksum, err[ICMP].chksum)
    assert len(raw(err)) <= 576  # RFC 1812 §4.3.2.3


def test_rfc7915_5_2_ptb_never_above_the_tunnel_mtu() -> None:
    party, _sent4, reply = session_with_reply("6to4")
    err = party.client(error_about(reply, ICMPv6PacketTooBig(mtu=9000))).only_to_services()
    assert err[ICMP].nexthopmtu == 1480 - 20


@pytest.mark.parametrize(("message", "v4"), [
    (ICMPv6DestUnreach(code=0), (3, 1)),
    (ICMPv6DestUnreach(code=1), (3, 10)),
    (ICMPv6DestUnreach(code=3), (3, 1)),
    (ICMPv6DestUnreach(code=4), (3, 3)),
    (ICMPv6TimeExceeded(code=0), (11, 0)),
    (ICMPv6TimeExceeded(code=1), (11, 1)),
    (ICMPv6ParamProblem(code=1, ptr=6), (3, 2)),
], ids=["unreach_no_route", "unreach_admin", "unreach_address", "unreach_port",
        "hop_limit", "reassembly", "next_header"])
def test_rfc7915_5_2_type_and_code_table(message: Packet, v4: tuple[int, int]) -> None:
    party, _sent4, reply = session_with_reply("6to4", tcp=False, size=100)
    err = party.client(error_about(reply, message)).only_to_services()
    assert (err[ICMP].type, err[ICMP].code) == v4
    # the service's own datagram: from its port 5353 to the client's pool port 40000
    assert (err[UDPerror].sport, err[UDPerror].dport) == (5353, 40000)


def test_rfc7915_5_2_parameter_problem_pointer_mapped() -> None:
    party, _sent4, reply = session_with_reply("6to4", tcp=False, size=100)
    err = party.client(error_about(reply, ICMPv6ParamProblem(code=0, ptr=7))).only_to_services()
    assert (err[ICMP].type, err[ICMP].code, err[ICMP].ptr) == (12, 0, 8)  # hop limit -> TTL


@pytest.mark.parametrize(("message", "reason"), [
    (ICMPv6DestUnreach(code=5), DropReason.ICMP_NOT_TRANSLATED),
    (ICMPv6ParamProblem(code=2), DropReason.ICMP_NOT_TRANSLATED),
], ids=["unreach_policy", "unrecognized_option"])
def test_rfc7915_5_2_untranslated_errors_dropped(message: Packet, reason: DropReason) -> None:
    party, _sent4, reply = session_with_reply("6to4", tcp=False, size=100)
    step = party.client(error_about(reply, message))
    assert step.to_services == [] and step.drops == {reason: 1}


def test_error_about_a_reply_of_no_live_session_dropped() -> None:
    party = TwoParty(make_datapath("6to4"))
    stray = IPv6(src=gw6("6to4"), dst=client6("6to4")) / UDP(sport=53, dport=4444) / b"x"
    step = party.client(IPv6(src=client6("6to4"), dst=gw6("6to4")) / ICMPv6DestUnreach(code=4)
                        / raw(stray))
    assert step.to_services == [] and step.drops == {DropReason.NO_SESSION: 1}
