"""The standard library's http.server, unmodified, with a listen backlog of 1024 instead of
socketserver's 5: with 5, a burst of 200 SYNs overflows the accept queue on a loaded machine
and a handshake can stall past any timeout in the *server's* kernel, which says nothing about
the gateway.

    python http_server.py ADDRESS PORT DIRECTORY     (ADDRESS IPv4 or IPv6)
"""

from __future__ import annotations

import functools
import http.server
import socket
import sys


def main(argv: list[str]) -> None:
    address, port, directory = argv[0], int(argv[1]), argv[2]
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    if ":" in address:
        http.server.ThreadingHTTPServer.address_family = socket.AF_INET6
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
    http.server.ThreadingHTTPServer((address, port), handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
