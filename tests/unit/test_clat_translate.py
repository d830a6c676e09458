"""The CLAT translator (issue 18, RFC 6877 §6 with RFC 7915): the host's IPv4 out as IPv6 under
the PLAT's prefix and back. Packets are built and judged by scapy (an independent
implementation): its checksums and its reassembly, never the engine's own codecs."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrFragment,
    defragment6,
    fragment6,
    in6_chksum,
)
from scapy.packet import Packet, Raw, raw
from scapy.utils import checksum
from support.helpers import require_compiled

from sixgate.coordinator.clat import parse_pref64, pref64_messages, prefix_of_synthesized
from sixgate.workers.engine.clat import Clat
from sixgate.workers.engine.datapath import Datapath
from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.nat64 import Nat64Prefix
from sixgate.workers.engine.settings import Settings

HOST4 = "192.0.0.1"  # RFC 7335
CLAT6 = "2001:db8:100::c1a7"
SERVER4 = "198.51.100.7"
SERVER6 = "64:ff9b::c633:6407"  # 64:ff9b::198.51.100.7 (RFC 6052 §2.2)
ROUTER6 = "64:ff9b::c633:6401"  # 198.51.100.1, a router on the IPv4 path


def clat() -> Clat:
    return Clat(Nat64Prefix.parse("64:ff9b::/96"), ipaddress.IPv6Address(CLAT6).packed,
                ipaddress.IPv4Address(HOST4).packed)


def clat_datapath() -> Datapath:
    """The CLAT as a worker runs it (``Datapath.from_clat``: the plain-packet path first)."""
    return Datapath(Settings(mode="clat", local_ipv4="", relay_ipv4=None, remote_ipv4=None,
                             prefix="64:ff9b::/96", addresses=(), mtu=1500, workers=1, pool="",
                             run_dir="/tmp/sixgate-unit", name="unit", forwards=(),
                             clat_plat_prefix="64:ff9b::/96", clat_ipv4_address=HOST4,
                             clat_ipv6_address=CLAT6), [])


def checksums_hold(packet: Packet) -> bool:
    """scapy computes every checksum of ``packet`` anew: the same bytes if they were right."""
    again = packet.__class__(raw(packet))
    for layer in (IP, TCP, UDP, ICMP, ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6DestUnreach,
                  ICMPv6PacketTooBig):
        for found in again.iterpayloads():
            if isinstance(found, layer) and hasattr(found, "chksum"):
                del found.chksum
            if isinstance(found, layer) and hasattr(found, "cksum"):
                del found.cksum
    return raw(again.__class__(raw(again))) == raw(packet)


def test_rfc7915_4_tcp_from_the_host_leaves_as_ipv6_under_the_prefix_and_back() -> None:
    c = clat()
    syn = IP(src=HOST4, dst=SERVER4, ttl=64) / TCP(sport=40000, dport=80, flags="S", seq=7)
    out = c.to_ipv6(raw(syn))
    assert isinstance(out, bytes)
    six = IPv6(out)
    assert (six.src, six.dst, six.hlim, six[TCP].sport, six[TCP].dport) == (
        CLAT6, SERVER6, 63, 40000, 80)
    assert checksums_hold(six)
    answer = IPv6(src=SERVER6, dst=CLAT6, hlim=60) / TCP(sport=80, dport=40000, flags="SA",
                                                         seq=99, ack=8) / Raw(b"x" * 33)
    back = c.to_ipv4(raw(answer))
    assert isinstance(back, bytes)
    four = IP(back)
    assert (four.src, four.dst, four.ttl, four[TCP].flags) == (SERVER4, HOST4, 59, "SA")
    assert four[Raw].load == b"x" * 33 and checksums_hold(four)


def test_rfc7915_4_5_a_zero_udp_checksum_from_the_host_gets_one() -> None:
    datagram = IP(src=HOST4, dst=SERVER4) / UDP(sport=5353, dport=53, chksum=0) / Raw(b"q" * 20)
    out = clat().to_ipv6(raw(datagram))
    assert isinstance(out, bytes)
    six = IPv6(out)
    assert six[UDP].chksum != 0 and checksums_hold(six)


def test_rfc7915_4_2_and_5_2_echo_both_ways() -> None:
    c = clat()
    ping = IP(src=HOST4, dst=SERVER4) / ICMP(type=8, id=77, seq=3) / Raw(b"p" * 56)
    six = IPv6(c.to_ipv6(raw(ping)))  # type: ignore[arg-type]
    assert six.haslayer(ICMPv6EchoRequest) and six[ICMPv6EchoRequest].id == 77
    assert checksums_hold(six)
    reply = IPv6(src=SERVER6, dst=CLAT6) / ICMPv6EchoReply(id=77, seq=3, data=b"p" * 56)
    four = IP(c.to_ipv4(raw(reply)))  # type: ignore[arg-type]
    assert (four[ICMP].type, four[ICMP].id, four[ICMP].seq) == (0, 77, 3)
    assert checksums_hold(four)


def test_rfc7915_4_1_ipv4_fragments_leave_as_ipv6_fragments_scapy_reassembles() -> None:
    c = clat()
    datagram = IP(src=HOST4, dst=SERVER4, id=0x1234) / UDP(sport=5000, dport=53) / Raw(
        bytes(range(256)) * 8)
    pieces = [c.to_ipv6(raw(piece)) for piece in fragment(datagram, fragsize=1000)]
    assert len(pieces) == 3 and all(isinstance(p, bytes) for p in pieces)
    sixes = [IPv6(p) for p in pieces]  # type: ignore[arg-type]
    assert all(s[IPv6ExtHdrFragment].id == 0x1234 for s in sixes)
    whole = defragment6(sixes)
    assert whole[UDP].load == bytes(range(256)) * 8
    assert checksums_hold(IPv6(raw(whole)))


def test_rfc7915_5_1_ipv6_fragments_come_in_as_ipv4_fragments_the_host_reassembles() -> None:
    c = clat()
    datagram = IPv6(src=SERVER6, dst=CLAT6) / IPv6ExtHdrFragment(id=0xABCDEF12) / UDP(
        sport=53, dport=5000) / Raw(bytes(range(256)) * 10)
    pieces = [c.to_ipv4(raw(piece)) for piece in fragment6(datagram, 1280)]
    assert len(pieces) == 3 and all(isinstance(p, bytes) for p in pieces)
    fours = [IP(p) for p in pieces]  # type: ignore[arg-type]
    assert {f.id for f in fours} == {0xEF12} and [bool(f.flags.MF) for f in fours] == [
        True, True, False]
    payload = b"".join(raw(f.payload) for f in sorted(fours, key=lambda f: f.frag))
    whole = IP(src=SERVER4, dst=HOST4, proto=17) / UDP(payload)
    assert whole[UDP].load == bytes(range(256)) * 10
    assert checksums_hold(IP(raw(whole)))


def test_rfc7915_5_2_packet_too_big_becomes_fragmentation_needed_about_the_hosts_packet() -> None:
    c = clat()
    sent = IPv6(c.to_ipv6(raw(IP(src=HOST4, dst=SERVER4) / TCP(  # type: ignore[arg-type]
        sport=40000, dport=80, flags="A") / Raw(b"d" * 1200))))
    error = IPv6(src=ROUTER6, dst=CLAT6) / ICMPv6PacketTooBig(mtu=1300) / raw(sent)[:1232]
    four = IP(c.to_ipv4(raw(error)))  # type: ignore[arg-type]
    assert (four.src, four.dst, four[ICMP].type, four[ICMP].code) == (
        "198.51.100.1", HOST4, 3, 4)
    assert four[ICMP].nexthopmtu == 1280
    assert (four[IPerror].src, four[IPerror].dst) == (HOST4, SERVER4)
    # The IPv4 header and the ICMP message (no pseudo-header) each sum to zero.
    assert checksum(raw(four)[:20]) == 0 and checksum(raw(four[ICMP])) == 0


def test_rfc7915_4_2_port_unreachable_from_the_host_goes_out_as_icmpv6() -> None:
    c = clat()
    inbound = IP(c.to_ipv4(raw(IPv6(src=SERVER6, dst=CLAT6) / UDP(  # type: ignore[arg-type]
        sport=53, dport=9999) / Raw(b"a" * 10))))
    unreachable = IP(src=HOST4, dst=SERVER4) / ICMP(type=3, code=3) / raw(inbound)
    six = IPv6(c.to_ipv6(raw(unreachable)))  # type: ignore[arg-type]
    assert (six.src, six.dst, six[ICMPv6DestUnreach].code) == (CLAT6, SERVER6, 4)
    assert six[ICMPv6DestUnreach].payload.src == SERVER6
    assert six[ICMPv6DestUnreach][UDPerror].dport == 9999
    message = raw(six)[40:]
    assert in6_chksum(58, six, message) == 0  # over the IPv6 pseudo-header


@pytest.mark.parametrize(("packet", "reason"), [
    (IP(src="192.0.0.2", dst=SERVER4) / UDP(sport=1, dport=53), DropReason.SOURCE_NOT_ALLOWED),
    (IP(src=HOST4, dst=SERVER4, ttl=1) / UDP(sport=1, dport=53), DropReason.HOP_LIMIT_EXCEEDED),
    (IP(src=HOST4, dst=SERVER4, proto=47) / Raw(b"gre!"), DropReason.UNSUPPORTED_PROTOCOL),
])
def test_what_the_host_may_not_send_out(packet: Packet, reason: DropReason) -> None:
    assert clat().to_ipv6(raw(packet)) == reason
    assert_dropped_by_the_datapath(raw(packet), reason)


def assert_dropped_by_the_datapath(packet: bytes, reason: DropReason) -> None:
    """The worker's loop (plain-packet path first) drops it under the same one reason."""
    dp = clat_datapath()
    out = dp.from_clat([packet], 1.0)
    assert out.to_services == []
    assert {r: n for r, n in dp.counters.drops.items() if n} == {reason: 1}


