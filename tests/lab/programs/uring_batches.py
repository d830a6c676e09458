"""workers/uring.py writing to a real TUN device in a namespace of its own: 600 UDP packets
to a local service in two batches whose ends fall inside the rings (both wrap), one of them
refused by the TUN driver (version 0: EINVAL), then a ring that fails as a whole (its fd
closed: an OSError for the worker to act on). Argument "compiled" or "python": with or
without workers/_tunread.c's copy and system call. Prints: failed writes, whether the last
errno is EINVAL, datagrams received, whether they are the ones sent, and how the broken ring
answered.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys

from sixgate.workers import uring
from sixgate.workers.engine.packet import PROTO_UDP, build_ipv4, pseudo_sum_v4, set_checksum
from sixgate.workers.tun import configure_tun, open_tun
from sixgate.workers.uring import UringWriter


def main() -> None:
    compiled = sys.argv[1:] == ["compiled"]  # else "python": the loops without the C helper
    if compiled and not uring.COMPILED:
        print("compiled-helper-missing")
        return
    fd = open_tun("sgu0")
    configure_tun("sgu0", [ipaddress.IPv4Network("100.64.0.0/24")])
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    service.bind(("127.0.0.1", 9000))
    service.settimeout(2)
    src, dst = socket.inet_aton("100.64.0.1"), socket.inet_aton("127.0.0.1")
    payloads = [bytes([i % 251]) * (i * 97 % 1500 if i != 300 else 60000) for i in range(600)]
    packets = []
    for i, payload in enumerate(payloads):
        segment = bytearray((40000 + i).to_bytes(2, "big") + (9000).to_bytes(2, "big")
                            + (8 + len(payload)).to_bytes(2, "big") + bytes(2) + payload)
        set_checksum(segment, 6, pseudo_sum_v4(src, dst, PROTO_UDP, len(segment)), udp=True)
        packets.append(bytes(build_ipv4(src, dst, PROTO_UDP, segment)))
    packets[123] = bytes(40)  # version 0: the TUN driver refuses it (EINVAL)
    packets[7] = bytearray(packets[7])  # type: ignore[call-overload]  # any bytes-like
    writer = UringWriter.open(fd, entries=256)
    writer.compiled = compiled
    # 100, then 256 + 244: the rings' ends fall inside a batch (both wrap).
    failed = writer.write(packets[:100]) + writer.write(packets[100:])
    got = [service.recv(65536) for _ in range(599)]
    sent = [p for i, p in enumerate(payloads) if i != 123]
    print(failed, writer.last_errno == errno.EINVAL, len(got), got == sent)
    writer.close()
    broken = UringWriter.open(fd, entries=8)
    broken.compiled = compiled
    os.close(broken.ring_fd)  # the ring fails as a whole: an OSError for the worker to act on
    try:
        broken.write(packets[:3])
        print("no-error")
    except OSError as exc:
        print("refused", exc.errno == errno.EBADF)


if __name__ == "__main__":
    main()
