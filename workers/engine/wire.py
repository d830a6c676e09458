"""The coordinator <-> worker wire format and the flow hash that picks a worker (both fan-outs).

One ZeroMQ message carries one batch of packets in one frame (multipart frames cost much more,
see DESIGN.md), so the format is explicit, versioned and never pickled:

    batch   = version:u8  kind:u8  count:u16  record*count
    record  = length:u16  outer_ipv4:length

A record is a captured IPv4 protocol-41 packet exactly as the kernel delivered it: the worker
runs the tunnel checks itself (``Datapath.from_tunnel``), as it does with kernel fan-out. All
integers big-endian. A decoder that sees another version drops the batch and says so.
Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

WIRE_VERSION = 2
KIND_PACKETS = 1

BATCH_HEADER = struct.Struct("!BBH")
RECORD_HEADER = struct.Struct("!H")
MAX_BATCH = 0xFFFF


def encode_batch(packets: Sequence[bytes | memoryview]) -> bytes:
    """Pack captured packets into one message."""
    parts: list[bytes | memoryview] = [BATCH_HEADER.pack(WIRE_VERSION, KIND_PACKETS, len(packets))]
    for packet in packets:
        parts.append(RECORD_HEADER.pack(len(packet)))
        parts.append(packet)
    return b"".join(parts)


def decode_batch(message: bytes) -> list[bytes] | None:
    """Unpack a batch; None when the version/kind is unknown or the framing is broken."""
    if len(message) < BATCH_HEADER.size:
        return None
    version, kind, count = BATCH_HEADER.unpack_from(message)
    if version != WIRE_VERSION or kind != KIND_PACKETS:
        return None
    out: list[bytes] = []
    offset = BATCH_HEADER.size
    end = len(message)
    for _ in range(count):
        if offset + RECORD_HEADER.size > end:
            return None
        (length,) = RECORD_HEADER.unpack_from(message, offset)
        offset += RECORD_HEADER.size
        if offset + length > end:
            return None
        out.append(message[offset:offset + length])
        offset += length
    if offset != end:
        return None  # bytes the count does not cover: the framing is broken
    return out


# --- the flow hash that picks a worker -----------------------------------------------------------
#
# The shard key of a captured packet is its inner source /64 and inner destination. Ports are
# left out on purpose: every fragment of a datagram (only the first has ports) must reach the
# same worker to be reassembled (RFC 8200 §4.5), one client must keep one pool address (RFC 6888
# REQ-2 paired pooling), and the per /64 flow limit is then exact because one worker sees all of
# a /64. ``seed`` comes from the settings; Python's own ``hash()`` differs per process and must
# never be used here.
#
# Kernel fan-out ([gateway] fanout = "kernel", the default): each worker captures protocol 41
# itself on a raw socket whose classic BPF filter accepts only its share, so no packet crosses
# the coordinator. Coordinator fan-out picks the worker with ``fanout_index``, the same function
# in Python, so both fan-outs shard alike. Classic BPF has the arithmetic used: per 32-bit word,
# xor then multiply (FNV-1 style), then fold the high half in and take the remainder.
#
# With ``[gateway] shards`` above the worker count, the remainder is taken twice: the shard
# (hash % shards), then its worker (shard % workers); each shard has its slice of the pool
# (settings.shard_pools), so another worker count moves whole shards. With shards equal to
# the workers (the default) both remainders are the one taken before.

FNV_PRIME_32 = 0x01000193
# Offsets in the outer IPv4 packet (20-byte header): inner source /64, inner destination.
FANOUT_WORDS = (28, 32, 44, 48, 52, 56)
FANOUT_MIN_LENGTH = 60  # outer header + inner header: shorter packets go to worker 0

# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
_INSN = struct.Struct("=HBBI")
_LD_W_LEN, _LD_B_ABS, _LD_W_ABS, _LDX_IMM = 0x80, 0x30, 0x20, 0x01
_JEQ_K, _JGE_K = 0x15, 0x35
_XOR_X, _MUL_K, _RSH_K, _MOD_K = 0xAC, 0x24, 0x74, 0x94
_TAX, _RET_K = 0x07, 0x06
ACCEPT = 0xFFFFFFFF


# The FANOUT_WORDS in one unpack; and the same words of the inner IPv6 packet alone.
_FANOUT_STRUCT = struct.Struct("!28x2I8x4I")
_INNER_STRUCT = struct.Struct("!8x2I8x4I")


def _fanout_hash(words: tuple[int, ...], seed: int) -> int:
    value = seed & 0xFFFFFFFF
    for word in words:
        value = ((word ^ value) * FNV_PRIME_32) & 0xFFFFFFFF
    return (value >> 16) ^ value


def fanout_index(packet: bytes | memoryview, seed: int, workers: int, shards: int = 0) -> int:
    """The worker whose capture filter accepts this outer IPv4 packet."""
    if len(packet) < FANOUT_MIN_LENGTH or packet[0] != 0x45:
        return 0  # too short or IPv4 options: worker 0 checks it (and counts the drop)
    return _fanout_hash(_FANOUT_STRUCT.unpack_from(packet), seed) % (shards or workers) % workers


def inner_shard(ipv6: bytes | memoryview, seed: int, shards: int) -> int:
    """The shard of a decapsulated IPv6 packet (at least 40 bytes): the one ``fanout_index``
    takes its outer packet to."""
    return _fanout_hash(_INNER_STRUCT.unpack_from(ipv6), seed) % shards


# --- the NAT64's shard: nftables' jhash (net/netfilter/nft_hash.c) -----------------------------
#
# A NAT64's IPv6 packets reach their worker by a mark the gateway's nftables chain sets from
# ``jhash`` of the client's /64 (coordinator/forwarding.py nat64_steering): Linux's jhash
# (include/linux/jhash.h, Bob Jenkins' lookup3 over bytes, words read little-endian), then
# reciprocal_scale to the modulus. The engine computes the same to give a new binding a pool4
# port of its client's shard.

JHASH_INITVAL = 0xDEADBEEF
_MASK32 = 0xFFFFFFFF


def _rol32(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & _MASK32


def jhash(key: bytes, initval: int) -> int:
    """Linux's jhash(key, len(key), initval)."""
    length = len(key)
    a = b = c = (JHASH_INITVAL + length + initval) & _MASK32
    k = key
    while length > 12:
        a = (a + int.from_bytes(k[0:4], "little")) & _MASK32
        b = (b + int.from_bytes(k[4:8], "little")) & _MASK32
        c = (c + int.from_bytes(k[8:12], "little")) & _MASK32
        # __jhash_mix
        a = (a - c) & _MASK32; a ^= _rol32(c, 4); c = (c + b) & _MASK32  # noqa: E702
        b = (b - a) & _MASK32; b ^= _rol32(a, 6); a = (a + c) & _MASK32  # noqa: E702
        c = (c - b) & _MASK32; c ^= _rol32(b, 8); b = (b + a) & _MASK32  # noqa: E702
        a = (a - c) & _MASK32; a ^= _rol32(c, 16); c = (c + b) & _MASK32  # noqa: E702
        b = (b - a) & _MASK32; b ^= _rol32(a, 19); a = (a + c) & _MASK32  # noqa: E702
        c = (c - b) & _MASK32; c ^= _rol32(b, 4); b = (b + a) & _MASK32  # noqa: E702
        length -= 12
        k = k[12:]
    if length == 0:
        return c
    tail = k[:length] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK32
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK32
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK32
    # __jhash_final
    c ^= b; c = (c - _rol32(b, 14)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 11)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 25)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 16)) & _MASK32  # noqa: E702
    a ^= c; a = (a - _rol32(c, 4)) & _MASK32  # noqa: E702
    b ^= a; b = (b - _rol32(a, 14)) & _MASK32  # noqa: E702
    c ^= b; c = (c - _rol32(b, 24)) & _MASK32  # noqa: E702
    return c


