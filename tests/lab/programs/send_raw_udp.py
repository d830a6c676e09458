"""Send a small UDP datagram with any IPv4 source, from a raw socket (a spoofer's tool).

    python send_raw_udp.py SOURCE DESTINATION COUNT
"""

from __future__ import annotations

import socket
import struct
import sys


def main(argv: list[str]) -> None:
    src, dst = socket.inet_aton(argv[0]), socket.inet_aton(argv[1])
    udp = struct.pack("!HHHH", 40000, 9, 8 + 4, 0) + b"ping"
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for _ in range(int(argv[2])):
        sock.sendto(header + udp, (argv[1], 0))


if __name__ == "__main__":
    main(sys.argv[1:])
