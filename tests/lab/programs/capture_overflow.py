"""workers/capture.py in a namespace of its own: a capture socket with a small receive buffer
that nobody reads gets 2000 protocol-41 packets (a raw socket sends them to the local
address); its next tick counts what the kernel dropped under ``capture_overflow``, once (the
kernel's count is read and cleared). Prints: dropped at the first tick, at the second, and
how many packets the socket still held."""

from __future__ import annotations

import socket
import subprocess
import time

from sixgate.workers.capture import TunnelCapture
from sixgate.workers.engine.counters import Counters

LOCAL = "192.0.2.10"


def main() -> None:
    subprocess.run(["ip", "addr", "add", f"{LOCAL}/32", "dev", "lo"], check=True)
    counters = Counters()
    capture = TunnelCapture(LOCAL, None, False, counters, rcvbuf=64 << 10)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, 41)
    inner = bytes(40 + 512)  # the capture filter looks at the outer header only
    for _ in range(2000):
        sender.sendto(inner, (LOCAL, 0))
    capture.tick(time.monotonic())
    first = counters.as_dict()["drops"]["capture_overflow"]  # type: ignore[index]
    capture.tick(time.monotonic())
    second = counters.as_dict()["drops"]["capture_overflow"]  # type: ignore[index]
    held = 0
    while True:
        count = capture.receive(time.monotonic())[1]
        if not count:
            break
        held += count
    print(first, second - first, held)


if __name__ == "__main__":
    main()