def broken_ipv4_header_checksum() -> bytes:
    packet = bytearray(raw(IP(src=HOST4, dst=SERVER4) / UDP(sport=1, dport=53)))
    packet[10] ^= 0x01
    return bytes(packet)


def test_rfc791_a_host_packet_with_a_wrong_header_checksum_is_dropped() -> None:
    assert clat().to_ipv6(broken_ipv4_header_checksum()) == DropReason.BAD_CHECKSUM
    assert_dropped_by_the_datapath(broken_ipv4_header_checksum(), DropReason.BAD_CHECKSUM)


@pytest.mark.parametrize(("packet", "reason"), [
    (IPv6(src="2001:db8:999::1", dst=CLAT6) / UDP(sport=53, dport=1),
     DropReason.SOURCE_NOT_ALLOWED),
    (IPv6(src=SERVER6, dst="2001:db8:100::1") / UDP(sport=53, dport=1),
     DropReason.NOT_OUR_ADDRESS),
    (IPv6(src=SERVER6, dst=CLAT6) / UDP(sport=53, dport=1, chksum=0x1234),
     DropReason.BAD_CHECKSUM),
    (IPv6(src=SERVER6, dst=CLAT6) / TCP(sport=80, dport=1, chksum=0x1234),
     DropReason.BAD_CHECKSUM),
    (IPv6(src=SERVER6, dst=CLAT6, hlim=1) / UDP(sport=53, dport=1),
     DropReason.HOP_LIMIT_EXCEEDED),
])
def test_what_may_not_come_in(packet: Packet, reason: DropReason) -> None:
    assert clat().to_ipv4(raw(packet)) == reason
    assert_dropped_by_the_datapath(raw(packet), reason)


