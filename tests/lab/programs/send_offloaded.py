"""Send one IPv4 protocol-41 packet the way a kernel peer on the same host hands it over when
its NIC or veth does the checksum: with PACKET_VNET_HDR and VIRTIO_NET_HDR_F_NEEDS_CSUM, the
inner TCP or UDP checksum field holding only the pseudo-header sum. The receiving kernel marks
the packet CHECKSUM_PARTIAL, exactly as a Linux sit tunnel's packets over veth arrive.

    python send_offloaded.py IFNAME DST_MAC SRC4 DST4 SRC6 DST6 tcp|udp SPORT DPORT

Independent of sixgate: struct only.
"""

from __future__ import annotations

import socket
import struct
import sys

SOL_PACKET = 263
PACKET_VNET_HDR = 15
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def main(argv: list[str]) -> None:
    ifname, dst_mac, src4, dst4, src6, dst6, proto, sport, dport = argv
    s6 = socket.inet_pton(socket.AF_INET6, src6)
    d6 = socket.inet_pton(socket.AF_INET6, dst6)
    if proto == "udp":
        payload = b"offloaded checksum"
        length = 8 + len(payload)
        header = struct.pack("!HHHH", int(sport), int(dport), length, 0)
        next_header, at = 17, 6
    else:
        payload = b""
        length = 20
        header = struct.pack("!HHIIBBHHH", int(sport), int(dport), 1000, 0, 5 << 4, 0x02,
                             65535, 0, 0)
        next_header, at = 6, 16
    segment = bytearray(header + payload)
    pseudo = fold(sum16(s6 + d6 + struct.pack("!IxxxB", length, next_header)))
    segment[at:at + 2] = struct.pack("!H", pseudo)  # what the offload was to finish
    inner = struct.pack("!IHBB", 6 << 28, length, next_header, 64) + s6 + d6 + bytes(segment)
    outer = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(inner), 1, 0, 64, 41, 0,
                                  socket.inet_aton(src4), socket.inet_aton(dst4)))
    outer[10:12] = struct.pack("!H", 0xFFFF ^ fold(sum16(bytes(outer))))
    with open(f"/sys/class/net/{ifname}/address", encoding="ascii") as f:
        src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    ethernet = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00"
    # struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
    vnet = struct.pack("=BBHHHH", VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 14 + 20 + 40, at)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((ifname, 0))
    sock.send(vnet + ethernet + bytes(outer) + inner)


if __name__ == "__main__":
    main(sys.argv[1:])
