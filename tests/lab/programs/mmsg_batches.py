"""workers/mmsg.py on real raw sockets in a namespace of its own: 150 packets sent in
sendmmsg batches of 64, one of them to an address without a route (refused), and read back
with recvmmsg in batches of at most 64. Prints: failed sends, packets received, and whether
they are the ones sent, in order.
"""

from __future__ import annotations

import socket

from sixgate.workers.mmsg import BatchReceiver, BatchSender


def main() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    local = socket.inet_aton("127.0.0.1")
    nowhere = socket.inet_aton("203.0.113.77")  # no route in this namespace
    packets = [(bytes([i % 256]) * (40 + i), nowhere if i == 70 else local) for i in range(150)]
    failed = BatchSender(tx, batch=64).send(packets)
    receiver = BatchReceiver(rx, batch=64)
    got: list[bytes] = []
    while True:
        batch = receiver.receive()
        if not batch:
            break
        assert len(batch) <= 64
        got += [bytes(p[20:]) for p in batch]  # the kernel adds the IPv4 header
    sent = [p for p, dst in packets if dst == local]
    print(failed, len(got), got == sent)


if __name__ == "__main__":
    main()