_PAYLOADS = st.binary(max_size=1500)
_PORTS = st.integers(1, 65535)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), _PORTS, _PORTS, st.integers(2, 255),
       st.integers(0, 255), st.sampled_from([0, 2]), st.ip_addresses(v=4), _PAYLOADS)
def test_the_plain_path_gives_the_bytes_of_the_full_translation_out(
        kind: str, sport: int, dport: int, ttl: int, tos: int, df: int,
        dst: ipaddress.IPv4Address, payload: bytes) -> None:
    """The host's whole TCP/UDP datagram: ``plain_to_ipv6`` (one lookup) takes it and gives
    exactly what ``to_ipv6`` gives; scapy finds every checksum right."""
    transport = (TCP(sport=sport, dport=dport, flags="A") if kind == "tcp"
                 else UDP(sport=sport, dport=dport))
    packet = raw(IP(src=HOST4, dst=str(dst), ttl=ttl, tos=tos, flags=df) / transport
                 / Raw(payload))
    c = clat()
    plain = c.plain_to_ipv6(packet)
    assert plain is not None and plain == c.to_ipv6(packet)
    assert checksums_hold(IPv6(plain))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), _PORTS, st.integers(0, 0xFFFF),
       st.sampled_from([64, 504, 1000]), st.integers(1100, 3000))