def nat64_shard(client6: bytes, seed: int, shards: int) -> int:
    """The shard nftables' ``jhash @nh,64,64 mod shards seed seed`` gives a packet from
    ``client6`` (its /64): reciprocal_scale(jhash(...), shards)."""
    return (jhash(client6[:8], seed & _MASK32) * shards) >> 32


def fanout_filter(index: int, workers: int, seed: int, shards: int = 0
                  ) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k) that accepts what ``fanout_index`` gives
    ``index``; see ``pack_filter`` for the bytes the kernel takes."""
    others = ACCEPT if index == 0 else 0
    program: list[tuple[int, int, int, int]] = [
        (_LD_W_LEN, 0, 0, 0),
        (_JGE_K, 0, 0, FANOUT_MIN_LENGTH),  # jf patched below: to "worker 0's share"
        (_LD_B_ABS, 0, 0, 0),
        (_JEQ_K, 0, 0, 0x45),  # jf patched below
        (_LDX_IMM, 0, 0, seed & 0xFFFFFFFF),
    ]
    for offset in FANOUT_WORDS:
        program += [(_LD_W_ABS, 0, 0, offset), (_XOR_X, 0, 0, 0), (_MUL_K, 0, 0, FNV_PRIME_32),
                    (_TAX, 0, 0, 0)]
    program += [(_RSH_K, 0, 0, 16), (_XOR_X, 0, 0, 0)]
    if shards and shards != workers:
        program.append((_MOD_K, 0, 0, shards))
    program += [(_MOD_K, 0, 0, workers),
                (_JEQ_K, 0, 1, index), (_RET_K, 0, 0, ACCEPT), (_RET_K, 0, 0, 0),
                (_RET_K, 0, 0, others)]
    last = len(program) - 1
    program[1] = (_JGE_K, 0, last - 2, FANOUT_MIN_LENGTH)
    program[3] = (_JEQ_K, 0, last - 4, 0x45)
    return program


# --- the capture filter (AF_PACKET, workers/capture.py) -------------------------------------------
#
# The capture reads IPv4 packets off every interface, before the IP layer (which also gets
# them, and delivers them to a raw protocol-41 socket that accepts none). So the filter does in
# the kernel what the IP layer would have done first: protocol 41 to our address only, never a
# packet we send (PACKET_OUTGOING), and a plain 20-byte header only with a valid header
# checksum (RFC 791; a header with options is verified in userspace). Outer fragments all go to
# worker 0, which reassembles them (their later pieces carry no inner addresses to shard by).

_LD_H_ABS, _JSET_K, _ADD_X, _AND_K, _TXA = 0x28, 0x45, 0x0C, 0x54, 0x87
_ST, _LDX_MEM = 0x02, 0x61
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE: the skb's packet type
PACKET_OUTGOING = 4
PROTO_41 = 41
IPV4_FRAGMENT_BITS = 0x3FFF  # MF and the fragment offset


def _header_checksum_ok() -> list[tuple[int, int, int, int]]:
    """A = the folded ones' complement sum of a 20-byte IPv4 header (0xFFFF when valid)."""
    program = [(_LD_H_ABS, 0, 0, 0), (_TAX, 0, 0, 0)]
    for offset in range(2, 20, 2):
        program += [(_LD_H_ABS, 0, 0, offset), (_ADD_X, 0, 0, 0)]
        if offset < 18:
            program.append((_TAX, 0, 0, 0))
    fold = [(_TAX, 0, 0, 0), (_RSH_K, 0, 0, 16), (_ST, 0, 0, 0), (_TXA, 0, 0, 0),
            (_AND_K, 0, 0, 0xFFFF), (_LDX_MEM, 0, 0, 0), (_ADD_X, 0, 0, 0)]
    return program + fold + fold


