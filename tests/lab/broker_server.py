"""A stand-in for a tunnel broker's update API (HE's dyndns-style /nic/update) over HTTPS.

Answers as such brokers do: ``badauth`` for a wrong user or key, ``nohost`` for another tunnel
id, ``good <ip>`` for a new address and ``nochg <ip>`` for the one it has. Every request is
appended to ``--log`` as a JSON line (time, user, hostname, myip, answer), so a test can count
them. Plain ``http.server`` + ``ssl``: nothing from sixgate.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(args: argparse.Namespace) -> None:
    current = {"ip": ""}
    log = Path(args.log)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            auth = self.headers.get("Authorization", "")
            user, _, key = (base64.b64decode(auth[6:]).decode(errors="replace").partition(":")
                            if auth.startswith("Basic ") else ("", "", ""))
            if url.path != "/nic/update" or user != args.user or key != args.key:
                answer = "badauth"
            elif query.get("hostname") != args.tunnel_id:
                answer = "nohost"
            elif query.get("myip") == current["ip"]:
                answer = f"nochg {current['ip']}"
            else:
                current["ip"] = query.get("myip", "")
                answer = f"good {current['ip']}"
            with log.open("a") as out:
                out.write(json.dumps({"t": time.time(), "user": user, "answer": answer,
                                      "hostname": query.get("hostname"),
                                      "myip": query.get("myip")}) + "\n")
            body = answer.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer((args.address, args.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.cert_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    Path(args.ready_file).write_text("ready\n")
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--address", "--cert", "--cert-key", "--user", "--key", "--tunnel-id",
                 "--log", "--ready-file"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, default=8443)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
