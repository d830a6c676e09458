"""workers/engine/fragment.py: ``fragment_ipv6`` (RFC 8200 §4.5, RFC 7915 §4) and the bounded
``Reassembler`` (RFC 8200 §4.5, RFC 5722, RFC 6146 §3.4), with a fake clock.

Fragments fed to the reassembler are built by scapy; fragments we build are read by scapy.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, defragment6
from scapy.packet import Raw, raw
from support.helpers import packed6

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.fragment import REASSEMBLY_TIMEOUT_S, Reassembler, fragment_ipv6
from sixgate.workers.engine.packet import PROTO_FRAGMENT, PROTO_UDP

SRC = "2001:db8:1::1"
DST = "2001:db8:2::2"


# --- fragment_ipv6 ----------------------------------------------------------------------------

def test_rfc7915_4_no_fragment_header_when_packet_fits() -> None:
    out = fragment_ipv6(packed6(SRC), packed6(DST), PROTO_UDP, b"u" * 1440, 1480, 7)
    assert len(out) == 1
    pkt = IPv6(out[0])
    assert pkt.nh == PROTO_UDP and IPv6ExtHdrFragment not in pkt and len(out[0]) == 1480


@pytest.mark.parametrize(("payload_len", "mtu", "sizes"), [
    # chunk = (mtu - 40 - 8) rounded down to 8: 1480 -> 1432, 1280 -> 1232, 1300 -> 1248
    (1441, 1480, [1480, 57]),
    (4000, 1480, [1480, 1480, 1184]),
    (3000, 1280, [1280, 1280, 584]),
    (2464, 1280, [1280, 1280]),
    (2465, 1280, [1280, 1280, 49]),
    (2000, 1300, [1296, 800]),
])
def test_rfc8200_4_5_fragment_sizes(payload_len: int, mtu: int, sizes: list[int]) -> None:
    out = fragment_ipv6(packed6(SRC), packed6(DST), PROTO_UDP, bytes(payload_len), mtu, 1)
    assert [len(p) for p in out] == sizes


def test_rfc8200_4_5_fragments_fields_read_by_scapy() -> None:
    payload = bytes(range(256)) * 12  # 3072 bytes
    out = fragment_ipv6(packed6(SRC), packed6(DST), PROTO_UDP, payload, 1280, 0xCAFEF00D,
                        hop_limit=33, traffic_class=0x28)
    pieces = [IPv6(p) for p in out]
    offsets = []
    for i, piece in enumerate(pieces):
        frag = piece[IPv6ExtHdrFragment]
        assert (piece.nh, piece.hlim, piece.tc, piece.fl) == (PROTO_FRAGMENT, 33, 0x28, 0)
        assert (frag.nh, frag.id) == (PROTO_UDP, 0xCAFEF00D)
        assert frag.m == (1 if i < len(pieces) - 1 else 0)
        data = raw(frag.payload)
        if frag.m:
            assert len(data) % 8 == 0
        offsets.append((frag.offset * 8, len(data)))
        assert len(raw(piece)) <= 1280
    # contiguous, no gap, no overlap
    position = 0
    for offset, length in offsets:
        assert offset == position
        position += length
    assert position == len(payload)
    assert b"".join(raw(p[IPv6ExtHdrFragment].payload) for p in pieces) == payload


# --- Reassembler ------------------------------------------------------------------------------

def frag(offset: int, more: bool, data: bytes, ident: int = 7, *, src: str = SRC,
         extra_before: bool = False) -> bytes:
    pkt = IPv6(src=src, dst=DST)
    if extra_before:
        pkt = pkt / IPv6ExtHdrDestOpt()
    return raw(pkt / IPv6ExtHdrFragment(nh=PROTO_UDP, offset=offset // 8, m=int(more), id=ident)
               / Raw(data))


def add(r: Reassembler, packet: bytes, now: float = 0.0) -> bytes | DropReason | None:
    """The fragment as scapy reads it, straight into the reassembler: its own checks are
    tested here even for fragments the parser already refuses (tests/unit/test_rfc8200_host)."""
    header = IPv6(packet)[IPv6ExtHdrFragment]
    fh_offset = len(packet) - len(raw(header))
    nh_offset = 6 if fh_offset == 40 else 40
    return r.add(packet, header.offset * 8, bool(header.m), header.id, fh_offset, nh_offset, now)


def udp_payload(size: int) -> bytes:
    """A whole UDP datagram (header + data) as the fragmentable part."""
    return raw(UDP(sport=1, dport=2) / Raw(bytes(i % 251 for i in range(size - 8))))


def split(data: bytes, chunk: int) -> list[tuple[int, bool, bytes]]:
    return [(o, o + chunk < len(data), data[o:o + chunk]) for o in range(0, len(data), chunk)]


@pytest.mark.parametrize("order", ["in_order", "reverse", "middle_first"])
def test_rfc8200_4_5_reassembles_in_any_order(order: str) -> None:
    data = udp_payload(3000)
    parts = split(data, 1232)
    if order == "reverse":
        parts.reverse()
    elif order == "middle_first":
        parts = [parts[1], parts[2], parts[0]]
    r = Reassembler()
    results = [add(r, frag(o, m, d)) for o, m, d in parts]
    assert results[:-1] == [None, None]
    whole = results[-1]
    assert isinstance(whole, bytes)
    pkt = IPv6(whole)
    assert (pkt.nh, pkt.plen, raw(pkt.payload)) == (PROTO_UDP, 3000, data)
    assert IPv6ExtHdrFragment not in pkt
    assert len(r) == 0 and r.bytes_held == 0


def test_rfc8200_4_5_unfragmentable_part_kept_and_next_header_spliced() -> None:
    data = udp_payload(100)
    r = Reassembler()
    assert add(r, frag(48, False, data[48:], extra_before=True)) is None
    whole = add(r, frag(0, True, data[:48], extra_before=True))
    assert isinstance(whole, bytes)
    pkt = IPv6(whole)
    assert pkt.nh == 60 and pkt[IPv6ExtHdrDestOpt].nh == PROTO_UDP
    assert pkt.plen == 8 + 100 and raw(pkt[IPv6ExtHdrDestOpt].payload) == data


def test_rfc6946_atomic_fragment_returned_at_once() -> None:
    data = udp_payload(40)
    whole = add(Reassembler(), frag(0, False, data))
    assert isinstance(whole, bytes) and IPv6(whole).nh == PROTO_UDP
    assert whole[40:] == data


def test_rfc8200_4_5_agrees_with_scapy_defragment6() -> None:
    big = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=99) / UDP(sport=5, dport=6) / Raw(
        b"q" * 2500)
    from scapy.layers.inet6 import fragment6
    pieces = fragment6(big, 1280)
    r = Reassembler()
    results = [add(r, raw(p)) for p in pieces]
    ours = results[-1]
    assert isinstance(ours, bytes)
    theirs = defragment6([IPv6(raw(p)) for p in pieces])
    assert raw(IPv6(ours)[UDP]) == raw(theirs[UDP])


@pytest.mark.parametrize(("first", "second"), [
    pytest.param((0, True, b"a" * 16), (8, True, b"b" * 16), id="second_starts_inside"),
    pytest.param((16, True, b"a" * 16), (8, True, b"b" * 16), id="second_ends_inside"),
    pytest.param((0, True, b"a" * 32), (8, True, b"b" * 8), id="contained"),
    pytest.param((8, True, b"a" * 8), (0, True, b"b" * 32), id="containing"),
    pytest.param((0, True, b"a" * 16), (0, True, b"a" * 16), id="exact_duplicate"),
    pytest.param((0, True, b"a" * 16), (8, False, b"b" * 3), id="last_overlaps"),
])
def test_rfc8200_4_5_overlapping_fragments_drop(first: tuple[int, bool, bytes],
                                                second: tuple[int, bool, bytes]) -> None:
    # RFC 5722 / RFC 8200 §4.5: abandon the whole datagram, keep nothing of it.
    r = Reassembler()
    assert add(r, frag(*first)) is None
    assert add(r, frag(*second)) is DropReason.BAD_FRAGMENT
    assert len(r) == 0 and r.bytes_held == 0
    # the rest of the datagram that would have completed it is not glued to the old parts
    assert add(r, frag(48, False, b"z" * 4)) is None


@pytest.mark.parametrize(("parts", "why"), [
    pytest.param([(0, True, b"a" * 12)], "non-last fragment not a multiple of 8",
                 id="non_multiple_of_8"),
    pytest.param([(65528, True, b"a" * 16)], "past 65535", id="past_65535"),
    pytest.param([(64, False, b"a" * 8), (80, False, b"b" * 8)], "two different ends",
                 id="two_last_fragments"),
    pytest.param([(64, False, b"a" * 8), (72, True, b"b" * 8)], "data after the end",
                 id="data_after_last"),
])
def test_rfc8200_4_5_inconsistent_fragments_drop(parts: list[tuple[int, bool, bytes]],
                                                 why: str) -> None:
    r = Reassembler()
    results = [add(r, frag(*p)) for p in parts]
    assert results[-1] is DropReason.BAD_FRAGMENT, why
    assert len(r) == 0 and r.bytes_held == 0


def test_rfc8200_4_5_fragment_beyond_last_fragment_end_drops() -> None:
    r = Reassembler()
    assert add(r, frag(1000, True, b"a" * 8)) is None
    result = add(r, frag(496, False, b"b" * 12))
    if result is None:
        result = add(r, frag(0, True, b"c" * 488))
    assert result is DropReason.BAD_FRAGMENT


def test_rfc6146_3_4_datagram_limit_evicts_the_oldest() -> None:
    """Linux since FragmentSmack: a full table evicts its oldest incomplete datagram, so a
    flood of first fragments cannot block the fragmented traffic that follows."""
    r = Reassembler(max_datagrams=2)
    assert add(r, frag(0, True, b"a" * 8, ident=1)) is None
    assert add(r, frag(0, True, b"a" * 8, ident=2, src="2001:db8:2::1")) is None
    assert add(r, frag(0, True, b"a" * 8, ident=3, src="2001:db8:3::1")) is None
    assert len(r) == 2 and r.evicted == 1  # ident 1 went
    done = add(r, frag(8, False, b"end", ident=3, src="2001:db8:3::1"))
    assert isinstance(done, bytes) and done[40 + 8:] == b"end"
    assert add(r, frag(8, False, b"end", ident=1)) is None  # starts anew, waits
    assert r.bytes_held == 8 + 3


def test_rfc6146_3_4_byte_limit_evicts_the_oldest() -> None:
    r = Reassembler(max_bytes=64)
    assert add(r, frag(0, True, b"a" * 48, ident=1)) is None
    assert add(r, frag(0, True, b"b" * 24, ident=2, src="2001:db8:2::1")) is None
    assert r.bytes_held == 24 and len(r) == 1 and r.evicted == 1
    done = add(r, frag(24, False, b"c" * 8, ident=2, src="2001:db8:2::1"))
    assert isinstance(done, bytes)
    assert r.bytes_held == 0


def test_rfc6146_3_4_byte_limit_on_a_known_datagram_forgets_it() -> None:
    r = Reassembler(max_bytes=64)
    assert add(r, frag(0, True, b"a" * 48, ident=1)) is None
    assert add(r, frag(48, True, b"b" * 24, ident=1)) is DropReason.FRAGMENT_LIMIT
    assert len(r) == 0 and r.bytes_held == 0 and r.evicted == 1


def test_one_source_evicts_only_its_own_oldest_datagram() -> None:
    """A per-source /64 budget: a flooding source pushes out its own datagrams, not others'."""
    r = Reassembler(max_datagrams=64)
    assert r.max_datagrams_per_source == 4
    assert add(r, frag(0, True, b"x" * 8, ident=99, src="2001:db8:9::1")) is None
    for ident in range(10):
        assert add(r, frag(0, True, b"a" * 8, ident=ident)) is None
    assert len(r) == 1 + 4 and r.evicted == 6
    done = add(r, frag(8, False, b"!", ident=99, src="2001:db8:9::1"))
    assert isinstance(done, bytes)


