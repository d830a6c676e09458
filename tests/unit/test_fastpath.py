"""workers/engine/fastpath.py: which TCP segments the template path may translate (issue 15)."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6

from sixgate.workers.engine.fastpath import InTemplate, fast_v6_to_v4, inbound_template
from sixgate.workers.engine.flows import FlowTable, Timeouts

CLIENT6, GW6 = "2002:c633:6401::1", "2002:c000:20a::1"


def _template() -> InTemplate:
    table = FlowTable([bytes([100, 64, 0, 1])], 10, 10, Timeouts())
    session = table.create(6, ipaddress.IPv6Address(CLIENT6).packed, 40000,
                           ipaddress.IPv6Address(GW6).packed, 80, bytes([127, 0, 0, 1]), 8080,
                           "r", 0.0)
    return inbound_template(session)


def _segment(**tcp: object) -> bytes:
    return bytes(IPv6(src=CLIENT6, dst=GW6) / TCP(sport=40000, dport=80, **tcp) / b"data")


def test_ack_whose_timestamp_reads_like_an_mss_option_takes_the_fast_path() -> None:
    """Only a SYN's MSS is clamped (RFC 9293 §3.7.1): the options of other segments are never
    searched, so timestamp bytes 02 04 no longer send a segment to the full path."""
    packet = _segment(flags="A", options=[("NOP", None), ("NOP", None),
                                          ("Timestamp", (0x02040204, 0x02040204))])
    assert b"\x02\x04" in packet[60:72]
    assert fast_v6_to_v4(packet, 6, _template(), 1) is not None


def test_syn_fin_rst_and_impossible_data_offsets_take_the_full_path() -> None:
    template = _template()
    for flags in ("S", "SA", "FA", "R", "RA"):
        assert fast_v6_to_v4(_segment(flags=flags), 6, template, 1) is None, flags
    for dataofs in (4, 15):  # below the header (RFC 9293 §3.1), past the 24-byte segment
        assert fast_v6_to_v4(_segment(flags="A", dataofs=dataofs), 6, template, 1) is None
    assert fast_v6_to_v4(_segment(flags="A"), 6, template, 1) is not None