def test_the_plain_path_gives_the_bytes_of_the_full_translation_for_fragments(
        kind: str, sport: int, ident: int, fragsize: int, size: int) -> None:
    """The host fragments a datagram larger than the route's MTU: each fragment, first and
    later ones, comes out of ``plain_to_ipv6`` as ``to_ipv6`` makes it, and scapy puts the
    IPv6 fragments back together into a datagram whose checksum holds."""
    transport = (TCP(sport=sport, dport=80, flags="A") if kind == "tcp"
                 else UDP(sport=sport, dport=53))
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    datagram = IP(src=HOST4, dst=SERVER4, id=ident) / transport / Raw(payload)
    c = clat()
    pieces = []
    for piece in fragment(datagram, fragsize=fragsize):
        plain = c.plain_to_ipv6(raw(piece))
        if plain is None:  # a short later fragment: the full path's
            assert len(raw(piece)) < 40 and piece.frag > 0
            plain = c.to_ipv6(raw(piece))
        assert plain == c.to_ipv6(raw(piece))
        pieces.append(IPv6(plain))  # type: ignore[arg-type]
    assert len(pieces) > 1
    whole = defragment6(pieces)
    assert raw(whole[Raw]).endswith(payload) and checksums_hold(IPv6(raw(whole)))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), _PORTS, _PORTS, st.integers(2, 255),
       st.integers(0, 255), st.ip_addresses(v=4), _PAYLOADS)
def test_the_plain_path_gives_the_bytes_of_the_full_translation_in(
        kind: str, sport: int, dport: int, hlim: int, tclass: int,
        src: ipaddress.IPv4Address, payload: bytes) -> None:
    transport = (TCP(sport=sport, dport=dport, flags="A") if kind == "tcp"
                 else UDP(sport=sport, dport=dport))
    packet = raw(IPv6(src=f"64:ff9b::{src}", dst=CLAT6, hlim=hlim, tc=tclass) / transport
                 / Raw(payload))
    c = clat()
    plain = c.plain_to_ipv4(packet)
    assert plain is not None and plain == c.to_ipv4(packet)
    assert checksums_hold(IP(plain))


def test_the_plain_path_is_counted_like_the_full_one() -> None:
    """A batch through the plain path counts packets and bytes per direction and protocol as
    the full path counts them one by one."""
    out4 = raw(IP(src=HOST4, dst=SERVER4) / UDP(sport=5000, dport=53) / Raw(b"q" * 30))
    in6 = raw(IPv6(src=SERVER6, dst=CLAT6) / TCP(sport=80, dport=5000, flags="A") / Raw(b"a"))
    ping = raw(IP(src=HOST4, dst=SERVER4) / ICMP(type=8, id=1, seq=1))  # the full path
    dp = clat_datapath()
    out = dp.from_clat([out4, in6, out4, ping], 1.0)
    assert len(out.to_services) == 4
    got = {key: n for key, n in dp.counters.packets.items() if n}
    assert got == {("from_services", "udp"): 2, ("outbound", "udp"): 2,
                   ("inbound", "tcp"): 1, ("to_services", "tcp"): 1,
                   ("from_services", "icmp"): 1, ("outbound", "icmp"): 1}
    octets = dp.counters.bytes
    assert octets[("from_services", "udp")] == 2 * len(out4)
    assert octets[("outbound", "udp")] == 2 * (len(out4) + 20)
    assert octets[("inbound", "tcp")] == len(in6)
    assert octets[("to_services", "tcp")] == len(in6) - 20


@pytest.mark.parametrize(("synthesized", "prefix"), [
    ("64:ff9b::c000:aa", "64:ff9b::/96"),
    ("64:ff9b::c000:ab", "64:ff9b::/96"),
    ("2001:db8:64:0:c0:0:aa00:0", "2001:db8:64::/64"),  # bits 64-71 skipped (RFC 6052 §2.2)
    ("2001:db8:c000:aa::", "2001:db8::/32"),
])
def test_rfc7050_3_the_prefix_is_where_the_well_known_address_sits(synthesized: str,
                                                                   prefix: str) -> None:
    assert prefix_of_synthesized(ipaddress.IPv6Address(synthesized).packed) == prefix


