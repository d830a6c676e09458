"""workers/engine/wire.py: the coordinator <-> worker batch format and the flow hash.

Round trips, every kind of broken framing (-> None, never an exception), and the shard key
rules: fragments and all flows of one /64 land on one worker; no per-process hash().
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import raw
from support.helpers import client_udp, encapsulate

from sixgate.workers.engine.wire import (
    BATCH_HEADER,
    FANOUT_MIN_LENGTH,
    KIND_PACKETS,
    WIRE_VERSION,
    capture_filter,
    decode_batch,
    echo_reply_filter,
    encode_batch,
    fanout_filter,
    fanout_index,
    inner_shard,
    jhash,
    nat64_shard,
    pack_filter,
)

RECORDS = [
    encapsulate(client_udp(payload=b"one"), "198.51.100.1"),
    b"",
    bytes(range(256)) * 4,
    encapsulate(client_udp(payload=b"x" * 1400), "198.51.100.2"),
]


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_wire_batch_round_trip(count: int) -> None:
    records = RECORDS[:count]
    message = encode_batch(records)
    assert message[:4] == BATCH_HEADER.pack(WIRE_VERSION, KIND_PACKETS, count)
    assert decode_batch(message) == records
    assert encode_batch([memoryview(r) for r in records]) == message


def test_wire_batch_layout_is_explicit() -> None:
    # version:u8 kind:u8 count:u16 | length:u16 outer_ipv4
    message = encode_batch([b"\xaa\xbb\xcc"])
    assert message == bytes([2, 1, 0, 1, 0, 3, 0xAA, 0xBB, 0xCC])


def test_wire_batch_largest_record() -> None:
    records = [bytes(0xFFFF)]
    assert decode_batch(encode_batch(records)) == records


GOOD = encode_batch(RECORDS[:2])


def _with(offset: int, value: bytes) -> bytes:
    return GOOD[:offset] + value + GOOD[offset + len(value):]


@pytest.mark.parametrize("message", [
    pytest.param(b"", id="empty"),
    pytest.param(GOOD[:3], id="short_header"),
    pytest.param(_with(0, b"\x01"), id="version_1"),
    pytest.param(_with(0, b"\x00"), id="version_0"),
    pytest.param(_with(1, b"\x02"), id="unknown_kind"),
    pytest.param(_with(2, b"\x00\x03"), id="count_larger_than_records"),
    pytest.param(GOOD[:4 + 1], id="record_header_cut"),
    pytest.param(GOOD[:-1], id="last_record_cut"),
    pytest.param(_with(4, b"\xff\xff"), id="length_past_end"),
])
def test_wire_corrupt_batch_is_none(message: bytes) -> None:
    assert decode_batch(message) is None


def test_wire_every_truncation_of_a_batch_is_none() -> None:
    message = encode_batch(RECORDS)
    for cut in range(len(message)):
        assert decode_batch(message[:cut]) is None, cut


def test_wire_trailing_bytes_after_last_record_is_none() -> None:
    one = encode_batch(RECORDS[:1])
    extra = encode_batch(RECORDS[1:2])[4:]  # a whole second record the count does not admit
    assert decode_batch(one + extra) is None


# --- flow hash --------------------------------------------------------------------------------

def outer(inner: bytes, src4: str = "198.51.100.1") -> bytes:
    return encapsulate(inner, src4)


def test_flow_hash_one_worker_per_64_and_destination() -> None:
    def index(src: str, dst: str = "2002:c000:20a::1", **kw: int) -> int:
        return fanout_index(outer(raw(IPv6(src=src, dst=dst) / UDP(**kw))), 7, 1 << 30)

    base = index("2001:db8:1:2::1")
    for other in ("2001:db8:1:2::ffff", "2001:db8:1:2:abcd::9"):
        assert index(other) == base
    # ports are not part of the key (later fragments carry none)
    assert index("2001:db8:1:2::1", sport=1) == index("2001:db8:1:2::1", sport=2)
    assert index("2001:db8:1:3::1") != base
    assert index("2001:db8:1:2::1", dst="2002:c000:20a::2") != base


def test_rfc8200_4_5_all_fragments_of_a_datagram_hash_alike() -> None:
    from scapy.layers.inet6 import fragment6
    big = (IPv6(src="2001:db8:1:2::1", dst="2002:c000:20a::1") / IPv6ExtHdrFragment(id=1)
           / UDP(sport=1234, dport=53) / bytes(3000))
    pieces = [outer(raw(p)) for p in fragment6(big, 1280)]
    assert len(pieces) == 3
    assert len({fanout_index(p, 0x5167, 4) for p in pieces}) == 1


def test_flow_hash_depends_on_seed() -> None:
    pkt = outer(raw(IPv6(src="2001:db8:1:2::1", dst="2002:c000:20a::1") / UDP()))
    assert fanout_index(pkt, 1, 1 << 30) != fanout_index(pkt, 2, 1 << 30)


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_fanout_index_in_range(workers: int) -> None:
    for i in range(50):
        pkt = outer(raw(IPv6(src=f"2001:db8:{i:x}::1", dst="2002:c000:20a::1") / UDP()))
        assert 0 <= fanout_index(pkt, 0x5167, workers) < workers


def test_flow_hash_same_in_every_process() -> None:
    # STYLE.md: never shard with Python's hash() (it differs per process).
    pkt = outer(raw(IPv6(src="2001:db8:1:2::1", dst="2002:c000:20a::1") / UDP()))
    here = fanout_index(pkt, 0x5167, 1 << 30)
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from workers.engine.wire import fanout_index; "
            f"print(fanout_index(bytes.fromhex('{pkt.hex()}'), 0x5167, 1 << 30))")
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert int(out) == here


# --- kernel fan-out: the classic BPF program and its Python twin ------------------------------

def run_classic_bpf(program: list[tuple[int, int, int, int]], packet: bytes,
                    pkttype: int = 0) -> int:
    """A small interpreter of the classic BPF subset the capture filters use, written from
    the kernel's semantics (loads are big-endian; a load past the end returns 0 at once;
    SKF_AD_OFF + SKF_AD_PKTTYPE loads the packet type)."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x80:  # ld len
            a = len(packet)
        elif code == 0x30 and k == 0xFFFFF000 + 4:  # ldb [SKF_AD_OFF + SKF_AD_PKTTYPE]
            a = pkttype
        elif code in (0x30, 0x28, 0x20):  # ldb [k], ldh [k], ld [k]
            size = {0x30: 1, 0x28: 2, 0x20: 4}[code]
            if k + size > len(packet):
                return 0
            a = int.from_bytes(packet[k:k + size], "big")
        elif code == 0x0C:  # add x
            a = (a + x) & 0xFFFFFFFF
        elif code == 0x54:  # and #k
            a &= k
        elif code == 0x87:  # txa
            a = x
        elif code == 0x02:  # st M[k]
            memory[k] = a
        elif code == 0x61:  # ldx M[k]
            x = memory[k]
        elif code == 0x45:  # jset #k
            pc += jt if a & k else jf
        elif code == 0x01:  # ldx #k
            x = k
        elif code == 0x07:  # tax
            x = a
        elif code == 0xAC:  # xor x
            a ^= x
        elif code == 0x24:  # mul #k
            a = (a * k) & 0xFFFFFFFF
        elif code == 0x74:  # rsh #k
            a >>= k
        elif code == 0x94:  # mod #k
            a %= k
        elif code == 0x15:  # jeq #k
            pc += jt if a == k else jf
        elif code == 0x35:  # jge #k
            pc += jt if a >= k else jf
        elif code == 0x06:  # ret #k
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not in the subset")