def test_overlap_check_is_not_quadratic() -> None:
    """2000 parts of one datagram, in a shuffled order: each fragment's overlap check looks
    at its two neighbours only (a quadratic check took 19 us per fragment at this size)."""
    import random
    import time

    order = list(range(2000))
    random.Random(7).shuffle(order)
    pieces = [frag(i * 8, i != 1999, b"%08d" % i) for i in order]
    r = Reassembler()
    start = time.process_time()
    results = [add(r, p) for p in pieces]
    elapsed = time.process_time() - start
    whole = results[-1]
    assert isinstance(whole, bytes) and whole[40:] == b"".join(b"%08d" % i for i in range(2000))
    assert all(x is None for x in results[:-1])
    print(f"{elapsed / 2000 * 1e6:.1f} us per fragment")


def test_rfc8200_4_5_reassembly_keyed_by_source_destination_ident() -> None:
    r = Reassembler()
    assert add(r, frag(0, True, b"a" * 8, ident=5)) is None
    assert add(r, frag(0, True, b"b" * 8, ident=5, src="2001:db8:1::2")) is None
    assert add(r, frag(0, True, b"c" * 8, ident=6)) is None
    assert len(r) == 3
    done = add(r, frag(8, False, b"B", ident=5, src="2001:db8:1::2"))
    assert isinstance(done, bytes) and done[40:] == b"b" * 8 + b"B"


def test_rfc8200_4_5_reassembly_timeout_60_s() -> None:
    assert REASSEMBLY_TIMEOUT_S == 60.0
    r = Reassembler()
    assert add(r, frag(0, True, b"a" * 8, ident=1), now=100.0) is None
    assert add(r, frag(0, True, b"a" * 8, ident=2), now=130.0) is None
    assert r.expire(159.9) == (0, [])
    count, firsts = r.expire(160.0)  # 60 s after the first fragment of ident 1
    assert count == 1 and len(r) == 1 and r.bytes_held == 8
    # its first fragment (offset 0) had come: handed back for the Time Exceeded, quoted whole
    assert firsts == [(frag(0, True, b"a" * 8, ident=1), PROTO_UDP, 48)]
    # a late fragment of the expired datagram starts a new one, it does not complete it
    assert add(r, frag(8, False, b"z", ident=1), now=161.0) is None
    assert r.expire(190.0)[0] == 1
    # no first fragment in that one: nothing to answer
    assert r.expire(221.0) == (1, [])
    assert len(r) == 0 and r.bytes_held == 0