def test_rfc7050_3_an_aaaa_without_the_well_known_address_gives_no_prefix() -> None:
    assert prefix_of_synthesized(ipaddress.IPv6Address("2001:db8::1").packed) is None


@pytest.mark.parametrize(("plc", "prefix"), [
    ("/96", "64:ff9b::/96"), ("/64", "2001:db8:64:ff9b::/64"), ("/32", "2001:db8::/32")])
def test_rfc8781_4_a_pref64_option_as_scapy_builds_it(plc: str, prefix: str) -> None:
    from scapy.layers.inet6 import ICMPv6NDOptPREF64
    option = raw(ICMPv6NDOptPREF64(scaledlifetime=225, plc=plc, prefix=prefix.split("/")[0]))
    assert parse_pref64(option) == (prefix, 1800)


def test_rfc8781_4_a_malformed_pref64_is_ignored() -> None:
    good = bytes((38, 2, 0x07, 0x08)) + bytes(12)  # lifetime 1800 s, PLC 0
    assert parse_pref64(good) == ("::/96", 1800)
    assert parse_pref64(good[:15]) is None  # short
    assert parse_pref64(bytes((38, 3)) + good[2:]) is None  # wrong length field
    assert parse_pref64(bytes((38, 2, 0x07, 0x0E)) + bytes(12)) is None  # PLC 6: reserved


def test_the_kernels_nduseropt_message_is_read_for_its_pref64() -> None:
    """An RTM_NEWNDUSEROPT datagram as Linux sends it (nlmsghdr, struct nduseroptmsg, the RA's
    options): an RDNSS option beside it is skipped."""
    from scapy.layers.inet6 import ICMPv6NDOptPREF64, ICMPv6NDOptRDNSS
    options = raw(ICMPv6NDOptRDNSS(dns=["2001:db8::53"])) + raw(ICMPv6NDOptPREF64(
        scaledlifetime=10, plc="/96", prefix="64:ff9b::"))
    body = struct.pack("<BBHiBBHI", 10, 0, len(options), 7, 134, 0, 0, 0) + options
    message = struct.pack("<IHHII", 16 + len(body), 68, 0, 0, 0) + body
    assert pref64_messages(message + message) == [(7, "64:ff9b::/96", 80)] * 2


@pytest.mark.parametrize(("mode", "whole", "first_fragment"), [
    ("calculate", "computed", DropReason.BAD_CHECKSUM),
    ("drop", DropReason.BAD_CHECKSUM, DropReason.BAD_CHECKSUM),
    ("forward", "zero", "zero"),
])
def test_rfc7915_4_5_zero_udp_checksum_modes(mode: str, whole: object,
                                             first_fragment: object) -> None:
    """TAYGA's udp-cksum-mode: a whole datagram and a first fragment without a checksum."""
    c = Clat(Nat64Prefix.parse("64:ff9b::/96"), ipaddress.IPv6Address(CLAT6).packed,
             ipaddress.IPv4Address(HOST4).packed, udp_zero_checksum=mode)
    datagram = IP(src=HOST4, dst=SERVER4) / UDP(sport=5353, dport=53, chksum=0) / Raw(
        b"q" * 2000)
    for packet, expected in ((datagram, whole),
                             (fragment(datagram, 1000)[0], first_fragment)):
        out = c.to_ipv6(raw(packet))
        if isinstance(expected, DropReason):
            assert out == expected
            continue
        assert isinstance(out, bytes)
        checksum_field = IPv6(out)[UDP].chksum
        assert (checksum_field == 0) == (expected == "zero")


# --- the compiled loop (workers/engine/_fastpath.c clat) against the Python one ---------------