fanout_packets = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda head, rest: b"\x45" + head + rest, st.binary(min_size=59, max_size=59),
              st.binary(max_size=40)))


@given(fanout_packets, st.integers(1, 16), st.integers(0, 0xFFFFFFFF))
def test_fanout_filter_accepts_exactly_fanout_index(packet: bytes, workers: int,
                                                    seed: int) -> None:
    """Every packet is accepted by exactly one worker's filter: the one fanout_index names."""
    accepted = [index for index in range(workers)
                if run_classic_bpf(fanout_filter(index, workers, seed), packet)]
    assert accepted == [fanout_index(packet, seed, workers)]


@given(fanout_packets, st.integers(1, 8), st.integers(0, 3), st.integers(0, 0xFFFFFFFF))
def test_fanout_filter_with_shards_accepts_exactly_fanout_index(
        packet: bytes, workers: int, extra: int, seed: int) -> None:
    """[gateway] shards: the filter takes the shard, then its worker, as fanout_index does;
    and a decapsulated packet's shard (inner_shard, the pool slice a new client gets) is the
    one its outer packet was taken to."""
    shards = workers * (1 + extra) + extra
    accepted = [index for index in range(workers)
                if run_classic_bpf(fanout_filter(index, workers, seed, shards), packet)]
    assert accepted == [fanout_index(packet, seed, workers, shards)]
    if len(packet) >= FANOUT_MIN_LENGTH and packet[0] == 0x45:
        shard = inner_shard(packet[20:], seed, shards)
        assert shard % workers == fanout_index(packet, seed, workers, shards)


