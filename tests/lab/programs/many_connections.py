"""Hold many TCP connections at once from many source addresses, then use them all.

    python many_connections.py ADDRESS PORT PATH COUNT SOURCE [SOURCE ...]

Opens COUNT connections to [ADDRESS]:PORT, source addresses taken in turn, all of them open at
the same time; then sends an HTTP/1.0 GET of PATH on each and reads each answer to its end.
Prints ``{"connected": N, "answered": M, "bodies": [distinct bodies]}``.
"""

from __future__ import annotations

import json
import socket
import sys


def main(argv: list[str]) -> None:
    address, port, path, count, sources = argv[0], int(argv[1]), argv[2], int(argv[3]), argv[4:]
    held: list[socket.socket] = []
    for index in range(count):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.bind((sources[index % len(sources)], 0))
        try:
            sock.connect((address, port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    request = f"GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n".encode()
    for sock in held:
        sock.sendall(request)
    answered, bodies = 0, set()
    for sock in held:
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            continue
        finally:
            sock.close()
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"):
            answered += 1
            bodies.add(body.decode(errors="replace"))
    print(json.dumps({"connected": len(held), "answered": answered, "bodies": sorted(bodies)}))


if __name__ == "__main__":
    main(sys.argv[1:])
