"""Checksum properties (RFC 1071, RFC 1624, RFC 8200 §8.1), against the slow word-by-word
reference in tests/unit/helpers.py: a block with its computed checksum verifies; changing one
byte breaks it unless the 16-bit word sum is unchanged (swapping two aligned words keeps it);
the engine accepts exactly the client packets whose checksums verify.
"""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from support import helpers
from support.helpers import TwoParty, make_datapath, ref_ones_sum, ref_verifies
from support.strategies import (
    CLIENT6,
    GW6,
    TCP,
    UDP,
    ipv6,
    pseudo_v6,
    with_transport_checksum,
)

from sixgate.workers.engine.drops import DropReason
from sixgate.workers.engine.packet import (
    build_ipv4,
    checksum,
    parse_ipv4,
    pseudo_sum_v6,
    set_checksum,
    sum16,
    sum_is_valid,
    transport_sum_is_valid_v6,
)

blocks = st.binary(min_size=2, max_size=300)


@given(blocks)
def test_rfc1071_checksum_is_the_complement_of_the_word_sum(data: bytes) -> None:
    ours = checksum(data)
    ref = ~ref_ones_sum(data) & 0xFFFF
    # 0x0000 and 0xffff are the two zeros of ones' complement arithmetic
    assert ours == ref or {ours, ref} == {0, 0xFFFF}


@st.composite
def block_with_checksum(draw: st.DrawFn) -> tuple[bytearray, int]:
    data = bytearray(draw(blocks))
    offset = draw(st.integers(0, (len(data) - 2) // 2)) * 2
    data[offset:offset + 2] = b"\0\0"
    data[offset:offset + 2] = checksum(data).to_bytes(2, "big")
    return data, offset


@given(block_with_checksum())
def test_rfc1071_block_with_its_checksum_verifies(case: tuple[bytearray, int]) -> None:
    data, _ = case
    assert sum_is_valid(sum16(data))
    assert ref_verifies(bytes(data))


@given(block_with_checksum(), st.data())
def test_rfc1071_one_changed_byte_fails_unless_word_sum_unchanged(
        case: tuple[bytearray, int], draw: st.DataObject) -> None:
    data, _ = case
    index = draw.draw(st.integers(0, len(data) - 1))
    value = draw.draw(st.integers(0, 255))
    assume(value != data[index])
    changed = bytearray(data)
    changed[index] = value
    assume(any(changed))  # all-zero: RFC 1071's +0, a block that cannot carry a checksum
    unchanged_sum = ref_ones_sum(bytes(changed)) % 0xFFFF == ref_ones_sum(bytes(data)) % 0xFFFF
    assert sum_is_valid(sum16(changed)) is unchanged_sum
    assert ref_verifies(bytes(changed)) is unchanged_sum


@given(block_with_checksum(), st.data())
def test_rfc1071_swapping_aligned_words_keeps_the_sum(case: tuple[bytearray, int],
                                                      draw: st.DataObject) -> None:
    data, _ = case
    words = len(data) // 2
    i = draw.draw(st.integers(0, words - 1))
    j = draw.draw(st.integers(0, words - 1))
    swapped = bytearray(data)
    word_i, word_j = data[2 * i:2 * i + 2], data[2 * j:2 * j + 2]
    swapped[2 * i:2 * i + 2], swapped[2 * j:2 * j + 2] = word_j, word_i
    assert sum_is_valid(sum16(swapped))
    assert ref_verifies(bytes(swapped))


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 255), st.binary(max_size=100), st.integers(0, 255), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.integers(0, 255))
def test_rfc791_built_header_parses_and_any_changed_byte_does_not(
        src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int, ident: int,
        flags_offset: int, change: int) -> None:
    packet = build_ipv4(src, dst, proto, payload, ttl=ttl, ident=ident,
                        flags_offset=flags_offset, tos=proto ^ 0x5A)
    view = parse_ipv4(packet)
    assert view == (20, 20 + len(payload), ident, flags_offset, ttl, proto, src, dst,
                    proto ^ 0x5A)
    assert ref_verifies(packet[:20])
    index = change % 20
    flipped = bytearray(packet)
    flipped[index] ^= 1 + (change >> 5)
    assert isinstance(parse_ipv4(bytes(flipped)), DropReason)


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.sampled_from([6, 17, 58]), st.binary(min_size=8, max_size=200), st.data())
def test_rfc8200_8_1_transport_checksum_verifies_and_breaks(src: bytes, dst: bytes, proto: int,
                                                            segment: bytes,
                                                            draw: st.DataObject) -> None:
    offset = {6: 16, 17: 6, 58: 2}[proto]
    assume(len(segment) >= offset + 2)
    seg = bytearray(segment)
    set_checksum(seg, offset, pseudo_sum_v6(src, dst, proto, len(seg)))
    assert transport_sum_is_valid_v6(src, dst, proto, bytes(seg))
    assert ref_verifies(pseudo_v6(src, dst, proto, len(seg)) + bytes(seg))
    index = draw.draw(st.integers(0, len(seg) - 1))
    seg[index] ^= draw.draw(st.integers(1, 255))
    assert not transport_sum_is_valid_v6(src, dst, proto, bytes(seg))


@given(st.sampled_from([UDP, TCP]), st.binary(max_size=120), st.data())
def test_rfc8200_8_1_datapath_accepts_exactly_verifying_segments(proto: int, payload: bytes,
                                                                draw: st.DataObject) -> None:
    if proto == UDP:
        header = (40000).to_bytes(2, "big") + (53).to_bytes(2, "big") + (
            8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    else:
        header = ((40000).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(8)
                  + b"\x50\x02\xff\xff" + bytes(4))
    segment = with_transport_checksum(CLIENT6, GW6, proto, header + payload)
    good = ipv6(CLIENT6, GW6, proto, segment)
    assert len(TwoParty(make_datapath()).client(good).to_services) == 1
    index = draw.draw(st.integers(0, len(segment) - 1))
    value = draw.draw(st.integers(0, 255))
    assume(value != segment[index])
    bad_segment = bytearray(segment)
    bad_segment[index] = value
    step = TwoParty(make_datapath()).client(ipv6(CLIENT6, GW6, proto, bytes(bad_segment)))
    assert step.to_services == []
    assert step.drops == {DropReason.BAD_CHECKSUM: 1}
    assert helpers.internal_errors() == 0