def test_jhash_is_lookup3s_as_published() -> None:
    """The NAT64's shard is nftables' jhash (Linux include/linux/jhash.h, Bob Jenkins'
    lookup3 ``hashlittle``): its published values (lookup3.c driver5)."""
    assert jhash(b"", 0) == 0xDEADBEEF
    assert jhash(b"Four score and seven years ago", 0) == 0x17770551
    assert jhash(b"Four score and seven years ago", 1) == 0xCD628161


@given(st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFFFFFF), st.integers(1, 64))
def test_nat64_shard_reads_the_clients_slash64_only(client: bytes, seed: int,
                                                    shards: int) -> None:
    shard = nat64_shard(client, seed, shards)
    assert 0 <= shard < shards
    assert nat64_shard(client[:8] + bytes(8), seed, shards) == shard


@given(st.binary(min_size=60, max_size=60), st.binary(max_size=1400), st.integers(2, 8))
def test_fanout_ignores_ports_and_the_low_64_bits_of_the_source(head: bytes, tail: bytes,
                                                                 workers: int) -> None:
    """Fragments (no ports) and every address of one /64 land on the same worker."""
    packet = bytearray(b"\x45" + head[1:] + tail)
    index = fanout_index(bytes(packet), 7, workers)
    packet[36:44] = bytes(8)  # the source's interface identifier
    packet[60:64] = b"\x12\x34\x56\x78"  # ports, or fragment header
    assert fanout_index(bytes(packet[:max(60, len(packet))]), 7, workers) == index


def test_fanout_spreads_clients() -> None:
    counts = [0, 0, 0, 0]
    for n in range(4000):
        packet = bytes([0x45]) + bytes(27) + n.to_bytes(8, "big") + bytes(8) + bytes(16)
        counts[fanout_index(packet, 0x5167, 4)] += 1
    assert min(counts) > 800, counts


def test_fanout_filter_is_short_enough_for_classic_bpf() -> None:
    program = fanout_filter(3, 16, 1)
    assert len(program) < 256 and len(pack_filter(program)) == 8 * len(program)


# --- the capture filter: the IP layer's first checks, in the kernel ---------------------------

GW4_PACKED = bytes([192, 0, 2, 10])


def _outer(inner: bytes = b"", **fields: object) -> bytes:
    from scapy.layers.inet import IP
    return raw(IP(**{"src": "198.51.100.1", "dst": "192.0.2.10", "proto": 41, **fields})
               / inner)


CAPTURE_INNER = raw(IPv6(src="2002:c633:6401::1", dst="2002:c000:20a::1") / UDP() / b"x")


