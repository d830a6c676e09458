"""The coordinator <-> worker wire format and the flow hash that picks a worker.

One ZeroMQ message carries one batch of packets in one frame (multipart frames cost ~15x more,
see DESIGN.md), so the format is explicit, versioned and never pickled:

    batch   = version:u8  kind:u8  count:u16  record*count
    record  = outer_src:4s  length:u16  inner_ipv6:length

All integers big-endian. A decoder that sees another version drops the batch and says so.
Pure: no I/O.
"""

from __future__ import annotations

import struct
import zlib

WIRE_VERSION = 1
KIND_PACKETS = 1

BATCH_HEADER = struct.Struct("!BBH")
RECORD_HEADER = struct.Struct("!4sH")
MAX_BATCH = 0xFFFF


def encode_batch(records: list[tuple[bytes, bytes | memoryview]]) -> bytes:
    """Pack (outer_src, inner_ipv6) records into one message."""
    parts: list[bytes | memoryview] = [BATCH_HEADER.pack(WIRE_VERSION, KIND_PACKETS, len(records))]
    for outer_src, inner in records:
        parts.append(RECORD_HEADER.pack(outer_src, len(inner)))
        parts.append(inner)
    return b"".join(parts)


def decode_batch(message: bytes | memoryview) -> list[tuple[bytes, memoryview]] | None:
    """Unpack a batch; None when the version/kind is unknown or the framing is broken."""
    buf = memoryview(message)
    if len(buf) < BATCH_HEADER.size:
        return None
    version, kind, count = BATCH_HEADER.unpack_from(buf)
    if version != WIRE_VERSION or kind != KIND_PACKETS:
        return None
    out: list[tuple[bytes, memoryview]] = []
    offset = BATCH_HEADER.size
    for _ in range(count):
        if offset + RECORD_HEADER.size > len(buf):
            return None
        outer_src, length = RECORD_HEADER.unpack_from(buf, offset)
        offset += RECORD_HEADER.size
        if offset + length > len(buf):
            return None
        out.append((outer_src, buf[offset:offset + length]))
        offset += length
    if offset != len(buf):
        return None  # bytes the count does not cover: the framing is broken
    return out


def flow_hash(inner: bytes | memoryview, seed: int) -> int:
    """Shard key of an inbound IPv6 packet: its source /64 and destination address.

    Ports are left out on purpose: every fragment of a datagram (only the first has ports)
    must reach the same worker to be reassembled (RFC 8200 §4.5), one client must keep one
    pool address (RFC 6888 REQ-2 paired pooling), and the per /64 flow limit is then exact
    because one worker sees all of a /64. ``seed`` comes from the settings; Python's own
    ``hash()`` differs per process and must never be used here.
    """
    return zlib.crc32(inner[8:16], seed) ^ zlib.crc32(inner[24:40])


def pick_worker(inner: bytes | memoryview, seed: int, workers: int) -> int:
    return flow_hash(inner, seed) % workers