def _host_packet(kind: str, dst: str, ttl: int, size: int, mutation: str) -> list[bytes]:
    transport = (TCP(sport=5000, dport=80, flags="A") if kind == "tcp"
                 else UDP(sport=5000, dport=53))
    datagram = IP(src=HOST4, dst=dst, ttl=ttl, id=7) / transport / Raw(b"x" * size)
    if mutation == "fragments":
        return [raw(piece) for piece in fragment(datagram, fragsize=504)]
    data = bytearray(raw(datagram))
    if mutation == "bad_header_checksum":
        data[10] ^= 1
    elif mutation == "zero_udp_checksum" and kind == "udp":
        data[26:28] = b"\0\0"
    elif mutation == "padding":
        data += b"\0\0"
    return [bytes(data)]


def _plat_packet(kind: str, src4: str, hlim: int, size: int, mutation: str) -> list[bytes]:
    transport = (TCP(sport=80, dport=5000, flags="A") if kind == "tcp"
                 else UDP(sport=53, dport=5000))
    src = "2001:db8:999::1" if mutation == "not_under_prefix" else f"64:ff9b::{src4}"
    data = bytearray(raw(IPv6(src=src, dst=CLAT6, hlim=hlim) / transport
                         / Raw(b"y" * size)))
    if mutation == "bad_checksum":
        data[-1] ^= 1
    return [bytes(data)]


_STEPS = st.lists(st.tuples(
    st.sampled_from(["host", "plat", "ping"]), st.sampled_from(["tcp", "udp"]),
    st.sampled_from([SERVER4, "198.51.100.8", "203.0.113.9"]), st.sampled_from([1, 2, 64]),
    st.integers(0, 1400),
    st.sampled_from(["none", "none", "none", "bad_header_checksum", "zero_udp_checksum",
                     "padding", "fragments", "bad_checksum", "not_under_prefix"])),
    min_size=1, max_size=24)


@settings(max_examples=60, deadline=None)
@given(st.lists(_STEPS, min_size=1, max_size=4))
def test_the_compiled_loop_gives_the_python_loops_bytes_and_counters(
        batches: list[list[tuple[str, str, str, int, int, str]]]) -> None:
    """The same batches (the host's IPv4 and the PLAT's IPv6 mixed, plain ones and every kind
    the plain path must leave: fragments, TTL 1, bad checksums, zero UDP checksums, padding,
    sources not under the prefix, ICMP) through the compiled loop and through the Python
    loop: the same bytes out, in the same order, and the same counters."""
    from sixgate.workers.engine.fastpath import compiled
    require_compiled(compiled, "workers/engine/_fastpath.c")
    fast, python = clat_datapath(), clat_datapath()
    python.compiled = None
    assert fast.compiled is not None
    for steps in batches:
        batch: list[bytes] = []
        for side, kind, address, ttl, size, mutation in steps:
            if side == "host":
                batch += _host_packet(kind, address, ttl, size, mutation)
            elif side == "plat":
                batch += _plat_packet(kind, address, ttl, size, mutation)
            else:
                batch.append(raw(IP(src=HOST4, dst=address) / ICMP(type=8, id=1, seq=1)))
        assert fast.from_clat(batch, 1.0) == python.from_clat(batch, 1.0)
        assert fast.counters.as_dict() == python.counters.as_dict()


def test_the_compiled_loop_takes_the_plain_packets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: once the remote addresses are remembered, the Python plain path never
    sees a plain packet; what comes out is valid (scapy)."""
    from sixgate.workers.engine.fastpath import compiled
    require_compiled(compiled, "workers/engine/_fastpath.c")
    dp = clat_datapath()
    out4 = raw(IP(src=HOST4, dst=SERVER4) / UDP(sport=5000, dport=53) / Raw(b"q" * 30))
    in6 = raw(IPv6(src=SERVER6, dst=CLAT6) / TCP(sport=80, dport=5000, flags="A") / Raw(b"a"))
    dp.from_clat([out4, in6], 1.0)  # remembered by the Python path
    seen: list[bytes] = []
    for name in ("plain_to_ipv6", "plain_to_ipv4"):
        real = getattr(Clat, name)
        monkeypatch.setattr(Clat, name, lambda self, packet, _real=real: (
            seen.append(packet), _real(self, packet))[1])
    out = dp.from_clat([out4, in6, out4], 2.0)
    assert seen == [] and len(out.to_services) == 3
    assert checksums_hold(IPv6(out.to_services[0])) and checksums_hold(IP(out.to_services[1]))