@pytest.mark.parametrize(("packet", "pkttype", "accepted"), [
    pytest.param(_outer(CAPTURE_INNER), 0, True, id="ours"),
    pytest.param(_outer(CAPTURE_INNER, proto=17), 0, False, id="not_protocol_41"),
    pytest.param(_outer(CAPTURE_INNER, dst="192.0.2.11"), 0, False, id="not_our_address"),
    pytest.param(_outer(CAPTURE_INNER), 4, False, id="outgoing"),
    pytest.param(_outer(CAPTURE_INNER)[:10] + b"\x12\x34" + _outer(CAPTURE_INNER)[12:], 0,
                 False, id="bad_header_checksum"),
    pytest.param(_outer(CAPTURE_INNER, options=[b"\x01\x01\x01\x00"])[:10] + b"\0\0"
                 + _outer(CAPTURE_INNER, options=[b"\x01\x01\x01\x00"])[12:], 0, True,
                 id="options_checked_in_userspace"),
    pytest.param(_outer(CAPTURE_INNER, flags="MF"), 0, True, id="first_fragment"),
    pytest.param(_outer(b"later piece", frag=185), 0, True, id="later_fragment"),
])
def test_capture_filter_does_the_ip_layers_first_checks(packet: bytes, pkttype: int,
                                                        accepted: bool) -> None:
    program = capture_filter(GW4_PACKED, None, fragments=True)
    assert bool(run_classic_bpf(program, packet, pkttype)) is accepted


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF))
def test_capture_filter_header_checksum_is_rfc_1071(ident: int, ttl: int) -> None:
    """Every valid header passes, and no header with any one byte of its checksum off."""
    good = _outer(CAPTURE_INNER, id=ident, ttl=ttl)
    program = capture_filter(GW4_PACKED, None, fragments=False)
    assert run_classic_bpf(program, good)
    for index in (10, 11):
        bad = bytearray(good)
        bad[index] ^= 0x5A
        assert not run_classic_bpf(program, bytes(bad))


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(min_size=8, max_size=8)),
                min_size=1, max_size=30), st.integers(2, 8))
def test_capture_filter_shares_plain_packets_and_gives_fragments_to_worker_0(
        flows: list[tuple[int, bytes]], workers: int) -> None:
    for ident, prefix in flows:
        src = str(ipaddress.IPv6Address(prefix + bytes(8)))
        packet = _outer(raw(IPv6(src=src, dst="2002:c000:20a::1") / UDP()), id=ident)
        accepted = [i for i in range(workers) if run_classic_bpf(capture_filter(
            GW4_PACKED, fanout_filter(i, workers, 7), fragments=i == 0), packet)]
        assert accepted == [fanout_index(packet, 7, workers)]
        piece = _outer(b"later piece", id=ident, frag=185)
        accepted = [i for i in range(workers) if run_classic_bpf(capture_filter(
            GW4_PACKED, fanout_filter(i, workers, 7), fragments=i == 0), piece)]
        assert accepted == [0]


# --- the 6in4 broker probe's socket filter (coordinator/liveness.py) ------------------------------

def _probe_reply(**fields: object) -> bytes:
    return _outer(raw(IPv6(src="fe80::c633:6401", dst="fe80::c000:20a")
                      / ICMPv6EchoReply(id=7, seq=1, data=b"probe")), **fields)


@pytest.mark.parametrize(("packet", "accepted"), [
    pytest.param(_probe_reply(), True, id="the_brokers_echo_reply"),
    pytest.param(_probe_reply(src="198.51.100.2"), False, id="from_another_host"),
    pytest.param(_outer(CAPTURE_INNER), False, id="tunnel_traffic"),
    pytest.param(_outer(raw(IPv6(src="fe80::c633:6401", dst="fe80::c000:20a")
                            / ICMPv6EchoRequest(id=7, seq=1))), False, id="an_echo_request"),
    pytest.param(_probe_reply(proto=4), False, id="not_protocol_41"),
])
def test_the_probe_socket_queues_only_the_brokers_echo_replies(packet: bytes,
                                                               accepted: bool) -> None:
    program = echo_reply_filter(bytes([198, 51, 100, 1]))
    assert bool(run_classic_bpf(program, packet)) is accepted
    pack_filter(program)  # packs as the kernel takes it
