"""Open TCP connections and hold them: how a test keeps sessions alive, or plays slowloris.

    python hold_connections.py ADDRESS PORT COUNT TIMEOUT_S

Connects COUNT times, one after the other (each handshake completes first), and prints
``{"connected": N}``. Then it waits for a line on stdin (or its end), sends nothing, and prints
``{"closed": M}``: how many of the connections the other side had closed meanwhile.
"""

from __future__ import annotations

import json
import socket
import sys


def main(argv: list[str]) -> None:
    address, port, count, timeout_s = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    held: list[socket.socket] = []
    for _ in range(count):
        try:
            held.append(socket.create_connection((address, port), timeout=timeout_s))
        except OSError:
            pass
    print(json.dumps({"connected": len(held)}), flush=True)
    sys.stdin.readline()
    closed = 0
    for sock in held:
        sock.settimeout(0.2)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            pass
    print(json.dumps({"closed": closed}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
