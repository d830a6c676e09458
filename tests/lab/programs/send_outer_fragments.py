"""Send an ICMPv6 echo request inside protocol 41 whose outer IPv4 packet is fragmented (as a
path with a smaller MTU, or a sender that does not set DF, leaves it), and wait for the echo
reply to come back through the tunnel.

    python send_outer_fragments.py SRC4 DST4 SRC6 DST6

Prints ``{"replied": true|false}``. Independent of sixgate: struct and raw sockets only.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time

IDENT = 0x5A5A


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def ipv4_header(src: bytes, dst: bytes, length: int, ident: int, flags_offset: int) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, ident, flags_offset, 64,
                                   41, 0, src, dst))
    header[10:12] = struct.pack("!H", 0xFFFF ^ fold(sum16(bytes(header))))
    return bytes(header)


def main(argv: list[str]) -> None:
    src4, dst4 = socket.inet_aton(argv[0]), socket.inet_aton(argv[1])
    src6 = socket.inet_pton(socket.AF_INET6, argv[2])
    dst6 = socket.inet_pton(socket.AF_INET6, argv[3])
    data = os.urandom(600)
    icmp = bytearray(struct.pack("!BBHHH", 128, 0, 0, IDENT, 1) + data)
    pseudo = src6 + dst6 + struct.pack("!IxxxB", len(icmp), 58)
    icmp[2:4] = struct.pack("!H", 0xFFFF ^ fold(sum16(pseudo + bytes(icmp))))
    inner = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 64) + src6 + dst6 + bytes(icmp)
    ident = int.from_bytes(os.urandom(2), "big")
    cut = 320  # a multiple of 8
    first = ipv4_header(src4, dst4, 20 + cut, ident, 0x2000) + inner[:cut]
    second = ipv4_header(src4, dst4, 20 + len(inner) - cut, ident, cut // 8) + inner[cut:]
    listen = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    send = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for piece in (second, first):  # out of order, as a network may deliver them
        send.sendto(piece, (argv[1], 0))
        time.sleep(0.2)  # apart: the gateway reads the first before the second is there
    deadline = time.monotonic() + 5
    replied = False
    while not replied and time.monotonic() < deadline:
        if not select.select([listen], [], [], 0.2)[0]:
            continue
        packet = listen.recv(65535)
        reply = packet[(packet[0] & 0x0F) * 4:]
        replied = (len(reply) >= 48 and reply[6] == 58 and reply[40] == 129
                   and reply[44:46] == struct.pack("!H", IDENT) and reply[48:] == data)
    print(json.dumps({"replied": replied}))


if __name__ == "__main__":
    main(sys.argv[1:])