def capture_filter(local_ipv4: bytes, share: list[tuple[int, int, int, int]] | None,
                   fragments: bool) -> list[tuple[int, int, int, int]]:
    """The capture's classic BPF program: the IP layer's first checks (above), then ``share``
    (``fanout_filter``'s program for kernel fan-out; None: every packet, for the coordinator);
    outer fragments accepted where ``fragments``."""
    checksum = _header_checksum_ok()
    program: list[tuple[int, int, int, int]] = [
        (_LD_B_ABS, 0, 0, 9), (_JEQ_K, 0, 0, PROTO_41),                       # 0, 1
        (_LD_W_ABS, 0, 0, 16), (_JEQ_K, 0, 0, int.from_bytes(local_ipv4, "big")),  # 2, 3
        (_LD_B_ABS, 0, 0, SKF_AD_PKTTYPE), (_JEQ_K, 0, 0, PACKET_OUTGOING),   # 4, 5
        (_LD_B_ABS, 0, 0, 0), (_JEQ_K, 0, len(checksum) + 1, 0x45),           # 6, 7
        *checksum, (_JEQ_K, 0, 0, 0xFFFF),                                    # sum == -0
        (_LD_H_ABS, 0, 0, 6), (_JSET_K, 0, 0, IPV4_FRAGMENT_BITS),
    ]
    body = list(share) if share is not None else [(_RET_K, 0, 0, ACCEPT)]
    drop = len(program) + len(body)
    fragment = drop + 1

    def to(target: int, at: int) -> int:
        return target - at - 1

    program[1] = (_JEQ_K, 0, to(drop, 1), PROTO_41)
    program[3] = (_JEQ_K, 0, to(drop, 3), program[3][3])
    program[5] = (_JEQ_K, to(drop, 5), 0, PACKET_OUTGOING)
    check_at = 8 + len(checksum)
    program[check_at] = (_JEQ_K, 0, to(drop, check_at), 0xFFFF)
    jset_at = check_at + 2
    program[jset_at] = (_JSET_K, to(fragment, jset_at), 0, IPV4_FRAGMENT_BITS)
    return program + body + [(_RET_K, 0, 0, 0), (_RET_K, 0, 0, ACCEPT if fragments else 0)]


def echo_reply_filter(peer_ipv4: bytes) -> list[tuple[int, int, int, int]]:
    """The tunnel-peer probe's raw socket filter (coordinator/liveness.py): protocol 41 from
    ``peer_ipv4`` carrying an ICMPv6 echo reply right after a 20-byte outer and a 40-byte inner
    header; nothing else is queued to it (a raw socket gets a copy of every protocol-41
    packet, which at full load would cost as much as the capture)."""
    checks = [(_LD_B_ABS, 9, PROTO_41), (_LD_W_ABS, 12, int.from_bytes(peer_ipv4, "big")),
              (_LD_B_ABS, 0, 0x45), (_LD_B_ABS, 26, 58), (_LD_B_ABS, 60, 129)]
    program: list[tuple[int, int, int, int]] = []
    drop = 2 * len(checks) + 1
    for load, offset, value in checks:
        at = len(program) + 1
        program += [(load, 0, 0, offset), (_JEQ_K, 0, drop - at - 1, value)]
    return program + [(_RET_K, 0, 0, ACCEPT), (_RET_K, 0, 0, 0)]


def pack_filter(program: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(_INSN.pack(*insn) for insn in program)
